"""Benchmark: the thermostat beside libindi's C++ indi_simulator_weather, one client for all.

    python tests/benchmark.py                                   # about three minutes
    python tests/benchmark.py --requests 200 --idle-seconds 10  # a quick look

Four subjects, each in its own processes on a free port:
  plain IPyServer  the thermostat in indipyserver's IPyServer as it is (what our fixes cost)
  ThermoServer     python thermostat.py (indipyserver's IPyServer with this module's fixes)
  indiserver       libindi's indiserver running indi_thermostat (our executable driver)
  C++ weather      libindi's indiserver running indi_simulator_weather (the reference)

Measured, one subject at a time except idle, which runs all side by side:
  round trip     a newNumberVector sent until the driver's setNumberVector arrives
                 (targetvector for the thermostat, WEATHER_CONTROL for the weather
                 simulator), --requests times after a warm-up: p50 and p99;
  start-up       process start to the first complete def*Vector answered, median of 5;
  idle           CPU time and resident memory of each subject's processes (server and
                 driver) over --idle-seconds at the default 10 s poll, one client each;
  fan-out        with 5 clients (--max-connections' default), the highest poll rate at
                 which every client receives every update, the same updates in the same
                 order (the simulation moves 0.2 a poll, so a missed update shows).

Prints a table and writes it to --output (default benchmark-results.md). Not a
test: nothing here asserts a time. Needs indi-bin and `pip install -e .`.
"""

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import thermostat  # noqa: E402
from conftest import cpu_seconds, free_port, rss_mib  # noqa: E402

THERMOSTAT_PY = str(ROOT / "thermostat.py")
CLIENTS = 5                                     # --max-connections' default


@dataclass
class Subject:
    label: str
    command: list               # "{port}" is replaced by the port
    device: str
    vector: str                 # the Number vector the round trip sets
    member: str
    values: tuple               # alternated, so that every request is a change
    connect_first: bool = False  # the weather simulator starts disconnected

    def start(self, port):
        return subprocess.Popen([part.format(port=port) for part in self.command],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


THERMOSTAT_TARGET = dict(device="Thermostat", vector="targetvector", member="target", values=(15.0, 15.1))
THERMOSTAT = Subject("thermostat", [], **THERMOSTAT_TARGET)


# the thermostat in indipyserver's IPyServer as it is, to show what this module's fixes cost
PLAIN_IPYSERVER = ("import asyncio, thermostat, indipyserver; "
                   "asyncio.run(indipyserver.IPyServer(thermostat.make_driver(), port={port}).asyncrun())")


def subjects():
    driver = shutil.which("indi_thermostat")
    if driver is None or shutil.which("indiserver") is None:
        sys.exit("benchmark: needs indiserver (apt-get install indi-bin) and indi_thermostat (pip install -e .)")
    # -u: each indiserver also listens on a local socket, by default one name for all
    indiserver = ["indiserver", "-p", "{port}", "-u", "/tmp/indiserver-{port}"]
    return [
        Subject("plain IPyServer", [sys.executable, "-c", PLAIN_IPYSERVER], **THERMOSTAT_TARGET),
        Subject("ThermoServer", [sys.executable, THERMOSTAT_PY, "--port", "{port}"], **THERMOSTAT_TARGET),
        Subject("indiserver + indi_thermostat", [*indiserver, driver], **THERMOSTAT_TARGET),
        Subject("indiserver + C++ weather", [*indiserver, "indi_simulator_weather"],
                device="Weather Simulator", vector="WEATHER_CONTROL", member="Temperature",
                values=(15.0, 16.0), connect_first=True),
    ]


# -- processes ---------------------------------------------------------------

def process_tree(pid):
    "pid and its descendants (indiserver and its drivers)."
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            try:
                pids += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
        index += 1
    return pids


def tree_cpu_seconds(pid):
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_rss_mib(pid):
    return sum(rss_mib(p) or 0 for p in process_tree(pid))


def stop(process):
    tree = process_tree(process.pid)
    for pid in reversed(tree):
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the one client ------------------------------------------------------------

class Client:
    "A raw INDI client on asyncio, parsing with the thermostat's own stream splitter."

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.socket = writer.get_extra_info("socket")
        self.stream = thermostat._IndiStream(max_bytes=1 << 30)
        self.pending = []

    @classmethod
    async def connect(cls, port, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(*await asyncio.open_connection("127.0.0.1", port))
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.002)

    def send(self, text):
        self.writer.write(text.encode())

    async def element(self):
        while not self.pending:
            data = await self.reader.read(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            # indiserver does not set TCP_NODELAY: a driver that answers with two writes (the weather
            # simulator sends its value, then a message) would see its next answer held by Nagle's
            # algorithm until this side's delayed ACK, 40 ms later. Acknowledge at once instead.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            self.pending = self.stream.feed(data)
        return self.pending.pop(0)

    async def expect(self, match, timeout=10.0):
        async with asyncio.timeout(timeout):
            while not match(element := await self.element()):
                pass
            return element

    async def ready(self, subject):
        "Ask for every property; connect the device if it needs it; wait for the round trip's vector."
        self.send('<getProperties version="1.7"/>')
        if subject.connect_first:           # its other properties are defined once connected
            await self.expect(lambda e: e.tag == "defSwitchVector" and e.get("name") == "CONNECTION")
            self.send(f'<newSwitchVector device="{subject.device}" name="CONNECTION">'
                      f'<oneSwitch name="CONNECT">On</oneSwitch><oneSwitch name="DISCONNECT">Off</oneSwitch>'
                      f'</newSwitchVector>')
        await self.expect(lambda e: e.tag == "defNumberVector" and e.get("name") == subject.vector)

    def close(self):
        self.writer.close()


# -- measurements ----------------------------------------------------------------

async def round_trips(subject, requests, warm_up=50):
    "Seconds from sending each newNumberVector to receiving the setNumberVector that answers it."
    port = free_port()
    process = subject.start(port)
    try:
        client = await Client.connect(port)
        await client.ready(subject)
        times = []
        for i in range(warm_up + requests):
            value = subject.values[i % 2]

            def answer(e):
                # the answer carries the value sent: a periodic update of the vector does not
                return (e.tag == "setNumberVector" and e.get("name") == subject.vector
                        and any(m.get("name") == subject.member and float(m.text) == value for m in e))
            started = time.perf_counter()
            client.send(f'<newNumberVector device="{subject.device}" name="{subject.vector}">'
                        f'<oneNumber name="{subject.member}">{value}</oneNumber></newNumberVector>')
            await client.expect(answer)
            times.append(time.perf_counter() - started)
        client.close()
        return times[warm_up:]
    finally:
        stop(process)


async def start_up(subject, runs=5):
    "Median seconds from process start to the first complete property definition answered."
    times = []
    for _ in range(runs):
        port = free_port()
        started = time.perf_counter()
        process = subject.start(port)
        try:
            client = await Client.connect(port)
            client.send('<getProperties version="1.7"/>')
            await client.expect(lambda e: e.tag.startswith("def"))
            times.append(time.perf_counter() - started)
            client.close()
        finally:
            stop(process)
    return statistics.median(times)


async def idle(subjects, seconds):
    "Per subject: (CPU seconds, over how many seconds, RSS MiB at the end), all running side by side."
    running = [(s, free_port()) for s in subjects]
    processes = [s.start(port) for s, port in running]
    readers = []
    try:
        for (subject, port) in running:
            client = await Client.connect(port)
            await client.ready(subject)
            readers.append(asyncio.create_task(drain(client)))
        await asyncio.sleep(2)                      # let start-up work finish
        before = [tree_cpu_seconds(p.pid) for p in processes]
        started = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started
        return [(tree_cpu_seconds(p.pid) - cpu, elapsed, tree_rss_mib(p.pid)) for p, cpu in zip(processes, before)]
    finally:
        for task in readers:
            task.cancel()
        for process in processes:
            stop(process)


async def drain(client):
    while True:
        await client.element()


async def fan_out(start, rates, seconds=2.0):
    """The highest rate (polls per second) of rates at which CLIENTS clients
    all receive every update, and the rate achieved there."""
    best = (None, None)
    for rate in rates:
        process, port, set_rate = await start(rate)
        try:
            clients = [await Client.connect(port) for _ in range(CLIENTS)]
            for client in clients:
                await client.ready(THERMOSTAT)
            if set_rate is not None:
                await set_rate(clients[0])
            series = [[] for _ in clients]
            tasks = [asyncio.create_task(collect(c, s)) for c, s in zip(clients, series)]
            await asyncio.sleep(seconds)
            for task in tasks:
                task.cancel()
            complete, achieved = every_update_to_every_client(series)
        finally:
            stop(process)
        kept_up = complete and achieved >= 0.95 * rate
        print(f"  {rate:5d} polls/s asked: {achieved:7.1f}/s achieved, "
              f"{'every client got every update' if complete else 'updates missed'}", flush=True)
        if not kept_up:
            break
        best = (rate, achieved)
    return best


async def collect(client, series):
    while True:
        e = await client.element()
        if e.tag == "setNumberVector" and e.get("name") == "temperaturevector":
            series.append((datetime.fromisoformat(e.get("timestamp")), round(float(e[0].text), 2)))


def every_update_to_every_client(series):
    "(all clients saw the same updates, none missed, over the common window; updates per second)."
    if not all(len(s) > 10 for s in series):
        return False, 0.0
    first, last = max(s[0][0] for s in series), min(s[-1][0] for s in series)
    windows = [[r for r in s if first <= r[0] <= last] for s in series]
    steps = {round(abs(b[1] - a[1]), 2) for a, b in zip(windows[0], windows[0][1:])}
    rate = (len(windows[0]) - 1) / max((last - first).total_seconds(), 1e-9)
    return all(w == windows[0] for w in windows) and steps == {0.2}, rate


def fan_out_starters():
    async def thermo_server(rate):
        port = free_port()
        process = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(1 / rate)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return process, port, None

    async def under_indiserver(rate):
        port = free_port()
        process = subprocess.Popen(["indiserver", "-p", str(port), "-u", f"/tmp/indiserver-{port}",
                                    shutil.which("indi_thermostat")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def set_rate(client):
            # indiserver passes drivers no options: the poll interval is set through POLLING_PERIOD
            client.send(f'<newNumberVector device="Thermostat" name="POLLING_PERIOD">'
                        f'<oneNumber name="PERIOD_MS">{1000 / rate:g}</oneNumber></newNumberVector>')
            await client.expect(lambda e: e.tag == "setNumberVector" and e.get("name") == "POLLING_PERIOD")
        return process, port, set_rate
    return thermo_server, under_indiserver


def serve(port, poll_interval):
    "The fan-out subject: a ThermoServer whose poll interval may be below the command line's 10 ms floor."
    thermostat.configure_logging(verbose=False)
    driver = thermostat.make_driver(poll_interval=poll_interval)
    return asyncio.run(thermostat.serve(thermostat.make_server(driver, port=port, max_connections=CLIENTS)))


# -- report --------------------------------------------------------------------------

def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    indi = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "indi-bin"], capture_output=True, text=True)
    from importlib.metadata import version
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"indipydriver {version('indipydriver')}, indipyserver {version('indipyserver')}, "
            f"indi-bin {indi.stdout or '?'}")


def ms(seconds):
    return f"{seconds * 1000:.3f} ms"


async def run(args):
    chosen = subjects()
    rows = {s.label: {} for s in chosen}
    for subject in chosen:
        print(f"{subject.label}: round trip x{args.requests}, start-up x5", flush=True)
        times = sorted(await round_trips(subject, args.requests))
        rows[subject.label]["p50"] = statistics.median(times)
        rows[subject.label]["p99"] = times[min(len(times) - 1, int(len(times) * 0.99))]
        rows[subject.label]["start"] = await start_up(subject)
    print(f"all idle, side by side, for {args.idle_seconds:g} s", flush=True)
    for subject, (cpu, elapsed, rss) in zip(chosen, await idle(chosen, args.idle_seconds)):
        rows[subject.label].update(cpu_s=cpu, cpu=cpu / elapsed * 100, rss=rss)
    thermo_server, under_indiserver = fan_out_starters()
    print(f"fan-out to {CLIENTS} clients", flush=True)
    rows["ThermoServer"]["fan"] = await fan_out(thermo_server, [10, 20, 50, 100, 200, 500, 1000, 2000])
    rows["indiserver + indi_thermostat"]["fan"] = await fan_out(under_indiserver, [10, 20, 50, 100])
    rows["indiserver + C++ weather"]["fan"] = rows["plain IPyServer"]["fan"] = None
    return rows


def report(rows, args):
    reference = rows["indiserver + C++ weather"]

    def ratio(label, key):
        return f" ({rows[label][key] / reference[key]:.1f}x)" if reference[key] else ""

    lines = [f"Benchmark of {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, `python tests/benchmark.py "
             f"--requests {args.requests} --idle-seconds {args.idle_seconds:g}`",
             f"on {machine()}.", "",
             "Ratios in brackets are to libindi's C++ indi_simulator_weather under indiserver.", "",
             "| subject | round trip p50 | round trip p99 | start-up | idle CPU | idle RSS | "
             f"fan-out to {CLIENTS} clients |",
             "|---|---|---|---|---|---|---|"]
    for label, row in rows.items():
        fan = ("n/a" if row["fan"] is None else "none" if row["fan"][0] is None
               else f"{row['fan'][0]} polls/s ({row['fan'][1]:.0f} achieved)")
        lines.append(f"| {label} | {ms(row['p50'])}{ratio(label, 'p50')} | {ms(row['p99'])}{ratio(label, 'p99')} "
                     f"| {ms(row['start'])}{ratio(label, 'start')} | {row['cpu']:.3f}% ({row['cpu_s']:.2f} s) | "
                     f"{row['rss']:.1f} MiB{ratio(label, 'rss')} | {fan} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--requests", type=int, default=1000, help="round trips per subject (default 1000)")
    parser.add_argument("--idle-seconds", type=float, default=60, help="idle measurement (default 60)")
    parser.add_argument("--output", default=str(ROOT / "benchmark-results.md"), help="where to write the table")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(int(args.serve[0]), float(args.serve[1]))
    # The subjects keep their settings in a throwaway file, not in the user's ~/.indi.
    os.environ["INDICONFIG"] = os.path.join(tempfile.mkdtemp(prefix="benchmark-"), "indi_config.xml")
    table = report(asyncio.run(run(args)), args)
    print()
    print(table)
    Path(args.output).write_text(table)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
