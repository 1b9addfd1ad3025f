"""End to end: `python thermostat.py` against real INDI peers (libindi's
indi_getprop and indi_setprop, the indipyclient library) and a raw socket
client for exact protocol checks."""

import asyncio
import subprocess

import indipyclient
import pytest

import thermostat
from conftest import blob_files, new_number, new_switch, tagged

GET_ALL = '<getProperties version="1.7"/>'
BLOBS_ON = '<enableBLOB device="Thermostat">Also</enableBLOB>'


def getprop(port, *specs):
    "indi_getprop's answers as a dict; it waits out its timeout (-t 1) only when a spec has a wildcard."
    result = subprocess.run(["indi_getprop", "-p", str(port), "-t", "1", *specs],
                            capture_output=True, text=True, timeout=10)
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def setprop(port, spec):
    result = subprocess.run(["indi_setprop", "-p", str(port), spec], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def wait_for_prop(port, spec, expected, timeout=5.0):
    import time
    deadline = time.monotonic() + timeout
    while (value := getprop(port, spec).get(spec)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert value == expected
    return value


def test_indi_getprop_lists_every_property_with_group_and_permission(served):
    server = served()
    props = getprop(server.port, "Thermostat.*.*", "Thermostat.*._PERM", "Thermostat.*._GROUP")
    assert -50 <= float(props["Thermostat.temperaturevector.temperature"]) <= 99
    assert props["Thermostat.targetvector.target"] == "15.00"
    assert props["Thermostat.heatervector.heater"] == "Idle"
    assert props["Thermostat.switchvector.switchmember"] == "Off"
    assert props["Thermostat.temperaturevector._PERM"] == "ro"
    assert props["Thermostat.targetvector._PERM"] == "rw"
    assert props["Thermostat.switchvector._PERM"] == "rw"
    assert props["Thermostat.targetvector._GROUP"] == "Values"
    assert props["Thermostat.switchvector._GROUP"] == "Control"


def test_definitions_carry_the_documented_attributes(served):
    "indi_getprop does not report BLOB vectors or member details, so read the definitions raw."
    client = served().client()
    client.send(GET_ALL)
    defs = {e.get("name"): e for e in client.gather(lambda e: e.tag.startswith("def"), 9)}
    assert set(defs) == {"temperaturevector", "targetvector", "heatervector", "switchvector", "logsvector",
                         "logperiodvector", "CONNECTION", "DRIVER_INFO", "POLLING_PERIOD"}
    connection = defs["CONNECTION"]
    assert (connection.get("rule"), [(m.get("name"), m.text.strip()) for m in connection]) == \
        ("OneOfMany", [("CONNECT", "On"), ("DISCONNECT", "Off")])
    info = {m.get("name"): m.text for m in defs["DRIVER_INFO"]}
    assert info == {"DRIVER_NAME": "Thermostat", "DRIVER_EXEC": "indi_thermostat",
                    "DRIVER_VERSION": thermostat.__version__, "DRIVER_INTERFACE": "32768"}
    period = defs["POLLING_PERIOD"].find("defNumber")
    assert (period.get("name"), period.get("min"), period.get("max"), period.text) == ("PERIOD_MS", "10", "600000", "50")
    logs = defs["logsvector"]
    assert (logs.get("perm"), logs.get("group"), logs.find("defBLOB").get("name")) == ("ro", "Control", "templogs")
    switch = defs["switchvector"]
    assert (switch.get("rule"), switch.find("defSwitch").get("label")) == ("AtMostOne", "Logs")
    target = defs["targetvector"].find("defNumber")
    assert (target.get("format"), target.get("min"), target.get("max"), target.get("step")) == \
        ("%3.1f", "-50.0", "99.0", "0.1")
    heater = defs["heatervector"]
    assert heater.find("defLight").get("name") == "heater"
    client.close()


@pytest.mark.parametrize("sent, stored", [("21", "21.00"), ("21:30", "21.50"), ("-7.25", "-7.25")])
def test_indi_setprop_sets_the_target_in_any_number_format(served, sent, stored):
    server = served()
    setprop(server.port, f"Thermostat.targetvector.target={sent}")
    wait_for_prop(server.port, "Thermostat.targetvector.target", stored)


def test_every_indi_setprop_request_arrives(served):
    """indi_setprop sends its request and closes without reading what it asked
    for: the server's next write to it fails, and the request must not be
    lost with the connection."""
    server = served()
    watcher = server.client()
    watcher.send(GET_ALL)
    for tenth in range(20):
        value = f"{20 + tenth / 10:.2f}"
        setprop(server.port, f"Thermostat.targetvector.target={value}")
        watcher.expect(lambda e, value=value: e.tag == "setNumberVector"
                       and e.get("name") == "targetvector" and [m.text.strip() for m in e] == [value],
                       timeout=3, what=f"target {value}")
    watcher.close()


@pytest.mark.parametrize("sent", ["warm", "nan", "inf", "150", "-51"])
def test_indi_setprop_rejection_sets_alert_and_keeps_the_target(served, sent):
    server = served()
    setprop(server.port, f"Thermostat.targetvector.target={sent}")
    wait_for_prop(server.port, "Thermostat.targetvector._STATE", "Alert")
    assert getprop(server.port, "Thermostat.targetvector.target")["Thermostat.targetvector.target"] == "15.00"


def test_target_state_is_busy_outside_the_band_and_ok_inside(served):
    server = served("--sensor", "simulator:10")     # a fast box: about 0.1 K a poll near 19 degrees
    client = server.client()
    client.send(GET_ALL)
    client.send(new_number("Thermostat", "targetvector", "target", "60"))
    reply = client.expect(tagged("setNumberVector", name="targetvector"), what="target reply")
    assert reply.get("state") == "Busy"
    # the heater comes on, then the temperature enters the band around a reachable target
    assert client.expect(tagged("setLightVector", name="heatervector")).find("oneLight").text == "Busy"
    client.send(new_number("Thermostat", "targetvector", "target", "19"))
    client.expect(lambda e: e.get("name") == "targetvector" and e.get("state") == "Ok",
                  timeout=10, what="target state Ok")
    client.close()


def test_rejection_message_names_range_and_value_and_is_not_repeated(served):
    server = served()
    client = server.client()
    client.send(GET_ALL)
    client.send(new_number("Thermostat", "targetvector", "target", "NaN"))
    alert = client.expect(tagged("setNumberVector", name="targetvector"), what="rejection")
    assert alert.get("state") == "Alert"
    assert "from -50 to 99" in alert.get("message") and "'NaN'" in alert.get("message")
    assert alert.find("oneNumber").text == "15.00"
    client.send(new_number("Thermostat", "targetvector", "target", "16"))
    accepted = client.expect(tagged("setNumberVector", name="targetvector"), what="acceptance")
    assert accepted.get("state") in ("Ok", "Busy") and accepted.get("message") is None
    # nor in any later update or definition of the vector
    client.gather(tagged("setNumberVector", name="temperaturevector"), 5)
    client.send('<getProperties version="1.7" device="Thermostat" name="targetvector"/>')
    definition = client.expect(tagged("defNumberVector", name="targetvector"), what="definition")
    assert definition.get("message") is None
    assert all(e.get("message") is None for e in client.received if e.get("name") == "targetvector"
               and e is not alert)
    client.close()


@pytest.mark.parametrize("request_xml, vector, words", [
    (new_switch("Thermostat", "switchvector", "switchmember", "Maybe"), "switchvector", "invalid value"),
    (new_switch("Thermostat", "switchvector", "nosuchmember", "On"), "switchvector", "membername not known"),
    (new_number("Thermostat", "targetvector", "nosuchmember", "20"), "targetvector", "membername not known"),
    (new_number("Thermostat", "targetvector", "target", ""), "targetvector", "Missing value"),
    (new_switch("Thermostat", "targetvector", "target", "On"), "targetvector", "does not apply"),
])
def test_malformed_requests_get_an_alert_with_the_reason(served, request_xml, vector, words):
    server = served()
    client = server.client()
    client.send(GET_ALL)
    client.send(request_xml)
    reply = client.expect(lambda e: e.get("name") == vector and e.tag.startswith("set"), what="reply")
    assert reply.get("state") == "Alert" and words in reply.get("message")
    # and the server carries on
    client.gather(tagged("setNumberVector", name="temperaturevector"), 3)
    client.close()


@pytest.mark.parametrize("request_xml, words", [
    (new_number("Thermostat", "temperaturevector", "temperature", "40"), "read-only"),
    (new_number("Thermostat", "novector", "x", "1"), "no such property"),
])
def test_requests_without_a_writable_vector_get_a_device_message(served, request_xml, words):
    server = served()
    client = server.client()
    client.send(GET_ALL)
    client.send(request_xml)
    message = client.expect(tagged("message", device="Thermostat"), what="device message")
    assert words in message.get("message")
    update = client.expect(tagged("setNumberVector", name="temperaturevector"))
    assert update.get("state") == "Ok" and float(update.find("oneNumber").text) < 40


def test_log_files_arrive_complete_in_order_with_true_sizes(served, tmp_path):
    server = served("--log-dir", str(tmp_path))
    client = server.client()
    client.send(GET_ALL + BLOBS_ON)
    client.send(new_switch("Thermostat", "switchvector", "switchmember", "On"))
    switched = client.expect(tagged("setSwitchVector", name="switchvector"))
    assert switched.find("oneSwitch").text == "On"
    assert client.expect(tagged("message", device="Thermostat")).get("message") == "[INFO] Log reporting is now On"
    blobs = client.gather(tagged("setBLOBVector", name="logsvector"), 3, timeout=10)
    client.send(new_switch("Thermostat", "switchvector", "switchmember", "Off"))
    # the partial file is sent, before the switch confirms Off
    partial = client.expect(lambda e: e.tag == "setBLOBVector" or e.get("name") == "switchvector")
    assert partial.tag == "setBLOBVector"
    assert client.expect(tagged("setSwitchVector", name="switchvector")).find("oneSwitch").text == "Off"
    files = blob_files(blobs + [partial])
    assert all(one.get("format") == ".csv" for blob in blobs for one in blob.iter("oneBLOB"))

    sizes = {size for size, _ in files}
    assert len(sizes) > 1, "files of different lengths, so a sticky size would show"
    assert all(size == len(content) for size, content in files)

    rows = []
    for _, content in files:
        header, *lines = content.decode().splitlines()
        assert header == "timestamp,temperature"
        rows += lines
    # every reading sent while logging, once, in order: a contiguous run of the live updates
    updates = [f"{e.get('timestamp')},{e.find('oneNumber').text}" for e in client.received
               if e.tag == "setNumberVector" and e.get("name") == "temperaturevector"]
    start = updates.index(rows[0])
    assert updates[start:start + len(rows)] == rows
    assert len(rows) > 25
    # and the same files are on disk
    on_disk = sorted(p.read_bytes() for p in tmp_path.glob("Thermostat-*.csv"))
    assert on_disk == sorted(content for _, content in files)
    client.close()


class RecordingClient(indipyclient.IPyClient):
    "An indipyclient that switches logging on and keeps the CSV files it receives."

    def __init__(self, port, wanted):
        super().__init__(indihost="127.0.0.1", indiport=port)
        self.wanted = wanted
        self.files = []
        self.done = asyncio.Event()

    async def rxevent(self, event):
        if event.eventtype == "Define" and event.vectorname == "switchvector":
            await self.send_enableBLOB("Also", "Thermostat")
            await self.send_newVector("Thermostat", "switchvector", members={"switchmember": "On"})
        elif event.eventtype == "SetBLOB":
            self.files.append((event.sizeformat["templogs"], event["templogs"]))
            if len(self.files) >= self.wanted:
                self.done.set()


def test_indipyclient_receives_complete_csv_files(served):
    server = served()

    async def run():
        client = RecordingClient(server.port, wanted=2)
        running = asyncio.create_task(client.asyncrun())
        try:
            await asyncio.wait_for(client.done.wait(), 15)
        finally:
            client.shutdown()
            await asyncio.wait_for(running, 10)
        return client.files

    files = asyncio.run(run())
    for (size, blobformat), content in files:
        assert blobformat == ".csv" and size == len(content)
        lines = content.decode().splitlines()
        assert lines[0] == "timestamp,temperature" and len(lines) > 5
        assert all(len(line.split(",")) == 2 for line in lines[1:])
