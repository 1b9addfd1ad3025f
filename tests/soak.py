"""Soak: a simulated week of 10-second polls, accelerated, against a served thermostat.

    python tests/soak.py                 # 60480 polls (7 days), about a minute
    python tests/soak.py --days 1        # a quicker look

A child process serves one thermostat with make_server, polling every
--poll-interval seconds (1 ms) with a log period of 30 poll intervals, as 300 s is to
10 s, and writing every log file to a temporary --log-dir. This process is
its client: it switches logging on, reads every update and log file, and
samples the child's resident memory. At the end it checks that

- resident memory after warm-up (the first tenth of the run) grew by no more
  than --max-growth MiB;
- the log files hold every reading exactly once, in order: timestamps strictly
  increase, and every live reading received from the first row logged on is
  a row, in the same order (a missing or repeated reading cannot); the
  driver may drop a live update when behind (at most 10% here), never a row;
- the simulated box (10 simulated seconds on at each read, so a week
  passes) is regulated: after warm-up the mean reading is within the
  hysteresis band around the target, and every reading within it give or
  take one 10 s poll's move (0.2 K);
- every live reading received is in the logs, and every file received over
  INDI is byte for byte one of the files on disk.

It prints the figures and exits 1 if a check fails. Not collected by pytest.
"""

import argparse
import asyncio
import base64
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import thermostat  # noqa: E402
from conftest import free_port, rss_mib, wait_for_port  # noqa: E402

SIMULATED_POLL = 10.0         # the default poll interval a real week would use
POLLS_PER_FILE = 300 / 10     # the default log period, in polls
TARGET = 15.0                 # the default target
STEP = 0.25                   # the default box's move in a 10 s poll near the target (0.2 K), and rounding


class WeekBox(thermostat.Simulator):
    "The default heated box, 10 simulated seconds on at each read: a poll's worth, however late it is."

    def __init__(self):
        super().__init__(clock=None)
        self.advance(0.0)

    def read(self):
        self.advance(self.now_s + SIMULATED_POLL)
        return super().read()


def serve(port, log_dir, poll_interval):
    thermostat.configure_logging(verbose=False)
    thermostat.logger.setLevel("WARNING")      # not a line per file sent: a week has 2016
    box = WeekBox()
    driver = thermostat.make_driver(poll_interval=poll_interval, log_period=poll_interval * POLLS_PER_FILE,
                                    log_dir=log_dir, config=None, sensor=box)
    return asyncio.run(thermostat.serve_until_stopped(thermostat.make_server(driver, port=port)))


class Client:
    "Keeps what the checks need, not the elements: a week of them would swamp this process."

    def __init__(self):
        self.readings = []          # (timestamp, temperature text) of each live update
        self.files = []             # contents of each log file received
        self.rows_received = 0      # rows in those files
        self.elements = 0

    async def run(self, port, stop):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b'<getProperties version="1.7"/><enableBLOB device="Thermostat">Also</enableBLOB>'
                     b'<newSwitchVector device="Thermostat" name="switchvector">'
                     b'<oneSwitch name="switchmember">On</oneSwitch></newSwitchVector>')
        stream = thermostat._IndiStream(max_bytes=1 << 30)
        while not stop.is_set() and (data := await reader.read(1 << 16)):
            for element in stream.feed(data):
                self.elements += 1
                if element.tag == "setNumberVector" and element.get("name") == "temperaturevector":
                    self.readings.append((element.get("timestamp"), element[0].text.strip()))
                elif element.tag == "setBLOBVector":
                    self.files.append(base64.b64decode(element[0].text))
                    self.rows_received += self.files[-1].count(b"\n") - 1
        writer.close()


async def soak(port, child_pid, polls, poll_interval):
    "Run until the files received hold polls rows (or five times the time that should take)."
    client, stop = Client(), asyncio.Event()
    reading = asyncio.create_task(client.run(port, stop))
    samples = []                # (seconds since start, live readings so far, RSS MiB)
    started = time.monotonic()
    time_limit = polls * poll_interval * 5 + 30
    while client.rows_received < polls and time.monotonic() - started < time_limit and not reading.done():
        await asyncio.sleep(1.0)
        samples.append((time.monotonic() - started, len(client.readings), rss_mib(child_pid)))
        if len(samples) % 10 == 0:
            print(f"{samples[-1][0]:6.0f} s  {client.rows_received:6d} rows logged  "
                  f"{samples[-1][2]:5.1f} MiB RSS", flush=True)
    stop.set()
    await asyncio.wait_for(reading, 5)
    return client, samples


def logged_rows(log_dir):
    rows = []
    for path in sorted(log_dir.glob("*.csv")):
        header, *lines = path.read_text().splitlines()
        assert header == "timestamp,temperature", f"{path.name}: header {header!r}"
        rows += [tuple(line.split(",")) for line in lines]
    return rows


def check(client, samples, log_dir, max_growth):
    "Return a list of (check, passed, detail)."
    rows = logged_rows(log_dir)
    timestamps = [t for t, _ in rows]
    logged = set(rows)
    # live readings from the first logged one on: those queued before logging began are not logged
    live = [r for r in client.readings if rows and r[0] >= rows[0][0]]
    # no gaps: from the first row to the last reading this client received (the child logs on
    # after it stops reading), every live reading is a row, in the same order; a row not seen
    # live is one the driver logged but did not send, its update loop behind (ThermoDriver.offer)
    last_live = live[-1][0] if live else ""
    rows_seen_live = [r for r in rows if r[0] <= last_live]
    live_logged = [r for r in live if rows and r[0] <= rows[-1][0]]
    live_set = set(live_logged)
    not_sent = len(rows_seen_live) - len(live_logged)
    low, high = TARGET - thermostat.HYSTERESIS, TARGET + thermostat.HYSTERESIS
    settled = [float(t) for _, t in rows[len(rows) // 10:]]
    mean = sum(settled) / max(len(settled), 1)
    near = sum(low - STEP <= t <= high + STEP for t in settled)
    on_disk = {p.read_bytes() for p in log_dir.glob("*.csv")}
    warm = samples[len(samples) // 10][2]
    growth = max(rss for _, _, rss in samples[len(samples) // 10:]) - warm
    return rows, [
        ("readings logged", len(rows) > 0, f"{len(rows)} rows in {len(on_disk)} files, "
                                           f"{len(rows) * SIMULATED_POLL / 86400:.2f} simulated days"),
        ("in order, each once", timestamps == sorted(set(timestamps)), "timestamps strictly increase"),
        ("no gaps", bool(live_logged) and [r for r in rows_seen_live if r in live_set] == live_logged
         and 0 <= not_sent <= len(rows_seen_live) // 10,
         f"{len(rows_seen_live)} rows, {len(live_logged)} live readings over the same time "
         f"({not_sent} logged but not sent live, the driver behind; at most 10% allowed)"),
        ("regulated", bool(settled) and low <= mean <= high and near == len(settled),
         f"after warm-up mean {mean:.2f}, {near} of {len(settled)} readings within {low - STEP:g} to "
         f"{high + STEP:g}, all from {min(settled, default=0):.2f} to {max(settled, default=0):.2f}"),
        ("live readings all logged", all(r in logged for r in live),
         f"{len(live)} live updates received while logging"),
        ("files received = files on disk", all(f in on_disk for f in client.files),
         f"{len(client.files)} files received over INDI"),
        ("memory flat after warm-up", growth <= max_growth,
         f"RSS {samples[0][2]:.1f} MiB at start, {warm:.1f} after warm-up, "
         f"max growth {growth:.1f} MiB (bound {max_growth})"),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=7, help="simulated days of 10 s polls (default 7)")
    parser.add_argument("--poll-interval", type=float, default=0.001, help="real seconds per poll")
    parser.add_argument("--max-growth", type=float, default=4.0, help="MiB of RSS growth allowed")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "LOG_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(int(args.serve[0]), args.serve[1], args.poll_interval)

    import subprocess
    polls = round(args.days * 86400 / SIMULATED_POLL)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), tmp,
                                  "--poll-interval", str(args.poll_interval)])
        try:
            wait_for_port(port, process=child)
            print(f"soak: {polls} polls every {args.poll_interval * 1000:g} ms, "
                  f"a log file every {POLLS_PER_FILE:g} poll intervals")
            client, samples = asyncio.run(soak(port, child.pid, polls, args.poll_interval))
        finally:
            child.terminate()
            child.wait(10)
        rows, results = check(client, samples, log_dir, args.max_growth)
    seconds = samples[-1][0] if samples else 0
    print(f"{len(rows)} polls in {seconds:.0f} s ({len(rows) / max(seconds, 1):.0f} per second); "
          f"child exit status {child.returncode}")
    for name, passed, detail in results:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")
    return 0 if all(passed for _, passed, _ in results) and child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
