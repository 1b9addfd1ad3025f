"""An INDI thermostat driver, built on indipydriver and indipyserver.

Run it:      python thermostat.py            (serves INDI on localhost:7624)
Import it:   from thermostat import make_driver, make_server

The module reads top to bottom: the thermostat model (pure, time passed in),
the INDI driver (requests in, readings out), assembly (make_driver,
make_server), the command line, the server side (ThermoServer: a client side
of our own on indipyserver's IPyServer), and last, fenced, the adaptations to
defects of indipydriver and indipyserver, with the versions they were
verified on.
"""

import argparse
import asyncio
import collections
import contextvars
import logging
import math
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
import xml.etree.ElementTree as ET

import indipydriver
from indipydriver import (IPyDriver, Device, NumberVector, NumberMember,
                          LightVector, LightMember, SwitchVector, SwitchMember, TextVector, TextMember,
                          BLOBVector, BLOBMember, newNumberVector, newSwitchVector)
import indipyserver
from indipyserver import IPyServer
from indipyserver.exdriver import ExDriver
from indipyserver.remote import RemoteConnection

__version__ = "1.0.0"


class WarningThrottle(logging.Filter):
    """Passes at most `limit` warnings or errors of one kind (one message
    template) per `period` seconds, and says how many it held back with the
    next one that passes: a client that floods the server with bad input
    must not flood its log too."""

    def __init__(self, limit=20, period=60.0):
        super().__init__()
        self.limit, self.period = limit, period
        self._windows = {}              # template -> [start of its window, warnings in it]

    def filter(self, record):
        if record.levelno < logging.WARNING:
            return True
        window = self._windows.setdefault(record.msg, [record.created, 0])
        if record.created - window[0] >= self.period:
            held_back = window[1] - self.limit
            window[:] = [record.created, 0]
            if held_back > 0:
                record.msg = f"{record.msg} ({held_back} more like this were not logged)"
        window[1] += 1
        return window[1] <= self.limit


logger = logging.getLogger("thermostat")
# asyncio's logger and the foundation's too: what a peer does can make them speak
for _name in ("thermostat", "asyncio", "indipydriver.ipydriver", "indipyserver.ipyserver",
              "indipyserver.remote", "indipyserver.exdriver"):
    logging.getLogger(_name).addFilter(WarningThrottle())


# ---------------------------------------------------------------------------
# The thermostat: a simulated heater and sensor, and its temperature log.
# Nothing here knows INDI; every method that depends on time is given it.
# ---------------------------------------------------------------------------

TEMPERATURE_MIN, TEMPERATURE_MAX = -50.0, 99.0
HEATING_STEP = 0.2     # degrees the temperature moves each poll
HYSTERESIS = 0.5       # the heater switches beyond target +/- this


def parse_number(text, what, low, high):
    """Return text as a float within low..high, in any INDI number format
    (decimal, "21:30", "21 30"), or raise ValueError saying what is wrong."""
    try:
        value = indipydriver.getfloat(text)
    except TypeError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{what} must be a number from {low:g} to {high:g}; received {text!r}")
    return value


def indi_timestamp(moment):
    """The text of a UTC datetime as INDI carries it, and as indipydriver
    writes it into every timestamp attribute."""
    return moment.replace(tzinfo=None).isoformat(sep="T")


@dataclass(frozen=True)
class Reading:
    timestamp: datetime
    temperature: float
    heater_on: bool
    in_band: bool      # within target +/- HYSTERESIS


@dataclass
class LogFile:
    """One CSV file of the temperature log: rows `timestamp,temperature`."""
    prefix: str
    rows: list = field(default_factory=list)

    HEADER = "timestamp,temperature\n"

    def add(self, reading):
        self.rows.append(f"{indi_timestamp(reading.timestamp)},{reading.temperature:.2f}\n")

    @property
    def name(self):
        first_timestamp = self.rows[0].split(",", 1)[0]
        return f"{self.prefix}-{first_timestamp}.csv"

    def content(self):
        return (self.HEADER + "".join(self.rows)).encode()


class ThermalControl:
    """A simulated thermostat. Each step() moves the temperature one
    HEATING_STEP up (heater on) or down (heater off) and switches the heater
    around target +/- HYSTERESIS. While logging, every reading goes into the
    current log file, which is cut every log_period seconds; finished files
    wait in a bounded backlog until sent, and are also written to log_dir."""

    def __init__(self, name="Thermostat", *, temperature=20.0, target=15.0,
                 log_period=300.0, log_dir=None, max_backlog=16):
        self.name = name
        self.temperature = temperature
        self.target = parse_number(target, "target", TEMPERATURE_MIN, TEMPERATURE_MAX)
        self.heater_on = False
        self.log_period = log_period
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.backlog = collections.deque()
        self.max_backlog = max_backlog
        self._logfile = None        # the file being written, None while logging is off
        self._period_start = None   # when the current file's log period began

    @property
    def in_band(self):
        "True while the temperature is within target +/- HYSTERESIS."
        return abs(self.temperature - self.target) <= HYSTERESIS

    @property
    def logging(self):
        return self._logfile is not None

    def step(self, now):
        "Advance one poll at time now (an aware UTC datetime); return the reading."
        step = HEATING_STEP if self.heater_on else -HEATING_STEP
        self.temperature = round(self.temperature + step, 2)
        if self.temperature > self.target + HYSTERESIS:
            self.heater_on = False
        elif self.temperature < self.target - HYSTERESIS:
            self.heater_on = True
        reading = Reading(now, self.temperature, self.heater_on, self.in_band)
        if self.logging:
            period = timedelta(seconds=self.log_period)     # read each time: clients may change it
            if now >= self._period_start + period:
                self._finish_file()
                self._logfile = LogFile(self.name)
                self._period_start += period
                if now >= self._period_start + period:      # polls were late: start afresh
                    self._period_start = now
            self._logfile.add(reading)
        return reading

    def start_logging(self, now):
        if not self.logging:
            self._logfile = LogFile(self.name)
            self._period_start = now

    def stop_logging(self):
        "Stop logging; the partial file, if it has rows, joins the backlog."
        if self.logging:
            self._finish_file()
            self._logfile = None

    def next_unsent(self):
        "The oldest finished file not yet sent, or None."
        return self.backlog[0] if self.backlog else None

    def sent(self, logfile):
        "logfile has gone out: it leaves the backlog (unless a full backlog dropped it meanwhile)."
        if self.backlog and self.backlog[0] is logfile:
            self.backlog.popleft()

    def _finish_file(self):
        logfile = self._logfile
        if not logfile.rows:
            return
        if self.log_dir is not None:
            self._write(logfile)
        self.backlog.append(logfile)
        if len(self.backlog) > self.max_backlog:
            dropped = self.backlog.popleft()
            kept = f", a copy is in {self.log_dir}" if self.log_dir is not None else ""
            logger.warning("log backlog full (%d files unsent): dropped %s%s",
                           self.max_backlog, dropped.name, kept)

    def _write(self, logfile):
        "Write atomically, so that a crash never leaves half a file under the final name."
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            final = self.log_dir / logfile.name
            partial = final.with_name(final.name + ".part")
            partial.write_bytes(logfile.content())
            os.replace(partial, final)
        except OSError as exc:
            logger.error("cannot write log file %s to %s: %s", logfile.name, self.log_dir, exc)



# ---------------------------------------------------------------------------
# The INDI driver: client requests in, thermostat readings out.
# ---------------------------------------------------------------------------

class ThermoDriver(IPyDriver):
    """Serves one ThermalControl as one INDI device.

    A control loop steps the thermostat every poll and hands each reading
    to an update loop through a small queue. When updates fall behind (a
    client that does not read stalls the server's sends), live readings are
    dropped; log rows never are, and the thermostat keeps regulating.
    Every client request gets an answer: the new state, or Alert with a
    message saying what was wrong."""

    def __init__(self, device, thermostat, poll_interval):
        super().__init__(device, thermostat=thermostat)
        self.device = device
        self.thermostat = thermostat
        self.poll_interval = poll_interval
        self.connected = True               # the CONNECTION property; disconnected, nothing polls
        self.readings = asyncio.Queue(maxsize=5)
        self.dropped_readings = 0
        self.wake = asyncio.Event()         # ends the control loop's wait: shutdown, new poll interval
        self._sending_files = asyncio.Lock()

    def shutdown(self):
        super().shutdown()
        self.wake.set()

    # -- requests in --------------------------------------------------------

    async def _readdata(self, root):
        # Everything from the server comes in here. indipydriver drops requests it cannot use
        # without a reply, or raises on some: see answer_unusable_request in the adaptations.
        try:
            if not await answer_unusable_request(self, root):
                await super()._readdata(root)
        except Exception:
            # An exception must not reach indipyserver, whose TaskGroup would end the whole server.
            logger.exception("%s: failed to handle <%s>", self.device.devicename, root.tag)

    async def rxevent(self, event):
        try:
            match event:
                case newNumberVector(vectorname="targetvector"):
                    await self.set_target(event)
                case newSwitchVector(vectorname="switchvector"):
                    await self.set_logging(event)
                case newSwitchVector(vectorname="CONNECTION"):
                    await self.set_connection(event)
                case newNumberVector(vectorname="POLLING_PERIOD"):
                    await self.set_poll_interval(event)
                case newNumberVector(vectorname="logperiodvector"):
                    await self.set_log_period(event)
                case _:
                    await self.reject(event.vector, f"{event.root.tag} is not handled for {event.vectorname}")
        except Exception:
            logger.exception("%s: failed to handle %s", self.device.devicename, event.root.tag)
            await self.reject(event.vector, "internal error handling this request; see the driver's log")

    async def set_target(self, event):
        target = await self.checked_number(event, "target", TEMPERATURE_MIN, TEMPERATURE_MAX)
        if target is not None:
            self.thermostat.target = target
            event.vector["target"] = f"{target:.2f}"
            await self.publish(event.vector, state="Ok" if self.thermostat.in_band else "Busy")

    async def set_poll_interval(self, event):
        period_ms = await self.checked_number(event, "PERIOD_MS", *POLL_PERIOD_MS)
        if period_ms is not None:
            self.poll_interval = period_ms / 1000
            self.wake.set()                 # the control loop re-plans its wait at once
            event.vector["PERIOD_MS"] = f"{period_ms:.0f}"
            await self.publish(event.vector, state="Ok")

    async def set_log_period(self, event):
        seconds = await self.checked_number(event, "logperiod", *LOG_PERIOD_S)
        if seconds is not None:
            self.thermostat.log_period = seconds
            event.vector["logperiod"] = f"{seconds:g}"
            await self.publish(event.vector, state="Ok")

    async def checked_number(self, event, member, low, high):
        "The member's value, or None after rejecting the request."
        try:
            return parse_number(event[member], member, low, high)
        except ValueError as exc:
            await self.reject(event.vector, str(exc))

    async def set_logging(self, event):
        if event["switchmember"] == "On":
            self.thermostat.start_logging(datetime.now(timezone.utc))
        else:
            self.thermostat.stop_logging()
            await self.send_log_files()     # the partial file goes out, it is not discarded
        status = "On" if self.thermostat.logging else "Off"
        event.vector["switchmember"] = status
        await self.publish(event.vector, state="Ok")
        await self.device.send_device_message(message=f"Log reporting is now {status}")

    async def set_connection(self, event):
        wanted = [name for name, value in event.items() if value == "On"]
        if len(wanted) != 1:
            await self.reject(event.vector, "CONNECTION takes exactly one of CONNECT and DISCONNECT On")
            return
        self.connected = wanted == ["CONNECT"]
        if not self.connected:
            self.thermostat.heater_on = False     # no regulation without a connection: fail safe
            await self.publish_heater(False)
        event.vector["CONNECT"] = "On" if self.connected else "Off"
        event.vector["DISCONNECT"] = "Off" if self.connected else "On"
        await self.publish(event.vector, state="Ok" if self.connected else "Idle")
        temperature = self.device["temperaturevector"]
        await self.publish(temperature, state="Ok" if self.connected else "Idle")

    async def reject(self, vector, message):
        "Answer a request that cannot be carried out: Alert, the values unchanged, and why."
        message = clipped(message)
        logger.warning("%s.%s: %s", self.device.devicename, vector.name, message)
        await self.publish(vector, message=message, state="Alert")

    async def refuse(self, name, message):
        "Answer a request that has no vector to answer on (unknown or read-only) with a device message."
        name, message = clipped(name, 40), clipped(message)
        logger.warning("%s.%s: %s", self.device.devicename, name, message)
        await self.device.send_device_message(message=f"{name}: {message}")

    async def publish(self, vector, message="", **kwargs):
        await vector.send_setVector(message=message, **kwargs)

    async def send(self, xmldata):
        "Everything this driver sends passes here (indipydriver's hook)."
        forget_message(self.device, xmldata)
        await super().send(xmldata)

    # -- readings out -------------------------------------------------------

    async def hardware(self):
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.control_loop())
            tasks.create_task(self.update_loop())
        self.thermostat.stop_logging()      # at shutdown: the partial file reaches log_dir

    async def control_loop(self):
        loop = asyncio.get_running_loop()
        last_poll = loop.time()
        while not self.stop:
            self.wake.clear()
            delay = last_poll + self.poll_interval - loop.time()
            if delay > 0 and await self.woken_within(delay):
                continue                    # shutdown, or a new poll interval: plan again
            # Polls keep to a fixed schedule (the time a poll takes does not add up into drift),
            # unless a whole interval was missed: then the schedule starts afresh from now.
            last_poll = last_poll + self.poll_interval if delay > -self.poll_interval else loop.time()
            if self.connected:
                self.poll()
        try:
            self.readings.put_nowait(None)  # wakes the update loop to stop
        except asyncio.QueueFull:
            pass                            # it is busy, and will see self.stop

    async def woken_within(self, delay):
        try:
            await asyncio.wait_for(self.wake.wait(), delay)
            return True
        except TimeoutError:
            return False

    def poll(self):
        try:
            reading = self.thermostat.step(datetime.now(timezone.utc))
        except Exception:
            logger.exception("%s: thermostat poll failed", self.device.devicename)
            return
        try:
            self.readings.put_nowait(reading)
        except asyncio.QueueFull:
            self.dropped_readings += 1
            logger.debug("%s: updates are behind, live reading dropped", self.device.devicename)

    async def update_loop(self):
        while (reading := await self.readings.get()) is not None and not self.stop:
            try:
                await self.publish_reading(reading)
                await self.send_log_files()
            except Exception:
                logger.exception("%s: failed to send an update", self.device.devicename)

    async def publish_reading(self, reading):
        temperature = self.device["temperaturevector"]
        temperature["temperature"] = f"{reading.temperature:.2f}"
        await self.publish(temperature, timestamp=reading.timestamp)
        await self.publish_heater(reading.heater_on)
        target = self.device["targetvector"]
        state = "Ok" if reading.in_band else "Busy"
        if target.state != state:
            await self.publish(target, state=state)

    async def publish_heater(self, heater_on):
        heater = self.device["heatervector"]
        light = "Busy" if heater_on else "Idle"
        if heater["heater"] != light:
            heater["heater"] = light
            await self.publish(heater)

    async def send_log_files(self):
        async with self._sending_files:     # one sender at a time keeps files in order
            # a stopping driver sends nothing: its files stay in the backlog
            while not self.stop and (logfile := self.thermostat.next_unsent()):
                await send_blob(self.device["logsvector"], "templogs", logfile.content())
                self.thermostat.sent(logfile)
                logger.info("%s: sent log file %s", self.device.devicename, logfile.name)


# ---------------------------------------------------------------------------
# Assembly: the device and its properties, and the server to serve it.
# ---------------------------------------------------------------------------

DRIVER_EXEC = "indi_thermostat"
AUX_INTERFACE = "32768"              # libindi's DRIVER_INTERFACE bit for auxiliary devices
POLL_PERIOD_MS = (10, 600000)        # libindi's POLLING_PERIOD range
LOG_PERIOD_S = (0.1, 31 * 86400)


def make_driver(devicename="Thermostat", *, target=15.0, poll_interval=10.0,
                log_period=300.0, log_dir=None):
    """Return a ThermoDriver for a new simulated thermostat, ready to serve
    with make_server(driver), beside other drivers in any IPyServer, or on
    stdin/stdout with serve_stdio(driver)."""
    check_foundation()
    if not poll_interval > 0 or not log_period > 0:
        raise ValueError("poll_interval and log_period must be positive numbers of seconds")
    thermostat = ThermalControl(devicename, target=target, log_period=log_period, log_dir=log_dir)
    limits = dict(format="%3.1f", min=TEMPERATURE_MIN, max=TEMPERATURE_MAX)
    properties = [
        # libindi's standard properties, as its clients (Ekos among them) expect them
        SwitchVector("CONNECTION", "Connection", "Main Control", "rw", "OneOfMany", "Ok", [
            SwitchMember("CONNECT", "Connect", membervalue="On"),
            SwitchMember("DISCONNECT", "Disconnect", membervalue="Off")]),
        TextVector("DRIVER_INFO", "Driver Info", "General Info", "ro", "Idle", [
            TextMember("DRIVER_NAME", "Name", membervalue="Thermostat"),
            TextMember("DRIVER_EXEC", "Exec", membervalue=DRIVER_EXEC),
            TextMember("DRIVER_VERSION", "Version", membervalue=__version__),
            TextMember("DRIVER_INTERFACE", "Interface", membervalue=AUX_INTERFACE)]),
        NumberVector("POLLING_PERIOD", "Polling", "Options", "rw", "Ok", [
            NumberMember("PERIOD_MS", "Period (ms)", format="%.f", min=POLL_PERIOD_MS[0],
                         max=POLL_PERIOD_MS[1], step=1000, membervalue=f"{poll_interval * 1000:.0f}")]),
        # the thermostat's own
        NumberVector("temperaturevector", "Temperature", "Values", "ro", "Ok", [
            NumberMember("temperature", "Temperature", **limits,
                         membervalue=f"{thermostat.temperature:.2f}")]),
        NumberVector("targetvector", "Target", "Values", "rw",
                     "Ok" if thermostat.in_band else "Busy", [
            NumberMember("target", "Target", **limits, step=0.1,
                         membervalue=f"{thermostat.target:.2f}")]),
        LightVector("heatervector", "Heater", "Values", "Idle", [
            LightMember("heater", "Heater", membervalue="Idle")]),
        SwitchVector("switchvector", "Logs Control", "Control", "rw", "AtMostOne", "Ok", [
            SwitchMember("switchmember", "Logs", membervalue="Off")]),
        NumberVector("logperiodvector", "Log period", "Control", "rw", "Ok", [
            NumberMember("logperiod", "Seconds per file", format="%.1f", min=LOG_PERIOD_S[0],
                         max=LOG_PERIOD_S[1], step=60, membervalue=f"{log_period:g}")]),
        BLOBVector("logsvector", "Logs", "Control", "ro", "Ok", [
            BLOBMember("templogs", "Temperature logs", blobformat=".csv")]),
    ]
    return ThermoDriver(Device(devicename, properties), thermostat, poll_interval)


def make_server(*drivers, host="localhost", port=7624, max_connections=None, max_unread=None):
    """Return an IPyServer for drivers (thermostats and any others) with this
    module's server side; await its asyncrun(), then read its failure.
    max_connections counts live client connections (default 50); a client
    with more than max_unread bytes unread is disconnected (default 32 MiB)."""
    check_foundation()
    return ThermoServer(*drivers, host=host, port=port,
                        max_connections=max_connections or DEFAULT_MAX_CONNECTIONS,
                        max_unread=max_unread or DEFAULT_MAX_UNREAD_MIB << 20)


# ---------------------------------------------------------------------------
# The command line: python thermostat.py [options]
# ---------------------------------------------------------------------------

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


def parse_args(argv=None, prog="thermostat.py"):
    parser = _ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a simulated INDI thermostat: a temperature, a target, a heater, "
                    "and temperature logs sent to clients as CSV files. By default it listens "
                    "on TCP as its own INDI server; with --stdio it is an executable driver for "
                    "libindi's indiserver.",
        epilog="then, from another terminal:\n"
               "  indi_getprop                                    # every property\n"
               "  indi_setprop 'Thermostat.targetvector.target=21' # set the target\n"
               "under libindi's server:  indiserver indi_thermostat")
    parser.add_argument("--host", default="localhost",
                        help="address to listen on (default: %(default)s; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=_number_type(1, 65535, int), default=7624,
                        help="TCP port to listen on (default: %(default)s, the INDI port)")
    parser.add_argument("--device", default=os.environ.get("INDIDEV") or "Thermostat",
                        help="INDI device name (default: $INDIDEV, as indiserver's "
                             "'start DRIVER -n NAME' sets it, else Thermostat)")
    parser.add_argument("--target", type=_number_type(TEMPERATURE_MIN, TEMPERATURE_MAX),
                        default=15.0, help="initial target temperature, -50..99 (default: %(default)s)")
    parser.add_argument("--poll-interval", type=_number_type(POLL_PERIOD_MS[0] / 1000, POLL_PERIOD_MS[1] / 1000),
                        default=10.0,
                        metavar="SECONDS", help="seconds between readings (default: %(default)s)")
    parser.add_argument("--log-period", type=_number_type(*LOG_PERIOD_S), default=300.0,
                        metavar="SECONDS", help="seconds of readings in each CSV log file "
                                                "(default: %(default)s)")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="also write each finished log file to DIR as <device>-<first timestamp>.csv")
    parser.add_argument("--max-connections", type=_number_type(1, MAX_CONNECTIONS, int),
                        default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"simultaneous client connections, 1..{MAX_CONNECTIONS}; at the limit, one that "
                             f"has sent no request makes room (default: %(default)s)")
    parser.add_argument("--max-unread", type=_number_type(0.01, 4096), default=DEFAULT_MAX_UNREAD_MIB,
                        metavar="MIB", help="disconnect a client that leaves more than this many MiB unread, "
                                            "as indiserver -m (default: %(default)s)")
    parser.add_argument("--stdio", action="store_true",
                        help="speak INDI on stdin/stdout, as an executable driver under indiserver "
                             "(host, port, max-connections and max-unread do not apply); logs go to stderr")
    parser.add_argument("--driver-xml", action="store_true",
                        help=f"print the driver description KStars reads ({DRIVER_EXEC}.xml) and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log debugging detail, including the XML exchanged")
    args = parser.parse_args(argv)
    if not args.device.strip() or not args.device.isascii():
        parser.error(f"argument --device: {args.device!r} must be non-empty ASCII")
    return args


def configure_logging(verbose):
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        level=logging.DEBUG if verbose else logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def driver_xml():
    "The description KStars reads from its drivers folder to list this driver."
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<driversList>\n'
            f'  <devGroup group="Auxiliary">\n'
            f'    <device label="Thermostat" manufacturer="Simulators">\n'
            f'      <driver name="Thermostat">{DRIVER_EXEC}</driver>\n'
            f'      <version>{__version__}</version>\n'
            f'    </device>\n'
            f'  </devGroup>\n'
            f'</driversList>\n')


async def serve_stdio(driver):
    """Run driver on stdin/stdout until end of input, SIGINT or SIGTERM; return the exit status."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, driver.shutdown)
    driver._commsobj = StdioLink(driver)
    await driver.asyncrun()
    return 0


async def serve(server):
    """Run server until SIGINT or SIGTERM; return the exit status."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.shutdown)
    running = asyncio.create_task(server.asyncrun())
    await server.stopped.wait()
    try:
        await asyncio.wait_for(running, 1.5)    # a stalled client must not hold up the exit
    except TimeoutError:
        logger.warning("shutdown did not finish in time; stopping anyway")
    if server.failure:
        print(f"thermostat.py: error: {server.failure}", file=sys.stderr)
        return 1
    return 0


def run(main_coroutine):
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
    configure_logging(args.verbose)
    driver = make_driver(args.device, target=args.target, poll_interval=args.poll_interval,
                         log_period=args.log_period, log_dir=args.log_dir)
    driver.debug_enable = args.verbose
    if args.stdio:
        return run(serve_stdio(driver))
    server = make_server(driver, host=args.host, port=args.port, max_connections=args.max_connections,
                         max_unread=int(args.max_unread * (1 << 20)))
    return run(serve(server))


def indi_thermostat():
    "The indi_thermostat command: an executable driver on stdin/stdout, as indiserver runs it."
    argv = sys.argv[1:]
    if "--driver-xml" not in argv and "-h" not in argv and "--help" not in argv:
        argv = ["--stdio", *argv]
    sys.exit(main(argv, prog=DRIVER_EXEC))


# ---------------------------------------------------------------------------
# The server side: ThermoServer, an IPyServer whose client side is our own,
# built as libindi's indiserver is: one object per client, each with its own
# queue counted in bytes; an element serialized once and shared by every
# queue that carries it; routing by interest; what a client sends goes to
# the devices, never straight to other clients; a client that fails or falls
# behind is closed and forgotten in one place. indipyserver 0.0.6's client
# side (a pool of at most 10 slots, one queue for everything, a task per
# element per slot, every element to every client, serialized once per
# client) cannot be patched into that, so ThermoServer keeps IPyServer for
# its drivers, add_exdriver and add_remote, and routes between them and the
# clients itself: inline, with no queue or task between a request and its
# answer.
# ---------------------------------------------------------------------------

DEFAULT_MAX_CONNECTIONS = 50        # a few desktops, dashboards and scripts, with room to spare
MAX_CONNECTIONS = 1000              # below the usual limit of 1024 open files
DEFAULT_MAX_UNREAD_MIB = 32         # libindi's indiserver -m: 128 MB
READ_SIZE = 65536

NEW_TAGS = frozenset({"newTextVector", "newNumberVector", "newSwitchVector", "newBLOBVector"})
DEVICE_TAGS = frozenset({           # what only a device sends
    "message", "delProperty",
    "defTextVector", "defNumberVector", "defSwitchVector", "defLightVector", "defBLOBVector",
    "setTextVector", "setNumberVector", "setSwitchVector", "setLightVector", "setBLOBVector"})
INDI_TAGS = NEW_TAGS | DEVICE_TAGS | {"getProperties", "enableBLOB"}
BLOB_MODES = ("Never", "Also", "Only")


def excerpt(text, limit=40):
    "A short quote of what a peer sent, for logs and messages: whatever it sent, a line stays short."
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def clipped(text, limit=200):
    "text, cut to limit characters: a rejection quotes what it rejects, never at length."
    return text if len(text) <= limit else text[:limit - 3] + "..."


def server_message(text):
    return ET.Element("message", timestamp=indi_timestamp(datetime.now(timezone.utc)), message=text)


def _escaped_text(text):
    if "&" in text:
        text = text.replace("&", "&amp;")
    if "<" in text:
        text = text.replace("<", "&lt;")
    if ">" in text:
        text = text.replace(">", "&gt;")
    return text


_ATTRIBUTE_SPECIALS = re.compile(r'[&<>"\r\n\t]')
_ATTRIBUTE_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                    "\r": "&#13;", "\n": "&#10;", "\t": "&#09;"})


def serialize(element):
    """ET.tostring(element), byte for byte, in a fraction of its time: INDI
    has no namespaces, comments or processing instructions, whose handling
    is most of ElementTree's cost (a tenth of a round trip, measured)."""
    parts = []
    try:
        _serialize_into(element, parts)
    except (TypeError, AttributeError):
        return ET.tostring(element)     # anything unusual: ElementTree's way, and its errors
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
_TAG = re.compile(rb"""<[^<>"']*(?:(?:"[^"<]*"|'[^'<]*')[^<>"']*)*>""")     # one complete tag


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

    MAX_DEPTH = 4                   # INDI needs 2: a vector and its members
    MAX_CHILDREN = 1024             # members of one vector
    MAX_ELEMENTS = 4096
    MAX_ATTRIBUTES = 32             # a definition has at most a dozen
    MAX_ATTRIBUTE_CHARS = 4096      # libindi's longest, a message, is 1024
    MAX_TAG_BYTES = 65536
    SLICE = 1024

    def __init__(self, max_bytes=16 << 20, source="a peer"):
        self.max_bytes = max_bytes
        self.source = source
        self._skipping = False          # after a discarded element, until the next INDI start tag
        self._skipped_tail = b""        # the end of what was skipped: a start tag may span two reads
        self._reset()

    def _reset(self):
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(b"<indi>")
        self._open = [next(self._parser.read_events())[1]]     # the synthetic root, then open elements
        self._held = 0                  # bytes since the last complete element
        self._built = 0                 # elements since the last complete element
        self._open_tag = None           # the start of a tag not yet ended, from its "<"
        self._line, self._column = 1, len(b"<indi>")            # where the next byte fed will be

    def feed(self, data):
        elements = []
        for start in range(0, len(data), self.SLICE):
            piece = data[start:start + self.SLICE]
            while piece:
                piece = self._skip(piece) if self._skipping else self._parse(piece, elements)
        return elements

    def _discard(self, reason, *args):
        logger.warning("%s: " + reason + "; skipping to the next INDI element", self.source, *args)
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
        return data[found.start():]

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
                self._open.pop()
                parent = self._open[-1]
                if parent is self._open[0] or (element.tag in INDI_TAGS and parent.tag in INDI_TAGS):
                    if parent is not self._open[0]:
                        logger.warning("%s: <%s> was never closed; it is ignored", self.source, excerpt(parent.tag))
                    parent.remove(element)
                    elements.append(element)
                    self._held = self._built = 0
        except ET.ParseError as exc:
            # XMLPullParser reports errors from read_events(), not from feed()
            error_at = self._offset(data, *exc.position)
            self._discard("malformed XML received (%s)", exc)
            return data[error_at + 1:] if error_at >= 0 else data
        if self._held > self.max_bytes:
            self._discard("an element exceeded %d bytes", self.max_bytes)
            return b""
        newlines = data.count(b"\n")
        self._line += newlines
        self._column = len(data) - data.rfind(b"\n") - 1 if newlines else self._column + len(data)
        return b""

    def _tag_too_long(self, data):
        "Follow tags across feeds: True if one has not ended within MAX_TAG_BYTES."
        if self._open_tag is None:
            text, position = data, data.find(b"<")
        else:
            text, position = self._open_tag + data, 0
        self._open_tag = None
        while position >= 0:
            tag = _TAG.match(text, position)
            if tag is not None:
                position = text.find(b"<", tag.end())
                continue
            following = text.find(b"<", position + 1)
            if following < 0:                       # a tag still open at the end of data
                if len(text) - position > self.MAX_TAG_BYTES:
                    return True
                self._open_tag = text[position:]
                return False
            position = following                    # malformed: expat will say so
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

    async def run_tx(self, xmldata):
        await self.server._from_device(self, xmldata)

    async def run_tx_everywhere(self, xmldata):
        await self.server._from_device(self, xmldata)

    async def run_rx(self):
        "Nothing to read: the server hands elements to the device's _readdata itself."

    def shutdown(self):
        "The server stops its links itself."

    def devices(self):
        "The device names this link serves now."
        source = self.source
        return source.devicenames if hasattr(source, "devicenames") else source.data

    def snoops(self, device, name):
        "True if this link asked for another device's traffic (indipydriver and ExDriver keep track)."
        source = self.source
        return getattr(source, "snoopall", False) or (
            device in getattr(source, "snoopdevices", ()) or (device, name) in getattr(source, "snoopvectors", ()))

    def answer(self, element, data):
        self.server._hand_over(self, element)

    def __str__(self):
        source = self.source
        if isinstance(source, RemoteConnection):
            return f"remote {source.indihost}:{source.indiport}"
        return f"driver {getattr(source, 'program', None) or ', '.join(source) or type(source).__name__}"


class _Client:
    """One client connection: what it asked for, its BLOB settings, and the
    bytes waiting for it. An element for several clients is serialized once
    and shared: each queue holds the same bytes object (or a view of the
    unsent rest of it). A client is closed and forgotten in close(), and
    nothing of it remains."""

    MAX_SETTINGS = 1024             # interests and BLOB settings kept per client

    def __init__(self, server, sock, address):
        self.server, self.sock, self.fd = server, sock, sock.fileno()
        self.address = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        self.loop = server._loop
        self.asked = False                  # it has sent a valid request
        self.all_devices = False            # it asked for every device
        self.devices = set()                # devices it asked for as a whole
        self.vectors = set()                # (device, vector) pairs it asked for
        self.touched = set()                # devices it asked anything of: their messages go to it
        self.blobs = {}                     # BLOB setting per device, and per (device, vector)
        self.unsent = collections.deque()   # bytes waiting for it, oldest first
        self.unsent_bytes = 0
        self.peak_unsent_bytes = 0
        self.closed = False
        self.write_failed = False           # it went away: read what it sent before, then close
        self.waiting = False                # for input: its task may be cancelled
        self.task = None

    def interested(self, device, name):
        "Its requests name the devices (and vectors) whose traffic it gets, as in indiserver."
        self.touched.add(device)
        if name is None or len(self.vectors) >= self.MAX_SETTINGS:
            self.devices.add(device)
        else:
            self.vectors.add((device, name))

    def wants(self, tag, device, name):
        "True if an element from a device should go to this client."
        if device is None:
            return True                     # a message to everyone
        if not (self.all_devices or device in self.devices or (device, name) in self.vectors
                or (name is None and device in self.touched)):
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
        if self.closed or self.write_failed:
            return
        if not self.unsent:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._went_away()
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self.loop.add_writer(self.fd, self._write)
        self.unsent.append(data)
        self.unsent_bytes += len(data)
        if self.unsent_bytes > self.peak_unsent_bytes:
            self.peak_unsent_bytes = self.unsent_bytes
            if self.unsent_bytes > self.server.max_unread:
                logger.warning("client %s: disconnected, it has not read its last %d bytes (--max-unread %d)",
                               self.address, self.unsent_bytes, self.server.max_unread)
                self.close()

    def _write(self):
        "The socket can take more: send what waits, oldest first."
        while self.unsent:
            data = self.unsent[0]
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                return
            except OSError:
                self._went_away()
                return
            self.unsent_bytes -= sent
            if sent < len(data):
                self.unsent[0] = memoryview(data)[sent:]
                return
            self.unsent.popleft()
        self.loop.remove_writer(self.fd)

    def _went_away(self):
        """A write failed: the client reset or closed the connection. It may
        have sent requests before it went (indi_setprop sends its request and
        closes at once): they are still to be read, and then its input ends."""
        self.write_failed = True
        self._forget_unsent()

    def _forget_unsent(self):
        if self.unsent:
            self.loop.remove_writer(self.fd)
            self.unsent.clear()
            self.unsent_bytes = 0

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._forget_unsent()
        self.server._forget(self)
        if self.waiting and self.task is not None:
            self.task.cancel()              # else it is handling a request, and ends after it

    async def run(self):
        stream = _IndiStream(source=f"client {self.address}")
        try:
            while not self.closed:
                self.waiting = True
                try:
                    data = await self.loop.sock_recv(self.sock, READ_SIZE)
                finally:
                    self.waiting = False
                if not data:
                    break
                for count, element in enumerate(stream.feed(data), 1):
                    if self.closed:
                        break
                    await self.server._from_client(self, element)
                    if count % 8 == 0:
                        await asyncio.sleep(0)      # a client is served no faster than its share
                await asyncio.sleep(0)              # as above, when its reads never wait
        except asyncio.CancelledError:
            if not self.closed:
                raise
        except OSError:
            pass                                    # a reset: its input ends
        except Exception:
            logger.exception("client %s: failed", self.address)
        finally:
            self.close()
            self.sock.close()
            logger.info("client %s disconnected", self.address)


class ThermoServer(IPyServer):
    """IPyServer as make_server returns it: its drivers, add_exdriver and
    add_remote as in indipyserver, with a client side of our own (see the
    section's comment). Against indipyserver 0.0.6, it keeps the limits of
    a server that a hostile client cannot lock, starve, inflate or use to
    spoof a device:

    - connections: up to max_connections live ones (a closed one frees all
      it held at once); at the limit, the longest-connected client that has
      sent no valid request is closed to make room, and if every client has,
      the newcomer is told the server is full;
    - output: each client has its own queue, counted in bytes; a client with
      more than max_unread bytes unread is disconnected with a warning;
    - input: a client's requests are handled in turn with everyone else's,
      a few at a time; its elements are bounded in what they build
      (_IndiStream); it may ask (getProperties, enableBLOB and new*Vector
      for a device served here, locally or relayed), and whatever only a
      device may send is dropped with a warning, for any device name.

    Also recorded in self.failure (so that the command line exits non-zero)
    rather than ending silently with status 0: a port that cannot be opened,
    an exception in any driver."""

    def __init__(self, *drivers, host="localhost", port=7624, max_connections=DEFAULT_MAX_CONNECTIONS,
                 max_unread=DEFAULT_MAX_UNREAD_MIB << 20):
        super().__init__(*drivers, host=host, port=port, maxconnections=1)
        self.connectionpool = []                    # IPyServer's client side is not used
        self.maxconnections = self.max_connections = max_connections
        self.max_unread = max_unread
        self.failure = None
        self.clients = {}                           # oldest first; the values are unused
        self._client_list = ()                      # a snapshot of clients to route through
        self._links = []
        self._local = {}                            # device name -> link of the IPyDriver serving it
        for driver in self.drivers:
            driver._commsobj = link = _DeviceLink(self, driver)
            self._links.append(link)
            self._local.update(dict.fromkeys(driver, link))
        self._loop = None
        self._tg = None
        self._accepting = []
        self._keepalive_timer = None
        self._last_traffic = 0.0

    def add_remote(self, host, port, blob_enable=False, debug_enable=False):
        "As IPyServer.add_remote, with a link that waits quietly while the remote is down."
        relay = _RelayingRemoteConnection(host=host, port=port, blob_enable=blob_enable,
                                          debug_enable=debug_enable)
        relay._commsobj = _DeviceLink(self, relay)
        self.remotes.append(relay)
        self._links.append(relay._commsobj)

    def add_exdriver(self, program, *args, debug_enable=False):
        super().add_exdriver(program, *args, debug_enable=debug_enable)
        executable = self.exdrivers[-1]
        executable._commsobj = _DeviceLink(self, executable)
        self._links.append(executable._commsobj)

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
            if device is None:
                client.all_devices = True
                await self._ask(client, element, self._links)
            elif owner := self._owner(device):
                client.interested(device, name)
                await self._ask(client, element, [owner])
            else:       # it may yet be defined by an executable driver or a remote server
                await self._ask(client, element, [link for link in self._links if link.source not in self.drivers])
        elif tag in NEW_TAGS:
            if owner := self._owner(device):
                client.asked = True
                client.interested(device, element.get("name"))     # as indiserver: it hears the answer
                await self._pass(owner, element)
            else:
                logger.warning("client %s: ignored <%s> for %s, a device not served here",
                               client.address, tag, excerpt(device))
        elif tag == "enableBLOB":
            setting = (element.text or "").strip()
            name = element.get("name")
            if self._owner(device) is None or setting not in BLOB_MODES:
                logger.warning("client %s: ignored an enableBLOB for %s, %s: it takes a device served here "
                               "and Never, Also or Only", client.address, excerpt(device), excerpt(setting))
            elif name is not None and len(client.blobs) >= client.MAX_SETTINGS:
                logger.warning("client %s: ignored an enableBLOB: more than %d settings",
                               client.address, client.MAX_SETTINGS)
            else:
                client.asked = True
                client.interested(device, name)
                client.blobs[device if name is None else (device, name)] = setting
        elif tag in DEVICE_TAGS:
            logger.warning("client %s: ignored <%s> for %s: a client may ask (getProperties, enableBLOB, "
                           "new*Vector), only a device may send this", client.address, tag,
                           excerpt(device) if device is not None else "every device")
        else:
            logger.warning("client %s: ignored <%s>, which is not an INDI element", client.address, excerpt(tag))

    async def _from_device(self, link, element):
        tag = element.tag
        if tag in DEVICE_TAGS:
            self._publish(link, element)
        elif tag == "getProperties":                # a driver snooping on another device
            device = element.get("device")
            owner = self._owner(device)
            if device is None or owner is None:
                targets = [other for other in self._links if other is not link]
            else:
                targets = [owner] if owner is not link else []
            await self._ask(link, element, targets)
        elif tag in NEW_TAGS:                       # a driver commanding another device
            owner = self._owner(element.get("device"))
            if owner is not None and owner is not link:
                await self._pass(owner, element)

    def _publish(self, link, element):
        "Serialize an element from a device once, and hand it to whoever asked for it."
        tag, device, name = element.tag, element.get("device"), element.get("name")
        if tag.startswith("def"):
            if device is None or name is None:
                return
            owner = self._owner(device)
            if owner is not None and owner is not link:
                logger.warning("%s: ignored a definition of %s, a device served by %s",
                               link, excerpt(device), owner)
                return
        if tag != "setBLOBVector":                  # a BLOB may be held up: it does not count
            self._last_traffic = self._loop.time()
        data = serialize(element)
        asker = _asker.get()
        if asker is not None and tag.startswith("def"):
            asker.answer(element, data)
            return
        for client in self._client_list:
            if client.wants(tag, device, name):
                client.send(data)
        if device is not None:
            for other in self._links:
                if other is not link and other.snoops(device, name):
                    self._hand_over(other, element)

    async def _ask(self, asker, element, links):
        "Pass a getProperties to links; the definitions that answer it go to asker alone."
        token = _asker.set(asker)
        try:
            for link in links:
                await self._pass(link, element)
        finally:
            _asker.reset(token)

    async def _pass(self, link, element):
        try:
            await link.source._readdata(element)
        except Exception:
            logger.exception("%s: failed to take <%s>", link, element.tag)

    def _hand_over(self, link, element):
        "To a driver snooping, in a task of its own: its handling must not hold up the sender."
        if self._tg is not None and not self._stop:
            self._tg.create_task(self._pass(link, element))

    def _to_clients(self, element):
        data = serialize(element)
        for client in self._client_list:
            client.send(data)

    async def send_message(self, message, timestamp=None):
        "A message from the server to every client (IPyServer.send_message, routed here)."
        element = server_message(message)
        if timestamp is not None:
            element.set("timestamp", indi_timestamp(timestamp))
        self._to_clients(element)

    def _send_keepalive(self):
        self._to_clients(server_message("Keep alive message"))

    def _keep_alive(self):
        "After keepalive seconds without traffic (a BLOB not counting), a message says the server is alive."
        if self._stop or not self.keepalive:
            return
        now = self._loop.time()
        if now >= self._last_traffic + self.keepalive:
            self._send_keepalive()
            self._last_traffic = now
        self._keepalive_timer = self._loop.call_at(self._last_traffic + self.keepalive, self._keep_alive)

    # -- connections ----------------------------------------------------------

    def _admit(self, sock, address):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _Client(self, sock, address)
        if len(self.clients) >= self.max_connections:
            silent = next((c for c in self.clients if not c.asked), None)
            if silent is None:
                logger.warning("refused client %s: all %d connections are in use", client.address,
                               self.max_connections)
                client.send(serialize(server_message(
                    f"[WARNING] This server is full ({self.max_connections} clients); try again later")))
                sock.close()
                return
            logger.warning("closed client %s, which had sent no request, to make room for %s: "
                           "all %d connections are in use", silent.address, client.address, self.max_connections)
            silent.send(serialize(server_message(
                f"[WARNING] This server is full ({self.max_connections} clients): this connection has sent no "
                f"request, and is closed to make room")))
            silent.close()
        logger.info("client %s connected", client.address)
        self.clients[client] = None
        self._client_list = tuple(self.clients)
        client.task = self._tg.create_task(client.run())

    def _forget(self, client):
        if self.clients.pop(client, False) is None:
            self._client_list = tuple(self.clients)

    def _listen(self):
        "Listening sockets on every address of host, or OSError."
        listeners = []
        try:
            for family, kind, protocol, _, address in socket.getaddrinfo(
                    self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                try:
                    listener = socket.socket(family, kind, protocol)
                except OSError:
                    continue                # a family this machine lacks (IPv6, say), as asyncio skips it
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
            while not self._stop:
                try:
                    sock, address = await self._loop.sock_accept(listener)
                except OSError as exc:      # out of file descriptors, say: not the end of the server
                    logger.warning("cannot accept a connection: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                self._admit(sock, address)
        finally:
            listener.close()

    async def _runserver(self):
        try:
            listeners = self._listen()
        except OSError as exc:
            self.failure = f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            self.shutdown()
            return
        devices = ", ".join(self.devices) or "no devices"
        logger.info("serving %s on %s:%s (Ctrl-C stops)", devices, self.host, self.port)
        self._accepting = [self._tg.create_task(self._accept(listener)) for listener in listeners]

    def shutdown(self, shutdownmessage=""):
        super().shutdown(shutdownmessage)
        for task in self._accepting:
            task.cancel()
        for client in self._client_list:
            client.close()
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()

    async def asyncrun(self):
        # IPyServer.asyncrun logs an exception and returns as if all were well; keep it instead.
        self._stop = False
        self._loop = asyncio.get_running_loop()
        self._last_traffic = self._loop.time()
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tg = tasks
                for runner in (*self.drivers, *self.exdrivers, *self.remotes):
                    tasks.create_task(runner.asyncrun())
                tasks.create_task(self._runserver())
                self._keep_alive()
        except Exception as exc:
            logger.exception("the server stopped on an error")
            self.failure = f"the server stopped on an error: {exc!r}"
        finally:
            self.shutdown()
            await self._reap_executables()

    async def _reap_executables(self):
        "ExDriver.shutdown terminates its process without waiting for it: wait, so that none is left behind."
        for executable in self.exdrivers:
            if executable.proc is not None and executable.proc.returncode is None:
                try:
                    await asyncio.wait_for(executable.proc.wait(), 2)
                except TimeoutError:
                    executable.proc.kill()


# ===========================================================================
# ADAPTATIONS to defects of the foundation, verified on indipydriver 3.1.2
# and indipyserver 0.0.6 (the versions pinned in pyproject.toml). Each is
# the smallest change that works, and tests/test_adaptations.py has a test
# that fails without it. check_foundation() refuses to run if the internals
# they touch are not there.
# ===========================================================================

VERIFIED_ON = {"indipydriver": "3.1.2", "indipyserver": "0.0.6"}


def check_foundation():
    "Fail loudly, at start-up, if an internal that an adaptation relies on has changed."
    needed = [(IPyDriver, "_readdata"), (IPyDriver, "_client_tags"), (IPyDriver, "send"),
              (IPyDriver, "_monitorsnoop"), (IPyServer, "shutdown"), (IPyServer, "add_exdriver"),
              (RemoteConnection, "_run_rx"), (RemoteConnection, "_readdata"), (ExDriver, "_readdata")]
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed
               if not hasattr(owner, name)]
    probe = NumberVector("probe", "probe", "probe", "ro", "Ok", [])
    if getattr(probe, "_message", None) != "":
        missing.append("PropertyVector._message")
    if getattr(IPyDriver(), "_commsobj", "missing") is not None:
        missing.append("IPyDriver._commsobj")
    if missing:
        raise RuntimeError(f"thermostat.py was verified on {VERIFIED_ON}; this installation lacks "
                           f"{', '.join(missing)}: install the pinned versions")
    installed = {"indipydriver": indipydriver.version, "indipyserver": indipyserver.version}
    if installed != VERIFIED_ON:
        logger.warning("verified on %s, running on %s", VERIFIED_ON, installed)


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


async def answer_unusable_request(driver, root):
    """indipydriver 3.1.2 drops a request it cannot use (unknown vector or
    member, switch value other than On/Off, empty number) with no answer to
    the client, passes new values for read-only vectors on as events, and
    raises UnboundLocalError on a new*Vector whose type is not the vector's
    (which ends indipyserver 0.0.6 and every driver in it). Answer such a
    request for driver's devices here; return True if it was answered."""
    if root.tag not in driver._client_tags or root.get("device") not in driver:
        return False
    device, name = driver[root.get("device")], root.get("name")
    vector = device.get(name)
    if vector is None:
        await driver.refuse(name, f"no such property on device {device.devicename}")
        return True
    if vector.perm == "ro":
        await driver.refuse(name, "is read-only; the request was ignored")
        return True
    if root.tag != f"new{vector.vectortype}":
        await driver.reject(vector, f"{name} is a {vector.vectortype}: {root.tag} does not apply to it")
        return True
    try:
        getattr(indipydriver.events, root.tag)(device.devicename, name, vector, root)
    except indipydriver.events.EventException as exc:
        await driver.reject(vector, f"request rejected: {exc}")
        return True
    return False


async def _no_snoop_monitor(driver):
    """indipydriver 3.1.2 runs a snoop monitor that wakes every second, even
    in a driver that snoops on nothing, as ThermoDriver: in an idle
    thermostat under indiserver, that was most of its CPU. ThermoDriver runs
    none."""


ThermoDriver._monitorsnoop = _no_snoop_monitor


class _EndOfStreamReader:
    """indipyserver 0.0.6 reads a closed connection forever (an empty read
    is not taken as end of stream), spinning at 100% CPU. This reader turns
    end of stream into the ConnectionError that it handles as a lost link."""

    def __init__(self, reader):
        self._reader = reader

    async def read(self, n=-1):
        data = await self._reader.read(n)
        if not data:
            raise ConnectionAbortedError("client closed the connection")
        return data


class StdioLink:
    """The driver's link to indiserver on stdin/stdout, in place of
    indipydriver 3.1.2's own, which polls stdin every 10 ms (11 ms per
    request, 3% CPU idle), keeps running after end of input, and writes to
    stdout as if it blocked: indiserver passes one socket as fd 0 and 1, and
    indipydriver makes fd 0 non-blocking, so large writes lost data or
    raised BlockingIOError. Here stdin is read by the event loop, end of
    input shuts the driver down, and every write completes."""

    def __init__(self, driver, fd_in=0, fd_out=1):
        self.driver = driver
        self.fd_in, self.fd_out = fd_in, fd_out
        self._transport = None
        self._writing = asyncio.Lock()     # one message at a time, even across partial writes

    async def run_rx(self):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), open(self.fd_in, "rb", buffering=0, closefd=False))
        if hasattr(self._transport, "max_size"):    # asyncio's reads 256 KiB: 18 us in allocation each
            self._transport.max_size = READ_SIZE     # (uvloop reads into a buffer it keeps)
        stream = _IndiStream()
        while not self.driver.stop and (data := await reader.read(65536)):
            for element in stream.feed(data):
                await self.driver._readdata(element)
        logger.info("end of input: the driver stops")
        self.driver.shutdown()

    async def run_tx(self, xmldata):
        data = memoryview(serialize(xmldata) + b"\n")
        async with self._writing:
            while data:
                try:
                    data = data[os.write(self.fd_out, data):]
                except BlockingIOError:
                    await self._writable()

    async def _writable(self):
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_writer(self.fd_out, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_writer(self.fd_out)

    def shutdown(self):
        if self._transport is not None:
            self._transport.close()         # ends run_rx's read


class _RelayingRemoteConnection(RemoteConnection):
    """indipyserver 0.0.6's link to a remote server reads a closed link
    forever (12 CPU-seconds while the far end was down, in one measurement).
    End of stream here is a lost connection, which it already retries every
    5 s."""

    async def _run_rx(self):
        self._reader = _EndOfStreamReader(self._reader)
        await super()._run_rx()


if __name__ == "__main__":
    sys.exit(main())
