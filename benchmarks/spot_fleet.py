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

goodput = committed tokens / sum over machines of alive seconds (machines.json, written by the
launcher; a machine is billed from its first worker's start to its last process's exit).

    python -m benchmarks.spot_fleet [--quick] [--seed 0]

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

from kintsugi.benchmarks._runs import REPORT_DIR, RunResult, rnd, run_job_retrying
from kintsugi.recovery.runfiles import MACHINES as MACHINES_FILE

MONTHLY_RATE = 0.125          # interruptions per machine per month (AWS advisor band 10-15%)
NO_NOTICE_FRACTION = 0.3      # share of preemptions that act as SIGKILL (assumption, see above)
REJOIN_DELAY_S = 2.0
MACHINES = 4
MIN_GAP_STEPS = 8             # a replacement is up and trained a little before the next event


def trace(max_steps: int, events: float, seed: int) -> tuple:
    """Seeded [{step, machine, kind}] and the hours one step stands for."""
    hourly = -math.log(1 - MONTHLY_RATE) / (30 * 24)          # hazard per machine-hour
    first, last = 5, max_steps - 8
    step_hours = events / (MACHINES * (last - first) * hourly)  # compress time to get `events`
    p = 1 - math.exp(-hourly * step_hours)                     # per machine, per step
    rng = random.Random(seed)
    live, next_id, out, gap_until = [f"m{i}" for i in range(MACHINES)], MACHINES, [], first
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


def overrides(max_steps: int, schedule: List[dict]) -> List[str]:
    items = ", ".join(f"{{step: {e['step']}, machine: {e['machine']}, kind: {e['kind']}}}" for e in schedule)
    return ["parallel.replicas=2", "parallel.stages=2", "model.n_layers=4", f"train.max_steps={max_steps}",
            "train.eval_every=0", "train.eval_batches=2", "train.warmup_steps=5", "data.max_files=300",
            "diloco.enabled=true", "diloco.sync_every=10", "diloco.overlap=0", f"launcher.machines={MACHINES}",
            "faults.spares=0", f"faults.rejoin_delay_s={REJOIN_DELAY_S}", "faults.notice_s=60",
            f"faults.schedule=[{items}]"]


def goodput(res: RunResult) -> dict:
    path = os.path.join(res.run_dir, MACHINES_FILE)
    machines = json.load(open(path)) if os.path.exists(path) else {}
    machine_s = sum(m["alive_s"] for m in machines.values())
    tokens = (res.summary or {}).get("tokens") or sum(c.get("tokens", 0) for c in res.commits)
    return {"tokens": tokens, "machine_s": rnd(machine_s, 1), "machines": len(machines),
            "goodput_tok_per_machine_s": rnd(tokens / machine_s, 2) if machine_s else None,
            "final_val_loss": rnd((res.summary or {}).get("final_val_loss")), "wall_s": rnd(res.wall_s, 1),
            "error": res.error}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 steps, ~2.5 expected preemptions (about 3 minutes)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--events", type=float, default=None, help="expected preemptions per run")
    ap.add_argument("--seed", type=int, default=5, help="trace seed (5: one kill, one term in --quick)")
    args = ap.parse_args(argv)
    steps = args.steps or (40 if args.quick else 100)
    events = args.events or (2.5 if args.quick else 4.0)
    schedule, step_hours = trace(steps, events, args.seed)
    out_dir = os.path.join(REPORT_DIR, "spot_fleet")
    shutil.rmtree(out_dir, ignore_errors=True)
    runs = {}
    for name, sched in (("spot", schedule), ("uninterrupted", [])):
        runs[name] = run_job_retrying(name, os.path.join(out_dir, name), overrides(steps, sched), stall_s=90.0)
    spot, base = goodput(runs["spot"]), goodput(runs["uninterrupted"])
    rebuilds = (runs["spot"].summary or {}).get("rebuilds", [])
    ratio = (spot["goodput_tok_per_machine_s"] / base["goodput_tok_per_machine_s"]
             if spot["goodput_tok_per_machine_s"] and base["goodput_tok_per_machine_s"] else None)
    gap = (spot["final_val_loss"] - base["final_val_loss"]
           if spot["final_val_loss"] is not None and base["final_val_loss"] is not None else None)
    report = {
        "benchmark": "spot_fleet", "quick": args.quick, "seed": args.seed, "steps": steps,
        "grid": "2x2", "machines": MACHINES, "trace": schedule,
        "trace_model": {"monthly_rate": MONTHLY_RATE, "no_notice_fraction": NO_NOTICE_FRACTION,
                        "step_stands_for_hours": rnd(step_hours, 1), "rejoin_delay_s": REJOIN_DELAY_S},
        "goodput_ratio": rnd(ratio), "val_loss_gap": rnd(gap),
        "rebuilds_by_tier": dict(Counter(r["tier"] for r in rebuilds)),
        "failures": (runs["spot"].summary or {}).get("failures"),
        "spot": spot, "uninterrupted": base,
    }
    print(json.dumps(report))
    return 0 if spot["error"] is None and base["error"] is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
