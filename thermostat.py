"""An INDI thermostat driver, built on indipydriver and indipyserver.

Run it:      python thermostat.py            (serves INDI on localhost:7624)
Import it:   from thermostat import make_driver, make_server

One module in three parts, each readable alone:

Part I, the thermostat: the model (regulation and its safety limits, time
passed in), the temperature log, hardware (sensor and heater kinds, and the
one collaborator that knows worker threads, timeouts and off-at-stop),
libindi's device conventions (saved settings, DEBUG, the standard
properties), the INDI driver (ThermoDriver), and assembly (make_driver,
make_server).

Part II, an INDI serving kit that uses nothing of Part I: the wire (a
serializer, a bounded parser, libindi's message form), the server and its
clients (IndiServer), the stdio link under indiserver (StdioLink), and last,
fenced, every use of a private of indipydriver or indipyserver: the
adaptations to their defects, each with the version it was verified on.

Part III, the command line: python thermostat.py [options], indi_thermostat.
"""

import argparse
import asyncio
import collections
import contextvars
import errno
import hashlib
import importlib.util
import ipaddress
import itertools
import locale
import logging
import math
import os
import random
import re
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
import weakref
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import indipydriver
import indipyserver
from indipydriver import (
    BLOBMember,
    BLOBVector,
    Device,
    IPyDriver,
    LightMember,
    LightVector,
    NumberMember,
    NumberVector,
    SwitchMember,
    SwitchVector,
    TextMember,
    TextVector,
)
from indipyserver import IPyServer
from indipyserver.exdriver import ExDriver
from indipyserver.remote import RemoteConnection

__version__ = "1.0.0"
__all__ = [
    "ThermalControl",
    "TemperatureLog",
    "Simulator",
    "W1Sensor",
    "IIOSensor",
    "CommandSensor",
    "CommandHeater",
    "CommandPowerHeater",
    "GpioHeater",
    "Regulator",
    "ThermoDriver",
    "make_driver",
    "make_server",
    "IndiServer",
    "ThermoServer",
    "serve_stdio",
    "serve_until_stopped",
    "main",
    "indi_thermostat",
]

logger = logging.getLogger("thermostat")


# ===========================================================================
# PART I: THE THERMOSTAT
# ===========================================================================

# ---------------------------------------------------------------------------
# The model: regulation and its safety rules. Nothing here knows INDI or
# hardware; every method that depends on time is given it.
# ---------------------------------------------------------------------------

TEMPERATURE_MIN, TEMPERATURE_MAX = -50.0, 99.0
HYSTERESIS = 0.5  # the default band (BAND): the hysteresis switches beyond target +/- this
MAX_TEMPERATURE = 50.0  # above it the heater is off, whatever the target
MAX_HEATER_ON = 3600.0  # seconds of continuous heating that raise the alarm
FULL_POWER_BREAK_S = 30.0  # a proportional heater's dip below full power shorter than this, and
# not to 0, is no break of the heater-on limit's full power (an on/off heater's off always is)
STUCK_AFTER = 600.0  # seconds of one unchanged reading while heating: a stuck sensor
SAFETY_CHECK = 5.0  # seconds between sensor reads while heating, whatever the poll interval

_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)"
_INDI_NUMBER = (
    re.compile(  # decimal, or sexagesimal with one kind of separator: 21:30:15, 21;30, 21 30
        rf"(?P<sign>[+-]?)(?:(?P<decimal>{_UNSIGNED}(?:[eE][+-]?\d+)?)"
        rf"|(?P<degrees>{_UNSIGNED})(?P<separator>[:;]| +)(?P<minutes>{_UNSIGNED})"
        rf"(?:(?P=separator)(?P<seconds>{_UNSIGNED}))?)",
        re.ASCII,
    )
)


def parse_number(text, what, low, high):
    """Return text as a float within low..high, in any INDI number format
    (decimal, "21:30", "21;30", "21 30"), or raise ValueError saying what is wrong."""

    def expected(problem=""):
        return ValueError(
            f"{what} must be a number from {low:g} to {high:g}; received {text!r}{problem}"
        )

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _INDI_NUMBER.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise expected(
                ", which is not a number (decimal, or sexagesimal as 21:30, 21;30 or 21 30)"
            )
        if match["decimal"]:
            value = float(match["decimal"])
        else:
            minutes, seconds = float(match["minutes"]), float(match["seconds"] or 0)
            if minutes >= 60 or seconds >= 60:
                raise expected(": minutes and seconds must be below 60")
            value = float(match["degrees"]) + minutes / 60 + seconds / 3600
        if match["sign"] == "-":
            value = -value
    if not (math.isfinite(value) and low <= value <= high):
        raise expected()
    return value


def failure_reason(error):
    "An exception as the reason a sensor or heater failed."
    return str(error) or type(error).__name__


@dataclass(frozen=True)
class Safety:
    """Why the heater is held off, if it is, and what else is wrong with its
    regulation: each None while all is well."""

    sensor: str | None = None  # why the last reading was refused
    heater: str | None = None  # why the last switching of the heater failed
    limit: str | None = None  # which limit holds the heater off
    alarm: bool = False  # the limit is the heater-on time: latched until re-armed
    effective: str | None = None  # why the heater seems not to heat (HeaterEffectiveness)
    weather: str | None = None  # why the dew point is not followed (DEWPOINT mode)

    def lights(self):
        """The SAFETY_STATUS lights, by member name, in order: first libindi's
        SAFETY, the overall state (the worst of the others), then one each."""
        lights = {
            "SENSOR": "Alert" if self.sensor else "Ok",
            "HEATER": "Alert" if self.heater else "Ok",
            "LIMITS": "Alert" if self.alarm else "Busy" if self.limit else "Ok",
            "EFFECTIVE": "Alert" if self.effective else "Ok",
            "WEATHER": "Busy" if self.weather else "Ok",
        }
        worst = next((s for s in ("Alert", "Busy") if s in lights.values()), "Ok")
        return {"SAFETY": worst, **lights}

    def news(self, before):
        "What changed since before that SAFETY_STATUS says in its message ('' if nothing)."
        changes = []
        if self.limit != before.limit:
            level = "ERROR" if self.alarm else "WARNING"
            changes.append((level, self.limit) if self.limit else
                           (None, "the heater is within its limits again"))  # fmt: skip
        if self.effective != before.effective:
            changes.append(("ERROR", f"heater: {self.effective}") if self.effective else
                           (None, "the heater heats again"))  # fmt: skip
        if self.weather != before.weather:
            changes.append(("WARNING", f"weather: {self.weather}") if self.weather else
                           (None, "the dew point is followed again"))  # fmt: skip
        levels = [level for level, _ in changes if level]
        prefix = f"[{'ERROR' if 'ERROR' in levels else levels[0]}] " if levels else ""
        return prefix + "; ".join(text for _, text in changes)


@dataclass(frozen=True)
class Reading:
    timestamp: datetime
    temperature: float  # the last good reading (NaN before the first)
    heater_on: bool
    in_band: bool  # a good reading within the band of the target
    safety: Safety = Safety()
    power: float = 0.0  # what the heater is given, 0..1


# ---------------------------------------------------------------------------
# Regulation: the parts ThermalControl decides a heater power with. Times are
# float seconds (any epoch), powers fractions 0..1, temperatures degrees
# Celsius, temperature differences kelvin.
# ---------------------------------------------------------------------------

EPSILON_S = 1e-9  # float rounding of times: a minimum held within this is held
CONTROL_MODES = ("HYSTERESIS", "PID", "DEWPOINT")
# PID gains (kp 1/K, ki 1/(K s), kd s/K) from PID_AUTOTUNE on the default Simulator at
# the default poll, by the on/off heater's rule (the gentler, and safe for both kinds)
DEFAULT_GAINS = (0.72, 0.0041, 4.6)
CYCLE_S = 60.0  # time proportioning's cycle for an on/off heater under PID
MIN_SWITCH_S = 0.1  # the relay's default minimum on and off times: a poll limits more
NO_RISE_S = 900.0  # seconds at full power without a rise that raise the effectiveness alarm
DEW_OFFSET = 3.0  # kelvin above the dew point in DEWPOINT mode
REGULATION_WINDOW_S = 3600.0  # REGULATION's figures cover the last hour


def clamp(value, low, high):
    return min(max(value, low), high)


class Simulator:
    """The default sensor and heater, in one object: a heated box, its
    temperature T obeying dT/dt = (ambient_c + heater_rise_k * power - T) /
    time_constant_s, with the sensor a first-order lag of sensor_lag_s
    behind T and gaussian noise of sensor_noise_k (seeded: runs repeat).
    Each interval is integrated exactly with the power held through it, so
    the trajectory is the same whatever the poll interval: it moves to
    clock() at each read and power change (clock None: by advance() alone).

    The defaults keep the seed's feel around its 15 degree target: at 15
    degrees the box cools at 0.02 K/s with the heater off and warms at 0.02
    K/s at full power (0.2 K per 10 s poll), and holds at half power. As a
    heater it has switch(on) and set_power(fraction): a proportional one."""

    instant = True  # read and switched in the event loop: no worker thread
    valid_range = None  # whatever it reads is plausible

    def __init__(self, temperature=20.0, *, time_constant_s=1000.0, heater_rise_k=40.0,
                 ambient_c=-5.0, sensor_lag_s=0.0, sensor_noise_k=0.0, seed=0,
                 clock=time.monotonic):  # fmt: skip
        if not time_constant_s > 0 or sensor_lag_s < 0 or sensor_noise_k < 0:
            raise ValueError(
                "time_constant_s must be positive, sensor_lag_s and sensor_noise_k not negative"
            )
        self.time_constant_s, self.heater_rise_k = time_constant_s, heater_rise_k
        self.ambient_c = ambient_c  # may be changed between advances
        self.temperature = self.sensed = temperature  # the box's, and its sensor's (noise aside)
        self.sensor_lag_s, self.sensor_noise_k = sensor_lag_s, sensor_noise_k
        self.power = 0.0
        self.now_s = None
        self.clock = clock
        self._random = random.Random(seed)

    @property
    def heater_on(self):
        return self.power > 0

    def set_power(self, fraction):
        if self.clock is not None:
            self.advance(self.clock())
        self.power = clamp(float(fraction), 0.0, 1.0)

    def switch(self, on):
        self.set_power(1.0 if on else 0.0)

    def equilibrium(self, power):
        "Where the box settles at a constant power."
        return self.ambient_c + self.heater_rise_k * power

    def advance(self, now_s):
        "Move the box and its sensor on to now_s (a time not after the last is ignored)."
        if self.now_s is None or now_s <= self.now_s:
            self.now_s = now_s if self.now_s is None else self.now_s
            return
        dt, self.now_s = now_s - self.now_s, now_s
        tau, lag = self.time_constant_s, self.sensor_lag_s
        settle = self.equilibrium(self.power)
        box, sensor = self.temperature - settle, self.sensed - settle
        decay = math.exp(-dt / tau)
        self.temperature = settle + box * decay
        if lag == 0:
            self.sensed = self.temperature
            return
        # the sensor's offset s obeys s' = (box * exp(-t / tau) - s) / lag
        lag_decay = math.exp(-dt / lag)
        x = dt * (tau - lag) / (tau * lag)
        if x == 0:
            forced = box * decay * dt / lag
        elif abs(x) < 1:  # tau close to lag: expm1 keeps the difference exact
            forced = box * tau * decay * -math.expm1(-x) / (tau - lag)
        else:
            forced = box * tau * (decay - lag_decay) / (tau - lag)
        self.sensed = settle + sensor * lag_decay + forced

    def read(self):
        "The sensor's reading now (at the last advance() without a clock), noise included."
        if self.clock is not None:
            self.advance(self.clock())
        if self.sensor_noise_k:
            return self.sensed + self._random.gauss(0.0, self.sensor_noise_k)
        return self.sensed


# Controllers: update(now_s, measured, target) -> power 0..1, and reset(power)
# to take over from another mode at the heater's current power.


class Hysteresis:
    """The seed's rule: on below target - band, off above target + band, and
    between them whatever it was. Full power or none."""

    def __init__(self, band=HYSTERESIS):
        self.band = band
        self.on = False

    def reset(self, power=0.0):
        "Take over with the heater at power: on stays on until above the band."
        self.on = power is not None and power >= 0.5

    def update(self, now_s, measured, target):
        if measured < target - self.band:
            self.on = True
        elif measured > target + self.band:
            self.on = False
        return 1.0 if self.on else 0.0


class PID:
    """A PID controller for a heater, in parallel form:
    output = kp * error + (integral of ki * error) - kd * d(measured)/dt.

    - The derivative is of the measurement, so that a target change does not
      kick; it is filtered (time constant kd / kp / derivative_filter) so
      that noise is not amplified without bound.
    - Anti-windup: far from the target the integral stops while the output
      is held at a limit by an error that would push it further, so a
      warm-up from cold does not overshoot. Within windup_zone_k of the
      target (judged on the readings smoothed over the integral time) it
      integrates always, within the output range: an on/off heater's ripple
      holds the output at a limit for part of each cycle, and stopping then
      would bias the mean temperature.
    - dt comes from now_s: uneven polls are integrated as they fall; a poll
      at the same time (or earlier, after a clock step) integrates nothing.
    - Bumpless: reset(power) makes the next output continue from power; a
      target change moves the integral by the proportional term's step, so
      the output does not jump and the new target is approached through the
      integral (little overshoot). reset() alone is a fresh start."""

    def __init__(self, kp, ki=0.0, kd=0.0, *, output_min=0.0, output_max=1.0,
                 derivative_filter=3.0, windup_zone_k=HYSTERESIS, zone_smoothing=1.0):  # fmt: skip
        if kp < 0 or ki < 0 or kd < 0 or not output_min < output_max:
            raise ValueError("gains must not be negative, and output_min below output_max")
        self.kp, self.ki, self.kd = kp, ki, kd
        self.output_min, self.output_max = output_min, output_max
        self.derivative_filter = derivative_filter
        self.windup_zone_k = windup_zone_k
        self.zone_smoothing = zone_smoothing
        self.reset()

    @property
    def gains(self):
        return self.kp, self.ki, self.kd

    def reset(self, power=None):
        """Forget the history. power: the heater's power now, for a bumpless
        start from it; None starts with an empty integral."""
        self.integral = self.derivative = 0.0
        self.output = 0.0 if power is None else power
        self._start_power = power
        self._last_s = self._last_measured = self._smoothed = self._target = None

    def update(self, now_s, measured, target):
        "Return the power for a good reading (the caller holds the heater off on a bad one)."
        error = target - measured
        proportional = self.kp * error
        if self._last_s is None:
            if self._start_power is not None:
                self.integral = self._start_power - proportional
            self._last_s, self._last_measured, self._target = now_s, measured, target
            self._smoothed = measured
            return self._out(proportional)
        if target != self._target:
            self.integral -= self.kp * (target - self._target)
            self._target = target
        dt = now_s - self._last_s
        if dt > 0:
            filter_s = self.kd / (self.kp * self.derivative_filter) if self.kp > 0 else 0.0
            self.derivative = (
                filter_s * self.derivative - self.kd * (measured - self._last_measured)
            ) / (filter_s + dt)
            integral = self.integral + self.ki * error * dt
            output = proportional + integral + self.derivative
            smoothing_s = self.zone_smoothing * self.kp / self.ki if self.ki > 0 else 0.0
            self._smoothed += (measured - self._smoothed) * (
                -math.expm1(-dt / smoothing_s) if smoothing_s > 0 else 1.0
            )
            if abs(target - self._smoothed) <= self.windup_zone_k:
                # within the output range; one already outside (bumpless) only comes back
                integral = min(integral, max(self.output_max, self.integral))
                self.integral = max(integral, min(self.output_min, self.integral))
            elif not (
                output > self.output_max and error > 0 or output < self.output_min and error < 0
            ):
                self.integral = integral
            self._last_measured = measured
        if dt != 0:
            self._last_s = now_s
        return self._out(proportional)

    def _out(self, proportional):
        self.output = clamp(
            proportional + self.integral + self.derivative, self.output_min, self.output_max
        )
        return self.output


class RelayGuard:
    """Holds a relay's state at least min_on_s once switched on and
    min_off_s once switched off: a change asked sooner waits until the
    minimum is over. A safety limit that must switch off at once uses
    force_off(), which the guard then counts from."""

    def __init__(self, min_on_s=0.0, min_off_s=0.0):
        if min_on_s < 0 or min_off_s < 0:
            raise ValueError("minimum times must not be negative")
        self.min_on_s, self.min_off_s = min_on_s, min_off_s
        self.reset()

    def reset(self, on=False, since_s=-math.inf):
        "Take over a relay that is on (or off) since since_s (-inf: long enough for any change)."
        self.on, self.since_s = on, since_s

    def update(self, now_s, wanted):
        "Return the state to switch to: wanted, once the current state has lasted its minimum."
        wanted = bool(wanted)
        if wanted != self.on:
            minimum = self.min_on_s if self.on else self.min_off_s
            if now_s - self.since_s >= minimum - EPSILON_S:
                self.on, self.since_s = wanted, now_s
        return self.on

    def force_off(self, now_s):
        if self.on:
            self.on, self.since_s = False, now_s


class TimeProportioning:
    """A power fraction as on/off for an on/off heater, by delta-sigma
    modulation: the on-time owed (the integral of the fraction asked, less
    the time on) switches the heater on while it is positive and off while
    it is not, through a RelayGuard that holds every on at least
    max(min_on_s, cycle_s / 2) and every off at least max(min_off_s, cycle_s / 2).

    So half power is one cycle of cycle_s, half on, half off; at any other
    fraction the shorter of on and off stays at its minimum and the longer
    stretches (20 % with a 120 s cycle: 60 s on, 240 s off): the shortest
    period, and so the least ripple, that the minimums allow. What a minimum
    or a late poll adds to or takes from a pulse stays owed, so the mean
    duty is the mean fraction asked."""

    def __init__(self, cycle_s=CYCLE_S, min_on_s=0.0, min_off_s=0.0):
        if not cycle_s > 0:
            raise ValueError("cycle_s must be positive")
        self.cycle_s = cycle_s
        self.guard = RelayGuard(max(min_on_s, cycle_s / 2), max(min_off_s, cycle_s / 2))
        self.reset()

    @property
    def on(self):
        return self.guard.on

    def reset(self, on=False, since_s=-math.inf):
        "Start afresh, owing nothing, with the heater on (or off) since since_s."
        self.guard.reset(on, since_s)
        self.owed_s = self.fraction = 0.0
        self._last_s = None

    def update(self, now_s, fraction):
        "Return whether the heater is to be on now."
        if self._last_s is not None and now_s > self._last_s:
            dt = now_s - self._last_s
            self.owed_s += (self.fraction - (1.0 if self.guard.on else 0.0)) * dt
            bound = self.guard.min_on_s + self.guard.min_off_s + dt  # forget older debts
            self.owed_s = clamp(self.owed_s, -bound, bound)
        if self._last_s is None or now_s > self._last_s:
            self._last_s = now_s
        self.fraction = clamp(fraction, 0.0, 1.0)
        owing = self.owed_s > 0 or self.owed_s == 0 and self.fraction > 0  # 0: a fresh start
        return self.guard.update(now_s, owing)


# kp / Ku, Ti / Pu, Td / Pu. "on-off" is Tyreus-Luyben at half the gain and twice the
# integral time: for a PID through TimeProportioning, whose ripple and pulse lengths the
# relay test does not see (at full Tyreus-Luyben gains the cycles turn irregular).
TUNING_RULES = {
    "ziegler-nichols": (0.6, 0.5, 0.125),
    "tyreus-luyben": (1 / 2.2, 2.2, 1 / 6.3),
    "on-off": (1 / 4.4, 4.4, 1 / 6.3),
}


def gains_from_ultimate(ultimate_gain, period_s, rule="tyreus-luyben"):
    "(kp, ki, kd) from the ultimate gain and period by a rule of TUNING_RULES."
    gain, integral, derivative = TUNING_RULES[rule]
    kp = gain * ultimate_gain
    return kp, kp / (integral * period_s), kp * derivative * period_s


def _agree(values, tolerance):
    mean = sum(values) / len(values)
    return mean > 0 and (max(values) - min(values)) <= tolerance * mean


class Autotune:
    """Relay-feedback autotune (Astrom-Hagglund) around a target: the heater
    goes to high below target - hysteresis_k and to low above target +
    hysteresis_k (through a RelayGuard with the relay's minimums), which
    makes the box oscillate. Once `cycles` successive cycles (the approach
    never counts) agree within `tolerance` in period and amplitude, their
    means are the ultimate period Pu and amplitude a; the ultimate gain is
    Ku = 4 d / (pi a), d = (high - low) / 2, and the gains follow by `rule`.

    It fails, saying why in reason, above max_temperature_c, on a reading
    that is not a number, by abort(), and when no steady oscillation comes
    within max_time_s or max_cycles. Done or failed, it asks for no power.
    state is "idle", "running", "done" (gains set) or "failed" (reason set)."""

    def __init__(self, *, hysteresis_k=0.1, high=1.0, low=0.0, cycles=3, tolerance=0.15,
                 max_cycles=20, max_time_s=6 * 3600.0, max_temperature_c=MAX_TEMPERATURE,
                 min_on_s=0.0, min_off_s=0.0, rule="tyreus-luyben"):  # fmt: skip
        if not (0 <= low < high <= 1) or cycles < 3 or rule not in TUNING_RULES:
            raise ValueError("need 0 <= low < high <= 1, cycles >= 3 and a rule of TUNING_RULES")
        self.hysteresis_k, self.high, self.low = hysteresis_k, high, low
        self.cycles, self.tolerance, self.max_cycles = cycles, tolerance, max_cycles
        self.max_time_s, self.max_temperature_c, self.rule = max_time_s, max_temperature_c, rule
        self.guard = RelayGuard(min_on_s, min_off_s)
        self.state, self.target = "idle", None
        self.gains = self.reason = None
        self.ultimate_gain = self.period_s = self.amplitude_k = None
        self.output = 0.0

    @property
    def running(self):
        return self.state == "running"

    def start(self, now_s, target, on=False, since_s=-math.inf):
        "Start around target, the heater on (or off) since since_s."
        self.state, self.target = "running", target
        self.gains = self.reason = None
        self.ultimate_gain = self.period_s = self.amplitude_k = None
        self.guard.reset(on, since_s)
        self._start_s = now_s
        self._switched_off = False  # cycles count from the first on after an off
        self._seen_above = self._seen_below = False
        self._last_on_s = None
        self._high_c, self._low_c = -math.inf, math.inf
        self._periods, self._amplitudes = [], []
        self.output = self.high if on else self.low

    def update(self, now_s, measured):
        "Return the power to apply now: the relay's while running, 0 once done or failed."
        if self.state != "running":
            return 0.0
        if not math.isfinite(measured):
            return self.abort(f"the reading {measured!r} is not a temperature")
        if measured > self.max_temperature_c:
            return self.abort(
                f"{measured:.2f} is above the maximum temperature {self.max_temperature_c:g}"
            )
        if self._last_on_s is not None:
            self._high_c, self._low_c = max(self._high_c, measured), min(self._low_c, measured)
        below = measured < self.target - self.hysteresis_k
        above = measured > self.target + self.hysteresis_k
        self._seen_below |= below
        self._seen_above |= above
        was_on = self.guard.on
        on = self.guard.update(now_s, True if below else False if above else was_on)
        if was_on and not on:
            self._switched_off = True
        elif on and not was_on and self._switched_off:
            self._cycle_ends(now_s, measured)
            if self.state != "running":
                return 0.0
        if now_s - self._start_s > self.max_time_s:
            return self.abort(self._no_oscillation(f"within {self.max_time_s:g} s"))
        self.output = self.high if on else self.low
        return self.output

    def abort(self, reason):
        self.state, self.reason, self.output = "failed", reason, 0.0
        return 0.0

    def _cycle_ends(self, now_s, measured):
        if self._last_on_s is not None:
            self._periods.append(now_s - self._last_on_s)
            self._amplitudes.append((self._high_c - self._low_c) / 2)
        self._last_on_s = now_s
        self._high_c = self._low_c = measured
        periods = self._periods[1:][-self.cycles :]
        amplitudes = self._amplitudes[1:][-self.cycles :]
        if (
            len(periods) == self.cycles
            and _agree(periods, self.tolerance)
            and _agree(amplitudes, self.tolerance)
        ):
            self.period_s = sum(periods) / len(periods)
            self.amplitude_k = sum(amplitudes) / len(amplitudes)
            if self.amplitude_k <= 0:
                self.abort("the oscillation has no amplitude")
                return
            self.ultimate_gain = 4 * (self.high - self.low) / 2 / (math.pi * self.amplitude_k)
            self.gains = gains_from_ultimate(self.ultimate_gain, self.period_s, self.rule)
            self.state, self.output = "done", 0.0
        elif len(self._periods) > self.max_cycles:
            self.abort(self._no_oscillation(f"in {self.max_cycles} cycles"))

    def _no_oscillation(self, when):
        if not self._seen_above:
            return (
                f"no oscillation {when}: the temperature never rose above "
                f"{self.target + self.hysteresis_k:g} (is the heater strong enough, and on?)"
            )
        if not self._seen_below:
            return (
                f"no oscillation {when}: the temperature never fell below "
                f"{self.target - self.hysteresis_k:g} (is the ambient above the target?)"
            )
        periods = ", ".join(f"{p:.4g}" for p in self._periods[-self.cycles :])
        return f"no steady oscillation {when}: the last periods were {periods} s"


class Ramp:
    """The effective target, moving from the temperature at the time a
    target is set to that target at rate_k_per_min (0: at once), as
    libindi's camera coolers ramp CCD_TEMPERATURE."""

    def __init__(self, rate_k_per_min=0.0):
        if rate_k_per_min < 0:
            raise ValueError("rate_k_per_min must not be negative")
        self.rate_k_per_min = rate_k_per_min
        self.target = self.effective = None
        self._last_s = None

    def arrived(self, target):
        "True unless a ramp to target is under way."
        return self.target != target or self.effective == target

    def update(self, now_s, measured, target):
        "Return the effective target now."
        if target != self.target:
            self.target = target
            self.effective = measured if self.rate_k_per_min > 0 else target
        elif self.rate_k_per_min == 0:
            self.effective = target
        elif now_s > self._last_s:
            step = self.rate_k_per_min / 60 * (now_s - self._last_s)
            gap = target - self.effective
            self.effective = (
                target if abs(gap) <= step else self.effective + math.copysign(step, gap)
            )
        self._last_s = now_s if self._last_s is None else max(self._last_s, now_s)
        return self.effective


@dataclass
class _Bin:
    start_s: float
    seconds: float = 0.0
    squares: float = 0.0  # time-weighted sum of error squared
    errors: float = 0.0  # time-weighted sum of error
    largest: float = 0.0  # of |error|, over the readings in the bin
    in_band_s: float = 0.0
    energy_s: float = 0.0  # power times seconds
    switches: int = 0


class RegulationStats:
    """How well the temperature is held over the last window_s: RMS, mean
    and largest error, the fraction of time in band, the duty cycle (mean
    power) and the heater's switches (between off and on) per hour. Memory
    is bounded whatever the poll: the window is kept as `bins` bins, so the
    figures cover between window_s and one bin more. Each reading (and the
    power decided on it) holds until the next one."""

    def __init__(self, window_s=REGULATION_WINDOW_S, band=HYSTERESIS, bins=60):
        if not window_s > 0 or bins < 1:
            raise ValueError("window_s must be positive, bins at least 1")
        self.window_s, self.band = window_s, band
        self.bin_s = window_s / bins
        self._bins = collections.deque()
        self._last = None  # (now_s, error, power) of the last reading

    def add(self, now_s, measured, target, power):
        error = measured - target
        if self._last is not None:
            last_s, last_error, last_power = self._last
            t = max(last_s, now_s - self.window_s - self.bin_s)
            while t < now_s:
                bin_ = self._bin_at(t)
                index = math.floor(t / self.bin_s)
                end = min(now_s, (index + 1) * self.bin_s)
                if end <= t:  # t on a bin's edge, rounded down
                    end = min(now_s, (index + 2) * self.bin_s)
                seconds = end - t
                bin_.seconds += seconds
                bin_.squares += last_error * last_error * seconds
                bin_.errors += last_error * seconds
                bin_.in_band_s += seconds if abs(last_error) <= self.band else 0.0
                bin_.energy_s += last_power * seconds
                t = end
            if (power > 0) != (last_power > 0):
                self._bin_at(now_s).switches += 1
        if self._last is None or now_s >= self._last[0]:
            bin_ = self._bin_at(now_s)
            bin_.largest = max(bin_.largest, abs(error))
            self._last = (now_s, error, power)
        while self._bins and self._bins[0].start_s + self.bin_s <= now_s - self.window_s:
            self._bins.popleft()

    def _bin_at(self, t):
        start = math.floor(t / self.bin_s) * self.bin_s
        if not self._bins or self._bins[-1].start_s < start:
            self._bins.append(_Bin(start))
        for bin_ in reversed(self._bins):
            if bin_.start_s <= start:
                return bin_
        return self._bins[0]

    def _sum(self, name):
        return sum(getattr(bin_, name) for bin_ in self._bins)

    @property
    def seconds(self):
        return self._sum("seconds")

    def _per_second(self, name):
        seconds = self.seconds
        return self._sum(name) / seconds if seconds > 0 else math.nan

    @property
    def rms_error(self):
        value = self._per_second("squares")
        return math.sqrt(value) if math.isfinite(value) else value

    @property
    def mean_error(self):
        return self._per_second("errors")

    @property
    def max_error(self):
        return max((bin_.largest for bin_ in self._bins), default=math.nan)

    @property
    def time_in_band(self):
        return self._per_second("in_band_s")

    @property
    def duty(self):
        return self._per_second("energy_s")

    @property
    def switches_per_hour(self):
        seconds = self.seconds
        return self._sum("switches") * 3600 / seconds if seconds > 0 else math.nan


class HeaterEffectiveness:
    """An alarm for a heater that does not heat: asked full_power or more
    for alarm_after_s without the temperature rising rise_k above its lowest
    reading since (an open strap, a dead relay, a sensor not in the box, a
    heater too weak for the target). A rise of rise_k starts the wait
    afresh; the alarm clears on such a rise, or once the power drops."""

    def __init__(self, alarm_after_s=NO_RISE_S, rise_k=0.5, full_power=0.95):
        self.alarm_after_s, self.rise_k, self.full_power = alarm_after_s, rise_k, full_power
        self.reason = None
        self._since_s, self._lowest = None, math.inf

    def update(self, now_s, measured, power):
        "Return why the alarm is raised, or None."
        if power < self.full_power or not math.isfinite(measured):
            self._since_s, self._lowest, self.reason = None, math.inf, None
            return None
        if self._since_s is None:
            self._since_s = now_s
        self._lowest = min(self._lowest, measured)
        if measured - self._lowest >= self.rise_k:
            self._since_s, self._lowest, self.reason = now_s, measured, None
        elif now_s - self._since_s >= self.alarm_after_s:
            self.reason = (
                f"the heater ran at full power for {now_s - self._since_s:.0f} s and the "
                f"temperature rose less than {self.rise_k:g} K: is it heating the box, and is "
                "the sensor in it?"
            )
        return self.reason


MAGNUS_B, MAGNUS_C = 17.62, 243.12  # over water, -45..60 degrees (WMO, Sonntag 1990)


def dew_point(temperature, relative_humidity):
    """The dew point in degrees Celsius by the Magnus formula, relative
    humidity in percent (above 100, as sensors read in fog, is taken as 100)."""
    if not (
        math.isfinite(temperature)
        and temperature > -MAGNUS_C
        and math.isfinite(relative_humidity)
        and relative_humidity > 0
    ):
        raise ValueError(
            f"no dew point for {temperature!r} degrees at {relative_humidity!r} % humidity"
        )
    gamma = math.log(min(relative_humidity, 100.0) / 100) + MAGNUS_B * temperature / (
        MAGNUS_C + temperature
    )
    return MAGNUS_C * gamma / (MAGNUS_B - gamma)


@dataclass(frozen=True)
class Setpoint:
    "What to regulate to: a target, or (target None) a fixed power, and why."

    target: float | None
    power: float | None
    state: str  # "fresh", "holding" or "fallback"


class DewPointTarget:
    """A target offset_k above the dew point of the air, for a dew heater.

    The dew point comes by observe(). While the last is at most max_age_s
    old the target follows it; once older, the last target is held for
    hold_s more (a weather station that misses a few updates changes
    nothing); after that, and before any observation, the heater runs
    open-loop at fallback_power: below full, so that lost weather data never
    leaves the heater full on, and above none, so that the optics are still
    kept warmer than the air."""

    def __init__(self, offset_k=DEW_OFFSET, max_age_s=600.0, hold_s=1800.0, fallback_power=0.3):
        if not 0 <= fallback_power < 1:
            raise ValueError("fallback_power must be from 0 to below 1 (never full on)")
        self.offset_k, self.max_age_s, self.hold_s = offset_k, max_age_s, hold_s
        self.fallback_power = fallback_power
        self.dew_point = None
        self.observed_s = None
        self.problem = None  # why no dew point comes, if known

    def observe(self, now_s, dew_point_c):
        self.dew_point, self.observed_s = dew_point_c, now_s

    def setpoint(self, now_s):
        if self.observed_s is not None:
            age = now_s - self.observed_s
            if age <= self.max_age_s + self.hold_s:
                state = "fresh" if age <= self.max_age_s else "holding"
                return Setpoint(self.dew_point + self.offset_k, None, state)
        return Setpoint(None, self.fallback_power, "fallback")


def is_proportional(heater):
    "True for a heater that takes a power, set_power(fraction), rather than switch(on)."
    return hasattr(heater, "set_power")


class Regulator:
    """The heater's power for each good reading, in the CONTROL_MODE: the
    hysteresis, a PID, or a PID to the dew point plus an offset (DEWPOINT);
    a running autotune takes the place of the mode until it ends. The target
    may be ramped; the figures (stats) and the effectiveness alarm follow
    every step. An on/off heater gets the power as on/off, within the
    relay's minimums in every mode (by TimeProportioning under PID); a
    proportional heater gets it as it is. hold() (a fail-safe rule) is power
    0 at once, minimums or not; the next step takes over bumplessly."""

    def __init__(self, *, proportional=False, band=HYSTERESIS, gains=DEFAULT_GAINS,
                 cycle_s=CYCLE_S, min_on_s=MIN_SWITCH_S, min_off_s=MIN_SWITCH_S,
                 window_s=REGULATION_WINDOW_S):  # fmt: skip
        self.proportional = proportional
        self.mode = "HYSTERESIS"
        self.hysteresis = Hysteresis(band)
        self.pid = PID(*gains)
        self.ramp = Ramp()
        self.dew = DewPointTarget()
        self.stats = RegulationStats(window_s, band)
        self.effectiveness = HeaterEffectiveness()
        self.autotune = Autotune()  # idle until start_autotune
        self.set_cycle(cycle_s, min_on_s, min_off_s)
        self.asked = self.power = 0.0  # the controller's power, and what the heater is given
        self.target = None  # the effective target at the last step (None: open loop)
        self.weather = None  # why the dew point is not followed, in DEWPOINT mode
        self.relay = (False, -math.inf)  # an on/off heater's state, and since when
        self._driving = None  # what decided the last power: another one takes over
        self._before_hold = None  # what decided it before a hold: it resumes after
        self._resync = False  # the relay's guards take over its state at the next step
        self._last_s = -math.inf

    @property
    def band(self):
        return self.hysteresis.band

    @band.setter
    def band(self, band):
        self.hysteresis.band = self.stats.band = band

    @property
    def cycle(self):
        return self.tpo.cycle_s, self.guard.min_on_s, self.guard.min_off_s

    def set_cycle(self, cycle_s, min_on_s, min_off_s):
        self.guard = RelayGuard(min_on_s, min_off_s)
        self.tpo = TimeProportioning(cycle_s, min_on_s, min_off_s)
        self._resync = True

    def set_gains(self, kp, ki, kd):
        self.pid.kp, self.pid.ki, self.pid.kd = kp, ki, kd
        self.pid.reset(self.pid.output)  # bumpless

    def in_band(self, temperature, target):
        "True while the temperature is within band of the target, and any ramp has arrived."
        if self.mode == "DEWPOINT":
            return self.target is not None and abs(temperature - self.target) <= self.band
        return abs(temperature - target) <= self.band and self.ramp.arrived(target)

    def start_autotune(self, now_s, target, max_temperature):
        "Tune the PID around target by relay feedback, within the relay's minimums."
        _, min_on_s, min_off_s = self.cycle
        minimums = {} if self.proportional else dict(min_on_s=min_on_s, min_off_s=min_off_s)
        rule = "tyreus-luyben" if self.proportional else "on-off"
        self.autotune = Autotune(rule=rule, max_temperature_c=max_temperature, **minimums)
        self.autotune.start(now_s, target, *self.relay)

    def hold(self, now_s, why):
        "The heater command while a fail-safe rule holds it off: off, at once."
        if self.autotune.running:
            self.autotune.abort(f"stopped: {why}")
        self.asked = self.power = 0.0
        if self.relay[0]:
            self.relay = (False, self._last_s if now_s is None else now_s)
        self._before_hold = self._driving or self._before_hold
        self._driving = None
        self.effectiveness.update(now_s, math.nan, 0.0)
        return self._command()

    def step(self, now_s, measured, target):
        "The heater command for a good reading: on or off, or a power for a proportional heater."
        self._last_s = now_s
        target = self._setpoint(now_s, measured, target)
        if self.autotune.running:
            driving = self.autotune
        elif target is None:
            driving = self.dew  # open loop at its fallback power
        else:
            driving = self.hysteresis if self.mode == "HYSTERESIS" else self.pid
        if driving is not self._driving or self._resync:
            self.guard.reset(*self.relay)
            self.tpo.reset(*self.relay)
            self._resync = False
        if driving is not self._driving:
            self._take_over(driving)
        if driving is self.autotune:
            asked = self.autotune.update(now_s, measured)
            if self.autotune.state == "done":
                self.set_gains(*self.autotune.gains)
        elif driving is self.dew:
            asked = self.dew.fallback_power
        else:
            asked = driving.update(now_s, measured, target)
        self.asked = asked
        if self.proportional:
            self.power = asked
        else:
            if driving is self.autotune:
                on = asked > 0  # within the minimums: the autotune's relay has them
            elif driving is self.hysteresis:
                on = self.guard.update(now_s, asked > 0)
            else:
                on = self.tpo.update(now_s, asked)
            self.power = 1.0 if on else 0.0
            if on != self.relay[0]:
                self.relay = (on, now_s)
        if target is not None:
            self.stats.add(now_s, measured, target, self.power)
        self.effectiveness.update(now_s, measured, asked)
        return self._command()

    def _command(self):
        return round(self.power, 3) if self.proportional else self.power > 0

    def _take_over(self, driving):
        """Bumpless: a mode switched to starts from the power given; after a
        hold, the controller before it resumes from where it was; after an
        autotune, or at the start, a fresh start."""
        previous = self._driving or self._before_hold
        if driving is self.pid and previous is self.pid:
            self.pid.reset(self.pid.output)
        elif driving in (self.hysteresis, self.pid) and previous is not driving:
            fresh = previous is None or previous is self.autotune
            driving.reset(None if fresh else self.power)
        self._driving, self._before_hold = driving, None

    def _setpoint(self, now_s, measured, target):
        "The effective target: the target ramped, or the dew point's (None: open loop)."
        self.weather = None
        if self.mode != "DEWPOINT":
            self.target = self.ramp.update(now_s, measured, target)
            return self.target
        point = self.dew.setpoint(now_s)
        problem = self.dew.problem or "none has come for a while"
        if point.state == "holding":
            self.weather = f"no fresh dew point ({problem}): its last target is held"
        elif point.state == "fallback":
            self.weather = (
                f"no dew point ({problem}): the heater runs at {point.power * 100:.0f} % power"
            )
        self.target = point.target
        return self.target


def _seconds(now, clock):
    "The time for the safety timers: clock (monotonic seconds) if given, else now's."
    return now.timestamp() if clock is None else clock


class ThermalControl:
    """A thermostat's regulation. Each step() takes what the sensor measured,
    refuses an implausible reading (which holds the heater off until good
    readings return), and decides the heater's power (its Regulator, in the
    control mode), within two limits: off above max_temperature, and off
    with a latched alarm after max_heater_on seconds of continuous heating
    at full power. Off is power 0, whatever the mode. What the heater must
    be given is heater_command(): on or off, or for a proportional heater a
    power; the outcome comes back through heater_switched(). valid_range is
    the sensor's plausible range, if it has one.

    The safety timers (heater-on, stuck) follow `clock`, a monotonic time in
    seconds that the driver passes in (its time.monotonic), so that a step
    of the system clock neither trips nor delays them; left out, they follow
    now, the UTC time of the readings. heater_deadline() says when the
    heater-on limit runs out, and expire(clock) enforces it between polls.
    A proportional heater's power that dips below full for less than
    FULL_POWER_BREAK_S, and not to off, is no break in its full power: a PID
    held at full power, whose output noise takes below it for a poll now and
    then (a sensor out of the box, reading the air just below the target),
    would otherwise never reach the limit."""

    def __init__(
        self,
        name="Thermostat",
        *,
        temperature=20.0,
        target=15.0,
        max_temperature=MAX_TEMPERATURE,
        max_heater_on=MAX_HEATER_ON,
        stuck_after=STUCK_AFTER,
        valid_range=None,
        proportional=False,
    ):
        self.name = name
        self.temperature = temperature  # the last good reading (NaN before the first)
        self.target = parse_number(target, "target", TEMPERATURE_MIN, TEMPERATURE_MAX)
        self.max_temperature = parse_number(
            max_temperature, "maximum temperature", TEMPERATURE_MIN, TEMPERATURE_MAX
        )
        self.max_heater_on = max_heater_on
        self.stuck_after = stuck_after
        self.valid_range = valid_range
        self.regulator = Regulator(proportional=proportional)
        self.heater_on = False  # as last switched
        self.heater_power = 0.0  # as last given: 1 for an on/off heater on
        self.heater_known = True  # False after a failed switch: then it is switched off first
        self.heater_wanted = 0.0 if proportional else False  # within the limits: on/off, or a power
        self.sensor_fault = self.heater_fault = None
        self.over_max = False  # above max_temperature (until HYSTERESIS below it)
        self.on_time_alarm = False  # heater on for max_heater_on: latched until re-armed
        self._left_band = False  # the temperature was out of the band since the alarm tripped
        self.guard_fault = None  # why nothing outside the driver would switch the heater off
        self._on_since = None  # when the heater was switched on (clock)
        self._full_since = None  # when it was given full power (clock)
        self._dipped_since = None  # when a proportional heater's power fell below full, not to 0
        self._last_value = None  # the last value read, and since when
        self._value_since = None
        self._stuck = False

    @property
    def in_band(self):
        "True while the temperature is within the band of the target (and any ramp has arrived)."
        return self.regulator.in_band(self.temperature, self.target)

    @property
    def known_off(self):
        "True once the heater was last switched off, and successfully."
        return self.heater_known and not self.heater_on

    @property
    def safety(self):
        if self.on_time_alarm:
            limit = (
                f"the heater ran {self.max_heater_on:g} s without a break: it stays off until "
                f"the temperature is back within {HYSTERESIS:g} of the target, "
                "or a client sets the target"
            )
        elif self.over_max:
            limit = (
                f"the temperature is above the maximum {self.max_temperature:g}: the heater stays "
                f"off until it is {HYSTERESIS:g} below it"
            )
        else:
            limit = None
        heater = self.heater_fault or self.guard_fault
        regulator = self.regulator
        return Safety(self.sensor_fault, heater, limit, self.on_time_alarm,
                      regulator.effectiveness.reason, regulator.weather)  # fmt: skip

    def step(self, now, measured, clock=None):
        """Advance one poll at time now (an aware UTC datetime) and return the
        reading. measured is what the sensor read: degrees Celsius, or the
        exception that says why it could not."""
        clock = _seconds(now, clock)
        self._check(measured, clock)
        self._regulate(clock)
        return self.reading(now)

    def reading(self, now):
        "The reading as things stand (after the heater has been switched, say)."
        good = self.sensor_fault is None
        return Reading(now, self.temperature, self.heater_on, good and self.in_band, self.safety,
                       self.heater_power)  # fmt: skip

    def heater_command(self):
        """What the heater must be given now, or None: off after a failed
        switch (its state is then unknown), else the wanted state or power."""
        if not self.heater_known:
            return 0.0 if self.regulator.proportional else False
        current = self.heater_power if self.regulator.proportional else self.heater_on
        return None if self.heater_wanted == current else self.heater_wanted

    def heater_switched(self, on, now, error=None, clock=None):
        """Record the outcome of switching the heater on or off, or of giving
        it a power (error: the exception that says why it failed)."""
        if error is not None:
            self.heater_known = False
            state = f"to {on:.1%}" if type(on) is float else "on" if on else "off"
            self._set_fault("heater_fault", f"switching it {state} failed: {failure_reason(error)}")
            return
        power, at = float(on), _seconds(now, clock)
        if power > 0 and not self.heater_on:
            self._on_since = at
        if power >= 1 and self.heater_power < 1:
            dipped = self._dipped_since
            if dipped is None or at - dipped >= FULL_POWER_BREAK_S - EPSILON_S:
                self._full_since = at  # else a short dip: full power goes on from before it
            self._dipped_since = None
        elif 0 < power < 1 and self.heater_power >= 1:
            self._dipped_since = at
        elif power <= 0:
            self._dipped_since = None
        self.heater_on, self.heater_power, self.heater_known = power > 0, power, True
        if on == self.heater_wanted:
            self._set_fault("heater_fault", None)

    def heater_deadline(self):
        "When (clock) the heater-on limit runs out: math.inf unless the heater is at full power."
        if self.heater_power >= 1 and not self.on_time_alarm:
            return self._full_since + self.max_heater_on
        return math.inf

    def expire(self, clock):
        """Enforce the heater-on limit at clock, between polls: True if that
        latched the alarm (the heater is then wanted off)."""
        if self.heater_power >= 1 and not self.on_time_alarm and clock >= self.heater_deadline():
            self.on_time_alarm = True
            self._left_band = not self.in_band  # in it already: it must leave it and come back
            self.heater_wanted = self.regulator.hold(clock, self.safety.limit)
            logger.error("%s: %s", self.name, self.safety.limit)
            return True
        return False

    def guarded(self, problem):
        """problem: None while a guard would switch the heater off should the
        driver die, else why it would not; until it is None the heater is off."""
        self._set_fault("guard_fault", problem)
        if problem:
            self.heater_wanted = self.regulator.hold(None, problem)

    def stand_by(self):
        "Nothing is regulated now (the driver is disconnected): the heater is wanted off."
        self.heater_wanted = self.regulator.hold(None, "the thermostat was disconnected")

    def rearm(self):
        "A client's new target acknowledges a heater-on time alarm."
        if self.on_time_alarm:
            self.on_time_alarm = False
            logger.info("%s: heater-on time alarm re-armed by a new target", self.name)

    def _check(self, measured, now):
        "Take measured as the temperature if it is plausible; else say why not, in sensor_fault."
        fault = None
        valid = self.valid_range
        if isinstance(measured, int) and not isinstance(measured, bool):
            try:  # an int is taken as the float it stands for
                measured = float(measured)
            except OverflowError:  # one too large for a float (math.isfinite would raise)
                measured = math.inf
        if isinstance(measured, BaseException):
            fault = failure_reason(measured)
        elif (
            isinstance(measured, bool)
            or not isinstance(measured, (int, float))
            or not math.isfinite(measured)
        ):
            fault = f"{measured!r} is not a temperature"
        elif valid and not valid[0] <= measured <= valid[1]:
            fault = f"{measured:g} is outside the sensor's range, {valid[0]:g} to {valid[1]:g}"
        elif not TEMPERATURE_MIN <= measured <= TEMPERATURE_MAX:  # the range the driver declares
            fault = (
                f"{measured:g} is outside the thermostat's range, "
                f"{TEMPERATURE_MIN:g} to {TEMPERATURE_MAX:g}"
            )
        elif self._stuck_at(measured, now):
            fault = (
                f"stuck: it read {measured:g} for {self.stuck_after:g} s while the heater was on"
            )
        else:
            self.temperature = float(measured)
        self._set_fault("sensor_fault", fault)

    def _stuck_at(self, value, now):
        """True once value has been read unchanged for stuck_after seconds in
        which the heater was on throughout; it stays stuck, heater on or off,
        until the value changes."""
        if value != self._last_value:
            self._last_value, self._value_since, self._stuck = value, now, False
        elif self.heater_on and not self._stuck:
            unchanged_while_on = now - max(self._value_since, self._on_since)
            self._stuck = unchanged_while_on >= self.stuck_after
        return self._stuck

    def _regulate(self, now):
        "Decide heater_wanted: the regulator's on good readings, within the limits."
        good = self.sensor_fault is None
        if good:
            over_max = self.temperature > self.max_temperature or (
                self.over_max and self.temperature > self.max_temperature - HYSTERESIS
            )
            if over_max and not self.over_max:
                logger.warning(
                    "%s: above the maximum temperature %g: the heater is held off",
                    self.name,
                    self.max_temperature,
                )
            elif self.over_max and not over_max:
                logger.info("%s: back below the maximum temperature", self.name)
            self.over_max = over_max
            if self.on_time_alarm and not self.in_band:
                self._left_band = True
            elif self.on_time_alarm and self._left_band:  # back in the band on its own
                self.on_time_alarm = False
                logger.info(
                    "%s: heater-on time alarm re-armed: the temperature is back within the band",
                    self.name,
                )
        self.expire(now)
        if good and not self.over_max and not self.on_time_alarm and not self.guard_fault:
            self.heater_wanted = self.regulator.step(now, self.temperature, self.target)
        else:
            why = self.sensor_fault or self.safety.limit or self.guard_fault
            self.heater_wanted = self.regulator.hold(now, why)

    def _set_fault(self, kind, fault):
        "Set sensor_fault or heater_fault, logging each change."
        before = getattr(self, kind)
        if fault != before:
            setattr(self, kind, fault)
            what = kind.split("_")[0]
            if fault:
                logger.error("%s: %s: %s; the heater is held off", self.name, what, fault)
            else:
                logger.info("%s: %s works again", self.name, what)


# ---------------------------------------------------------------------------
# The temperature log: CSV files of good readings, one per log period, sent
# to clients as BLOBs and, with a log folder, written to disk as they grow.
# ---------------------------------------------------------------------------

MAX_FILE_BYTES = 1 << 20  # a log file is cut early at this size: the bound of one BLOB
MAX_UNWRITTEN_BYTES = 8 << 20  # log rows held in memory while log_dir cannot be written
DISK_TIMEOUT = 5.0  # seconds a log or configuration write may take before it counts as stalled


def file_prefix(devicename):
    """The start of a device's log file names. Letters, digits, space, '.',
    '_', '-' and '~' stand as they are; every other character is %-encoded
    ('/' as %2F, ':' as %3A), so that a name stays inside its folder, is
    valid on Linux, macOS and Windows, and no two devices share one; a very
    long name is cut, with a hash of the whole to keep it unique."""
    prefix = urllib.parse.quote(devicename, safe=" ")
    if len(prefix) > 100:
        prefix = f"{prefix[:80]}~{hashlib.sha256(devicename.encode()).hexdigest()[:12]}"
    return prefix


class LogFile:
    """One CSV file of the temperature log: rows `timestamp,temperature`,
    named <prefix>-<first reading's UTC time>.csv, with '-' for ':' in
    the time (the rows keep the INDI timestamps). Its content is held as
    bytes, the header first (a str per row would cost three times as much).
    Rows are only appended, whole, so any prefix of .data that ends after a
    row is whole rows (LogWriter's thread reads it while rows are added)."""

    HEADER = "timestamp,temperature\n"

    def __init__(self, prefix):
        self.prefix = prefix
        self.data = bytearray(self.HEADER.encode())  # bytes once finished: no spare capacity
        self.count = 0  # rows
        self.first = None  # the time of its first reading
        self.finished = False  # complete: no row is added any more

    @staticmethod
    def row(reading):
        return f"{indi_timestamp(reading.timestamp)},{reading.temperature:.2f}\n".encode()

    def add(self, reading, row):
        "Append row, the reading's row (see row())."
        if not self.count:
            self.first = reading.timestamp
        self.data += row
        self.count += 1

    def finish(self):
        "No row is added any more."
        self.finished = True
        self.data = bytes(self.data)

    @property
    def size(self):
        "bytes of its content"
        return len(self.data)

    @property
    def rows(self):
        "Its rows, as text (each with its newline)."
        return self.data[len(self.HEADER) :].decode().splitlines(keepends=True)

    @property
    def name(self):
        return f"{self.prefix}-{self.first:%Y-%m-%dT%H-%M-%S.%f}.csv"

    def content(self):
        return bytes(self.data)


_LOG_ROW = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?,-?\d+\.\d\d\n")


def whole_rows(data):
    "(bytes, rows) of data that form a well-formed log file: the header, then whole rows."
    if not data.startswith(LogFile.HEADER.encode()):
        return 0, 0
    end, rows = len(LogFile.HEADER), 0
    while (match := _LOG_ROW.match(data, end)) is not None:
        end, rows = match.end(), rows + 1
    return end, rows


def check_log_dir(folder):
    """Create folder if need be and check that files can be written in it, or
    raise ValueError saying why."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"log directory {folder} is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe, path = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(probe)
        os.unlink(path)
    except OSError as exc:
        raise ValueError(f"cannot write log files in {folder}: {exc.strerror or exc}") from None


class LogWriter:
    """Writes one device's log files into a folder as they grow, so that a
    crash or a power cut loses at most the reading being written: each row
    is appended to <name>.part and synced to the disk (fdatasync), and the
    file takes its final name, atomically, once complete. Partial files a
    crash left behind are completed at start (whole rows kept). When writing
    fails (disk full, folder removed, replaced or read-only), finished files
    wait in memory, up to max_unwritten bytes (the oldest dropped beyond),
    and the disk is caught up, oldest first, at the first retry that works
    (one every retry_seconds of readings). One error says when writing
    starts failing, one line when it works again; a file is never left with
    half a row.

    The disk is written in a thread of its own, so that a disk that stops
    answering (an SD card, a USB stick, a network mount) holds up neither
    the regulation nor the clients: while a write has not returned within
    timeout seconds, one error says so, and rows wait in memory as for a
    full disk. flush() waits for what is asked to be written. With
    background False, writes are made in the caller's thread instead."""

    def __init__(
        self,
        folder,
        prefix,
        *,
        max_unwritten=MAX_UNWRITTEN_BYTES,
        retry_seconds=1.0,
        timeout=DISK_TIMEOUT,
        background=True,
    ):
        check_log_dir(folder)
        self.folder, self.prefix = Path(folder), prefix
        self.max_unwritten, self.retry_seconds = max_unwritten, retry_seconds
        self.timeout, self.background = timeout, background
        self.stalled = False  # a write has not returned within timeout
        self._jobs = threading.Condition()  # guards unwritten and what follows
        self._wanted = None  # (current, now): what the writer thread is to write next
        self._busy_since = None  # time.monotonic() when the write under way began
        self._log_thread = None  # the writer thread, while it runs
        self.unwritten = collections.deque()  # finished files not yet on disk, oldest first
        self.unwritten_bytes = 0
        self.failure = None  # why writing fails, while it does
        self._retry_at = None
        self._open = None  # the LogFile whose .part is open as _fd
        self._fd = None
        self._bytes_on_disk = 0  # of _open's content, header included
        self.recover()

    def append(self, logfile, now):
        "logfile, the file being logged, has a new last row: put it on the disk."
        if self.failure is None or now >= self._retry_at:
            self._ask(logfile, now)

    def finish(self, logfile, now=None):
        """logfile is complete: it goes on the disk under its final name, at
        once or at a later retry (when now is None, writing is tried at once)."""
        with self._jobs:
            logfile.finish()
            self.unwritten.append(logfile)
            self.unwritten_bytes += logfile.size
            while self.unwritten_bytes > self.max_unwritten:
                dropped = self.unwritten.popleft()
                self.unwritten_bytes -= dropped.size
                logger.error(
                    "log rows waiting to be written to %s exceed %d bytes: dropped %s (%d rows)",
                    self.folder,
                    self.max_unwritten,
                    dropped.name,
                    dropped.count,
                )
        if self.failure is None or now is None or now >= self._retry_at:
            self._ask(None, now)

    def flush(self, timeout):
        "Wait up to timeout seconds for what was asked to be on the disk; False if it is not."
        with self._jobs:
            return self._jobs.wait_for(
                lambda: self._wanted is None and self._busy_since is None, timeout
            )

    def _ask(self, current, now):
        "Have the writer thread catch up (the latest ask wins: finished files wait in unwritten)."
        if not self.background:
            self._catch_up(current, now)
            return
        with self._jobs:
            self._wanted = (current, now)
            self._jobs.notify_all()
            if self._log_thread is None:
                self._log_thread = threading.Thread(
                    target=self._write_when_asked, daemon=True, name="thermostat-log-writer"
                )
                self._log_thread.start()
            busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.timeout:
            if not self.stalled:
                self.stalled = True
                logger.error(
                    "writing log files to %s has not returned within %g s (a disk that stopped "
                    "answering?): rows wait in memory, up to %g MiB",
                    self.folder,
                    self.timeout,
                    self.max_unwritten / 2**20,
                )

    def _write_when_asked(self, idle=1.0):
        "The writer thread: it ends once nothing was asked for idle seconds."
        while True:
            with self._jobs:
                if not self._jobs.wait_for(lambda: self._wanted is not None, idle):
                    self._log_thread = None
                    return
                (current, now), self._wanted = self._wanted, None
                self._busy_since = time.monotonic()
            try:
                self._catch_up(current, now)
            except Exception:
                logger.exception("writing log files to %s failed", self.folder)
            finally:
                with self._jobs:
                    self._busy_since = None
                    self._jobs.notify_all()
            if self.stalled:
                self.stalled = False
                logger.warning("writing log files to %s has returned", self.folder)

    def recover(self):
        "Complete the partial files of this device that a crash left behind; whole rows are kept."
        pattern = re.compile(
            re.escape(self.prefix) + r"-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{6}\.csv\.part"
        )
        for partial in sorted(self.folder.iterdir()):
            if not pattern.fullmatch(partial.name):
                continue
            final = partial.with_name(partial.name.removesuffix(".part"))
            try:
                length, rows = whole_rows(partial.read_bytes())
                if rows == 0 or final.exists():
                    partial.unlink()  # nothing to keep, or already complete
                    continue
                os.truncate(partial, length)
                with open(partial, "rb") as data:
                    os.fsync(data.fileno())
                os.rename(partial, final)
                self._sync_folder()
                logger.warning(
                    "completed %s, left unfinished by a crash: %d rows kept", final.name, rows
                )
            except OSError as exc:
                logger.error(
                    "cannot complete %s, left unfinished by a crash: %s",
                    partial,
                    exc.strerror or exc,
                )

    def _catch_up(self, current, now):
        "Write every finished file still unwritten, then current's new rows."
        try:
            while True:
                with self._jobs:
                    if not self.unwritten:
                        break
                    first = self.unwritten[0]
                self._open_for(first)
                self._append_rest()
                self._finalize()
                with self._jobs:  # unless finish() dropped it meanwhile
                    if self.unwritten and self.unwritten[0] is first:
                        self.unwritten_bytes -= self.unwritten.popleft().size
            if current is not None and current.count and not current.finished:
                self._open_for(current)  # (finished since it was asked: written above)
                self._append_rest()
        except OSError as exc:
            self._failed(exc, now)
            return
        if self.failure is not None:
            logger.warning("log files are written to %s again", self.folder)
            self.failure = None

    def _open_for(self, logfile):
        "Have logfile's .part open: still open, open again as far as it was written, or new."
        if self._open is logfile and self._fd is not None:
            return
        if self._open is logfile:  # after a failure: go on after its whole rows, if still there
            try:
                self._fd = os.open(self._partial(logfile), os.O_WRONLY | os.O_APPEND)
                if os.fstat(self._fd).st_size == self._bytes_on_disk:
                    return
            except OSError:
                pass
        self._close()
        self.folder.mkdir(parents=True, exist_ok=True)  # a folder removed meanwhile is made again
        self._fd = os.open(
            self._partial(logfile), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644
        )
        self._open, self._bytes_on_disk = logfile, 0
        self._write(logfile.data[: len(LogFile.HEADER)])
        self._sync_folder()

    def _append_rest(self):
        rows = self._open.data[self._bytes_on_disk :]  # whole rows (see LogFile)
        if not rows:
            return
        if os.fstat(self._fd).st_nlink == 0:
            raise FileNotFoundError(
                errno.ENOENT, "the partial log file was removed", str(self._partial(self._open))
            )
        self._write(rows)
        os.fdatasync(self._fd)

    def _write(self, data):
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        self._bytes_on_disk += written

    @property
    def _rows_on_disk(self):
        return self._bytes_on_disk > len(LogFile.HEADER)

    def _finalize(self):
        partial = self._partial(self._open)
        os.rename(partial, partial.with_name(self._open.name))
        self._close()
        self._sync_folder()

    def _failed(self, exc, now):
        if self._fd is not None:
            try:  # never half a row, nor a file without one
                if self._rows_on_disk:
                    os.ftruncate(self._fd, self._bytes_on_disk)
                else:
                    os.unlink(self._partial(self._open))
            except OSError:
                pass
        rows_kept_on_disk = self._open if self._rows_on_disk else None
        self._close()
        self._open = rows_kept_on_disk  # the next try goes on after them
        self._retry_at = (now or datetime.now(timezone.utc)) + timedelta(seconds=self.retry_seconds)
        if self.failure is None:
            self.failure = exc.strerror or str(exc)
            logger.error(
                "cannot write log files to %s (%s): they are kept in memory, up to %g MiB, "
                "and written when writing works again",
                self.folder,
                self.failure,
                self.max_unwritten / 2**20,
            )

    def _close(self):
        fd, self._fd, self._open = self._fd, None, None
        if fd is not None:
            os.close(fd)

    def _partial(self, logfile):
        return self.folder / f"{logfile.name}.part"

    def _sync_folder(self):
        "Make a new or renamed file's name durable, where the filesystem can sync a folder."
        folder = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(folder)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise
        finally:
            os.close(folder)


class TemperatureLog:
    """A device's temperature log. While logging, every good reading goes
    into the current log file, which is cut every log_period seconds, or
    early at max_file_bytes; finished files wait in a bounded backlog until
    sent. With a log_dir, every reading is also on disk as it is logged
    (see LogWriter: in a thread of its own unless background is False)."""

    def __init__(
        self,
        name="Thermostat",
        *,
        log_period=300.0,
        log_dir=None,
        max_backlog=16,
        max_file_bytes=MAX_FILE_BYTES,
        background=True,
    ):
        self.log_period = log_period
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.file_prefix = file_prefix(name)
        self.writer = None
        if log_dir is not None:
            self.writer = LogWriter(log_dir, self.file_prefix, background=background)
        self.backlog = collections.deque()
        self.max_backlog = max_backlog
        self.max_file_bytes = max_file_bytes
        self._logfile = None  # the file being written, None while logging is off
        self._period_start = None  # when the current file's log period began

    @property
    def logging(self):
        return self._logfile is not None

    def start(self, now):
        if not self.logging:
            self._logfile = LogFile(self.file_prefix)
            self._period_start = now

    def stop(self):
        "Stop logging; the partial file, if it has rows, joins the backlog (and log_dir, at once)."
        if self.logging:
            self._finish_file(None)
            self._logfile = None

    def flush(self, timeout=DISK_TIMEOUT):
        "Wait up to timeout seconds for the log rows to be on the disk (see LogWriter)."
        return self.writer is None or self.writer.flush(timeout)

    def next_unsent(self):
        "The oldest finished file not yet sent, or None."
        return self.backlog[0] if self.backlog else None

    def sent(self, logfile):
        "logfile has gone out: it leaves the backlog (unless a full backlog dropped it meanwhile)."
        if self.backlog and self.backlog[0] is logfile:
            self.backlog.popleft()

    def record(self, reading):
        "Log a reading, if logging and the reading is good."
        if not self.logging or reading.safety.sensor is not None:
            return
        now = reading.timestamp
        period = timedelta(seconds=self.log_period)  # read each time: clients may change it
        row = LogFile.row(reading)
        if now >= self._period_start + period:
            self._finish_file(now)
            self._logfile = LogFile(self.file_prefix)
            self._period_start += period
            if now >= self._period_start + period:  # polls were late: start afresh
                self._period_start = now
        elif self._logfile.size + len(row) > self.max_file_bytes:
            logger.warning(
                "log file %s reached %d bytes before its log period ended: cut there, "
                "the next file goes on",
                self._logfile.name,
                self._logfile.size,
            )
            self._finish_file(now)
            self._logfile = LogFile(self.file_prefix)
        self._logfile.add(reading, row)
        if self.writer is not None:
            self.writer.append(self._logfile, now)

    def _finish_file(self, now):
        logfile = self._logfile
        if not logfile.count:
            return
        if self.writer is not None:
            self.writer.finish(logfile, now)
        else:
            logfile.finish()
        self.backlog.append(logfile)
        if len(self.backlog) > self.max_backlog:
            dropped = self.backlog.popleft()
            kept = f", a copy is in {self.log_dir}" if self.log_dir is not None else ""
            logger.warning(
                "log backlog full (%d files unsent): dropped %s%s",
                self.max_backlog,
                dropped.name,
                kept,
            )


# ---------------------------------------------------------------------------
# Hardware. A sensor has read(): degrees Celsius, or an exception that says
# why not; a heater has switch(on), or for a proportional one set_power(fraction):
# returns once switched, or raises. Both may block (Hardware calls them in a
# worker thread, with a timeout, unless they say `instant = True`); a sensor
# may give `valid_range`.
# ---------------------------------------------------------------------------

SENSOR_RANGE = (-55.0, 125.0)  # the DS18B20's, and a plausible range for a command's readings
HARDWARE_TIMEOUT = 2.0  # seconds a read or switch may take (a DS18B20 read takes 0.75)
MAX_OUTPUT = 4096  # bytes a command may print: a reading or a switch's answer is a line


class W1Sensor:
    """A 1-wire sensor as Linux's w1_therm driver exposes it (a DS18B20 at
    /sys/bus/w1/devices/28-*): DIR/temperature holds millidegrees Celsius."""

    valid_range = SENSOR_RANGE

    def __init__(self, directory):
        self.path = Path(directory) / "temperature"

    def read(self):
        text = self.path.read_text().strip()
        if not text:
            raise ValueError(f"{self.path} is empty")
        millidegrees = parse_number(
            text, f"{self.path} (millidegrees)", SENSOR_RANGE[0] * 1000, SENSOR_RANGE[1] * 1000
        )
        if millidegrees == 85000:
            raise ValueError(
                f"{self.path} reads 85000, the DS18B20's power-on value, not a temperature"
            )
        return millidegrees / 1000


IIO_DEVICES = Path("/sys/bus/iio/devices")
HUMIDITY_RANGE = (0.0, 100.0)  # percent relative humidity
HUMIDITY_SATURATED = 110.0  # readings up to this are a saturated sensor's: taken as 100
_SYSFS_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")  # as IIO prints them: 21375, -0.0012


def find_iio_device(device, root=IIO_DEVICES):
    """The directory of the IIO device DEVICE: a path (any name with a '/'),
    a directory under root (iio:device0), or the one device under root whose
    `name` file holds DEVICE (bme280). LookupError, saying what there is, if
    none or several match."""
    if "/" in device:
        path = Path(device)
        if not path.is_dir():
            raise LookupError(
                f"{device} is not a directory (an IIO device's, such as {root}/iio:device0)"
            )
        return path
    root = Path(root)
    if device not in (".", "..") and (root / device).is_dir():
        return root / device
    found, names = [], []
    for entry in sorted(root.glob("iio:device*")):
        try:
            name = (entry / "name").read_text().strip()
        except OSError:
            continue
        names.append(f"{entry.name} ({name})")
        if name == device:
            found.append(entry)
    if len(found) == 1:
        return found[0]
    if found:
        raise LookupError(
            f"{len(found)} IIO devices are named {device!r}: "
            f"{', '.join(p.name for p in found)}; name one of them"
        )
    raise LookupError(
        f"no IIO device {device!r} under {root} (there: {', '.join(names) or 'none'})"
    )


class IIOSensor:
    """A temperature (and humidity) sensor as Linux's Industrial I/O
    subsystem exposes it (a BME280, HTU21D, DHT22, HDC100x ...):
    /sys/bus/iio/devices/iio:deviceN/in_temp_input in millidegrees C, or
    in_temp_raw with in_temp_scale and in_temp_offset, as
    (raw + offset) * scale; in_humidityrelative_* likewise in milli-percent.

    read() returns degrees Celsius or raises saying why. On a device with a
    humidity channel (has_humidity) each read() that got a temperature also
    reads the humidity, kept in last_humidity: (percent, None), or (None,
    why not). A humidity that cannot be read never fails read(): the
    thermostat runs on the temperature alone. Reading a file makes the
    kernel measure (it may take a while, or fail with EIO, as a DHT22
    often does): Hardware calls read() in a worker thread."""

    valid_range = SENSOR_RANGE

    def __init__(self, device, root=IIO_DEVICES):
        self.device, self.root = device, Path(root)
        self.by_name = "/" not in device and not (self.root / device).is_dir()
        self.directory = find_iio_device(device, self.root)
        if not self._has("temp"):
            raise LookupError(
                f"{self.directory} has no temperature channel "
                "(in_temp_input, or in_temp_raw and in_temp_scale)"
            )
        self.has_humidity = self._has("humidityrelative")
        self.last_humidity = (None, None if self.has_humidity else "the sensor has no humidity")

    def _has(self, channel):
        return any((self.directory / f"in_{channel}_{kind}").exists() for kind in ("input", "raw"))

    def read(self):
        try:
            self._relocate()
            low, high = SENSOR_RANGE
            temperature = self._channel("temp", "millidegrees Celsius", low * 1000, high * 1000)
        except Exception:
            if self.has_humidity:
                self.last_humidity = (None, "not read: the temperature could not be")
            raise
        if self.has_humidity:
            try:
                self.last_humidity = (self._humidity(), None)
            except (OSError, ValueError) as exc:  # all that reading a file and its number raise
                self.last_humidity = (None, failure_reason(exc))
        return temperature / 1000

    def humidity(self):
        "The relative humidity in percent, read now; or an exception saying why not."
        if not self.has_humidity:
            raise LookupError(f"{self.directory} has no humidity channel")
        self._relocate()
        return self._humidity()

    def _relocate(self):
        """A device found by its name is looked for again once its directory
        has gone (unbound and bound again, it can come back as another iio:deviceN)."""
        if self.directory.is_dir():
            return
        if not self.by_name:
            raise FileNotFoundError(errno.ENOENT, f"{self.directory} is gone")
        try:
            self.directory = find_iio_device(self.device, self.root)
        except LookupError as exc:
            raise FileNotFoundError(errno.ENOENT, f"{self.directory} is gone: {exc}") from None

    def _humidity(self):
        """Percent. Readings above 100, up to HUMIDITY_SATURATED, are a
        saturated sensor's (HTU21D's datasheet says to clamp them) and are
        taken as 100; higher ones are refused."""
        low, high = HUMIDITY_RANGE
        value = self._channel(
            "humidityrelative", "milli-percent", low * 1000, HUMIDITY_SATURATED * 1000
        )
        return min(value / 1000, high)

    def _channel(self, channel, unit, low, high):
        """The channel's value in its milli-unit: in_CHANNEL_input, or
        (in_CHANNEL_raw + in_CHANNEL_offset) * in_CHANNEL_scale; ValueError
        if it is not within low..high."""
        processed, raw, scale_file, offset_file = (
            self.directory / f"in_{channel}_{kind}" for kind in ("input", "raw", "scale", "offset")
        )
        if processed.exists():
            value, shown = self._number(processed), processed
        elif not raw.exists():
            raise FileNotFoundError(
                errno.ENOENT, f"{self.directory} has neither {processed.name} nor {raw.name}"
            )
        else:
            if not scale_file.exists():
                raise FileNotFoundError(
                    errno.ENOENT, f"{scale_file} is missing: {raw} cannot be scaled"
                )
            scale = self._number(scale_file)
            if not scale > 0:
                raise ValueError(f"{scale_file} must be above 0; it holds {scale:g}")
            offset = self._number(offset_file) if offset_file.exists() else 0.0
            reading = self._number(raw)
            value = (reading + offset) * scale
            shown = f"({raw} {reading:.6g} + offset {offset:.6g}) * scale {scale:.6g}"
        if not (math.isfinite(value) and low <= value <= high):
            raise ValueError(
                f"{shown} must be from {low:g} to {high:g} ({unit}); it reads {value:.6g}"
            )
        return value

    @staticmethod
    def _number(path):
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot read {path}: {exc.strerror or exc}") from None
        if not text:
            raise ValueError(f"{path} is empty")
        if not _SYSFS_NUMBER.fullmatch(text):
            raise ValueError(f"{path} holds {text[:40]!r}, which is not a number")
        return float(text)


def run_program(argv, timeout, max_output=MAX_OUTPUT):
    """Run argv without a shell, its stdin empty (under --stdio ours is the
    INDI stream); return its standard output, or raise saying why not.
    More than max_output bytes of output is a failed run, as is one not done
    within timeout seconds (output that never ends: `yes 21.5`); of its
    stderr the last max_output bytes are kept, for the message. A failed
    run's process group is killed. Memory stays within a few max_outputs."""
    name = shlex.join(argv)
    try:
        # its own session: Ctrl-C at a terminal, meant for us, must not cut short a heater's "off"
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise OSError(f"cannot run {name}: {exc.strerror or exc}") from None
    try:
        output, errors, failure = _read_output(child, time.monotonic() + timeout, max_output)
        if failure is not None:
            exited = child.poll() is not None
            _kill_group(child)  # its children too: they may hold the pipes
            if failure == "too long":
                raise RuntimeError(
                    f"{name} printed more than {max_output} bytes, more than a "
                    f"reading or an answer: it was stopped"
                )
            if exited:
                raise TimeoutError(
                    f"{name} exited, but a process it started kept its output open "
                    f"beyond {timeout:g} s"
                )
            raise TimeoutError(f"{name} did not finish within {timeout:g} s")
    finally:
        if child.poll() is None:
            _kill_group(child)  # failed, or an exception here: it must not run on
            try:
                child.wait(timeout=1)  # at once, unless stuck in the kernel (then left)
            except subprocess.TimeoutExpired:
                pass
        # One it started in a session of its own may hold the pipes: they are closed, not awaited.
        child.stdout.close()
        child.stderr.close()
    if child.returncode != 0:
        said = errors.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise RuntimeError(f"{name} exited with status {child.returncode}: {said[0]}")
    encoding = locale.getpreferredencoding(False)  # what text=True decoded with
    try:
        text = output.decode(encoding)
    except UnicodeDecodeError:
        raise ValueError(f"{name} printed bytes that are not {encoding} text") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text=True


def _kill_group(child):
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # all gone; or it is another user's (sudo): not ours to kill


def _read_output(child, deadline, max_output):
    """Read child's stdout (at most max_output + 1 bytes) and stderr (its
    last max_output bytes) until both end and it exits, or until deadline
    (time.monotonic). Return (stdout, stderr, None), or a failure instead
    of None: "too long" or "timeout"."""
    output, errors = bytearray(), bytearray()
    buffers = {child.stdout.fileno(): output, child.stderr.fileno(): errors}
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    while buffers:
        left = deadline - time.monotonic()
        if left <= 0:
            return output, errors, "timeout"
        for fd, _ in poller.poll(math.ceil(left * 1000)):
            buffer = buffers[fd]
            data = os.read(fd, max_output + 1 - len(output) if buffer is output else max_output)
            if not data:
                poller.unregister(fd)
                del buffers[fd]
                continue
            buffer += data
            if len(output) > max_output:
                return output, errors, "too long"
            del errors[:-max_output]
    try:
        child.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        return output, errors, "timeout"  # it closed its output, but runs on
    return output, errors, None


class CommandSensor:
    "A command that prints the temperature in degrees Celsius on its standard output."

    valid_range = SENSOR_RANGE

    def __init__(self, command, timeout=HARDWARE_TIMEOUT):
        self.argv, self.timeout = shlex.split(command), timeout

    def read(self):
        text = run_program(self.argv, self.timeout).strip()
        if not text:
            raise ValueError(f"{shlex.join(self.argv)} printed nothing")
        return parse_number(text, f"the output of {shlex.join(self.argv)}", *SENSOR_RANGE)


class CommandHeater:
    "A command run as `COMMAND on` and `COMMAND off` to switch the heater (a relay, a smart plug)."

    def __init__(self, command, timeout=HARDWARE_TIMEOUT):
        self.argv, self.timeout = shlex.split(command), timeout

    def switch(self, on):
        run_program([*self.argv, "on" if on else "off"], self.timeout)


class CommandPowerHeater:
    """A command run as `COMMAND PERCENT` (`COMMAND 37.5`; `COMMAND 0` is off)
    to give the heater a power: a proportional heater (a dimmer, a PWM board)."""

    def __init__(self, command, timeout=HARDWARE_TIMEOUT):
        self.argv, self.timeout = shlex.split(command), timeout

    def set_power(self, fraction):
        run_program([*self.argv, f"{round(fraction * 100, 1):g}"], self.timeout)


class GpioHeater:
    """A relay on a Linux GPIO line, through libgpiod's Python bindings
    (gpiod 2.x: pip install 'thermostat[gpio]'). The line is held as an
    output, inactive (heater off) from the start, for as long as the
    driver runs; active_low for the many relay boards that switch on low."""

    def __init__(self, chip, line, active_low=False):
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError:
            raise RuntimeError(
                "--heater gpio needs libgpiod's Python bindings: "
                "pip install 'thermostat[gpio]' (or pip install gpiod)"
            ) from None
        self.values = {True: Value.ACTIVE, False: Value.INACTIVE}
        self.line = int(line) if line.isdigit() else line
        path = (
            chip
            if "/" in chip
            else f"/dev/{chip}"
            if chip.startswith("gpiochip")
            else f"/dev/gpiochip{chip}"
        )
        settings = gpiod.LineSettings(
            direction=Direction.OUTPUT, active_low=active_low, output_value=Value.INACTIVE
        )

        def request():
            return gpiod.request_lines(path, consumer=DRIVER_EXEC, config={self.line: settings})

        try:
            try:
                self._request = request()
            except OSError as exc:
                holder = _line_consumer(gpiod, path, self.line)
                if exc.errno != errno.EBUSY or not stop_lingering_guard(holder):
                    raise
                self._request = request()  # it was held off by the guard of a driver that died
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot use GPIO line {line} of {path}: {exc}") from None

    def switch(self, on):
        self._request.set_value(self.line, self.values[on])


PWM_ROOT = "/sys/class/pwm"


class PwmHeater:
    """A heater on a PWM output through Linux's sysfs PWM interface (a dew
    heater, a MOSFET): pwm:CHIP:CHANNEL is PWM_ROOT/pwmchipCHIP/pwmCHANNEL,
    exported beforehand (echo CHANNEL > /sys/class/pwm/pwmchipCHIP/export),
    its period set. A power is that fraction of the period as the duty
    cycle; on is the whole period, off is 0."""

    def __init__(self, chip, channel, root=PWM_ROOT):
        self.directory = pwm_directory(chip, channel, root)
        if not (self.directory / "duty_cycle").exists():
            raise RuntimeError(
                f"no PWM output {self.directory}: export it first (echo {channel} > "
                f"{self.directory.parent}/export) and set its period"
            )

    def switch(self, on):
        duty = (self.directory / "period").read_text().strip() if on else "0"
        (self.directory / "duty_cycle").write_text(duty)
        if on:
            (self.directory / "enable").write_text("1")

    def set_power(self, fraction):
        "A power from 0 to 1 as that fraction of the period: a proportional heater (a dew strap)."
        period = int((self.directory / "period").read_text().strip())
        duty = round(period * min(max(fraction, 0.0), 1.0))
        (self.directory / "duty_cycle").write_text(str(duty))
        if duty:
            (self.directory / "enable").write_text("1")


def pwm_directory(chip, channel, root=PWM_ROOT):
    "The sysfs directory of pwm:CHIP:CHANNEL, or ValueError if they are not numbers."
    if not (chip.isdigit() and channel.isdigit()):
        raise ValueError(f"pwm:{chip}:{channel}: CHIP and CHANNEL are numbers, as in pwmchip0/pwm1")
    return Path(root) / f"pwmchip{int(chip)}" / f"pwm{int(channel)}"


# The heater guard. The driver starts it at start (start_heater_guard) and
# keeps the write end of a pipe whose read end is the guard's stdin. The
# pipe closes when the driver's process ends, however it ends; if the last
# thing written on it was not STOP_WORD, the guard switches the heater off:
# `CMD off`, 0 to a PWM duty_cycle, or a GPIO line requested as an output at
# its inactive level (the kernel released the driver's request). It never
# switches anything on. It runs in a session of its own (Ctrl-C and a
# closed terminal reach only the driver) and ignores SIGINT, SIGQUIT,
# SIGHUP and SIGTSTP. On SIGTERM (systemd's stop signals the whole cgroup at
# once) it waits up to `grace` seconds for the driver's word, then switches
# off: whatever ends it, except SIGKILL, it never ends leaving on a heater
# that it was not told is off. (SIGKILL too is covered under systemd:
# ExecStopPost runs --heater-off.)
#
# It is run as `python -I -S -c HEATER_GUARD_PROGRAM`, not as this file
# with a hidden option: the program is the running driver's own, whatever
# the install (pip, pip -e, `python thermostat.py`) and even if the file is
# replaced by an upgrade meanwhile; and it imports little beyond what
# Python loads to start (select, errno; no site, no asyncio, no indipydriver):
# 9.9 MiB resident on x86-64, where importing thermostat.py takes 27.5 MB,
# and armed 0.03 s after it starts. The GPIO kind alone imports gpiod, from
# the directory where the driver found it.

STOP_WORD = b"stop\n"
GUARD_GRACE = 10.0  # seconds a guard sent SIGTERM waits for the driver's word
GUARD_ARM_TIMEOUT = 10.0  # seconds the guard may take to start (a cold Raspberry Pi Zero)
GUARD_MARK = "# thermostat heater guard"
GUARD_CONSUMER = "thermostat-guard-"  # + its pid: the consumer of a GPIO line it holds

HEATER_GUARD_PROGRAM = (
    GUARD_MARK
    + r''' (issue 21): see HeaterGuard in thermostat.py.
# argv: grace timeout KIND WORDS...; stdin: the driver's pipe; stdout: reports to the driver.
import errno
import os
import select
import signal
import sys
import time

STOP_WORD = b"stop\n"
heard = bytearray()         # the last bytes the driver wrote


def say(text, log=True):
    "A line to the driver (HeaterGuard.problem reads the last) and, if log, to stderr."
    lines = [(1, text)] + ([(2, f"thermostat heater guard [{os.getpid()}]: {text}")] if log else [])
    for fd, line in lines:
        try:
            os.write(fd, (line + "\n").encode(errors="replace"))
        except OSError:
            pass                # the driver is gone, and its end of the pipe with it


def wait(wake, deadline=None):
    """Read the driver's pipe until it ends, a SIGTERM comes (a byte on wake)
    or deadline passes: "stop" (it ended after the stop word), "ended",
    "SIGTERM" or "time"."""
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return "time"
        ready = select.select([0, wake], [], [], left)[0]
        if wake in ready:
            os.read(wake, 64)
            return "SIGTERM"
        if ready:
            data = os.read(0, 512)
            if not data:
                return "stop" if heard == STOP_WORD else "ended"
            heard[:] = (bytes(heard) + data)[-len(STOP_WORD):]


def spawned(argv, timeout):
    "Run argv in a session of its own, stdin and stdout /dev/null; None, or why it failed."
    name = " ".join(argv)
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
    except OSError as exc:
        return f"cannot run {name}: {exc.strerror or exc}"
    deadline, killed = time.monotonic() + timeout, False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            if killed:
                return f"{name} did not finish within {timeout:g} s, nor end when killed"
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            deadline, killed = time.monotonic() + 1, True
        time.sleep(0.005)
    if killed:
        return f"{name} did not finish within {timeout:g} s"
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else f"{name} exited with status {code}"


def found(program):
    "Whether program can be run (as posix_spawnp looks for it)."
    if "/" in program:
        return os.access(program, os.X_OK)
    return any(os.access(os.path.join(folder or ".", program), os.X_OK)
               for folder in os.environ.get("PATH", os.defpath).split(os.pathsep))


def zero(path):
    "Write 0 to path (a PWM duty_cycle); None, or why it failed."
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)     # as `echo 0 >` opens it
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as exc:
        return f"cannot write 0 to {path}: {exc.strerror or exc}"
    return None


def arm(kind, words, timeout):
    """Check, while the driver runs, what switching off needs; return the
    action that switches off, which returns (None or why it failed, a GPIO
    request to hold or None)."""
    if kind in ("command", "command-power") and words:
        if not found(words[0]):
            raise RuntimeError(f"cannot find {words[0]}")
        off = "off" if kind == "command" else "0"  # command-power: power 0 %
        return lambda: (spawned([*words, off], timeout), None)
    if kind == "pwm" and len(words) == 1:
        if not os.access(words[0], os.W_OK):
            raise RuntimeError(f"cannot write to {words[0]}")
        return lambda: (zero(words[0]), None)
    if kind == "gpio" and len(words) == 4:
        chip, line, level, where = words
        if where:
            sys.path.insert(0, where)
        import gpiod
        from gpiod.line import Direction, Value
        if not os.path.exists(chip):
            raise RuntimeError(f"no GPIO chip {chip}")
        settings = gpiod.LineSettings(direction=Direction.OUTPUT, active_low=level == "active-low",
                                      output_value=Value.INACTIVE)
        line = int(line) if line.isdigit() else line

        def request():
            # The driver's request may not be released yet: its process is still being torn down.
            deadline = time.monotonic() + timeout
            while True:
                try:
                    held = gpiod.request_lines(chip, consumer=f"thermostat-guard-{os.getpid()}",
                                               config={line: settings})
                    return None, held
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        why = exc.strerror or exc
                        return f"cannot request GPIO line {line} of {chip}: {why}", None
                time.sleep(0.01)
        return request
    raise RuntimeError(f"no such heater kind: {' '.join([kind, *words])}")


def main(grace, timeout, kind, *words):
    for name in ("SIGINT", "SIGQUIT", "SIGHUP", "SIGTSTP", "SIGTTIN", "SIGTTOU"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)    # the terminal's, for the driver
    # SIGTERM interrupts nothing: it writes a byte on wake, which the waits watch.
    wake, woken = os.pipe()
    os.set_blocking(woken, False)
    signal.set_wakeup_fd(woken)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        switch_off = arm(kind, list(words), float(timeout))
    except Exception as exc:    # noqa: BLE001 - whatever keeps it from arming is said
        say(f"not armed: {exc}")
        return 2
    say("armed", log=False)
    outcome = terminated = wait(wake)
    if outcome == "SIGTERM":
        say(f"SIGTERM: waiting {float(grace):g} s for the driver's word that the heater is off")
        outcome = wait(wake, time.monotonic() + float(grace))
    if outcome == "stop":
        return 0                # the driver switched the heater off itself, and said so
    reason = {"ended": "the driver ended without saying that the heater is off",
              "time": "SIGTERM, and the driver did not say that the heater is off",
              "SIGTERM": "a second SIGTERM"}[outcome]
    for _ in range(2):
        error, held = switch_off()
        if error is None:
            break
    if error is not None:
        say(f"{reason}: switching the heater off failed: {error}")
        return 1
    say(f"{reason}: heater switched off")
    if held is not None:
        # A GPIO line, held at its inactive level until SIGTERM, for once released its level is
        # the kernel's (the Raspberry Pi's makes it an input: then the board's pull decides).
        if terminated != "SIGTERM":
            select.select([wake], [], [])
        held.release()
    return 0


sys.exit(main(*sys.argv[1:]))
'''
)


def guard_action(spec, pwm_root=PWM_ROOT):
    """What the guard of the heater a --heater SPEC names does to switch it
    off, as words for HEATER_GUARD_PROGRAM: None for the simulator, else
    ValueError saying what is wrong."""
    kind, _, rest = spec.partition(":")
    if spec == "simulator":
        return None
    if kind in ("command", "command-power"):
        try:
            argv = shlex.split(rest)
        except ValueError as exc:
            raise ValueError(
                f"argument --heater: cannot split {rest!r} into words: {exc}"
            ) from None
        if argv:
            return [kind, *argv]
    if kind == "pwm" and len(parts := rest.split(":")) == 2:
        try:
            return ["pwm", str(pwm_directory(*parts, root=pwm_root) / "duty_cycle")]
        except ValueError as exc:
            raise ValueError(f"argument --heater: {exc}") from None
    if (
        kind == "gpio"
        and (parts := rest.split(":"))
        and len(parts) in (2, 3)
        and all(parts)
        and parts[2:] in ([], ["active-low"])
    ):
        chip = parts[0]
        path = (
            chip
            if "/" in chip
            else f"/dev/{chip}"
            if chip.startswith("gpiochip")
            else f"/dev/gpiochip{chip}"
        )
        found = importlib.util.find_spec("gpiod")
        if found is None or found.origin is None:
            raise ValueError(
                "argument --heater: gpio needs libgpiod's Python bindings: "
                "pip install 'thermostat[gpio]' (or pip install gpiod)"
            )
        where = os.path.dirname(found.origin)
        if found.submodule_search_locations:
            where = os.path.dirname(where)  # a package: gpiod/__init__.py
        return ["gpio", path, parts[1], "active-low" if len(parts) == 3 else "active-high", where]
    raise ValueError(
        f"argument --heater: {spec!r} is not simulator, command:CMD, command-power:CMD, "
        f"gpio:CHIP:LINE[:active-low] or pwm:CHIP:CHANNEL"
    )


class HeaterGuard:
    """The driver's side of a heater guard (see HEATER_GUARD_PROGRAM): start()
    it before the heater is first switched; at a clean stop, once the heater
    is known off, stand_down(); if it may still be on, close(). problem() is
    None while the guard is armed, else why not (for SAFETY_STATUS)."""

    def __init__(self, action, timeout=HARDWARE_TIMEOUT, grace=GUARD_GRACE, python=None, env=None):
        self.argv = [
            python or sys.executable,
            "-I",
            "-S",
            "-c",
            HEATER_GUARD_PROGRAM,
            f"{grace:g}",
            f"{timeout:g}",
            *action,
        ]
        self.env = env
        self.process = None
        self._pipe = None  # the write end: its closing without STOP_WORD is the alarm
        self._reports = None  # the read end of the guard's reports
        self._said = ""  # its last report
        self._unread = b""
        self._stood_down = False

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    def start(self, arm_timeout=GUARD_ARM_TIMEOUT):
        """Start the guard; return once it is armed, or raise RuntimeError saying why it is not."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the heater guard is already running")
        self.close()
        watched, pipe = os.pipe()
        reports, reporting = os.pipe()
        try:
            # a session of its own: a terminal's Ctrl-C or hang-up, meant for the driver, misses it
            self.process = subprocess.Popen(
                self.argv,
                stdin=watched,
                stdout=reporting,
                close_fds=True,
                start_new_session=True,
                env=self.env,
            )
        except OSError as exc:
            os.close(pipe)
            os.close(reports)
            raise RuntimeError(f"cannot start the heater guard: {exc.strerror or exc}") from None
        finally:
            os.close(watched)
            os.close(reporting)
        self._pipe, self._reports, self._said, self._unread = pipe, reports, "", b""
        self._stood_down = False
        deadline = time.monotonic() + arm_timeout
        while self._said == "" and (left := deadline - time.monotonic()) > 0:
            if not select.select([reports], [], [], left)[0] or not self._read_reports():
                break
        if self._said != "armed":
            self.process.kill()
            self.process.wait()
            self.close()
            said = self._said or f"it said nothing within {arm_timeout:g} s"
            said = said.removeprefix("not armed: ")
            raise RuntimeError(f"the heater guard did not start: {said}")
        os.set_blocking(reports, False)
        return self

    def problem(self):
        "None while the guard watches over the heater, else why it does not, in a sentence."
        if self.process is None:
            return "no heater guard was started"
        self._read_reports()
        status = self.process.poll()
        if status is None or (status == 0 and self._stood_down):
            return None
        if status < 0:
            try:
                what = f"was killed by {signal.Signals(-status).name}"
            except ValueError:  # a real-time signal but the first and last has no name
                what = f"was killed by signal {-status}"
        else:
            what = f"exited with status {status}"
        said = f" ({self._said})" if self._said not in ("", "armed") else ""
        return f"the heater guard {what}{said}: nothing switches the heater off if the driver dies"

    def stand_down(self, timeout=2.0):
        """The heater is known off and the driver stops: tell the guard, which
        then exits without switching anything. True once it has exited, and
        cleanly, within timeout seconds."""
        if self._pipe is not None:
            try:
                os.write(self._pipe, STOP_WORD)
            except OSError:
                pass  # it died: problem() says so
        self._stood_down = True
        self.close()
        return self._exited(timeout) == 0

    def close(self, timeout=0):
        """Close the pipe without the stop word, as a driver that ends with the
        heater perhaps on: the guard switches it off. Return the guard's exit
        status if it ended within timeout seconds, else None."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        status = self._exited(timeout)
        if self._reports is not None and status is not None:
            self._read_reports()
            os.close(self._reports)
            self._reports = None
        return status

    def _exited(self, timeout):
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _read_reports(self):
        "Take in what the guard reported; False at the end of its reports."
        if self._reports is None:
            return False
        try:
            data = os.read(self._reports, 4096)
        except BlockingIOError:
            return True
        lines = (self._unread + data).split(b"\n")
        self._unread = lines.pop()[-4096:]
        if lines:
            self._said = lines[-1].decode(errors="replace")
        return bool(data)


def start_heater_guard(
    spec, timeout=HARDWARE_TIMEOUT, grace=GUARD_GRACE, pwm_root=PWM_ROOT, env=None
):
    """Start and return the guard of the heater a --heater SPEC names (None
    for the simulator); ValueError for a bad SPEC, RuntimeError if it does not start."""
    action = guard_action(spec, pwm_root)
    return None if action is None else HeaterGuard(action, timeout, grace, env=env).start()


def stop_lingering_guard(consumer, timeout=2.0):
    """A guard holds a GPIO line off after its driver died, until SIGTERM. A
    new driver that finds the line busy, its consumer being such a guard
    (GUARD_CONSUMER + pid), ends it here; True once it has gone, and the
    line can be requested."""
    match = re.fullmatch(re.escape(GUARD_CONSUMER) + r"(\d+)", consumer or "")
    if match is None:
        return False
    pid = int(match[1])
    try:
        if GUARD_MARK.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False  # that pid is not (or no longer) a guard's
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                return True  # ended, not yet reaped by its new parent
        except OSError:
            return True
        time.sleep(0.01)
    return False


def _line_consumer(gpiod, path, line):
    "The consumer holding a GPIO line, or None if that cannot be told."
    try:
        with gpiod.Chip(path) as chip:
            return chip.get_line_info(line).consumer
    except (OSError, ValueError, AttributeError):
        return None


def in_thread(function, *args):
    """Run a blocking call in a daemon thread; return a future of its result.
    Unlike asyncio.to_thread, a call that never returns holds up neither
    the event loop nor the program's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    future.add_done_callback(
        lambda done: done.cancelled() or done.exception()
    )  # retrieved: no warning

    def settle(result, error):
        if not future.done():
            future.set_result(result) if error is None else future.set_exception(error)

    def run():
        try:
            result, error = function(*args), None
        except Exception as exc:
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop has closed: nobody waits for this any more

    threading.Thread(target=run, daemon=True, name="thermostat-hardware").start()
    return future


def _resolve(future, result):
    if not future.done():
        future.set_result(result)


def _is_instant(device):
    "True for a sensor or heater called in the event loop (the simulator), not in a worker thread."
    return getattr(device, "instant", False)


class Hardware:
    """The sensor and heater of one thermostat as its driver uses them: the
    one place that knows worker threads, timeouts, switching one at a time
    and switching off at stop. A slow sensor is read, and a slow heater
    switched, in a worker thread within timeout seconds; the outcome of
    every switch is recorded in the model. With a guard (HeaterGuard), the
    heater is switched on only while the guard watches over it. clock is
    the safety timers' (monotonic) clock."""

    def __init__(self, sensor, heater, timeout=HARDWARE_TIMEOUT, guard=None, clock=time.monotonic):
        self.sensor, self.heater, self.timeout = sensor, heater, timeout
        self.guard, self.clock = guard, clock
        self.proportional = is_proportional(heater)
        self._sensor_read = self._heater_switch = None  # calls still running in a worker thread
        self._switching = threading.Lock()  # held by a heater switch in a worker thread
        self._stops = 0  # offs at stop so far: a switch asked before the last one is not made
        self._interrupted = asyncio.Event()  # the driver stops: a wait for the sensor ends

    def interrupt(self):
        "End a wait for a slow sensor at once: the driver stops."
        self._interrupted.set()

    def resume(self):
        self._interrupted.clear()

    @property
    def interrupted(self):
        "True from a stop until resume()."
        return self._interrupted.is_set()

    async def read(self):
        """A reading: degrees, or the exception saying why there is none. A
        slow sensor's read that has not returned in time is waited for again
        at the next poll rather than started anew, so that a hung sensor
        holds one thread, not one per poll. A stop does not wait for it."""
        if _is_instant(self.sensor):
            try:
                result = self.sensor.read()
            except Exception as exc:
                return exc
        else:
            if self._sensor_read is None or self._sensor_read.done():
                self._sensor_read = in_thread(self.sensor.read)
            read, loop = self._sensor_read, asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while not read.done() and (left := deadline - loop.time()) > 0:
                if self._interrupted.is_set():
                    break
                interrupted = asyncio.ensure_future(self._interrupted.wait())
                await asyncio.wait(
                    {read, interrupted}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                interrupted.cancel()
            if not read.done():
                return TimeoutError(f"no reading within {self.timeout:g} s")
            if read.exception() is not None:
                return read.exception()
            result = read.result()
        return ValueError("the sensor's read() returned None") if result is None else result

    async def follow(self, model, in_control):
        """Switch the heater (or give it a power) as the model asks, a failed
        switch followed at once by a switch off. False if in_control() turned False while the
        heater switched (a disconnect or a stop, which switched it off)."""
        for _ in range(2):
            if (on := model.heater_command()) is None:
                break
            await self.switch(model, on)
            if not in_control():
                return False
        return True

    def guard_problem(self):
        "None unless a guard was started and no longer watches over the heater: then why."
        return None if self.guard is None else self.guard.problem()

    async def switch(self, model, on):
        "Switch the heater (a slow one in a worker thread) and record the outcome in the model."
        if on and (problem := self.guard_problem()):
            model.guarded(problem)  # never on without the guard: it is the one that would switch
            return  # the heater off if this process died
        if _is_instant(self.heater):
            self.switch_now(model, on)
            return
        # One switch at a time, in the order asked: an off waits for an on still under way
        # (a disconnect during a poll's switch), or the on would land after it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (under_way := self._heater_switch) is not None and not under_way.done():
            if (left := deadline - loop.time()) <= 0:
                break
            await asyncio.wait([under_way], timeout=left)
        if under_way is not None and not under_way.done():
            error = TimeoutError(
                f"the switch before this one has not answered in {self.timeout:g} s"
            )
        elif on and (problem := self.guard_problem()):  # the guard died while this waited
            model.guarded(problem)
            return
        else:
            self._heater_switch = switching = in_thread(self._switch_in_turn, on, self._stops)
            # asyncio.wait, not wait_for: Python 3.11's wait_for drops a cancellation (a
            # stop) that comes as the switch answers, and the control loop would run on
            try:
                await asyncio.wait([switching], timeout=self.timeout)
            except asyncio.CancelledError:
                if switching.done() and switching.exception() is None:
                    self._record(model, on)  # made all the same
                raise
            if not switching.done():
                error = TimeoutError(f"no answer within {self.timeout:g} s")
            else:
                error = switching.exception()
        self._record(model, on, error)

    def _switch_in_turn(self, on, stops):
        """Switch the heater, in a worker thread; at stop, switch_off_at_stop waits its turn.
        A switch whose thread comes to its turn only after an off at stop (asked before
        it, its thread not yet scheduled) is not made: the off must be the last word."""
        with self._switching:
            if stops != self._stops:
                raise RuntimeError("not made: the heater was switched off at stop meanwhile")
            self._apply(on)

    def _apply(self, on):
        "on: on or off, or a power 0..1; a proportional heater is given it as a power."
        if self.proportional:
            self.heater.set_power(float(on))
        else:
            self.heater.switch(bool(on))

    def switch_now(self, model, on, now=None):
        """Switch the heater here and now (recorded at now, by default the
        time it switched); return None, or the exception that says why it
        failed."""
        try:
            self._apply(on)
        except Exception as exc:
            self._record(model, on, exc, now)
            return exc
        self._record(model, on, None, now)
        return None

    def _record(self, model, on, error=None, now=None):
        clock = self.clock() if now is None else None  # a time given is the timers' time too
        model.heater_switched(on, now or datetime.now(timezone.utc), error, clock=clock)
        if error is None and isinstance(self.sensor, Simulator) and self.sensor is not self.heater:
            self.sensor.set_power(float(on))  # a simulated sensor warms with a real heater too

    def switch_off_at_stop(self, model):
        """Switch the heater off here and now, whatever else is pending: the
        driver is stopping. A switch still running in a worker thread (an on,
        say, that the stop did not wait for) is let finish first, for at most
        timeout: the off must be the last word. A failed off is tried once
        more; return None, or the exception that says why it failed (also
        when the switch before has still not finished: it may land after the
        off, so the heater may be on, and the guard must switch it off)."""
        self._stops += 1  # a switch asked before this whose thread has not yet taken its turn
        in_turn = self._switching.acquire(timeout=self.timeout)
        try:
            for _ in range(2):
                if (error := self.switch_now(model, False)) is None:
                    break
        finally:
            if in_turn:
                self._switching.release()
        if error is None and not in_turn:
            error = TimeoutError(
                f"the switch before the off has not answered in {self.timeout:g} s: "
                "it may land after the off"
            )
            self._record(model, False, error)  # the heater's state is unknown
        return error


# ---------------------------------------------------------------------------
# libindi's device conventions: the standard properties, DEBUG, and the
# configuration file, as libindi's DefaultDevice has them; its weather numbers.
# ---------------------------------------------------------------------------

DRIVER_EXEC = "indi_thermostat"
AUX_INTERFACE = "32768"  # libindi's DRIVER_INTERFACE bit for auxiliary devices
POLL_PERIOD_MS = (10, 600000)  # libindi's POLLING_PERIOD range
SAFETY_LIMITS = "limitsvector"  # the maximum temperature and heater-on time
# The properties kept in the configuration file, as libindi's drivers keep theirs.
SAVED_PROPERTIES = ("targetvector", "POLLING_PERIOD", "logperiodvector", SAFETY_LIMITS, "DEBUG",
                    "CONTROL_MODE", "REGULATION_SETTINGS", "PID_SETTINGS", "CONTROL_CYCLE",
                    "TARGET_RAMP", "ACTIVE_DEVICES")  # fmt: skip
CONFIG_MAX_BYTES = 64 * 1024  # a saved configuration is a few hundred bytes
SAVE_SPACING = 0.1  # seconds between writes of the file in a burst of changes
REQUEST_TAGS = ("newTextVector", "newNumberVector", "newSwitchVector")


def widened(limits, value):
    "A NumberMember's min and max: limits, widened to hold value."
    return dict(min=min(limits[0], value), max=max(limits[1], value))


def check_ceiling(vector, values):
    """ValueError if a request raises a limit above its declared maximum, the
    operator's ceiling: a client may tighten the safety limits, never loosen them."""
    for member in set(vector.data) & set(values):
        ceiling = float(vector.data[member].max)
        try:
            wanted = parse_number(values[member], member, -math.inf, math.inf)
        except ValueError:
            continue  # not a number: the range check says so
        if wanted > ceiling:
            raise ValueError(
                f"{member} must be at most the operator's limit {ceiling:g} (a client may "
                f"tighten the safety limits, never loosen them); received {values[member]!r}"
            )


def control_properties(poll_interval):
    "libindi's CONNECTION, DRIVER_INFO and POLLING_PERIOD, as its clients (Ekos) expect them."
    return [
        SwitchVector("CONNECTION", "Connection", "Main Control", "rw", "OneOfMany", "Ok", [
            SwitchMember("CONNECT", "Connect", membervalue="On"),
            SwitchMember("DISCONNECT", "Disconnect", membervalue="Off")]),
        TextVector("DRIVER_INFO", "Driver Info", "General Info", "ro", "Idle", [
            TextMember("DRIVER_NAME", "Name", membervalue="Thermostat"),
            TextMember("DRIVER_EXEC", "Exec", membervalue=DRIVER_EXEC),
            TextMember("DRIVER_VERSION", "Version", membervalue=__version__),
            TextMember("DRIVER_INTERFACE", "Interface", membervalue=AUX_INTERFACE)]),
        NumberVector("POLLING_PERIOD", "Polling", "Options", "rw", "Ok", [
            # a declared range holds every value sent, one given here beyond libindi's range too
            NumberMember("PERIOD_MS", "Period (ms)", format="%.f",
                         **widened(POLL_PERIOD_MS, poll_interval * 1000), step=1000,
                         membervalue=f"{poll_interval * 1000:.0f}")]),
    ]  # fmt: skip


def option_properties(debug):
    "libindi's DEBUG and CONFIG_PROCESS."
    return [
        SwitchVector("DEBUG", "Debug", "Options", "rw", "OneOfMany", "Idle", [
            SwitchMember("ENABLE", "Enable", membervalue="On" if debug else "Off"),
            SwitchMember("DISABLE", "Disable", membervalue="Off" if debug else "On")]),
        SwitchVector("CONFIG_PROCESS", "Configuration", "Options", "rw", "AtMostOne", "Idle", [
            SwitchMember("CONFIG_LOAD", "Load", membervalue="Off"),
            SwitchMember("CONFIG_SAVE", "Save", membervalue="Off"),
            SwitchMember("CONFIG_DEFAULT", "Default", membervalue="Off"),
            SwitchMember("CONFIG_PURGE", "Purge", membervalue="Off")]),
    ]  # fmt: skip


@dataclass(frozen=True)
class DewPoint:
    "The local dew point (degrees C), the relative humidity (percent) it comes from, and when."

    celsius: float
    humidity: float
    timestamp: datetime


def weather_properties(weather):
    """libindi's weather numbers (INDI::WeatherInterface's WEATHER_PARAMETERS,
    with the names and labels of its auxiliary drivers), for a sensor that
    has humidity; none for one that has not."""
    if weather is None:
        return []
    return [
        NumberVector("WEATHER_PARAMETERS", "Parameters", "Environment", "ro", "Idle", [
            NumberMember("WEATHER_HUMIDITY", "Humidity %", format="%.2f", min=0, max=100,
                         membervalue="0"),
            # every dew point the formula gives within the sensor's range
            NumberMember("WEATHER_DEWPOINT", "Dew Point (C)", format="%.2f", min=-MAGNUS_C,
                         max=SENSOR_RANGE[1], membervalue="0")]),
    ]  # fmt: skip


class LocalWeather:
    """The humidity a sensor reads beside the temperature (IIOSensor's
    last_humidity), and the dew point it gives, as WEATHER_PARAMETERS.
    update() takes each poll's measurement; dew_point is then the last good
    DewPoint, its timestamp that poll's: a poll without a good humidity
    leaves it as it was, older, so that a user of it can tell it is stale."""

    def __init__(self, sensor):
        self.sensor = sensor
        self.dew_point = None  # the last good DewPoint
        self.timestamp = None  # of the last update
        self.problem = None  # why the last update has no dew point
        self.sensor_failed = False  # the last update had no reading at all
        self._said = None  # the humidity problem last told clients

    @classmethod
    def of(cls, sensor):
        "A LocalWeather for a sensor that has humidity, else None."
        return cls(sensor) if getattr(sensor, "has_humidity", False) else None

    def update(self, now, measured):
        "measured: the temperature the sensor read with its humidity, or the exception it raised."
        self.timestamp, self.problem = now, None
        self.sensor_failed = isinstance(measured, Exception)
        if self.sensor_failed:
            self.problem = "the sensor could not be read"
            return
        humidity, self.problem = self.sensor.last_humidity
        if self.problem is None:
            try:
                self.dew_point = DewPoint(dew_point(measured, humidity), humidity, now)
            except (TypeError, ValueError) as exc:
                self.problem = failure_reason(exc)

    async def publish(self, vector):
        """WEATHER_PARAMETERS as of the last update: Ok, or Alert with the
        values as they were. A humidity problem is told once, as it starts; a
        sensor that fails altogether is told once already, by the temperature."""
        if self.timestamp is None:
            return
        message = ""
        if not self.sensor_failed and self.problem != self._said:
            message = (
                f"[WARNING] humidity: {self.problem}"
                if self.problem
                else "the humidity reads again"
            )
            self._said = self.problem
        if self.problem is None:
            vector["WEATHER_HUMIDITY"] = f"{self.dew_point.humidity:.2f}"
            vector["WEATHER_DEWPOINT"] = f"{self.dew_point.celsius:.2f}"
        state = "Alert" if self.problem else "Ok"
        await vector.send_setVector(message=message, state=state, timestamp=self.timestamp)


def one_switched_on(values, vectorname, first, second):
    "True if first is the one On, False if second is; ValueError unless exactly one is."
    wanted = [name for name, value in values.items() if value == "On"]
    if len(wanted) != 1:
        raise ValueError(f"{vectorname} takes exactly one of {first} and {second} On")
    return wanted == [first]


class DebugLogging:
    """DEBUG as libindi's drivers have it: a device's debug detail, and the
    XML its driver exchanges, which indipydriver logs on its own logger for
    drivers with debug_enable. That logger is lowered to DEBUG while any
    driver has DEBUG on, and given back its level when the last turns it off."""

    _foundation = logging.getLogger(IPyDriver.__module__)
    _enabled = {}  # id -> weak reference of each driver with DEBUG on, in this process
    _level_before = None

    def __init__(self, driver, log):
        self.driver, self.log = driver, log

    def set(self, enable):
        self.log.setLevel(logging.DEBUG if enable else logging.NOTSET)
        self.driver.debug_enable = enable
        enabled, key = DebugLogging._enabled, id(self.driver)
        if enable and key not in enabled:
            if not enabled:
                DebugLogging._level_before = self._foundation.level
                self._foundation.setLevel(logging.DEBUG)
            # a driver dropped with DEBUG on counts no more
            enabled[key] = weakref.ref(self.driver, lambda _: DebugLogging._forget(key))
        elif not enable and key in enabled:
            DebugLogging._forget(key)

    @classmethod
    def _forget(cls, key):
        if cls._enabled.pop(key, None) is not None and not cls._enabled:
            cls._foundation.setLevel(cls._level_before)

    def setter(self, values):
        "DEBUG as a saved setting: its values checked, and what applies them (see ThermoDriver)."
        enable = one_switched_on(values, "DEBUG", "ENABLE", "DISABLE")

        def apply():
            vector = self.driver.device["DEBUG"]
            changed = enable != (vector["ENABLE"] == "On")
            self.set(enable)
            vector["ENABLE"], vector["DISABLE"] = ("On", "Off") if enable else ("Off", "On")
            if changed:
                return f"Debug is {'enabled' if enable else 'disabled'}."
            return None

        return apply


def config_path(devicename):
    """Where libindi keeps a device's configuration: the file $INDICONFIG names,
    else ~/.indi/<device>_config.xml."""
    return Path(os.environ.get("INDICONFIG") or Path.home() / ".indi" / f"{devicename}_config.xml")


def new_request(vector):
    "The new*Vector request that sets vector to its current values, as libindi saves a property."
    request = ET.Element(f"new{vector.vectortype}", device=vector.devicename, name=vector.name)
    for name in vector:
        member = ET.SubElement(request, f"one{vector.vectortype.removesuffix('Vector')}", name=name)
        member.text = str(vector[name])
    return request


def _read_config_root(path):
    if Path(path).exists() and not Path(path).is_file():
        raise ValueError("not a regular file")  # a FIFO would hold the driver up at open()
    with open(path, "rb") as file:
        data = file.read(CONFIG_MAX_BYTES + 1)
    if len(data) > CONFIG_MAX_BYTES:
        raise ValueError(f"larger than {CONFIG_MAX_BYTES} bytes")
    if re.search(rb"<!(DOCTYPE|ENTITY)", data):
        raise ValueError("it declares a DOCTYPE or entities")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"not XML ({exc})") from None
    if root.tag != "INDIDriver":
        raise ValueError(f"its root is <{root.tag}>, not <INDIDriver>")
    return root


def read_config(path, devicename):
    """The requests saved for devicename in a configuration file in
    libindi's format; raise OSError, or ValueError if the file holds
    anything but saved properties."""
    requests = []
    for request in _read_config_root(path):
        if request.get("device") != devicename:
            continue  # another device's, in a file they share
        if request.tag not in REQUEST_TAGS or request.get("name") not in SAVED_PROPERTIES:
            raise ValueError(
                f"<{request.tag[:40]} name={request.get('name', '')[:40]!r}> "
                f"is not a saved property"
            )
        requests.append(request)
    return requests


def write_config(path, devicename, requests):
    """Write devicename's requests to a configuration file, in libindi's
    format, keeping other devices' entries; atomically, so that a crash
    leaves the old file or the new one."""
    path = Path(path)
    try:  # other devices' requests, if they are plain ones
        others = [
            e
            for e in _read_config_root(path)
            if e.get("device") != devicename
            and e.tag in REQUEST_TAGS
            and not any(len(member) for member in e)
        ]
    except (OSError, ValueError):
        others = []
    root = ET.Element("INDIDriver")
    root.extend([*others, *requests])
    ET.indent(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with open(descriptor, "wb") as file:
            file.write(ET.tostring(root) + b"\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        os.unlink(partial)
        raise


def config_problem(path, exc):
    "What is wrong with a configuration file, in one line."
    if isinstance(exc, OSError):
        return f"configuration file {path}: {exc.strerror or exc}"
    return f"configuration file {path} not used: {exc}"


class DeviceAnswers:
    """How a device answers requests it does not carry out, as libindi's
    drivers do: Alert on the request's vector, with a message of at most 200
    characters saying why; a request with no vector to answer on (an unknown
    or read-only property) gets a device message instead, at most 20 a
    minute, the next one counting the rest: every client of the device sees
    it, and one client's flood must not become everyone's."""

    def __init__(self, device):
        self.device = device
        self.refusals = Throttle(limit=20, period=60.0)

    async def accept(self, root):
        """The event for a client's new*Vector to this device, or None once it
        is answered as one that cannot be used."""
        device, name = self.device, root.get("name")
        vector = device.get(name)
        if vector is None or not vector.enable:
            await self.refuse(
                name or "(no name)", f"no such property on device {device.devicename}"
            )
        elif vector.perm == "ro":
            await self.refuse(name, "is read-only; the request was ignored")
        else:
            try:
                return request_event(vector, root)
            except ValueError as exc:
                await self.reject(vector, str(exc))
        return None

    async def reject(self, vector, message, level="WARNING"):
        "Answer a request that cannot be carried out: Alert, the values unchanged, and why."
        message = clipped(message, 200 - len(f"[{level}] "))
        logger.log(logging.getLevelName(level), "%s.%s: %s", self.device.devicename, vector.name,
                   message)  # fmt: skip
        await vector.send_setVector(message=f"[{level}] {message}", state="Alert")

    async def refuse(self, name, message):
        "Answer a request with no vector to answer on (unknown or read-only): a device message."
        name, message = clipped(name, 40), clipped(message)
        logger.warning("%s.%s: %s", self.device.devicename, name, message)
        passes, held_back = self.refusals.passes("refusal", asyncio.get_running_loop().time())
        if held_back:
            message += f" ({held_back} more refusals were not sent in the minute before)"
        if passes:
            await self.device.send_device_message(message=f"[WARNING] {name}: {message}")


class SettingsRefused(Exception):
    "A CONFIG_PROCESS action that cannot be carried out: the message, and its level."

    def __init__(self, message, level="WARNING"):
        super().__init__(message)
        self.level = level


class SavedSettings:
    """A device's configuration file, as libindi's drivers keep theirs: the
    SAVED_PROPERTIES' values as new*Vector requests, in a file other devices
    may share. Every accepted change is saved at once by save_soon(), in a
    worker thread (the answer to a request does not wait for the disk); a
    burst of changes is written at most every SAVE_SPACING seconds, the
    latest values last. The file is read and written off the event loop,
    and a disk that does not answer within DISK_TIMEOUT is said to hang:
    the driver goes on (a hung write is waited for before the next)."""

    def __init__(self, path, device, setters, given=()):
        self.path = Path(path) if path is not None else None
        self.device = device
        # per saved property, a function that checks a request's values (or raises
        # ValueError) and returns a function that applies them
        self.setters = setters
        self.given = frozenset(given)  # properties whose saved values do not apply at start
        self.defaults = self.current()  # what CONFIG_DEFAULT restores
        self._saver = None  # the task writing the file
        self._save_wanted = False

    def current(self):
        "The saved properties' current values, as new*Vector requests."
        return [new_request(self.device[name]) for name in SAVED_PROPERTIES if name in self.device]

    async def apply(self, requests, publish=True):
        """Apply saved settings (new*Vector requests): each is checked as a
        client's request would be, and only if all pass do they apply (else
        ValueError says why)."""
        applies, problems = [], []
        for request in requests:
            name = request.get("name")
            try:
                applies.append(self.setters[name](request_event(self.device[name], request)))
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        for apply in applies:
            apply()
        if publish:
            for name in SAVED_PROPERTIES:
                if name in self.device:
                    await self.device[name].send_setVector()

    def read(self):
        return read_config(self.path, self.device.devicename)

    def save(self):
        "Write the saved properties' values to the file now (raises OSError)."
        if self.path is not None:
            write_config(self.path, self.device.devicename, self.current())

    async def on_disk(self, function, *args):
        """function(*args) in a worker thread; its result, or TimeoutError (an
        OSError) if the disk has not answered within DISK_TIMEOUT."""
        call = in_thread(function, *args)
        if not (await asyncio.wait([call], timeout=DISK_TIMEOUT))[0]:
            raise TimeoutError(errno.ETIMEDOUT, f"no answer from the disk in {DISK_TIMEOUT:g} s")
        return call.result()

    def save_soon(self):
        self._save_wanted = self.path is not None
        if self._save_wanted and (self._saver is None or self._saver.done()):
            self._saver = asyncio.get_running_loop().create_task(self._save_while_wanted())

    async def _save_while_wanted(self):
        while self._save_wanted:
            self._save_wanted = False
            requests = self.current()
            saving = in_thread(write_config, self.path, self.device.devicename, requests)
            if not (await asyncio.wait([saving], timeout=DISK_TIMEOUT))[0]:
                logger.warning("%s: configuration file %s: no answer from the disk in %g s; "
                               "the change is saved once it answers", self.device.devicename,
                               self.path, DISK_TIMEOUT)  # fmt: skip
                await asyncio.wait([saving])  # this task waits, not the driver
            try:
                saving.result()
            except OSError as exc:
                problem = config_problem(self.path, exc)
                logger.warning("%s: %s", self.device.devicename, problem)
                await self.device.send_device_message(
                    message=f"[WARNING] a change was not saved: {problem}"
                )
            await asyncio.sleep(SAVE_SPACING)

    async def finish(self):
        "Wait for the last change to reach the file, unless the disk hangs."
        if self._saver is not None:
            await asyncio.wait([self._saver], timeout=DISK_TIMEOUT)

    async def load_at_start(self, log):
        """Apply the saved settings but those given explicitly; a file that
        cannot be used leaves the settings as they were, with one warning."""
        if self.path is None:
            return
        try:
            requests = [r for r in await self.on_disk(self.read) if r.get("name") not in self.given]
            await self.apply(requests, publish=False)
        except FileNotFoundError:
            log.debug("no saved configuration in %s yet", self.path)  # a first start
        except (OSError, ValueError) as exc:
            logger.warning(
                "%s: %s; starting with the defaults",
                self.device.devicename,
                config_problem(self.path, exc),
            )

    async def process(self, event, reject):
        "A client's CONFIG_PROCESS request: carried out and answered (reject: DeviceAnswers')."
        vector = event.vector
        wanted = [name for name, value in event.items() if value == "On"]
        if len(wanted) > 1:
            await reject(vector, "CONFIG_PROCESS takes at most one action On")
            return
        for name in vector:
            vector[name] = "Off"  # actions, not states
        if not wanted:
            await vector.send_setVector(state="Idle")
            return
        try:
            done = await self.carry_out(wanted[0])
        except SettingsRefused as refused:
            await reject(vector, str(refused), level=refused.level)
            return
        await vector.send_setVector(state="Ok", message=done)

    async def carry_out(self, action):
        """Carry out a CONFIG_PROCESS action; return what was done, or raise
        SettingsRefused saying why not."""
        if self.path is None:
            raise SettingsRefused("this thermostat keeps no configuration file")
        try:
            match action:
                case "CONFIG_LOAD":
                    await self.apply(await self.on_disk(self.read))
                    return f"Device configuration applied from {self.path}."
                case "CONFIG_SAVE":
                    await self.on_disk(
                        write_config, self.path, self.device.devicename, self.current()
                    )
                    return f"Device configuration saved to {self.path}."
                case "CONFIG_DEFAULT":
                    await self.apply(self.defaults)
                    await self.on_disk(
                        write_config, self.path, self.device.devicename, self.current()
                    )
                    return "Default configuration loaded and saved."
                case "CONFIG_PURGE":
                    await self.on_disk(self.path.unlink)
                    return f"Configuration file {self.path} purged."
        except FileNotFoundError:
            if action == "CONFIG_LOAD":  # as libindi: Alert, and news rather than a warning
                raise SettingsRefused(
                    f"No saved configuration in {self.path} yet; "
                    f"changes are saved there as they are made.",
                    level="INFO",
                ) from None
            raise SettingsRefused(f"There is no configuration file {self.path}.") from None
        except (OSError, ValueError) as exc:
            raise SettingsRefused(config_problem(self.path, exc)) from None


# ---------------------------------------------------------------------------
# The service manager: what systemd hears from a driver it runs as a
# Type=notify service (nothing when not run so).
# ---------------------------------------------------------------------------


def sd_notify(state, environ=None):
    """Tell the service manager state ("READY=1", "WATCHDOG=1", "STOPPING=1",
    "STATUS=...", lines joined by newlines) on $NOTIFY_SOCKET, as libsystemd's
    sd_notify does: a datagram on an AF_UNIX socket, a name starting with @
    being abstract. Return True once sent; False if there is no socket (not
    run by systemd as Type=notify), or if sending failed (logged)."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return False  # unset, or a kind this does not speak (vsock:)
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # never hold up the event loop
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logger.warning(
            "cannot notify systemd on %s: %s", address.replace("\0", "@"), exc.strerror or exc
        )
        return False
    return True


def watchdog_interval(environ=None):
    """Seconds between WATCHDOG=1 notifications, half of WatchdogSec as
    $WATCHDOG_USEC gives it; None if there is no watchdog for this process."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        if environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
            return None  # it is meant for another process (one that started us)
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class ServiceNotifier:
    """What systemd hears from the driver: READY=1 once it serves (and has
    switched the heater off), WATCHDOG=1 from the control loop, STOPPING=1
    at stop. All of it nothing when not run by systemd as Type=notify."""

    def __init__(self, environ=None):
        self.environ = os.environ if environ is None else environ
        notifying = bool(self.environ.get("NOTIFY_SOCKET"))
        self.watchdog_interval = watchdog_interval(self.environ) if notifying else None
        self._next_ping = -math.inf

    def ready(self, status=None):
        return sd_notify("READY=1" + (f"\nSTATUS={status}" if status else ""), self.environ)

    def stopping(self):
        return sd_notify("STOPPING=1", self.environ)

    def status(self, text):
        return sd_notify(f"STATUS={text}", self.environ)

    def watchdog(self, now):
        """From the control loop, at each wake (now: loop.time()): WATCHDOG=1
        if it is due. Return when the next one is due (math.inf: never), for
        the loop's next wake: it must wake by then whatever the poll interval."""
        if self.watchdog_interval is None:
            return math.inf
        if now >= self._next_ping:
            sd_notify("WATCHDOG=1", self.environ)
            self._next_ping = now + self.watchdog_interval
        return self._next_ping


# ---------------------------------------------------------------------------
# The INDI driver: client requests in, thermostat readings out.
# ---------------------------------------------------------------------------


class PollTimer:
    """The control loop's schedule: a poll every interval seconds, on a fixed
    schedule (the time a poll takes does not add up into drift), unless a
    whole interval was missed or a poll was asked for: then afresh from now.
    A future and a timer wait for it: asyncio.wait_for would start a task and
    cancel it at every poll, and asyncio.timeout raise two exceptions."""

    def __init__(self, interval):
        self.interval = interval
        self._last = 0.0  # when the last poll was due
        self._sleep = None  # the wait for the next poll (see wake_up)
        self._poll_now = False  # a poll asked for before the next one due

    def start(self):
        self._last = asyncio.get_running_loop().time()

    def poll_now(self):
        "Poll at once, not at the next poll (new limits hold from now)."
        self._poll_now = True
        self.wake_up()

    def wake_up(self):
        "End the wait at once: a stop, or a new interval to plan for."
        if self._sleep is not None and not self._sleep.done():
            self._sleep.set_result(True)

    async def next_poll(self, stopped, safety_delay=None, safety_check=None):
        """Wait until the next poll is due; False if stopped() first. Meanwhile
        safety_check() is awaited each time safety_delay() seconds have passed:
        the safety rules keep their own schedule, whatever the interval."""
        loop = asyncio.get_running_loop()
        while not stopped():
            delay = 0 if self._poll_now else self._last + self.interval - loop.time()
            check = math.inf if safety_delay is None else safety_delay()
            if check < delay:
                if check <= 0 or not await self._woken_within(check):
                    await safety_check()
                continue
            if delay > 0 and await self._woken_within(delay):
                continue  # a stop, a new interval or a poll asked for: plan again
            if self._poll_now or delay <= -self.interval:
                self._last, self._poll_now = loop.time(), False
            else:
                self._last += self.interval
            return True
        return False

    async def _woken_within(self, delay):
        loop = asyncio.get_running_loop()
        self._sleep = sleep = loop.create_future()
        timer = loop.call_later(delay, _resolve, sleep, False)
        try:
            return await sleep
        finally:
            timer.cancel()
            self._sleep = None


class SafetySchedule:
    """When the control loop must wake between polls, whatever the poll
    interval a client sets: when the heater-on limit runs out, every
    safety_check seconds while heating, or perhaps heating (after a failed
    switch: a sensor read, for the maximum temperature, and the off tried
    again), and for systemd's watchdog (notifier: pinged when due).
    clock is the safety timers' monotonic clock; regulated() says whether
    the thermostat is regulated (the driver connected)."""

    def __init__(self, thermostat, clock, regulated, safety_check=SAFETY_CHECK):
        self.thermostat, self.clock, self.regulated = thermostat, clock, regulated
        self.safety_check = safety_check
        self.notifier = ServiceNotifier({})  # systemd's, when run by it (main sets it)
        self.last_read = -math.inf  # when the sensor was last read

    def delay(self):
        "Seconds until the next wake; the watchdog is pinged here when due."
        now, thermostat = self.clock(), self.thermostat
        due = min(self.notifier.watchdog(now), thermostat.heater_deadline())
        if not thermostat.known_off and self.regulated():
            due = min(due, self.last_read + self.safety_check)
        return due - now

    def read_due(self):
        "True if the heater may be on and the sensor was last read safety_check seconds ago."
        return (not self.thermostat.known_off and self.regulated()
                and self.clock() >= self.last_read + self.safety_check)  # fmt: skip


WEATHER_VECTOR = "WEATHER_PARAMETERS"  # libindi's weather devices' readings
WEATHER_ASK_S = 60.0  # the weather device is asked again after this long without its data
AIR_RANGE = (-100.0, 100.0)  # a plausible air temperature or dew point from a weather device


class RegulationProperties:
    """The regulation as a driver shows it, as libindi's drivers would: the
    settings (CONTROL_MODE, REGULATION_SETTINGS, PID_SETTINGS, CONTROL_CYCLE,
    TARGET_RAMP, ACTIVE_DEVICES; each setter checks a request's values and
    returns what applies them), PID_AUTOTUNE, and at each reading
    HEATER_POWER and REGULATION. The weather device named in ACTIVE_WEATHER
    is snooped for its WEATHER_PARAMETERS, asked again after WEATHER_ASK_S
    without them (the driver runs no snoop monitor, see without_snoop_monitor)."""

    def __init__(self, driver):
        self.driver, self.device = driver, driver.device
        self.thermostat, self.regulator = driver.thermostat, driver.thermostat.regulator
        self.setters = {"CONTROL_MODE": self.set_mode, "REGULATION_SETTINGS": self.set_settings,
                        "PID_SETTINGS": self.set_gains, "CONTROL_CYCLE": self.set_cycle,
                        "TARGET_RAMP": self.set_ramp,
                        "ACTIVE_DEVICES": self.set_weather}  # fmt: skip
        self.weather = ""  # the weather device snooped, if any
        self.regulator.dew.problem = "no weather device is named in ACTIVE_DEVICES"
        self._air = {}  # its last WEATHER_PARAMETERS values
        self._asked_s = None  # when they were last asked for
        self._tuning = "idle"  # the autotune's state as last shown

    def _numbers(self, values, vectorname):
        "The members a request gives, each checked within its declared range."
        return {member: self.driver.checked_number(values, vectorname, member)
                for member in self.device[vectorname] if member in values}  # fmt: skip

    def _shown(self, vectorname, numbers):
        vector = self.device[vectorname]
        for member, value in numbers.items():
            vector[member] = f"{value:g}"

    def set_mode(self, values):
        wanted = [name for name, value in values.items() if value == "On"]
        if len(wanted) != 1 or wanted[0] not in CONTROL_MODES:
            raise ValueError(f"CONTROL_MODE takes exactly one of {', '.join(CONTROL_MODES)} On")

        def apply():
            self.regulator.mode = wanted[0]
            for name in CONTROL_MODES:
                self.device["CONTROL_MODE"][name] = "On" if name == wanted[0] else "Off"

        return apply

    def set_settings(self, values):
        numbers = self._numbers(values, "REGULATION_SETTINGS")

        def apply():
            regulator = self.regulator
            regulator.band = numbers.get("BAND", regulator.band)
            regulator.dew.offset_k = numbers.get("DEW_OFFSET", regulator.dew.offset_k)
            alarm = regulator.effectiveness
            alarm.alarm_after_s = numbers.get("NO_RISE_S", alarm.alarm_after_s)
            self._shown("REGULATION_SETTINGS", numbers)

        return apply

    def set_gains(self, values):
        numbers = self._numbers(values, "PID_SETTINGS")

        def apply():
            gains = dict(zip(("KP", "KI", "KD"), self.regulator.pid.gains, strict=True)) | numbers
            self.regulator.set_gains(gains["KP"], gains["KI"], gains["KD"])
            self._shown("PID_SETTINGS", numbers)

        return apply

    def set_cycle(self, values):
        numbers = self._numbers(values, "CONTROL_CYCLE")

        def apply():
            cycle = dict(
                zip(("CYCLE_S", "MIN_ON_S", "MIN_OFF_S"), self.regulator.cycle, strict=True)
            )
            self.regulator.set_cycle(*(cycle | numbers).values())
            self._shown("CONTROL_CYCLE", numbers)

        return apply

    def set_ramp(self, values):
        rate = self._numbers(values, "TARGET_RAMP")

        def apply():
            self.regulator.ramp.rate_k_per_min = rate.get(
                "RATE", self.regulator.ramp.rate_k_per_min
            )
            self._shown("TARGET_RAMP", rate)

        return apply

    def set_weather(self, values):
        name = values.get("ACTIVE_WEATHER", self.weather).strip()
        if len(name) > 128 or not name.isprintable() or name in self.driver:
            raise ValueError(f"ACTIVE_WEATHER must name another device; received {name[:40]!r}")

        def apply():
            self.driver.snoopvectors.pop((self.weather, WEATHER_VECTOR), None)
            self.weather, self._air, self._asked_s = name, {}, None
            unnamed = "no weather device is named in ACTIVE_DEVICES"
            self.regulator.dew.problem = f"no {WEATHER_VECTOR} from {name} yet" if name else unnamed
            if name:
                self.driver.snoop(name, WEATHER_VECTOR, timeout=WEATHER_ASK_S)
            self.device["ACTIVE_DEVICES"]["ACTIVE_WEATHER"] = name

        return apply

    async def autotune(self, event):
        "A client's PID_AUTOTUNE: START On starts a tune around the target, Off stops one."
        vector, regulator = event.vector, self.regulator
        if event.get("START") != "On":
            if regulator.autotune.running:
                regulator.autotune.abort("stopped by a client")
            self._tuning, vector["START"] = regulator.autotune.state, "Off"
            await vector.send_setVector(state="Idle")
            return
        target = regulator.target if regulator.mode == "DEWPOINT" else self.thermostat.target
        if target is None or not self.driver.in_control():
            await self.driver.reject(vector, "autotune needs a connected thermostat and a target "
                                             "(in DEWPOINT mode, a dew point)")  # fmt: skip
            return
        # the regulator's times are the safety timers' clock, as ThermalControl.step gives them
        regulator.start_autotune(self.driver.equipment.clock(), target,
                                 self.thermostat.max_temperature)  # fmt: skip
        self._tuning, vector["START"] = "running", "On"
        await vector.send_setVector(state="Busy", message=f"tuning around {target:.2f}")

    async def publish(self, reading):
        "After each reading: REGULATION, an autotune's end, and the weather asked for if due."
        regulator, stats = self.regulator, self.regulator.stats
        figures = dict(TARGET=regulator.target, DEW_POINT=regulator.dew.dew_point,
                       RMS=stats.rms_error, MAX=stats.max_error, IN_BAND=stats.time_in_band * 100,
                       DUTY=stats.duty * 100, SWITCHES=stats.switches_per_hour)  # fmt: skip
        vector = self.device["REGULATION"]
        for name, value in figures.items():
            if value is not None and math.isfinite(value):
                vector[name] = f"{value:.3f}"
        await vector.send_setVector(state="Ok", timestamp=reading.timestamp)
        await self.publish_power(reading.power)
        tune = regulator.autotune
        if tune.state != self._tuning:
            self._tuning = tune.state
            await self._autotune_ended(tune)
        now_s = self.driver.equipment.clock()  # the clock dew.observe is given
        last = max(self._asked_s or -math.inf, regulator.dew.observed_s or -math.inf)
        if self.weather and now_s - last >= WEATHER_ASK_S:
            self._asked_s = now_s
            await self.driver.send_getProperties(self.weather, WEATHER_VECTOR)

    async def publish_power(self, power):
        vector = self.device["HEATER_POWER"]
        if vector["POWER"] != (shown := f"{power * 100:.1f}"):
            vector["POWER"] = shown
            await vector.send_setVector(state="Ok")

    async def _autotune_ended(self, tune):
        vector = self.device["PID_AUTOTUNE"]
        vector["START"] = "Off"
        if tune.state == "done":
            self._shown("PID_SETTINGS", dict(zip(("KP", "KI", "KD"), tune.gains, strict=True)))
            await self.device["PID_SETTINGS"].send_setVector(state="Ok")
            self.driver.settings.save_soon()
            kp, ki, kd = tune.gains
            await vector.send_setVector(state="Ok", message=(
                f"autotune done: Ku {tune.ultimate_gain:.4g}, Pu {tune.period_s:.4g} s; "
                f"KP {kp:.4g}, KI {ki:.4g}, KD {kd:.4g} in PID_SETTINGS"))  # fmt: skip
        else:
            logger.warning("%s: autotune failed: %s", self.device.devicename, tune.reason)
            await vector.send_setVector(state="Alert", message=f"[WARNING] {tune.reason}")

    async def snooped(self, event):
        "The weather device's WEATHER_PARAMETERS: the dew point, given or from the air's."
        if (event.devicename, event.vectorname) != (self.weather, WEATHER_VECTOR):
            return
        self._air |= {name: event[name] for name in event}
        air, dew = self._air, self.regulator.dew
        try:
            if "WEATHER_DEWPOINT" not in air and "WEATHER_HUMIDITY" not in air:
                raise ValueError(f"{self.weather} gives neither WEATHER_DEWPOINT nor "
                                 "WEATHER_HUMIDITY")  # fmt: skip
            if "WEATHER_DEWPOINT" in air:
                point = parse_number(air["WEATHER_DEWPOINT"], "WEATHER_DEWPOINT", *AIR_RANGE)
            else:
                point = dew_point(
                    parse_number(air.get("WEATHER_TEMPERATURE"), "WEATHER_TEMPERATURE", *AIR_RANGE),
                    parse_number(air.get("WEATHER_HUMIDITY"), "WEATHER_HUMIDITY", 0, 110),
                )
        except ValueError as exc:
            dew.problem = clipped(str(exc), 120)
            return
        dew.observe(self.driver.equipment.clock(), point)  # the regulator's clock: its steps
        dew.problem = None


class ThermoDriver(IPyDriver):
    """Serves one thermostat as one INDI device.

    A control loop steps the model every poll and hands each reading to an
    update loop through a small queue. When updates fall behind (a client
    that does not read stalls the server's sends), live readings are
    dropped; log rows never are, and the thermostat keeps regulating. Every
    client request gets an answer: the new state, or Alert with a message
    saying what was wrong. The heater is switched off when the driver starts
    and, first of all, when it stops (see Hardware).

    The SAVED_PROPERTIES are kept in a configuration file (SavedSettings):
    at start the saved values apply, except to the properties named in
    `given` (values given explicitly, as on a command line). A saved value
    passes the same check as a client's request for it, and a file is
    applied whole or not at all."""

    def __init__(self, device, thermostat, templog, hardware, poll_interval, config=None,
                 given=(), debug=False, weather=None):  # fmt: skip
        super().__init__(device, thermostat=thermostat)
        self.device, self.thermostat, self.templog = device, thermostat, templog
        self.equipment = hardware
        self.weather = weather  # a LocalWeather for a sensor that reads humidity too
        self.log = logger.getChild(device.devicename)  # this device's; DEBUG sets its level
        self.debug = DebugLogging(self, self.log)
        self.debug.set(debug)
        # the saved properties: each checks a request's values and returns what applies them
        self.setters = {"targetvector": self.set_target, "POLLING_PERIOD": self.set_poll_interval,
                        "logperiodvector": self.set_log_period, SAFETY_LIMITS: self.set_limits,
                        "DEBUG": self.debug.setter}  # fmt: skip
        self.regulation = RegulationProperties(self)
        self.setters |= self.regulation.setters
        self.settings = SavedSettings(config, device, self.setters, given)
        self.off_failed_at_stop = False  # then the heater may still be on: the exit status says so
        self.publisher = ReadingPublisher(self)
        self.connected = True  # the CONNECTION property; disconnected, nothing polls
        self.readings = asyncio.Queue(maxsize=5)
        self.dropped_readings = 0
        self.timer = PollTimer(poll_interval)
        self.schedule = SafetySchedule(thermostat, hardware.clock, lambda: self.connected)
        self.started = asyncio.Event()  # set once the heater is first known off
        self.ready = asyncio.Event()  # set once the saved settings apply: the server waits (_pass)
        self._sending_files = asyncio.Lock()
        self.answers = DeviceAnswers(device)
        self.reject, self.refuse = self.answers.reject, self.answers.refuse
        without_snoop_monitor(self)

    def shutdown(self):
        super().shutdown()
        self.ready.set()  # nothing waits on a stopping driver: it takes nothing (take_request)
        self.schedule.notifier.stopping()
        self.equipment.interrupt()
        self.timer.wake_up()

    @property
    def poll_interval(self):
        return self.timer.interval

    @property
    def dew_point(self):
        "The local dew point, a DewPoint as of its poll, from a sensor with humidity; else None."
        return self.weather and self.weather.dew_point

    def in_control(self):
        "True while the driver runs and is connected: the heater is regulated."
        return self.connected and not self.stop

    # -- requests in --------------------------------------------------------

    async def take_request(self, root):
        "A client's new*Vector for this device, as the server hands it over: checked and answered."
        if self.stop or not self.device.enable:
            return  # as indipydriver: a stopping or disabled device takes nothing
        if (event := await self.answers.accept(root)) is not None:
            if self.debug_enable and self.log.isEnabledFor(logging.DEBUG):
                log_request(self.log, root)
            await self.dispatch(event)

    async def dispatch(self, event):
        name, vector = event.vectorname, event.vector
        try:
            if name in self.setters:
                try:
                    apply = self.setters[name](event)
                except ValueError as exc:
                    await self.reject(vector, str(exc))
                    return
                await self.answer_change(name, vector, apply())
                self.settings.save_soon()
            elif name == "switchvector":
                await self.set_logging(event)
            elif name == "CONNECTION":
                await self.set_connection(event)
            elif name == "CONFIG_PROCESS":
                await self.settings.process(event, self.reject)
            elif name == "PID_AUTOTUNE":
                await self.regulation.autotune(event)
            else:
                await self.reject(vector, f"{event.root.tag} is not handled for {name}")
        except Exception:
            logger.exception("%s: failed to handle %s", self.device.devicename, event.root.tag)
            await self.reject(vector, "internal error handling this request; see the driver's log",
                              level="ERROR")  # fmt: skip

    async def answer_change(self, name, vector, note):
        "A client changed a saved property: the new state, and what follows from it."
        state = "Ok"
        if (
            name == "targetvector"
        ):  # a person's request acknowledges the alarm; a saved setting does not
            self.thermostat.rearm()
            state = "Ok" if self.thermostat.in_band else "Busy"
        elif name == "POLLING_PERIOD":
            self.timer.wake_up()  # the control loop re-plans its wait at once
        await vector.send_setVector(state=state)
        if name == SAFETY_LIMITS:
            self.timer.poll_now()  # a limit the heater is already beyond switches it off now
        if note:
            await self.device.send_device_message(message=note)

    def checked_number(self, values, vectorname, member):
        """The member's value within the range its property declares (which
        holds the values make_driver was given), or ValueError saying why not."""
        declared = self.device[vectorname].data[member]  # indipydriver's NumberMember
        return parse_number(values.get(member), member, float(declared.min), float(declared.max))

    # Each setter checks a request's values and returns what applies them (and
    # returns a note for the client who asked, if any), so that a saved file can be
    # checked whole before any of it applies.

    def set_target(self, values):
        target = self.checked_number(values, "targetvector", "target")

        def apply():
            self.thermostat.target = target
            self.device["targetvector"]["target"] = f"{target:.2f}"

        return apply

    def set_poll_interval(self, values):
        period_ms = self.checked_number(values, "POLLING_PERIOD", "PERIOD_MS")

        def apply():
            self.timer.interval = period_ms / 1000
            self.device["POLLING_PERIOD"]["PERIOD_MS"] = f"{period_ms:.0f}"

        return apply

    def set_log_period(self, values):
        seconds = self.checked_number(values, "logperiodvector", "logperiod")

        def apply():
            self.templog.log_period = seconds
            self.device["logperiodvector"]["logperiod"] = f"{seconds:g}"

        return apply

    def set_limits(self, values):
        check_ceiling(self.device[SAFETY_LIMITS], values)
        limits = {member: self.checked_number(values, SAFETY_LIMITS, member)
                  for member in ("maxtemperature", "maxheateron") if member in values}  # fmt: skip

        def apply():
            vector = self.device[SAFETY_LIMITS]
            if "maxtemperature" in limits:
                self.thermostat.max_temperature = limits["maxtemperature"]
                vector["maxtemperature"] = f"{limits['maxtemperature']:.2f}"
            if "maxheateron" in limits:
                self.thermostat.max_heater_on = limits["maxheateron"]
                vector["maxheateron"] = f"{limits['maxheateron']:g}"

        return apply

    async def set_logging(self, event):
        if event["switchmember"] == "On":
            self.templog.start(datetime.now(timezone.utc))
        else:
            self.templog.stop()
            await in_thread(self.templog.flush)  # and on the disk, unless it hangs
            await self.send_log_files()  # the partial file goes out, it is not discarded
        status = "On" if self.templog.logging else "Off"
        event.vector["switchmember"] = status
        await event.vector.send_setVector(state="Ok")
        await self.device.send_device_message(message=f"Log reporting is now {status}")

    async def set_connection(self, event):
        try:
            self.connected = one_switched_on(event, "CONNECTION", "CONNECT", "DISCONNECT")
        except ValueError as exc:
            await self.reject(event.vector, str(exc))
            return
        if not self.connected:
            self.thermostat.stand_by()
            await self.switch_off_while_disconnected(
                force=True
            )  # no regulation without a connection
        event.vector["CONNECT"] = "On" if self.connected else "Off"
        event.vector["DISCONNECT"] = "Off" if self.connected else "On"
        await event.vector.send_setVector(state="Ok" if self.connected else "Idle")
        temperature = self.device["temperaturevector"]
        await temperature.send_setVector(state="Ok" if self.connected else "Idle")
        if self.weather and not self.connected:
            await self.device["WEATHER_PARAMETERS"].send_setVector(state="Idle")

    async def snoopevent(self, event):
        await self.regulation.snooped(event)

    async def send(self, xmldata):
        "Everything this driver sends passes here (indipydriver's hook)."
        forget_message(self.device, xmldata)
        as_libindi_message(xmldata)
        await super().send(xmldata)

    # -- the control loop ---------------------------------------------------

    async def asyncrun(self):
        self.equipment.resume()
        try:
            await self.settings.load_at_start(self.log)
        finally:
            self.ready.set()  # the requests and getProperties that came meanwhile go on
        if self.equipment.interrupted:
            return  # stopped while the file was read: the foundation's asyncrun would undo that
        try:
            await super().asyncrun()
        finally:
            await self.settings.finish()  # the last change reaches the file

    async def hardware(self):  # indipydriver's name for the driver's own task
        await self.equipment.switch(
            self.thermostat, False
        )  # a known state: a kill -9 may have left it on
        self.started.set()
        updates = asyncio.create_task(self.update_loop())
        try:
            await self.control_loop()
        finally:
            # Every way out passes here, and waits on no client or queue: the heater is
            # switched off first, updates still on their way are dropped, and the
            # partial log file reaches log_dir.
            self.switch_off_at_stop()
            updates.cancel()
            self.templog.stop()
            await asyncio.wait([updates])
            await in_thread(self.templog.flush)  # the last rows, unless the disk hangs

    async def control_loop(self):
        self.timer.start()
        while await self.timer.next_poll(lambda: self.stop, self.schedule.delay, self.safety_wake):
            if self.connected:
                await self.poll()
            elif not self.thermostat.known_off:
                await self.switch_off_while_disconnected()  # a Disconnect's off failed: try again

    async def safety_wake(self):
        "Between polls: the heater off when its on-time runs out, the sensor read while heating."
        thermostat = self.thermostat
        if thermostat.expire(self.equipment.clock()):
            if await self.equipment.follow(thermostat, self.in_control):
                self.offer(thermostat.reading(datetime.now(timezone.utc)))
        elif self.schedule.read_due():
            await self.poll()

    async def poll(self):
        thermostat = self.thermostat
        try:
            self.schedule.last_read = self.equipment.clock()
            measured = await self.equipment.read()
            if not self.in_control():
                return  # it went while the sensor was read
            now = datetime.now(timezone.utc)
            if self.weather:
                self.weather.update(now, measured)  # first: this poll's dew point for the step
            thermostat.guarded(self.equipment.guard_problem())
            self.templog.record(thermostat.step(now, measured, self.equipment.clock()))
            if not await self.equipment.follow(thermostat, self.in_control):
                return  # it went while the heater switched (and switched it off)
            reading = thermostat.reading(now)
        except Exception:
            logger.exception("%s: thermostat poll failed; the heater is held off",
                             self.device.devicename)  # fmt: skip
            await self.hold_off_after_failure()
            return
        if self.offer(reading):
            self.log.debug("temperature %.2f, heater %s, target %.2f", reading.temperature,
                       "on" if reading.heater_on else "off", thermostat.target)  # fmt: skip

    async def hold_off_after_failure(self):
        "A poll failed on an error: the heater off, not left as it was, until a poll works."
        thermostat = self.thermostat
        try:
            thermostat.heater_wanted = thermostat.regulator.hold(None, "the poll failed")
            await self.equipment.follow(thermostat, self.in_control)
        except Exception:
            logger.exception("%s: switching the heater off after a failed poll failed",
                             self.device.devicename)  # fmt: skip

    def offer(self, reading):
        "Hand a reading to the update loop; False if it is behind (the reading is dropped)."
        try:
            self.readings.put_nowait(reading)
        except asyncio.QueueFull:
            self.dropped_readings += 1
            self.log.debug("updates are behind, live reading dropped")
            return False
        return True

    def switch_off_at_stop(self):
        """Switch the heater off now (see Hardware.switch_off_at_stop); if that
        fails, the program exits with status 1 (a service manager that
        restarts it then switches the heater off at start)."""
        error = self.equipment.switch_off_at_stop(self.thermostat)
        self.off_failed_at_stop = error is not None
        if error:
            logger.error("%s: at stop the heater may still be on: switching it off failed: %s",
                         self.device.devicename, failure_reason(error))  # fmt: skip
        else:
            self.log.debug("heater switched off at stop")

    async def switch_off_while_disconnected(self, force=False):
        """Switch the heater off, and show it: SAFETY_STATUS Idle once it is
        known to be off; until then HEATER Alert, and each poll interval
        tries again (nothing else runs the heater while disconnected)."""
        thermostat = self.thermostat
        before = (thermostat.heater_known, thermostat.heater_on, thermostat.heater_fault)
        await self.equipment.switch(thermostat, False)
        after = (thermostat.heater_known, thermostat.heater_on, thermostat.heater_fault)
        if not force and after == before:
            return  # failed again, as already shown
        fault = thermostat.heater_fault
        await self.publisher.publish_heater(
            thermostat.heater_on, fault, f"[ERROR] heater: {fault}" if fault else ""
        )
        status, off = self.device["SAFETY_STATUS"], thermostat.known_off
        state = "Idle" if off else "Alert"  # Alert while the heater may be on
        for name in status:
            status[name] = "Idle"
        status["SAFETY"] = status["HEATER"] = state
        await status.send_setVector(state=state)

    # -- readings out -------------------------------------------------------

    async def update_loop(self):
        while not self.stop:
            reading = await self.readings.get()
            try:
                await self.publisher.publish_reading(reading)
                await self.send_log_files()
            except Exception:
                logger.exception("%s: failed to send an update", self.device.devicename)

    async def send_log_files(self):
        if not self.templog.backlog:
            return  # at most polls: no file has been finished
        async with self._sending_files:  # one sender at a time keeps files in order
            # a stopping driver sends nothing: its files stay in the backlog
            while not self.stop and (logfile := self.templog.next_unsent()):
                await send_blob(self.device["logsvector"], "templogs", logfile.content())
                self.templog.sent(logfile)
                logger.info("%s: sent log file %s", self.device.devicename, logfile.name)


class ReadingPublisher:
    """What a driver's clients see of each reading: the temperature (Alert
    while readings are refused), the heater light, the target's state, the
    SAFETY_STATUS lights, the weather numbers and the regulation's figures,
    each message said once, as its cause starts or ends."""

    def __init__(self, driver):
        self.driver = driver
        self._safety_shown = Safety()  # as the last reading published had it

    async def publish_reading(self, reading):
        safety, before = reading.safety, self._safety_shown
        self._safety_shown = safety
        temperature = self.driver.device["temperaturevector"]
        if safety.sensor:
            message = ""
            if safety.sensor != before.sensor:
                message = (
                    f"[ERROR] sensor: {safety.sensor}; the heater is off until good readings return"
                )
            await temperature.send_setVector(
                message=message, state="Alert", timestamp=reading.timestamp
            )
        else:
            temperature["temperature"] = f"{reading.temperature:.2f}"
            await temperature.send_setVector(state="Ok", timestamp=reading.timestamp)
            if before.sensor:
                # a message of its own: on the vector it would cut the timestamp to whole
                # seconds (as_libindi_message), and the log's row for this reading has it exact
                await self.driver.device.send_device_message(
                    message=f"the sensor reads again: {reading.temperature:.2f}")  # fmt: skip
        heater_message = ""
        if safety.heater != before.heater:
            heater_message = (f"[ERROR] heater: {safety.heater}" if safety.heater
                              else "the heater switches again")  # fmt: skip
        await self.publish_heater(reading.heater_on, safety.heater, heater_message)
        target = self.driver.device["targetvector"]
        state = "Ok" if reading.in_band else "Busy"
        if target.state != state:
            await target.send_setVector(state=state)
        await self.publish_safety(safety, before)
        if self.driver.weather:
            await self.driver.weather.publish(self.driver.device["WEATHER_PARAMETERS"])
        await self.driver.regulation.publish(reading)

    async def publish_heater(self, heater_on, fault=None, message=""):
        heater = self.driver.device["heatervector"]
        light = "Alert" if fault else "Busy" if heater_on else "Idle"
        if heater["heater"] != light or message:
            heater["heater"] = light
            await heater.send_setVector(message=message, state=light)  # KStars' group light too
        await self.driver.regulation.publish_power(self.driver.thermostat.heater_power)

    async def publish_safety(self, safety, before):
        """SAFETY_STATUS: a light each for the sensor, heater and limits;
        libindi's SAFETY light, first, and the vector's state (all that
        libindi's Safety Monitor reads) are the worst of them."""
        status = self.driver.device["SAFETY_STATUS"]
        if safety == before and status.state != "Idle":
            return  # as at the last poll: its lights are already out
        lights, message = safety.lights(), safety.news(before)
        if (
            message
            or status.state == "Idle"
            or any(status[n] != light for n, light in lights.items())
        ):
            for name, light in lights.items():
                status[name] = light
            await status.send_setVector(message=message, state=lights["SAFETY"])


def request_event(vector, root):
    """The indipydriver event for a new*Vector request to vector (from a
    client or a saved file), or ValueError saying why it cannot be used:
    indipydriver 3.1.2 itself drops such a request without an answer, or
    raises on a request whose type is not the vector's."""
    if root.tag != f"new{vector.vectortype}":
        raise ValueError(f"{vector.name} is a {vector.vectortype}: {root.tag} does not apply to it")
    try:
        return getattr(indipydriver.events, root.tag)(vector.devicename, vector.name, vector, root)
    except indipydriver.events.EventException as exc:
        raise ValueError(f"request rejected: {exc}") from None


# ---------------------------------------------------------------------------
# Assembly: the device and its properties, and the server to serve it.
# ---------------------------------------------------------------------------

LOG_PERIOD_S = (0.1, 31 * 86400)
MAX_HEATER_ON_S = (1, 7 * 86400)

DEFAULTS = dict(target=15.0, poll_interval=10.0, log_period=300.0, debug=False,
                max_temperature=MAX_TEMPERATURE, max_heater_on=MAX_HEATER_ON)  # fmt: skip
# the saved property each setting is kept in
GIVEN_AS = dict(target="targetvector", poll_interval="POLLING_PERIOD", log_period="logperiodvector",
                debug="DEBUG", max_temperature=SAFETY_LIMITS,
                                max_heater_on=SAFETY_LIMITS)  # fmt: skip


def thermostat_properties(thermostat, log_period):
    "The thermostat's own properties, and its safety limits and lights."
    shown = thermostat.temperature if math.isfinite(thermostat.temperature) else 0.0
    limits = dict(format="%3.1f", min=TEMPERATURE_MIN, max=TEMPERATURE_MAX)
    max_heater_on = thermostat.max_heater_on
    return [
        NumberVector("temperaturevector", "Temperature", "Values", "ro", "Ok", [
            NumberMember("temperature", "Temperature", **limits, membervalue=f"{shown:.2f}")]),
        NumberVector("targetvector", "Target", "Values", "rw",
                     "Ok" if thermostat.in_band else "Busy", [
            NumberMember("target", "Target", **limits, step=0.1,
                         membervalue=f"{thermostat.target:.2f}")]),
        LightVector("heatervector", "Heater", "Values", "Idle", [
            LightMember("heater", "Heater", membervalue="Idle")]),
        SwitchVector("switchvector", "Logs Control", "Control", "rw", "AtMostOne", "Ok", [
            SwitchMember("switchmember", "Logs", membervalue="Off")]),
        NumberVector("logperiodvector", "Log period", "Control", "rw", "Ok", [
            NumberMember("logperiod", "Seconds per file", format="%.1f",
                         **widened(LOG_PERIOD_S, log_period), step=60,
                         membervalue=f"{log_period:g}")]),
        BLOBVector("logsvector", "Logs", "Control", "ro", "Ok", [
            BLOBMember("templogs", "Temperature logs", blobformat=".csv")]),
        # safety: limits that hold whatever the target, and alarms a client can wait on
        # the limits the thermostat starts with are a ceiling: clients may tighten them only
        NumberVector(SAFETY_LIMITS, "Limits", "Safety", "rw", "Ok", [
            NumberMember("maxtemperature", "Maximum temperature", format="%3.1f",
                         min=TEMPERATURE_MIN, max=thermostat.max_temperature, step=0.1,
                         membervalue=f"{thermostat.max_temperature:.2f}"),
            NumberMember("maxheateron", "Maximum heater-on (s)", format="%.0f",
                         min=min(MAX_HEATER_ON_S[0], max_heater_on), max=max_heater_on, step=60,
                         membervalue=f"{max_heater_on:g}")]),
        LightVector("SAFETY_STATUS", "Safety", "Safety", "Idle", [
            LightMember("SAFETY", "Safety", membervalue="Idle"),  # libindi's: the overall state
            LightMember("SENSOR", "Sensor", membervalue="Idle"),
            LightMember("HEATER", "Heater", membervalue="Idle"),
            LightMember("LIMITS", "Limits", membervalue="Idle"),
            LightMember("EFFECTIVE", "Heater heats", membervalue="Idle"),
            LightMember("WEATHER", "Weather data", membervalue="Idle")]),
    ]  # fmt: skip


def regulation_properties(regulator):
    "The regulation's properties (see RegulationProperties), with the regulator's values."
    (kp, ki, kd), (cycle_s, min_on_s, min_off_s) = regulator.pid.gains, regulator.cycle
    labels = dict(HYSTERESIS="Hysteresis", PID="PID", DEWPOINT="Dew point + offset")
    figure = dict(format="%.3f", min=0, max=1e6, step=0, membervalue="0")
    return [
        SwitchVector("CONTROL_MODE", "Control mode", "Regulation", "rw", "OneOfMany", "Ok", [
            SwitchMember(name, labels[name], membervalue="On" if name == regulator.mode else "Off")
            for name in CONTROL_MODES]),
        NumberVector("REGULATION_SETTINGS", "Settings", "Regulation", "rw", "Ok", [
            NumberMember("BAND", "Band +/- (K)", format="%.2f", min=0.01, max=10, step=0.1,
                         membervalue=f"{regulator.band:g}"),
            NumberMember("DEW_OFFSET", "Above dew point (K)", format="%.1f", min=0, max=30,
                         step=0.5, membervalue=f"{regulator.dew.offset_k:g}"),
            NumberMember("NO_RISE_S", "Full power, no rise: alarm (s)", format="%.0f", min=1,
                         max=86400, step=60,
                         membervalue=f"{regulator.effectiveness.alarm_after_s:g}")]),
        NumberVector("PID_SETTINGS", "PID gains", "Regulation", "rw", "Ok", [
            NumberMember("KP", "Kp (1/K)", format="%.4g", min=0, max=1000, step=0.1,
                         membervalue=f"{kp:g}"),
            NumberMember("KI", "Ki (1/(K s))", format="%.4g", min=0, max=100, step=0.001,
                         membervalue=f"{ki:g}"),
            NumberMember("KD", "Kd (s/K)", format="%.4g", min=0, max=1e6, step=1,
                         membervalue=f"{kd:g}")]),
        SwitchVector("PID_AUTOTUNE", "Autotune", "Regulation", "rw", "AtMostOne", "Idle", [
            SwitchMember("START", "Start", membervalue="Off")]),
        NumberVector("CONTROL_CYCLE", "Relay", "Regulation", "rw", "Ok", [
            NumberMember("CYCLE_S", "PID cycle (s)", format="%.1f", min=1, max=86400, step=10,
                         membervalue=f"{cycle_s:g}"),
            NumberMember("MIN_ON_S", "Minimum on (s)", format="%.1f", min=0.1, max=3600, step=1,
                         membervalue=f"{min_on_s:g}"),
            NumberMember("MIN_OFF_S", "Minimum off (s)", format="%.1f", min=0.1, max=3600,
                         step=1, membervalue=f"{min_off_s:g}")]),
        NumberVector("TARGET_RAMP", "Target ramp", "Regulation", "rw", "Ok", [
            NumberMember("RATE", "K per minute (0: at once)", format="%.2f", min=0, max=100,
                         step=0.1, membervalue=f"{regulator.ramp.rate_k_per_min:g}")]),
        TextVector("ACTIVE_DEVICES", "Snoop devices", "Options", "rw", "Ok", [
            TextMember("ACTIVE_WEATHER", "Weather", membervalue="")]),
        NumberVector("HEATER_POWER", "Heater power", "Values", "ro", "Ok", [
            NumberMember("POWER", "Power (%)", format="%.1f", min=0, max=100, step=0,
                         membervalue="0.0")]),
        NumberVector("REGULATION", "Regulation", "Regulation", "ro", "Idle", [
            NumberMember("TARGET", "Effective target", **figure),
            NumberMember("DEW_POINT", "Dew point", **figure),
            NumberMember("RMS", "RMS error (K)", **figure),
            NumberMember("MAX", "Largest error (K)", **figure),
            NumberMember("IN_BAND", "Time in band (%)", **figure),
            NumberMember("DUTY", "Duty (%)", **figure),
            NumberMember("SWITCHES", "Switches per hour", **figure)]),
    ]  # fmt: skip


def make_driver(devicename="Thermostat", *, target=None, poll_interval=None, log_period=None,
                debug=None, max_temperature=None, max_heater_on=None, log_dir=None, config=True,
                sensor=None, heater=None, stuck_after=STUCK_AFTER,
                hardware_timeout=HARDWARE_TIMEOUT, guard=None,
                safety_check=SAFETY_CHECK):  # fmt: skip
    """Return a ThermoDriver for a new thermostat, ready to serve with
    make_server(driver), beside other drivers in any IPyServer, or on
    stdin/stdout with serve_stdio(driver). It reads sensor and switches
    heater (see "Hardware" above); either left out is simulated.

    Its settings are kept in the configuration file `config`: True for
    libindi's place (config_path), a path, or None to keep none. Settings
    given here win over saved ones; those left out (None) come from the
    file, else from DEFAULTS.

    max_temperature and max_heater_on (or, left out, their DEFAULTS) are a
    ceiling: a client or a saved file may tighten the limits, never loosen
    them. guard: the heater's HeaterGuard (start_heater_guard), if any; the
    heater is then switched on only while it runs. safety_check: seconds
    between sensor reads while heating, at most, whatever the poll interval."""
    check_foundation()
    settings = dict(target=target, poll_interval=poll_interval, log_period=log_period, debug=debug,
                    max_temperature=max_temperature, max_heater_on=max_heater_on)  # fmt: skip
    given = {GIVEN_AS[name] for name, value in settings.items() if value is not None}
    target, poll_interval, log_period, debug, max_temperature, max_heater_on = (
        DEFAULTS[name] if value is None else value for name, value in settings.items()
    )
    if config is True:
        config = config_path(devicename)
    if not poll_interval > 0 or not log_period > 0:
        raise ValueError("poll_interval and log_period must be positive numbers of seconds")
    if not (max_heater_on > 0 and stuck_after > 0 and hardware_timeout > 0):
        raise ValueError(
            "max_heater_on, stuck_after and hardware_timeout must be positive numbers of seconds"
        )
    simulator = sensor if isinstance(sensor, Simulator) and heater is None else None
    simulator = Simulator() if simulator is None and None in (sensor, heater) else simulator
    sensor = simulator if sensor is None else sensor
    heater = simulator if heater is None else heater
    thermostat = ThermalControl(
        devicename,
        temperature=sensor.sensed if isinstance(sensor, Simulator) else math.nan,
        target=target,
        max_temperature=max_temperature,
        max_heater_on=max_heater_on,
        stuck_after=stuck_after,
        valid_range=getattr(sensor, "valid_range", None),
        proportional=is_proportional(heater),
    )
    templog = TemperatureLog(devicename, log_period=log_period, log_dir=log_dir)
    weather = LocalWeather.of(sensor)
    properties = [*control_properties(poll_interval),
                  *thermostat_properties(thermostat, log_period),
                  *weather_properties(weather),
                  *regulation_properties(thermostat.regulator),
                  *option_properties(debug)]  # fmt: skip
    driver = ThermoDriver(Device(devicename, properties), thermostat, templog,
                          Hardware(sensor, heater, hardware_timeout, guard), poll_interval,
                          config=config, given=given, debug=debug, weather=weather)  # fmt: skip
    driver.schedule.safety_check = safety_check
    return driver


def make_server(*drivers, host="localhost", port=7624, max_connections=None, max_unread=None,
                max_memory=None, allow=None, read_only=None):  # fmt: skip
    """Return an IndiServer (an IPyServer) for drivers (thermostats and any
    others); await its asyncrun(), then read its failure. See IndiServer for
    max_connections, max_unread, max_memory (bytes), allow and read_only
    (networks, or text as --allow takes)."""
    check_foundation()
    return IndiServer(*drivers, host=host, port=port, max_connections=max_connections,
                      max_unread=max_unread, max_memory=max_memory, allow=allow,
                      read_only=read_only)  # fmt: skip


# ===========================================================================
# PART II: AN INDI SERVING KIT
#
# A server for any indipydriver drivers, executable drivers and remote
# servers, built as libindi's indiserver is, and the link that serves one
# driver on stdin/stdout under indiserver. Nothing here knows thermostats.
#
# How it routes, as indiserver does:
# - A client gets a device's traffic once it has asked for it: getProperties
#   for every device (device="*", which indiserver "@host:port" sends, is every
#   device), one device or one vector, or a request to it. A client that has
#   asked nothing gets only the messages that name no device (the keepalive).
# - BLOBs go to a client that asked for them with enableBLOB (Also or Only,
#   for a device or one vector; a device's setting replaces its vectors').
# - The definitions with which a driver served in this process answers a
#   getProperties go to the client that asked; an executable driver's or a
#   remote server's, which come later on their own links, to every client
#   interested. A pingRequest is answered by the server itself.
# - What a client sends goes to the device's driver, never to other clients;
#   what only a device may send is dropped, for any device name. A request
#   and its answer pass inline, with no queue or task between them.
# - Each element is serialized once and the same bytes go to every client
#   that gets it, written at the end of the event loop's turn. A client's
#   unsent bytes are counted against max_unread; one beyond it is closed with
#   a warning naming its address, and what it held is freed at once.
# ===========================================================================

# ---------------------------------------------------------------------------
# Logs that a peer cannot flood: what a hostile client sends can make the
# server, asyncio and the foundation speak, at any length and rate.
# ---------------------------------------------------------------------------


class Throttle:
    """Lets at most `limit` events of one kind through per `period` seconds,
    and counts the rest: a client that floods the server with bad input must
    flood neither the log nor the other clients."""

    def __init__(self, limit=20, period=60.0):
        self.limit, self.period = limit, period
        self._windows = {}  # kind -> [start of its window, events in it]

    def passes(self, kind, now):
        """(whether this event passes, how many of its kind the window before
        held back): the count is given once, to the first event of a new window."""
        window = self._windows.setdefault(kind, [now, 0])
        held_back = 0
        if now - window[0] >= self.period:
            held_back = max(window[1] - self.limit, 0)
            window[:] = [now, 0]
        window[1] += 1
        return window[1] <= self.limit, held_back


class WarningThrottle(logging.Filter):
    """Passes at most `limit` warnings or errors of one kind (one message
    template) per `period` seconds, and says how many it held back with the
    next one that passes."""

    def __init__(self, limit=20, period=60.0):
        super().__init__()
        self.throttle = Throttle(limit, period)

    def filter(self, record):
        if record.levelno < logging.WARNING:
            return True
        passes, held_back = self.throttle.passes(record.msg, record.created)
        if held_back:
            record.msg = f"{record.msg} ({held_back} more like this were not logged)"
        return passes


def excerpt(text, limit=40):
    "A short quote of what a peer sent, for logs and messages: a line stays short."
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def clipped(text, limit=200):
    "text, cut to limit characters: a rejection quotes what it rejects, never at length."
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_LOG_LINE = 1000


def clip_log_line(record):
    """A log line quotes at most MAX_LOG_LINE characters: with DEBUG on, the
    XML a client sent is logged, and one client could send megabytes."""
    text = record.getMessage()
    if len(text) > MAX_LOG_LINE:
        record.msg, record.args = clipped(text, MAX_LOG_LINE), ()
    return True


FOUNDATION_LOGGERS = ("asyncio", "indipydriver.ipydriver", "indipyserver.ipyserver",
                      "indipyserver.remote", "indipyserver.exdriver")  # fmt: skip


class BoundedLogs:
    """While serving, the loggers a peer can make speak (FOUNDATION_LOGGERS)
    pass at most 20 warnings of a kind a minute, each line at most
    MAX_LOG_LINE characters; on leaving, they are as they were."""

    def __enter__(self):
        self._added = [(logging.getLogger(name), WarningThrottle()) for name in FOUNDATION_LOGGERS]
        for log, throttle in self._added:
            log.addFilter(throttle)
            log.addFilter(clip_log_line)
        return self

    def __exit__(self, *exc_info):
        for log, throttle in self._added:
            log.removeFilter(throttle)
            log.removeFilter(clip_log_line)


_requests_logged = Throttle(limit=100)


def log_request(log, element):
    """With DEBUG on, a request is logged clipped, and at most 100 a minute
    for each logger: a client may send thousands a second."""
    passes, held_back = _requests_logged.passes(log.name, time.monotonic())
    if held_back:
        log.debug("%d more requests were not logged", held_back)
    if passes:
        log.debug("RX:: %s", clipped(serialize(element).decode(), MAX_LOG_LINE))


logger.addFilter(WarningThrottle())  # this module's own
logger.addFilter(clip_log_line)


# ---------------------------------------------------------------------------
# The wire: INDI's elements, libindi's message form, a serializer, and a
# parser bounded in what a peer can make it build.
# ---------------------------------------------------------------------------

MESSAGE_LEVELS = ("[INFO] ", "[WARNING] ", "[ERROR] ")
# What only a device sends: a driver that receives one for its own device ignores it,
# and the server takes it from no client.
_VECTOR_TAGS = [f"{kind}{vector}Vector" for kind in ("def", "set")
                for vector in ("Text", "Number", "Switch", "Light", "BLOB")]  # fmt: skip
DEVICE_TAGS = frozenset({"message", "delProperty", *_VECTOR_TAGS})
NEW_TAGS = frozenset({"newTextVector", "newNumberVector", "newSwitchVector", "newBLOBVector"})
INDI_TAGS = NEW_TAGS | DEVICE_TAGS | {"getProperties", "enableBLOB", "pingRequest"}
BLOB_MODES = ("Never", "Also", "Only")


def indi_timestamp(moment):
    """The text of a UTC datetime as INDI carries it, and as indipydriver
    writes it into every timestamp attribute."""
    return moment.replace(tzinfo=None).isoformat(sep="T")


def as_libindi_message(xmldata):
    """Give a message going out (a <message>, or a vector's message) the form
    of libindi's, the only one KStars shows: a whole-second timestamp, and a
    level prefix, "[INFO] " unless it has one."""
    text = xmldata.get("message")
    if text:
        if not text.startswith(MESSAGE_LEVELS):
            xmldata.set("message", "[INFO] " + text)
        timestamp = xmldata.get("timestamp") or indi_timestamp(datetime.now(timezone.utc))
        xmldata.set("timestamp", timestamp[: len("YYYY-MM-DDTHH:MM:SS")])


def server_message(text):
    "A message from the server itself, in the form KStars shows (see as_libindi_message)."
    element = ET.Element("message", message=text)
    as_libindi_message(element)
    return element


def _escaped_text(text):
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


_ATTRIBUTE_SPECIALS = re.compile(r'[&<>"\r\n\t]')
_ATTRIBUTE_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "\r": "&#13;",
        "\n": "&#10;",
        "\t": "&#09;",
    }
)


def serialize(element):
    """ET.tostring(element), byte for byte, in a fraction of its time: INDI
    has no namespaces, comments or processing instructions, whose handling
    is most of ElementTree's cost (a tenth of a round trip, measured)."""
    parts = []
    try:
        _serialize_into(element, parts)
    except (TypeError, AttributeError):
        return ET.tostring(element)  # anything unusual: ElementTree's way, and its errors
    return "".join(parts).encode("ascii", "xmlcharrefreplace")


def _serialize_into(element, parts):
    tag = element.tag
    if "{" in tag:
        raise TypeError("namespaces are ElementTree's to write")
    parts.append("<" + tag)
    for key, value in element.attrib.items():
        if "{" in key:
            raise TypeError("namespaces are ElementTree's to write")
        if _ATTRIBUTE_SPECIALS.search(value):
            value = value.translate(_ATTRIBUTE_ESCAPES)
        parts.append(f' {key}="{value}"')
    text = element.text
    if text or len(element):
        parts.append(">")
        if text:
            parts.append(_escaped_text(text))
        for child in element:
            _serialize_into(child, parts)
        parts.append(f"</{tag}>")
    else:
        parts.append(" />")
    if element.tail:
        parts.append(_escaped_text(element.tail))


_INDI_START = re.compile(rb"<(?:%s)[\s/>]" % b"|".join(tag.encode() for tag in sorted(INDI_TAGS)))
_INDI_START_LONGEST = max(len(tag) for tag in INDI_TAGS) + 2
_TAG = re.compile(rb"""<[^<>"']*(?:(?:"[^"<]*"|'[^'<]*')[^<>"']*)*>""")  # one complete tag
_ROOT_END = re.compile(rb"</indi\s*>")


class _IndiStream:
    """Splits a byte stream of INDI elements (no document root) into
    elements, with a synthetic root as indipydriver and indipyserver do, but
    bounded in what it builds and surviving what a peer may send. An element
    is discarded, and parsing resumes at the next INDI element's start tag,
    when it is malformed, holds more than max_bytes, nests deeper than
    MAX_DEPTH, has more than MAX_CHILDREN children or MAX_ELEMENTS elements
    in all, or an element with more than MAX_ATTRIBUTES attributes or one
    longer than MAX_ATTRIBUTE_CHARS, or a tag longer than MAX_TAG_BYTES
    (expat holds a tag whole until it ends, and parses it again from its
    start at every feed: 5 MiB of attributes in one tag took minutes).
    Input is parsed a SLICE at a time, so
    that no more is built before a bound is checked than a SLICE can make
    (and the rest of that SLICE is discarded with the element). An INDI
    element inside an unclosed one is taken as the next element."""

    MAX_DEPTH = 4  # INDI needs 2: a vector and its members
    MAX_CHILDREN = 1024  # members of one vector
    MAX_ELEMENTS = 4096
    MAX_ATTRIBUTES = 32  # a definition has at most a dozen
    MAX_ATTRIBUTE_CHARS = 4096  # libindi's longest, a message, is 1024
    MAX_TAG_BYTES = 65536
    SLICE = 1024

    def __init__(self, max_bytes=16 << 20, source="a peer"):
        self.max_bytes = max_bytes
        self.source = source
        self._skipping = False  # after a discarded element, until the next INDI start tag
        self._skipped_tail = b""  # the end of what was skipped: a start tag may span two reads
        self._discarded = 0  # elements discarded in this feed
        self._reset()

    def _reset(self):
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(b"<indi>")
        self._open = [next(self._parser.read_events())[1]]  # the synthetic root, then open elements
        self._held = 0  # bytes since the last complete element
        self._built = 0  # elements since the last complete element
        self._open_tag = None  # the start of a tag not yet ended, from its "<"
        self._line, self._column = 1, len(b"<indi>")  # where the next byte fed will be

    @property
    def held(self):
        "Bytes of the element being parsed, not yet complete."
        return self._held

    def feed(self, data):
        elements = []
        self._discarded = 0
        for start in range(0, len(data), self.SLICE):
            piece = data[start : start + self.SLICE]
            while piece:
                piece = self._skip(piece) if self._skipping else self._parse(piece, elements)
        if self._discarded > 1:
            logger.warning(
                "%s: %d more elements discarded in the same read", self.source, self._discarded - 1
            )
        return elements

    def _discard(self, reason, *args):
        # the first of a read is logged, the others counted: a log record costs as much as the rest
        # of a discard, and a read can hold hundreds of malformed tags
        self._discarded += 1
        if self._discarded == 1:
            logger.warning(
                "%s: " + reason + "; skipping to the next INDI element", self.source, *args
            )
        self._skipping = True
        self._reset()

    def _skip(self, data):
        "Skip data up to the next INDI start tag; return the data from there."
        data = self._skipped_tail + data
        found = _INDI_START.search(data)
        if found is None:
            self._skipped_tail = data[-_INDI_START_LONGEST:]
            return b""
        self._skipping, self._skipped_tail = False, b""
        return data[found.start() :]

    def _parse(self, data, elements):
        "Parse data into elements; after an error, return the data left to skip through."
        if self._tag_too_long(data):
            self._discard("a tag is longer than %d bytes", self.MAX_TAG_BYTES)
            return b""
        self._parser.feed(data)
        self._held += len(data)
        try:
            for event, element in self._parser.read_events():
                if event == "start":
                    if problem := self._beyond_bounds(element):
                        self._discard("an element %s", problem)
                        return b""
                    self._open.append(element)
                    continue
                if len(self._open) == 1:  # </indi>: the synthetic root itself
                    self._discard(
                        "malformed XML received (</%s> with nothing open)", excerpt(element.tag)
                    )
                    closing = _ROOT_END.search(
                        data
                    )  # the first, so that nothing after it is skipped
                    return data[closing.end() :] if closing else b""
                self._open.pop()
                parent = self._open[-1]
                if parent is self._open[0] or (
                    element.tag in INDI_TAGS and parent.tag in INDI_TAGS
                ):
                    if parent is not self._open[0]:
                        logger.warning(
                            "%s: <%s> was never closed; it is ignored",
                            self.source,
                            excerpt(parent.tag),
                        )
                    parent.remove(element)
                    elements.append(element)
                    self._held = self._built = 0
        except ET.ParseError as exc:
            # XMLPullParser reports errors from read_events(), not from feed()
            error_at = self._offset(data, *exc.position)
            self._discard("malformed XML received (%s)", exc)
            return data[error_at + 1 :] if error_at >= 0 else data
        if self._held > self.max_bytes:
            self._discard("an element exceeded %d bytes", self.max_bytes)
            return b""
        newlines = data.count(b"\n")
        self._line += newlines
        self._column = len(data) - data.rfind(b"\n") - 1 if newlines else self._column + len(data)
        return b""

    def _tag_too_long(self, data):
        """Follow tags across feeds: True if one has not ended within MAX_TAG_BYTES.
        A tag holds no "<" (expat rejects one in an attribute value), so only
        the tag started at the last "<" can still be open at the end."""
        text = data if self._open_tag is None else self._open_tag + data
        self._open_tag = None
        position = text.rfind(b"<")
        if position < 0 or _TAG.match(text, position):
            return False
        if len(text) - position > self.MAX_TAG_BYTES:
            return True
        self._open_tag = text[position:]
        return False

    def _beyond_bounds(self, element):
        "What is wrong with an element just started, or None."
        self._built += 1
        if len(self._open) > self.MAX_DEPTH:
            return f"nests deeper than {self.MAX_DEPTH}"
        if self._built > self.MAX_ELEMENTS:
            return f"has more than {self.MAX_ELEMENTS} elements"
        if len(self._open) > 1 and len(self._open[-1]) > self.MAX_CHILDREN:
            return f"has more than {self.MAX_CHILDREN} children"
        attributes = element.attrib
        if len(attributes) > self.MAX_ATTRIBUTES:
            return f"has more than {self.MAX_ATTRIBUTES} attributes"
        if attributes and max(map(len, attributes.values())) > self.MAX_ATTRIBUTE_CHARS:
            return f"has an attribute longer than {self.MAX_ATTRIBUTE_CHARS} characters"
        return None

    def _offset(self, data, line, column):
        "Where in data the parser's (line, column) falls; -1 if before it."
        if (line, column) < (self._line, self._column):
            return -1
        if line == self._line:
            return column - self._column
        position = -1
        for _ in range(line - self._line):
            position = data.find(b"\n", position + 1)
            if position < 0:
                return len(data)
        return position + 1 + column


# ---------------------------------------------------------------------------
# The server and its clients: IndiServer, an IPyServer whose client side is
# its own, built as libindi's indiserver is: one object per client, each
# with its own queue counted in bytes; an element serialized once and
# shared by every queue that carries it; routing by interest; what a client
# sends goes to the devices, never straight to other clients; a client that
# fails or falls behind is closed and forgotten in one place.
# indipyserver 0.0.6's client side (a pool of at most 10 slots, one queue
# for everything, a task per element per slot, every element to every
# client, serialized once per client) cannot be patched into that, so
# IndiServer keeps IPyServer for its drivers, add_exdriver and add_remote,
# and routes between them and the clients itself: inline, with no queue or
# task between a request and its answer.
# ---------------------------------------------------------------------------

DEFAULT_MAX_CONNECTIONS = 500  # far more than clients need: dead connections must not fill it
MAX_CONNECTIONS = 1000  # below the usual limit of 1024 open files
DEFAULT_MAX_UNREAD_MIB = 32  # libindi's indiserver -m: 128 MB
DEFAULT_MAX_MEMORY_MIB = 64  # for every client together: a Pi has 1 GiB or less
MAX_ELEMENT_BYTES = 16 << 20  # the largest element a client may send
MAX_RESTARTS = 10  # of an executable driver that ends: indiserver's (-r, DEFMAXRESTART in 1.9.9)


def parse_networks(text):
    """The networks in text, addresses or networks separated by commas
    (192.168.1.0/24,::1), or ValueError saying which one is wrong."""
    networks = []
    for part in text.split(","):
        try:
            networks.append(ipaddress.ip_network(part.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not an IP address or network") from None
    return tuple(networks)


def in_networks(host, networks):
    "True if the address host (a string, as accept() gives it) is in one of networks."
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


READ_SIZE = 65536  # from indiserver, on a driver's stdin
CLIENT_READ_SIZE = 1024  # from a client: its input between two turns of everyone else's


async def hand_to_driver(runner, element):
    """Hand an element from outside to a driver, an executable driver or a
    remote server. A driver that offers take_request(element) (ThermoDriver)
    takes the requests for its own devices itself; what only a device may
    send is not taken for its own devices (libindi's indiserver passes on
    what clients send, and indipydriver would take a definition of its own
    device as a duplicate and end the driver). An exception stays here: in
    indipyserver's TaskGroup it would end the whole server."""
    try:
        take_request = getattr(runner, "take_request", None)
        if take_request is not None and element.get("device") in runner:
            if element.tag in NEW_TAGS:
                await take_request(element)
                return
            if element.tag in DEVICE_TAGS:
                logger.warning("%s: ignored <%s> for this device from outside: only this driver "
                               "speaks for it", element.get("device"), element.tag)  # fmt: skip
                return
        await read_element(runner, element)
    except Exception:
        logger.exception("failed to hand <%s> to %s", element.tag, type(runner).__name__)


# Whom a definition answers: a device that answers a getProperties sends its
# definitions while the server awaits it, in this context (or in tasks that
# copy it), so they go to the one who asked, not to every client.
_asker = contextvars.ContextVar("asker", default=None)


class _DeviceLink:
    """The server's end of one link to devices: an IPyDriver served here,
    an executable driver (add_exdriver) or a remote server (add_remote).
    They call run_tx with each element they send, as they would
    indipyserver's own link, and the server routes it at once."""

    def __init__(self, server, source):
        self.server, self.source = server, source
        self.blobs = {}  # its enableBLOB settings, per device and per (device, vector)

    async def run_tx(self, xmldata):
        await self.server._from_device(self, xmldata)

    async def run_tx_everywhere(self, xmldata):
        await self.server._from_device(self, xmldata)

    async def run_rx(self):
        "Nothing to read: the server hands elements to the device itself (hand_to_driver)."

    def shutdown(self):
        "The server stops its links itself."

    def devices(self):
        "The device names this link serves now."
        source = self.source
        return source.devicenames if hasattr(source, "devicenames") else source.data

    def snoops(self, device, name):
        "True if this link asked for another device's traffic (indipydriver and ExDriver track it)."
        source = self.source
        return getattr(source, "snoopall", False) or (
            device in getattr(source, "snoopdevices", ())
            or (device, name) in getattr(source, "snoopvectors", ())
        )

    def snooping(self, device, name):
        """It asked for another device's traffic: noted on the driver before
        the answer comes, as indiserver notes it. indipydriver notes it only
        once its send has returned, so the definitions answering at once
        were dropped as not snooped: a driver snooping a whole device got
        only later changes, never the definitions."""
        source = self.source
        if not hasattr(source, "snoopdevices"):
            return  # a remote server: its own server keeps track
        if device is None:
            source.snoopall = True
        elif name is None:
            source.snoopdevices.add(device)
        elif isinstance(source.snoopvectors, dict):  # indipydriver's: key -> its snoop timer
            source.snoopvectors.setdefault((device, name), None)
        else:
            source.snoopvectors.add((device, name))

    def takes_blobs(self, device, name):
        "True if it asked for another device's BLOBs: as indiserver, none before an enableBLOB."
        mode = self.blobs.get((device, name)) or self.blobs.get(device, "Never")
        return mode != "Never"

    def answer(self, element, data):
        self.server._hand_over(self, element)

    def __str__(self):
        source = self.source
        if isinstance(source, RemoteConnection):
            return f"remote {source.indihost}:{source.indiport}"
        name = getattr(source, "program", None) or ", ".join(source) or type(source).__name__
        return f"driver {name}"


_socket_send = socket.socket.send


class _Route:
    "The clients an element goes to, and their sockets (for IndiServer._flush)."

    __slots__ = ("clients", "socks")

    def __init__(self, clients):
        self.clients = clients
        self.socks = [client.sock for client in clients]


class _Client:
    """One client connection: what it asked for, its BLOB settings, and the
    bytes waiting for it. An element for several clients is serialized once
    and shared: each queue holds the same bytes object (or a view of the
    unsent rest of it). A client is closed and forgotten in close(), and
    nothing of it remains."""

    MAX_SETTINGS = 1024  # interests and BLOB settings kept per client

    def __init__(self, server, sock, address):
        self.server, self.sock, self.fd = server, sock, sock.fileno()
        self.address = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.host = address[0] if isinstance(address, tuple) else str(address)
        self.loop = server._loop
        self.asked = False  # it has sent a valid request
        self.all_devices = False  # it asked for every device
        self.devices = set()  # devices it asked for as a whole
        self.vectors = set()  # (device, vector) pairs it asked for
        self.touched = set()  # devices it asked anything of: their messages go to it
        self.blobs = {}  # BLOB setting per device, and per (device, vector)
        self.unsent = collections.deque()  # bytes waiting for it, oldest first
        self.unsent_bytes = 0
        self.peak_unsent_bytes = 0
        self.writing = False  # waiting for the socket to take more
        self.closed = False
        self.write_failed = False  # it went away: read what it sent before, then close
        self.held_input = 0  # bytes of an unfinished element it sent
        self.last_heard = self.loop.time()  # when it last sent something
        self.stalled_since = None  # since when bytes wait for it
        self.read_only = False  # its requests to change anything are refused
        self.task = None
        self.watched = False  # the event loop watches its socket for input
        self._readable = None  # while its task waits for input (and may be cancelled)
        self.route = _Route((self,))  # to this client alone

    def interested(self, device, name):
        "Its requests name the devices (and vectors) whose traffic it gets, as in indiserver."
        if device in self.touched and (device in self.devices or (device, name) in self.vectors):
            return  # nothing new (a client setting a value again and again)
        self.server._routes.clear()
        self.touched.add(device)
        if name is None or len(self.vectors) >= self.MAX_SETTINGS:
            self.devices.add(device)
        else:
            self.vectors.add((device, name))

    def wants(self, tag, device, name):
        "True if an element from a device should go to this client."
        if device is None:
            return True  # a message to everyone
        if not (
            self.all_devices
            or device in self.devices
            or (device, name) in self.vectors
            or (name is None and device in self.touched)
        ):
            return False
        if not self.blobs:
            return tag != "setBLOBVector"
        mode = self.blobs.get((device, name)) or self.blobs.get(device, "Never")
        if tag == "setBLOBVector":
            return mode != "Never"
        return self.blobs.get(device) != "Only"

    def answer(self, element, data):
        "A definition it asked for."
        if not self.blobs or self.blobs.get(element.get("device")) != "Only":
            self.send(data)

    def send(self, data):
        "Data for this client alone: it goes out with the rest of this turn's output (_flush)."
        self.server._deliver(self.route, data)

    def _enqueue(self, data):
        """Queue data behind what waits; a client that leaves too much unread is
        disconnected, and so are the largest holders when all together hold too much."""
        server = self.server
        if not self.unsent:
            server._stalled.add(self)
            self.stalled_since = self.loop.time()
        self.unsent.append(data)
        self.unsent_bytes += len(data)
        server.held_bytes += len(data)
        if server.held_bytes > server.max_memory:
            server._shed()
        if self.closed:
            return
        if self.unsent_bytes > self.peak_unsent_bytes:
            self.peak_unsent_bytes = self.unsent_bytes
            if self.unsent_bytes > self.server.max_unread:
                logger.warning(
                    "client %s: disconnected, it has not read its last %d bytes (--max-unread %d)",
                    self.address,
                    self.unsent_bytes,
                    self.server.max_unread,
                )
                self.close()

    def _queue_and_write(self, data):
        "Data behind whatever waits for this client, written as far as its socket takes it now."
        if self.closed or self.write_failed:
            return
        self._enqueue(data)
        if not self.writing:
            self._write()

    def _write(self):
        "Send what waits, oldest first; if the socket is full, again when it can take more."
        unsent, sock = self.unsent, self.sock
        while unsent and not self.closed:
            try:
                # most often a single update waits: send() costs less than sendmsg()
                sent = (
                    sock.send(unsent[0])
                    if len(unsent) == 1
                    else sock.sendmsg(itertools.islice(unsent, 256))
                )
            except BlockingIOError:
                break  # the socket is full
            except OSError:
                self._went_away()
                return
            if sent == self.unsent_bytes:  # all of it went, as it mostly does
                unsent.clear()
                self.server.held_bytes -= sent
                self.unsent_bytes = 0
                break
            if not self._drop_sent(sent):
                break  # the socket is full
        if unsent and not self.writing:
            self.writing = True
            self.loop.add_writer(self.fd, self._write)
        elif not unsent:
            if self.writing:
                self.writing = False
                self.loop.remove_writer(self.fd)
            self.stalled_since = None
            if not self.write_failed:
                self.server._stalled.discard(self)

    def _drop_sent(self, sent):
        """Take sent bytes off the front of the queue; False if they ended
        within a chunk (the socket took less than it was offered)."""
        self.unsent_bytes -= sent
        self.server.held_bytes -= sent
        unsent = self.unsent
        while sent:
            if sent < len(unsent[0]):
                unsent[0] = memoryview(unsent[0])[sent:]
                return False
            sent -= len(unsent.popleft())
        return True

    def say_last(self, text):
        "A last message from the server, written at once, then the connection is closed."
        self._enqueue(serialize(server_message(text)))
        self._write()
        self.close()

    def _went_away(self):
        """A write failed: the client reset or closed the connection. It may
        have sent requests before it went (indi_setprop sends its request and
        closes at once): they are still to be read, and then its input ends."""
        self.write_failed = True
        self._forget_unsent()
        self.server._stalled.add(self)  # until it is closed: nothing more is written to it

    def _forget_unsent(self):
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        self.unsent.clear()
        self.server.held_bytes -= self.unsent_bytes
        self.unsent_bytes = 0
        self.stalled_since = None

    def hold_input(self, held):
        "It has sent held bytes of an element not yet finished: they count in the server's budget."
        server = self.server
        server.held_bytes += held - self.held_input
        self.held_input = held
        if server.held_bytes > server.max_memory:
            server._shed()

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._forget_unsent()
        self.server.held_bytes -= self.held_input
        self.held_input = 0
        self._unwatch()
        self.server._stalled.discard(self)
        self.server._forget(self)
        if self._readable is not None and self.task is not None:
            self.task.cancel()  # else it is handling a request, and ends after it

    # Input: the socket stays watched from one request to the next, rather
    # than through loop.sock_recv, which with uvloop registers and drops it
    # at every read (eight system calls a request, measured with strace).
    # The socket is read until a read finds nothing, and only then is the
    # event loop's report awaited: the end of the stream and a reset are
    # taken from the socket itself. uvloop (libuv) stops watching a socket
    # whose report carries an error without calling back, so a client that
    # sent a request and reset the connection at once was never forgotten,
    # its connection held for good. A read that follows another without a
    # wait first yields once, so that a client that keeps sending is served
    # no faster than its share.

    async def _input(self):
        "Wait until the socket has input (or has closed)."
        self._readable = readable = self.loop.create_future()
        if not self.watched:
            self.loop.add_reader(self.fd, self._on_input)
            self.watched = True
        try:
            await readable
        finally:
            self._readable = None

    def _on_input(self):
        readable = self._readable
        if readable is not None and not readable.done():
            readable.set_result(None)
        else:  # busy with what it read: unwatched until it waits again, else the loop would spin
            self._unwatch()

    def _unwatch(self):
        if self.watched:
            self.watched = False
            self.loop.remove_reader(self.fd)

    async def run(self):
        stream = _IndiStream(self.server.max_element, source=f"client {self.address}")
        waited = True
        try:
            while not self.closed:
                try:
                    data = self.sock.recv(CLIENT_READ_SIZE)
                except BlockingIOError:
                    await self._input()  # nothing to read: until the event loop reports input
                    waited = True
                    continue
                if not data:
                    break
                self.last_heard = self.loop.time()
                if not waited:
                    await asyncio.sleep(0)  # read again without waiting: everyone else's turn first
                waited = False
                elements = stream.feed(data)
                if stream.held != self.held_input:
                    self.hold_input(stream.held)
                for count, element in enumerate(elements, 1):
                    if self.closed:
                        break
                    await self.server._from_client(self, element)
                    if count % 8 == 0:
                        await asyncio.sleep(0)  # a client is served no faster than its share
        except asyncio.CancelledError:
            if not self.closed:
                raise
        except OSError:
            pass  # a reset: its input ends
        except Exception:
            logger.exception("client %s: failed", self.address)
        finally:
            self.close()
            self.sock.close()
            logger.debug("client %s disconnected", self.address)


class IndiServer(IPyServer):
    """An IPyServer (make_server returns one): its drivers, add_exdriver
    and add_remote as in indipyserver, with a client side of its own (see
    the section's comment). Against indipyserver 0.0.6, it keeps the limits of
    a server that a hostile client cannot lock, starve, inflate or use to
    spoof a device:

    - connections: up to max_connections live ones (default 500; a closed
      one frees all it held at once). A newcomer always gets in, as under
      indiserver: at the limit, one connection is closed to make room, told
      why, and named in a warning: the longest-connected one that has sent
      no valid request, else the one whose output has waited unread the
      longest, else the one that has gone longest without sending anything.
      Connections that asked once and stopped reading cannot keep anyone out;
    - who: with allow (networks), a connection from any other address is
      closed at once (logged at most once a minute per address); clients
      from read_only networks get everything, and each new*Vector they send
      is refused with a message to them;
    - output: each client has its own queue, counted in bytes; a client with
      more than max_unread bytes unread is disconnected with a warning;
    - memory: what every client together leaves unread or has sent of an
      unfinished element is at most max_memory bytes (default 64 MiB, an
      element at most 16 MiB); beyond it the client holding the most is
      disconnected, named in a warning, until the total is within it;
    - input: a client's requests are handled in turn with everyone else's,
      a few at a time; its elements are bounded in what they build
      (_IndiStream); it may ask (getProperties, enableBLOB and new*Vector
      for a device served here, locally or relayed), and whatever only a
      device may send is dropped with a warning, for any device name.

    Also recorded in self.failure (so that the command line exits non-zero)
    rather than ending silently with status 0: a port that cannot be opened,
    an exception in any driver."""

    def __init__(self, *drivers, host="localhost", port=7624, max_connections=None,
                 max_unread=None, max_memory=None, allow=None, read_only=None):  # fmt: skip
        super().__init__(*drivers, host=host, port=port, maxconnections=1)  # its client side unused
        max_connections = max_connections or DEFAULT_MAX_CONNECTIONS
        self.maxconnections = self.max_connections = (
            max_connections  # (IPyServer's name too, kept true)
        )
        self.max_unread = max_unread or DEFAULT_MAX_UNREAD_MIB << 20
        self.max_memory = max_memory or DEFAULT_MAX_MEMORY_MIB << 20
        self.max_element = min(MAX_ELEMENT_BYTES, self.max_memory)
        self.held_bytes = 0  # unread output and unfinished input of every client
        self.allow = parse_networks(allow) if isinstance(allow, str) else allow
        self.read_only = parse_networks(read_only) if isinstance(read_only, str) else read_only
        self._refused = {}  # address -> when its refusal was last logged
        self.failure = None
        self.listening = asyncio.Event()  # set once clients can connect
        self.clients = {}  # oldest first; the values are unused
        self._client_list = ()  # a snapshot of clients to route through
        self._everyone = _Route(())  # and the route to all of them
        self._routes = {}  # (tag, device, name) -> _Route to the clients that get it
        self._links = []
        self._local = {}  # device name -> link of the IPyDriver serving it
        for driver in self.drivers:
            link = attach_link(driver, _DeviceLink(self, driver))
            self._links.append(link)
            self._local.update(dict.fromkeys(driver, link))
        self._loop = None
        self._stopping = False
        self._tasks = None  # the TaskGroup that runs everything
        self._accepting = []
        self._keepalive_timer = None
        self._last_traffic = 0.0
        self._turn = []  # (route, bytes) to write at the end of this turn
        self._stalled = set()  # clients with bytes waiting, or gone

    def add_remote(self, host, port, blob_enable=False, debug_enable=False):
        "As IPyServer.add_remote, with a link that waits quietly while the remote is down."
        relay = _RelayingRemoteConnection(
            host=host, port=port, blob_enable=blob_enable, debug_enable=debug_enable
        )
        self.remotes.append(relay)
        self._links.append(attach_link(relay, _DeviceLink(self, relay)))

    def add_exdriver(self, program, *args, debug_enable=False):
        """As IPyServer.add_exdriver, and as indiserver runs one: if it ends,
        its devices are deleted at clients and it is started again, up to
        MAX_RESTARTS times."""
        executable = _RestartingExDriver(program, *args, debug_enable=debug_enable)
        self.exdrivers.append(executable)
        answer_pings(executable)
        self._links.append(attach_link(executable, _DeviceLink(self, executable)))

    # -- routing ------------------------------------------------------------

    def _owner(self, device):
        "The link serving device, or None."
        link = self._local.get(device)
        if link is None and device is not None:
            link = next((link for link in self._links if device in link.devices()), None)
        return link

    async def _from_client(self, client, element):
        tag, device = element.tag, element.get("device")
        if tag == "getProperties":
            client.asked = True
            name = element.get("name")
            if device == "*":  # libindi's indiserver chained to this one ("@host"): everything
                device, element = (
                    None,
                    ET.Element("getProperties", version=element.get("version", "1.7")),
                )
            if device is None:
                client.all_devices = True
                self._routes.clear()
                await self._ask(client, element, self._links)
            elif owner := self._owner(device):
                client.interested(device, name)
                await self._ask(client, element, [owner])
            else:  # it may yet be defined by an executable driver or a remote server
                links = [link for link in self._links if link.source not in self.drivers]
                if links and len(client.touched) < client.MAX_SETTINGS:
                    client.interested(
                        device, name
                    )  # as indiserver: what it defines later reaches this client
                await self._ask(client, element, links)
        elif tag in NEW_TAGS:
            if client.read_only:
                client.asked = True
                logger.warning(
                    "client %s: refused <%s> for %s: it connects from a read-only address",
                    client.address,
                    tag,
                    excerpt(device),
                )
                refusal = server_message(
                    f"[WARNING] Refused: {client.host} may only read on this server "
                    "(--read-only); nothing was changed"
                )
                if self._owner(device):
                    refusal.set("device", device)
                client.send(serialize(refusal))
            elif owner := self._owner(device):
                client.asked = True
                client.interested(device, element.get("name"))  # as indiserver: it hears the answer
                await self._pass(owner, element)
            else:
                logger.warning(
                    "client %s: ignored <%s> for %s, a device not served here",
                    client.address,
                    tag,
                    excerpt(device),
                )
        elif tag == "enableBLOB":
            setting = (element.text or "").strip()
            name = element.get("name")
            if self._owner(device) is None or setting not in BLOB_MODES:
                logger.warning(
                    "client %s: ignored an enableBLOB for %s, %s: it takes a device served here "
                    "and Never, Also or Only",
                    client.address,
                    excerpt(device),
                    excerpt(setting),
                )
            elif name is not None and len(client.blobs) >= client.MAX_SETTINGS:
                logger.warning(
                    "client %s: ignored an enableBLOB: more than %d settings",
                    client.address,
                    client.MAX_SETTINGS,
                )
            else:
                client.asked = True
                client.interested(device, name)
                if name is None:  # as indiserver: a device's setting replaces its vectors' own
                    for key in [
                        key for key in client.blobs if isinstance(key, tuple) and key[0] == device
                    ]:
                        del client.blobs[key]
                client.blobs[device if name is None else (device, name)] = setting
                self._routes.clear()
        elif tag == "pingRequest":  # as indiserver: the server answers it itself
            client.send(serialize(ET.Element("pingReply", uid=element.get("uid", ""))))
        elif tag in DEVICE_TAGS:
            logger.warning(
                "client %s: ignored <%s> for %s: a client may ask (getProperties, enableBLOB, "
                "new*Vector), only a device may send this",
                client.address,
                tag,
                excerpt(device) if device is not None else "every device",
            )
        else:
            logger.warning(
                "client %s: ignored <%s>, which is not an INDI element",
                client.address,
                excerpt(tag),
            )

    async def _from_device(self, link, element):
        tag = element.tag
        if tag in DEVICE_TAGS:
            self._publish(link, element)
        elif tag == "getProperties":  # a driver snooping on another device
            device = element.get("device")
            link.snooping(device, element.get("name"))
            owner = self._owner(device)
            if device is None or owner is None:
                targets = [other for other in self._links if other is not link]
            else:
                targets = [owner] if owner is not link else []
            await self._ask(link, element, targets)
        elif tag in NEW_TAGS:  # a driver commanding another device
            owner = self._owner(element.get("device"))
            if owner is not None and owner is not link:
                await self._pass(owner, element)
        elif tag == "enableBLOB":  # a driver snooping on another device's BLOBs
            device, name, setting = element.get("device"), element.get("name"), element.text
            setting = (setting or "").strip()
            if device is not None and setting in BLOB_MODES and len(link.blobs) < 1024:
                link.blobs[device if name is None else (device, name)] = setting

    def _publish(self, link, element):
        "Serialize an element from a device once, and hand it to whoever asked for it."
        tag, device, name = element.tag, element.get("device"), element.get("name")
        if tag.startswith("def"):
            if device is None or name is None:
                return
            owner = self._owner(device)
            if owner is not None and owner is not link:
                logger.warning(
                    "%s: ignored a definition of %s, a device served by %s",
                    link,
                    excerpt(device),
                    owner,
                )
                return
        if tag != "setBLOBVector":  # a BLOB may be held up: it does not count
            self._last_traffic = self._loop.time()
        asker = _asker.get()
        if asker is not None and tag.startswith("def"):
            asker.answer(element, serialize(element))
            return
        route = self._routes.get((tag, device, name))
        if route is None:
            route = self._route(tag, device, name)
        if route.clients:
            self._deliver(route, serialize(element))
        if device is not None:
            for other in self._links:
                if (
                    other is not link
                    and other.snoops(device, name)
                    and (tag != "setBLOBVector" or other.takes_blobs(device, name))
                ):
                    self._hand_over(other, element)

    def _route(self, tag, device, name):
        """The clients that get an element: worked out once for every client
        and kept until a client comes, goes or asks for something new, so
        that an update costs each client a send, not a look at its interests."""
        if len(self._routes) >= 1024:  # element names come from devices: keep it bounded
            self._routes.clear()
        route = self._routes[tag, device, name] = _Route(
            [c for c in self._client_list if c.wants(tag, device, name)]
        )
        return route

    async def _ask(self, asker, element, links):
        "Pass a getProperties to links; the definitions that answer it go to asker alone."
        token = _asker.set(asker)
        try:
            for link in links:
                await self._pass(link, element)
        finally:
            _asker.reset(token)

    async def _pass(self, link, element):
        """Hand element to a link's driver; to a driver that offers ready, an
        asyncio.Event (ThermoDriver), once it is set: a client that asks as the
        server starts would otherwise see, and change, the settings the driver
        is still reading from its file."""
        if (ready := getattr(link.source, "ready", None)) is not None:
            await ready.wait()
        await hand_to_driver(link.source, element)

    def _hand_over(self, link, element):
        "To a driver snooping, in a task of its own: its handling must not hold up the sender."
        if self._tasks is not None and not self._stopping:
            self._tasks.create_task(self._pass(link, element))

    def _to_clients(self, element):
        self._deliver(self._everyone, serialize(element))

    async def send_message(self, message, timestamp=None):
        "A message from the server to every client (IPyServer.send_message, routed here)."
        element = server_message(message)
        if timestamp is not None:
            element.set("timestamp", indi_timestamp(timestamp))
            as_libindi_message(element)
        self._to_clients(element)

    def _deliver(self, route, data):
        "Data for a route's clients, written at the end of this turn of the event loop (_flush)."
        if not self._turn:
            self._loop.call_soon(self._flush)
        self._turn.append((route, data))

    def _flush(self):
        """Write this turn's output: one callback for all clients, and one
        system call per client, whatever the turn held for it (a poll's
        updates, a getProperties' definitions). Most often the turn holds a
        single update and no client has bytes waiting: then the route's
        sockets are sent it in one pass in C (map), a Python loop per client
        being most of a fan-out's cost in this process (the socket's own
        work, in the kernel, is the rest). Otherwise each client is written
        through its own queue (_write)."""
        turn, self._turn = self._turn, []
        if len(turn) == 1:
            route, data = turn[0]
            clients, start = route.clients, 0
            if not self._stalled:
                sent = []
                try:
                    sent.extend(map(_socket_send, route.socks, itertools.repeat(data)))
                except OSError:
                    pass  # a full socket, or a client gone: it is dealt with below
                start, size = len(sent), len(data)
                if sent.count(size) != start:
                    for client, taken in zip(clients, sent, strict=False):
                        if taken != size:
                            client._queue_and_write(memoryview(data)[taken:])
            for client in itertools.islice(clients, start, None):
                client._queue_and_write(data)
            return
        waiting = {}
        for route, data in turn:
            for client in route.clients:
                if not (client.closed or client.write_failed):
                    client._enqueue(data)
                    waiting[client] = None
        for client in waiting:
            client._write()

    def _send_keepalive_message(self):
        # as indipyserver words it, without a level: KStars takes it as debug output,
        # not for its log
        self._to_clients(
            ET.Element(
                "message",
                timestamp=indi_timestamp(datetime.now(timezone.utc)),
                message="Keep alive message",
            )
        )

    def _keep_alive(self):
        "After keepalive seconds without traffic (BLOBs aside), a message says the server is alive."
        if self._stopping or not self.keepalive:
            return
        now = self._loop.time()
        if now >= self._last_traffic + self.keepalive:
            self._send_keepalive_message()
            self._last_traffic = now
        self._keepalive_timer = self._loop.call_at(
            self._last_traffic + self.keepalive, self._keep_alive
        )

    # -- connections ----------------------------------------------------------

    def _admit(self, sock, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.allow is not None and not in_networks(host, self.allow):
            sock.close()
            now = self._loop.time()
            if now - self._refused.get(host, -math.inf) >= 60:
                if len(self._refused) >= 4096:  # addresses come from anyone: keep it bounded
                    self._refused.clear()
                self._refused[host] = now
                logger.warning("refused a connection from %s, which is not allowed (--allow)", host)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _Client(self, sock, address)
        client.read_only = self.read_only is not None and in_networks(host, self.read_only)
        if len(self.clients) >= self.max_connections:
            quietest, why = self._quietest()
            logger.warning(
                "closed client %s, which has %s, to make room for %s: all %d connections in use",
                quietest.address,
                why,
                client.address,
                self.max_connections,
            )
            quietest.say_last(
                f"[WARNING] This server is full ({self.max_connections} clients): this connection "
                f"has {why}, and is closed to make room"
            )
        logger.debug("client %s connected", client.address)
        self.clients[client] = None
        self._clients_changed()
        client.task = self._tasks.create_task(client.run())

    def _quietest(self):
        """The connection to close to make room, and why: one that never
        asked, else the one whose output has waited unread longest, else the
        one that has gone longest without sending anything."""
        now = self._loop.time()
        silent = next((c for c in self.clients if not c.asked), None)
        if silent is not None:
            return silent, "sent no request"
        stalled = [c for c in self._stalled if c.stalled_since is not None and not c.closed]
        if stalled:
            client = min(stalled, key=lambda c: c.stalled_since)
            return client, f"left its output unread for {now - client.stalled_since:.0f} s"
        client = min(self.clients, key=lambda c: c.last_heard)
        return client, f"sent nothing for {now - client.last_heard:.0f} s"

    def _shed(self):
        "Over the memory budget: disconnect the largest holders until within it."
        while self.held_bytes > self.max_memory:
            client = max(self.clients, key=lambda c: c.unsent_bytes + c.held_input, default=None)
            if client is None or not client.unsent_bytes + client.held_input:
                return
            logger.warning(
                "client %s: disconnected, it held the most (%d bytes unread, %d of an unfinished "
                "element) when all clients together held %d bytes (--max-memory %d)",
                client.address,
                client.unsent_bytes,
                client.held_input,
                self.held_bytes,
                self.max_memory,
            )
            client.close()

    def _forget(self, client):
        if self.clients.pop(client, False) is None:
            self._clients_changed()

    def _clients_changed(self):
        self._client_list = tuple(self.clients)
        self._everyone = _Route(self._client_list)
        self._routes.clear()

    def _listen(self):
        "Listening sockets on every address of host, or OSError."
        listeners = []
        try:
            for family, kind, protocol, _, address in socket.getaddrinfo(
                self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                try:
                    listener = socket.socket(family, kind, protocol)
                except OSError:
                    continue  # a family this machine lacks (IPv6, say), as asyncio skips it
                listeners.append(listener)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                listener.bind(address)
                listener.listen(128)
                listener.setblocking(False)
            if not listeners:
                raise OSError("no address of this host can be listened on")
        except OSError:
            for listener in listeners:
                listener.close()
            raise
        return listeners

    async def _accept(self, listener):
        try:
            while not self._stopping:
                try:
                    sock, address = await self._loop.sock_accept(listener)
                except OSError as exc:  # out of file descriptors, say: not the end of the server
                    logger.warning("cannot accept a connection: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                self._admit(sock, address)
        finally:
            listener.close()

    async def _serve_clients(self):
        try:
            listeners = self._listen()
        except OSError as exc:
            self.failure = f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            self.shutdown()
            return
        devices = ", ".join(self.devices) or "no devices"
        logger.info("serving %s on %s:%s (Ctrl-C stops)", devices, self.host, self.port)
        self.listening.set()
        self._accepting = [
            self._tasks.create_task(self._accept(listener)) for listener in listeners
        ]

    @property
    def stop(self):
        "True once the server is stopping (IPyServer's flag)."
        return self._stopping

    def shutdown(self, shutdownmessage=""):
        "Stop the server, its drivers, links and clients (as IPyServer.shutdown, for this server)."
        if shutdownmessage:
            logger.error("%s", shutdownmessage)
        self._stopping = True
        for runner in (*self.drivers, *self.remotes):
            runner.shutdown()
        for executable in self.exdrivers:
            stop_executable(executable)
        self.stopped.set()
        for task in self._accepting:
            task.cancel()
        for client in self._client_list:
            client.close()
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()

    async def asyncrun(self):
        # IPyServer.asyncrun logs an exception and returns as if all were well; keep it instead.
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._last_traffic = self._loop.time()
        with BoundedLogs():
            await self._run_all()

    async def _run_all(self):
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                for runner in (*self.drivers, *self.exdrivers, *self.remotes):
                    tasks.create_task(runner.asyncrun())
                tasks.create_task(self._serve_clients())
                self._keep_alive()
        except Exception as exc:
            logger.exception("the server stopped on an error")
            self.failure = f"the server stopped on an error: {exc!r}"
        finally:
            self.shutdown()
            for executable in self.exdrivers:
                await reap_executable(executable)


ThermoServer = IndiServer  # its name before it served more than thermostats


# ---------------------------------------------------------------------------
# The stdio link: one driver served on stdin/stdout, as an executable
# driver under libindi's indiserver.
# ---------------------------------------------------------------------------


class StdioLink:
    """The driver's link to indiserver on stdin/stdout, in place of
    indipydriver 3.1.2's own, which polls stdin every 10 ms (11 ms per
    request, 3% CPU idle), keeps running after end of input, and writes to
    stdout as if it blocked: indiserver passes one socket as fd 0 and 1, and
    indipydriver makes fd 0 non-blocking, so large writes lost data or
    raised BlockingIOError. Here stdin is read by the event loop (a regular
    file or /dev/null, which it cannot watch, is read directly to its end),
    end of input shuts the driver down, every write completes without
    blocking the event loop (a stdout pipe is made non-blocking too), and a
    stdout that cannot be written stops the driver, the reason in
    self.failure."""

    def __init__(self, driver, fd_in=0, fd_out=1):
        self.driver = driver
        self.fd_in, self.fd_out = fd_in, fd_out
        self.failure = None
        self._transport = None
        self._writing = asyncio.Lock()  # one message at a time, even across partial writes
        self._waiting = None  # the future a write waits on while stdout is full

    async def run_rx(self):
        mode = os.fstat(self.fd_out).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.set_blocking(self.fd_out, False)  # a reader that lags must not stop the polls
        read = await self._input_reader()
        stream = _IndiStream()
        ended = "end of input"
        try:
            while not self.driver.stop and (data := await read()):
                for element in stream.feed(data):
                    await hand_to_driver(self.driver, element)
        except OSError as exc:  # indiserver gone with our output unread: ECONNRESET
            ended = f"stdin closed ({exc.strerror or exc})"
        if not self.driver.stop:
            logger.info("%s: the driver stops", ended)
            self.driver.shutdown()

    async def _input_reader(self):
        "A coroutine function returning stdin's next data, b'' at its end."
        mode = os.fstat(self.fd_in).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(self.fd_in)):

            async def read_file():  # a regular file or /dev/null: the event loop cannot
                await asyncio.sleep(0)  # watch it, and reading it never waits for a writer
                return os.read(self.fd_in, 65536)

            return read_file
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader),
            open(self.fd_in, "rb", buffering=0, closefd=False),
        )
        if hasattr(
            self._transport, "max_size"
        ):  # asyncio's reads 256 KiB: 18 us in allocation each
            self._transport.max_size = READ_SIZE  # (uvloop reads into a buffer it keeps)
        return lambda: reader.read(READ_SIZE)

    async def run_tx(self, xmldata):
        data = memoryview(serialize(xmldata) + b"\n")
        async with self._writing:
            while data and not self.driver.stop:
                try:
                    data = data[os.write(self.fd_out, data) :]
                except BlockingIOError:
                    await self._writable()
                except OSError as exc:
                    self.failure = (
                        f"cannot write to stdout ({exc.strerror or exc}): the driver stops"
                    )
                    logger.error("%s", self.failure)
                    self.driver.shutdown()

    async def _writable(self):
        loop = asyncio.get_running_loop()
        self._waiting = ready = loop.create_future()
        loop.add_writer(self.fd_out, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_writer(self.fd_out)
            self._waiting = None

    def shutdown(self):
        if self._transport is not None:
            self._transport.close()  # ends run_rx's read
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)  # a stopping driver waits on no reader


# ===========================================================================
# THE FENCE: every use of a private of the foundation, and the adaptations
# to its defects, verified on indipydriver 3.1.2 and indipyserver 0.0.6
# (the versions pinned in pyproject.toml). Each is the smallest change that
# works, and tests/test_adaptations.py has a test that fails without it.
# check_foundation() refuses to run if the internals they touch are not there.
# ===========================================================================

VERIFIED_ON = {"indipydriver": "3.1.2", "indipyserver": "0.0.6"}


def check_foundation():
    "Fail loudly, at start-up, if an internal that an adaptation relies on has changed."
    needed = [(IPyDriver, "_readdata"), (IPyDriver, "send"), (IPyDriver, "_monitorsnoop"),
              (IPyServer, "add_exdriver"), (RemoteConnection, "_run_rx"),
              (RemoteConnection, "_readdata"), (RemoteConnection, "warning"),
              (ExDriver, "_readdata"), (ExDriver, "_dispatch_xml"),
              (ExDriver, "xml_to_ext")]  # fmt: skip
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed
               if not hasattr(owner, name)]  # fmt: skip
    probe = NumberVector("probe", "probe", "probe", "ro", "Ok", [])
    if getattr(probe, "_message", None) != "":
        missing.append("PropertyVector._message")
    if getattr(IPyDriver(), "_commsobj", "missing") is not None:
        missing.append("IPyDriver._commsobj")
    if missing:
        raise RuntimeError(f"thermostat.py was verified on {VERIFIED_ON}; this installation lacks "
                           f"{', '.join(missing)}: install the pinned versions")  # fmt: skip
    installed = {"indipydriver": indipydriver.version, "indipyserver": indipyserver.version}
    if installed != VERIFIED_ON:
        logger.warning("verified on %s, running on %s", VERIFIED_ON, installed)


def attach_link(runner, link):
    """Make link the way a driver, an executable driver or a remote link
    sends and receives (indipydriver's and indipyserver's _commsobj, which
    has no public setter); return link."""
    runner._commsobj = link
    return link


async def read_element(runner, element):
    "Hand an element to a driver, executable driver or remote link as its own reader would."
    await runner._readdata(element)


def forget_message(device, xmldata):
    """indipydriver 3.1.x ignores an empty message, so a vector repeats its
    last message (say, a rejection) in every later update and definition.
    Called as each element goes out, before anything else can run, so that
    a message goes out once: cleared only after the send had returned, it
    was repeated by a definition that a concurrent getProperties sent."""
    if xmldata.get("message") and xmldata.get("name") in device:
        device[xmldata.get("name")]._message = ""


async def send_blob(vector, membername, content):
    """indipydriver 3.1.2 sets a BLOB member's size from the first file and
    keeps it for every later one (clients then save truncated files): set
    each file's own size before sending it."""
    vector[membername] = content
    vector.set_blobsize(membername, len(content))
    await vector.send_setVectorMembers(members=[membername])


async def _no_snoop_monitor():
    "Nothing to monitor."


def without_snoop_monitor(driver):
    """indipydriver 3.1.2 runs a snoop monitor that wakes every second, even
    in a driver that snoops on nothing: in an idle thermostat under
    indiserver, that was most of its CPU. The driver runs none."""
    driver._monitorsnoop = _no_snoop_monitor


def answer_pings(exdriver):
    """libindi's drivers (1.9.9) send a <pingRequest> after each BLOB and no
    other BLOB until the server answers it; indipyserver 0.0.6's ExDriver
    drops it, so a camera under add_exdriver sent one image and then nothing
    more. As indiserver does, the server answers it itself."""
    dispatch = exdriver._dispatch_xml

    async def dispatch_answering_pings(xmldata):
        if xmldata.tag == "pingRequest":
            await exdriver.xml_to_ext(ET.Element("pingReply", uid=xmldata.get("uid", "")))
        else:
            await dispatch(xmldata)

    exdriver._dispatch_xml = dispatch_answering_pings


def stop_executable(exdriver):
    """ExDriver.shutdown, except for a process that has ended: indipyserver
    0.0.6 would terminate it again, and raise."""
    if exdriver.proc is not None and exdriver.proc.returncode is not None:
        exdriver.proc = None
    exdriver.shutdown()


async def reap_executable(exdriver):
    """ExDriver.shutdown terminates its process without waiting for it: wait,
    so that none is left behind."""
    if exdriver.proc is not None and exdriver.proc.returncode is None:
        try:
            await asyncio.wait_for(exdriver.proc.wait(), 2)
        except TimeoutError:
            exdriver.proc.kill()


class _RestartingExDriver(ExDriver):
    """indipyserver 0.0.6's ExDriver reads a driver that has ended forever
    (an empty read is not taken as end of stream), and never starts it
    again. Here its end is noticed: its devices are deleted at clients, and
    it is started again, as indiserver 1.9.9 does, up to MAX_RESTARTS times
    (a driver that keeps ending is not started forever)."""

    async def asyncrun(self):
        self._stop = False
        restarts = 0
        try:
            while not self._stop:
                await self._run_once()
                if self._stop:
                    break
                for device in list(self.devicenames):
                    await self._commsobj.run_tx(ET.Element("delProperty", device=device))
                self.devicenames.clear()
                if restarts >= MAX_RESTARTS:
                    logger.error("driver %s ended; not started again after %d restarts",
                                 self.program, restarts)  # fmt: skip
                    break
                restarts += 1
                logger.warning("driver %s ended; restart #%d", self.program, restarts)
        except Exception as exc:  # as ExDriver.asyncrun: the server goes on without it
            logger.error("driver %s stopped on an error: %r", self.program, exc)
        finally:
            self._stop = True

    async def _run_once(self):
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self.program, *self.args, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
        except OSError as exc:
            logger.error("cannot start driver %s: %s", self.program, exc.strerror or exc)
            return
        try:
            await self._readdata(ET.Element("getProperties", version="1.7"))
        except (ConnectionError, OSError):
            pass  # it has ended already
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._pump_output())
            tasks.create_task(self._pump_errors())
        await self.proc.wait()

    async def _pump_output(self):
        stream = _IndiStream(source=f"driver {self.program}")
        remainder = b""
        while data := await self.proc.stdout.read(READ_SIZE):
            data, remainder = self._removexmldec(data, remainder)
            for element in stream.feed(data):
                await self._dispatch_xml(element)

    async def _pump_errors(self):
        while line := await self.proc.stderr.readline():
            logging.getLogger("indipyserver.exdriver").error(line.decode(errors="replace"))

    async def xml_to_ext(self, root):
        if self.proc is None or self.proc.returncode is not None or self.proc.stdin.is_closing():
            return  # it has ended: what was for it is dropped, as indiserver drops it
        try:
            await super().xml_to_ext(root)
        except (ConnectionError, OSError):
            pass  # it ended while it was written to


class _EndOfStreamReader:
    """indipyserver 0.0.6 reads a closed connection forever (an empty read
    is not taken as end of stream), spinning at 100% CPU. This reader turns
    end of stream into the ConnectionError that it handles as a lost link."""

    def __init__(self, reader):
        self._reader = reader

    async def read(self, n=-1):
        data = await self._reader.read(n)
        if not data:
            raise ConnectionAbortedError("the remote server closed the connection")
        return data


class _RelayingRemoteConnection(RemoteConnection):
    """indipyserver 0.0.6's link to a remote server reads a closed link
    forever (12 CPU-seconds while the far end was down, in one measurement).
    End of stream here is a lost connection, which it already retries every
    5 s. Each try also sent every client four messages ("Attempting to
    connect", "Connection refused", ...): they are logged only, and clients
    are told once when the link is lost and once when it is made again.
    Its monitor woke every 0.1 s to see whether the link was made or lost:
    here the link says so itself, and when it is lost its devices are
    deleted at clients, as indiserver deletes a chained server's."""

    async def _run_rx(self):
        self._reader = _EndOfStreamReader(self._reader)
        await self.send_getProperties()
        await self._tell(f"Remote connection made to {self.indihost}:{self.indiport}")
        try:
            await super()._run_rx()
        finally:
            if not self._stop:
                for device in sorted(self.devicenames):
                    await self._commsobj.run_tx(ET.Element("delProperty", device=device))
                self.devicenames.clear()
                await self._tell(f"Remote connection to {self.indihost}:{self.indiport} lost")

    async def _tell(self, text):
        if self._commsobj is not None:
            message = ET.Element("message", message=text)
            message.set("timestamp", indi_timestamp(datetime.now(timezone.utc)))
            await self._commsobj.run_tx(message)

    async def _monitor_connection(self):
        "Nothing to watch: _run_rx says when the link is made and lost."

    async def warning(self, message):
        logging.getLogger("indipyserver.remote").warning(message)  # as indipyserver logs it


# ===========================================================================
# PART III: THE COMMAND LINE
#
# python thermostat.py [options], and indi_thermostat under indiserver: a
# thin layer over make_driver and make_server, with the same defaults.
# ===========================================================================


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        "One clear line, as a command line tool owes its user, rather than the usage block."
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number_type(low, high, kind=float):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}..{high:g}")
        return value

    return convert


def _networks_type(text):
    try:
        return parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv=None, prog="thermostat.py"):
    what = (
        "An INDI thermostat, simulated or on a real sensor and heater: a temperature, a target, "
        "a heater, safety limits, and temperature logs sent to clients as CSV files. "
    )
    if prog == DRIVER_EXEC:
        description = what + (
            "This is its executable driver: it speaks INDI on stdin/stdout, "
            "as libindi's indiserver runs drivers. To serve it on TCP, use "
            "'python thermostat.py' instead."
        )
        epilog = (
            "run it under libindi's server, which listens on port 7624:\n"
            "  indiserver -v indi_thermostat\n"
            "then, from another terminal:\n"
            "  indi_getprop -p 7624                            # every property\n"
            "  indi_setprop -p 7624 'Thermostat.targetvector.target=21'"
        )
    else:
        description = what + (
            "By default it listens on TCP as its own INDI server; with --stdio "
            "it is an executable driver for libindi's indiserver."
        )
        epilog = (
            "then, from another terminal (-p PORT as given to --port, 7624 by default):\n"
            "  indi_getprop -p 7624                            # every property\n"
            "  indi_setprop -p 7624 'Thermostat.targetvector.target=21'\n"
            "under libindi's server:  indiserver indi_thermostat"
        )
    epilog += "\n\n" + textwrap.fill(
        "Settings (target, poll interval, log period, limits, debug) are saved at every change in "
        "$INDICONFIG, else ~/.indi/<device>_config.xml, as libindi's drivers keep theirs; "
        "options given here win over saved values.",
        79,
    )
    parser = _ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(description, 79),
        epilog=epilog,
    )
    parser.add_argument(
        "--host",
        default="localhost",
        help="address to listen on (default: %(default)s; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--port",
        type=_number_type(1, 65535, int),
        default=7624,
        help="TCP port to listen on (default: %(default)s, the INDI port)",
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("INDIDEV") or "Thermostat",
        help="INDI device name (default: $INDIDEV, as indiserver's "
        "'start DRIVER -n NAME' sets it, else Thermostat)",
    )
    # These default to None, so that make_driver takes the saved value, else its default.
    parser.add_argument(
        "--target",
        type=_number_type(TEMPERATURE_MIN, TEMPERATURE_MAX),
        help=f"target temperature, -50..99 (default: saved, else {DEFAULTS['target']:g})",
    )
    parser.add_argument(
        "--poll-interval",
        type=_number_type(POLL_PERIOD_MS[0] / 1000, POLL_PERIOD_MS[1] / 1000),
        metavar="SECONDS",
        help=f"seconds between readings (default: saved, else {DEFAULTS['poll_interval']:g})",
    )
    parser.add_argument(
        "--log-period",
        type=_number_type(*LOG_PERIOD_S),
        metavar="SECONDS",
        help="seconds of readings in each CSV log file "
        f"(default: saved, else {DEFAULTS['log_period']:g})",
    )
    parser.add_argument(
        "--log-dir",
        metavar="DIR",
        help="also write the log to DIR, each reading as it is taken, in files "
        "<device>-<first reading's UTC time>.csv (see the README)",
    )
    parser.add_argument(
        "--sensor",
        metavar="SPEC",
        default="simulator",
        help="where the temperature comes from: simulator (the default), or simulator:TAU, "
        "its box with a time constant of TAU seconds (1000: TAU=10 is 100 times as fast); "
        "w1:DIR, a 1-wire "
        "sensor's directory, e.g. w1:/sys/bus/w1/devices/28-0316a2796bff (DIR/temperature "
        "in millidegrees C); iio:DEVICE, a Linux IIO sensor (BME280, HTU21D, DHT22...) by "
        "its name (iio:bme280), its directory under /sys/bus/iio/devices (iio:iio:device0) "
        "or its path, whose humidity, if it has one, gives the dew point; or command:CMD, "
        "a command that prints degrees C",
    )
    parser.add_argument(
        "--heater",
        metavar="SPEC",
        default="simulator",
        help="what switches the heater: simulator (the default); command:CMD, run as "
        "'CMD on' and 'CMD off'; command-power:CMD, given a power as 'CMD 37.5' (percent); "
        "gpio:CHIP:LINE[:active-low], a GPIO line driving a relay (needs pip install "
        "'thermostat[gpio]'); or pwm:CHIP:CHANNEL, an exported "
        "/sys/class/pwm/pwmchipCHIP/pwmCHANNEL (on: full duty cycle, off: 0)",
    )
    parser.add_argument(
        "--max-temperature",
        type=_number_type(TEMPERATURE_MIN, TEMPERATURE_MAX),
        metavar="T",
        help="above T the heater is off whatever the target "
        f"(default: saved, else {DEFAULTS['max_temperature']:g})",
    )
    parser.add_argument(
        "--max-heater-on",
        type=_number_type(*MAX_HEATER_ON_S),
        metavar="SECONDS",
        help="seconds of continuous heating after which the heater is switched off "
        f"and an alarm raised (default: saved, else {DEFAULTS['max_heater_on']:g})",
    )
    parser.add_argument(
        "--stuck-after",
        type=_number_type(0.01, 86400),
        default=STUCK_AFTER,
        metavar="SECONDS",
        help="a sensor that reads exactly the same value for this long "
        "while heating is stuck (default: %(default)s)",
    )
    parser.add_argument(
        "--hardware-timeout",
        type=_number_type(0.01, 60),
        default=HARDWARE_TIMEOUT,
        metavar="SECONDS",
        help="seconds a sensor read or a heater command may take before "
        "it counts as failed (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=_number_type(1, MAX_CONNECTIONS, int),
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"simultaneous client connections, 1..{MAX_CONNECTIONS}; at the limit, the "
        "quietest one is closed to let a newcomer in (default: %(default)s)",
    )
    parser.add_argument(
        "--max-unread",
        type=_number_type(0.01, 4096),
        default=DEFAULT_MAX_UNREAD_MIB,
        metavar="MIB",
        help="disconnect a client that leaves more than this many MiB unread, "
        "as indiserver -m (default: %(default)s)",
    )
    parser.add_argument(
        "--max-memory",
        type=_number_type(1, 65536),
        default=DEFAULT_MAX_MEMORY_MIB,
        metavar="MIB",
        help="what all clients together may leave unread or send of unfinished elements; "
        "beyond it, the largest holder is disconnected (default: %(default)s)",
    )
    parser.add_argument(
        "--allow",
        type=_networks_type,
        metavar="ADDRESSES",
        help="accept connections only from these addresses or networks, comma-separated "
        "(e.g. 127.0.0.1,::1,192.168.1.0/24; default: from anywhere --host lets in)",
    )
    parser.add_argument(
        "--read-only",
        type=_networks_type,
        metavar="ADDRESSES",
        help="clients from these addresses or networks see everything but change nothing: "
        "their requests are refused (default: none)",
    )
    parser.add_argument(
        "--stdio",
        action="store_true",
        help="speak INDI on stdin/stdout, as an executable driver under indiserver "
        "(--host, --port and the options on clients do not apply); logs go to stderr",
    )
    parser.add_argument(
        "--driver-xml",
        action="store_true",
        help=f"print the driver description KStars reads ({DRIVER_EXEC}.xml) and exit",
    )
    parser.add_argument(
        "--systemd-unit",
        action="store_true",
        help="print a systemd service unit that runs this command line (these options, "
        "without --systemd-unit), and exit",
    )
    parser.add_argument(
        "--heater-off",
        action="store_true",
        help="switch the heater (--heater SPEC) off and exit: 0 once it is off, 1 if that "
        "failed (the systemd unit's ExecStopPost)",
    )
    keeping = parser.add_mutually_exclusive_group()
    keeping.add_argument(
        "--config",
        metavar="FILE",
        help="keep settings in FILE (default: $INDICONFIG, else ~/.indi/<device>_config.xml)",
    )
    keeping.add_argument(
        "--no-config",
        action="store_true",
        help="keep no settings: neither read nor write a configuration file",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log debugging detail, including the XML exchanged (DEBUG on)",
    )
    args = parser.parse_args(argv)
    if not args.device.strip() or not args.device.isascii():
        parser.error(f"argument --device: {args.device!r} must be non-empty ASCII")
    return args


def make_sensor(spec, timeout=HARDWARE_TIMEOUT):
    "The sensor a --sensor SPEC names (None for the simulator), or ValueError saying what is wrong."
    kind, _, rest = spec.partition(":")
    if spec == "simulator":
        return None
    if kind == "simulator":
        try:
            return Simulator(time_constant_s=parse_number(rest, "simulator:TAU", 0.01, 1e6))
        except ValueError as exc:
            raise ValueError(f"argument --sensor: {exc}") from None
    _check_command("--sensor", kind, rest)
    if kind == "w1" and rest:
        if not Path(rest).is_dir():
            raise ValueError(
                f"argument --sensor: {rest} is not a directory (a 1-wire device's, such as "
                f"/sys/bus/w1/devices/28-0316a2796bff)"
            )
        return W1Sensor(rest)
    if kind == "iio" and rest:
        try:
            return IIOSensor(rest)
        except LookupError as exc:
            raise ValueError(f"argument --sensor: {exc}") from None
    if kind == "command" and shlex.split(rest):
        return CommandSensor(rest, timeout)
    raise ValueError(
        f"argument --sensor: {spec!r} is not simulator[:TAU], w1:DIR, iio:DEVICE or command:CMD"
    )


def make_heater(spec, timeout=HARDWARE_TIMEOUT):
    "The heater a --heater SPEC names (None for the simulator), or ValueError saying what is wrong."
    kind, _, rest = spec.partition(":")
    if spec == "simulator":
        return None
    _check_command("--heater", kind, rest)
    if kind == "command" and shlex.split(rest):
        return CommandHeater(rest, timeout)
    if kind == "command-power" and shlex.split(rest):
        return CommandPowerHeater(rest, timeout)
    if (
        kind == "gpio"
        and (parts := rest.split(":"))
        and len(parts) in (2, 3)
        and all(parts)
        and parts[2:] in ([], ["active-low"])
    ):
        try:
            return GpioHeater(parts[0], parts[1], active_low=len(parts) == 3)
        except RuntimeError as exc:
            raise ValueError(f"argument --heater: {exc}") from None
    if kind == "pwm" and len(parts := rest.split(":")) == 2:
        try:
            return PwmHeater(*parts)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"argument --heater: {exc}") from None
    raise ValueError(
        f"argument --heater: {spec!r} is not simulator, command:CMD, command-power:CMD, "
        f"gpio:CHIP:LINE[:active-low] or pwm:CHIP:CHANNEL"
    )


def _check_command(option, kind, command):
    if kind in ("command", "command-power"):
        try:
            shlex.split(command)
        except ValueError as exc:
            raise ValueError(
                f"argument {option}: cannot split {command!r} into words: {exc}"
            ) from None


def switch_heater_off(heater, tries=2, prog="thermostat.py"):
    """The --heater-off action (ExecStopPost in the systemd unit): switch
    heater off, trying twice; return the exit status, 0 once it is off, 1 if
    it could not be switched off (said on stderr)."""
    if heater is None:
        return 0  # the simulator: nothing to switch
    for _ in range(tries):
        try:
            if is_proportional(heater):
                heater.set_power(0.0)  # command-power: power 0 is off
            else:
                heater.switch(False)
            return 0
        except Exception as exc:  # noqa: BLE001 - a heater's switch may raise anything
            error = exc
    print(
        f"{prog}: error: the heater may be on: switching it off failed: "
        f"{str(error) or type(error).__name__}",
        file=sys.stderr,
    )
    return 1


def configure_logging(verbose):
    logging.basicConfig(
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        level=logging.DEBUG if verbose else logging.WARNING,
    )
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def driver_xml():
    "The description KStars reads from its drivers folder to list this driver."
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<driversList>\n"
        f'  <devGroup group="Auxiliary">\n'
        f'    <device label="Thermostat" manufacturer="Simulators">\n'
        f'      <driver name="Thermostat">{DRIVER_EXEC}</driver>\n'
        f"      <version>{__version__}</version>\n"
        f"    </device>\n"
        f"  </devGroup>\n"
        f"</driversList>\n"
    )


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_signals_before_serving = []


def hold_stop_signals():
    """Until the event loop's handlers take over (and once they are gone), a
    stop signal is noted instead of ending the process wherever it was
    (SIGINT would raise KeyboardInterrupt there): one during start-up ends
    the run before serving, as cleanly as one while serving."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: _signals_before_serving.append(signum))


def stop_on_signals(stop):
    """Call stop on SIGINT, SIGTERM, SIGHUP (the terminal closed) or SIGQUIT,
    and soon if one came during start-up. Call it once the server or driver
    has started running: their asyncrun() clears an earlier stop."""
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop)
    if _signals_before_serving:
        loop.call_soon(stop)


async def serve_stdio(driver):
    """Run driver on stdin/stdout until end of input or a stop signal; return the exit status."""
    link = attach_link(driver, StdioLink(driver))
    with BoundedLogs():
        running = asyncio.create_task(driver.asyncrun())
        stop_on_signals(driver.shutdown)
        await running
    return 1 if link.failure else 0


async def finish_promptly(running, earlier_tasks, timeout=1.5):
    """Once the server has stopped, give what still runs a moment to end:
    nothing waits on a client (their output is queued, never awaited).
    Return False if running, or the tasks started since earlier_tasks
    (those serving clients), had not ended within timeout seconds."""
    if (await asyncio.wait([running], timeout=timeout))[1]:
        return False
    others = asyncio.all_tasks() - earlier_tasks - {asyncio.current_task()}
    return not others or not (await asyncio.wait(others, timeout=timeout))[1]


async def serve_until_stopped(server):
    """Run server until SIGINT, SIGTERM, SIGHUP or SIGQUIT; return the exit status."""
    earlier_tasks = asyncio.all_tasks()
    running = asyncio.create_task(server.asyncrun())
    stop_on_signals(server.shutdown)
    await server.stopped.wait()
    if not await finish_promptly(running, earlier_tasks):
        logger.warning("shutdown did not finish in time; stopping anyway")
    if server.failure:
        print(f"thermostat.py: error: {server.failure}", file=sys.stderr)
        return 1
    return 0


def run_event_loop(main_coroutine):
    """Run on uvloop where it is installed (measured: fan-out to 100 clients
    took a fifth less CPU; round trips were the same within noise), else on
    asyncio's own event loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coroutine)
    return uvloop.run(main_coroutine)


def main(argv=None, prog="thermostat.py"):
    args = parse_args(argv, prog)
    if args.driver_xml:
        print(driver_xml(), end="")
        return 0
    if args.systemd_unit:
        options = unit_options(sys.argv[1:] if argv is None else argv)
        print(systemd_unit([*program_argv(), *options]), end="")
        return 0
    try:  # the hardware is opened once the options are known to be good
        sensor = make_sensor(args.sensor, args.hardware_timeout)
        heater = make_heater(args.heater, args.hardware_timeout)
    except ValueError as exc:
        print(f"{prog}: error: {exc} (see --help)", file=sys.stderr)
        return 2
    if args.heater_off:
        return switch_heater_off(heater, prog=prog)
    configure_logging(args.verbose)
    try:  # before the heater is first switched: no guard, no heating
        guard = start_heater_guard(args.heater, args.hardware_timeout)
    except (ValueError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    heater_known_off = [True]  # until the driver runs, nothing has switched the heater on
    try:
        return serve_guarded(args, prog, sensor, heater, guard, heater_known_off)
    finally:
        if guard is not None:  # the word "stop" only once the heater is known off
            guard.stand_down() if heater_known_off[0] else guard.close()


def serve_guarded(args, prog, sensor, heater, guard, heater_known_off):
    "Make the driver and serve it until stopped; the exit status."
    config = None if args.no_config else (args.config or True)
    try:
        driver = make_driver(
            args.device,
            target=args.target,
            poll_interval=args.poll_interval,
            log_period=args.log_period,
            debug=args.verbose or None,
            log_dir=args.log_dir,
            config=config,
            sensor=sensor,
            heater=heater,
            max_temperature=args.max_temperature,
            max_heater_on=args.max_heater_on,
            stuck_after=args.stuck_after,
            hardware_timeout=args.hardware_timeout,
            guard=guard,
        )
    except ValueError as exc:  # a --log-dir that cannot be written: said before serving
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if _signals_before_serving:
        return 0  # stopped during start-up: nothing served, nothing logged
    driver.schedule.notifier = notifier = ServiceNotifier()
    heater_known_off[0] = False
    if args.stdio:
        status = run_event_loop(announcing(serve_stdio(driver), notifier, driver.started))
    else:
        server = make_server(
            driver,
            host=args.host,
            port=args.port,
            max_connections=args.max_connections,
            max_unread=int(args.max_unread * (1 << 20)),
            max_memory=int(args.max_memory * (1 << 20)),
            allow=args.allow,
            read_only=args.read_only,
        )
        serving = serve_until_stopped(server)
        status = run_event_loop(announcing(serving, notifier, driver.started, server.listening))
    heater_known_off[0] = not driver.off_failed_at_stop and driver.thermostat.known_off
    driver.templog.flush()  # the last log rows, written in a thread of their own
    return 1 if driver.off_failed_at_stop else status


async def announcing(serving, notifier, *ready):
    "Await serving, telling systemd READY=1 once every event in ready is set."

    async def announce():
        for event in ready:
            await event.wait()
        notifier.ready()

    announcer = asyncio.create_task(announce())
    try:
        return await serving
    finally:
        announcer.cancel()


def unit_options(argv):
    "The options of a command line as its systemd unit runs them: without --systemd-unit."
    return [word for word in argv if word != "--systemd-unit"]


def systemd_quote(word):
    "word as one word of a systemd Exec line: % and $ escaped, quoted if need be."
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(f"\\x{ord(c):02x}" if ord(c) < 32 else c for c in escaped) + '"'


def exec_line(words):
    "words as the command of an Exec line of a systemd unit."
    return " ".join(map(systemd_quote, words))


def heater_off_argv(argv):
    """The --heater-off command for a program's argv ([python, thermostat.py,
    options...]): the words before its first --option, the --heater SPEC it
    was given, --heater-off; None if it has no heater but the simulator."""
    options = next((i for i, word in enumerate(argv) if word.startswith("--")), len(argv))
    spec = None
    for i, word in enumerate(argv[options:], options):
        if word == "--heater" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif word.startswith("--heater="):
            spec = word.partition("=")[2]
    if spec is None or spec == "simulator":
        return None
    return [*argv[:options], "--heater", spec, "--heater-off"]


def program_argv():
    """How to run this program under systemd: this Python and this file, by
    absolute paths (as TCP server: indi_thermostat is for indiserver)."""
    return [sys.executable, os.path.abspath(__file__)]


def systemd_unit(argv, heater_off_command=None, description="INDI thermostat", user=None):
    """The text of a systemd service unit running argv (an absolute program
    path first): Type=notify with a watchdog, restarted on failure, started
    after the clock is synchronized, and ExecStopPost running
    heater_off_command (a list of words; None: heater_off_argv(argv); []:
    none), which switches the heater off however the driver ended."""
    if not argv or not os.path.isabs(argv[0]):
        raise ValueError(f"a unit's program must be an absolute path, not {argv[:1]}")
    if heater_off_command is None:
        heater_off_command = heater_off_argv(argv) or []
    if heater_off_command and not os.path.isabs(heater_off_command[0]):
        raise ValueError(
            f"a unit's program must be an absolute path, not {heater_off_command[0]!r}"
        )
    stop_post = [
        "# Once the driver has ended, however it ended (killed, crashed, stopped),",
        "# and the rest of its cgroup with it: the heater off. A failure marks the unit failed.",
        f"ExecStopPost={exec_line(heater_off_command)}",
    ]
    return "\n".join([
        "[Unit]",
        f"Description={description.replace('%', '%%')}",
        "# Its limits and logs go by the clock: start once it is set. time-sync.target waits",
        "# for the synchronization only with systemd-time-wait-sync.service (or chrony-wait).",
        "Wants=time-sync.target",
        "After=time-sync.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_line(argv)}",
        *(stop_post if heater_off_command else []),
        "# WATCHDOG=1 comes from the control loop: a loop stuck for 30 s is killed, restarted.",
        "WatchdogSec=30",
        "Restart=on-failure",
        "RestartSec=5",
        "# SIGTERM to the driver and its heater guard at once (the guard then waits for the",
        "# driver's word that the heater is off); SIGKILL to what is left after TimeoutStopSec.",
        "KillMode=control-group",
        "TimeoutStopSec=30",
        *([f"User={user}"] if user else []),
        "# Hardening that leaves /dev/gpiochip*, /sys/class/pwm and /sys/bus/w1 usable: not",
        "# PrivateDevices=, DevicePolicy= or ProtectKernelTunables= (they hide /dev or make",
        "# /sys read-only). ~/.indi, where settings are saved, stays writable.",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=full",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])  # fmt: skip


def run_command(argv=None, prog="thermostat.py"):
    "Run main as a command, stop signals held from start to exit (see hold_stop_signals)."
    hold_stop_signals()
    status = main(argv, prog)
    hold_stop_signals()  # the event loop's handlers are gone: a late signal is no crash
    sys.exit(status)


def indi_thermostat():
    "The indi_thermostat command: an executable driver on stdin/stdout, as indiserver runs it."
    argv = sys.argv[1:]
    if "--driver-xml" not in argv and "-h" not in argv and "--help" not in argv:
        argv = ["--stdio", *argv]
    run_command(argv, prog=DRIVER_EXEC)


if __name__ == "__main__":
    run_command()
