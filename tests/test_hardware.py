"""The thermostat on real hardware, faked: a 1-wire directory whose temperature
file the test writes, and a heater command that records what it was told.
Regulation, every way a sensor or heater fails (heater off, Alert, a message
that says why) and recovers, both limits, SAFETY_STATUS, and the heater
switched off at every kind of stop."""

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import thermostat
from conftest import FAST, ROOT, free_port, instant_poll, new_number, wait_for_port

HEATER_SCRIPT = """#!/bin/sh
# records what it was told; fails to switch on while heater-fails exists, hangs while heater-hangs does
cd "$(dirname "$0")"
[ -e heater-hangs ] && exec sleep 30
[ "$1" = on ] && [ -e heater-slow-on ] && { touch switching-on; sleep "$(cat heater-slow-on)"; }
[ "$1" = on ] && [ -e heater-daemon ] && { setsid sleep 30 & echo $! >> daemon.pids; }
if [ "$1" = on ] && [ -e heater-fails ]; then echo "on FAILED" >> heater.log; echo "relay jammed" >&2; exit 3; fi
if [ "$1" = off ] && [ -e heater-fails-off ]; then echo "off FAILED" >> heater.log; echo "relay jammed" >&2; exit 3; fi
echo "$1" >> heater.log
"""


class Rig:
    "A fake DS18B20 directory and a recording heater command in a folder of their own."

    def __init__(self, folder):
        self.folder = folder
        self.w1 = folder / "28-0316a2796bff"
        self.w1.mkdir()
        self.heater = folder / "heater"
        self.heater.write_text(HEATER_SCRIPT)
        self.heater.chmod(0o755)
        self.log = folder / "heater.log"
        self.write("21500")

    def write(self, text):
        "Replace the sensor's temperature file at once, as the kernel presents a whole reading."
        partial = self.w1 / "temperature.new"
        partial.write_text(f"{text}\n")
        os.replace(partial, self.w1 / "temperature")

    def flag(self, name, present=True):
        path = self.folder / name
        path.touch() if present else path.unlink()

    def told(self):
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_told(self, last, after=0, timeout=10.0):
        "Wait until the heater's last command is `last`, with more than `after` commands in all."
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            told = self.told()
            if len(told) > after and told[-1] == last:
                return told
            time.sleep(0.02)
        raise AssertionError(f"the heater was never last told {last!r}: {self.told()}")

    def options(self, *more):
        return ["--sensor", f"w1:{self.w1}", "--heater", f"command:{self.heater}",
                "--hardware-timeout", "0.5", *more]


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


def setvector(name, state=None, message=None):
    "A condition on a set*Vector: its name, and optionally its state and words in its message."
    def match(element):
        return (element.tag.startswith("set") and element.get("name") == name
                and (state is None or element.get("state") == state)
                and (message is None or message in (element.get("message") or "")))
    return match


def members(element):
    return {one.get("name"): one.text.strip() for one in element}


def watch(server):
    client = server.client()
    client.send('<getProperties version="1.7"/>')
    return client


def expect_safety(client, state, **lights):
    "Wait for SAFETY_STATUS in state with these lights (the others Ok)."
    wanted = {"SAFETY": state, "SENSOR": "Ok", "HEATER": "Ok", "LIMITS": "Ok", "EFFECTIVE": "Ok",
              "WEATHER": "Ok", **lights}
    return client.expect(lambda e: setvector("SAFETY_STATUS", state)(e) and members(e) == wanted,
                         what=f"SAFETY_STATUS {state} {wanted}")


def heating(rig, served, *options, target=25):
    "A served thermostat reading 21.5 with a target above it: the heater on, all Ok."
    server = served(*rig.options("--target", str(target), *options))
    client = watch(server)
    client.expect(lambda e: setvector("temperaturevector", "Ok")(e) and members(e)["temperature"] == "21.50")
    client.expect(lambda e: setvector("heatervector")(e) and members(e)["heater"] == "Busy")
    expect_safety(client, "Ok")
    assert rig.wait_told("on")[:2] == ["off", "on"]     # off at start, then on by regulation
    return server, client


def test_regulates_on_real_readings(rig, served):
    server, client = heating(rig, served)
    rig.write("26000")                                  # above target + 0.5
    client.expect(lambda e: setvector("temperaturevector", "Ok")(e) and members(e)["temperature"] == "26.00")
    # off at the first poll past the relay's minimum on time (CONTROL_CYCLE), which may be the next one
    client.expect(lambda e: setvector("heatervector")(e) and members(e)["heater"] == "Idle")
    client.send('<getProperties version="1.7" device="Thermostat" name="heatervector"/>')
    shown = client.expect(lambda e: e.tag == "defLightVector" and e.get("name") == "heatervector")
    assert members(shown)["heater"] == "Idle"
    assert rig.wait_told("off", after=2) == ["off", "on", "off"]
    rig.write("24400")                                  # below target - 0.5
    assert rig.wait_told("on", after=3) == ["off", "on", "off", "on"]


def test_a_command_sensor_regulates_too(rig, served, tmp_path):
    (tmp_path / "reading").write_text("21.5\n")
    server = served("--sensor", f"command:cat {tmp_path / 'reading'}", "--heater", f"command:{rig.heater}",
                    "--target", "25")
    client = watch(server)
    client.expect(lambda e: setvector("temperaturevector", "Ok")(e) and members(e)["temperature"] == "21.50")
    rig.wait_told("on")
    (tmp_path / "reading").write_text("forty\n")
    alert = client.expect(setvector("temperaturevector", "Alert", f"[ERROR] sensor: the output of cat "
                                                                   f"{tmp_path / 'reading'}"))
    assert "'forty'" in alert.get("message")
    rig.wait_told("off", after=2)


def fifo_without_writer(rig):
    "A temperature file whose read blocks, as a hung 1-wire bus does; returns a function that unblocks it."
    path = rig.w1 / "temperature"
    path.unlink()
    os.mkfifo(path)

    def release():
        with open(path, "w") as writer:        # the blocked read gets a good reading
            writer.write("21500\n")
        rig.write("21500")                      # and later reads a plain file again
    return release


@pytest.mark.parametrize("fault, why", [
    ("missing", "No such file or directory"),
    ("", "is empty"),
    ("garbage", "'garbage'"),          # parse_number's words name the value received
    ("85000", "reads 85000, the DS18B20's power-on value, not a temperature"),
    ("130000", "'130000'"),
    ("-60000", "'-60000'"),
    ("hung", "no reading within 0.5 s"),
])
def test_a_failing_sensor_turns_the_heater_off_says_why_and_recovers(rig, served, fault, why):
    server, client = heating(rig, served)
    release = None
    if fault == "missing":
        (rig.w1 / "temperature").unlink()
    elif fault == "hung":
        release = fifo_without_writer(rig)
    else:
        rig.write(fault)
    alert = client.expect(setvector("temperaturevector", "Alert"), what="the temperature in Alert")
    assert alert.get("message").startswith("[ERROR] sensor: ") and why in alert.get("message")
    assert members(alert)["temperature"] == "21.50", "the last good reading stays shown"
    expect_safety(client, "Alert", SENSOR="Alert")
    assert rig.wait_told("off", after=2) == ["off", "on", "off"]
    # every poll while it lasts says Alert, without repeating the message
    again = client.expect(setvector("temperaturevector", "Alert"))
    assert again.get("message") is None
    # good readings return: regulation resumes by itself
    release() if release else rig.write("21500")
    back = client.expect(setvector("temperaturevector", "Ok"), what="the temperature Ok again")
    assert "." in back.get("timestamp"), "exact, as the log's row for the same reading"
    said = client.expect(lambda e: e.tag == "message" and "the sensor reads again: 21.50" in e.get("message", ""))
    assert said.get("message").startswith("[INFO] ")
    expect_safety(client, "Ok")
    assert rig.wait_told("on", after=3) == ["off", "on", "off", "on"]


def test_a_stuck_sensor_turns_the_heater_off_until_the_reading_moves(rig, served):
    server, client = heating(rig, served, "--stuck-after", "0.5")
    alert = client.expect(setvector("temperaturevector", "Alert"), what="stuck")
    assert alert.get("message") == ("[ERROR] sensor: stuck: it read 21.5 for 0.5 s while the heater was on; "
                                    "the heater is off until good readings return")
    expect_safety(client, "Alert", SENSOR="Alert")
    rig.wait_told("off", after=2)
    client.expect(setvector("temperaturevector", "Alert"))     # two more polls: the same value
    client.expect(setvector("temperaturevector", "Alert"))     # stays refused, heater off or not
    assert rig.told() == ["off", "on", "off"]
    rig.write("21600")
    client.expect(setvector("temperaturevector", "Ok"))
    client.expect(lambda e: e.tag == "message" and "the sensor reads again: 21.60" in e.get("message", ""))
    rig.wait_told("on", after=3)


def test_a_failing_heater_command_is_reported_and_the_heater_switched_off(rig, served):
    rig.write("26000")
    server = served(*rig.options("--target", "25"))
    client = watch(server)
    expect_safety(client, "Ok")
    rig.flag("heater-fails")
    rig.write("21500")
    alert = client.expect(setvector("heatervector", "Alert"), what="the heater in Alert")
    assert alert.get("message") == (f"[ERROR] heater: switching it on failed: {rig.heater} on exited with "
                                    f"status 3: relay jammed")
    assert members(alert)["heater"] == "Alert"
    expect_safety(client, "Alert", HEATER="Alert")
    assert rig.wait_told("off", after=2)[:3] == ["off", "on FAILED", "off"]   # a failed on, then off
    rig.flag("heater-fails", present=False)
    back = client.expect(setvector("heatervector", message="the heater switches again"))
    assert members(back)["heater"] == "Busy" and back.get("state") == "Busy"   # the vector as its light
    expect_safety(client, "Ok")
    assert rig.wait_told("on")[-1] == "on"


def test_a_hung_heater_command_times_out_and_is_reported(rig, served):
    server, client = heating(rig, served)
    rig.flag("heater-hangs")
    rig.write("26000")                                  # regulation asks for off: the command hangs
    alert = client.expect(setvector("heatervector", "Alert"), what="the heater in Alert")
    assert alert.get("message").startswith("[ERROR] heater: switching it off failed: ")
    assert "0.5 s" in alert.get("message")
    expect_safety(client, "Alert", HEATER="Alert")
    rig.flag("heater-hangs", present=False)
    client.expect(setvector("heatervector", message="the heater switches again"))
    expect_safety(client, "Ok")
    rig.wait_told("off", after=2)


def test_a_heater_command_that_leaves_a_process_holding_its_output_does_not_block_the_next_switch(rig, served):
    rig.flag("heater-daemon")               # its "on" starts a process that keeps the command's output open
    server = served(*rig.options("--target", "25"))
    try:
        deadline = time.monotonic() + 10
        while len(rig.told()) < 3:
            assert time.monotonic() < deadline, f"the heater was told nothing after {rig.told()}"
            time.sleep(0.02)
        assert rig.told()[:3] == ["off", "on", "off"]      # the on counted as failed, then off at once
    finally:
        server.stop()
        for pid in (rig.folder / "daemon.pids").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_the_maximum_temperature_holds_whatever_the_target(rig, served):
    server, client = heating(rig, served, "--max-temperature", "30", target=40)
    rig.write("30100")
    warning = expect_safety(client, "Busy", LIMITS="Busy")
    assert warning.get("message") == ("[WARNING] the temperature is above the maximum 30: "
                                      "the heater stays off until it is 0.5 below it")
    assert rig.wait_told("off", after=2) == ["off", "on", "off"]
    rig.write("29600")                                  # not yet 0.5 below: still off
    client.expect(lambda e: setvector("temperaturevector")(e) and members(e)["temperature"] == "29.60")
    client.expect(setvector("temperaturevector"))
    assert rig.told() == ["off", "on", "off"]
    rig.write("29500")
    assert expect_safety(client, "Ok").get("message").endswith("the heater is within its limits again")
    rig.wait_told("on", after=3)
    # the property: a client lowers the limit below the temperature
    client.send(new_number("Thermostat", thermostat.SAFETY_LIMITS, "maxtemperature", "25"))
    answer = client.expect(setvector(thermostat.SAFETY_LIMITS), what="the limits answered")
    assert answer.get("state") == "Ok" and members(answer)["maxtemperature"] == "25.00"
    expect_safety(client, "Busy", LIMITS="Busy")
    rig.wait_told("off", after=4)
    client.send(new_number("Thermostat", thermostat.SAFETY_LIMITS, "maxtemperature", "120"))
    refused = client.expect(setvector(thermostat.SAFETY_LIMITS), what="the limits answered")
    assert refused.get("state") == "Alert" and "'120'" in refused.get("message")
    assert members(refused)["maxtemperature"] == "25.00"


def test_the_heater_on_time_alarm_latches_until_a_new_target(rig, served):
    server, client = heating(rig, served, "--max-heater-on", "1")
    alarm = expect_safety(client, "Alert", LIMITS="Alert")
    assert alarm.get("message").startswith("[ERROR] the heater ran 1 s without a break: it stays off until ")
    assert rig.wait_told("off", after=2) == ["off", "on", "off"]
    rig.write("21400")                                  # still cold: the alarm holds
    client.expect(lambda e: setvector("temperaturevector")(e) and members(e)["temperature"] == "21.40")
    client.expect(setvector("temperaturevector"))
    assert rig.told() == ["off", "on", "off"]
    client.send(new_number("Thermostat", "targetvector", "target", "25"))      # a person acknowledges
    assert expect_safety(client, "Ok").get("message").endswith("the heater is within its limits again")
    rig.wait_told("on", after=3)
    expect_safety(client, "Alert", LIMITS="Alert")      # and it trips again a second later
    rig.wait_told("off", after=4)
    rig.write("25000")                                  # back within the band on its own: re-armed
    expect_safety(client, "Ok")


def test_the_heater_on_time_is_a_saved_limit_clients_can_change(rig, served):
    server, client = heating(rig, served)
    client.send(new_number("Thermostat", thermostat.SAFETY_LIMITS, "maxheateron", "1"))
    answer = client.expect(setvector(thermostat.SAFETY_LIMITS, "Ok"))
    assert members(answer) == {"maxtemperature": "50.00", "maxheateron": "1"}
    expect_safety(client, "Alert", LIMITS="Alert")
    rig.wait_told("off", after=2)


def test_indi_eval_waits_for_a_safety_alert(rig, served):
    server, client = heating(rig, served)
    waiting = subprocess.Popen(["indi_eval", "-p", str(server.port), "-w", "-t", "20",
                                '"Thermostat.SAFETY_STATUS._STATE"==3'], stderr=subprocess.DEVNULL)
    client.expect(setvector("temperaturevector"))       # indi_eval has had time to read Ok at least once
    client.expect(setvector("temperaturevector"))
    assert waiting.poll() is None, "indi_eval must wait while all is Ok"
    rig.write("garbage")
    assert waiting.wait(timeout=20) == 0


def test_disconnect_switches_the_heater_off_and_safety_goes_idle(rig, served):
    server, client = heating(rig, served)
    client.send('<newSwitchVector device="Thermostat" name="CONNECTION">'
                '<oneSwitch name="CONNECT">Off</oneSwitch><oneSwitch name="DISCONNECT">On</oneSwitch>'
                '</newSwitchVector>')
    client.expect(setvector("SAFETY_STATUS", "Idle"))
    rig.wait_told("off", after=2)
    client.send('<newSwitchVector device="Thermostat" name="CONNECTION">'
                '<oneSwitch name="CONNECT">On</oneSwitch><oneSwitch name="DISCONNECT">Off</oneSwitch>'
                '</newSwitchVector>')
    expect_safety(client, "Ok")
    rig.wait_told("on", after=3)


def test_a_disconnect_whose_off_fails_shows_the_heater_alert_and_tries_again(rig, served):
    server, client = heating(rig, served)
    rig.flag("heater-fails-off")
    client.send('<newSwitchVector device="Thermostat" name="CONNECTION">'
                '<oneSwitch name="CONNECT">Off</oneSwitch><oneSwitch name="DISCONNECT">On</oneSwitch>'
                '</newSwitchVector>')
    alert = client.expect(setvector("SAFETY_STATUS", "Alert"), what="SAFETY_STATUS in Alert")
    assert members(alert) == {"SAFETY": "Alert", "SENSOR": "Idle", "HEATER": "Alert", "LIMITS": "Idle",
                              "EFFECTIVE": "Idle", "WEATHER": "Idle"}
    rig.wait_told("off FAILED", after=3)                # tried again while disconnected
    rig.flag("heater-fails-off", present=False)
    client.expect(setvector("SAFETY_STATUS", "Idle"), what="SAFETY_STATUS Idle once the heater is off")
    assert rig.told()[-1] == "off"
    client.send('<getProperties version="1.7" device="Thermostat" name="heatervector"/>')
    shown = client.expect(lambda e: e.tag == "defLightVector" and e.get("name") == "heatervector")
    assert members(shown)["heater"] == "Idle"


def test_a_disconnect_while_the_heater_switches_on_leaves_it_off(rig, served):
    (rig.folder / "heater-slow-on").write_text("0.6\n")
    server = served(*rig.options("--target", "25", "--hardware-timeout", "2"))
    client = watch(server)
    deadline = time.monotonic() + 10
    while not (rig.folder / "switching-on").exists():
        assert time.monotonic() < deadline, "the heater was never switched on"
        time.sleep(0.01)
    assert rig.told() == ["off"]                        # the on is under way: disconnect now
    client.send('<newSwitchVector device="Thermostat" name="CONNECTION">'
                '<oneSwitch name="CONNECT">Off</oneSwitch><oneSwitch name="DISCONNECT">On</oneSwitch>'
                '</newSwitchVector>')
    client.expect(setvector("SAFETY_STATUS", "Idle"))
    assert rig.wait_told("off", after=2) == ["off", "on", "off"]     # the off after the on, not before
    client.send('<getProperties version="1.7" device="Thermostat" name="heatervector"/>')
    shown = client.expect(lambda e: e.tag == "defLightVector" and e.get("name") == "heatervector")
    assert members(shown)["heater"] == "Idle"


# -- the model alone: time passed in, nothing sleeps -----------------------

START = thermostat.datetime(2026, 1, 1, tzinfo=thermostat.timezone.utc)


class Bench:
    "A sensor that reads what the test says, and a heater that records; both instant."
    instant = True
    valid_range = thermostat.SENSOR_RANGE

    def __init__(self, value):
        self.value, self.told = value, []

    def read(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value

    def switch(self, on):
        self.told.append(on)


class OnBench:
    "A model with its hardware (a bench, or a heater with the simulated sensor), polled as the driver does."

    def __init__(self, sensor, heater, log=None, **limits):
        simulated = isinstance(sensor, thermostat.Simulator)
        self.model = thermostat.ThermalControl(
            temperature=sensor.temperature if simulated else math.nan, target=25,
            valid_range=getattr(sensor, "valid_range", None), **limits)
        self.hardware = thermostat.Hardware(sensor, heater)
        self.log = log

    def step(self, now):
        return instant_poll(self.model, self.hardware, now, self.log)


def control_on_bench(value=21.5, **limits):
    bench = Bench(value)
    return bench, OnBench(bench, bench, **limits)


def at(seconds):
    return START + thermostat.timedelta(seconds=seconds)


def test_stuck_means_the_same_value_for_stuck_after_seconds_of_heating():
    bench, control = control_on_bench(stuck_after=600)
    control.step(at(0))
    assert bench.told == [True]
    assert control.step(at(599)).safety.sensor is None
    stuck = control.step(at(600))
    assert stuck.safety.sensor == "stuck: it read 21.5 for 600 s while the heater was on"
    assert bench.told == [True, False] and not stuck.in_band
    assert control.step(at(5000)).safety.sensor, "still the same value: still stuck, heater off or not"
    bench.value = 21.5625
    assert control.step(at(5010)).safety.sensor is None and bench.told[-1] is True


def test_the_same_value_with_the_heater_off_is_not_stuck():
    bench, control = control_on_bench(value=30.0, stuck_after=600)
    for seconds in range(0, 3600, 60):
        assert control.step(at(seconds)).safety.sensor is None
    assert bench.told == []


def test_the_simulated_sensor_warms_with_a_real_heater():
    heater, box_s = Bench(None), [0.0]
    box = thermostat.Simulator(time_constant_s=10, clock=lambda: box_s[0])    # a fast box on the test's time
    control = OnBench(box, heater)                          # the sensor simulated
    readings = []
    for seconds in range(4):
        box_s[0] = seconds
        readings.append(control.step(at(seconds)).temperature)
    assert heater.told == [True]
    assert readings == sorted(readings) and readings[-1] > readings[0]


def test_refused_readings_are_not_logged_and_the_last_good_value_is_kept():
    bench, control = control_on_bench()
    log = control.log = thermostat.TemperatureLog()
    log.start(START)
    control.step(at(0))
    bench.value = OSError("bus error")
    reading = control.step(at(10))
    assert reading.temperature == 21.5 and reading.safety.sensor == "bus error"
    assert not reading.heater_on and bench.told == [True, False]
    log.stop()
    (logfile,) = log.backlog
    assert len(logfile.rows) == 1


def test_the_on_time_alarm_trips_at_max_heater_on_and_rearms_in_band_or_on_a_new_target():
    bench, control = control_on_bench(max_heater_on=3600, stuck_after=86400)
    control.step(at(0))
    assert control.step(at(3599)).heater_on
    alarm = control.step(at(3600))
    assert not alarm.heater_on and alarm.safety.alarm and alarm.safety.lights()["LIMITS"] == "Alert"
    assert not control.step(at(7200)).heater_on, "latched"
    control.model.rearm()
    assert control.step(at(7210)).heater_on
    control.step(at(10810))
    assert control.model.on_time_alarm
    bench.value = 25.0                                   # within the band: re-armed
    assert control.step(at(10820)).safety == thermostat.Safety()


def test_a_failed_switch_on_is_followed_at_once_by_a_switch_off():
    class Jammed(Bench):
        def switch(self, on):
            self.told.append(on)
            if on:
                raise RuntimeError("relay jammed")
    bench = Jammed(21.5)
    control = OnBench(bench, bench)
    reading = control.step(at(0))
    assert bench.told == [True, False] and not reading.heater_on
    assert reading.safety.heater == "switching it on failed: relay jammed"
    assert reading.safety.lights() == {"SAFETY": "Alert", "SENSOR": "Ok", "HEATER": "Alert", "LIMITS": "Ok",
                                       "EFFECTIVE": "Ok", "WEATHER": "Ok"}


# -- the heater is switched off at every kind of stop ----------------------

class QuietLink:
    "A driver's link to a server that takes everything and says nothing."

    async def run_tx(self, xmldata):
        pass

    def shutdown(self):
        pass


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_switches_the_heater_off(rig, served, signum):
    server, client = heating(rig, served)
    server.process.send_signal(signum)
    assert server.process.wait(timeout=5) == 0
    assert rig.told() == ["off", "on", "off"]


def test_a_stop_whose_off_fails_tries_again_and_exits_with_status_1(rig, served):
    server, client = heating(rig, served)
    rig.flag("heater-fails-off")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=5) == 1
    assert rig.told()[:4] == ["off", "on", "off FAILED", "off FAILED"]
    assert "at stop the heater may still be on" in server.stderr_text()
    # the driver gone without its clean-stop word, the heater guard tries its own off, twice
    assert rig.wait_told("off FAILED", after=5) == ["off", "on", *["off FAILED"] * 4]


def test_end_of_input_under_stdio_switches_the_heater_off(rig):
    driver = subprocess.Popen([sys.executable, str(ROOT / "thermostat.py"), "--stdio", *FAST,
                               *rig.options("--target", "25")],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rig.wait_told("on")
        driver.stdin.close()
        assert driver.wait(timeout=5) == 0
    finally:
        driver.kill()
        driver.wait()
    assert rig.told() == ["off", "on", "off"]


def test_indi_thermostat_under_indiserver_switches_the_heater_off_when_indiserver_stops(rig, tmp_path):
    wrapper = tmp_path / "indi_thermostat_w1"    # indiserver passes no options: a wrapper gives them
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('indi_thermostat')} --poll-interval 0.05 "
                       f"{' '.join(rig.options('--target', '25'))}\n")
    wrapper.chmod(0o755)
    port = free_port()
    server = subprocess.Popen(["indiserver", "-p", str(port), "-u", str(tmp_path / "indiserver.sock"),
                               str(wrapper)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process=server)
        rig.wait_told("on")
    finally:
        server.terminate()
        server.wait(timeout=5)
    assert rig.wait_told("off", after=2) == ["off", "on", "off"]


def test_an_error_that_ends_the_driver_switches_the_heater_off_first():
    "A Python integrator's sensor and heater objects, and a link that fails while the heater is on."
    told = []

    class Sensor:
        def read(self):
            return 21.5

    class Heater:
        def switch(self, on):
            told.append("on" if on else "off")

    class FailingLink:
        async def run_rx(self):
            while told[-1:] != ["on"]:
                await asyncio.sleep(0.01)
            raise RuntimeError("the link failed")

        async def run_tx(self, xmldata):
            pass

        def shutdown(self):
            pass

    driver = thermostat.make_driver(target=25, poll_interval=0.02, sensor=Sensor(), heater=Heater())
    driver._commsobj = FailingLink()

    async def run():
        with pytest.raises(ExceptionGroup):
            await asyncio.wait_for(driver.asyncrun(), 10)
    asyncio.run(run())
    assert told == ["off", "on", "off"]



def test_a_stop_as_a_switch_completes_is_not_lost(monkeypatch):
    """The driver's task cancelled just after its heater switch has answered,
    before the task resumes (a link failing as the heater comes on): the
    cancellation goes on, where Python 3.11's wait_for returned the switch's
    result and dropped it, so the control loop ran on, the heater on, and
    the driver never ended."""
    class Sensor:
        def read(self):
            return 21.5

    class Heater:
        def switch(self, on):
            pass

    async def scenario():
        loop = asyncio.get_running_loop()
        answered = loop.create_future()      # the switch's worker thread, answering on cue
        monkeypatch.setattr(thermostat, "in_thread", lambda function, *args: answered)
        model = thermostat.ThermalControl()
        switching = asyncio.create_task(thermostat.Hardware(Sensor(), Heater()).switch(model, True))
        await asyncio.sleep(0)               # the switch waits for its answer
        loop.call_soon(answered.set_result, None)
        loop.call_soon(switching.cancel)     # after the answer, before the task resumes
        with pytest.raises(asyncio.CancelledError):
            await switching
        return model

    model = asyncio.run(scenario())
    assert model.heater_on                   # the switch was made: it is recorded all the same


def test_a_slow_sensor_is_read_off_the_event_loop():
    "Its read() waits for the event loop to act: read on the loop's own thread, it would never get there."
    started, released = threading.Event(), threading.Event()

    class SlowSensor:
        def read(self):
            started.set()
            if not released.wait(5):
                raise TimeoutError("the event loop was blocked")
            return 21.5

    driver = thermostat.make_driver(target=25, poll_interval=0.02, sensor=SlowSensor(), hardware_timeout=10)
    sent = []

    class Link:
        async def run_tx(self, xmldata):
            sent.append(xmldata)

        def shutdown(self):
            pass
    driver._commsobj = Link()

    def temperatures():
        return [(e.get("state"), e[0].text.strip()) for e in sent if e.get("name") == "temperaturevector"]

    async def run():
        hardware = asyncio.create_task(driver.hardware())
        while not started.is_set():
            await asyncio.sleep(0.01)
        released.set()                              # only the event loop can do this
        async with asyncio.timeout(10):
            while not temperatures():
                await asyncio.sleep(0.01)
        driver.shutdown()
        await asyncio.wait_for(hardware, 10)
    asyncio.run(run())
    assert temperatures()[0] == ("Ok", "21.50")
    assert driver.thermostat.heater_on is False, "the simulated heater was switched off at stop"


def test_a_hung_sensor_holds_up_neither_shutdown_nor_the_heater_off():
    hung = threading.Event()
    told = []

    class HungSensor:
        def read(self):
            hung.set()
            threading.Event().wait()        # never returns (a daemon thread: it does not hold up the exit)

    class Heater:
        instant = True

        def switch(self, on):
            told.append(on)

    driver = thermostat.make_driver(poll_interval=0.02, sensor=HungSensor(), heater=Heater(),
                                    hardware_timeout=60)

    driver._commsobj = QuietLink()

    async def run():
        hardware = asyncio.create_task(driver.hardware())
        while not hung.is_set():
            await asyncio.sleep(0.01)
        driver.shutdown()
        await asyncio.wait_for(hardware, 5)         # not the 60 s of the sensor's timeout
    asyncio.run(run())
    assert told == [False, False]                   # off at start, off at stop


def test_a_stop_that_cuts_short_a_switch_on_switches_the_heater_off_after_it():
    switching_on, told = threading.Event(), []

    class SlowRelay:
        def switch(self, on):
            if on:
                switching_on.set()
                time.sleep(0.3)             # still under way when the driver is cancelled
            told.append(on)

    driver = thermostat.make_driver(poll_interval=0.02, target=30, heater=SlowRelay(), hardware_timeout=5)

    driver._commsobj = QuietLink()

    async def run():
        hardware = asyncio.create_task(driver.hardware())
        while not switching_on.is_set():
            await asyncio.sleep(0.01)
        hardware.cancel()                   # as at the end of a shutdown that did not wait for the poll
        await asyncio.wait([hardware], timeout=5)
    asyncio.run(run())
    assert told == [False, True, False]     # off at start, the on, then the off after it


def test_an_on_whose_worker_thread_starts_late_does_not_land_after_the_off_at_stop(monkeypatch):
    """A switch on, cancelled by a stop while its worker thread has started but
    not yet taken its turn (the GIL or the scheduler held it back): the off at
    stop goes first, and the late on must not follow it, or the heater stays
    on with nothing in control of it (the guard is told it is off)."""
    told, go = [], threading.Event()
    real_in_thread = thermostat.in_thread

    class Relay:
        def switch(self, on):
            told.append(on)

    def late_in_thread(function, *args):  # the worker runs only once told to go
        return real_in_thread(lambda: go.wait(5) and function(*args))

    async def scenario():
        hardware = thermostat.Hardware(thermostat.Simulator(), Relay(), timeout=2)
        model = thermostat.ThermalControl()
        monkeypatch.setattr(thermostat, "in_thread", late_in_thread)
        switching = asyncio.create_task(hardware.switch(model, True))
        await asyncio.sleep(0)  # the on's thread is started, not yet in its turn
        switching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await switching
        assert hardware.switch_off_at_stop(model) is None
        go.set()
        await asyncio.wait([hardware._heater_switch], timeout=5)
        return model

    model = asyncio.run(scenario())
    assert told[-1] is False, f"the heater was told {told}: the on came after the off at stop"
    assert model.known_off


def test_a_poll_that_fails_on_an_error_switches_the_heater_off(monkeypatch):
    """An error in a poll after the heater came on (a regulation bug, an integrator's
    sensor returning what the checks do not expect): the heater is switched off,
    not left on, unregulated and past the maximum temperature, at every failed poll."""
    told = []

    class Sensor:
        def read(self):
            return 21.5

    class Relay:
        instant = True

        def switch(self, on):
            told.append(on)

    driver = thermostat.make_driver(target=30, poll_interval=0.01, sensor=Sensor(), heater=Relay())
    driver._commsobj = QuietLink()

    def broken_step(now_s, measured, target):
        raise RuntimeError("a bug in regulation")

    async def run():
        hardware = asyncio.create_task(driver.hardware())
        async with asyncio.timeout(2):
            while told[-1:] != [True]:
                await asyncio.sleep(0.01)
            monkeypatch.setattr(driver.thermostat.regulator, "step", broken_step)
            while told[-1:] == [True] and not hardware.done():
                await asyncio.sleep(0.01)
        driver.shutdown()
        await asyncio.wait_for(hardware, 2)

    asyncio.run(run())
    assert told[:3] == [False, True, False], f"the heater was told {told}"


def test_a_sensor_that_returns_a_huge_int_is_a_failed_read_not_an_error():
    model = thermostat.ThermalControl(target=30)
    reading = model.step(thermostat.datetime.now(thermostat.timezone.utc), 10**400, clock=0.0)
    assert reading.safety.sensor == "inf is not a temperature"
    assert model.heater_command() is None and not model.heater_wanted


def test_an_off_at_stop_that_a_hung_switch_may_land_after_is_not_called_a_success():
    """A switch on hung in its worker thread beyond the timeout at stop: the off
    is made, but the on may land after it, so the stop says the heater may be on
    (the guard then switches it off once the process ends) rather than that it is off."""
    entered, release, told = threading.Event(), threading.Event(), []

    class HungRelay:
        def switch(self, on):
            if on:
                entered.set()
                release.wait(5)
            told.append(on)

    async def scenario():
        hardware = thermostat.Hardware(thermostat.Simulator(), HungRelay(), timeout=0.2)
        model = thermostat.ThermalControl()
        switching = asyncio.create_task(hardware.switch(model, True))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        switching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await switching
        return model, hardware.switch_off_at_stop(model)

    try:
        model, error = asyncio.run(scenario())
    finally:
        release.set()
    assert isinstance(error, TimeoutError) and "may land after the off" in str(error)
    assert not model.known_off


def test_an_on_that_waited_for_the_switch_before_it_is_not_made_once_the_guard_died():
    """An on waits for the switch before it, still under way; meanwhile the
    guard dies. The on is not made: never on without the guard."""
    told = []

    class Relay:
        def switch(self, on):
            told.append(on)

    class Guard:
        said = None

        def problem(self):
            return self.said

    async def scenario():
        guard = Guard()
        hardware = thermostat.Hardware(thermostat.Simulator(), Relay(), timeout=2, guard=guard)
        model = thermostat.ThermalControl()
        before = hardware._heater_switch = asyncio.get_running_loop().create_future()
        switching = asyncio.create_task(hardware.switch(model, True))
        await asyncio.sleep(0)  # the on waits for the switch before it
        guard.said = "the heater guard was killed by SIGKILL"
        before.set_result(None)
        await asyncio.wait_for(switching, 2)
        if hardware._heater_switch is not before:
            await asyncio.wait([hardware._heater_switch], timeout=2)
        return model

    model = asyncio.run(scenario())
    assert told == [] and not model.heater_on and model.guard_fault


def test_a_disconnect_during_a_polls_first_switch_stops_its_second():
    told, offline, slow_off, in_slow_off = [], threading.Event(), threading.Event(), threading.Event()

    class Relay:
        def switch(self, on):
            if offline.is_set():
                raise OSError("the smart plug is offline")
            if not on and slow_off.is_set():
                in_slow_off.set()
                time.sleep(0.3)
            told.append(on)

    driver = thermostat.make_driver(poll_interval=0.05, target=30, heater=Relay(), hardware_timeout=2)
    driver._commsobj = QuietLink()
    disconnect = thermostat.ET.fromstring(
        '<newSwitchVector device="Thermostat" name="CONNECTION"><oneSwitch name="CONNECT">Off</oneSwitch>'
        '<oneSwitch name="DISCONNECT">On</oneSwitch></newSwitchVector>')

    async def run():
        hardware = asyncio.create_task(driver.hardware())
        offline.set()                       # both an on and the off after it fail: the state is unknown
        while driver.thermostat.heater_known:
            await asyncio.sleep(0.01)
        slow_off.set()
        offline.clear()                     # the next poll switches off first, then on as regulation wants
        while not in_slow_off.is_set():
            await asyncio.sleep(0.01)
        await thermostat.hand_to_driver(driver, disconnect)
        await asyncio.sleep(0.2)            # time for a second switch that must not come
        driver.shutdown()
        await asyncio.wait_for(hardware, 5)
    asyncio.run(run())
    assert True not in told and told[-1] is False


def test_new_limits_hold_at_once_not_at_the_next_poll():
    bench = Bench(30)
    driver = thermostat.make_driver(poll_interval=60, target=40, sensor=bench, heater=bench)
    driver._commsobj = QuietLink()

    def limit(maximum):
        return thermostat.ET.fromstring(new_number("Thermostat", "limitsvector", "maxtemperature", maximum))

    async def until(told):
        while bench.told != told:
            await asyncio.sleep(0.01)

    async def run():
        hardware = asyncio.create_task(driver.hardware())
        await thermostat.hand_to_driver(driver, limit("50"))
        await asyncio.wait_for(until([False, True]), 2)     # off at start, then on: 30 is below 40 and 50
        await thermostat.hand_to_driver(driver, limit("20"))
        await asyncio.wait_for(until([False, True, False]), 2)     # above the new maximum: off, now
        driver.shutdown()
        await asyncio.wait_for(hardware, 5)
    asyncio.run(run())


# -- the command line ------------------------------------------------------

def run(*options):
    return subprocess.run([sys.executable, str(ROOT / "thermostat.py"), *options],
                          capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize("options, words", [
    (["--sensor", "w1:/nowhere/28-0"], "argument --sensor: /nowhere/28-0 is not a directory"),
    (["--sensor", "thermocouple"], "'thermocouple' is not simulator[:TAU], w1:DIR, iio:DEVICE or command:CMD"),
    (["--sensor", "command:"], "'command:' is not simulator"),
    (["--heater", "gpio:gpiochip0"], "is not simulator, command:CMD, command-power:CMD, gpio:CHIP:LINE[:active-low] "
                                     "or pwm:CHIP:CHANNEL"),
    (["--heater", "relay"], "'relay' is not simulator"),
    (["--heater", "command:relay 'on"], "cannot split \"relay 'on\" into words: No closing quotation"),
    (["--max-temperature", "100"], "outside -50..99"),
    (["--max-heater-on", "0"], "outside 1..604800"),
    (["--hardware-timeout", "0"], "outside"),
])
def test_bad_hardware_options_are_one_clear_line(options, words):
    result = run(*options)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr


def test_help_explains_the_hardware_options():
    result = run("--help")
    for words in ("--sensor SPEC", "w1:DIR", "command:CMD", "gpio:CHIP:LINE[:active-low]", "--max-temperature T",
                  "--max-heater-on SECONDS", "--stuck-after SECONDS", "--hardware-timeout SECONDS"):
        assert words in result.stdout


def test_gpio_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gpiod", None)     # as when the gpio extra is not installed
    with pytest.raises(ValueError) as error:
        thermostat.make_heater("gpio:gpiochip0:17:active-low")
    assert str(error.value) == ("argument --heater: --heater gpio needs libgpiod's Python bindings: "
                                "pip install 'thermostat[gpio]' (or pip install gpiod)")


def test_the_heater_vectors_state_is_its_light():
    "KStars shows the vector's state beside the element's light: both Busy while heating, as seen in 3.6.2."
    driver = thermostat.make_driver(config=None)
    sent = []

    async def record(xmldata):
        sent.append(xmldata)
    driver.send = record
    heater = driver.device["heatervector"]
    for on, fault, light in ((True, None, "Busy"), (False, None, "Idle"), (False, "relay", "Alert")):
        asyncio.run(driver.publisher.publish_heater(on, fault))
        assert (heater["heater"], heater.state) == (light, light)
