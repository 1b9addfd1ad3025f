"""ThermoServer's client side, against what a hostile or broken client does:
connections, output, fair input, parser bounds, a client speaking for a
device, and amplification (issue 8). Each test failed on the client side
this module had before, indipyserver's pool with guards bolted on."""

import asyncio
import gc
import logging
import socket
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from datetime import datetime

import pytest
from indipydriver import Device, IPyDriver, TextMember, TextVector

import thermostat
from conftest import (
    FAST,
    ServerProcess,
    exdriver_client,
    free_port,
    new_number,
    new_switch,
    rss_mib,
    tagged,
    wait_until,
)

GET_ALL = '<getProperties version="1.7"/>'


@pytest.fixture(autouse=True)
def fresh_throttle():
    "Warnings are throttled per minute across the whole test run: each test starts with a fresh count."
    for name in ("thermostat", "asyncio"):
        for throttle in logging.getLogger(name).filters:
            if isinstance(throttle, thermostat.WarningThrottle):
                throttle.throttle._windows.clear()


def answered(client, timeout=5.0):
    "True if a getProperties on this connection is answered."
    client.send('<getProperties version="1.7" device="Thermostat" name="CONNECTION"/>')
    client.expect(tagged("defSwitchVector", name="CONNECTION"), timeout=timeout)
    return True


def stalled_client(port, request=GET_ALL):
    "A client that asks, then never reads."
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request.encode())
    return sock


class Chatter(IPyDriver):
    "A device that sends a 16 KB text update every 5 ms: a stopped client falls behind fast."

    def __init__(self):
        super().__init__(Device("Chatter", [TextVector("chatter", "Chatter", "Main", "ro", "Ok", [
            TextMember("text", "Text", membervalue="x" * 16384)])]))

    async def hardware(self):
        while not self.stop:
            await self["Chatter"]["chatter"].send_setVector()
            await asyncio.sleep(0.005)


# -- 1. connections ------------------------------------------------------------

def test_idle_and_stalled_connections_never_keep_a_client_out_below_the_limit(served):
    server = served()                   # the default limit
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    stalled = [stalled_client(server.port) for _ in range(5)]
    try:
        for _ in range(3):
            client = server.client()
            assert answered(client)
            client.close()
    finally:
        for sock in silent + stalled:
            sock.close()


def _closed_with(client, words):
    "The server told this client something containing words, then closed it."
    message = client.expect(tagged("message"), timeout=3)
    assert words in message.get("message")
    with pytest.raises(ConnectionError):
        client.expect(lambda e: False, timeout=3)
    return True


def test_at_the_limit_a_connection_that_never_asked_makes_room(served):
    server = served("--max-connections", "3")
    watcher = server.client()
    assert answered(watcher)
    first_silent, second_silent = server.client(), server.client()
    time.sleep(0.2)                     # accepted in this order
    newcomer = server.client()
    assert answered(newcomer)           # room made...
    assert _closed_with(first_silent, "sent no request")      # ...by the longest silent connection
    assert answered(second_silent)
    latecomer = server.client()         # now all three have asked: the quietest makes room
    assert answered(latecomer)
    assert _closed_with(watcher, "This server is full (3 clients): this connection has sent nothing")
    assert answered(newcomer) and answered(second_silent)
    assert server.stderr_text().count("to make room for") == 2


def test_a_closed_reset_or_cut_off_connection_frees_everything_at_once(in_process):
    server = thermostat.make_server(thermostat.make_driver(poll_interval=0.05), Chatter(), port=free_port(),
                                    max_connections=2, max_unread=256 << 10)
    running = in_process(server)
    for _ in range(3):                  # cut off, more than the limit
        stalled = stalled_client(server.port)
        wait_until(lambda: server.clients, what="the stalled client to be accepted")
        wait_until(lambda: not server.clients, what="the stalled client to be cut off")
        stalled.close()
    for _ in range(5):                  # resets, twice the limit over
        client = running.client()
        client.send(GET_ALL)
        client.expect(tagged("defNumberVector"))
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()
        wait_until(lambda: not server.clients, what="the reset connection to be forgotten")
    for _ in range(5):                  # clean closes
        client = running.client()
        answered(client)
        client.close()
        wait_until(lambda: not server.clients, what="the closed connection to be forgotten")
    both = [running.client(), running.client()]
    assert all(answered(client) for client in both)
    for client in both:
        client.send(GET_ALL)
        client.expect(tagged("setTextVector", name="chatter"))
        client.close()
    wait_until(lambda: not server.clients, what="the closed connections to be forgotten")

    def no_client_kept():                       # routes, queues, tasks: nothing holds one
        gc.collect()
        return not [kept for kept in gc.get_objects() if isinstance(kept, thermostat._Client)]
    wait_until(no_client_kept, what="every closed client's last reference to go")


def test_a_request_then_a_reset_at_once_frees_the_connection(served):
    "As the command line runs it, on uvloop where installed: a reset ends the connection however it comes."
    server = served("--max-connections", "3", "-v")
    for ended in range(1, 7):           # twice the limit: any one kept would keep a client out for good
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(GET_ALL.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        wait_until(lambda ended=ended: server.stderr_text().count(" disconnected") >= ended,
                   what="the reset connection to end")
    client = server.client()
    assert answered(client)


# -- 2. output -------------------------------------------------------------------

def test_each_element_is_serialized_once_for_every_client(in_process, monkeypatch):
    serialized = []
    original = thermostat.serialize
    monkeypatch.setattr(thermostat, "serialize", lambda element: serialized.append(element) or original(element))
    server = thermostat.make_server(thermostat.make_driver(poll_interval=0.05), port=free_port())
    running = in_process(server)
    clients = [running.client() for _ in range(5)]
    for client in clients:
        client.send(GET_ALL)
        client.expect(tagged("defNumberVector", name="temperaturevector"))
    updates = [client.gather(tagged("setNumberVector", name="temperaturevector"), 10) for client in clients]
    # from the first update all five were defined for (a poll may come between two clients' definitions)
    latest = max(u[0].get("timestamp") for u in updates)
    tails = [[e.get("timestamp") for e in u if e.get("timestamp") >= latest] for u in updates]
    shortest = min(len(t) for t in tails)
    assert shortest >= 5 and all(t[:shortest] == tails[0][:shortest] for t in tails)
    sent = [e.get("timestamp") for e in serialized if e.get("name") == "temperaturevector" and e.tag.startswith("set")]
    for timestamp in tails[0][:shortest]:
        assert sent.count(timestamp) == 1
    for client in clients:
        client.close()


def test_an_update_reaches_every_client_whatever_the_one_before_it_did():
    """The fan-out sends to a route's sockets in one pass; a client whose
    socket is full, or who went away, part way through must not cost the
    clients after it their update, nor give the ones before it theirs twice."""
    async def fan_out():
        server = thermostat.make_server(port=free_port())
        server._loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(5)]
        for ours, theirs in pairs:
            ours.setblocking(False)
            theirs.settimeout(2)        # an update that does not come fails the test
        full, gone = pairs[1], pairs[3]
        while True:                     # a client that stopped reading: its socket takes nothing more
            try:
                full[0].send(b"x" * 65536)
            except BlockingIOError:
                break
        gone[1].close()                 # a client that went away
        for ours, _ in pairs:
            client = thermostat._Client(server, ours, "test")
            server.clients[client] = None
        server._clients_changed()
        clients = list(server.clients)
        update = b"<setNumberVector device='Thermostat' name='temperaturevector'/>"
        for _ in range(2):              # as no client had anything waiting, then as some have
            server._deliver(server._everyone, update)
            server._flush()
        for index in (0, 2, 4):
            assert pairs[index][1].recv(1000) == update * 2
        assert clients[1].unsent_bytes == 2 * len(update) and clients[1].writing
        assert clients[3].write_failed and not clients[3].unsent
        for client in clients:
            client.close()
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    asyncio.run(fan_out())


def test_a_client_that_asks_for_more_gets_it_from_then_on(in_process):
    "Who gets an update is worked out once and kept: a new request must change it at once."
    # a fast box (time constant 1 s): the heater switches every few polls
    driver = thermostat.make_driver(poll_interval=0.01, sensor=thermostat.Simulator(time_constant_s=1.0))
    server = thermostat.make_server(driver, port=free_port())
    running = in_process(server)
    watcher, narrow = running.client(), running.client()
    watcher.send(GET_ALL)
    narrow.send('<getProperties version="1.7" device="Thermostat" name="temperaturevector"/>')
    watcher.gather(tagged("setLightVector", name="heatervector"), 3)       # heater updates are routed...
    narrow.gather(tagged("setNumberVector", name="temperaturevector"), 20)
    assert not [e for e in narrow.received if e.get("name") != "temperaturevector"]    # ...not to narrow
    narrow.send('<getProperties version="1.7" device="Thermostat" name="heatervector"/>')
    narrow.expect(tagged("defLightVector", name="heatervector"))
    narrow.gather(tagged("setLightVector", name="heatervector"), 3)
    assert not [e for e in narrow.received if e.get("name") not in ("temperaturevector", "heatervector")]
    watcher.gather(tagged("setNumberVector", name="targetvector"), 2)       # its state, in the band or not
    narrow.send('<getProperties version="1.7"/>')                           # and then everything
    narrow.expect(tagged("defNumberVector", name="targetvector"))
    narrow.gather(tagged("setNumberVector", name="targetvector"), 2)
    for client in (watcher, narrow):
        client.close()


def test_a_stopped_client_costs_at_most_its_bound_and_is_named_when_cut_off(in_process, caplog):
    caplog.set_level(logging.WARNING, logger="thermostat")
    bound = 256 << 10
    server = thermostat.make_server(Chatter(), port=free_port(), max_unread=bound)
    in_process(server)
    stalled = stalled_client(server.port)
    address = "{}:{}".format(*stalled.getsockname())
    wait_until(lambda: server.clients, what="the client to be accepted")
    (client,) = server.clients
    wait_until(lambda: not server.clients, what="the stalled client to be cut off")
    assert client.peak_unsent_bytes <= bound + 20000          # the bound, and the element that crossed it
    assert not client.unsent and client.unsent_bytes == 0
    warnings = [r.getMessage() for r in caplog.records if "has not read its last" in r.getMessage()]
    assert len(warnings) == 1 and f"client {address}: disconnected" in warnings[0]
    stalled.close()


# -- 3. fair input ---------------------------------------------------------------

def test_a_client_flooding_requests_does_not_starve_another_one(served, tmp_path):
    server = served("--log-dir", str(tmp_path))
    watcher = server.client()
    watcher.send('<getProperties version="1.7" device="Thermostat"/>')
    watcher.send('<newSwitchVector device="Thermostat" name="switchvector">'
                 '<oneSwitch name="switchmember">On</oneSwitch></newSwitchVector>')
    watcher.expect(tagged("setSwitchVector", name="switchvector"))
    flooder = socket.create_connection(("127.0.0.1", server.port))
    flooding, received = True, [0]

    def read_answers():
        while flooding:
            try:
                received[0] += len(flooder.recv(1 << 16))
            except OSError:
                return
    reader = threading.Thread(target=read_answers, daemon=True)
    reader.start()

    def flood():
        try:
            while flooding:
                flooder.sendall(GET_ALL.encode() * 50)
        except OSError:
            pass                        # closed at the end
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    updates, polls, gap = watch(watcher, seconds=4)
    flooding = False
    flooder.close()
    sender.join(2)
    reader.join(2)
    print(f"watcher: {updates} of {polls} updates, longest gap {gap:.3f} s; flooder read {received[0]} bytes")
    assert received[0] > 1 << 20, "the flood was not answered"
    assert updates >= 0.95 * polls and gap < 1.0
    assert "log backlog full" not in server.stderr_text()


def watch(watcher, seconds):
    "(temperature updates a watcher received in seconds, polls made meanwhile at FAST's 50 ms, longest gap)."
    arrivals, updates = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        update = watcher.expect(tagged("setNumberVector", name="temperaturevector"), timeout=2)
        arrivals.append(time.monotonic())
        updates.append(datetime.fromisoformat(update.get("timestamp")))
    polls = round((updates[-1] - updates[0]).total_seconds() / 0.05) + 1
    return len(updates), polls, max(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))


MALFORMED_FLOOD = """
import socket, sys, time
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(20)]
garbage, deadline = b"<getProperties <" * 4096, time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    for sock in socks:
        sock.sendall(garbage)
"""


def test_many_connections_flooding_malformed_tags_do_not_starve_another_one(served):
    """Each malformed tag costs a parser reset: a read's worth of them must not hold the event loop
    for long. Read 64 KiB at a time, the watcher got 11 of 62 updates, with a gap of over a second;
    the bound leaves room for a server that shares two cores with another test worker."""
    server = served()
    watcher = server.client()
    watcher.send('<getProperties version="1.7" device="Thermostat"/>')
    watcher.expect(tagged("setNumberVector", name="temperaturevector"))
    flood = subprocess.Popen([sys.executable, "-c", MALFORMED_FLOOD, str(server.port), "5"])
    try:
        time.sleep(0.5)                 # the flood under way
        updates, polls, gap = watch(watcher, seconds=3)
    finally:
        flood.kill()
        flood.wait()
    print(f"watcher: {updates} of {polls} updates, longest gap {gap:.3f} s")
    assert updates >= 0.5 * polls and gap < 0.6


class Slow(IPyDriver):
    "A device that takes 0.3 s to answer a request: its client's input waits meanwhile."

    def __init__(self):
        super().__init__(Device("Slow", [TextVector("slow", "Slow", "Main", "rw", "Ok", [
            TextMember("text", "Text", membervalue="")])]))

    async def rxevent(self, event):
        await asyncio.sleep(0.3)
        event.vector["text"] = event["text"]
        await event.vector.send_setVector(state="Ok")


def test_input_waiting_while_its_client_is_busy_neither_spins_the_server_nor_is_lost(in_process, monkeypatch):
    """A client's socket stays watched between requests; while its task is
    busy, the event loop must stop watching it, or level-triggered input
    that nobody reads wakes the loop at once, again and again."""
    calls = []
    original = thermostat._Client._on_input
    monkeypatch.setattr(thermostat._Client, "_on_input", lambda client: calls.append(1) or original(client))
    running = in_process(thermostat.make_server(Slow(), port=free_port()))
    client = running.client()
    client.send('<getProperties version="1.7" device="Slow"/>')
    client.expect(tagged("defTextVector", name="slow"))
    request = '<newTextVector device="Slow" name="slow"><oneText name="text">%s</oneText></newTextVector>'
    client.send(request % "first")
    time.sleep(0.05)                    # the first is being handled when the second arrives
    calls.clear()
    client.send(request % "second")
    answers = [client.expect(tagged("setTextVector", name="slow"), timeout=3)[0].text.strip() for _ in range(2)]
    assert answers == ["first", "second"]
    print(f"input callbacks while busy: {len(calls)}")
    assert len(calls) < 10
    client.close()


# -- 4. parser bounds --------------------------------------------------------------

ATTACKS = {
    "nested tags": b"<a>" * (2 << 20),
    "children": b'<newTextVector device="Thermostat" name="x">' + b'<oneText name="t"/>' * (300 << 10),
    "attributes": b"<message " + b"".join(b'a%d="" ' % i for i in range(600 << 10)) + b"/>",
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_what_a_client_sends_builds_a_bounded_amount(served, attack):
    server = served()
    before = rss_mib(server.process.pid)
    client = server.client()
    client.send(ATTACKS[attack])
    assert answered(client, timeout=20)
    grown = rss_mib(server.process.pid) - before
    print(f"{attack}: {len(ATTACKS[attack]) >> 20} MiB sent, the server grew {grown:.1f} MiB")
    assert grown < 20
    assert "skipping to the next INDI element" in server.stderr_text()


def test_a_devices_blob_setting_replaces_those_of_its_vectors(served):
    server = served()
    client = server.client()
    client.send(GET_ALL)
    client.send('<enableBLOB device="Thermostat" name="logsvector">Never</enableBLOB>')
    client.send('<enableBLOB device="Thermostat">Also</enableBLOB>')      # as setBLOBMode(mode, device) does
    client.send(new_number("Thermostat", "logperiodvector", "logperiod", "0.2"))
    client.send(new_switch("Thermostat", "switchvector", "switchmember", "On"))
    client.expect(tagged("setBLOBVector", "Thermostat", "logsvector"), timeout=5)


def test_blob_settings_are_kept_only_for_devices_that_exist(in_process, caplog):
    caplog.set_level(logging.WARNING, logger="thermostat")
    server = thermostat.make_server(thermostat.make_driver(), port=free_port())
    running = in_process(server)
    client = running.client()
    client.send("".join(f'<enableBLOB device="Ghost{i}">Also</enableBLOB>' for i in range(2000)))
    client.send('<enableBLOB device="Thermostat">Also</enableBLOB>')
    assert answered(client)
    (link,) = server.clients
    assert link.blobs == {"Thermostat": "Also"}
    assert any("ignored an enableBLOB for 'Ghost0'" in r.getMessage() for r in caplog.records)
    client.close()


# -- 5. a client asks; it never speaks for a device -----------------------------------

SPOOFS = [
    '<setNumberVector device="Thermostat" name="temperaturevector" state="Ok">'
    '<oneNumber name="temperature">77</oneNumber></setNumberVector>',
    '<defNumberVector device="Thermostat" name="spoofed" perm="ro" state="Ok">'
    '<defNumber name="temperature">77</defNumber></defNumberVector>',
    '<defNumberVector device="Heater2" name="temperaturevector" perm="ro" state="Alert">'
    '<defNumber name="temperature">150</defNumber></defNumberVector>',
    '<setNumberVector device="Heater2" name="temperaturevector"><oneNumber name="temperature">150</oneNumber>'
    '</setNumberVector>',
    '<message device="Heater2" message="OVERHEAT: evacuate the building 77"/>',
    '<message device="Thermostat" message="spoofed 77"/>',
    '<message message="spoofed 77"/>',
    '<delProperty device="Telescope"/>',
    '<delProperty device="Thermostat" name="targetvector"/>',
]


def spoofed(element):
    message = element.get("message") or ""     # (not "77": a port in a message may hold it)
    return ("evacuate" in message or "spoofed" in message or element.get("device") in ("Heater2", "Telescope")
            or element.tag == "delProperty" or element.get("name") == "spoofed"
            or any((member.text or "").strip() in ("77", "150") for member in element))


def test_a_client_never_speaks_for_a_relayed_or_unknown_device(in_process, caplog):
    caplog.set_level(logging.WARNING, logger="thermostat")
    remote = ServerProcess(*FAST)
    try:
        relay = thermostat.make_server(port=free_port())
        relay.add_remote("127.0.0.1", remote.port)
        running = in_process(relay)
        watcher = running.client()
        deadline = time.monotonic() + 10
        while not any(e.get("name") == "temperaturevector" for e in watcher.received):
            assert time.monotonic() < deadline, "the relayed thermostat was never defined"
            watcher.send(GET_ALL)
            watcher._read_some(time.monotonic() + 0.5)
        spoofer = running.client()
        spoofer.send("".join(SPOOFS))
        spoofer.send(GET_ALL)
        watcher.gather(tagged("setNumberVector", name="temperaturevector"), 10)
        assert running.thread.is_alive() and relay.failure is None
        assert not [ET.tostring(e) for e in watcher.received if spoofed(e)]
        spoofer.send(new_number("Thermostat", "targetvector", "target", "21"))     # asking still works
        answer = spoofer.expect(lambda e: e.tag == "setNumberVector" and e.get("name") == "targetvector"
                                and e.find("oneNumber").text.strip() == "21.00")
        assert answer is not None
        refused = [r.getMessage() for r in caplog.records if "only a device may send this" in r.getMessage()]
        assert len(refused) == len(SPOOFS)
        watcher.close()
        spoofer.close()
    finally:
        remote.stop()


def test_a_client_that_asks_for_a_device_not_yet_defined_gets_it_once_it_is(in_process):
    "A remote that is down, or an executable driver still starting: the client's request is remembered."
    client = exdriver_client(in_process, "sh", "-c",
                             "sleep 0.5; exec indi_thermostat --device Late --poll-interval 0.05")
    client.send('<getProperties version="1.7" device="Late"/>')       # before Late is defined
    client.expect(tagged("defNumberVector", "Late", "temperaturevector"), timeout=10)
    client.expect(tagged("setNumberVector", "Late", "temperaturevector"), timeout=5)
    client.close()


def test_a_ping_is_answered_as_indiserver_answers_it(served):
    client = served().client()
    client.send('<pingRequest uid="abc-1"/>')
    assert client.expect(lambda e: e.tag == "pingReply").get("uid") == "abc-1"


def test_executable_drivers_are_routed_too(in_process):
    "make_server still takes add_exdriver: its device answers requests like a local one."
    client = exdriver_client(in_process, "indi_thermostat", "--device", "Outside")
    deadline = time.monotonic() + 10
    while not any(e.get("name") == "targetvector" for e in client.received):
        assert time.monotonic() < deadline, "the executable driver's device was never defined"
        client.send('<getProperties version="1.7"/>')
        client._read_some(time.monotonic() + 0.5)
    client.send(new_number("Outside", "targetvector", "target", "21"))
    answer = client.expect(lambda e: e.tag == "setNumberVector" and e.get("name") == "targetvector"
                           and e.find("oneNumber").text.strip() == "21.00")
    assert answer.get("device") == "Outside"
    client.close()


# -- 6. no amplification ------------------------------------------------------------------

def test_a_rejection_quotes_only_a_short_excerpt(served):
    server = served()
    client = server.client()
    client.send(GET_ALL)
    client.send(new_number("Thermostat", "targetvector", "target", "9" * 100000))
    reply = client.expect(lambda e: e.get("name") == "targetvector" and e.get("state") == "Alert")
    client.send(new_number("Thermostat", "x" * 3000, "target", "20"))
    message = client.expect(lambda e: e.tag == "message" and "no such property" in e.get("message", ""))
    client.send(f'<newNumberVector device="{"G" * 3000}" name="x"/>')
    assert answered(client)
    assert len(reply.get("message")) <= 200 and len(message.get("message")) <= 300
    assert max(len(line) for line in server.stderr_text().splitlines()) < 400


def test_a_flood_of_requests_for_no_property_reaches_other_clients_as_at_most_20_refusals(served):
    server = served()
    watcher, flooder = server.client(), server.client()
    watcher.send(GET_ALL)
    watcher.expect(tagged("defNumberVector", name="targetvector"))
    flooder.send("".join(new_number("Thermostat", f"nosuch{i}", "x", "1") for i in range(60)))
    assert answered(flooder)            # requests are handled in order: all 60 are refused by now
    assert answered(watcher)            # and whatever that sent the watcher came before this answer
    refusals = [e for e in watcher.received if e.tag == "message" and "no such property" in e.get("message", "")]
    assert len(refusals) == 20
    assert server.stderr_text().count("no such property") == 20     # the log's throttle, as before


def test_a_request_without_a_name_is_answered_not_a_traceback(served):
    server = served()
    client = server.client()
    client.send(GET_ALL)
    for name in ("", ' name=""'):
        client.send(f'<newNumberVector device="Thermostat"{name}><oneNumber name="target">3</oneNumber>'
                    '</newNumberVector>')
        message = client.expect(lambda e: e.tag == "message" and "no such property" in e.get("message", ""))
        assert "(no name)" in message.get("message")
    assert answered(client)
    assert "Traceback" not in server.stderr_text()


def test_with_debug_on_a_log_line_quotes_at_most_a_bounded_excerpt(served):
    server = served("-v", "--sensor", "simulator:5")    # a fast box: in the band around 15 within a second
    client = server.client()
    client.send('<newSwitchVector device="Thermostat" name="DEBUG"><oneSwitch name="ENABLE">On</oneSwitch>'
                '</newSwitchVector>')
    client.expect(tagged("setSwitchVector", name="DEBUG"))
    client.send(new_number("Thermostat", "targetvector", "target", " " * 200000 + "15"))
    client.expect(lambda e: e.get("name") == "targetvector" and e.get("state") == "Ok")
    log = server.stderr_text()
    assert "RX:: <newNumberVector" in log                    # the request is logged, clipped
    assert max(len(line) for line in log.splitlines()) <= thermostat.MAX_LOG_LINE + 100


def test_errors_are_throttled_like_warnings_asyncio_s_too():
    caught = []

    class Catch(logging.Handler):
        def emit(self, record):
            caught.append(record)
    with thermostat.BoundedLogs():          # as while serving: asyncio's logger is bounded too
        for name in ("thermostat", "asyncio"):
            handler = Catch()
            source = logging.getLogger(name)
            source.addHandler(handler)
            try:
                for i in range(50):
                    source.error("Fatal error on transport %d", i)
            finally:
                source.removeHandler(handler)
    assert len(caught) == 2 * 20
    assert not logging.getLogger("asyncio").filters, "after serving, asyncio's logger is as it was"


# -- the serializer ----------------------------------------------------------------------------

def test_serialize_writes_exactly_what_elementtree_writes():
    driver = thermostat.make_driver()
    elements = [vector._make_defVector() if hasattr(vector, "_make_defVector") else None
                for vector in driver.device.values()]
    elements = [e for e in elements if e is not None]
    odd = ET.Element("message", device='a "quoted" <&> device', message="tabs\tand\nlines\r and é€ 𝄞")
    odd.text = "text <&> \"quotes\" é"
    child = ET.SubElement(odd, "oneText", name="x")
    child.tail = "tail & more"
    elements += [odd, ET.Element("getProperties", version="1.7"), ET.fromstring(
        b'<setBLOBVector device="T" name="b"><oneBLOB name="f" size="3" format=".csv">QUFB\n</oneBLOB>'
        b'</setBLOBVector>'), thermostat.server_message("Keep alive message")]
    for element in elements:
        assert thermostat.serialize(element) == ET.tostring(element)


# -- the event loop ------------------------------------------------------------------------------

async def _loop_module():
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_runs_the_command_line_where_installed_else_asyncio(monkeypatch):
    pytest.importorskip("uvloop")       # a declared dependency on Linux: installed with the package
    assert thermostat.run_event_loop(_loop_module()).startswith("uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)        # as where it does not install
    assert thermostat.run_event_loop(_loop_module()).startswith("asyncio")
