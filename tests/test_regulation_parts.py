"""The regulation's parts (thermostat.py, Part I), each alone, in simulated time."""

import itertools
import math
import random

import pytest

from thermostat import (
    PID,
    Autotune,
    DewPointTarget,
    HeaterEffectiveness,
    Hysteresis,
    Ramp,
    RegulationStats,
    RelayGuard,
    Simulator,
    TimeProportioning,
    dew_point,
)


def HeatedBox(temperature_c=20.0, **constants):
    "The module's Simulator, advanced by hand (in simulated time)."
    return Simulator(temperature_c, clock=None, **constants)

FAST = {"time_constant_s": 6.0, "heater_rise_k": 20.0, "ambient_c": 5.0, "sensor_lag_s": 0.4}
SLOW = {"time_constant_s": 600.0, "heater_rise_k": 20.0, "ambient_c": 5.0, "sensor_lag_s": 40.0,
        "sensor_noise_k": 0.05}
STRONG = {"time_constant_s": 60.0, "heater_rise_k": 60.0, "ambient_c": 10.0, "sensor_lag_s": 3.0,
          "sensor_noise_k": 0.02}
PLANTS = {  # constants, poll, target
    "fast": (FAST, 0.1, 15.0),
    "slow noisy": (SLOW, 5.0, 15.0),
    "strong heater, warm ambient": (STRONG, 1.0, 20.0),
}


def run(box, poll_s, duration_s, control, start_s=0.0):
    """Poll box every poll_s from start_s for duration_s: control(now, reading) -> power.
    Return [(now, reading, true temperature, power)]."""
    rows = []
    for k in range(round(duration_s / poll_s)):
        now = start_s + k * poll_s
        box.advance(now)
        reading = box.read()
        power = control(now, reading)
        box.set_power(power)
        rows.append((now, reading, box.temperature, power))
    return rows


def rms(values):
    return math.sqrt(sum(v * v for v in values) / len(values))


def tuned(constants, poll_s, target, **options):
    box = HeatedBox(temperature_c=constants["ambient_c"], **constants)
    tuner = Autotune(**options)
    tuner.start(0.0, target)
    k = 0
    while tuner.state == "running":
        now = k * poll_s
        box.advance(now)
        box.set_power(tuner.update(now, box.read()))
        k += 1
    return tuner, box, k * poll_s


# --- the heated box ---------------------------------------------------------

def test_box_defaults_move_as_the_old_simulator_did_around_its_15_degree_target():
    for power, rate in ((0.0, -0.02), (1.0, 0.02), (0.5, 0.0)):
        box = HeatedBox(temperature_c=15.0)
        box.advance(0.0)
        box.set_power(power)
        box.advance(1.0)
        assert box.temperature - 15.0 == pytest.approx(rate, abs=2e-5)
    assert HeatedBox().temperature == 20.0


def test_box_trajectory_is_the_same_whatever_the_poll_interval():
    def at_60_s(poll_s):
        box = HeatedBox(sensor_lag_s=7.0)
        for k in range(round(60 / poll_s) + 1):
            now = k * poll_s
            box.advance(now)
            box.set_power(1.0 if now < 20 else 0.3 if now < 45 else 0.0)
        return box.temperature, box.sensed

    fine, coarse = at_60_s(0.1), at_60_s(1.0)
    assert fine[0] == pytest.approx(coarse[0], abs=1e-6)
    assert fine[1] == pytest.approx(coarse[1], abs=1e-6)
    assert fine[0] != pytest.approx(fine[1], abs=1e-3)      # the sensor does lag


def test_box_sensor_is_continuous_where_its_lag_equals_the_time_constant():
    def sensor(lag_s):
        box = HeatedBox(time_constant_s=100.0, sensor_lag_s=lag_s)
        box.advance(0.0)
        box.set_power(1.0)
        box.advance(37.0)
        return box.sensed

    equal = sensor(100.0)
    assert sensor(100.0 * (1 + 1e-10)) == pytest.approx(equal, abs=1e-9)
    assert sensor(100.0 * (1 - 1e-4)) == pytest.approx(equal, abs=1e-4)
    assert sensor(101.0) < equal < sensor(99.0)


def test_box_noise_is_gaussian_of_its_size_and_repeats_with_its_seed():
    def readings(seed):
        box = HeatedBox(sensor_noise_k=0.05, seed=seed)
        return [box.read() for _ in range(4000)]

    first = readings(4)
    assert first == readings(4) != readings(5)
    assert rms([x - 20.0 for x in first]) == pytest.approx(0.05, rel=0.05)
    assert abs(sum(first) / len(first) - 20.0) < 0.005


def test_box_is_also_an_on_off_heater():
    box = HeatedBox()
    box.switch(True)
    assert box.power == 1.0 and box.heater_on
    box.switch(False)
    assert box.power == 0.0 and not box.heater_on
    box.set_power(3.0)
    assert box.power == 1.0


# --- hysteresis and the relay guard -------------------------------------------

def test_hysteresis_switches_beyond_the_band_and_keeps_its_state_between():
    rule = Hysteresis(band=0.5)
    readings = [16.0, 15.0, 14.6, 14.4, 15.0, 15.4, 15.6, 15.0]
    assert [rule.update(0, m, 15.0) for m in readings] == [0, 0, 0, 1, 1, 1, 0, 0]
    rule.reset(power=1.0)
    assert rule.update(0, 15.0, 15.0) == 1.0


def test_relay_guard_delays_a_change_until_the_minimum_is_over_but_a_safety_off_is_at_once():
    guard = RelayGuard(min_on_s=60, min_off_s=30)
    assert guard.update(0, True) is True
    assert guard.update(59, False) is True
    assert guard.update(60, False) is False
    assert guard.update(80, True) is False
    assert guard.update(90, True) is True
    guard.force_off(91)
    assert guard.on is False and guard.update(100, True) is False


# --- time proportioning -------------------------------------------------------

def switch_log(tpo, fractions, rng):
    """Drive tpo at uneven polls; return [(time, on)] of its changes, the on-time,
    the time the fractions asked for, and the total time."""
    log, on, on_s, asked_s, now = [], None, 0.0, 0.0, 0.0
    for fraction in fractions:
        state = tpo.update(now, fraction)
        if state != on:
            log.append((now, state))
            on = state
        step = rng.uniform(0.5, 7.0)
        on_s += step if state else 0.0
        asked_s += fraction * step
        now += step
    return log, on_s, asked_s, now


def test_time_proportioning_never_switches_inside_its_minimums_over_random_demand():
    rng = random.Random(20)
    fraction, fractions = 0.5, []
    for _ in range(60000):
        if rng.random() < 0.02:
            fraction = rng.choice([0.0, 1.0, 0.03, 0.97, rng.random(), rng.random()])
        fractions.append(fraction)
    tpo = TimeProportioning(cycle_s=100.0, min_on_s=60.0, min_off_s=90.0)
    log, on_s, asked_s, _ = switch_log(tpo, fractions, rng)
    assert len(log) > 500
    for (start, on), (end, _) in itertools.pairwise(log[1:]):     # log[0]: the state at the start
        assert end - start >= (60.0 if on else 90.0) - 1e-6
    assert on_s == pytest.approx(asked_s, rel=0.01)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_time_proportioning_mean_duty_is_the_asked_fraction_within_1_percent(fraction):
    tpo = TimeProportioning(cycle_s=120.0, min_on_s=60.0, min_off_s=60.0)
    log, on_s, _, total_s = switch_log(tpo, [fraction] * 40000, random.Random(1))
    assert len(log) > 300
    assert on_s / total_s == pytest.approx(fraction, rel=0.01)


def test_time_proportioning_holds_the_shorter_of_on_and_off_at_its_minimum():
    def pattern(fraction, cycle_s=120.0):
        tpo = TimeProportioning(cycle_s=cycle_s, min_on_s=60.0, min_off_s=60.0)
        states = [tpo.update(t, fraction) for t in range(0, 6000, 5)]
        runs, count = [], 1
        for a, b in itertools.pairwise(states):
            if a == b:
                count += 1
            else:
                runs.append((a, count * 5))
                count = 1
        return sorted(set(runs[4:]))        # once the first pulses have settled

    assert pattern(0.5) == [(False, 60), (True, 60)]
    assert pattern(0.2) == [(False, 240), (True, 60)]
    assert pattern(0.8) == [(False, 60), (True, 240)]
    assert pattern(0.5, cycle_s=300.0) == [(False, 150), (True, 150)]    # a longer cycle
    assert pattern(0.2, cycle_s=300.0) == [(False, 600), (True, 150)]


def test_time_proportioning_counts_each_fraction_for_as_long_as_it_was_asked():
    tpo = TimeProportioning(cycle_s=20.0)
    now, on_s = 0.0, 0.0
    for _ in range(2000):       # full power asked for 1 s, none for 9 s: 10 %
        for fraction, held_s in ((1.0, 1.0), (0.0, 9.0)):
            on_s += held_s if tpo.update(now, fraction) else 0.0
            now += held_s
    assert on_s / now == pytest.approx(0.1, rel=0.01)


def test_time_proportioning_is_off_at_none_and_on_at_full_power():
    tpo = TimeProportioning(cycle_s=120.0, min_on_s=60.0, min_off_s=60.0)
    assert not any(tpo.update(t, 0.0) for t in range(0, 3000, 5))
    assert all(tpo.update(t, 1.0) for t in range(3000, 6000, 5))
    assert not any(tpo.update(t, 0.0) for t in range(6060, 9000, 5))


# --- PID ----------------------------------------------------------------------

def test_pid_holds_a_proportional_heater_within_noise_after_autotune():
    tuner, box, end = tuned(SLOW, 5.0, 15.0)
    assert tuner.state == "done"
    pid = PID(*tuner.gains)
    pid.reset(power=box.power)
    rows = run(box, 5.0, 8 * 3600, lambda now, m: pid.update(now, m, 15.0), start_s=end)
    steady = [reading - 15.0 for now, reading, _, _ in rows if now > end + 3600]
    assert rms(steady) <= 0.05 + 0.05
    assert abs(sum(steady) / len(steady)) < 0.02


def test_pid_derivative_opposes_a_rising_reading_and_is_filtered():
    pid = PID(1.0, 0.0, 30.0, derivative_filter=3.0, output_min=-100.0, output_max=100.0)
    for now in range(0, 400, 5):       # rising 0.01 K/s
        pid.update(now, 10.0 + 0.01 * now, 20.0)
    assert pid.derivative == pytest.approx(-30.0 * 0.01, rel=1e-3)
    pid = PID(1.0, 0.0, 30.0, derivative_filter=3.0, output_min=-100.0, output_max=100.0)
    pid.update(0.0, 10.0, 20.0)
    pid.update(5.0, 11.0, 20.0)        # a 1 K step: kd / (filter time + dt), not kd / dt
    assert pid.derivative == pytest.approx(-30.0 / (10.0 + 5.0))
    pid.update(10.0, 11.0, 20.0)
    assert pid.derivative == pytest.approx(-2.0 * 10.0 / 15.0)     # decays with the filter


def test_pid_target_change_neither_kicks_nor_bumps_the_output():
    pid = PID(1.0, 0.01, 20.0)
    for now in range(0, 100, 5):
        before = pid.update(now, 14.8, 15.0)
    after = pid.update(100, 14.8, 17.0)
    assert after == pytest.approx(before + 0.01 * 2.2 * 5, abs=1e-12)      # its integral only
    assert pid.update(105, 14.8, 17.0) > after


@pytest.mark.parametrize("power", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("measured", [14.7, 15.0, 15.3, 10.0])
def test_pid_switched_in_at_a_power_continues_from_it(power, measured):
    pid = PID(1.0, 0.01, 20.0)
    pid.reset(power=power)
    assert pid.update(0.0, measured, 15.0) == pytest.approx(power)
    integral = 0.01 * (15.0 - measured) * 5.0
    assert pid.update(5.0, measured, 15.0) == pytest.approx(min(max(power + integral, 0), 1))


def test_pid_does_not_wind_up_while_the_heater_is_at_full_power_far_below_target():
    pid = PID(0.5, 0.01, 0.0)
    for now in range(0, 3600, 10):
        assert pid.update(now, 5.0, 15.0) == 1.0
    assert pid.integral == 0.0
    assert pid.update(3600, 14.0, 15.0) == pytest.approx(0.5 + 0.01 * 1.0 * 10)


def test_pid_integrates_uneven_polls_as_they_fall_and_nothing_at_a_repeated_time():
    pid = PID(0.1, 0.001, 0.0)
    outputs = [pid.update(now, 14.9, 15.0) for now in (0.0, 0.5, 3.0, 3.0, 10.0, 9.0, 12.0)]
    assert pid.integral == pytest.approx(0.001 * 0.1 * (10.0 + 3.0))
    assert outputs[3] == outputs[2]
    assert outputs[5] == outputs[4]


def test_pid_through_time_proportioning_holds_the_mean_at_20_50_and_80_percent():
    tuner, _, _ = tuned(SLOW, 5.0, 15.0, rule="on-off", min_on_s=60.0, min_off_s=60.0)
    for duty in (0.2, 0.5, 0.8):
        target = 5.0 + 20.0 * duty
        pid = PID(*tuner.gains)
        tpo = TimeProportioning(cycle_s=120.0, min_on_s=60.0, min_off_s=60.0)
        box = HeatedBox(temperature_c=target, seed=2, **SLOW)
        rows = run(box, 5.0, 30000.0, lambda now, m, t=target, pid=pid, tpo=tpo:
                   float(tpo.update(now, pid.update(now, m, t))))
        steady = [true - target for now, _, true, _ in rows if now > 6000]
        assert abs(sum(steady) / len(steady)) < 0.05, duty


# --- autotune -----------------------------------------------------------------

@pytest.mark.parametrize("plant", PLANTS)
def test_autotune_gives_gains_that_hold_plants_it_has_never_seen(plant):
    constants, poll_s, target = PLANTS[plant]
    tuner, box, end = tuned(constants, poll_s, target)
    assert tuner.state == "done", tuner.reason
    assert all(gain > 0 for gain in tuner.gains)
    assert tuner.period_s > 2 * poll_s
    pid = PID(*tuner.gains)
    pid.reset(power=box.power)
    tau = constants["time_constant_s"]
    rows = run(box, poll_s, 40 * tau, lambda now, m: pid.update(now, m, target), start_s=end)
    steady = [reading - target for now, reading, _, _ in rows if now > end + 10 * tau]
    assert rms(steady) <= constants.get("sensor_noise_k", 0.0) + 0.05


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.2, 0.8)])
def test_autotune_ultimate_gain_is_4d_over_pi_a_of_the_oscillation_it_saw(low, high):
    tuner = Autotune(low=low, high=high)
    box = HeatedBox(temperature_c=5.0, **FAST)
    tuner.start(0.0, 15.0)
    readings, k = [], 0
    while tuner.state == "running":
        box.advance(0.1 * k)
        readings.append((0.1 * k, box.read()))
        box.set_power(tuner.update(0.1 * k, readings[-1][1]))
        k += 1
    assert tuner.state == "done"
    end = readings[-1][0]
    last = [m for t, m in readings if t >= end - 3 * tuner.period_s - 1e-9]
    amplitude = (max(last) - min(last)) / 2
    assert tuner.amplitude_k == pytest.approx(amplitude, rel=0.05)     # a mean of 3 cycles
    d = (high - low) / 2
    assert tuner.ultimate_gain == pytest.approx(4 * d / (math.pi * tuner.amplitude_k))
    kp, ki, kd = tuner.gains
    assert kp == pytest.approx(tuner.ultimate_gain / 2.2)
    assert kp / ki == pytest.approx(2.2 * tuner.period_s)
    assert kd / kp == pytest.approx(tuner.period_s / 6.3)


def test_autotune_keeps_the_relay_minimums():
    tuner = Autotune(min_on_s=60.0, min_off_s=60.0)
    box = HeatedBox(temperature_c=5.0, **SLOW)
    tuner.start(0.0, 15.0)
    log, on = [], False
    for k in range(2000):
        box.advance(5.0 * k)
        power = tuner.update(5.0 * k, box.read())
        box.set_power(power)
        if (power > 0) != on:
            on = power > 0
            log.append((5.0 * k, on))
        if tuner.state != "running":
            break
    assert tuner.state == "done"
    assert all(b - a >= 60.0 for (a, _), (b, _) in itertools.pairwise(log))


def test_autotune_aborts_above_the_maximum_temperature_and_says_why():
    tuner, _, _ = tuned(STRONG, 1.0, 40.0, max_temperature_c=40.3)
    assert tuner.state == "failed"
    assert "above the maximum temperature 40.3" in tuner.reason
    assert tuner.gains is None and tuner.update(1e6, 20.0) == 0.0


def test_autotune_times_out_when_the_heater_cannot_reach_the_target():
    tuner, _, end = tuned(FAST, 0.1, 30.0, max_time_s=120.0)
    assert tuner.state == "failed" and end == pytest.approx(120.2, abs=0.2)
    assert "never rose above 30.1" in tuner.reason


def test_autotune_times_out_when_the_ambient_is_above_the_target():
    tuner, _, _ = tuned(FAST, 0.1, 4.0, max_time_s=60.0)
    assert tuner.state == "failed" and "never fell below 3.9" in tuner.reason


def test_autotune_fails_on_a_reading_that_is_not_a_number():
    tuner = Autotune()
    tuner.start(0.0, 15.0)
    assert tuner.update(0.0, math.nan) == 0.0
    assert tuner.state == "failed" and "not a temperature" in tuner.reason


# --- ramp ---------------------------------------------------------------------

def test_ramp_moves_the_effective_target_from_the_temperature_at_its_rate():
    ramp = Ramp(rate_k_per_min=1.0)
    assert ramp.update(0.0, 10.0, 15.0) == 10.0
    assert ramp.update(60.0, 10.5, 15.0) == pytest.approx(11.0)
    assert not ramp.arrived(15.0)
    assert ramp.update(600.0, 14.0, 15.0) == 15.0
    assert ramp.arrived(15.0)
    assert ramp.update(620.0, 14.6, 12.0) == 14.6 and not ramp.arrived(12.0)  # a new target


def test_ramp_at_rate_zero_gives_the_target_at_once():
    ramp = Ramp(rate_k_per_min=0.0)
    assert ramp.update(0.0, 10.0, 15.0) == 15.0
    assert ramp.arrived(15.0)


# --- statistics ---------------------------------------------------------------

def test_stats_give_rms_largest_error_band_duty_and_switches_over_the_window():
    stats = RegulationStats(window_s=3600.0, band=0.5)
    for now in range(0, 7200, 10):
        error = 0.3 if (now // 10) % 2 else -0.3
        on = (now // 60) % 2 == 0
        stats.add(float(now), 15.0 + error, 15.0, 1.0 if on else 0.0)
    assert stats.rms_error == pytest.approx(0.3)
    assert stats.mean_error == pytest.approx(0.0, abs=0.01)
    assert stats.max_error == pytest.approx(0.3)
    assert stats.time_in_band == 1.0
    assert stats.duty == pytest.approx(0.5, abs=0.02)
    assert stats.switches_per_hour == pytest.approx(60.0, rel=0.03)
    assert 3600.0 <= stats.seconds <= 3660.0


def test_stats_forget_the_past_and_stay_bounded_at_fast_polls():
    stats = RegulationStats(window_s=60.0, bins=30)
    for k in range(12000):                      # 10 ms polls over two minutes
        now = k * 0.01
        stats.add(now, 16.0 if now < 30.0 else 15.1, 15.0, 0.2)
    assert len(stats._bins) <= 32
    assert stats.max_error == pytest.approx(0.1)
    assert stats.time_in_band == 1.0


# --- heater effectiveness ---------------------------------------------------

def test_heater_effectiveness_alarms_at_full_power_without_a_rise_and_clears():
    check = HeaterEffectiveness(alarm_after_s=600.0, rise_k=0.5)
    assert not any(check.update(t, 10.0 + 0.01 * (t % 20), 1.0) for t in range(0, 600, 10))
    assert check.update(600.0, 10.0, 1.0) and "full power" in check.reason
    assert not check.update(610.0, 10.6, 1.0)           # a rise
    assert check.update(1210.0, 10.6, 1.0)
    assert not check.update(1220.0, 10.6, 0.5)          # the power dropped


def test_heater_effectiveness_is_quiet_while_the_box_warms_and_alarms_once_it_cannot():
    check = HeaterEffectiveness(alarm_after_s=600.0, rise_k=0.5)
    box = HeatedBox(temperature_c=-5.0, sensor_lag_s=60.0, sensor_noise_k=0.05)
    rows = run(box, 10.0, 20000.0, lambda now, m: 1.0)
    alarms = [check.update(now, reading, 1.0) for now, reading, _, _ in rows]
    assert not any(alarms[:300])        # 3000 s, 30 K on the way to full power's 35
    assert all(alarms[-100:])           # settled at 35: full power, and no more rise


# --- dew point ----------------------------------------------------------------

def test_dew_point_by_magnus_matches_known_values():
    assert dew_point(20.0, 50.0) == pytest.approx(9.26, abs=0.01)
    assert dew_point(20.0, 100.0) == pytest.approx(20.0)
    assert dew_point(25.0, 60.0) == pytest.approx(16.7, abs=0.05)     # as tables give
    assert dew_point(0.0, 80.0) == pytest.approx(-3.0, abs=0.05)
    assert dew_point(-10.0, 70.0) == pytest.approx(-14.4, abs=0.1)
    assert dew_point(5.0, 101.0) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        dew_point(20.0, 0.0)


def test_dew_point_target_holds_when_stale_then_falls_back_to_a_power_below_full():
    dew = DewPointTarget(offset_k=3.0, max_age_s=600.0, hold_s=1800.0, fallback_power=0.3)
    assert dew.setpoint(0.0).state == "fallback"
    dew.observe(0.0, dew_point(20.0, 50.0))
    fresh = dew.setpoint(600.0)
    assert fresh.state == "fresh" and fresh.target == pytest.approx(12.26, abs=0.01)
    assert dew.setpoint(2400.0) == type(fresh)(fresh.target, None, "holding")
    fallback = dew.setpoint(2401.0)
    assert fallback.target is None and fallback.power == 0.3
    with pytest.raises(ValueError):
        DewPointTarget(fallback_power=1.0)
