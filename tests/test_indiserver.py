"""The thermostat as a libindi citizen: an executable driver under indiserver
(TCP and FIFO modes), the standard properties, and servers chained across
machines (here, across ports)."""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest

import thermostat
from conftest import (
    FAST,
    ROOT,
    IndiClient,
    ServerProcess,
    blob_files,
    cpu_seconds,
    free_port,
    new_number,
    new_switch,
    tagged,
    wait_for_port,
)
from test_peers import getprop, setprop, wait_for_prop

SPEED_UP = ["Thermostat.POLLING_PERIOD.PERIOD_MS=50", "Thermostat.logperiodvector.logperiod=0.5"]


class IndiServer:
    "libindi's indiserver on a free port, with the given drivers or options."

    def __init__(self, *arguments):
        assert shutil.which("indi_thermostat"), "indi_thermostat is not on PATH: pip install -e ."
        self.port = free_port()
        self.process = subprocess.Popen(["indiserver", "-v", "-p", str(self.port),
                                         "-u", f"/tmp/indiserver-{self.port}", *arguments],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for_port(self.port)

    def driver_pids(self):
        children = f"/proc/{self.process.pid}/task/{self.process.pid}/children"
        return [int(pid) for pid in open(children).read().split()]

    def stop(self):
        "Stop indiserver, and any driver of it that does not end at its end of input."
        drivers = []
        if self.process.poll() is None:
            drivers = self.driver_pids()
            self.process.terminate()
        self.process.wait(timeout=5)
        for pid in drivers:                  # (indipydriver's own stdin link reads on forever)
            if not process_gone(pid, timeout=2):
                os.kill(pid, signal.SIGKILL)


def process_gone(pid, timeout):
    "True once pid has exited (or is a zombie) within timeout seconds."
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_indi_getprop_and_setprop_through_indiserver(indiserver):
    server = indiserver("indi_thermostat")
    props = getprop(server.port)
    deadline = time.monotonic() + 10     # the driver, a Python process, may still be starting
    while "Thermostat.CONNECTION.CONNECT" not in props and time.monotonic() < deadline:
        props = getprop(server.port)
    for name in ("CONNECTION.CONNECT", "DRIVER_INFO.DRIVER_EXEC", "DRIVER_INFO.DRIVER_INTERFACE",
                 "POLLING_PERIOD.PERIOD_MS", "logperiodvector.logperiod", "temperaturevector.temperature",
                 "targetvector.target", "heatervector.heater", "switchvector.switchmember"):
        assert f"Thermostat.{name}" in props
    assert props["Thermostat.DRIVER_INFO.DRIVER_INTERFACE"] == "32768"
    assert props["Thermostat.POLLING_PERIOD.PERIOD_MS"] == "10000"
    for spec in (*SPEED_UP, "Thermostat.targetvector.target=21:15"):
        setprop(server.port, spec)
    wait_for_prop(server.port, "Thermostat.targetvector.target", "21.25")
    wait_for_prop(server.port, "Thermostat.POLLING_PERIOD.PERIOD_MS", "50")
    wait_for_prop(server.port, "Thermostat.logperiodvector.logperiod", "0.5")
    setprop(server.port, "Thermostat.POLLING_PERIOD.PERIOD_MS=5")          # below libindi's minimum
    wait_for_prop(server.port, "Thermostat.POLLING_PERIOD._STATE", "Alert")
    assert getprop(server.port, "Thermostat.POLLING_PERIOD.PERIOD_MS")["Thermostat.POLLING_PERIOD.PERIOD_MS"] == "50"


def test_complete_csv_files_through_indiserver_and_the_driver_ends_with_it(indiserver):
    server = indiserver("indi_thermostat")
    for spec in SPEED_UP:
        setprop(server.port, spec)
    client = IndiClient(server.port)
    client.send('<getProperties version="1.7"/><enableBLOB device="Thermostat">Also</enableBLOB>')
    client.send(new_switch("Thermostat", "switchvector", "switchmember", "On"))
    files = blob_files(client.gather(tagged("setBLOBVector", name="logsvector"), 3, timeout=15))
    for size, content in files:
        lines = content.decode().splitlines()
        assert size == len(content) and lines[0] == "timestamp,temperature" and len(lines) > 5
    client.close()
    (driver,) = server.driver_pids()
    server.stop()
    assert process_gone(driver, timeout=3), "the driver outlived indiserver"


def test_indi_eval_waits_for_the_target_to_be_reached(indiserver, tmp_path):
    # a fast box (about 0.1 K a 50 ms poll): the default one would take a minute to warm 1 K
    fast = tmp_path / "indi_thermostat_fast"
    fast.write_text(f'#!/bin/sh\nexec {shutil.which("indi_thermostat")} --sensor simulator:10 "$@"\n')
    fast.chmod(0o755)
    server = indiserver(str(fast))
    setprop(server.port, SPEED_UP[0])
    setprop(server.port, "Thermostat.targetvector.target=40")
    wait_for_prop(server.port, "Thermostat.targetvector._STATE", "Busy")
    waiting = subprocess.Popen(["indi_eval", "-p", str(server.port), "-w", "-t", "20",
                                '"Thermostat.targetvector._STATE"==1'])
    time.sleep(0.5)
    assert waiting.poll() is None, "indi_eval must still be waiting while the target is far"
    temperature = float(getprop(server.port, "Thermostat.temperaturevector.temperature")
                        ["Thermostat.temperaturevector.temperature"])
    setprop(server.port, f"Thermostat.targetvector.target={temperature + 1.5:.1f}")
    assert waiting.wait(timeout=20) == 0


def test_fifo_start_and_stop_with_a_device_name(indiserver, tmp_path):
    fifo = tmp_path / "indi.fifo"
    os.mkfifo(fifo)
    server = indiserver("-f", str(fifo))
    with open(fifo, "w") as commands:
        commands.write('start indi_thermostat -n "Greenhouse"\n')
    deadline = time.monotonic() + 10
    while "Greenhouse.DRIVER_INFO.DRIVER_EXEC" not in (props := getprop(server.port)):
        assert time.monotonic() < deadline, props
    assert not any(name.startswith("Thermostat.") for name in props)
    (driver,) = server.driver_pids()
    with open(fifo, "w") as commands:
        commands.write('stop indi_thermostat -n "Greenhouse"\n')
    assert process_gone(driver, timeout=5)


def test_connection_disconnect_stops_regulation_and_updates_connect_resumes(served):
    server = served()
    client = server.client()
    client.send('<getProperties version="1.7"/>')
    client.send(new_number("Thermostat", "targetvector", "target", "60"))
    assert client.expect(tagged("setLightVector", name="heatervector")).find("oneLight").text == "Busy"
    client.send(new_switch("Thermostat", "CONNECTION", "DISCONNECT", "On"))
    assert client.expect(tagged("setLightVector", name="heatervector")).find("oneLight").text == "Idle"
    reply = client.expect(tagged("setSwitchVector", name="CONNECTION"))
    assert {m.get("name"): m.text for m in reply} == {"CONNECT": "Off", "DISCONNECT": "On"}
    assert client.expect(tagged("setNumberVector", name="temperaturevector")).get("state") == "Idle"
    seen = len(client.received)
    with pytest.raises(AssertionError, match="timed out"):
        client.expect(tagged("setNumberVector", name="temperaturevector"), timeout=0.5)   # ten polls
    assert len(client.received) == seen
    client.send(new_switch("Thermostat", "CONNECTION", "CONNECT", "On"))
    assert client.expect(tagged("setSwitchVector", name="CONNECTION")).get("state") == "Ok"
    assert client.expect(tagged("setLightVector", name="heatervector")).find("oneLight").text == "Busy"
    client.gather(tagged("setNumberVector", name="temperaturevector"), 3)
    client.close()


def test_stdio_speaks_only_protocol_on_stdout_and_ends_at_end_of_input():
    request = b'<getProperties version="1.7"/>' + new_number("Thermostat", "targetvector", "target", "x").encode()
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "thermostat.py"), "--stdio", "-v"],
                            input=request, capture_output=True, timeout=10)
    assert result.returncode == 0 and time.monotonic() - started < 5
    elements = list(ET.fromstring(b"<stream>" + result.stdout + b"</stream>"))
    assert sum(e.tag.startswith("def") for e in elements) == len(thermostat.make_driver(config=None).device)
    assert any(e.get("state") == "Alert" for e in elements if e.get("name") == "targetvector")
    assert b"end of input" in result.stderr


def test_indidev_names_the_device():
    result = subprocess.run(["indi_thermostat"], input=b'<getProperties version="1.7"/>',
                            capture_output=True, timeout=10, env={**os.environ, "INDIDEV": "Cellar"})
    devices = {e.get("device") for e in ET.fromstring(b"<s>" + result.stdout + b"</s>")}
    assert devices == {"Cellar"}


def test_writes_complete_on_a_non_blocking_socket_shared_by_stdin_and_stdout():
    "As indiserver runs a driver: one socket as fd 0 and 1, made non-blocking, and a slow reader."
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    driver = thermostat.make_driver()
    link = thermostat.StdioLink(driver, fd_in=ours.fileno(), fd_out=ours.fileno())
    content = os.urandom(1_500_000)
    received = bytearray()

    def slow_reader():
        while chunk := theirs.recv(65536):
            received.extend(chunk)
            time.sleep(0.001)
    reading = threading.Thread(target=slow_reader)
    reading.start()

    async def send():
        driver._commsobj = link
        vector = driver.device["logsvector"]
        await thermostat.send_blob(vector, "templogs", content)
        await driver.device["targetvector"].send_setVector(message="")
    asyncio.run(send())
    ours.shutdown(socket.SHUT_WR)
    reading.join(20)
    elements = list(ET.fromstring(b"<s>" + bytes(received) + b"</s>"))
    assert [e.tag for e in elements] == ["setBLOBVector", "setNumberVector"]
    assert blob_files(elements[:1]) == [(len(content), content)]


def test_driver_xml_describes_the_driver_for_kstars():
    result = subprocess.run(["indi_thermostat", "--driver-xml"], capture_output=True, text=True, timeout=10)
    group = ET.fromstring(result.stdout).find("devGroup")
    assert group.get("group") == "Auxiliary"
    assert group.find("device/driver").text == "indi_thermostat"
    assert group.find("device/version").text == thermostat.__version__


def relayed_updates(port):
    "A client of the relaying server receives temperature updates and a complete CSV file."
    client = IndiClient(port)
    client.send('<getProperties version="1.7"/>')
    client.expect(tagged("defBLOBVector", name="logsvector"), timeout=15)
    client.send('<enableBLOB device="Thermostat">Also</enableBLOB>')
    client.send(new_switch("Thermostat", "switchvector", "switchmember", "On"))
    client.gather(tagged("setNumberVector", name="temperaturevector"), 5)
    (size, content), = blob_files([client.expect(tagged("setBLOBVector", name="logsvector"), timeout=10)])
    client.close()
    return size, content


def test_indiserver_chains_to_a_remote_thermostat(served, indiserver):
    remote = served()
    relay = indiserver(f"Thermostat@127.0.0.1:{remote.port}")
    size, content = relayed_updates(relay.port)
    assert size == len(content) and content.startswith(b"timestamp,temperature\n")


def test_indiserver_chained_for_all_devices_sees_the_thermostat(served, indiserver):
    "indiserver \"@host:port\" asks with getProperties device=\"*\": everything, as libindi's servers answer it."
    remote = served()
    relay = indiserver(f"@127.0.0.1:{remote.port}")
    deadline = time.monotonic() + 10
    while True:
        got = subprocess.run(["indi_getprop", "-p", str(relay.port), "-t", "1", "Thermostat.targetvector.target"],
                             capture_output=True, text=True)
        if got.returncode == 0 or time.monotonic() > deadline:
            break
    assert got.stdout.strip() == "Thermostat.targetvector.target=15.00", got.stderr


def test_ipyserver_relays_a_remote_thermostat_and_waits_quietly_while_it_is_down(tmp_path):
    remote = ServerProcess(*FAST)
    relay_port = free_port()
    script = (f"import asyncio, sys; sys.path.insert(0, {str(ROOT)!r}); import thermostat\n"
              f"server = thermostat.make_server(port={relay_port})\n"
              f"server.add_remote('127.0.0.1', {remote.port}, blob_enable=True)\n"
              f"sys.exit(asyncio.run(thermostat.serve_until_stopped(server)))\n")
    relay = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(relay_port)
        size, content = relayed_updates(relay_port)
        assert size == len(content) and content.startswith(b"timestamp,temperature\n")
        watcher = IndiClient(relay_port)
        watcher.send('<getProperties version="1.7"/>')
        watcher.expect(tagged("setNumberVector", name="temperaturevector"))
        remote.stop()
        time.sleep(0.5)
        before = cpu_seconds(relay.pid)
        time.sleep(3)
        assert cpu_seconds(relay.pid) - before < 0.2, "the relay spins while the remote is down"
        watcher._read_some(time.monotonic() + 0.2)
        said = [e.get("message") for e in watcher.received if e.tag == "message"]
        assert [m for m in said if "lost" in m] and len(said) == 1, f"clients are told once, not at each try: {said}"
        watcher.close()
        # the remote comes back on its port: the relay reconnects (it retries every 5 s)
        back = subprocess.Popen([sys.executable, str(ROOT / "thermostat.py"), "--port", str(remote.port), *FAST],
                                stderr=subprocess.DEVNULL)
        try:
            client = IndiClient(relay_port)
            deadline = time.monotonic() + 15
            while not any(e.get("name") == "temperaturevector" for e in client.received):
                assert time.monotonic() < deadline, "no updates after the remote came back"
                client.send('<getProperties version="1.7"/>')
                client._read_some(time.monotonic() + 1)
            client.close()
        finally:
            back.terminate()
            back.wait(5)
    finally:
        relay.terminate()
        assert relay.wait(5) == 0
        remote.stop()


def test_stdin_reset_by_indiserver_is_end_of_input():
    "indiserver ending with our output unread resets the socket: the driver stops as at end of input."
    ours, theirs = socket.socketpair()
    driver = subprocess.Popen([sys.executable, str(ROOT / "thermostat.py"), "--stdio", "--no-config",
                               "--poll-interval", "60"],      # after its answers, it writes nothing
                              stdin=ours, stdout=ours, stderr=subprocess.PIPE)
    ours.close()
    definitions = len(thermostat.make_driver(config=None).device)
    theirs.sendall(b'<getProperties version="1.7"/>')
    answer = b""
    while answer.count(b"</def") < definitions:
        answer += theirs.recv(65536)
    theirs.sendall(b'<getProperties version="1.7"/>')    # its answer, all written, stays unread
    theirs.settimeout(10)
    while theirs.recv(1 << 20, socket.MSG_PEEK).count(b"</def") < definitions:
        time.sleep(0.01)
    theirs.close()          # with unread data: the driver's waiting read fails with ECONNRESET
    _, stderr = driver.communicate(timeout=10)
    assert driver.returncode == 0, stderr
    assert b"Traceback" not in stderr and b"stdin closed (Connection reset by peer): the driver stops" in stderr
