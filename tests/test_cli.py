"""The command line, as a person uses it: errors are one line, signals end it cleanly."""

import signal
import subprocess
import sys

import pytest

from conftest import FAST, ROOT, ServerProcess, new_switch, tagged

THERMOSTAT = [sys.executable, str(ROOT / "thermostat.py")]


def run(*options):
    return subprocess.run([*THERMOSTAT, *options], capture_output=True, text=True, timeout=20)


def test_help_explains_every_option():
    result = run("--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--device", "--target", "--poll-interval", "--log-period",
                   "--log-dir", "--max-connections", "--verbose"):
        assert option in result.stdout


@pytest.mark.parametrize("options, words", [
    (["--port", "0"], "outside 1..65535"),
    (["--port", "http"], "is not a int"),
    (["--max-connections", "1001"], "outside 1..1000"),
    (["--max-unread", "0"], "outside 0.01..4096"),
    (["--poll-interval", "0"], "outside"),
    (["--log-period", "-5"], "outside"),
    (["--target", "100"], "outside -50..99"),
    (["--target", "nan"], "outside -50..99"),
    (["--device", ""], "non-empty ASCII"),
    (["--colour", "red"], "unrecognized arguments"),
])
def test_bad_options_are_one_clear_line(options, words):
    result = run(*options)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.stderr


def test_a_port_in_use_is_one_clear_line_and_a_failure():
    server = ServerProcess()
    try:
        result = run("--port", str(server.port))
    finally:
        server.stop()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"thermostat.py: error: cannot listen on localhost:{server.port}: Address already in use"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signals_shut_down_cleanly_within_two_seconds(signum, tmp_path):
    server = ServerProcess(*FAST, "--log-dir", str(tmp_path))
    client = server.client()
    client.send('<getProperties version="1.7"/>')
    client.send(new_switch("Thermostat", "switchvector", "switchmember", "On"))
    client.expect(tagged("setSwitchVector", name="switchvector"))
    client.gather(tagged("setNumberVector", name="temperaturevector"), 3)
    server.process.send_signal(signum)
    assert server.process.wait(timeout=2) == 0
    assert "Traceback" not in server.stderr_text()
    # the partial log file reached the disk on the way out
    (logfile,) = tmp_path.glob("Thermostat-*.csv")
    assert len(logfile.read_text().splitlines()) >= 4
    client.close()
