"""Benchmark: the thermostat beside libindi's C++ indi_simulator_weather, interleaved in one run.

    python tests/benchmark.py                                       # about seven minutes
    python tests/benchmark.py --cycles 3 --idle-seconds 10 --fan-seconds 1 --fan-repeats 1   # a quick look

Three subjects, each in its own processes on a free port, all measured in the same run:
  ThermoServer                  python thermostat.py (this module's server)
  indiserver + indi_thermostat  libindi's indiserver running our executable driver
  indiserver + C++ weather      libindi's indiserver running indi_simulator_weather (the reference)

The client is tests/indiclient.c, built here with the C compiler (a plain Python
client on raw sockets if there is none): it adds little to what it measures.

  round trip   a newNumberVector sent until the setNumberVector carrying its value
               arrives (targetvector for the thermostat, WEATHER_CONTROL for the
               weather simulator). --cycles cycles; in each, every subject in turn
               (the order rotating) does --requests round trips after a warm-up.
               p50 and p99 of all, and the ratio to the reference's p50 in each cycle
               (median, and lowest to highest);
  start-up     process start to the first definition answered, median of --startups,
               subjects interleaved;
  idle         CPU time and resident memory of each subject's processes (server and
               driver), all side by side over --idle-seconds at the default poll
               (10 s; the weather simulator's 60 s), one client each;
  fan-out      1, 10 and 100 clients (--clients) of one vector at 100 updates/s
               (--rate): updates each client received in --fan-seconds, whether every
               client received the same updates (all counts equal within one), the
               server's CPU, and its CPU per update delivered to one client. Each
               client count is run --fan-repeats times per subject, the subjects
               interleaved (the order rotating), and the median reported with the
               lowest and highest: on a shared or virtual machine a single run can
               swing by tens of percent, the reference's too. The ratio is paired
               like the round trips': each run's CPU to the reference's run of the
               same repeat, next to it in time, the median of these with the lowest
               and highest. CPU time is read in
               nanoseconds (/proc/PID/task/*/schedstat) where the kernel has it;
  wake-ups     the floor under every poll: the CPU of a process that only wakes --rate
               times a second, in Python on the event loop thermostat.py runs (uvloop
               where installed) and in C (the C client's tick mode), --fan-repeats
               times each, interleaved, the median reported.

Prints the tables and writes them to --output (default benchmark-results.md). Not a
test: nothing here asserts a time. Needs indi-bin and `pip install -e .`.
"""

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conftest import cpu_seconds, free_port, rss_mib  # noqa: E402

THERMOSTAT_PY = str(ROOT / "thermostat.py")
WEATHER = "Weather Simulator"
CONNECT = (f'<newSwitchVector device="{WEATHER}" name="CONNECTION"><oneSwitch name="CONNECT">On</oneSwitch>'
           f'<oneSwitch name="DISCONNECT">Off</oneSwitch></newSwitchVector>')


def ask(device, vector=None):
    return f'<getProperties version="1.7" device="{device}"' + (f' name="{vector}"/>' if vector else "/>")


def new_number(device, vector, member, value):
    return (f'<newNumberVector device="{device}" name="{vector}"><oneNumber name="{member}">{value}</oneNumber>'
            f'</newNumberVector>')


@dataclass
class Subject:
    label: str
    command: list               # "{port}" is replaced by the port
    device: str
    vector: str                 # the Number vector the round trip sets
    member: str
    values: tuple               # alternated, so that every request is a change
    answers: tuple              # the values as the answer carries them
    ask: str                    # the round trip client's getProperties
    setup: str = ""             # sent once the device has defined CONNECTION
    fan_vector: str = "temperaturevector"
    fan_setup: str = ""         # what makes it send fan_vector --rate times a second
    rows: dict = field(default_factory=dict)

    def start(self, port, *extra):
        return subprocess.Popen([part.format(port=port) for part in self.command] + list(extra),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)


def subjects(rate):
    driver = shutil.which("indi_thermostat")
    if driver is None or shutil.which("indiserver") is None:
        sys.exit("benchmark: needs indiserver (apt-get install indi-bin) and indi_thermostat (pip install -e .)")
    # -u: each indiserver also listens on a local socket, by default one name for all
    indiserver = ["indiserver", "-p", "{port}", "-u", "/tmp/indiserver-benchmark-{port}"]
    thermostat = dict(device="Thermostat", vector="targetvector", member="target", values=("15", "15.1"),
                      answers=("15.00", "15.10"), ask=ask("Thermostat", "targetvector"))
    return [
        Subject("ThermoServer", [sys.executable, THERMOSTAT_PY, "--port", "{port}", "--max-connections", "1000"],
                **thermostat),
        Subject("indiserver + indi_thermostat", [*indiserver, driver], **thermostat,
                fan_setup=new_number("Thermostat", "POLLING_PERIOD", "PERIOD_MS", f"{1000 / rate:g}")),
        Subject("indiserver + C++ weather", [*indiserver, "indi_simulator_weather"], device=WEATHER,
                vector="WEATHER_CONTROL", member="Temperature", values=("15", "16"), answers=("15", "16"),
                ask=ask(WEATHER), setup=CONNECT, fan_vector="WEATHER_PARAMETERS",
                fan_setup=CONNECT + new_number(WEATHER, "WEATHER_UPDATE", "PERIOD", f"{1 / rate:g}")),
    ]


REFERENCE = "indiserver + C++ weather"


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


def process_cpu_seconds(pid):
    """CPU time of a process: from its threads' schedstat, in nanoseconds, where the
    kernel keeps it (clock ticks, the fallback, are 10 ms apart)."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        return cpu_seconds(pid)


def tree_cpu_seconds(pid):
    total = 0.0
    for p in process_tree(pid):
        try:
            total += process_cpu_seconds(p)
        except OSError:
            pass
    return total


def tree_rss_mib(pid):
    total = 0.0
    for p in process_tree(pid):
        try:
            total += rss_mib(p) or 0
        except OSError:
            pass
    return total


def stop(process):
    for pid in reversed(process_tree(process.pid)):
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


# -- the client ------------------------------------------------------------------

def build_client():
    "The C client's command, built in a temporary folder; None without a C compiler."
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None
    folder = tempfile.mkdtemp(prefix="indiclient-")
    executable = os.path.join(folder, "indiclient")
    subprocess.run([compiler, "-O2", "-o", executable, str(Path(__file__).with_name("indiclient.c")), "-lm"],
                   check=True)
    return [executable]


CLIENT = None       # set in main: the C client, or this script as a Python one


def client(*arguments, timeout=120):
    return subprocess.run([*CLIENT, *map(str, arguments)], capture_output=True, text=True, timeout=timeout,
                          check=True).stdout.split("\n")


class PythonClient:
    "The C client's two modes on raw sockets, for a machine without a compiler (it adds more)."

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def fill(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self.buffer += data

    def wait_for(self, tag, needle, text=None):
        opening, closing = f"<{tag}".encode(), f"</{tag}>".encode()
        while True:
            start = self.buffer.find(opening)
            end = self.buffer.find(closing, start) if start >= 0 else -1
            if end < 0:
                self.fill()
                continue
            end += len(closing)
            element, self.buffer = self.buffer[start:end], self.buffer[end:]
            if needle.encode() in element and (text is None or any(
                    part.split(b"<")[0].strip() == text.encode() for part in element.split(b">")[1:])):
                return

    def setup(self, ask_text, setup_text, vector):
        self.sock.sendall(ask_text.encode())
        if setup_text:
            self.wait_for("defSwitchVector", 'name="CONNECTION"')
            self.sock.sendall(setup_text.encode())
        self.wait_for("defNumberVector", f'name="{vector}"')


def python_client(argv):
    mode, port, ask_text, setup_text, device, vector = argv[:6]
    if mode == "rtt":
        member, value0, value1, expect0, expect1, warm_up, count = argv[6:]
        peer = PythonClient(int(port))
        peer.setup(ask_text, setup_text, vector)
        times = []
        for i in range(int(warm_up) + int(count)):
            started = time.perf_counter()
            peer.sock.sendall(new_number(device, vector, member, (value0, value1)[i % 2]).encode())
            peer.wait_for("setNumberVector", f'name="{vector}"', (expect0, expect1)[i % 2])
            times.append(time.perf_counter() - started)
        print("\n".join(f"{t * 1e9:.0f}" for t in times[int(warm_up):]))
        return 0
    clients, warm_up, seconds = int(argv[6]), float(argv[7]), float(argv[8])
    import selectors
    peers = []
    for i in range(clients):
        peer = PythonClient(int(port))
        peer.setup(ask_text if i == 0 else ask(device, vector), setup_text if i == 0 else "", vector)
        peer.sock.setblocking(False)
        peer.count = peer.gaps = 0
        peer.last = None
        peers.append(peer)
    selector = selectors.DefaultSelector()
    for peer in peers:
        selector.register(peer.sock, selectors.EVENT_READ, peer)
    pattern = f'<setNumberVector device="{device}" name="{vector}"'.encode()
    counting_from = time.monotonic() + warm_up
    until, counting = counting_from + seconds, False
    while (now := time.monotonic()) < until:
        if not counting and now >= counting_from:
            counting = True
            print("counting", flush=True)
        for key, _ in selector.select(0.1):
            peer = key.data
            peer.fill()
            while (start := peer.buffer.find(pattern)) >= 0 and (end := peer.buffer.find(
                    b"</setNumberVector>", start)) >= 0:
                element, peer.buffer = peer.buffer[start:end], peer.buffer[end:]
                if counting:
                    peer.count += 1
                    at = element.find(b'name="temperature">')
                    if at >= 0:
                        temperature = float(element[at + 19:].split(b"<")[0])
                        if peer.last is not None and abs(abs(temperature - peer.last) - 0.2) > 0.01:
                            peer.gaps += 1
                        peer.last = temperature
    print("done")
    print("\n".join(f"{peer.count} {peer.gaps}" for peer in peers))
    return 0


# -- measurements ----------------------------------------------------------------

def round_trips(subject, port, requests, warm_up=50):
    "Seconds from sending each newNumberVector to receiving the setNumberVector that answers it."
    lines = client("rtt", port, subject.ask, subject.setup, subject.device, subject.vector, subject.member,
                   *subject.values, *subject.answers, warm_up, requests)
    return [int(line) / 1e9 for line in lines if line]


def start_up(subject):
    "Seconds from process start to the first complete property definition answered."
    port = free_port()
    started = time.perf_counter()
    process = subject.start(port)
    try:
        wait_for_port(port)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(ask(subject.device).encode())
            received = b""
            while b"</def" not in received:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError(f"{subject.label} closed the connection")
                received += data
        return time.perf_counter() - started
    finally:
        stop(process)


def fan_out(subject, port, process, clients, seconds, warm_up=1.0):
    """(updates per client per second, every client got every update, server CPU share,
    server CPU microseconds per update delivered to one client)."""
    command = [*CLIENT, "fan", str(port), ask(subject.device) if subject.fan_setup else ask(
        subject.device, subject.fan_vector), subject.fan_setup, subject.device, subject.fan_vector,
        str(clients), str(warm_up), str(seconds)]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "counting", f"{subject.label}: fan-out client failed"
    cpu_before, started = tree_cpu_seconds(process.pid), time.monotonic()
    assert reader.stdout.readline().strip() == "done"
    cpu, elapsed = tree_cpu_seconds(process.pid) - cpu_before, time.monotonic() - started
    results = [tuple(map(int, line.split())) for line in reader.stdout.read().split("\n") if line]
    reader.wait(10)
    counts = [count for count, _ in results]
    delivered = sum(counts)
    # every client got the same updates (the physical simulator's steps vary: a gap no longer
    # shows in the temperature, and the updates a second say whether a poll was missed)
    every = min(counts) >= max(counts) - 1 and min(counts) > 0
    return (statistics.mean(counts) / seconds, every, cpu / elapsed * 100,
            cpu / delivered * 1e6 if delivered else float("nan"))


def run(args, chosen):
    servers = [(s, free_port()) for s in chosen]
    processes = [s.start(port) for s, port in servers]
    try:
        for port in (port for _, port in servers):
            wait_for_port(port)
        print(f"round trips: {args.cycles} cycles of {args.requests} per subject, interleaved", flush=True)
        times = {s.label: [] for s in chosen}
        ratios = {s.label: [] for s in chosen}
        for cycle in range(args.cycles):
            p50 = {}
            order = servers[cycle % len(servers):] + servers[:cycle % len(servers)]
            for subject, port in order:
                measured = round_trips(subject, port, args.requests)
                times[subject.label] += measured
                p50[subject.label] = statistics.median(measured)
            for label in p50:
                ratios[label].append(p50[label] / p50[REFERENCE])
            cycle_p50s = ", ".join(f"{label} {p50[label] * 1e3:.3f} ms" for label in p50)
            print(f"  cycle {cycle + 1}: {cycle_p50s}", flush=True)
        for subject in chosen:
            ordered = sorted(times[subject.label])
            subject.rows.update(p50=statistics.median(ordered), p99=ordered[int(len(ordered) * 0.99) - 1],
                                ratios=ratios[subject.label])

        print(f"idle, side by side, for {args.idle_seconds:g} s", flush=True)
        idlers = [subprocess.Popen([*CLIENT, "fan", str(port), ask(s.device), s.setup, s.device,
                                    s.fan_vector, "1", "2", str(args.idle_seconds)], stdout=subprocess.PIPE,
                                   text=True) for s, port in servers]
        for idler in idlers:
            assert idler.stdout.readline().strip() == "counting"
        before, started = [tree_cpu_seconds(p.pid) for p in processes], time.monotonic()
        for idler in idlers:
            idler.stdout.readline()
        elapsed = time.monotonic() - started
        for (subject, _), process, cpu in zip(servers, processes, before, strict=False):
            used = tree_cpu_seconds(process.pid) - cpu
            subject.rows.update(cpu_s=used, cpu=used / elapsed * 100, rss=tree_rss_mib(process.pid))
        for idler in idlers:
            idler.communicate(timeout=10)
    finally:
        for process in processes:
            stop(process)

    print(f"start-up x{args.startups}, interleaved", flush=True)
    starts = {s.label: [] for s in chosen}
    for _ in range(args.startups):
        for subject in chosen:
            starts[subject.label].append(start_up(subject))
    for subject in chosen:
        subject.rows["start"] = statistics.median(starts[subject.label])

    print(f"fan-out at {args.rate} updates/s, {args.fan_seconds:g} s each, {args.fan_repeats} times interleaved",
          flush=True)
    for subject in chosen:
        subject.rows["fan"] = {}
    for clients in args.clients:
        runs = {subject.label: [] for subject in chosen}
        for repeat in range(args.fan_repeats):
            for subject in chosen[repeat % len(chosen):] + chosen[:repeat % len(chosen)]:
                port = free_port()
                extra = ["--poll-interval", f"{1 / args.rate:g}"] if subject.label == "ThermoServer" else []
                process = subject.start(port, *extra)
                try:
                    wait_for_port(port)
                    result = fan_out(subject, port, process, clients, args.fan_seconds)
                finally:
                    stop(process)
                runs[subject.label].append(result)
                print(f"  {subject.label}, {clients} clients: {result[0]:.1f} updates/s each, "
                      f"{'every update to every client' if result[1] else 'UPDATES MISSED'}, "
                      f"CPU {result[2]:.2f}%, {result[3]:.1f} us per update delivered", flush=True)
        reference_cpus = [cpu for _, _, cpu, _ in runs[REFERENCE]]
        for subject in chosen:
            results = runs[subject.label]
            cpus = [cpu for _, _, cpu, _ in results]
            subject.rows["fan"][clients] = dict(
                rate=statistics.median(rate for rate, _, _, _ in results), every=all(e for _, e, _, _ in results),
                cpu=statistics.median(cpus), low=min(cpus), high=max(cpus),
                ratios=[cpu / reference for cpu, reference in zip(cpus, reference_cpus, strict=False)],
                cost=statistics.median(cost for _, _, _, cost in results))


PYTHON_WAKER = f"""
import asyncio, sys, time
sys.path.insert(0, {str(ROOT)!r})
import thermostat
async def wake(rate, seconds):
    loop = asyncio.get_running_loop()
    next_wake = loop.time()
    for _ in range(int(rate * seconds)):
        next_wake += 1 / rate
        await asyncio.sleep(next_wake - loop.time())
thermostat.run_event_loop(wake(float(sys.argv[1]), float(sys.argv[2])))
"""


def wake_ups(command, seconds, warm_up=1.0):
    "CPU share of a process that only wakes up, measured after warm_up seconds (its start)."
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        time.sleep(warm_up)
        before, started = process_cpu_seconds(process.pid), time.monotonic()
        time.sleep(seconds)
        return (process_cpu_seconds(process.pid) - before) / (time.monotonic() - started) * 100
    finally:
        stop(process)


def run_wake_ups(args):
    wakers = {"Python (thermostat.py's event loop)": [sys.executable, "-c", PYTHON_WAKER]}
    if CLIENT[0].endswith("indiclient"):
        wakers["C (clock_nanosleep)"] = [CLIENT[0], "tick"]
    print(f"wake-ups at {args.rate}/s, {args.fan_repeats} times interleaved", flush=True)
    runs = {label: [] for label in wakers}
    for _ in range(args.fan_repeats):
        for label, command in wakers.items():
            runs[label].append(wake_ups([*command, str(args.rate), str(args.fan_seconds + 3)], args.fan_seconds))
            print(f"  {label}: CPU {runs[label][-1]:.2f}%", flush=True)
    return {label: statistics.median(cpus) for label, cpus in runs.items()}


# -- report --------------------------------------------------------------------------

def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    indi = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "indi-bin"], capture_output=True, text=True)
    from importlib.metadata import version

    def installed(name):
        try:
            return version(name)
        except Exception:
            return "absent"
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
            f"indipydriver {installed('indipydriver')}, indipyserver {installed('indipyserver')}, "
            f"uvloop {installed('uvloop')}, indi-bin {indi.stdout or '?'}")


def ms(seconds):
    return f"{seconds * 1000:.3f} ms"


def spread(ratios):
    "The median of paired ratios, with the lowest and highest."
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def report(chosen, args):
    reference = next(s for s in chosen if s.label == REFERENCE).rows
    client_kind = "C client" if CLIENT[0].endswith("indiclient") else "Python client (no C compiler)"
    lines = [f"Benchmark of {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, `python tests/benchmark.py "
             f"--cycles {args.cycles} --requests {args.requests} --idle-seconds {args.idle_seconds:g} "
             f"--fan-seconds {args.fan_seconds:g} --fan-repeats {args.fan_repeats}`, {client_kind},",
             f"on {machine()}.", "",
             f"Ratios are to libindi's C++ indi_simulator_weather under indiserver: for round trips, "
             f"the median of the {args.cycles} cycles' ratios of p50, with the lowest and highest.", "",
             "| subject | round trip p50 | p99 | ratio per cycle | start-up | idle CPU | idle RSS |",
             "|---|---|---|---|---|---|---|"]
    for subject in chosen:
        row = subject.rows
        lines.append(f"| {subject.label} | {ms(row['p50'])} | {ms(row['p99'])} | {spread(row['ratios'])} "
                     f"| {ms(row['start'])} ({row['start'] / reference['start']:.1f}x) "
                     f"| {row['cpu']:.3f}% ({row['cpu_s']:.2f} s) | {row['rss']:.1f} MiB |")
    lines += ["", f"Fan-out: clients of one vector at {args.rate} updates/s, {args.fan_seconds:g} s a run, "
              f"{args.fan_repeats} runs a subject, interleaved; server CPU (server and driver processes): "
              "the median of the runs with the lowest and highest; the median of its runs' ratios to the "
              "reference's run of the same repeat, with the lowest and highest; and that CPU per update "
              "delivered to one client (median).", "",
              "| subject | clients | updates/s each | every update to every client | server CPU (runs) "
              "| ratio per run | per update delivered |",
              "|---|---|---|---|---|---|---|"]
    for clients in args.clients:
        for subject in chosen:
            fan = subject.rows["fan"][clients]
            lines.append(f"| {subject.label} | {clients} | {fan['rate']:.1f} | {'yes' if fan['every'] else 'NO'} "
                         f"| {fan['cpu']:.2f}% ({fan['low']:.2f}-{fan['high']:.2f}) "
                         f"| {spread(fan['ratios'])} "
                         f"| {fan['cost']:.1f} us |")
    lines += ["", f"Wake-ups: a process that only wakes {args.rate} times a second, the floor under a poll "
              f"(median of {args.fan_repeats} runs of {args.fan_seconds:g} s, interleaved).", "",
              "| process | CPU | per wake-up |", "|---|---|---|"]
    for label, cpu in args.wake_ups.items():
        lines.append(f"| {label} | {cpu:.2f}% | {cpu / 100 / args.rate * 1e6:.1f} us |")
    return "\n".join(lines) + "\n"


def main():
    global CLIENT
    if sys.argv[1:2] in (["rtt"], ["fan"]):
        return python_client(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--cycles", type=int, default=15,
                        help="round-trip cycles (default 15: on a virtual machine one cycle's ratio can swing "
                             "from a third to one and a quarter)")
    parser.add_argument("--requests", type=int, default=200, help="round trips per subject per cycle (default 200)")
    parser.add_argument("--startups", type=int, default=5, help="start-ups per subject (default 5)")
    parser.add_argument("--idle-seconds", type=float, default=30, help="idle measurement (default 30)")
    parser.add_argument("--fan-seconds", type=float, default=5, help="each fan-out run (default 5)")
    parser.add_argument("--fan-repeats", type=int, default=5,
                        help="fan-out runs per subject and client count, interleaved; the median is reported "
                             "(default 5)")
    parser.add_argument("--rate", type=int, default=100, help="fan-out updates per second (default 100)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100],
                        help="fan-out client counts (default 1 10 100)")
    parser.add_argument("--python-client", action="store_true", help="use the Python client even with a compiler")
    parser.add_argument("--output", default=str(ROOT / "benchmark-results.md"), help="where to write the tables")
    args = parser.parse_args()
    CLIENT = (None if args.python_client else build_client()) or [sys.executable, __file__]
    # The subjects keep their settings in a throwaway file, not in the user's ~/.indi.
    os.environ["INDICONFIG"] = os.path.join(tempfile.mkdtemp(prefix="benchmark-"), "indi_config.xml")
    chosen = subjects(args.rate)
    run(args, chosen)
    args.wake_ups = run_wake_ups(args)
    table = report(chosen, args)
    print()
    print(table)
    Path(args.output).write_text(table)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
