"""Bad input, faults and load against one running server. After every case:
(a) a fresh client's getProperties is answered, (b) temperature updates keep
coming at the poll rate, and (c) the log files so far are lossless: every
reading once, in order. At the end, every live update the watcher received is
in the files, and every file it received is one on disk. Each case is bounded
in count and time."""

import socket
import time
from datetime import datetime

import pytest

from conftest import FAST, ServerProcess, blob_files, new_number, new_switch, rss_mib, tagged

DEVICE = "Thermostat"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    running = ServerProcess(*FAST, "--log-dir", str(log_dir), "--max-connections", "4", "--max-unread", "1")
    running.log_dir = log_dir
    watcher = running.client()          # connected throughout: every update and every file
    watcher.send('<getProperties version="1.7"/><enableBLOB device="Thermostat">Also</enableBLOB>')
    watcher.send(new_switch(DEVICE, "switchvector", "switchmember", "On"))
    watcher.expect(tagged("setSwitchVector", name="switchvector"))
    running.watcher = watcher
    yield running
    watcher.close()
    running.stop()


def still_serving(server, updates=5):
    """(a) a fresh client is answered, (b) updates keep coming at the poll rate
    (0.05 s), and (c) the log files so far hold every reading once, in order."""
    fresh = server.client()
    fresh.send('<getProperties version="1.7" device="Thermostat" name="targetvector"/>')
    fresh.expect(tagged("defNumberVector", name="targetvector"), timeout=3)
    fresh.close()
    started = time.monotonic()
    server.watcher.gather(tagged("setNumberVector", name="temperaturevector"), updates, timeout=3)
    assert time.monotonic() - started < updates * 0.05 + 1.0
    assert server.process.poll() is None
    rows = logged_rows(server.log_dir)
    assert all(len(row) == 2 for row in rows), "a row is not whole"
    times = [datetime.fromisoformat(timestamp) for timestamp, _ in rows]
    assert all(-50 < float(temperature) < 100 for _, temperature in rows)
    assert times == sorted(set(times)), "a reading is logged twice or out of order"
    # no gaps: every reading the watcher was sent between the first and the last row
    # logged is a row (a poll every 0.05 s, so a missing one would leave a gap of 0.1 s
    # in the rows' timestamps with an update in it)
    if rows:
        first, last = times[0], times[-1]
        updates = [(e.get("timestamp"), e.find("oneNumber").text) for e in server.watcher.received
                   if e.tag == "setNumberVector" and e.get("name") == "temperaturevector"]
        between = [u for u in updates if first <= datetime.fromisoformat(u[0]) <= last]
        assert between == [u for u in rows if u in set(between)] and set(between) <= set(rows), \
            "a reading sent to clients is missing from the log files"


def logged_rows(log_dir):
    "(timestamp, temperature) of every row of the finished log files, in the order of their first rows."
    files = [path.read_text().splitlines()[1:] for path in log_dir.glob("Thermostat-*.csv")]
    files.sort(key=lambda lines: datetime.fromisoformat(lines[0].split(",")[0]))
    return [tuple(line.split(",")) for lines in files for line in lines]


def send_raw(server, data, read_reply=None, close_after=0.2):
    "Send bytes on a new connection; optionally wait for a reply; return the client."
    client = server.client()
    client.send(data)
    if read_reply:
        return client, client.expect(read_reply, timeout=3)
    time.sleep(close_after)
    client.close()
    return None, None


MALFORMED = {
    "mismatched tag": b'<newNumberVector device="Thermostat" name="targetvector"><oneNumber name="target">20</oops>',
    "truncated element": b'<newNumberVector device="Thermostat" name="targetvector"><oneNum',
    "entity expansion bomb": b'<!DOCTYPE lol [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
                             b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><message message="&c;"/>',
    "binary garbage": bytes(range(256)) * 64,
    "invalid UTF-8": b'<message device="Thermostat" message="\xff\xfe\xc3\x28"/>',
    "unknown element": b'<launchMissiles device="Thermostat"/>',
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_input_then_a_valid_request_on_the_same_connection(server, name):
    client = server.client()
    client.send(MALFORMED[name])
    time.sleep(0.2)
    if name == "truncated element":
        client.send(b'ber name="target">20</oneNumber></newNumberVector>')      # it completes later
        reply = client.expect(tagged("setNumberVector", name="targetvector"))
        assert reply.find("oneNumber").text == "20.00"
    client.send(b'<getProperties version="1.7" device="Thermostat" name="CONNECTION"/>')
    client.expect(tagged("defSwitchVector", name="CONNECTION"), timeout=3)
    client.close()
    still_serving(server)


def test_a_flood_of_bad_input_does_not_flood_the_log(server):
    client = server.client()
    client.send(b"<oops></nope>" * 500 + b'<launchMissiles device="Thermostat"/>' * 500)
    client.send(b'<getProperties version="1.7" device="Thermostat" name="CONNECTION"/>')
    client.expect(tagged("defSwitchVector", name="CONNECTION"), timeout=5)
    client.close()
    still_serving(server)
    log = server.stderr_text()
    # this module runs in less than a minute: one window of WarningThrottle's 20 per kind
    assert 0 < log.count("malformed XML received") <= 20
    assert 0 < log.count("is not an INDI element") <= 20


def test_an_element_never_closed_does_not_swallow_the_next_ones(server):
    client = server.client()
    client.send(b'<newNumberVector device="Thermostat" name="targetvector"><oneNumber name="target">20</oneNumber>')
    client.send(b'<getProperties version="1.7" device="Thermostat" name="CONNECTION"/>')
    client.expect(tagged("defSwitchVector", name="CONNECTION"), timeout=3)
    client.close()
    still_serving(server)


@pytest.mark.parametrize("megabytes", [5, 40])
def test_an_element_of_several_megabytes(server, megabytes):
    "Below the 16 MiB bound it is parsed and answered; above it, discarded, and memory stays bounded."
    before = rss_mib(server.process.pid)
    client = server.client()
    client.send(b'<newBLOBVector device="Thermostat" name="logsvector"><oneBLOB name="templogs" size="1" format=".csv">')
    chunk = b"QUFB" * (1 << 18)                   # 1 MiB of base64
    for _ in range(megabytes):
        client.send(chunk)
    client.send(b'</oneBLOB></newBLOBVector>')
    client.send(b'<getProperties version="1.7" device="Thermostat" name="CONNECTION"/>')
    client.expect(tagged("defSwitchVector", name="CONNECTION"), timeout=10)
    if megabytes < 16:      # parsed, and answered: logsvector is read-only
        assert any(e.tag == "message" and "read-only" in e.get("message", "") for e in client.received)
    client.close()
    assert rss_mib(server.process.pid) - before < 60
    still_serving(server)


@pytest.mark.parametrize("request_xml, vector", [
    (new_number(DEVICE, "targetvector", "target", "twenty"), "targetvector"),
    (new_number(DEVICE, "targetvector", "target", "NaN"), "targetvector"),
    (new_number(DEVICE, "targetvector", "target", "-inf"), "targetvector"),
    (new_number(DEVICE, "targetvector", "target", "1e9"), "targetvector"),
    (new_number(DEVICE, "targetvector", "target", ""), "targetvector"),
    (new_number(DEVICE, "targetvector", "nosuch", "20"), "targetvector"),
    (new_number(DEVICE, "POLLING_PERIOD", "PERIOD_MS", "0"), "POLLING_PERIOD"),
    (new_number(DEVICE, "logperiodvector", "logperiod", "-1"), "logperiodvector"),
    (new_switch(DEVICE, "switchvector", "switchmember", "Yes"), "switchvector"),
    (new_switch(DEVICE, "CONNECTION", "CONNECT", "Off"), "CONNECTION"),
])
def test_bad_values_are_rejected_with_alert(server, request_xml, vector):
    # the poll loop also updates targetvector's state, so wait for the answer: Alert, with a reason
    _, reply = send_raw(server, request_xml, read_reply=lambda e: e.get("name") == vector
                        and e.tag.startswith("set") and e.get("state") == "Alert")
    assert reply.get("message")
    still_serving(server)


@pytest.mark.parametrize("request_xml", [
    new_number("NoSuchDevice", "targetvector", "target", "20"),
    new_number(DEVICE, "nosuchvector", "x", "1"),
    new_number(DEVICE, "temperaturevector", "temperature", "80"),
    '<enableBLOB device="Thermostat">Sometimes</enableBLOB>',
    '<enableBLOB device="Thermostat"></enableBLOB>',
    '<enableBLOB>Also</enableBLOB>',
])
def test_requests_with_nothing_to_change_change_nothing(server, request_xml):
    def target():
        last = [e for e in server.watcher.received if e.get("name") == "targetvector"][-1]
        return last[0].text.strip()
    target_before = target()
    send_raw(server, request_xml)
    still_serving(server)
    assert all(float(e.find("oneNumber").text) < 80 for e in server.watcher.received[-5:]
               if e.get("name") == "temperaturevector")
    assert target() == target_before


@pytest.mark.parametrize("spoof", [
    '<setNumberVector device="Thermostat" name="temperaturevector" state="Ok"><oneNumber name="temperature">77</oneNumber></setNumberVector>',
    '<defNumberVector device="Thermostat" name="temperaturevector" perm="ro" state="Ok"><defNumber name="temperature">77</defNumber></defNumberVector>',
    '<message device="Thermostat" message="spoofed 77"/>',
    '<message message="spoofed 77"/>',
    '<delProperty device="Thermostat"/>',
])
def test_a_client_cannot_speak_for_the_thermostat(server, spoof):
    send_raw(server, spoof)
    still_serving(server)
    assert not any("77" in (e.get("message") or "") or (e.find("oneNumber") is not None and
                   e.find("oneNumber").text == "77") or e.tag == "delProperty" for e in server.watcher.received)


def test_what_a_client_asks_goes_to_the_devices_not_to_other_clients(server):
    "As in libindi's indiserver: another client's getProperties and new*Vector are not news for the watcher."
    seen = len(server.watcher.received)
    other = server.client()
    other.send('<getProperties version="1.7" device="Thermostat" name="CONNECTION"/>')
    other.send(new_number(DEVICE, "logperiodvector", "logperiod", "0.5"))
    other.expect(tagged("setNumberVector", name="logperiodvector"))
    server.watcher.expect(tagged("setNumberVector", name="logperiodvector"))   # the device's answer: yes
    other.close()
    still_serving(server)
    assert not [e.tag for e in server.watcher.received[seen:] if e.tag == "getProperties" or e.tag.startswith("new")]


def test_more_clients_than_the_limit_are_told_and_closed(server):
    extra = [server.client() for _ in range(4)]          # the watcher holds one of four connections
    refused = [c for c in extra if _closed_with_message(c)]
    assert len(refused) == 1 and "full" in refused[0].received[-1].get("message")
    for client in extra:
        client.close()
    time.sleep(0.3)
    still_serving(server)


def _closed_with_message(client):
    try:
        client.expect(tagged("message"), timeout=1)
        client.expect(lambda e: False, timeout=1)
    except ConnectionError:
        return True
    except AssertionError:
        return False
    return False


def test_clients_that_disconnect_mid_message_or_mid_blob(server):
    for fragment in (b'<newNumberVector device="Thermostat" name="targ',
                     b'<newBLOBVector device="Thermostat" name="logsvector"><oneBLOB name="templogs">QUFB' * 100):
        for _ in range(5):
            send_raw(server, fragment, close_after=0.01)
    for _ in range(5):      # and readers that vanish while a BLOB is on its way to them
        client = server.client()
        client.send('<enableBLOB device="Thermostat">Also</enableBLOB>')
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        time.sleep(0.2)
        client.close()
    still_serving(server)


def test_a_client_that_never_reads_is_cut_off_and_memory_stays_bounded(server):
    """A client that keeps asking (about 3 KB of definitions per request) and
    never reads: the server holds at most --max-unread (1 MiB here) for it,
    then disconnects it, while regulating and logging go on."""
    before = peak = rss_mib(server.process.pid)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.settimeout(1)
    stalled.sendall(b'<enableBLOB device="Thermostat">Also</enableBLOB>')
    deadline = time.monotonic() + 20
    requests = 0
    try:
        while time.monotonic() < deadline and "has not read its last" not in server.stderr_text():
            stalled.sendall(b'<getProperties version="1.7"/>' * 20)     # paced, so the server keeps up
            requests += 20
            peak = max(peak, rss_mib(server.process.pid))
            time.sleep(0.05)
    except OSError:
        pass                                          # cut off while sending: also what we expect
    finally:
        stalled.close()
    print(f"cut off after {requests} requests; RSS {before:.1f} -> peak {peak:.1f} MiB")
    assert "has not read its last" in server.stderr_text(), f"not cut off after {requests} requests"
    assert peak - before < 40, f"server grew {peak - before:.0f} MiB for a client that never reads"
    still_serving(server)


def test_zz_the_log_is_lossless_across_all_of_the_above(server):
    "(c): runs last in this module. Every update the watcher saw is in the log files once, in order."
    server.watcher.send(new_switch(DEVICE, "switchvector", "switchmember", "Off"))
    server.watcher.expect(tagged("setSwitchVector", name="switchvector"))
    assert all(p.read_text().startswith("timestamp,temperature\n") for p in server.log_dir.glob("*.csv"))
    rows = [",".join(row) for row in logged_rows(server.log_dir)]
    assert len(rows) == len(set(rows))
    updates = [f"{e.get('timestamp')},{e.find('oneNumber').text}" for e in server.watcher.received
               if e.tag == "setNumberVector" and e.get("name") == "temperaturevector"]
    start = updates.index(rows[0])
    assert updates[start:start + len(rows)] == rows
    sent = [content for _, content in blob_files(e for e in server.watcher.received if e.tag == "setBLOBVector")]
    assert sorted(sent) == sorted(p.read_bytes() for p in server.log_dir.glob("Thermostat-*.csv"))
    still_serving(server)


def test_sigterm_while_sending_blobs_then_restart_keeps_earlier_files(tmp_path):
    first = ServerProcess("--poll-interval", "0.01", "--log-period", "0.1", "--log-dir", str(tmp_path))
    client = first.client()
    client.send('<getProperties version="1.7"/><enableBLOB device="Thermostat">Also</enableBLOB>')
    client.send(new_switch(DEVICE, "switchvector", "switchmember", "On"))
    client.gather(tagged("setBLOBVector"), 5, timeout=10)
    first.process.terminate()
    assert first.process.wait(timeout=2) == 0
    client.close()
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(kept) >= 5 and not any(name.endswith(".part") for name in kept)
    second = ServerProcess(*FAST, "--log-dir", str(tmp_path), port=first.port)
    client = second.client()
    client.send('<getProperties version="1.7"/>')
    client.send(new_switch(DEVICE, "switchvector", "switchmember", "On"))
    client.gather(tagged("setNumberVector", name="temperaturevector"), 25)
    client.close()
    assert second.stop() == 0
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {name: after[name] for name in kept} == kept and len(after) > len(kept)
    for content in after.values():
        header, *rows = content.decode().splitlines()
        assert header == "timestamp,temperature" and rows and all(len(r.split(",")) == 2 for r in rows)
