"""The heater guard under the real command line: `python thermostat.py
--heater command:RECORDER`, where the recorder appends each switch with its
time. Killed with SIGKILL, the driver leaves the heater to its guard, which
switches it off; stopped cleanly or with Ctrl-C, the driver's own off is the
last word and the guard switches nothing."""

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

import thermostat
from conftest import FAST, ROOT, IndiClient, free_port, wait_for_port, wait_until

RECORDER = """#!/bin/sh
# appends "on TIME" or "off TIME" (seconds since the epoch) to heater.log beside it
echo "$1 $(date +%s.%N)" >> "$(dirname "$0")/heater.log"
"""


class Recorder:
    "A heater command that records every switch, with its time, in a folder of its own."

    def __init__(self, folder):
        self.folder = folder
        self.path = folder / "heater"
        self.path.write_text(RECORDER)
        self.path.chmod(0o755)
        self.log = folder / "heater.log"
        self.w1 = folder / "28-0000000000"
        self.w1.mkdir()
        (self.w1 / "temperature").write_text("21500\n")

    def told(self):
        "[(word, time)] of every switch so far."
        if not self.log.exists():
            return []
        return [(word, float(at)) for word, at in
                (line.split() for line in self.log.read_text().splitlines())]

    def words(self):
        return [word for word, _ in self.told()]

    def last_is(self, word, count=0):
        told = self.words()
        return len(told) > count and told[-1] == word


def start(recorder, *options):
    "The command line, heating (target 25 against 21.5): returns once the heater is on."
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "thermostat.py"), "--port", str(port), *FAST,
         "--sensor", f"w1:{recorder.w1}", "--heater", f"command:{recorder.path}",
         "--target", "25", "--no-config", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_port(port, process=process)
    before = len(recorder.words())
    wait_until(lambda: recorder.last_is("on", before), what="the heater on")
    return process, port


def guards_of(pid):
    "The pids of the heater guards whose parent is pid."
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if int(stat[1]) == pid and b"thermostat heater guard" in cmdline:
                found.append(int(entry))
    return found


def gone(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.fixture
def recorder(tmp_path):
    return Recorder(tmp_path)


def test_a_driver_killed_with_sigkill_has_its_heater_switched_off_by_the_guard_within_a_second(
        recorder):
    times = []
    for _ in range(5):
        process, _ = start(recorder)
        (guard,) = guards_of(process.pid)
        count = len(recorder.words())
        killed_at = time.time()
        process.kill()
        process.wait()
        wait_until(lambda count=count: recorder.last_is("off", count), timeout=5,
                   what="the guard's off")
        times.append(recorder.told()[-1][1] - killed_at)
        wait_until(lambda guard=guard: gone(guard), timeout=5, what="the guard's exit")
        assert recorder.words()[count:] == ["off"]  # one off, and never an on
    print(f"heater off after kill -9: {[f'{t:.4f}' for t in times]} s, "
          f"median {statistics.median(times):.4f} s")
    assert max(times) < 2 and statistics.median(times) < 1


def test_a_killed_drivers_command_power_heater_is_given_0_by_the_guard(recorder):
    "A command-power heater's off is `CMD 0`: the guard knows it too."
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "thermostat.py"), "--port", str(port), *FAST,
         "--sensor", f"w1:{recorder.w1}", "--heater", f"command-power:{recorder.path}",
         "--target", "25", "--no-config"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_port(port, process=process)
    wait_until(lambda: recorder.last_is("100"), what="full power, far below the target")
    (guard,) = guards_of(process.pid)
    count = len(recorder.words())
    process.kill()
    process.wait()
    wait_until(lambda: recorder.last_is("0", count), timeout=5, what="the guard's 0")
    wait_until(lambda: gone(guard), timeout=5, what="the guard's exit")
    assert recorder.words()[count:] == ["0"]


def test_a_clean_stop_switches_the_heater_off_once_and_the_guard_exits_switching_nothing(
        recorder):
    process, _ = start(recorder)
    (guard,) = guards_of(process.pid)
    count = len(recorder.words())
    process.terminate()
    assert process.wait(timeout=10) == 0
    wait_until(lambda: gone(guard), timeout=5, what="the guard's exit")
    time.sleep(0.3)  # room for a second off, which must not come
    assert recorder.words()[count:] == ["off"]


def test_ctrl_c_to_the_process_group_leaves_the_guard_standing_and_the_driver_switches_off(
        recorder):
    process, _ = start(recorder)
    (guard,) = guards_of(process.pid)
    count = len(recorder.words())
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    assert process.wait(timeout=10) == 0
    wait_until(lambda: gone(guard), timeout=5, what="the guard's exit")
    time.sleep(0.3)
    assert recorder.words()[count:] == ["off"]  # the driver's, once


def test_a_dead_guard_is_an_alert_that_holds_the_heater_off(recorder):
    process, port = start(recorder)
    try:
        (guard,) = guards_of(process.pid)
        client = IndiClient(port)
        client.send('<getProperties version="1.7"/>')
        count = len(recorder.words())
        os.kill(guard, signal.SIGKILL)
        heater = client.expect(lambda e: e.get("name") == "heatervector" and "guard" in
                               (e.get("message") or ""), what="the guard's problem said")
        assert "killed by SIGKILL" in heater.get("message")
        alert = client.expect(
            lambda e: e.get("name") == "SAFETY_STATUS" and e.tag.startswith("set")
            and any(one.get("name") == "HEATER" and one.text.strip() == "Alert" for one in e),
            what="SAFETY_STATUS HEATER Alert")
        assert alert.get("state") == "Alert"
        wait_until(lambda: recorder.last_is("off", count), what="the heater off")
        time.sleep(0.3)  # polls every 50 ms: none switches it on again
        assert recorder.words()[count:] == ["off"]
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert "heater guard was killed by SIGKILL" in process.stderr.read()


FAKE_GPIOD = {
    "gpiod/__init__.py": '''
"A stand-in for libgpiod 2's bindings: the line is busy while $FAKE_GPIOD_HOLDER runs."
import os
from .line import Direction, Value


def holder_runs():
    try:
        stat = open(f"/proc/{os.environ['FAKE_GPIOD_HOLDER']}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class LineSettings:
    def __init__(self, direction=None, active_low=False, output_value=None):
        self.direction, self.active_low, self.output_value = direction, active_low, output_value


class Request:
    def set_value(self, line, value):
        pass


def request_lines(path, consumer=None, config=None):
    if holder_runs():
        raise OSError(16, "Device or resource busy")
    return Request()


class Info:
    consumer = "thermostat-guard-" + os.environ["FAKE_GPIOD_HOLDER"]


class Chip:
    def __init__(self, path):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass

    def get_line_info(self, line):
        return Info()
''',
    "gpiod/line.py": '''
import enum


class Direction(enum.Enum):
    AS_IS, INPUT, OUTPUT = 1, 2, 3


class Value(enum.Enum):
    INACTIVE, ACTIVE = 0, 1
''',
}


@pytest.fixture
def fake_gpiod(tmp_path, monkeypatch):
    "Import the stand-in gpiod; yields a function that names the process holding the line."
    for name, text in FAKE_GPIOD.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield lambda pid: monkeypatch.setenv("FAKE_GPIOD_HOLDER", str(pid))
    for name in ("gpiod", "gpiod.line"):
        sys.modules.pop(name, None)


def test_a_gpio_line_held_off_by_a_dead_drivers_guard_is_taken_over(tmp_path, fake_gpiod):
    # a guard left holding the line (it does until SIGTERM), as its cmdline marks it
    lingering = subprocess.Popen(
        [sys.executable, "-c", thermostat.GUARD_MARK + "\nimport time\ntime.sleep(60)"])
    try:
        fake_gpiod(lingering.pid)
        heater = thermostat.GpioHeater(str(tmp_path / "gpiochip0"), "17", active_low=True)
        assert lingering.wait(timeout=5) == -signal.SIGTERM
        heater.switch(False)
    finally:
        lingering.kill()
        lingering.wait()


def test_a_gpio_line_busy_for_another_reason_is_a_clear_error(tmp_path, fake_gpiod):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake_gpiod(other.pid)
        with pytest.raises(RuntimeError, match="Device or resource busy"):
            thermostat.GpioHeater(str(tmp_path / "gpiochip0"), "17")
        assert other.poll() is None  # not a guard: left alone
    finally:
        other.kill()
        other.wait()


def test_a_guard_killed_by_a_real_time_signal_is_a_problem_said_not_an_error():
    """A guard ended by a signal that signal.Signals has no name for (SIGRTMIN+6,
    say): problem() says so, where it raised ValueError out of every poll (and the
    heater, if on, was left on with no guard)."""
    from types import SimpleNamespace

    guard = thermostat.HeaterGuard(["command", "true"])
    guard.process = SimpleNamespace(pid=12345, poll=lambda: -40)
    problem = guard.problem()
    assert problem and "killed by signal 40" in problem
