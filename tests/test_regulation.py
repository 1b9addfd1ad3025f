"""The regulation (issue 20): the simulated box, the control modes, autotune,
relay minimums, both heater kinds, the ramp, the dew-point mode snooping a
weather device (libindi's own under indiserver, and one served beside the
thermostat), the heater-effectiveness alarm, and the fail-safe rules in
every mode. Plants are fast (seconds) so that runs through the driver are
short; the model's own tests run in simulated time."""

import asyncio
import math
import random
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from indipydriver import Device, IPyDriver, NumberMember, NumberVector

import thermostat
from conftest import free_port, new_number, new_switch, tagged, wait_for_port, wait_until
from thermostat import Simulator, ThermalControl

FAST_PLANT = dict(time_constant_s=2.0, heater_rise_k=20.0, ambient_c=5.0, sensor_lag_s=0.05)
# other constants than the defaults and than FAST_PLANT: autotune has never seen it
OTHER_PLANT = dict(time_constant_s=3.0, heater_rise_k=30.0, ambient_c=10.0, sensor_lag_s=0.1)
POLL = 0.02
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# -- the model, in simulated time ----------------------------------------------


def run_model(control, box, poll_s, duration_s, start_s=0.0, every=None):
    """Poll box into control every poll_s for duration_s, switching as it asks;
    return [(seconds, true temperature, power given)]. every(now_s) runs before each poll."""
    rows = []
    for k in range(round(duration_s / poll_s)):
        now_s = start_s + k * poll_s
        if every is not None:
            every(now_s)
        box.advance(now_s)
        now = T0 + timedelta(seconds=now_s)
        control.step(now, box.read())
        for _ in range(2):
            if (command := control.heater_command()) is None:
                break
            box.set_power(float(command))
            control.heater_switched(command, now)
        rows.append((now_s, box.temperature, control.heater_power))
    return rows


def switch_times(rows):
    "(seconds, on) of each change of an on/off heater."
    changes, on = [], False
    for now_s, _, power in rows:
        if (power > 0) != on:
            on = power > 0
            changes.append((now_s, on))
    return changes


def test_the_simulator_follows_the_same_trajectory_whatever_the_poll_interval():
    def trajectory(poll_s):
        box = Simulator(time_constant_s=60.0, sensor_lag_s=5.0, clock=None)
        seen = {}
        for k in range(round(600 / poll_s) + 1):
            now_s = k * poll_s
            box.advance(now_s)
            box.set_power(1.0 if now_s < 300 else 0.25)
            if now_s % 30 == 0:
                seen[now_s] = (box.temperature, box.read())
        return seen

    fine, coarse = trajectory(0.5), trajectory(10.0)
    assert fine.keys() == coarse.keys()
    for now_s in fine:
        assert fine[now_s] == pytest.approx(coarse[now_s], abs=1e-9)
    assert fine[600][0] == pytest.approx(-5 + 40 * 0.25, abs=0.25)  # near a quarter power's


def test_the_default_simulator_keeps_the_seed_s_feel_near_its_target():
    box = Simulator(15.0, clock=None)
    box.advance(0.0)
    box.advance(10.0)
    assert box.read() == pytest.approx(15 - 0.2, abs=0.005)  # 0.02 K/s cooling
    box.temperature = box.sensed = 15.0
    box.set_power(1.0)
    box.advance(20.0)
    assert box.read() == pytest.approx(15 + 0.2, abs=0.005)  # and 0.02 K/s warming
    assert Simulator().read() == 20.0


def test_hysteresis_holds_an_on_off_heater_about_the_band():
    control = ThermalControl(target=15.0, temperature=5.0)
    box = Simulator(5.0, clock=None, **FAST_PLANT)
    rows = run_model(control, box, 0.1, 60.0)
    steady = [t for s, t, _ in rows if s > 20]
    assert max(steady) < 15.5 + 0.6 and min(steady) > 14.5 - 0.6  # the band, and the lag's overshoot
    assert len(switch_times(rows)) > 10
    assert {power for _, _, power in rows} == {0.0, 1.0}


def tuned_gains(plant, proportional, target, poll_s=0.02):
    regulator = thermostat.Regulator(proportional=proportional)
    box = Simulator(plant["ambient_c"], clock=None, **plant)
    regulator.start_autotune(0.0, target, 50.0)
    k = 0
    while regulator.autotune.running:
        box.advance(k * poll_s)
        box.set_power(regulator.step(k * poll_s, box.read(), target))
        k += 1
    assert regulator.autotune.state == "done", regulator.autotune.reason
    return regulator.pid.gains


def test_pid_holds_a_proportional_heater_at_the_target_after_autotune():
    control = ThermalControl(target=15.0, temperature=5.0, proportional=True)
    control.regulator.set_gains(*tuned_gains(FAST_PLANT, True, 15.0))
    control.regulator.mode = "PID"
    rows = run_model(control, Simulator(5.0, clock=None, **FAST_PLANT), 0.02, 40.0)
    steady = [t - 15.0 for s, t, _ in rows if s > 20]
    assert math.sqrt(sum(e * e for e in steady) / len(steady)) < 0.02
    assert max(t for _, t, _ in rows) < 15.2  # the step from ambient overshoots little
    assert any(0.1 < power < 0.9 for _, _, power in rows[-100:])  # a power, not on/off


@pytest.mark.parametrize("duty", [0.2, 0.5, 0.8])
def test_pid_through_time_proportioning_holds_the_mean_of_an_on_off_heater(duty):
    target = FAST_PLANT["ambient_c"] + FAST_PLANT["heater_rise_k"] * duty
    control = ThermalControl(target=target, temperature=target)
    control.regulator.set_cycle(0.4, 0.1, 0.1)
    control.regulator.set_gains(*tuned_gains(FAST_PLANT, False, 15.0))
    control.regulator.mode = "PID"
    rows = run_model(control, Simulator(target, clock=None, **FAST_PLANT), 0.02, 60.0)
    steady = [t - target for s, t, _ in rows if s > 20]
    assert abs(sum(steady) / len(steady)) < 0.05
    assert {power for _, _, power in rows} == {0.0, 1.0}


def test_dew_point_mode_regulates_to_the_dew_point_plus_the_offset():
    control = ThermalControl(target=30.0, temperature=5.0, proportional=True)
    regulator = control.regulator
    regulator.mode = "DEWPOINT"
    regulator.set_gains(*tuned_gains(FAST_PLANT, True, 15.0))
    dew = thermostat.dew_point(12.0, 70.0)
    assert dew == pytest.approx(6.7, abs=0.1)  # Magnus, as tables give it
    regulator.dew.observe((T0 + timedelta(seconds=0)).timestamp(), dew)
    rows = run_model(control, Simulator(5.0, clock=None, **FAST_PLANT), 0.02, 30.0)
    assert rows[-1][1] == pytest.approx(dew + thermostat.DEW_OFFSET, abs=0.05)
    assert regulator.target == pytest.approx(dew + 3.0)
    assert control.safety.weather is None


def test_the_ramp_moves_the_effective_target_at_its_rate_and_the_band_waits_for_it():
    control = ThermalControl(target=15.0, temperature=15.0, proportional=True)
    control.regulator.mode = "PID"
    control.regulator.set_gains(*tuned_gains(FAST_PLANT, True, 15.0))
    box = Simulator(15.0, clock=None, **FAST_PLANT)
    run_model(control, box, 0.02, 10.0)
    control.regulator.ramp.rate_k_per_min = 30.0  # 0.5 K/s
    control.target = 20.0
    rows = run_model(control, box, 0.02, 4.0, start_s=10.0)
    assert control.regulator.target == pytest.approx(15.0 + 0.5 * 3.98, abs=0.15)
    assert not control.in_band
    assert rows[-1][1] < 17.5  # the box follows the ramp, not the target
    run_model(control, box, 0.02, 12.0, start_s=14.0)
    assert control.regulator.target == 20.0 and control.in_band


def test_relay_minimums_hold_in_every_mode_through_target_changes_and_autotune():
    control = ThermalControl(target=15.0, temperature=5.0)
    regulator = control.regulator
    regulator.set_cycle(1.0, 0.7, 0.5)
    chance = random.Random(3)

    def meddle(now_s):
        if chance.random() < 0.02:
            control.target = chance.uniform(8.0, 22.0)
        if chance.random() < 0.01:
            regulator.mode = chance.choice(["HYSTERESIS", "PID"])
        if chance.random() < 0.002 and not regulator.autotune.running:
            regulator.start_autotune((T0 + timedelta(seconds=now_s)).timestamp(), 15.0, 50.0)

    rows = run_model(control, Simulator(5.0, clock=None, **FAST_PLANT), 0.05, 600.0, every=meddle)
    changes = switch_times(rows)
    assert len(changes) > 100
    for (start, on), (end, _) in zip(changes, changes[1:], strict=False):
        assert end - start >= (0.7 if on else 0.5) - 1e-6, (start, on, end)


def test_switching_modes_while_heating_is_bumpless():
    control = ThermalControl(target=15.0, temperature=5.0, proportional=True)
    box = Simulator(5.0, clock=None, **FAST_PLANT)
    run_model(control, box, 0.02, 0.5)
    assert control.heater_power == 1.0  # the hysteresis heats at full power, far below
    control.regulator.set_gains(0.05, 0.01, 0.0)  # from nothing, kp alone would ask 0.3
    control.regulator.mode = "PID"
    rows = run_model(control, box, 0.02, 0.1, start_s=0.5)
    assert rows[0][2] == pytest.approx(1.0, abs=0.05)  # and the PID goes on from there
    control.regulator.mode = "HYSTERESIS"
    assert run_model(control, box, 0.02, 0.02, start_s=0.6)[0][2] == 1.0


def test_a_safety_limit_switches_off_at_once_whatever_the_relay_minimum():
    control = ThermalControl(target=40.0, temperature=5.0, max_temperature=20.0)
    control.regulator.set_cycle(1.0, 3600.0, 0.1)
    rows = run_model(control, Simulator(5.0, clock=None, **FAST_PLANT), 0.05, 10.0)
    assert max(t for _, t, power in rows if power > 0) < 20.2  # off once above (the lag aside)
    assert len([on for _, on in switch_times(rows) if not on]) > 2  # each before its minimum on


def test_the_effectiveness_alarm_rises_at_full_power_without_a_rise_and_clears():
    control = ThermalControl(target=30.0, temperature=10.0)
    control.regulator.effectiveness.alarm_after_s = 5.0
    box = Simulator(10.0, clock=None, **(FAST_PLANT | dict(heater_rise_k=0.0, ambient_c=10.0)))
    run_model(control, box, 0.1, 4.0)
    assert control.safety.effective is None
    run_model(control, box, 0.1, 2.0, start_s=4.0)
    assert "full power" in control.safety.effective
    assert control.safety.lights()["EFFECTIVE"] == "Alert"
    control.target = 5.0
    run_model(control, box, 0.1, 1.0, start_s=6.0)
    assert control.safety.effective is None


def test_stale_weather_holds_the_last_target_then_falls_back_to_a_power_below_full():
    regulator = thermostat.Regulator(proportional=True)
    regulator.mode = "DEWPOINT"
    regulator.dew.max_age_s, regulator.dew.hold_s = 10.0, 20.0
    regulator.dew.observe(0.0, 5.0)
    assert regulator.step(5.0, 7.0, 15.0) > 0 and regulator.weather is None
    regulator.step(15.0, 7.0, 15.0)
    assert regulator.target == 8.0 and "held" in regulator.weather
    assert regulator.step(31.0, -20.0, 15.0) == 0.3  # cold or not: open loop, never full
    assert regulator.target is None and "30 %" in regulator.weather


# -- through the driver --------------------------------------------------------


def members(element):
    return {one.get("name"): (one.text or "").strip() for one in element}


def new_text(device, vector, member, value):
    return (
        f'<newTextVector device="{device}" name="{vector}">'
        f'<oneText name="{member}">{value}</oneText></newTextVector>'
    )


def next_set(client, name, condition=lambda e: True, timeout=10.0):
    "The next set*Vector of name for which condition(element) is true."
    return client.expect(
        lambda e: e.tag.startswith("set") and e.get("name") == name and condition(e),
        timeout,
        what=f"an update of {name}",
    )


def seen(client, match, start=0, timeout=10.0, what="an element"):
    """An element received from the start'th on that matches, whatever was
    expected since: the order of two devices' (or two vectors') updates is theirs."""
    deadline = time.monotonic() + timeout
    while True:
        for element in client.received[start:]:
            if match(element):
                return element
        if not client._read_some(deadline):
            raise AssertionError(f"timed out waiting for {what}")


def named(name, condition=lambda e: True):
    return lambda e: e.get("name") == name and condition(e)


def value(element, member):
    return float(members(element)[member])


def set_gains(client, gains):
    client.send('<newNumberVector device="Thermostat" name="PID_SETTINGS">'
                + "".join(f'<oneNumber name="{name}">{gain}</oneNumber>'
                          for name, gain in zip(("KP", "KI", "KD"), gains, strict=True))
                + "</newNumberVector>")  # fmt: skip
    next_set(client, "PID_SETTINGS")


def serve(in_process, driver, *more):
    running = in_process(thermostat.make_server(driver, *more, port=free_port()))
    client = running.client()
    client.send('<getProperties version="1.7"/>')
    client.expect(tagged("defNumberVector", name="REGULATION"))
    return client


class RecordingBox(Simulator):
    "A simulated box whose reads can fail, and that records each read (time, reading)."

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads, self.broken = [], False

    def read(self):
        if self.broken:
            raise OSError("sensor unplugged")
        reading = super().read()
        self.reads.append((self.now_s, reading))
        return reading


def test_through_the_driver_the_box_cools_by_the_clock_at_two_poll_intervals(in_process):
    counts = []
    for poll in (0.01, 0.1):
        box = RecordingBox(20.0)
        driver = thermostat.make_driver(target=-40, poll_interval=poll, config=None, sensor=box)
        client = serve(in_process, driver)
        reads = box.reads
        wait_until(lambda: len(reads) > 1 and reads[-1][0] - reads[0][0] > 0.5)  # noqa: B023
        client.close()
        start_s = box.reads[0][0] - math.log(25 / (box.reads[0][1] + 5)) * 1000
        for now_s, reading in box.reads[1:]:  # -5 + 25 exp(-t / 1000), whatever the poll
            assert reading == pytest.approx(-5 + 25 * math.exp(-(now_s - start_s) / 1000), abs=1e-6)
        counts.append(len(box.reads))
    assert counts[0] > counts[1]  # read more often, on the same curve


def test_pid_mode_gives_a_proportional_heater_a_power(in_process):
    box = Simulator(5.0, **FAST_PLANT)
    driver = thermostat.make_driver(poll_interval=POLL, config=None, sensor=box)
    client = serve(in_process, driver)
    client.send(new_switch("Thermostat", "CONTROL_MODE", "PID", "On"))
    next_set(client, "CONTROL_MODE", lambda e: members(e)["PID"] == "On")
    next_set(client, "HEATER_POWER", lambda e: 5 < value(e, "POWER") < 95)
    regulation = next_set(client, "REGULATION")
    assert value(regulation, "TARGET") == 15.0


def test_autotune_through_the_driver_finds_gains_for_a_plant_it_has_never_seen(in_process):
    box = Simulator(10.0, **OTHER_PLANT)
    driver = thermostat.make_driver(target=25, poll_interval=POLL, config=None, sensor=box)
    client = serve(in_process, driver)
    client.send(new_switch("Thermostat", "PID_AUTOTUNE", "START", "On"))
    next_set(client, "PID_AUTOTUNE", lambda e: e.get("state") == "Busy")
    done = next_set(client, "PID_AUTOTUNE", lambda e: e.get("state") != "Busy", timeout=20)
    assert done.get("state") == "Ok", done.get("message")
    (gains,) = [e for e in client.received if e.tag == "setNumberVector"
                and e.get("name") == "PID_SETTINGS"]  # fmt: skip
    kp, ki, kd = (value(gains, name) for name in ("KP", "KI", "KD"))
    expected = tuned_gains(OTHER_PLANT, True, 25.0)
    assert (kp, ki, kd) != pytest.approx(thermostat.DEFAULT_GAINS, rel=0.5)
    assert kp == pytest.approx(expected[0], rel=0.35) and ki == pytest.approx(expected[1], rel=0.6)
    client.send(new_switch("Thermostat", "CONTROL_MODE", "PID", "On"))
    wait_until(lambda: abs(box.temperature - 25) < 0.1, timeout=10, what="the PID to settle")
    time.sleep(0.5)  # held there
    assert abs(box.temperature - 25) < 0.15


def test_an_autotune_cut_short_by_a_disconnect_says_why_with_alert(in_process):
    driver = thermostat.make_driver(target=25, poll_interval=POLL, config=None,
                                    sensor=Simulator(10.0, **OTHER_PLANT))  # fmt: skip
    client = serve(in_process, driver)
    client.send(new_switch("Thermostat", "PID_AUTOTUNE", "START", "On"))
    next_set(client, "PID_AUTOTUNE", lambda e: e.get("state") == "Busy")
    client.send(new_switch("Thermostat", "CONNECTION", "DISCONNECT", "On"))
    client.send(new_switch("Thermostat", "CONNECTION", "CONNECT", "On"))
    failed = next_set(client, "PID_AUTOTUNE", lambda e: e.get("state") != "Busy")
    assert failed.get("state") == "Alert" and "disconnected" in failed.get("message")


def test_the_regulation_settings_are_saved_and_apply_at_the_next_start(in_process, tmp_path):
    config = tmp_path / "config.xml"
    client = serve(in_process, thermostat.make_driver(poll_interval=POLL, config=config))
    requests = [new_switch("Thermostat", "CONTROL_MODE", "PID", "On"),
                new_number("Thermostat", "PID_SETTINGS", "KI", 0.25),
                new_number("Thermostat", "CONTROL_CYCLE", "MIN_OFF_S", 7),
                new_number("Thermostat", "TARGET_RAMP", "RATE", 2.5),
                new_number("Thermostat", "REGULATION_SETTINGS", "BAND", 0.2),
                new_text("Thermostat", "ACTIVE_DEVICES", "ACTIVE_WEATHER", "Station")]  # fmt: skip
    for request in requests:
        client.send(request)
    wait_until(lambda: config.exists() and "Station" in config.read_text(), what="the save")
    client.close()
    driver = thermostat.make_driver(poll_interval=POLL, config=config)
    serve(in_process, driver)
    regulator = driver.thermostat.regulator
    assert regulator.mode == "PID" and regulator.pid.ki == 0.25 and regulator.cycle[2] == 7
    assert regulator.ramp.rate_k_per_min == 2.5 and regulator.band == 0.2
    assert driver.regulation.weather == "Station"


class Relay:
    """An on/off heater that records each switch with the time of the poll
    that decided it (the regulator's, which the minimums count in: under load
    a switch may come late after its poll's reading, which is no shorter pulse)."""

    instant = True

    def __init__(self, box):
        self.box, self.switches, self.regulator = box, [], None

    def switch(self, on):
        self.box.set_power(1.0 if on else 0.0)
        if not self.switches or self.switches[-1][1] != on:
            self.switches.append((self.regulator.relay[1] if self.regulator else 0.0, on))


def test_the_driver_keeps_a_relay_s_minimum_on_and_off_times_in_hysteresis_mode(in_process):
    box = Simulator(5.0, **FAST_PLANT)
    relay = Relay(box)
    driver = thermostat.make_driver(poll_interval=POLL, config=None, sensor=box, heater=relay)
    relay.regulator = driver.thermostat.regulator
    client = serve(in_process, driver)
    client.send(new_number("Thermostat", "REGULATION_SETTINGS", "BAND", 0.05))  # it would chatter
    next_set(client, "REGULATION_SETTINGS")
    client.send(new_number("Thermostat", "CONTROL_CYCLE", "MIN_ON_S", 0.3))
    next_set(client, "CONTROL_CYCLE")
    client.send(new_number("Thermostat", "CONTROL_CYCLE", "MIN_OFF_S", 0.2))
    next_set(client, "CONTROL_CYCLE")
    wait_until(lambda: len(relay.switches) > 6, timeout=15, what="six switches")
    for (start, on), (end, _) in zip(relay.switches[1:], relay.switches[2:], strict=False):
        assert end - start >= (0.3 if on else 0.2) - 1e-6, relay.switches
    client.close()


HEATER_SCRIPT = '#!/bin/sh\necho "$1" >> "$(dirname "$0")/heater.log"\n'


@pytest.fixture
def heater_command(tmp_path):
    script = tmp_path / "heater"
    script.write_text(HEATER_SCRIPT)
    script.chmod(0o755)
    log = tmp_path / "heater.log"
    return script, lambda: log.read_text().split() if log.exists() else []


def test_a_command_power_heater_is_given_percentages_and_0_at_stop(in_process, heater_command):
    script, told = heater_command
    box = Simulator(5.0, **FAST_PLANT)
    heater = thermostat.make_heater(f"command-power:{script}")
    driver = thermostat.make_driver(poll_interval=POLL, config=None, sensor=box, heater=heater)
    running = in_process(thermostat.make_server(driver, port=free_port()))
    client = running.client()
    client.send(new_switch("Thermostat", "CONTROL_MODE", "PID", "On"))
    wait_until(lambda: any(0 < float(p) < 100 for p in told()), what="a power between 0 and 100")
    assert told()[0] == "0"  # off at start
    assert all(0 <= float(p) <= 100 for p in told())
    running.stop()
    assert told()[-1] == "0"


def test_an_on_off_command_heater_under_pid_is_switched_on_and_off(in_process, heater_command):
    script, told = heater_command
    box = Simulator(5.0, **FAST_PLANT)
    heater = thermostat.make_heater(f"command:{script}")
    driver = thermostat.make_driver(poll_interval=POLL, config=None, sensor=box, heater=heater)
    client = serve(in_process, driver)
    client.send(new_number("Thermostat", "CONTROL_CYCLE", "CYCLE_S", 1))
    client.send(new_switch("Thermostat", "CONTROL_MODE", "PID", "On"))
    wait_until(lambda: told().count("on") >= 2, timeout=15, what="two pulses")
    assert set(told()) == {"on", "off"}
    assert next_set(client, "HEATER_POWER").find("oneNumber").text.strip() in ("0.0", "100.0")


def test_a_ramped_target_stays_busy_until_the_box_is_within_the_band(in_process):
    box = Simulator(15.0, **FAST_PLANT)
    driver = thermostat.make_driver(poll_interval=POLL, config=None, sensor=box)
    client = serve(in_process, driver)
    set_gains(client, tuned_gains(FAST_PLANT, True, 15.0))
    client.send(new_switch("Thermostat", "CONTROL_MODE", "PID", "On"))
    client.send(new_number("Thermostat", "TARGET_RAMP", "RATE", 60))  # 1 K/s
    next_set(client, "TARGET_RAMP")
    client.send(new_number("Thermostat", "targetvector", "target", 18))
    assert next_set(client, "targetvector").get("state") == "Busy"
    next_set(client, "REGULATION", lambda e: 15.5 < value(e, "TARGET") < 17.5)  # on its way
    started = time.monotonic()
    next_set(client, "targetvector", lambda e: e.get("state") == "Ok")
    assert time.monotonic() - started > 1.5  # the ramp took its time: 3 K at 1 K/s, less the band


def test_the_effectiveness_alarm_lights_on_safety_status_through_the_driver(in_process):
    box = Simulator(10.0, **(FAST_PLANT | dict(heater_rise_k=0.0, ambient_c=10.0)))  # open strap
    driver = thermostat.make_driver(poll_interval=POLL, config=None, sensor=box)
    client = serve(in_process, driver)
    client.send(new_number("Thermostat", "REGULATION_SETTINGS", "NO_RISE_S", 1))
    status = next_set(client, "SAFETY_STATUS", lambda e: members(e).get("EFFECTIVE") == "Alert")
    assert "full power" in status.get("message") and status.get("state") == "Alert"


class FakeWeather(IPyDriver):
    "A weather station as libindi's have it: WEATHER_PARAMETERS, updated every 0.05 s while sending."

    def __init__(self, temperature=12.0, humidity=70.0):
        air = NumberVector("WEATHER_PARAMETERS", "Parameters", "Parameters", "ro", "Ok", [
            NumberMember("WEATHER_TEMPERATURE", "Temperature", "%.2f", -50, 80, 0, str(temperature)),
            NumberMember("WEATHER_HUMIDITY", "Humidity", "%.1f", 0, 100, 0, str(humidity))])  # fmt: skip
        super().__init__(Device("Fake Weather", [air]))
        self.sending = True

    async def hardware(self):
        while not self.stop:
            await asyncio.sleep(0.05)
            if self.sending:
                await self["Fake Weather"]["WEATHER_PARAMETERS"].send_setVector()


def test_dew_point_mode_follows_a_weather_device_served_beside_it_and_falls_back(in_process):
    weather = FakeWeather()
    driver = thermostat.make_driver(poll_interval=POLL, config=None,
                                    sensor=Simulator(5.0, **FAST_PLANT))  # fmt: skip
    dew = driver.thermostat.regulator.dew
    dew.max_age_s, dew.hold_s = 0.5, 0.5
    client = serve(in_process, driver, weather)
    client.send(new_text("Thermostat", "ACTIVE_DEVICES", "ACTIVE_WEATHER", "Fake Weather"))
    client.send(new_switch("Thermostat", "CONTROL_MODE", "DEWPOINT", "On"))
    expected = thermostat.dew_point(12.0, 70.0)
    regulation = next_set(client, "REGULATION", lambda e: value(e, "DEW_POINT") != 0)
    assert value(regulation, "DEW_POINT") == pytest.approx(expected, abs=0.001)
    assert value(regulation, "TARGET") == pytest.approx(expected + 3.0, abs=0.001)
    weather.sending = False
    held = next_set(client, "SAFETY_STATUS", lambda e: members(e).get("WEATHER") == "Busy")
    assert "held" in held.get("message")
    start = len(client.received)
    fallback = next_set(client, "SAFETY_STATUS", lambda e: "30 %" in (e.get("message") or ""))
    assert members(fallback)["WEATHER"] == "Busy"
    seen(client, named("HEATER_POWER", lambda e: value(e, "POWER") == 30.0), start)
    weather.sending = True
    back = next_set(client, "SAFETY_STATUS", lambda e: members(e).get("WEATHER") == "Ok")
    assert "followed again" in back.get("message")


def test_dew_point_mode_snoops_libindi_s_weather_simulator_under_indiserver(tmp_path):
    "libindi's simulator gives no humidity: the thermostat says so, and runs at its fallback."
    port = free_port()
    server = subprocess.Popen(
        ["indiserver", "-p", str(port), "-u", str(tmp_path / "indiserver.sock"),
         "indi_simulator_weather", "indi_thermostat"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port, process=server)
        from conftest import IndiClient

        client = IndiClient(port)
        client.send('<getProperties version="1.7"/>')
        seen(client, tagged("defNumberVector", "Thermostat", "REGULATION"))
        seen(client, tagged("defSwitchVector", "Weather Simulator", "CONNECTION"))
        client.send(new_switch("Weather Simulator", "CONNECTION", "CONNECT", "On"))
        seen(client, tagged("defNumberVector", "Weather Simulator", "WEATHER_PARAMETERS"))
        start = len(client.received)
        client.send(new_number("Thermostat", "POLLING_PERIOD", "PERIOD_MS", 100))
        client.send(new_text("Thermostat", "ACTIVE_DEVICES", "ACTIVE_WEATHER", "Weather Simulator"))
        client.send(new_switch("Thermostat", "CONTROL_MODE", "DEWPOINT", "On"))
        status = seen(client, named("SAFETY_STATUS", lambda e: "gives neither WEATHER_DEWPOINT "
                                    "nor WEATHER_HUMIDITY" in (e.get("message") or "")), start,
                      what="the thermostat's word on the weather simulator's parameters")  # fmt: skip
        assert "Weather Simulator" in status.get("message")
        assert members(status)["WEATHER"] == "Busy"
        seen(client, named("HEATER_POWER", lambda e: value(e, "POWER") == 30), start)
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=5)


@pytest.mark.parametrize("mode", ["HYSTERESIS", "PID", "DEWPOINT", "autotune"])
@pytest.mark.parametrize("kind", ["command", "command-power"])
def test_every_fail_safe_rule_gives_power_0_in_every_mode(in_process, heater_command, mode, kind):
    "A sensor fault, a disconnect and a stop each leave the heater off (0, or off), recorded."
    script, told = heater_command
    off = "0" if kind == "command-power" else "off"

    def heating():
        return told() and told()[-1] != off

    def off_again(count):
        return lambda: len(told()) > count and told()[-1] == off

    box = RecordingBox(5.0, **FAST_PLANT)
    heater = thermostat.make_heater(f"{kind}:{script}")
    driver = thermostat.make_driver(target=25, poll_interval=POLL, config=None, sensor=box,
                                    heater=heater)  # fmt: skip
    running = in_process(thermostat.make_server(driver, port=free_port()))
    client = running.client()
    client.send(new_number("Thermostat", "CONTROL_CYCLE", "CYCLE_S", 1))  # pulses of 0.5 s
    if mode == "autotune":
        client.send(new_switch("Thermostat", "PID_AUTOTUNE", "START", "On"))
    else:
        client.send(new_switch("Thermostat", "CONTROL_MODE", mode, "On"))
    wait_until(heating, what="the heater on")
    box.broken = True
    wait_until(off_again(len(told())), what="off at a sensor fault")
    box.broken = False
    if mode == "autotune":  # the fault ended it: a new one
        client.send(new_switch("Thermostat", "PID_AUTOTUNE", "START", "On"))
    wait_until(heating, what="the heater on again")
    client.send(new_switch("Thermostat", "CONNECTION", "DISCONNECT", "On"))
    wait_until(off_again(len(told())), what="off at a disconnect")
    client.send(new_switch("Thermostat", "CONNECTION", "CONNECT", "On"))
    if mode == "autotune":
        client.send(new_switch("Thermostat", "PID_AUTOTUNE", "START", "On"))
    wait_until(heating, what="the heater on once connected")
    running.stop()
    assert told()[-1] == off


def test_a_command_power_heater_is_given_0_when_the_process_is_terminated(served, heater_command):
    script, told = heater_command
    server = served("--heater", f"command-power:{script}", "--target", "25")
    wait_until(lambda: told()[-1:] == ["100"], what="full power, far below the target")
    assert server.stop() == 0
    assert told()[-1] == "0" and told()[0] == "0"


def test_the_command_line_s_simulator_can_be_given_a_shorter_time_constant(served):
    "simulator:TAU: a box 100 times as fast, for trials and tests of whole processes."
    server = served("--sensor", "simulator:10", "--target", "19")
    client = server.client()
    client.send('<getProperties version="1.7"/>')
    next_set(client, "targetvector", lambda e: e.get("state") == "Ok")  # from 20: a second away
    client.close()
    with pytest.raises(ValueError, match="simulator:TAU"):
        thermostat.make_sensor("simulator:x")


def test_the_heater_on_limit_holds_for_a_pid_at_full_power_whose_output_dips_now_and_then():
    """A proportional heater under PID, its sensor out of the box reading the air
    0.8 K below the target, with a little noise: the PID holds full power but for
    one poll now and then (the noise through the derivative), some 2 % of them. A
    dip of a second is no break: the heater-on limit holds, where each dip started
    it afresh and the heater ran at 99.7 % for hours with the limit never reached."""
    noise = random.Random(1)
    control = thermostat.ThermalControl(target=20, proportional=True, max_heater_on=3600)
    control.regulator.mode = "PID"
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for second in range(3 * 3600):
        now = start + timedelta(seconds=second)
        control.step(now, 19.2 + noise.gauss(0, 0.03), clock=float(second))
        if (command := control.heater_command()) is not None:
            control.heater_switched(command, now, clock=float(second))
        if control.on_time_alarm:
            break
    assert control.on_time_alarm, "3 h at 99.7 % power, and the heater-on limit never held"
    assert 3600 <= second < 3600 + 300  # from the first full power, a minute or so in


def test_the_heater_on_alarm_that_trips_within_the_band_stays_latched_until_the_band_is_left():
    """A sensor out of the box reading the air 0.3 K below the target, within the
    band: the PID winds up to full power, and the heater-on limit trips after an
    hour. The temperature is in the band, not back in it: the alarm stays latched
    (the heater off), where it was re-armed at the next poll and the heater ran
    at 99.9 % for hours, the limit a one-poll break each hour."""
    noise = random.Random(1)
    control = thermostat.ThermalControl(target=20, proportional=True, max_heater_on=3600)
    control.regulator.mode = "PID"
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    tripped = None
    for second in range(3 * 3600):
        now = start + timedelta(seconds=second)
        control.step(now, 19.7 + noise.gauss(0, 0.03), clock=float(second))
        if (command := control.heater_command()) is not None:
            control.heater_switched(command, now, clock=float(second))
        if control.on_time_alarm and tripped is None:
            tripped = second
    assert tripped is not None and tripped < 2 * 3600
    assert control.on_time_alarm and control.heater_power == 0.0, "re-armed within the band"
