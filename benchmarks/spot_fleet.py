"""Claim: on a spot fleet whose machines are preempted with and without notice, Kintsugi keeps most of
the useful work per machine-second and ends near the loss of an uninterrupted run.

Two real runs of `python -m trainer` with the same config (2 replicas x 2 stages, Streaming DiLoCo
H=10, overlap 0, tiny model, `launcher.machines=4`, no idle spares: a lost machine's slots wait for
its replacement): one follows a seeded preemption trace, one is uninterrupted. The trace is a Poisson
process per live machine: rate `MONTHLY_RATE` interruptions per machine-month (AWS Spot Instance
Advisor's middle band, "10-15%" a month), of which `NO_NOTICE_FRACTION` arrive without usable notice
(SIGKILL; an assumption: AWS always sends its 2-minute notice, but a job that cannot act on it in
time loses the machine just the same); the rest are SIGTERM (notice -> handoff). Real rates give
~0.0002 events per machine-hour, so time is compressed: one step stands for `step_hours` hours,
chosen so that the run sees `--events` preemptions in expectation (the factor is reported). A
preempted machine is replaced `REJOIN_DELAY_S` seconds later by a new one (new id).
`--rejoin-steps N` instead sets the delay to N x the pace of the uninterrupted run made just before
(an experiment: the two runs' paces differ on a shared box, so it moved the goodput more than the
fixed delay did; BENCHMARKS.md, "Spot fleet").

Goodput comes from the preempted run's own records (`benchmarks/_goodput.py`): machine-seconds paid
(the launcher's machine lifetimes, machines.json, over the training window) against the useful work,
each committed step priced at its replica's failure-free pace measured in the same run; the rest is
split by cause (outage, discarded work, waits at syncs and at the end, idle machines, pace). A machine
that runs uniformly slower or faster moves both sides alike, so other jobs on this box move it less
than a ratio of two runs' tokens per machine-second (kept as `wall_ratio`, informational: median over
the A B A B pairs when `--pairs` > 1). The uninterrupted run is the loss reference: `val_loss_gap`.

    python -m benchmarks.spot_fleet [--quick] [--seed 5] [--pairs 1]

Prints one JSON line; runs are kept under outputs/benchmarks/spot_fleet/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
from collections import Counter
from typing import List

from kintsugi.benchmarks._goodput import goodput_of
from kintsugi.benchmarks._runs import REPORT_DIR, RunResult, median, rnd, run_job_retrying
from kintsugi.recovery.runfiles import MACHINES as MACHINES_FILE

MONTHLY_RATE = 0.125          # interruptions per machine per month (AWS advisor band 10-15%)
NO_NOTICE_FRACTION = 0.3      # share of preemptions that act as SIGKILL (assumption, see above)
REJOIN_DELAY_S = 2.0
MACHINES = 4
MIN_GAP_STEPS = 8             # a replacement is up and trained a little before the next event


def trace(max_steps: int, events: float, seed: int, machines: int = MACHINES) -> tuple:
    """Seeded [{step, machine, kind}] and the hours one step stands for."""
    hourly = -math.log(1 - MONTHLY_RATE) / (30 * 24)          # hazard per machine-hour
    first, last = 5, max_steps - 8
    step_hours = events / (machines * (last - first) * hourly)  # compress time to get `events`
    p = 1 - math.exp(-hourly * step_hours)                     # per machine, per step
    rng = random.Random(seed)
    live, next_id, out, gap_until = [f"m{i}" for i in range(machines)], machines, [], first
    for step in range(first, last):
        for m in list(live):
            if step < gap_until or rng.random() >= p:
                continue
            kind = "kill" if rng.random() < NO_NOTICE_FRACTION else "term"
            out.append({"step": step, "machine": m, "kind": kind})
            live[live.index(m)] = f"m{next_id}"
            next_id += 1
            gap_until = step + MIN_GAP_STEPS
    return out, step_hours


def overrides(max_steps: int, schedule: List[dict], replicas: int = 2, stages: int = 2,
              machines: int = MACHINES, rejoin_delay_s: float = REJOIN_DELAY_S) -> List[str]:
    items = ", ".join(f"{{step: {e['step']}, machine: {e['machine']}, kind: {e['kind']}}}" for e in schedule)
    return [f"parallel.replicas={replicas}", f"parallel.stages={stages}", "model.n_layers=4",
            f"train.max_steps={max_steps}",
            "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=5", "data.max_files=300",
            "diloco.enabled=true", "diloco.sync_every=10", "diloco.overlap=0", f"launcher.machines={machines}",
            "faults.spares=0", f"faults.rejoin_delay_s={rejoin_delay_s:.3f}", "faults.notice_s=60",
            f"faults.schedule=[{items}]"]


def machine_rate(res: RunResult) -> dict:
    """Tokens per machine-second over the machines' whole lifetimes (the old measure; informational)."""
    path = os.path.join(res.run_dir, MACHINES_FILE)
    machines = json.load(open(path)) if os.path.exists(path) else {}
    machine_s = sum(m["alive_s"] for m in machines.values())
    tokens = (res.summary or {}).get("tokens") or sum(c.get("tokens", 0) for c in res.commits)
    return {"tokens": tokens, "machine_s": rnd(machine_s, 1), "machines": len(machines),
            "tok_per_machine_s": rnd(tokens / machine_s, 2) if machine_s else None,
            "final_val_loss": rnd((res.summary or {}).get("final_val_loss")), "wall_s": rnd(res.wall_s, 1),
            "error": res.error}


def pace_of(res: RunResult) -> float:
    """Mean seconds per step of a run's replicas, from its own records."""
    paces = goodput_of(res.run_dir).pace_s
    return sum(paces.values()) / len(paces)


def own_goodput(res: RunResult) -> dict:
    """The run's goodput from its own records, rounded for the report (None when it cannot be read)."""
    try:
        g = goodput_of(res.run_dir)
    except (OSError, ValueError, KeyError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"goodput": rnd(g.goodput), "goodput_without_stalls": rnd(g.goodput_without_stalls()),
            "goodput_lifetime": rnd(g.goodput_lifetime),
            "paid_machine_s": rnd(g.paid_machine_s, 2), "useful_machine_s": rnd(g.useful_machine_s, 2),
            "lost_fraction": {k: rnd(v) for k, v in g.fractions().items()},
            "lost_machine_s": {k: rnd(v, 2) for k, v in g.lost_machine_s.items()},
            "outage_parts_machine_s": {k: rnd(v, 2) for k, v in g.outage_parts_machine_s.items()},
            "wait_parts_machine_s": {k: rnd(v, 2) for k, v in g.wait_parts_machine_s.items()},
            "unpaid_machine_s": rnd(g.unpaid_machine_s, 2),
            "startup_teardown_machine_s": rnd(g.startup_teardown_machine_s, 2),
            "pace_s": {r: rnd(v) for r, v in g.pace_s.items()}, "steps": g.steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 steps, ~2.5 expected preemptions (about 3 minutes)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--events", type=float, default=None, help="expected preemptions per run")
    ap.add_argument("--seed", type=int, default=5, help="trace seed (5: one kill, one term in --quick)")
    ap.add_argument("--pairs", type=int, default=1, help="spot/uninterrupted pairs, interleaved (A B A B)")
    ap.add_argument("--out", default=os.path.join(REPORT_DIR, "spot_fleet"), help="where the runs go")
    ap.add_argument("--rejoin-s", type=float, default=REJOIN_DELAY_S, help="replacement delay in seconds")
    ap.add_argument("--rejoin-steps", type=float, default=None,
                    help="replacement delay in steps at the uninterrupted run's pace (overrides --rejoin-s)")
    args = ap.parse_args(argv)
    steps = args.steps or (40 if args.quick else 100)
    events = args.events or (2.5 if args.quick else 4.0)
    schedule, step_hours = trace(steps, events, args.seed)
    shutil.rmtree(args.out, ignore_errors=True)
    pairs, delays = [], []
    for i in range(args.pairs):
        pair = {}
        for name, sched in (("uninterrupted", []), ("spot", schedule)):  # the pace first, then the delay
            tag = name if args.pairs == 1 else f"{name}-{i}"
            delay = REJOIN_DELAY_S if not sched else (args.rejoin_s if args.rejoin_steps is None
                                                      else args.rejoin_steps * pace_of(pair["uninterrupted"]))
            if sched:
                delays.append(delay)
            pair[name] = run_job_retrying(tag, os.path.join(args.out, tag),
                                          overrides(steps, sched, rejoin_delay_s=delay), stall_s=90.0)
        pairs.append(pair)
    spots = [own_goodput(p["spot"]) for p in pairs]
    goodputs = [g.get("goodput") for g in spots]
    rates = [(machine_rate(p["spot"]), machine_rate(p["uninterrupted"])) for p in pairs]
    ratios = [a["tok_per_machine_s"] / b["tok_per_machine_s"] for a, b in rates
              if a["tok_per_machine_s"] and b["tok_per_machine_s"]]
    gaps = [a["final_val_loss"] - b["final_val_loss"] for a, b in rates
            if a["final_val_loss"] is not None and b["final_val_loss"] is not None]
    rebuilds = (pairs[0]["spot"].summary or {}).get("rebuilds", [])
    report = {
        "benchmark": "spot_fleet", "quick": args.quick, "seed": args.seed, "steps": steps, "pairs": args.pairs,
        "grid": "2x2", "machines": MACHINES, "trace": schedule,
        "trace_model": {"monthly_rate": MONTHLY_RATE, "no_notice_fraction": NO_NOTICE_FRACTION,
                        "step_stands_for_hours": rnd(step_hours, 1), "rejoin_steps": args.rejoin_steps,
                        "rejoin_delay_s": [rnd(d, 3) for d in delays]},
        "goodput": rnd(median(goodputs)), "goodput_runs": goodputs,
        "val_loss_gap": rnd(median(gaps)), "wall_ratio": rnd(median(ratios)),
        "rebuilds_by_tier": dict(Counter(r["tier"] for r in rebuilds)),
        "failures": (pairs[0]["spot"].summary or {}).get("failures"),
        "spot": spots[0] if args.pairs == 1 else spots,
        "uninterrupted_goodput": [own_goodput(p["uninterrupted"]).get("goodput") for p in pairs],
        "machine_rates": [{"spot": a, "uninterrupted": b} for a, b in rates],
    }
    print(json.dumps(report))
    return 0 if all(a["error"] is None and b["error"] is None for a, b in rates) else 1


if __name__ == "__main__":
    raise SystemExit(main())
