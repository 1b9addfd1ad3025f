"""Safety that holds whatever the clients, the clock, the disk or the sensor
command do (issue 21): the heater-on limit and the maximum temperature on
their own schedule, a monotonic clock for them, the operator's limits as a
ceiling, bounded command output, and systemd's notify protocol and unit."""

import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta

import pytest

import thermostat
from conftest import FAST, ROOT, IndiClient, free_port, new_number, wait_for_port, wait_until
from test_guard import Recorder


@pytest.fixture
def recorder(tmp_path):
    return Recorder(tmp_path)


def serve(recorder, *options, env=None, limit_memory=False):
    "The command line on the recorder's sensor and heater; (process, port)."
    port = free_port()
    preexec = None
    if limit_memory:  # a run_program that reads without end must not take the machine with it
        def preexec():
            resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "thermostat.py"), "--port", str(port), *FAST,
         "--heater", f"command:{recorder.path}", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=preexec)
    wait_for_port(port, process=process)
    return process, port


def sensor(recorder):
    return ["--sensor", f"w1:{recorder.w1}"]


def stop(process):
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.stderr.read()


def watch(port):
    client = IndiClient(port)
    client.send('<getProperties version="1.7"/>')
    return client


def named(name, tag_start="set", state=None, message=None):
    def match(element):
        return (element.tag.startswith(tag_start) and element.get("name") == name
                and (state is None or element.get("state") == state)
                and (message is None or message in (element.get("message") or "")))
    return match


def values(element):
    return {one.get("name"): one.text.strip() for one in element}


def on_time(recorder, count):
    "Seconds from the first on after `count` switches to the off after it."
    told = recorder.told()[count:]
    on = next(at for word, at in told if word == "on")
    off = next(at for word, at in told if word == "off" and at > on)
    return off - on


# -- 3: safety on its own schedule ------------------------------------------------------------


def test_the_heater_on_limit_holds_at_its_time_whatever_polling_period_a_client_sets(recorder):
    process, port = serve(recorder, *sensor(recorder), "--target", "25", "--max-heater-on", "3",
                          "--no-config")
    try:
        client = watch(port)
        wait_until(lambda: recorder.last_is("on"), what="the heater on")
        count = len(recorder.words()) - 1
        client.send(new_number("Thermostat", "POLLING_PERIOD", "PERIOD_MS", 30000))
        client.expect(named("POLLING_PERIOD", state="Ok"))
        wait_until(lambda: recorder.last_is("off", count + 1), timeout=10,
                   what="the heater off at its limit")
        seconds = on_time(recorder, count)
        print(f"heater on {seconds:.3f} s against a 3 s limit, polls every 30 s")
        assert 2.9 < seconds < 4
        client.expect(named("SAFETY_STATUS", state="Alert"), timeout=2)
        client.close()
    finally:
        stop(process)


class Bench:
    "A sensor whose value the test sets and a heater that records when it switched."

    def __init__(self, value=21.5):
        self.value = value
        self.switches = []  # (on, time.monotonic())

    def read(self):
        return self.value

    def switch(self, on):
        self.switches.append((on, time.monotonic()))

    def last(self, on):
        return bool(self.switches) and self.switches[-1][0] is on


def serve_bench(in_process, bench, **options):
    "A thermostat on bench polling every 50 ms; returns once the heater is on."
    driver = thermostat.make_driver(sensor=bench, heater=bench, config=None, target=25,
                                    poll_interval=0.05, **options)
    running = in_process(thermostat.make_server(driver, port=free_port()))
    wait_until(lambda: bench.last(True), what="the heater on")
    return driver, running


def poll_every(driver, running, seconds):
    "Set the poll interval, as a client's POLLING_PERIOD does."
    def change():
        driver.timer.interval = seconds
        driver.timer.wake_up()
    running.loop.call_soon_threadsafe(change)


def test_the_maximum_temperature_is_checked_every_safety_check_while_heating(in_process):
    bench = Bench()
    driver, running = serve_bench(in_process, bench, max_temperature=40, safety_check=0.2)
    poll_every(driver, running, 30)
    time.sleep(0.2)
    bench.value = 45.0  # polls are 30 s apart: only the safety check reads it in time
    turned_hot = time.monotonic()
    wait_until(lambda: bench.last(False), timeout=3, what="the heater off above the maximum")
    print(f"heater off {bench.switches[-1][1] - turned_hot:.3f} s after the sensor passed the "
          f"maximum (safety check every 0.2 s, polls every 30 s)")


@pytest.mark.parametrize("step", [timedelta(hours=2), -timedelta(hours=2)],
                         ids=["forward", "back"])
def test_a_step_of_the_wall_clock_neither_trips_nor_delays_the_heater_on_limit(
        in_process, monkeypatch, step):
    shift = timedelta(0)

    class Shifted(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + shift

    monkeypatch.setattr(thermostat, "datetime", Shifted)
    bench = Bench()
    serve_bench(in_process, bench, max_heater_on=1.5)
    switched_on = bench.switches[-1][1]
    time.sleep(0.3)
    shift = step  # NTP setting the clock, while the heater is on
    wait_until(lambda: bench.last(False), timeout=5, what="the heater off at its limit")
    seconds = bench.switches[-1][1] - switched_on
    print(f"clock stepped {step}: heater on {seconds:.3f} s against a 1.5 s limit")
    assert 1.45 < seconds < 2.5


# -- 6: the operator's limits are a ceiling ------------------------------------------------


def test_a_client_may_tighten_the_operators_limits_never_loosen_them(recorder):
    process, port = serve(recorder, *sensor(recorder), "--max-temperature", "30",
                          "--max-heater-on", "600", "--no-config")
    try:
        client = watch(port)
        declared = client.expect(named("limitsvector", "def"))
        assert {one.get("name"): float(one.get("max")) for one in declared} == {
            "maxtemperature": 30, "maxheateron": 600}
        for member, value in (("maxtemperature", 99), ("maxheateron", 604800)):
            client.send(new_number("Thermostat", "limitsvector", member, value))
            refused = client.expect(named("limitsvector", state="Alert"))
            assert "never loosen" in refused.get("message")
            assert values(refused) == {"maxtemperature": "30.00", "maxheateron": "600"}
        client.send(new_number("Thermostat", "limitsvector", "maxtemperature", 25))
        assert values(client.expect(named("limitsvector", state="Ok")))["maxtemperature"] == "25.00"
        client.close()
    finally:
        stop(process)


def test_a_saved_file_cannot_loosen_the_built_in_limits_either(recorder, tmp_path):
    config = tmp_path / "config.xml"
    config.write_text(
        '<INDIDriver><newNumberVector device="Thermostat" name="limitsvector">'
        '<oneNumber name="maxtemperature">99</oneNumber>'
        '<oneNumber name="maxheateron">3600</oneNumber></newNumberVector></INDIDriver>')
    process, port = serve(recorder, *sensor(recorder), "--config", str(config))
    try:
        client = watch(port)
        limits = values(client.expect(named("limitsvector", "def")))
        assert limits["maxtemperature"] == "50.00"  # the built-in maximum, not the file's 99
        client.close()
    finally:
        said = stop(process)
    assert "maxtemperature must be at most the operator's limit 50" in said


# -- 5: bounded reads from commands ---------------------------------------------------------


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


def test_a_sensor_command_that_never_stops_printing_is_a_failed_read_in_little_memory(recorder):
    process, port = serve(recorder, "--sensor", "command:yes 21.5", "--target", "25",
                          "--hardware-timeout", "2", "--no-config", limit_memory=True)
    try:
        before = peak_rss_mib(process.pid)
        client = watch(port)
        alert = client.expect(named("temperaturevector", state="Alert", message="sensor"))
        assert "printed more than 4096 bytes" in alert.get("message")
        for _ in range(10):  # ten more reads, each failing
            client.expect(named("temperaturevector", state="Alert"))
        growth = peak_rss_mib(process.pid) - before
        print(f"peak RSS growth under `yes 21.5`: {growth:.1f} MiB")
        assert growth < 10
        assert "on" not in recorder.words()  # fail-safe: never on without a reading
        client.close()
    finally:
        stop(process)


# -- 2: systemd ------------------------------------------------------------------------------


@pytest.fixture
def notify_socket():
    "A datagram socket as systemd's $NOTIFY_SOCKET, bound in a short folder (sun_path: 108)."
    folder = tempfile.mkdtemp(prefix="sd", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(f"{folder}/notify")
    sock.settimeout(5)
    yield sock, f"{folder}/notify"
    sock.close()
    shutil.rmtree(folder)


def test_the_command_line_says_ready_pings_the_watchdog_from_its_loop_and_says_stopping(
        recorder, notify_socket):
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
    # polls 30 s apart: the watchdog's pings come from the loop's own wakes
    process, port = serve(recorder, *sensor(recorder), "--poll-interval", "30", "--no-config",
                          env=env)
    try:
        while (said := sock.recv(4096)) == b"WATCHDOG=1":
            pass  # the loop pings from its start
        assert said == b"READY=1"
        pings = [sock.recv(4096) for _ in range(10)]
        assert pings == [b"WATCHDOG=1"] * 10
        process.terminate()
        while (said := sock.recv(4096)) == b"WATCHDOG=1":
            pass
        assert said == b"STOPPING=1"
        assert process.wait(timeout=10) == 0
    finally:
        stop(process)


def test_heater_off_switches_the_heater_off_and_exits_0_or_1_if_it_cannot(recorder, tmp_path):
    run = [sys.executable, str(ROOT / "thermostat.py"), "--heater-off"]
    done = subprocess.run([*run, "--heater", f"command:{recorder.path}"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and recorder.words() == ["off"]
    failing = tmp_path / "jammed"
    failing.write_text("#!/bin/sh\necho relay jammed >&2\nexit 3\n")
    failing.chmod(0o755)
    done = subprocess.run([*run, "--heater", f"command:{failing}"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "the heater may be on" in done.stderr
    assert "relay jammed" in done.stderr


def test_heater_off_gives_a_command_power_heater_0(recorder):
    done = subprocess.run([sys.executable, str(ROOT / "thermostat.py"), "--heater-off", "--heater",
                           f"command-power:{recorder.path}"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and recorder.words() == ["0"], done.stderr


def unit_for(*options):
    done = subprocess.run([sys.executable, str(ROOT / "thermostat.py"), *options,
                           "--systemd-unit"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_systemd_unit_prints_a_notify_service_with_a_watchdog_and_the_heater_off_after_it():
    unit = unit_for("--heater", "command:/usr/bin/true", "--port", "7625")
    lines = unit.splitlines()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "After=time-sync.target"):
        assert line in lines
    program = f"{sys.executable} {ROOT / 'thermostat.py'}"
    assert f"ExecStart={program} --heater command:/usr/bin/true --port 7625" in lines
    assert f"ExecStopPost={program} --heater command:/usr/bin/true --heater-off" in lines


def test_systemd_analyze_verify_finds_nothing_wrong_with_the_printed_unit(tmp_path):
    unit = tmp_path / "thermostat-test.service"
    unit.write_text(unit_for("--heater", "command:/usr/bin/true", "--host", "0.0.0.0"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    said = [line for line in (done.stdout + done.stderr).splitlines() if unit.name in line]
    assert done.returncode == 0 and said == []


# -- 4: nothing blocks the control loop ---------------------------------------------------


def run(*argv):
    subprocess.run([str(word) for word in argv], check=True, capture_output=True, timeout=60)


def rows_on_disk(folder):
    "The rows in the log files on disk; a file finished (its .part renamed) while counted: counted again."
    while True:
        try:
            return sum(len(path.read_text().splitlines()) - 1 for path in folder.glob("*.csv*"))
        except FileNotFoundError:
            continue


@pytest.fixture
def freezable_disk(tmp_path):
    """A small loop-mounted ext4 file system (the suite runs as root): yields
    (its folder, freeze, thaw); always thawed and unmounted afterwards."""
    image, folder = tmp_path / "disk.img", tmp_path / "disk"
    folder.mkdir()
    run("truncate", "-s", "16M", image)
    run("mkfs.ext4", "-q", "-F", image)
    run("mount", "-o", "loop", image, folder)
    frozen = []

    def freeze():
        run("fsfreeze", "--freeze", folder)
        frozen.append(True)

    def thaw():
        if frozen:
            run("fsfreeze", "--unfreeze", folder)
            frozen.clear()

    try:
        yield folder, freeze, thaw
    finally:
        thaw()
        subprocess.run(["umount", str(folder)], check=False, capture_output=True, timeout=60)
        if os.path.ismount(folder):
            run("umount", "-l", folder)


def test_a_disk_that_stops_answering_holds_up_neither_the_limits_nor_the_clients(
        recorder, freezable_disk):
    disk, freeze, thaw = freezable_disk
    process, port = serve(recorder, *sensor(recorder), "--target", "25", "--max-heater-on", "3",
                          "--log-dir", disk / "logs", "--config", disk / "config.xml")
    try:
        client = watch(port)
        client.send('<newSwitchVector device="Thermostat" name="switchvector">'
                    '<oneSwitch name="switchmember">On</oneSwitch></newSwitchVector>')
        client.expect(named("switchvector", state="Ok"))
        wait_until(lambda: recorder.last_is("on"), what="the heater on")
        count = len(recorder.words()) - 1
        rows_before = rows_on_disk(disk / "logs")
        freeze()
        frozen_at = time.monotonic()
        try:
            asked = time.monotonic()
            client.send(new_number("Thermostat", "targetvector", "target", 26))  # saved: it hangs
            client.expect(named("targetvector", state="Busy"), timeout=2)
            answered = time.monotonic() - asked
            wait_until(lambda: recorder.last_is("off", count + 1), timeout=8,
                       what="the heater off at its limit")
            while time.monotonic() - frozen_at < 10:  # readings go on, all through the freeze
                client.expect(named("temperaturevector", state="Ok"), timeout=1)
        finally:
            thaw()
        seconds = on_time(recorder, count)
        print(f"heater on {seconds:.3f} s against a 3 s limit with the disk frozen 10 s; "
              f"a client answered in {answered:.3f} s during it")
        assert 2.9 < seconds < 4
        # 200 readings came during the freeze: they reach the disk once it answers
        wait_until(lambda: rows_on_disk(disk / "logs") > rows_before + 150, timeout=10,
                   what="the rows written once the disk answers")
        client.close()
    finally:
        said = stop(process)
    assert said.count("has not returned within") == 1  # the stall said once
    assert "writing log files to" in said and "has returned" in said
    assert "no answer from the disk" in said  # the configuration file's write


def test_a_heater_whose_on_failed_may_be_heating_and_is_checked_on_the_safety_schedule():
    """A switch on that failed (a smart plug that switched but did not answer in
    time) leaves the heater's state unknown, perhaps on: until it is known off,
    the sensor is read (and the off tried again) every safety_check seconds,
    not only at the next poll, which a client may set 10 minutes away."""
    now = [100.0]
    model = thermostat.ThermalControl(target=30)
    model.heater_switched(True, datetime.now(thermostat.timezone.utc),
                          error=TimeoutError("no answer within 2 s"), clock=now[0])
    model.heater_switched(False, datetime.now(thermostat.timezone.utc),
                          error=OSError("the plug is offline"), clock=now[0])
    assert not model.heater_on and not model.known_off  # it may be on
    schedule = thermostat.SafetySchedule(model, lambda: now[0], lambda: True, safety_check=5)
    schedule.last_read = now[0]
    assert schedule.delay() <= 5
    now[0] += 5
    assert schedule.read_due()
