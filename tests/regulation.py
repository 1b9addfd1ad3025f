"""Regulation benchmark: the thermostat's regulation (thermostat.py's Simulator, Hysteresis,
PID, TimeProportioning, RelayGuard, Autotune) beside two references, in simulated time.

    pip install -e '.[bench]'; python tests/regulation.py    # writes docs/regulation.png


Two plants, each regulated by every mode, in four kinds of scenario; the figures come
from the box's true temperature (noise-free, sampled between polls), except "RMS read",
which is of the readings the controller saw. Prints markdown tables and writes
docs/regulation.png.

Plants
  A  fast box: time constant 6 s, heater 20 K over a 5 degree ambient, sensor lag 0.4 s,
     no noise, poll 0.1 s, relay minimums one poll (0.1 s, a solid-state relay).
  B  slow box: time constant 600 s, heater 20 K over a 5 degree ambient, sensor lag 40 s,
     noise 0.05 K, poll 5 s, relay minimums 60 s on and 60 s off.
Modes
  hysteresis     ours: +/-0.5 K with the relay minimums (RelayGuard)
  PID+TPO        ours: PID (gains from our autotune) through TimeProportioning
  PID prop       ours: PID (gains from our autotune) on a proportional heater
  HA ref         Home Assistant generic_thermostat's rule, as in home-assistant/core
                 (climate.py, const.py): on when target >= T + cold_tolerance, off when
                 T >= target + hot_tolerance, both at their default DEFAULT_TOLERANCE 0.3;
                 min_cycle_duration the relay minimum
  simple-pid+TPO simple-pid (PyPI) with the same gains, through our TimeProportioning
Scenarios
  step      from ambient (box at 5) to the 15 degree target (50 % duty)
  ss20/50/80  steady state at 9, 15, 21 degrees (20 %, 50 %, 80 % duty), measured after
            a warm-up of ten time constants
  drop      steady at 15, then the ambient drops 5 K (to 75 % duty)

Columns: RMS, max, mean: error of the true temperature over the steady window (drop:
max is the largest error of the cycle-averaged temperature after the drop); RMS read: of
the readings, noise included; overshoot: above the target after the step; in band s,
±0.2 s: from the event until the temperature stays within 0.5 K (the band) and 0.2 K;
for an on/off heater overshoot and these times are of the temperature averaged over each
heater cycle (switch-on to switch-on). duty, sw/h: mean power, switches (either way) per
hour; limit, RMS/limit: see below; targets: which of the issue's targets apply, met or not.
Gains: our autotune on each plant, rule "on-off" for the on/off heater (and simple-pid),
"tyreus-luyben" for the proportional heater. TPO cycle: A 0.4 s (pulses of at least two
polls; with one-poll pulses, --cycle-a 0.2, the RMS is lower, 0.08-0.1 K, but the pattern
at poll resolution turns irregular: 1.6 times its sawtooth at 50 %), B 120 s (min on +
min off, the shortest the relay allows: longer cycles only add ripple, and from 300 s
the ripple outgrows the PID's windup zone and biases the mean at 20 % and 80 %).

The physical limit of an on/off heater: at duty D and cycle T the box heats at
rise*(1-D)/tau while on (D*T) and cools at rise*D/tau while off ((1-D)*T), so its
temperature is a sawtooth of peak-to-peak rise*D*(1-D)*T/tau (T << tau), whose RMS is
peak-to-peak / (2*sqrt(3)). "limit" below is the exact (exponential) periodic ripple of the
box at the duty and mean cycle the run had (T = 2 h / switches per hour); the table of
limits gives it at the shortest cycle the relay minimums allow.
"""

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import simple_pid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from thermostat import Regulator, RelayGuard, Simulator, TimeProportioning  # noqa: E402

PICTURE = ROOT / "docs" / "regulation.png"
BAND = 0.5
SETTLE_K = 0.2      # "settled": cycle-averaged temperature within this of the target


@dataclass(frozen=True)
class Plant:
    name: str
    time_constant_s: float
    heater_rise_k: float
    ambient_c: float
    sensor_lag_s: float
    sensor_noise_k: float
    poll_s: float
    min_on_s: float
    min_off_s: float
    cycle_s: float          # time proportioning's cycle
    substeps: int           # samples of the true temperature per poll

    def box(self, temperature_c, seed=1):
        return Simulator(temperature_c, time_constant_s=self.time_constant_s,
                         heater_rise_k=self.heater_rise_k, ambient_c=self.ambient_c,
                         sensor_lag_s=self.sensor_lag_s, sensor_noise_k=self.sensor_noise_k,
                         seed=seed, clock=None)

    def target_for(self, duty):
        return self.ambient_c + self.heater_rise_k * duty


PLANTS = {
    "A": Plant("A", 6.0, 20.0, 5.0, 0.4, 0.0, 0.1, 0.1, 0.1, 0.4, 10),
    "B": Plant("B", 600.0, 20.0, 5.0, 40.0, 0.05, 5.0, 60.0, 60.0, 120.0, 5),
}
MODES = ["hysteresis", "PID+TPO", "PID prop", "HA ref", "simple-pid+TPO"]
ON_OFF = {"hysteresis", "PID+TPO", "HA ref", "simple-pid+TPO"}


# ---------------------------------------------------------------------------
# Controllers by mode: each a callable (now_s, measured, target) -> power
# ---------------------------------------------------------------------------

def regulator(plant, proportional, gains=None):
    "The thermostat's own regulation, as ThermalControl runs it."
    return Regulator(proportional=proportional, band=BAND, cycle_s=plant.cycle_s,
                     min_on_s=plant.min_on_s, min_off_s=plant.min_off_s,
                     **({} if gains is None else {"gains": gains}))


def make_controller(mode, plant, gains):
    if mode in ("hysteresis", "PID+TPO", "PID prop"):
        ours = regulator(plant, mode == "PID prop", gains["prop" if mode == "PID prop" else "onoff"])
        ours.mode = "HYSTERESIS" if mode == "hysteresis" else "PID"
        return lambda now, m, target: float(ours.step(now, m, target))
    if mode == "HA ref":
        tolerance = 0.3
        guard = RelayGuard(plant.min_on_s, plant.min_off_s)

        def ha(now, m, target):
            if guard.on:
                wanted = not m >= target + tolerance
            else:
                wanted = target >= m + tolerance
            return float(guard.update(now, wanted))
        return ha
    tpo = TimeProportioning(plant.cycle_s, plant.min_on_s, plant.min_off_s)
    if mode == "simple-pid+TPO":
        reference = simple_pid.PID(*gains["onoff"], setpoint=0.0, sample_time=None,
                                   output_limits=(0.0, 1.0))
        last = [None]

        def simple(now, m, target):
            reference.setpoint = target
            dt = plant.poll_s if last[0] is None else now - last[0]
            last[0] = now
            return float(tpo.update(now, reference(m, dt=dt)))
        return simple
    raise ValueError(mode)


# ---------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------

@dataclass
class Run:
    plant: Plant
    mode: str
    target: float
    times: list         # fine samples of the true temperature
    temperatures: list
    poll_times: list
    readings: list
    powers: list        # decided at each poll, held to the next
    event_s: float      # when the scenario's event (step, drop) happened, or the window began
    switch_times: list  # (time, on) of each change of an on/off heater


def simulate(plant, mode, gains, *, target, start_c, duration_s, drop_at_s=None,
             drop_k=5.0, event_s=0.0):
    box = plant.box(start_c)
    control = make_controller(mode, plant, gains)
    polls = round(duration_s / plant.poll_s)
    times, temperatures = [0.0], [box.temperature]
    poll_times, readings, powers, switches = [], [], [], []
    on = False
    for k in range(polls):
        now = k * plant.poll_s
        box.advance(now)
        if drop_at_s is not None and abs(now - drop_at_s) < plant.poll_s / 2:
            box.ambient_c = plant.ambient_c - drop_k
        measured = box.read()
        power = control(now, measured, target)
        box.set_power(power)
        if (power > 0) != on:
            on = power > 0
            switches.append((now, on))
        poll_times.append(now)
        readings.append(measured)
        powers.append(power)
        for j in range(1, plant.substeps + 1):
            t = now + j * plant.poll_s / plant.substeps
            box.advance(t)
            times.append(t)
            temperatures.append(box.temperature)
    return Run(plant, mode, target, times, temperatures, poll_times, readings, powers,
               event_s, switches)


def autotune(plant, on_off, rule=None):
    """Tune on the plant from ambient at 15 degrees; return the finished Autotune and
    the simulated seconds it took.
    The rule: "on-off" for an on/off heater, "tyreus-luyben" for a proportional one."""
    ours = regulator(plant, not on_off)
    target = plant.target_for(0.5)
    ours.start_autotune(0.0, target, 50.0)
    if rule is not None:
        ours.autotune.rule = rule
    box = plant.box(plant.ambient_c, seed=7)
    k = 0
    while ours.autotune.running:
        now = k * plant.poll_s
        box.advance(now)
        box.set_power(float(ours.step(now, box.read(), target)))
        k += 1
    return ours.autotune, k * plant.poll_s


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------

def averaged(run):
    """The true temperature, for an on/off heater averaged over each heater
    cycle (switch-on to switch-on): each sample stands for its cycle's mean, NaN
    in the last cycle, unfinished. A heater that stays on or off is one cycle."""
    if run.mode not in ON_OFF:
        return run.temperatures
    ons = [t for t, on in run.switch_times if on and t > run.times[0]]
    out, i, n = [], 0, len(run.times)
    for edge in ons:
        j = i
        while j < n and run.times[j] <= edge:
            j += 1
        if j > i:
            mean = sum(run.temperatures[i:j]) / (j - i)
            out.extend([mean] * (j - i))
        i = j
    last_off = max((t for t, on in run.switch_times if not on), default=-math.inf)
    tail = run.temperatures[i:]
    if last_off < (ons[-1] if ons else -math.inf) or not ons:
        out.extend([math.nan] * len(tail) if ons else tail)     # on since the last switch-on
    else:
        out.extend([math.nan] * len(tail))
    return out


def time_to_stay_within(run, values, limit):
    "Seconds after the event until values stay within target +/- limit (None: never)."
    last_out = None
    for t, v in zip(run.times, values, strict=False):
        if t >= run.event_s and not abs(v - run.target) <= limit and not math.isnan(v):
            last_out = t
    if last_out is None:
        return 0.0
    if last_out >= max(t for t, v in zip(run.times, values, strict=False) if not math.isnan(v)) - run.plant.poll_s:
        return None
    return last_out - run.event_s


def switching_ok(run):
    "No on shorter than min_on_s, no off shorter than min_off_s."
    plant = run.plant
    for (t0, on), (t1, _) in zip(run.switch_times, run.switch_times[1:], strict=False):
        if t1 - t0 < (plant.min_on_s if on else plant.min_off_s) - 1e-9:
            return False
    return True


def window(run, start_s):
    pairs = [(t, v) for t, v in zip(run.times, run.temperatures, strict=False) if t > start_s]
    return [v - run.target for _, v in pairs]


def duty_and_switches(run, start_s):
    powers = [p for t, p in zip(run.poll_times, run.powers, strict=False) if t >= start_s]
    hours = (run.poll_times[-1] + run.plant.poll_s - start_s) / 3600
    switches = sum(1 for t, _ in run.switch_times if t > start_s)
    return sum(powers) / len(powers), switches / hours


def ripple_rms(plant, duty, cycle_s, points=4000):
    "RMS of the box's periodic temperature at duty and cycle_s, about its mean."
    if not 0 < duty < 1 or not math.isfinite(cycle_s):
        return 0.0
    tau, rise = plant.time_constant_s, plant.heater_rise_k
    a_on, a_off = math.exp(-duty * cycle_s / tau), math.exp(-(1 - duty) * cycle_s / tau)
    low = rise * (1 - a_on) * a_off / (1 - a_on * a_off)       # above ambient, at switch-on
    high = rise + (low - rise) * a_on
    mean = rise * duty
    total = 0.0
    for i in range(points):
        t = (i + 0.5) / points * cycle_s
        if t < duty * cycle_s:
            x = rise + (low - rise) * math.exp(-t / tau)
        else:
            x = high * math.exp(-(t - duty * cycle_s) / tau)
        total += (x - mean) ** 2
    return math.sqrt(total / points)


def sawtooth_rms(plant, duty, cycle_s):
    "The triangle approximation, for the text: rise*D*(1-D)*T/tau / (2 sqrt 3)."
    return plant.heater_rise_k * duty * (1 - duty) * cycle_s / plant.time_constant_s / (
        2 * math.sqrt(3))


def shortest_cycle_s(plant, duty):
    return max(plant.min_on_s / duty, plant.min_off_s / (1 - duty))


# ---------------------------------------------------------------------------
# Scenarios and rows
# ---------------------------------------------------------------------------

def run_scenarios(plant, gains):
    tau = plant.time_constant_s
    rows, runs = [], {}
    for mode in MODES:
        step = simulate(plant, mode, gains, target=plant.target_for(0.5),
                        start_c=plant.ambient_c, duration_s=25 * tau)
        runs[mode, "step"] = step
        rows.append(step_row(step))
        for duty in (0.2, 0.5, 0.8):
            target = plant.target_for(duty)
            warm = 10 * tau
            run = simulate(plant, mode, gains, target=target, start_c=target,
                           duration_s=warm + 36 * tau, event_s=warm)
            runs[mode, f"ss{round(duty * 100)}"] = run
            rows.append(steady_row(run, warm, f"ss{round(duty * 100)}"))
        drop_at = 10 * tau
        drop = simulate(plant, mode, gains, target=plant.target_for(0.5),
                        start_c=plant.target_for(0.5), duration_s=drop_at + 10 * tau,
                        drop_at_s=drop_at, event_s=drop_at)
        runs[mode, "drop"] = drop
        rows.append(drop_row(drop))
    return rows, runs


def base_row(run, scenario):
    return {"plant": run.plant.name, "mode": run.mode, "scenario": scenario,
            "switching_ok": switching_ok(run) if run.mode in ON_OFF else None}


def step_row(run):
    row = base_row(run, "step")
    values = averaged(run)
    row["overshoot"] = max(0.0, max(v for v in values if not math.isnan(v)) - run.target)
    row["settle"] = time_to_stay_within(run, values, SETTLE_K)
    row["in_band"] = time_to_stay_within(run, values, BAND)
    row["duty"], row["switches"] = duty_and_switches(run, 0.0)
    return row


def steady_row(run, start_s, scenario):
    row = base_row(run, scenario)
    errors = window(run, start_s)
    row["rms"] = math.sqrt(sum(e * e for e in errors) / len(errors))
    row["max"] = max(abs(e) for e in errors)
    row["mean"] = sum(errors) / len(errors)
    reads = [m - run.target for t, m in zip(run.poll_times, run.readings, strict=False) if t >= start_s]
    row["rms_read"] = math.sqrt(sum(e * e for e in reads) / len(reads))
    row["duty"], row["switches"] = duty_and_switches(run, start_s)
    if run.mode in ON_OFF:
        cycle = 7200 / row["switches"] if row["switches"] > 0 else math.inf
        row["limit"] = ripple_rms(run.plant, row["duty"], cycle)
    return row


def drop_row(run):
    row = base_row(run, "drop")
    values = averaged(run)
    after = [v - run.target for t, v in zip(run.times, values, strict=False)
             if t >= run.event_s and not math.isnan(v)]
    row["max"] = max(abs(e) for e in after)
    row["in_band"] = time_to_stay_within(run, values, BAND)
    row["settle"] = time_to_stay_within(run, values, SETTLE_K)
    row["duty"], row["switches"] = duty_and_switches(run, run.event_s)
    return row


def checks(row, plant):
    "The targets that apply to the row: {name: met}."
    out = {}
    on_off = row["mode"] in ON_OFF
    if row["scenario"].startswith("ss"):
        if on_off:
            out["mean<=0.05"] = abs(row["mean"]) <= 0.05
            out["rms<=1.1lim"] = row["rms"] <= 1.1 * row["limit"]
        else:
            out["rms_read<=noise+0.05"] = row["rms_read"] <= plant.sensor_noise_k + 0.05
    elif row["scenario"] == "step":
        out["overshoot<=0.2"] = row["overshoot"] <= 0.2
    elif row["scenario"] == "drop":
        out["band<=2tau"] = (row["in_band"] is not None
                             and row["in_band"] <= 2 * plant.time_constant_s)
    if on_off:
        out["min on/off"] = row["switching_ok"]
    return out


MISSING = object()


def fmt(value, digits=3):
    if value is MISSING:
        return ""
    if value is None:
        return "never"
    if isinstance(value, str):
        return value
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def print_table(rows):
    head = ["mode", "scenario", "RMS", "max", "mean", "RMS read", "overshoot", "in band s",
            "±0.2 s", "duty", "sw/h", "limit", "RMS/limit", "targets"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        plant = PLANTS[row["plant"]]
        limit = row.get("limit", MISSING)
        ratio = row["rms"] / limit if limit is not MISSING and limit > 0 else MISSING
        met = checks(row, plant)
        failed = [name for name, ok in met.items() if not ok]
        targets = f"NOT met: {', '.join(failed)}" if failed else f"met ({len(met)})"
        cells = [row["mode"], row["scenario"]]
        cells += [fmt(row.get(key, MISSING)) for key in ("rms", "max", "mean", "rms_read",
                                                           "overshoot")]
        cells += [fmt(row.get("in_band", MISSING), 0), fmt(row.get("settle", MISSING), 0),
                  fmt(row["duty"], 2),
                  fmt(row["switches"] if row["mode"] in ON_OFF else MISSING, 0), fmt(limit),
                  fmt(ratio, 2),
                  targets]
        print("| " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------
# The plot
# ---------------------------------------------------------------------------

def plot(all_runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = ["step", "ss20", "ss80", "drop"]
    fig, axes = plt.subplots(4, 4, figsize=(20, 14))
    for p, name in enumerate(PLANTS):
        plant = PLANTS[name]
        tau = plant.time_constant_s
        for s, scenario in enumerate(scenarios):
            ax_t, ax_p = axes[2 * p, s], axes[2 * p + 1, s]
            if scenario == "step":
                span = (0, 3 * tau)
            elif scenario == "drop":
                span = (9 * tau, 13 * tau)
            else:
                span = (10 * tau, 11.5 * tau)
            for mode in MODES:
                run = all_runs[name][mode, scenario]
                ts = [(t, v) for t, v in zip(run.times, run.temperatures, strict=False)
                      if span[0] <= t <= span[1]]
                ax_t.plot([t / 60 for t, _ in ts], [v for _, v in ts], lw=0.8, label=mode)
                ps = [(t, v) for t, v in zip(run.poll_times, run.powers, strict=False)
                      if span[0] <= t <= span[1]]
                ax_p.step([t / 60 for t, _ in ps], [v for _, v in ps], where="post", lw=0.7,
                          label=mode)
            run = all_runs[name]["hysteresis", scenario]
            ax_t.axhline(run.target, color="k", lw=0.5)
            ax_t.axhspan(run.target - BAND, run.target + BAND, color="0.9")
            ax_t.set_title(f"plant {name}: {scenario}, target {run.target:g}")
            ax_t.set_ylabel("true temperature (°C)")
            ax_p.set_ylabel("power")
            ax_p.set_xlabel("minutes")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=70)


# ---------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rule", default=None,
                        help="autotune's tuning rule for both heaters (default: on-off for the "
                             "on/off heater, tyreus-luyben for the proportional one)")
    parser.add_argument("--cycle-b", type=float, default=None, help="plant B's TPO cycle (s)")
    parser.add_argument("--cycle-a", type=float, default=None, help="plant A's TPO cycle (s)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.cycle_a:
        PLANTS["A"] = dataclasses.replace(PLANTS["A"], cycle_s=args.cycle_a)
    if args.cycle_b:
        PLANTS["B"] = dataclasses.replace(PLANTS["B"], cycle_s=args.cycle_b)
    started = time.monotonic()
    all_rows, all_runs, tunes = [], {}, []
    for name, plant in PLANTS.items():
        gains = {}
        for kind, on_off in (("onoff", True), ("prop", False)):
            tuner, took_s = autotune(plant, on_off, args.rule)
            if tuner.state != "done":
                sys.exit(f"autotune failed on plant {name}: {tuner.reason}")
            gains[kind] = tuner.gains
            tunes.append((name, kind, tuner, took_s))
        rows, runs = run_scenarios(plant, gains)
        all_rows += rows
        all_runs[name] = runs

    print("## Autotune (relay 0/1, hysteresis 0.1 K, from ambient to 15 degrees)\n")
    print("| plant | heater | rule | Ku (1/K) | Pu (s) | a (K) | kp | ki | kd | took (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, kind, t, took_s in tunes:
        kp, ki, kd = t.gains
        print(f"| {name} | {'on/off' if kind == 'onoff' else 'proportional'} | {t.rule} | "
              f"{t.ultimate_gain:.3f} | {t.period_s:.4g} | {t.amplitude_k:.3f} | {kp:.4g} | "
              f"{ki:.4g} | {kd:.4g} | {took_s:.4g} |")
    for name, plant in PLANTS.items():
        print(f"\n## Plant {name}: tau {plant.time_constant_s:g} s, lag {plant.sensor_lag_s:g} s, "
              f"noise {plant.sensor_noise_k:g} K, poll {plant.poll_s:g} s, min on/off "
              f"{plant.min_on_s:g}/{plant.min_off_s:g} s, TPO cycle {plant.cycle_s:g} s\n")
        print_table([r for r in all_rows if r["plant"] == name])
        print(f"\nOn/off limit at the shortest cycle the minimums allow (plant {name}):")
        for duty in (0.2, 0.5, 0.8):
            cycle = shortest_cycle_s(plant, duty)
            print(f"- duty {duty:.0%}: cycle {cycle:g} s, ripple RMS "
                  f"{ripple_rms(plant, duty, cycle):.3f} K (sawtooth formula "
                  f"{sawtooth_rms(plant, duty, cycle):.3f} K)")
    summary(all_rows)
    if not args.no_plot:
        PICTURE.parent.mkdir(exist_ok=True)
        plot(all_runs, PICTURE)
        print(f"\nwrote {PICTURE.relative_to(ROOT)}")
    print(f"took {time.monotonic() - started:.1f} s")


def summary(rows):
    print("\n## Targets, by mode (both plants)\n")
    for mode in MODES:
        results = [(row, name, ok) for row in rows if row["mode"] == mode
                   for name, ok in checks(row, PLANTS[row["plant"]]).items()]
        failed = [f"{row['plant']} {row['scenario']} {name}" for row, name, ok in results
                  if not ok]
        print(f"- {mode}: {len(results) - len(failed)} of {len(results)} met"
              + (f"; not met: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
