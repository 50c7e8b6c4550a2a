"""Golden losses: the exact per-step training losses and final validation loss of a few real runs,
kept as hex floats under tests/golden/<scenario>.json and compared bit for bit.

Why: refactors of the step loop, the commit, the stage state or the control plane must not change
what a run computes by a single bit. The runs are deterministic: faults hit an exact step (the
launcher signals a worker while it waits at the start of that step), a handoff and a coordinator
restart are exact (their losses are the undisturbed run's), and every stage's math is fixed-order.

Regenerate a file only when the numbers are meant to change, and say why in the commit:

    python tests/golden/golden.py NAME --reason "why the losses change"

It runs the scenario twice and refuses to write when the two runs differ.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

_QUICK = ["experiment=quick", "train.eval_batches=1"]

# name -> (what it covers, the trainer overrides)
SCENARIOS: Dict[str, tuple] = {
    "quick": ("the smoke run, 4 stages, no faults", _QUICK),
    "kills": ("the default job's two kills: a middle stage rebuilt by CheckFree, the first by CheckFree+",
              _QUICK + ["train.max_steps=12", "faults.demo=true", "faults.spares=1"]),
    # A peer rebuild copies the donor's state as of the moment it serves it. For that to be the
    # same state in every run, the donor must be done: replica 0 sits on a machine 4x slower, so
    # replica 1 finishes its last two steps (no outer sync after t=8) while replica 0 is still on
    # its step 9, and replica 0 is killed at its last step.
    "peer": ("a peer rebuild in a 2 x 2 Streaming DiLoCo run",
             _QUICK + ["parallel.stages=2", "parallel.replicas=2", "diloco.enabled=true", "diloco.sync_every=4",
                       "train.max_steps=11", "launcher.machines=2", "launcher.slow_machines=m0:4",
                       "faults.spares=1", "faults.schedule=[{step: 10, replica: 0, stage: 1}]"]),
    "handoff": ("an exact handoff on SIGTERM (the undisturbed run's losses)",
                _QUICK + ["train.max_steps=8", "faults.spares=1",
                          "faults.schedule=[{step: 3, replica: 0, stage: 1, kind: term}]"]),
    "coordinator": ("the coordinator SIGKILLed and restarted mid-run (the undisturbed run's losses)",
                    _QUICK + ["train.max_steps=8", "faults.schedule=[{step: 3, target: coordinator, kind: kill}]"]),
}


def run(name: str, run_dir: str, timeout: float = 300) -> dict:
    """Run scenario `name` for real; returns {"losses": {replica: [hex, ...]}, "final_val_loss": hex}."""
    _, overrides = SCENARIOS[name]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"scenario {name} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return observe(run_dir)


def observe(run_dir: str) -> dict:
    """The committed losses of every replica, in step order, as hex floats (a skipped step: None).
    A step recorded twice (a duplicate, or re-trained after a rollback) keeps its last record."""
    losses: Dict[int, Dict[int, Optional[str]]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "replica" not in rec or "step" not in rec or "val_loss" in rec or rec.get("duplicate"):
                continue
            loss = rec.get("loss")
            losses.setdefault(int(rec["replica"]), {})[int(rec["step"])] = None if loss is None else float(loss).hex()
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    val = summary.get("final_val_loss")
    return {"losses": {str(r): [steps[k] for k in sorted(steps)] for r, steps in sorted(losses.items())},
            "steps": {str(r): sorted(steps) for r, steps in sorted(losses.items())},
            "rebuilds": sorted([rb["step"], rb["slot"], rb["tier"]] for rb in summary.get("rebuilds", [])),
            "final_val_loss": None if val is None else float(val).hex()}


def path(name: str) -> str:
    return os.path.join(HERE, f"{name}.json")


def load(name: str) -> dict:
    with open(path(name)) as f:
        return json.load(f)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate a golden-loss file (run twice, written only if equal)")
    ap.add_argument("names", nargs="+", choices=sorted(SCENARIOS))
    ap.add_argument("--reason", required=True, help="why the losses change (also say it in the commit)")
    args = ap.parse_args(argv)
    for name in args.names:
        with tempfile.TemporaryDirectory() as d:
            a = run(name, os.path.join(d, "a"))
            b = run(name, os.path.join(d, "b"))
        if a != b:
            print(f"{name}: two runs differ; not written\n{a}\n{b}", file=sys.stderr)
            return 1
        what, overrides = SCENARIOS[name]
        with open(path(name), "w") as f:
            json.dump(dict(scenario=name, covers=what, overrides=overrides, reason=args.reason, **a), f, indent=1)
            f.write("\n")
        print(f"{name}: written {path(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
