"""Nothing logged is lost, and no signal, disk fault, odd input or stray
definition takes the driver down (issue 9). The model's file writing is
tested in-process with time passed in; disk faults on a small tmpfs
(mounting needs root, as CI runs); signals and stdio against real processes."""

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone

import pytest

import thermostat
from conftest import ROOT, IndiClient, free_port, instant_poll, new_number, new_switch, tagged
from test_indiserver import IndiServer
from test_model import Simulated
from thermostat import TemperatureLog, ThermalControl, indi_timestamp, parse_number

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
DEVICE = "Thermostat"
THERMOSTAT = [sys.executable, str(ROOT / "thermostat.py")]


def polls(simulated, count, every=1.0, start=START):
    return [simulated.poll(start + timedelta(seconds=every * i)) for i in range(count)]


def rows_on_disk(folder, pattern="*.csv"):
    "Every row of the finished files in folder, files in the order of their first rows."
    files = []
    for path in folder.glob(pattern):
        header, *rows = path.read_text().splitlines()
        assert header == "timestamp,temperature", path
        files.append(rows)
    return [row for rows in sorted(files) for row in rows]


def row_of(reading):
    return f"{indi_timestamp(reading.timestamp)},{reading.temperature:.2f}"


def wait_for_rows(folder, count, timeout=10):
    "Wait until the partial file in folder holds count rows."
    deadline = time.monotonic() + timeout
    while not any(len(p.read_bytes().splitlines()) > count for p in folder.glob("*.part")):
        assert time.monotonic() < deadline, f"fewer than {count} rows in {list(folder.iterdir())}"
        time.sleep(0.01)


def errors(caplog, level=logging.ERROR):
    return [r.getMessage() for r in caplog.records if r.levelno == level]


# -- 2. durable log files -------------------------------------------------------------------------

def test_each_reading_is_on_disk_as_it_is_logged(tmp_path):
    simulated = Simulated(log_period=3600, log_dir=tmp_path)
    simulated.log.start(START)
    for count in range(1, 6):
        reading = simulated.poll(START + timedelta(seconds=count))
        (partial,) = tmp_path.glob("*.csv.part")        # not under its final name until complete
        lines = partial.read_text().splitlines()
        assert len(lines) == count + 1 and lines[-1] == row_of(reading)
    assert not list(tmp_path.glob("*.csv"))
    simulated.stop_logging()
    assert not list(tmp_path.glob("*.part")) and len(rows_on_disk(tmp_path)) == 5


def test_what_a_crash_left_is_completed_at_start_never_duplicated(tmp_path):
    simulated = Simulated("Lab", log_period=3600, log_dir=tmp_path)
    simulated.log.start(START)
    readings = polls(simulated, 4)
    (partial,) = tmp_path.glob("*.part")
    with open(partial, "ab") as torn:                   # the crash came mid-row
        torn.write(b"2026-01-01T00:00:04,1")
    empty = tmp_path / "Lab-2025-12-31T00-00-00.000000.csv.part"
    empty.write_bytes(b"timestamp,temp")                # a crash before the first row was whole
    other = tmp_path / "Cellar-2026-01-01T00-00-00.000000.csv.part"
    other.write_bytes(b"timestamp,temperature\n")        # another device's: not ours to touch
    TemperatureLog("Lab", log_dir=tmp_path)             # the next start
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, partial.name.removesuffix(".part")]
    assert rows_on_disk(tmp_path, "Lab-*.csv") == [row_of(r) for r in readings]
    TemperatureLog("Lab", log_dir=tmp_path)             # and again: nothing changes
    assert rows_on_disk(tmp_path, "Lab-*.csv") == [row_of(r) for r in readings]


def test_kill_9_loses_at_most_the_reading_being_written_and_a_restart_completes_the_file(tmp_path, served):
    server = served("--log-period", "3600", "--log-dir", str(tmp_path))
    client = server.client()
    client.send('<getProperties version="1.7"/>' + new_switch(DEVICE, "switchvector", "switchmember", "On"))
    client.expect(tagged("setSwitchVector", name="switchvector"))
    updates = client.gather(tagged("setNumberVector", name="temperaturevector"), 10)
    server.process.kill()
    server.process.wait(5)
    client.close()
    received = [f"{e.get('timestamp')},{e.find('oneNumber').text}" for e in updates]
    restarted = served("--log-dir", str(tmp_path))
    assert restarted.stop() == 0
    assert not list(tmp_path.glob("*.part"))
    rows = rows_on_disk(tmp_path)
    logged = [r for r in received if r >= rows[0]]      # readings before logging began are not logged
    # the rows are written off the event loop: the last reading sent may be the one being written
    kept = rows[:len(logged)]
    assert len(logged) >= 9 and len(kept) >= len(logged) - 1 and kept == logged[:len(kept)]


# -- 3. write failures ----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    "A 64 KiB tmpfs (mounting needs root, as in CI), unmounted afterwards."
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder):
    "Fill the filesystem of folder; return the file that fills it."
    filler = folder / "filler"
    data = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(data, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(data)
    return filler


def test_a_full_disk_keeps_rows_in_memory_and_writes_them_when_space_is_back(small_disk, caplog):
    logs = small_disk / "logs"
    simulated = Simulated(log_period=20, log_dir=logs)
    control, log = simulated.control, simulated.log
    log.start(START)
    before = polls(simulated, 10)
    filler = fill(small_disk)
    with caplog.at_level(logging.INFO, logger="thermostat"):
        during = polls(simulated, 200, start=START + timedelta(seconds=10))   # 10 files' worth
        assert len(errors(caplog)) == 1 and "No space left on device" in errors(caplog)[0]
        assert control.temperature != 20.0 and log.writer.failure
        for path in logs.iterdir():                     # what is on disk is whole rows
            assert path.read_bytes().endswith(b"\n")
        filler.unlink()
        after = polls(simulated, 5, start=START + timedelta(seconds=210))
        simulated.stop_logging()
    assert len(errors(caplog)) == 1
    assert [m for m in errors(caplog, logging.WARNING) if "again" in m] == \
        [f"log files are written to {logs} again"]
    assert not list(logs.glob("*.part"))
    assert rows_on_disk(logs) == [row_of(r) for r in before + during + after]


def test_rows_on_disk_before_a_fault_stay_there_through_it(small_disk):
    "A crash while writing fails loses what waits in memory, never what had reached the disk."
    logs = small_disk / "logs"
    simulated = Simulated(log_period=3600, log_dir=logs)
    simulated.log.start(START)
    before = [row_of(r) for r in polls(simulated, 5)]
    fill(small_disk)
    polls(simulated, 300, start=START + timedelta(seconds=5))    # 300 s of failing writes and retries
    assert simulated.log.writer.failure
    (partial,) = logs.glob("*.part")
    rows = partial.read_text().splitlines()[1:]
    assert rows[:5] == before and partial.read_text().endswith("\n")


@pytest.mark.parametrize("fault", ["removed", "replaced by a file"])
def test_a_folder_removed_or_replaced_loses_nothing(small_disk, caplog, fault):
    logs = small_disk / "logs"
    simulated = Simulated(log_period=10, log_dir=logs)
    simulated.log.start(START)
    readings = polls(simulated, 15)
    subprocess.run(["rm", "-rf", str(logs)], check=True)
    if fault == "replaced by a file":
        logs.write_text("not a folder")
    with caplog.at_level(logging.INFO, logger="thermostat"):
        readings += polls(simulated, 20, start=START + timedelta(seconds=15))
        assert len(errors(caplog)) == 1, caplog.text
        if fault == "replaced by a file":
            logs.unlink()
        readings += polls(simulated, 5, start=START + timedelta(seconds=35))
        simulated.stop_logging()
    assert len(errors(caplog)) == 1 and "written to" in caplog.text
    assert not list(logs.glob("*.part"))
    # all but the file finished before, removed with the folder
    assert rows_on_disk(logs) == [row_of(r) for r in readings[10:]]


def test_a_read_only_disk_and_rows_waiting_for_it_are_bounded(small_disk, caplog):
    simulated = Simulated(log_period=10, log_dir=small_disk / "logs")
    log = simulated.log
    log.writer.max_unwritten = 3 * 300                # three files of ten rows, 282 bytes each
    log.start(START)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        with caplog.at_level(logging.ERROR, logger="thermostat"):
            polls(simulated, 60)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert len(log.writer.unwritten) == 3
    assert sum("dropped" in message for message in errors(caplog)) == 2


def test_the_server_keeps_regulating_and_serving_on_a_full_disk(small_disk, served):
    logs = small_disk / "logs"
    server = served("--log-dir", str(logs))
    client = server.client()
    client.send('<getProperties version="1.7"/>' + new_switch(DEVICE, "switchvector", "switchmember", "On"))
    client.expect(tagged("setSwitchVector", name="switchvector"))
    filler = fill(small_disk)
    client.gather(tagged("setNumberVector", name="temperaturevector"), 30)    # three log periods
    client.send(new_number(DEVICE, "targetvector", "target", "30"))
    assert client.expect(tagged("setNumberVector", name="targetvector")).find("oneNumber").text == "30.00"
    filler.unlink()
    deadline = time.monotonic() + 10
    while "written to" not in server.stderr_text():
        assert time.monotonic() < deadline, server.stderr_text()
        time.sleep(0.05)
    client.close()
    assert server.stop() == 0
    assert server.stderr.count("ERROR") == 1 and "Traceback" not in server.stderr
    rows = rows_on_disk(logs)
    assert len(rows) >= 30 and rows == sorted(set(rows))


# -- 4. file names --------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["Lab/North", "../escape", 'a:b\\c*?"<>|', "CON", "%2F", "x" * 300])
def test_file_names_stay_inside_the_folder_and_are_valid_everywhere(tmp_path, device):
    logs = tmp_path / "logs"
    simulated = Simulated(device, log_period=10, log_dir=logs)
    simulated.log.start(START)
    readings = polls(simulated, 15)
    simulated.stop_logging()
    assert [p.parent for p in tmp_path.rglob("*") if p.is_file()] == [logs, logs]
    for path in logs.iterdir():
        assert not set(path.name) & set('<>:"/\\|?*') and len(path.name.encode()) < 255
    assert rows_on_disk(logs) == [row_of(r) for r in readings]      # rows keep the INDI timestamps


def test_devices_never_share_file_names():
    names = ["Lab/North", "Lab%2FNorth", "Lab:North", "Lab_North", "Lab North", "x" * 300, "x" * 299 + "y"]
    assert len({thermostat.file_prefix(name) for name in names}) == len(names)


# -- 5. --log-dir checked at start ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["a regular file", "inside a regular file", "read-only"])
def test_a_log_dir_that_cannot_be_written_is_one_line_and_a_failure(small_disk, case):
    target = {"a regular file": small_disk / "file", "inside a regular file": small_disk / "file" / "logs",
              "read-only": small_disk / "logs"}[case]
    (small_disk / "file").write_text("")
    if case == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        result = subprocess.run([*THERMOSTAT, "--port", str(free_port()), "--log-dir", str(target)],
                                capture_output=True, text=True, timeout=10)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("thermostat.py: error: ") and str(small_disk) in line


# -- 6. the open file is bounded --------------------------------------------------------------------

def test_the_open_file_is_cut_at_its_size_bound_and_the_log_says_so(caplog):
    simulated = Simulated(log_period=31 * 86400)     # the longest a client may set
    log = simulated.log
    log.start(START)
    with caplog.at_level(logging.WARNING, logger="thermostat"):
        readings = polls(simulated, 70000, every=0.01)     # POLLING_PERIOD 10 ms, the shortest
    log.stop()
    files = []
    while logfile := log.next_unsent():
        log.sent(logfile)
        files.append(logfile)
    assert len(files) == 3 and all(len(f.content()) <= thermostat.MAX_FILE_BYTES for f in files)
    assert len(files[0].content()) > thermostat.MAX_FILE_BYTES - 100
    assert [row for f in files for row in f.content().decode().splitlines()[1:]] == [row_of(r) for r in readings]
    assert sum("before its log period ended" in m for m in errors(caplog, logging.WARNING)) == 2


# -- 7. numbers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["-", ":", "::", "--", "--25", "1_5", "+-2", "2:", ":30", "21:30:", "1e", ".",
                                  "21::30", "21:30;15", "0x10", "21:75", "٣", "2 1 3 4"])
def test_only_well_formed_indi_numbers_are_accepted(text):
    with pytest.raises(ValueError) as error:
        parse_number(text, "target", -50, 99)
    assert "from -50 to 99" in str(error.value) and repr(text) in str(error.value)


@pytest.mark.parametrize("text, value", [("21;30", 21.5), ("-21:30", -21.5), ("21:30:36", 21.51), ("+5", 5.0),
                                         (".5", 0.5), ("5.", 5.0), ("1e1", 10.0), ("21 30 36", 21.51)])
def test_decimal_and_sexagesimal_numbers(text, value):
    assert parse_number(text, "target", -50, 99) == pytest.approx(value)


def test_a_malformed_number_gets_alert_with_the_reason(served):
    client = served().client()
    client.send(new_number(DEVICE, "targetvector", "target", "--25"))
    reply = client.expect(lambda e: e.get("name") == "targetvector" and e.get("state") == "Alert")
    assert "not a number" in reply.get("message")
    client.close()


# -- 8. declared ranges hold ----------------------------------------------------------------------

@pytest.mark.parametrize("start, heating", [(thermostat.TEMPERATURE_MAX, True), (thermostat.TEMPERATURE_MIN, False)])
def test_the_simulated_temperature_stays_within_its_declared_range(start, heating):
    simulator = thermostat.Simulator(start)
    simulator.switch(heating)
    temperatures = [simulator.read() for _ in range(50)]
    assert min(temperatures) >= thermostat.TEMPERATURE_MIN and max(temperatures) <= thermostat.TEMPERATURE_MAX


class FixedSensor:
    instant = True
    valid_range = None

    def __init__(self, value):
        self.value = value

    def read(self):
        return self.value


@pytest.mark.parametrize("value", [thermostat.TEMPERATURE_MAX + 0.5, thermostat.TEMPERATURE_MIN - 0.5])
def test_a_reading_outside_the_declared_range_is_refused_not_sent(value):
    sensor = FixedSensor(value)
    control = ThermalControl(temperature=math.nan, valid_range=sensor.valid_range)   # a real sensor's
    hardware = thermostat.Hardware(sensor, thermostat.Simulator())
    reading = instant_poll(control, hardware, datetime.now(timezone.utc))
    assert "outside the thermostat's range" in control.sensor_fault
    assert not reading.heater_on and math.isnan(reading.temperature)


def test_numbers_defined_by_make_driver_lie_within_their_declared_range():
    driver = thermostat.make_driver(poll_interval=0.001, log_period=0.03)     # as the soak runs it
    numbers = [vector._make_defVector() for vector in driver.device.values() if vector.vectortype == "NumberVector"]
    for member in (member for vector in numbers for member in vector):
        assert float(member.get("min")) <= float(member.text) <= float(member.get("max")), member.get("name")


# -- 1. every way out keeps the logs --------------------------------------------------------------

def flood(port, requests=3000):
    "A client that asks for everything again and again and never reads."
    flooder = socket.create_connection(("127.0.0.1", port))
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flooder.sendall(b'<getProperties version="1.7"/>' * requests)
    return flooder


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_every_stop_signal_keeps_the_log_whatever_clients_do(tmp_path, served, signum):
    server = served("--poll-interval", "0.01", "--log-period", "3600", "--log-dir", str(tmp_path))
    client = server.client()
    client.send('<getProperties version="1.7"/>' + new_switch(DEVICE, "switchvector", "switchmember", "On"))
    client.expect(tagged("setSwitchVector", name="switchvector"))
    updates = client.gather(tagged("setNumberVector", name="temperaturevector"), 20)
    flooders = [flood(server.port) for _ in range(2)]
    wait_for_rows(tmp_path, len(rows_on_disk(tmp_path, "*.part")) + 20)     # the flood under way
    client.send("".join(new_number(DEVICE, "targetvector", "target", 20 + i % 10) for i in range(100)))
    server.process.send_signal(signum)
    assert server.process.wait(timeout=5) == 0
    for flooder in flooders:
        flooder.close()
    client.close()
    log = server.stderr_text()
    assert "Traceback" not in log and "did not finish" not in log, log
    rows = rows_on_disk(tmp_path)
    assert not list(tmp_path.glob("*.part"))
    assert f"{updates[-1].get('timestamp')},{updates[-1].find('oneNumber').text}" in rows


@pytest.fixture
def start_stdio():
    "Start indi_thermostat with options, stdin and stdout; each is killed at the end if still running."
    started = []

    def start(*options, stdout=subprocess.PIPE):
        started.append(subprocess.Popen(["indi_thermostat", *options], stdin=subprocess.PIPE, stdout=stdout,
                                        stderr=subprocess.PIPE))
        return started[-1]
    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def read_until(process, needle, timeout=10):
    "Read process's stdout until needle has appeared; return what was read."
    received = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(process.stdout.fileno(), False)
    while needle not in received:
        assert time.monotonic() < deadline, received[-500:]
        chunk = process.stdout.read(65536)
        if chunk:
            received += chunk
        else:
            time.sleep(0.01)
    return received


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_every_stop_signal_keeps_the_log_under_indiserver_too(tmp_path, start_stdio, signum):
    driver = start_stdio("--poll-interval", "0.01", "--log-period", "3600", "--log-dir", str(tmp_path))
    driver.stdin.write(new_switch(DEVICE, "switchvector", "switchmember", "On").encode())
    driver.stdin.flush()
    read_until(driver, b'name="switchvector"')
    driver.stdin.write(b'<getProperties version="1.7"/>' * 100)     # 300 KB of answers, never read:
    driver.stdin.flush()                                            # the driver's writes fill stdout and wait
    wait_for_rows(tmp_path, 20)
    driver.send_signal(signum)
    assert driver.wait(timeout=5) == 0
    assert "Traceback" not in driver.stderr.read().decode()
    assert not list(tmp_path.glob("*.part")) and len(rows_on_disk(tmp_path)) >= 10


START_UP_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import thermostat
where = sys.argv[1]
if where == "make_driver":
    original = thermostat.make_driver
    def make_driver(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)
    thermostat.make_driver = make_driver
else:           # as the event loop starts the server or driver, before it listens or reads
    for cls in (thermostat.ThermoServer, thermostat.ThermoDriver):
        def asyncrun(self, original=cls.asyncrun):
            os.kill(os.getpid(), signal.SIGTERM)
            return original(self)
        cls.asyncrun = asyncrun
thermostat.run_command(sys.argv[2:])
"""


@pytest.mark.parametrize("where", ["make_driver", "asyncrun"])
@pytest.mark.parametrize("mode", [[], ["--stdio"]])
def test_a_signal_during_start_up_ends_it_cleanly(tmp_path, where, mode):
    script = START_UP_SCRIPT.format(root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script, where, "--port", str(free_port()), *mode,
                             "--log-dir", str(tmp_path)], stdin=subprocess.PIPE, capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "did not finish" not in result.stderr


# -- 9. stdio -------------------------------------------------------------------------------------

def test_stdin_a_regular_file_is_read_to_its_end(tmp_path):
    requests = tmp_path / "requests.xml"
    requests.write_text('<getProperties version="1.7"/>' + new_number(DEVICE, "targetvector", "target", "21:30"))
    with open(requests, "rb") as stdin:
        result = subprocess.run(["indi_thermostat"], stdin=stdin, capture_output=True, timeout=10)
    assert result.returncode == 0, result.stderr
    elements = list(ET.fromstring(b"<s>" + result.stdout + b"</s>"))
    assert sum(e.tag.startswith("def") for e in elements) == len(thermostat.make_driver(config=None).device)
    assert [e.find("oneNumber").text for e in elements if e.tag == "setNumberVector"] == ["21.50"]


def test_stdin_dev_null_ends_at_once():
    with open(os.devnull, "rb") as stdin:
        result = subprocess.run(["indi_thermostat"], stdin=stdin, capture_output=True, timeout=10)
    assert result.returncode == 0 and result.stdout == b"" and b"Traceback" not in result.stderr


def test_a_broken_stdout_ends_the_driver_with_one_line(start_stdio):
    reading, writing = os.pipe()
    os.close(reading)
    driver = start_stdio("--poll-interval", "0.05", stdout=writing)
    os.close(writing)
    driver.stdin.write(b'<getProperties version="1.7"/>')
    driver.stdin.flush()
    assert driver.wait(timeout=10) != 0
    (line,) = driver.stderr.read().decode().splitlines()
    assert "stdout" in line and "Broken pipe" in line


# -- 10. definitions from outside -----------------------------------------------------------------

SPOOFS = [
    '<defNumberVector device="Thermostat" name="targetvector" perm="rw" state="Ok">'
    '<defNumber name="target" format="%.1f" min="0" max="1" step="0">77</defNumber></defNumberVector>',
    '<setNumberVector device="Thermostat" name="targetvector" state="Ok"><oneNumber name="target">77</oneNumber>'
    '</setNumberVector>',
    '<delProperty device="Thermostat"/>',
    '<defSwitchVector device="Thermostat" name="CONNECTION" perm="rw" rule="OneOfMany" state="Ok">'
    '<defSwitch name="CONNECT">Off</defSwitch></defSwitchVector>',
]


def test_definitions_of_its_own_device_on_stdin_are_ignored_with_a_warning(start_stdio):
    driver = start_stdio()
    out, err = driver.communicate(timeout=10, input=(
        new_number(DEVICE, "targetvector", "target", "25") + "".join(SPOOFS * 30)
        + '<getProperties version="1.7" device="Thermostat" name="targetvector"/>').encode())
    assert driver.returncode == 0
    (definition,) = [e for e in ET.fromstring(b"<s>" + out + b"</s>") if e.tag == "defNumberVector"]
    assert definition.find("defNumber").text.strip() == "25.00"
    warnings = [line for line in err.decode().splitlines() if "from outside" in line]
    assert 0 < len(warnings) <= 4 * 20                  # throttled: at most 20 of a kind a minute


def test_a_client_definition_through_libindi_indiserver_does_not_end_the_driver(tmp_path):
    server = IndiServer("-u", str(tmp_path / "indiserver.sock"), "indi_thermostat")
    try:
        client = IndiClient(server.port)
        client.send('<getProperties version="1.7"/>')
        client.expect(tagged("defNumberVector", name="targetvector"), timeout=10)
        (driver,) = server.driver_pids()
        client.send(new_number(DEVICE, "targetvector", "target", "25"))
        client.expect(lambda e: e.tag == "setNumberVector" and e.get("name") == "targetvector"
                      and e.find("oneNumber").text.strip() == "25.00")
        for spoof in SPOOFS * 3:
            client.send(spoof)
        client.send('<getProperties version="1.7" device="Thermostat" name="targetvector"/>')
        definition = client.expect(lambda e: e.tag == "defNumberVector" and e.get("name") == "targetvector"
                                   and e.find("defNumber").text.strip() != "77", timeout=10)
        assert definition.find("defNumber").text.strip() == "25.00"
        assert server.driver_pids() == [driver]
        client.close()
    finally:
        server.stop()



def test_definitions_of_its_own_device_from_a_client_of_the_tcp_server_are_ignored(served):
    server = served()
    client = server.client()
    client.send(new_number(DEVICE, "targetvector", "target", "25"))
    client.expect(lambda e: e.tag == "setNumberVector" and e.get("name") == "targetvector")
    client.send("".join(SPOOFS))
    client.send('<getProperties version="1.7" device="Thermostat" name="targetvector"/>')
    definition = client.expect(tagged("defNumberVector", name="targetvector"))
    assert definition.find("defNumber").text.strip() == "25.00"
    client.close()
    assert server.stop() == 0 and "WARNING" in server.stderr and "Traceback" not in server.stderr
