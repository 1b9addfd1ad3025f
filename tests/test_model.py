"""ThermalControl and TemperatureLog on their own, with the simulator: time
is passed in, nothing sleeps."""

import logging
import math
import random
import tracemalloc
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

import thermostat
from conftest import instant_poll
from thermostat import (
    HYSTERESIS,
    LogFile,
    TemperatureLog,
    ThermalControl,
    indi_timestamp,
    parse_number,
)

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def take_finished(log):
    "Send every finished file as the driver does, oldest first; return them."
    files = []
    while logfile := log.next_unsent():
        log.sent(logfile)
        files.append(logfile)
    return files


class Simulated:
    "A thermostat on the simulator: its model, its hardware and its log, polled as the driver does."

    def __init__(self, name="Thermostat", *, temperature=20.0, target=15.0, **log_options):
        # no clock of its own: the box moves on to each poll's time (seconds after START)
        self.sim = sim = thermostat.Simulator(temperature, clock=None)
        self.control = ThermalControl(name, temperature=sim.temperature, target=target)
        self.hardware = thermostat.Hardware(sim, sim)
        self.log = TemperatureLog(name, **log_options)

    def stop_logging(self):
        "Logging Off, the partial file on the disk before it returns."
        self.log.stop()
        self.log.flush()

    def poll(self, now):
        "One poll, its log rows on the disk before it returns (the writer has a thread of its own)."
        self.sim.advance((now - START).total_seconds())
        reading = instant_poll(self.control, self.hardware, now, self.log)
        self.log.flush()
        return reading


def polls(simulated, count, every=10.0, start=START):
    "Poll count times, every seconds apart; return the readings."
    return [simulated.poll(start + timedelta(seconds=every * i)) for i in range(count)]


def rows_of(files):
    return [row for logfile in files for row in logfile.content().decode().splitlines()[1:]]


def test_starts_at_20_with_target_15_and_heater_off():
    control = ThermalControl()
    assert (control.temperature, control.target, control.heater_on) == (20.0, 15.0, False)


def test_cools_at_the_simulators_rate_while_heater_off():
    simulated = Simulated()
    sim = simulated.sim
    readings = polls(simulated, 5)
    # heater off: T(t) = ambient + (20 - ambient) * exp(-t / tau), polled every 10 s from t = 0
    expected = [sim.ambient_c + (20.0 - sim.ambient_c) * math.exp(-10.0 * i / sim.time_constant_s)
                for i in range(5)]
    assert [r.temperature for r in readings] == pytest.approx(expected, abs=1e-9)
    assert all(b < a for a, b in zip(expected, expected[1:], strict=False))
    assert not any(r.heater_on for r in readings)


def test_heater_switches_on_below_band_and_off_above_it():
    simulated = Simulated(temperature=15.0, target=15.0)
    temperatures, heater = [], []
    for reading in polls(simulated, 40):
        temperatures.append(reading.temperature)
        heater.append(reading.heater_on)
    # on exactly when the temperature first falls below 14.5, off when it first rises above 15.5
    first_on = heater.index(True)
    assert temperatures[first_on] < 15.0 - HYSTERESIS <= temperatures[first_on - 1]
    assert not any(heater[:first_on])
    first_off = heater.index(False, first_on)
    assert temperatures[first_off] > 15.0 + HYSTERESIS >= temperatures[first_off - 1]
    assert all(heater[first_on:first_off])
    # and regulation holds it within one step of the band ever after: about 0.2 K a 10 s
    # poll near 15 degrees, either way (see Simulator)
    step = max(abs(b - a) for a, b in zip(temperatures, temperatures[1:], strict=False))
    assert 0.15 < step < 0.25
    settled = temperatures[first_on:]
    assert min(settled) >= 15.0 - HYSTERESIS - step - 1e-9
    assert max(settled) <= 15.0 + HYSTERESIS + step + 1e-9


def test_in_band_follows_target():
    control = ThermalControl(temperature=20.0, target=15.0)
    assert not control.in_band
    control.target = 20.4
    assert control.in_band


@pytest.mark.parametrize("text, value", [("21", 21.0), ("21.5", 21.5), ("21:30", 21.5),
                                         ("21 30", 21.5), ("-50", -50.0), ("99", 99.0), (" 7 ", 7.0)])
def test_parse_number_accepts_every_indi_format(text, value):
    assert parse_number(text, "target", -50, 99) == pytest.approx(value)


@pytest.mark.parametrize("text", ["warm", "nan", "inf", "-inf", "99.01", "-50.5", "1:2:3:4", "1e400"])
def test_parse_number_rejects_with_range_and_value(text):
    with pytest.raises(ValueError) as error:
        parse_number(text, "target", -50, 99)
    assert "from -50 to 99" in str(error.value) and repr(text) in str(error.value)


def test_no_log_rows_while_logging_is_off():
    simulated = Simulated(log_period=30)
    polls(simulated, 10)
    simulated.stop_logging()
    assert take_finished(simulated.log) == []


def test_files_are_cut_every_log_period():
    simulated = Simulated(log_period=60)
    log = simulated.log
    log.start(START)
    readings = polls(simulated, 20, every=10)            # 0..190 s
    files = take_finished(log)
    # cut when a reading reaches 60, 120 and 180 s: three files of six readings
    assert [len(f.rows) for f in files] == [6, 6, 6]
    assert files[1].rows[0].startswith(indi_timestamp(readings[6].timestamp))
    log.stop()
    assert [len(f.rows) for f in take_finished(log)] == [2]


def test_csv_format_matches_indi_timestamp():
    simulated = Simulated(log_period=60)
    log = simulated.log
    log.start(START)
    moment = START + timedelta(seconds=1, microseconds=250000)
    reading = simulated.poll(moment)
    log.stop()
    (logfile,) = take_finished(log)
    assert logfile.content() == f"timestamp,temperature\n{indi_timestamp(moment)},{reading.temperature:.2f}\n".encode()
    assert indi_timestamp(moment) == "2026-01-01T00:00:01.250000"
    assert logfile.name == "Thermostat-2026-01-01T00-00-01.250000.csv"     # no colons: valid on Windows too


def test_empty_partial_file_is_not_sent():
    log = TemperatureLog()
    log.start(START)
    log.stop()
    assert take_finished(log) == []


def test_every_reading_logged_once_in_order_across_on_off_and_irregular_polls():
    "The lossless property: whatever the timing, each reading while On is in exactly one file."
    rng = random.Random(7)
    simulated = Simulated(log_period=25)
    log = simulated.log
    now, logged, files = START, [], []
    for _ in range(2000):
        now += timedelta(seconds=rng.choice([1, 5, 10, 10, 10, 40]))
        if rng.random() < 0.02:
            if log.logging:
                log.stop()
            else:
                log.start(now)
        logging_now = log.logging
        reading = simulated.poll(now)
        if logging_now:
            logged.append(f"{indi_timestamp(reading.timestamp)},{reading.temperature:.2f}")
        if rng.random() < 0.3:                   # the sender takes files at irregular times
            files += take_finished(log)
    log.stop()
    files += take_finished(log)
    assert len(logged) > 500
    assert rows_of(files) == logged


def test_backlog_is_bounded_and_dropping_is_logged(caplog):
    simulated = Simulated(log_period=10, max_backlog=3)
    log = simulated.log
    log.start(START)
    with caplog.at_level(logging.WARNING, logger="thermostat"):
        polls(simulated, 7, every=10)              # six files finished, none taken
    assert len(log.backlog) == 3
    assert caplog.text.count("log backlog full") == 3
    # the newest files are kept
    assert take_finished(log)[-1].rows[0].startswith(indi_timestamp(START + timedelta(seconds=50)))


def test_log_dir_keeps_every_finished_file_even_when_dropped_from_backlog(tmp_path):
    simulated = Simulated("Greenhouse", log_period=10, log_dir=tmp_path / "logs", max_backlog=1)
    log = simulated.log
    log.start(START)
    polls(simulated, 5, every=10)
    simulated.stop_logging()
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == [f"Greenhouse-{START + timedelta(seconds=s):%Y-%m-%dT%H-%M-%S.%f}.csv" for s in (0, 10, 20, 30, 40)]
    assert all((tmp_path / "logs" / n).read_bytes().startswith(LogFile.HEADER.encode()) for n in names)
    assert len(log.backlog) == 1


def test_target_outside_range_is_refused_at_construction():
    with pytest.raises(ValueError):
        ThermalControl(target=120)


def test_warnings_of_one_kind_are_throttled_and_the_held_back_counted():
    throttle = thermostat.WarningThrottle(limit=3, period=60)

    def warn(template, at):
        record = logging.LogRecord("thermostat", logging.WARNING, __file__, 1, template, (), None)
        record.created = at
        return record if throttle.filter(record) else None
    passed = [warn("bad input %s", t) for t in range(10)]
    assert sum(r is not None for r in passed) == 3
    assert warn("another kind", 10) is not None             # each kind has its own window
    later = warn("bad input %s", 61)                          # a new window says what was held back
    assert later is not None and "7 more like this were not logged" in later.msg


def test_finished_log_files_are_held_as_their_bytes():
    "A backlog of finished files costs about their size in memory, not three times it (as str rows)."
    log = TemperatureLog(max_file_bytes=1 << 16, log_period=86400)
    log.start(START)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(10000):
        log.record(SimpleNamespace(timestamp=START + timedelta(seconds=i), temperature=20 + i % 7 / 3,
                                   safety=SimpleNamespace(sensor=None)))
    log.stop()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    files = take_finished(log)
    content = sum(len(f.content()) for f in files)
    assert len(files) == 4 and sum(len(f.rows) for f in files) == 10000
    assert held < 1.15 * content, f"{held} bytes held for {content} bytes of log files"
