"""Claim under test: live rebalancing speeds up a pipeline with a slow machine and changes no loss.

Three real jobs of the tiny model, 4 stages on 4 simulated machines, plain CheckFree routes, run one
after the other on this box:

- `even`: every machine at full speed (the reference loss curve and speed);
- `slow`: machine m1 three times slower (`launcher.slow_machines=m1:3`), fixed layout;
- `rebalanced`: the same slow machine with `parallel.rebalance=true`: after `rebalance_every`
  measured steps the coordinator moves layers off the slow stage in a generation change.

Prints one JSON line: steady tokens/s of each job (measured after the rebalance for `rebalanced`),
the speed-up rebalanced / slow, the slowest stage's compute time before and after, the layout, and
whether every committed loss of `rebalanced` equals `even`'s (it should: the layers move exactly).

    python -m benchmarks.rebalance [--steps 40 --factor 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from kintsugi.benchmarks._runs import REPORT_DIR, commits_of, final_eval_seen, rnd, run_job_retrying, steady_tokens_per_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--factor", type=float, default=3.0, help="slowdown of machine m1")
    ap.add_argument("--every", type=int, default=6, help="parallel.rebalance_every")
    args = ap.parse_args(argv)
    out_dir = os.path.join(REPORT_DIR, "rebalance")
    shutil.rmtree(out_dir, ignore_errors=True)
    base = [f"train.max_steps={args.steps}", "faults=none", "faults.spares=0", "launcher.machines=4",
            "recovery.strategy=checkfree", "train.eval_every=0", "train.eval_batches=2"]
    slow = [f"launcher.slow_machines=m1:{args.factor:g}"]
    jobs = {"even": base, "slow": base + slow,
            "rebalanced": base + slow + ["parallel.rebalance=true", f"parallel.rebalance_every={args.every}"]}
    runs = {name: run_job_retrying(name, os.path.join(out_dir, name), ov, stall_s=120, stop_when_evals=final_eval_seen)
            for name, ov in jobs.items()}
    moves = [e for e in runs["rebalanced"].events if e.get("kind") == "rebalance"]
    # Steady speed: skip start-up; for the rebalanced job, only steps committed after the last move.
    after = 0
    if moves:
        last_t = moves[-1]["t"]
        after = min((c["step"] for c in commits_of(runs["rebalanced"]) if c["wall_s"] > last_t), default=args.steps)
    tps = {name: steady_tokens_per_s(commits_of(res), skip=(after + 2 if name == "rebalanced" else 4))
           for name, res in runs.items()}
    losses = {name: {c["step"]: c["loss"] for c in commits_of(res)} for name, res in runs.items()}
    summary = runs["rebalanced"].summary or {}
    out = {
        "benchmark": "rebalance", "steps": args.steps, "slowdown_m1": args.factor,
        "tokens_per_s": {k: rnd(v, 1) for k, v in tps.items()},
        "speedup_rebalanced_over_slow": rnd(tps["rebalanced"] / tps["slow"], 3)
        if tps["rebalanced"] and tps["slow"] else None,
        "fraction_of_even_speed": {k: rnd(tps[k] / tps["even"], 3) if tps[k] and tps["even"] else None
                                   for k in ("slow", "rebalanced")},
        "moves": [{"from": e["from"], "to": e["to"], "stage_compute_s": [rnd(x) for x in e["stage_compute_s"]],
                   "predicted_gain": rnd(e["predicted_gain"], 3)} for e in moves],
        "slowest_stage_after": summary.get("slowest_stage"),
        "losses_equal_to_even": bool(losses["rebalanced"]) and losses["rebalanced"] == losses["even"],
        "final_val_loss": {k: rnd((r.summary or {}).get("final_val_loss")) for k, r in runs.items()},
        "errors": {k: r.error for k, r in runs.items() if r.error},
    }
    print(json.dumps(out))
    return 0 if not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
