"""The fleet model on a measured run's own failure trace: what it predicts for that run, next to what
the run recorded, per cause (`python -m benchmarks.fleet_model --trace RUN_DIR`).

From the run's records (`benchmarks/_goodput.py`): R, S, H and the overlap (job.json); the step time
(the replicas' mean pace); the horizon (the training window); and every failure as it happened: when
(rebuild event `failed_at`), which slot, and its outage (`resumed_at - failed_at`: detection, waiting
for a replacement machine, restart, regroup and transfer as this run paid them). The model then
applies its `isolated` policy (`fleet_model._replica_sim`) to exactly that trace; rdv(R) for the
regroup term comes from the model's usual rendezvous input.

Two predictions are printed:
- `model`: the fleet model as it stands (a fixed horizon; the other replicas go on without the one
  that is down).
- `model_fixed_steps`: the same, plus what a job with a fixed number of steps per replica pays and the
  model did not count: every replica must finish its steps, so the replicas that lost less time wait
  for the one that lost most, at a matched Streaming DiLoCo sync or at the end. Per replica r with lost
  time L_r (its outages, unioned, and the steps in flight at its failures), the others wait
  S x (max L - L_r). Measured, this is `waits`.

Measured-only terms (the model has none): `idle` (machines paid beyond the slots: a replacement that
boots while a notice holder hands off), `unpaid` (a lost machine not yet replaced: the model bills W
machines throughout, so it is added back to the measured outage when the two are compared) and `pace`
(steps slower than the run's pace).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from kintsugi.benchmarks import fleet_model as FM
from kintsugi.benchmarks._goodput import Goodput, RunRecord, account

CAUSES = ("outage", "discard", "waits")


@dataclass(frozen=True)
class Failure:
    t: float            # seconds after the training window opened
    replica: int
    stage: int
    outage_s: float


@dataclass
class RunTrace:
    """A measured run as the fleet model takes it."""
    replicas: int
    stages: int
    step_s: float
    sync_every: int
    overlap_steps: int
    horizon_s: float
    failures: List[Failure] = field(default_factory=list)

    @property
    def workers(self) -> int:
        return self.replicas * self.stages


def trace_of(rec: RunRecord, g: Goodput, overlap_steps: int = 0) -> RunTrace:
    t0, t1 = g.window_s
    fails = sorted((Failure(o.failed - t0, o.replica, o.stage, o.resumed - o.failed) for o in rec.outages
                    if t0 <= o.failed < t1), key=lambda f: f.t)
    pace = sum(g.pace_s.values()) / len(g.pace_s)
    return RunTrace(rec.replicas, rec.stages, pace, rec.sync_every or 10 ** 9, overlap_steps, t1 - t0, fails)


def _lost_per_replica(tr: RunTrace) -> List[float]:
    """Each replica's lost time: its outages (a failure inside one restarts it) and the step in flight."""
    lost = [0.0] * tr.replicas
    down_until = [0.0] * tr.replicas
    down_start: List[Optional[float]] = [None] * tr.replicas
    resumed = [0.0] * tr.replicas
    for f in tr.failures:
        r = f.replica
        if f.t < down_until[r]:
            down_until[r] = f.t + f.outage_s
            continue
        if down_start[r] is not None:
            lost[r] += min(down_until[r], tr.horizon_s) - down_start[r]
            resumed[r] = down_until[r]
        lost[r] += (f.t - resumed[r]) % tr.step_s
        down_start[r], down_until[r] = f.t, f.t + f.outage_s
    for r in range(tr.replicas):
        if down_start[r] is not None:
            lost[r] += min(down_until[r], tr.horizon_s) - down_start[r]
    return lost


def predict(tr: RunTrace, rdv_r_s: float, missed_sync: str = "discard") -> Dict[str, Dict[str, float]]:
    """Lost worker-seconds by cause and goodput: {"model": ..., "model_fixed_steps": ...}."""
    c = FM.Costs(workers=tr.workers, stages=tr.stages, step_s=tr.step_s, sync_s=tr.sync_every * tr.step_s,
                 transfer_s=0.0, d_global=0.0, d_replica=0.0,
                 regroup_s=max(0.0, rdv_r_s - tr.overlap_steps * tr.step_s), missed_sync=missed_sync,
                 ft_ready_s=0.0, ft_heal_s=0.0, ckpt_restart_s=0.0, ckpt_save_s=0.0, ckpt_interval_s=math.inf)
    times = [f.t for f in tr.failures]
    slots = [f.replica * tr.stages + f.stage for f in tr.failures]
    lost = FM._replica_sim(times, slots, c, tr.horizon_s, drop_replica=False,
                           durations=[f.outage_s for f in tr.failures])
    total = tr.workers * tr.horizon_s
    plain = {"outage": lost["outage"], "discard": lost["discard"], "waits": lost["regroup"]}
    per_r = _lost_per_replica(tr)
    fixed = dict(plain, waits=plain["waits"] + tr.stages * sum(max(per_r) - x for x in per_r))
    out = {}
    for name, b in (("model", plain), ("model_fixed_steps", fixed)):
        out[name] = {**b, "goodput": max(0.0, 1.0 - sum(b.values()) / total),
                     **{f"{k}_fraction": v / total for k, v in b.items()}}
    return out


def measured(g: Goodput) -> Dict[str, float]:
    """The run's own accounting in the model's buckets, in worker-seconds (`outage_billed_w`: with the
    unpaid time added back, as the model bills it)."""
    lost = g.lost_machine_s
    b = {k: lost[k] / g.share for k in CAUSES}
    b["outage_billed_w"] = b["outage"] + g.unpaid_machine_s / g.share
    paid = g.paid_machine_s
    return {**b, "goodput": g.goodput, **{f"{k}_fraction": lost[k] / paid for k in CAUSES},
            "idle_fraction": lost["idle"] / paid, "pace_fraction": lost["pace"] / paid,
            "unpaid_fraction": g.unpaid_machine_s / paid}


def compare(run_dir: str, rdv_r_s: float) -> dict:
    """Predicted against measured for one run directory."""
    with open(os.path.join(run_dir, "job.json")) as f:
        overlap = int(json.load(f)["diloco"].get("overlap", 0))
    rec = RunRecord.from_run_dir(run_dir)
    g = account(rec)
    tr = trace_of(rec, g, overlap)
    pred, meas = predict(tr, rdv_r_s), measured(g)
    err = {name: {k: p[f"{k}_fraction"] - meas[f"{k}_fraction"] for k in CAUSES} | {"goodput": p["goodput"] - meas["goodput"]}
           for name, p in pred.items()}
    return {"run_dir": run_dir, "trace": asdict(tr), "measured": meas, **pred, "error": err}
