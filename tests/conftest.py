"""Shared test helpers: a raw INDI client, thermostats served two ways
(a `python thermostat.py` process, or an IndiServer in a thread), and one
poll of a model on instant hardware."""

import asyncio
import base64
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import thermostat  # noqa: E402

# Peers started by the tests (indiserver among them) run the indi_thermostat installed
# beside the Python that runs the tests, e.g. in .venv/bin, activated or not.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

FAST = ["--poll-interval", "0.05", "--log-period", "0.5"]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def instant_poll(control, hardware, now, log=None):
    """One poll at time now with instant hardware (thermostat.Hardware), in the
    order ThermoDriver.poll makes it: read, step, log, then switch as the model
    asks (a failed switch followed by an off); the reading as it then stands."""
    try:
        measured = hardware.sensor.read()
    except Exception as exc:
        measured = exc
    reading = control.step(now, measured)
    if log is not None:
        log.record(reading)
    for _ in range(2):
        if (on := control.heater_command()) is None:
            break
        hardware.switch_now(control, on, now)
    return control.reading(now)


def wait_until(condition, timeout=10.0, what="the condition"):
    "Wait for condition() to be true, polling every 10 ms; fail after timeout seconds."
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_for_port(port, timeout=10.0, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


class IndiClient:
    """A minimal INDI client over a raw socket: send XML text, then wait for
    top-level elements matching a condition. Every element received is kept
    in self.received, in order."""

    def __init__(self, port, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=5)
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.parser.feed(b"<stream>")
        self.depth = 0
        self.received = []
        self._unread = 0    # index into received of the first element not yet returned by expect

    def send(self, text):
        self.sock.sendall(text.encode() if isinstance(text, str) else text)

    def _read_some(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return False
        if not data:
            raise ConnectionError("server closed the connection")
        self.parser.feed(data)
        for event, element in self.parser.read_events():
            if event == "start":
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 1:
                    self.received.append(element)
        return True

    def expect(self, match, timeout=5.0, what="an element"):
        "Return the next received element for which match(element) is true."
        deadline = time.monotonic() + timeout
        while True:
            while self._unread < len(self.received):
                element = self.received[self._unread]
                self._unread += 1
                if match(element):
                    return element
            if not self._read_some(deadline):
                raise AssertionError(f"timed out waiting for {what}; last received: "
                                     f"{[ET.tostring(e)[:200] for e in self.received[-5:]]}")

    def gather(self, match, count, timeout=10.0, what="elements"):
        return [self.expect(match, timeout, what) for _ in range(count)]

    def close(self):
        self.sock.close()


def tagged(tag, device=None, name=None):
    "A condition on an element's tag, device and vector name."
    def match(element):
        return (element.tag == tag and (device is None or element.get("device") == device)
                and (name is None or element.get("name") == name))
    return match


def new_number(device, vector, member, value):
    return (f'<newNumberVector device="{device}" name="{vector}">'
            f'<oneNumber name="{member}">{value}</oneNumber></newNumberVector>')


def new_switch(device, vector, member, value):
    return (f'<newSwitchVector device="{device}" name="{vector}">'
            f'<oneSwitch name="{member}">{value}</oneSwitch></newSwitchVector>')


def blob_files(elements):
    "Decode the CSV files carried by setBLOBVector elements: [(size attribute, bytes)]"
    return [(int(one.get("size")), base64.b64decode(one.text))
            for element in elements for one in element.iter("oneBLOB")]


def cpu_seconds(pid):
    "User plus system CPU time of a process, from /proc."
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid):
    "Resident memory of a process in MiB, from /proc."
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


class ServerProcess:
    "python thermostat.py, started with options, on a free port."

    def __init__(self, *options, port=None):
        self.port = port or free_port()
        # stderr goes to a file: a pipe nobody reads would block a server that logs a lot
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "thermostat.py"), "--port", str(self.port), *options],
            stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        wait_for_port(self.port, process=self.process)

    def stderr_text(self):
        self.log.seek(0)
        return self.log.read()

    def client(self):
        return IndiClient(self.port)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr = self.stderr_text()
        return self.process.returncode


class ServerThread:
    "A server made in-process (make_server or IPyServer) running in a thread with its own event loop."

    def __init__(self, server):
        self.server = server
        self.port = server.port
        self.loop = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for_port(self.port)

    def _run(self):
        async def run():
            self.loop = asyncio.get_running_loop()
            await self.server.asyncrun()
        asyncio.run(run())

    def client(self):
        return IndiClient(self.port)

    def stop(self, timeout=5.0):
        if self.thread.is_alive() and self.loop is not None:
            self.loop.call_soon_threadsafe(self.server.shutdown)
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def served():
    "Start `python thermostat.py` with fast polls; yields a factory taking extra options."
    started = []

    def start(*options):
        server = ServerProcess(*FAST, *options)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def in_process():
    "Run servers built in the test in threads; yields a factory taking the server."
    started = []

    def start(server):
        running = ServerThread(server)
        started.append(running)
        return running
    yield start
    for running in started:
        running.stop()


def exdriver_client(in_process, *command):
    "A client of a server built by make_server, run in this process, serving one executable driver."
    server = thermostat.make_server(port=free_port())
    server.add_exdriver(*command)
    return in_process(server).client()


def _keep_indi_config_in(folder, monkeypatch):
    monkeypatch.setenv("HOME", str(folder))     # indiserver unsets INDICONFIG for drivers started by FIFO
    monkeypatch.setenv("INDICONFIG", str(folder / "indi_config.xml"))
    return folder / "indi_config.xml"


@pytest.fixture(scope="session", autouse=True)
def session_indi_config(tmp_path_factory):
    "Servers shared by a module's tests keep their settings out of the user's ~/.indi too."
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _keep_indi_config_in(tmp_path_factory.mktemp("indi"), monkeypatch)


@pytest.fixture(autouse=True)
def indi_config(tmp_path_factory, monkeypatch):
    """Each test keeps thermostat settings in its own file (its path is this
    fixture's value), so that every thermostat starts with the defaults and
    none writes the user's ~/.indi."""
    return _keep_indi_config_in(tmp_path_factory.mktemp("indi"), monkeypatch)


@pytest.fixture
def indiserver():
    "Start libindi's indiserver (test_indiserver.IndiServer) with arguments; stopped after the test."
    from test_indiserver import IndiServer

    started = []

    def start(*arguments):
        server = IndiServer(*arguments)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
