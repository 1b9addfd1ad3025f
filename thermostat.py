"""An INDI thermostat driver, built on indipydriver and indipyserver.

Run it:      python thermostat.py            (serves INDI on localhost:7624)
Import it:   from thermostat import make_driver, make_server

The module reads top to bottom: the thermostat model (pure, time passed in),
the INDI driver (requests in, readings out), assembly (make_driver,
make_server), the command line, and last, fenced, the adaptations to defects
of indipydriver and indipyserver, with the versions they were verified on.
"""

import argparse
import asyncio
import collections
import errno
import hashlib
import logging
import math
import os
import re
import signal
import stat
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
import xml.etree.ElementTree as ET

import indipydriver
from indipydriver import (IPyDriver, Device, NumberVector, NumberMember,
                          LightVector, LightMember, SwitchVector, SwitchMember, TextVector, TextMember,
                          BLOBVector, BLOBMember, newNumberVector, newSwitchVector)
import indipyserver
from indipyserver import IPyServer, ipyserver
from indipyserver.remote import RemoteConnection

__version__ = "1.0.0"


class WarningThrottle(logging.Filter):
    """Passes at most `limit` warnings of one kind (one message template) per
    `period` seconds, and says how many it held back with the next one that
    passes: a client that floods the server with bad input must not flood
    its log too."""

    def __init__(self, limit=20, period=60.0):
        super().__init__()
        self.limit, self.period = limit, period
        self._windows = {}              # template -> [start of its window, warnings in it]

    def filter(self, record):
        if record.levelno != logging.WARNING:
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
logger.addFilter(WarningThrottle())


# ---------------------------------------------------------------------------
# The thermostat: a simulated heater and sensor, and its temperature log.
# Nothing here knows INDI; every method that depends on time is given it.
# ---------------------------------------------------------------------------

TEMPERATURE_MIN, TEMPERATURE_MAX = -50.0, 99.0
HEATING_STEP = 0.2     # degrees the temperature moves each poll
HYSTERESIS = 0.5       # the heater switches beyond target +/- this
MAX_FILE_BYTES = 1 << 20          # a log file is cut early at this size: the bound of one BLOB
MAX_UNWRITTEN_BYTES = 8 << 20     # log rows held in memory while log_dir cannot be written

_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)"
_INDI_NUMBER = re.compile(      # decimal, or sexagesimal with one kind of separator: 21:30:15, 21;30, 21 30
    rf"(?P<sign>[+-]?)(?:(?P<decimal>{_UNSIGNED}(?:[eE][+-]?\d+)?)"
    rf"|(?P<degrees>{_UNSIGNED})(?P<separator>[:;]| +)(?P<minutes>{_UNSIGNED})"
    rf"(?:(?P=separator)(?P<seconds>{_UNSIGNED}))?)", re.ASCII)


def parse_number(text, what, low, high):
    """Return text as a float within low..high, in any INDI number format
    (decimal, "21:30", "21;30", "21 30"), or raise ValueError saying what is wrong."""
    expected = f"{what} must be a number from {low:g} to {high:g}; received {text!r}"
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _INDI_NUMBER.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"{expected}, which is not a number (decimal, or sexagesimal "
                             f"as 21:30, 21;30 or 21 30)")
        if match["decimal"]:
            value = float(match["decimal"])
        else:
            minutes, seconds = float(match["minutes"]), float(match["seconds"] or 0)
            if minutes >= 60 or seconds >= 60:
                raise ValueError(f"{expected}: minutes and seconds must be below 60")
            value = float(match["degrees"]) + minutes / 60 + seconds / 3600
        if match["sign"] == "-":
            value = -value
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(expected)
    return value


def indi_timestamp(moment):
    """The text of a UTC datetime as INDI carries it, and as indipydriver
    writes it into every timestamp attribute."""
    return moment.replace(tzinfo=None).isoformat(sep="T")


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


@dataclass(frozen=True)
class Reading:
    timestamp: datetime
    temperature: float
    heater_on: bool
    in_band: bool      # within target +/- HYSTERESIS


@dataclass
class LogFile:
    """One CSV file of the temperature log: rows `timestamp,temperature`,
    named <prefix>-<first reading's UTC time>.csv, with '-' for ':' in
    the time (the rows keep the INDI timestamps)."""
    prefix: str
    rows: list = field(default_factory=list)
    size: int = 0           # bytes of its content
    first: datetime = None  # the time of its first reading

    HEADER = "timestamp,temperature\n"

    def __post_init__(self):
        self.size = len(self.HEADER) + sum(map(len, self.rows))

    @staticmethod
    def row(reading):
        return f"{indi_timestamp(reading.timestamp)},{reading.temperature:.2f}\n"

    def add(self, reading):
        row = self.row(reading)
        if not self.rows:
            self.first = reading.timestamp
        self.rows.append(row)
        self.size += len(row)

    @property
    def name(self):
        return f"{self.prefix}-{self.first:%Y-%m-%dT%H-%M-%S.%f}.csv"

    def content(self):
        return (self.HEADER + "".join(self.rows)).encode()


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
    "Create folder if need be and check that files can be written in it, or raise ValueError saying why."
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
    half a row."""

    def __init__(self, folder, prefix, *, max_unwritten=MAX_UNWRITTEN_BYTES, retry_seconds=1.0):
        check_log_dir(folder)
        self.folder, self.prefix = Path(folder), prefix
        self.max_unwritten, self.retry_seconds = max_unwritten, retry_seconds
        self.unwritten = collections.deque()    # finished files not yet on disk, oldest first
        self.unwritten_bytes = 0
        self.failure = None                     # why writing fails, while it does
        self._retry_at = None
        self._open = None       # the LogFile whose .part is open as _fd
        self._fd = None
        self._rows_on_disk = self._bytes_on_disk = 0
        self.recover()

    def append(self, logfile, now):
        "logfile, the file being logged, has a new last row: put it on the disk."
        if self.failure is None or now >= self._retry_at:
            self._catch_up(logfile, now)

    def finish(self, logfile, now=None):
        """logfile is complete: it goes on the disk under its final name, at
        once or at a later retry (when now is None, writing is tried at once)."""
        self.unwritten.append(logfile)
        self.unwritten_bytes += logfile.size
        while self.unwritten_bytes > self.max_unwritten:
            dropped = self.unwritten.popleft()
            self.unwritten_bytes -= dropped.size
            logger.error("log rows waiting to be written to %s exceed %d bytes: dropped %s (%d rows)",
                         self.folder, self.max_unwritten, dropped.name, len(dropped.rows))
        if self.failure is None or now is None or now >= self._retry_at:
            self._catch_up(None, now)

    def recover(self):
        "Complete the partial files of this device that a crash left behind; whole rows are kept."
        pattern = re.compile(re.escape(self.prefix) + r"-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d\.\d{6}\.csv\.part")
        for partial in sorted(self.folder.iterdir()):
            if not pattern.fullmatch(partial.name):
                continue
            final = partial.with_name(partial.name.removesuffix(".part"))
            try:
                length, rows = whole_rows(partial.read_bytes())
                if rows == 0 or final.exists():
                    partial.unlink()        # nothing to keep, or already complete
                    continue
                os.truncate(partial, length)
                with open(partial, "rb") as data:
                    os.fsync(data.fileno())
                os.rename(partial, final)
                self._sync_folder()
                logger.warning("completed %s, left unfinished by a crash: %d rows kept", final.name, rows)
            except OSError as exc:
                logger.error("cannot complete %s, left unfinished by a crash: %s", partial, exc.strerror or exc)

    def _catch_up(self, current, now):
        "Write every finished file still unwritten, then current's new rows."
        try:
            while self.unwritten:
                self._open_for(self.unwritten[0])
                self._append_rest()
                self._finalize()
                self.unwritten_bytes -= self.unwritten.popleft().size
            if current is not None and current.rows:
                self._open_for(current)
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
        if self._open is logfile:           # after a failure: go on after its whole rows, if still there
            try:
                self._fd = os.open(self._partial(logfile), os.O_WRONLY | os.O_APPEND)
                if os.fstat(self._fd).st_size == self._bytes_on_disk:
                    return
            except OSError:
                pass
        self._close()
        self.folder.mkdir(parents=True, exist_ok=True)      # a folder removed meanwhile is made again
        self._fd = os.open(self._partial(logfile), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        self._open, self._rows_on_disk, self._bytes_on_disk = logfile, 0, 0
        self._write(LogFile.HEADER.encode())
        self._sync_folder()

    def _append_rest(self):
        rows = self._open.rows[self._rows_on_disk:]
        if not rows:
            return
        if os.fstat(self._fd).st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "the partial log file was removed", str(self._partial(self._open)))
        self._write("".join(rows).encode())
        os.fdatasync(self._fd)
        self._rows_on_disk += len(rows)

    def _write(self, data):
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        self._bytes_on_disk += written

    def _finalize(self):
        partial = self._partial(self._open)
        os.rename(partial, partial.with_name(self._open.name))
        self._close()
        self._sync_folder()

    def _failed(self, exc, now):
        if self._fd is not None:
            try:                        # never half a row, nor a file without one
                if self._rows_on_disk:
                    os.ftruncate(self._fd, self._bytes_on_disk)
                else:
                    os.unlink(self._partial(self._open))
            except OSError:
                pass
        rows_kept_on_disk = self._open if self._rows_on_disk else None
        self._close()
        self._open = rows_kept_on_disk      # the next try goes on after them
        self._retry_at = (now or datetime.now(timezone.utc)) + timedelta(seconds=self.retry_seconds)
        if self.failure is None:
            self.failure = exc.strerror or str(exc)
            logger.error("cannot write log files to %s (%s): they are kept in memory, up to %g MiB, "
                         "and written when writing works again", self.folder, self.failure,
                         self.max_unwritten / 2**20)

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


class ThermalControl:
    """A simulated thermostat. Each step() moves the temperature one
    HEATING_STEP up (heater on) or down (heater off), within
    TEMPERATURE_MIN..TEMPERATURE_MAX, and switches the heater around target
    +/- HYSTERESIS. While logging, every reading goes into the current log
    file, which is cut every log_period seconds, or early at max_file_bytes;
    finished files wait in a bounded backlog until sent. With a log_dir,
    every reading is also on disk as it is logged (see LogWriter)."""

    def __init__(self, name="Thermostat", *, temperature=20.0, target=15.0,
                 log_period=300.0, log_dir=None, max_backlog=16, max_file_bytes=MAX_FILE_BYTES):
        self.name = name
        self.temperature = temperature
        self.target = parse_number(target, "target", TEMPERATURE_MIN, TEMPERATURE_MAX)
        self.heater_on = False
        self.log_period = log_period
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.file_prefix = file_prefix(name)
        self.writer = LogWriter(log_dir, self.file_prefix) if log_dir is not None else None
        self.backlog = collections.deque()
        self.max_backlog = max_backlog
        self.max_file_bytes = max_file_bytes
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
        self.temperature = min(max(round(self.temperature + step, 2), TEMPERATURE_MIN), TEMPERATURE_MAX)
        if self.temperature > self.target + HYSTERESIS:
            self.heater_on = False
        elif self.temperature < self.target - HYSTERESIS:
            self.heater_on = True
        reading = Reading(now, self.temperature, self.heater_on, self.in_band)
        if self.logging:
            self._log(reading, now)
        return reading

    def start_logging(self, now):
        if not self.logging:
            self._logfile = LogFile(self.file_prefix)
            self._period_start = now

    def stop_logging(self):
        "Stop logging; the partial file, if it has rows, joins the backlog (and log_dir, at once)."
        if self.logging:
            self._finish_file(None)
            self._logfile = None

    def next_unsent(self):
        "The oldest finished file not yet sent, or None."
        return self.backlog[0] if self.backlog else None

    def sent(self, logfile):
        "logfile has gone out: it leaves the backlog (unless a full backlog dropped it meanwhile)."
        if self.backlog and self.backlog[0] is logfile:
            self.backlog.popleft()

    def _log(self, reading, now):
        period = timedelta(seconds=self.log_period)     # read each time: clients may change it
        if now >= self._period_start + period:
            self._finish_file(now)
            self._logfile = LogFile(self.file_prefix)
            self._period_start += period
            if now >= self._period_start + period:      # polls were late: start afresh
                self._period_start = now
        elif self._logfile.size + len(LogFile.row(reading)) > self.max_file_bytes:
            logger.warning("log file %s reached %d bytes before its log period ended: cut there, "
                           "the next file goes on", self._logfile.name, self._logfile.size)
            self._finish_file(now)
            self._logfile = LogFile(self.file_prefix)
        self._logfile.add(reading)
        if self.writer is not None:
            self.writer.append(self._logfile, now)

    def _finish_file(self, now):
        logfile = self._logfile
        if not logfile.rows:
            return
        if self.writer is not None:
            self.writer.finish(logfile, now)
        self.backlog.append(logfile)
        if len(self.backlog) > self.max_backlog:
            dropped = self.backlog.popleft()
            kept = f", a copy is in {self.log_dir}" if self.log_dir is not None else ""
            logger.warning("log backlog full (%d files unsent): dropped %s%s",
                           self.max_backlog, dropped.name, kept)



# ---------------------------------------------------------------------------
# The INDI driver: client requests in, thermostat readings out.
# ---------------------------------------------------------------------------

# What only a device sends: a driver that receives one for its own device ignores it.
DEVICE_TAGS = frozenset({"delProperty", *(f"{kind}{vector}Vector" for kind in ("def", "set")
                                          for vector in ("Text", "Number", "Switch", "Light", "BLOB"))})


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
            if root.tag in DEVICE_TAGS and root.get("device") in self:
                # libindi's indiserver passes on what clients send; indipydriver would take a
                # definition of our own device as a duplicate and end the driver
                logger.warning("%s: ignored <%s> for this device from outside: only this driver "
                               "speaks for it", root.get("device"), root.tag)
            elif not await answer_unusable_request(self, root):
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
        logger.warning("%s.%s: %s", self.device.devicename, vector.name, message)
        await self.publish(vector, message=message, state="Alert")

    async def refuse(self, name, message):
        "Answer a request that has no vector to answer on (unknown or read-only) with a device message."
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
        updates = asyncio.create_task(self.update_loop())
        try:
            await self.control_loop()
        finally:
            # Every way out passes here, and waits on no client or queue: updates still
            # on their way are dropped, and the partial log file reaches log_dir.
            updates.cancel()
            self.thermostat.stop_logging()
            await asyncio.wait([updates])

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
        while not self.stop:
            reading = await self.readings.get()
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
            # the declared range holds every value sent, one given here below libindi's floor too
            NumberMember("PERIOD_MS", "Period (ms)", format="%.f", min=min(POLL_PERIOD_MS[0], poll_interval * 1000),
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
            NumberMember("logperiod", "Seconds per file", format="%.1f", min=min(LOG_PERIOD_S[0], log_period),
                         max=LOG_PERIOD_S[1], step=60, membervalue=f"{log_period:g}")]),
        BLOBVector("logsvector", "Logs", "Control", "ro", "Ok", [
            BLOBMember("templogs", "Temperature logs", blobformat=".csv")]),
    ]
    return ThermoDriver(Device(devicename, properties), thermostat, poll_interval)


def make_server(*drivers, host="localhost", port=7624, max_connections=5):
    """Return an IPyServer for drivers (thermostats and any others) with the
    adaptations below; await its asyncrun(), then read its failure."""
    check_foundation()
    return ThermoServer(*drivers, host=host, port=port, maxconnections=max_connections)


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
                        help="also write the log to DIR, each reading as it is taken, in files "
                             "<device>-<first reading's UTC time>.csv (see the README)")
    parser.add_argument("--max-connections", type=_number_type(1, 10, int), default=5,
                        metavar="N", help="simultaneous clients, 1..10 (default: %(default)s)")
    parser.add_argument("--stdio", action="store_true",
                        help="speak INDI on stdin/stdout, as an executable driver under indiserver "
                             "(host, port and max-connections do not apply); logs go to stderr")
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
    link = driver._commsobj = StdioLink(driver)
    running = asyncio.create_task(driver.asyncrun())
    stop_on_signals(driver.shutdown)
    await running
    return 1 if link.failure else 0


async def finish_promptly(server, running, earlier_tasks, timeout=1.5):
    """Once server has stopped, let what still runs end without waiting on
    the server's queue: nothing reads it any more (a driver's update or a
    client's request put there waited forever), so what is put there now is
    discarded. Return False if running, or the tasks started since
    earlier_tasks (those serving clients), had not ended within timeout
    seconds."""
    queue = server.xml_data_que

    async def discard():
        while True:
            await queue.get()
            queue.task_done()
    discarding = asyncio.create_task(discard())
    try:
        if (await asyncio.wait([running], timeout=timeout))[1]:
            return False
        others = asyncio.all_tasks() - earlier_tasks - {discarding}
        return not others or not (await asyncio.wait(others, timeout=timeout))[1]
    finally:
        discarding.cancel()


async def serve(server):
    """Run server until SIGINT, SIGTERM, SIGHUP or SIGQUIT; return the exit status."""
    earlier_tasks = asyncio.all_tasks()
    running = asyncio.create_task(server.asyncrun())
    stop_on_signals(server.shutdown)
    await server.stopped.wait()
    if not await finish_promptly(server, running, earlier_tasks):
        logger.warning("shutdown did not finish in time; stopping anyway")
    if server.failure:
        print(f"thermostat.py: error: {server.failure}", file=sys.stderr)
        return 1
    return 0


def main(argv=None, prog="thermostat.py"):
    args = parse_args(argv, prog)
    if args.driver_xml:
        print(driver_xml(), end="")
        return 0
    configure_logging(args.verbose)
    try:
        driver = make_driver(args.device, target=args.target, poll_interval=args.poll_interval,
                             log_period=args.log_period, log_dir=args.log_dir)
    except ValueError as exc:           # a --log-dir that cannot be written: said before serving
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    driver.debug_enable = args.verbose
    if _signals_before_serving:
        return 0                        # stopped during start-up: nothing served, nothing logged
    if args.stdio:
        return asyncio.run(serve_stdio(driver))
    server = make_server(driver, host=args.host, port=args.port, max_connections=args.max_connections)
    return asyncio.run(serve(server))


def run_command(argv=None, prog="thermostat.py"):
    "Run main as a command, a stop signal held from start to exit (see hold_stop_signals), and exit."
    hold_stop_signals()
    status = main(argv, prog)
    hold_stop_signals()                 # the event loop's handlers are gone: a late signal is no crash
    sys.exit(status)


def indi_thermostat():
    "The indi_thermostat command: an executable driver on stdin/stdout, as indiserver runs it."
    argv = sys.argv[1:]
    if "--driver-xml" not in argv and "-h" not in argv and "--help" not in argv:
        argv = ["--stdio", *argv]
    run_command(argv, prog=DRIVER_EXEC)


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
              (IPyServer, "_runserver"), (IPyServer, "handle_data"), (IPyServer, "_broadcast"),
              (IPyServer, "_send_keepalive"), (IPyDriver, "_monitorsnoop"),
              (ipyserver, "_DriverComms"), (ipyserver._ClientConnection, "handle_data"),
              (ipyserver._ClientConnection, "_client_rx"), (ipyserver._ClientConnection, "_client_tx"),
              (ipyserver.SendChecker, "setpermissions"),
              (RemoteConnection, "_run_rx")]
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


INDI_TAGS = frozenset({
    "getProperties", "enableBLOB", "message", "delProperty",
    "newTextVector", "newNumberVector", "newSwitchVector", "newBLOBVector",
    "defTextVector", "defNumberVector", "defSwitchVector", "defLightVector", "defBLOBVector",
    "setTextVector", "setNumberVector", "setSwitchVector", "setLightVector", "setBLOBVector"})


class _IndiStream:
    """Splits a byte stream of INDI elements (no document root) into
    elements, with a synthetic root as indipydriver and indipyserver do, but
    surviving what a peer may send: after malformed XML, parsing resumes at
    the next tag; an element never closed does not swallow the INDI elements
    after it; and no more than max_bytes are held for an element that does
    not end."""

    def __init__(self, max_bytes=16 << 20):
        self.max_bytes = max_bytes
        self._reset()

    def _reset(self):
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(b"<indi>")
        self._open = [next(self._parser.read_events())[1]]     # the synthetic root, then open elements
        self._held = 0                  # bytes since the last complete element
        self._line, self._column = 1, len(b"<indi>")            # where the next byte fed will be

    def feed(self, data):
        elements = []
        while data:
            data = self._feed(data, elements)
        if self._held > self.max_bytes:
            logger.warning("an element exceeded %d bytes; discarding it", self.max_bytes)
            self._reset()
        return elements

    def _feed(self, data, elements):
        "Parse data into elements; after an error, return the data left to parse afresh."
        self._parser.feed(data)
        self._held += len(data)
        try:
            for event, element in self._parser.read_events():
                if event == "start":
                    self._open.append(element)
                    continue
                self._open.pop()
                parent = self._open[-1]
                if parent is self._open[0] or (element.tag in INDI_TAGS and parent.tag in INDI_TAGS):
                    if parent is not self._open[0]:
                        logger.warning("<%s> was never closed; it is ignored", parent.tag)
                    parent.remove(element)
                    elements.append(element)
                    self._held = 0
        except ET.ParseError as exc:
            # XMLPullParser reports errors from read_events(), not from feed()
            logger.warning("malformed XML received (%s); skipping to the next tag", exc)
            error_at = self._offset(data, *exc.position)
            self._reset()
            resume = data.find(b"<", error_at + 1)
            return data[resume:] if resume >= 0 else b""
        newlines = data.count(b"\n")
        self._line += newlines
        self._column = len(data) - data.rfind(b"\n") - 1 if newlines else self._column + len(data)
        return b""

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
        self._writing = asyncio.Lock()     # one message at a time, even across partial writes
        self._waiting = None               # the future a write waits on while stdout is full

    async def run_rx(self):
        mode = os.fstat(self.fd_out).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.set_blocking(self.fd_out, False)     # a reader that lags must not stop the polls
        read = await self._reader()
        stream = _IndiStream()
        while not self.driver.stop and (data := await read()):
            for element in stream.feed(data):
                await self.driver._readdata(element)
        if not self.driver.stop:
            logger.info("end of input: the driver stops")
            self.driver.shutdown()

    async def _reader(self):
        "A coroutine function returning stdin's next data, b'' at its end."
        mode = os.fstat(self.fd_in).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(self.fd_in)):
            async def read_file():          # a regular file or /dev/null: the event loop cannot
                await asyncio.sleep(0)      # watch it, and reading it never waits for a writer
                return os.read(self.fd_in, 65536)
            return read_file
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), open(self.fd_in, "rb", buffering=0, closefd=False))
        return lambda: reader.read(65536)

    async def run_tx(self, xmldata):
        data = memoryview(ET.tostring(xmldata) + b"\n")
        async with self._writing:
            while data and not self.driver.stop:
                try:
                    data = data[os.write(self.fd_out, data):]
                except BlockingIOError:
                    await self._writable()
                except OSError as exc:
                    self.failure = f"cannot write to stdout ({exc.strerror or exc}): the driver stops"
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
            self._transport.close()         # ends run_rx's read
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)  # a stopping driver waits on no reader


class _RelayingRemoteConnection(RemoteConnection):
    """indipyserver 0.0.6's link to a remote server reads a closed link
    forever (12 CPU-seconds while the far end was down, in one measurement).
    End of stream here is a lost connection, which it already retries every
    5 s."""

    async def _run_rx(self):
        self._reader = _EndOfStreamReader(self._reader)
        await super()._run_rx()


class _ClientProtocol(asyncio.StreamReaderProtocol):
    """How ThermoServer reads a client. indi_setprop sends its request and
    closes at once, without reading the definitions it asked for: our next
    write to it fails, and asyncio then closes the socket with the request
    still unread in it, so the request was lost (a race that indipyserver
    0.0.6 loses more often the faster it answers). Here a connection lost
    on an error first reads what the client had sent, then ends as a
    normal end of stream."""

    def __init__(self, client_connected):
        self.reader = asyncio.StreamReader(limit=65536)
        super().__init__(self.reader, client_connected)

    def connection_made(self, transport):
        self._socket = transport.get_extra_info("socket")
        super().connection_made(transport)

    def connection_lost(self, exc):
        if exc is not None:
            try:
                with self._socket.dup() as sock:    # the transport closes its own after this call
                    sock.setblocking(False)
                    while data := sock.recv(65536):
                        self.reader.feed_data(data)
            except OSError:
                pass                                # nothing more to read, or the reset itself
        super().connection_lost(None)


def server_message(text):
    return ET.Element("message", timestamp=indi_timestamp(datetime.now(timezone.utc)), message=text)


class _ClientLink(ipyserver._ClientConnection):
    """One client connection of ThermoServer. Against indipyserver 0.0.6:
    end of stream ends it (no CPU spin); malformed or oversized input is
    discarded, not fatal to the connection; elements a client may not send
    are refused (see ThermoServer.refusal); an enableBLOB without a valid
    value is ignored, not an AttributeError; other clients' requests
    (getProperties, new*Vector) are not echoed to it; and a client that
    stops reading is disconnected once max_pending messages wait for it,
    instead of growing the server without bound."""

    max_pending = 1000

    def __init__(self, con_id, xml_data_que, server):
        super().__init__(con_id, xml_data_que)
        self.server = server
        self.pending = 0

    async def _client_rx(self):
        stream = _IndiStream()
        while data := await self.reader.read(65536):
            for element in stream.feed(data):
                await self._receive(element)

    async def _receive(self, element):
        if element.tag == "enableBLOB":
            if element.get("device") and (element.text or "").strip() in ("Never", "Also", "Only"):
                self.sendchecker.setpermissions(element)
            else:
                logger.warning("client %d: ignored an enableBLOB without a device or a value "
                               "Never, Also or Only", self.con_id)
        elif reason := self.server.refusal(element):
            logger.warning("client %d: ignored %s", self.con_id, reason)
        else:
            await self.xml_data_que.put((self.con_id, element))

    async def _client_tx(self, con_id, xmldata):
        from_a_client = con_id in self.server.client_ids
        if from_a_client and (xmldata.tag == "getProperties" or xmldata.tag.startswith("new")):
            return                          # a request for the devices, not news for other clients
        if not self.connected:
            return
        if self.pending >= self.max_pending:
            logger.warning("client %d: disconnected, it has not read its last %d messages",
                           self.con_id, self.max_pending)
            self.shutdown()
            return
        self.pending += 1
        try:
            await super()._client_tx(con_id, xmldata)
        finally:
            self.pending -= 1


class ThermoServer(IPyServer):
    """IPyServer as make_server returns it. Against indipyserver 0.0.6:
    closed clients and remote links end cleanly (no CPU spin, no traceback);
    a port that cannot be opened, or an exception in any driver, is recorded
    in self.failure (so that the command line exits non-zero) instead of
    ending silently with status 0; and an idle server sleeps."""

    def __init__(self, *drivers, **kwargs):
        super().__init__(*drivers, **kwargs)
        self.failure = None
        self._broadcasting = None
        self.connectionpool = [_ClientLink(c.con_id, self.xml_data_que, self) for c in self.connectionpool]
        self.client_ids = {c.con_id for c in self.connectionpool}

    def add_remote(self, host, port, blob_enable=False, debug_enable=False):
        "As IPyServer.add_remote, with a link that waits quietly while the remote is down."
        super().add_remote(host, port, blob_enable=blob_enable, debug_enable=debug_enable)
        plain = self.remotes[-1]
        relay = _RelayingRemoteConnection(host=host, port=port, blob_enable=blob_enable,
                                          debug_enable=debug_enable)
        relay._commsobj = plain._commsobj
        relay._commsobj.driver = relay
        self.remotes[-1] = relay

    async def handle_data(self, reader, writer):
        connection = next((c for c in self.connectionpool if not c.connected), None)
        try:
            if connection is None:
                # indipyserver 0.0.6 closes the connection without a word
                logger.warning("refused a client: all %d connections are in use", self.maxconnections)
                writer.write(ET.tostring(server_message(
                    f"This server is full ({self.maxconnections} clients); try again later")))
                await writer.drain()
            else:
                await connection.handle_data(reader, writer)
        except ConnectionError:
            pass    # a client that reset the connection; indipyserver lets it escape as a traceback
        finally:
            writer.close()

    def refusal(self, element):
        """Why an element from a client is not passed on, or None. A client
        asks (getProperties, new*Vector); it does not speak for a device
        served here (def*, set*, delProperty, message), which in indipyserver
        0.0.6 lets any client spoof the thermostat to every other client, or
        shut the whole server down with a definition of its device."""
        tag, device = element.tag, element.get("device")
        if tag not in INDI_TAGS:
            return f"<{tag}> is not an INDI element"
        if tag.startswith("new"):
            known = set(self.devices).union(*(r.devicenames for r in self.remotes),
                                            *(d.devicenames for d in self.exdrivers))
            if device not in known:
                return f"<{tag}> for {device!r}, a device not served here"
        elif tag != "getProperties" and (device is None or device in self.devices):
            return f"<{tag}> for {device or 'every device'}, which only a device may send"
        return None

    async def _broadcast(self):
        """IPyServer._broadcast, waiting for data or the keepalive instead of
        waking every 0.5 s to look at a clock (0.05 CPU-s a minute, most of
        an idle server's CPU). Every element from a client, driver or remote
        goes to every driver, remote and client, as there; the keepalive
        message goes out after keepalive seconds without one, a BLOB not
        counting."""
        loop = asyncio.get_running_loop()
        keepalive_at = loop.time() + self.keepalive
        try:
            while not self._stop:
                try:
                    async with asyncio.timeout_at(keepalive_at if self.keepalive else None):
                        con_id, xmldata = await self.xml_data_que.get()
                except TimeoutError:
                    self._send_keepalive()
                    keepalive_at = loop.time() + self.keepalive
                    continue
                self.xml_data_que.task_done()
                if xmldata.tag != "setBLOBVector":
                    keepalive_at = loop.time() + self.keepalive
                for link in (*self.drivers, *self.exdrivers, *self.remotes):
                    self._tg.create_task(link._commsobj.driver_rx(con_id, xmldata))
                for client in self.connectionpool:
                    self._tg.create_task(client._client_tx(con_id, xmldata))
        finally:
            self.shutdown()

    def shutdown(self, shutdownmessage=""):
        super().shutdown(shutdownmessage)
        if self._broadcasting is not None:
            self._broadcasting.cancel()     # it waits for data, not on a timer that would see _stop

    async def _runserver(self):
        try:
            self.server = await asyncio.get_running_loop().create_server(
                lambda: _ClientProtocol(self.handle_data), self.host, self.port)
        except OSError as exc:
            self.failure = f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            self.shutdown()
            return
        if self._stop:                  # stopped while the port was being opened
            self.server.close()
            return
        devices = ", ".join(self.devices) or "no devices"
        logger.info("serving %s on %s:%s (Ctrl-C stops)", devices, self.host, self.port)
        try:
            async with self.server:
                await self.server.serve_forever()
        finally:
            self.shutdown()

    async def asyncrun(self):
        # IPyServer.asyncrun logs an exception and returns as if all were well; keep it instead.
        self._stop = False
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tg = tasks
                for runner in (*self.drivers, *self.exdrivers, *self.remotes):
                    tasks.create_task(runner.asyncrun())
                tasks.create_task(self._runserver())
                self._broadcasting = tasks.create_task(self._broadcast())
        except Exception as exc:
            logger.exception("the server stopped on an error")
            self.failure = f"the server stopped on an error: {exc!r}"
        finally:
            self.shutdown()


if __name__ == "__main__":
    run_command()
