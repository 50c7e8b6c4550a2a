"""The fleet model on a measured run's own failure trace: what it predicts for that run, next to what
the run recorded, per cause (`python -m benchmarks.fleet_model --trace RUN_DIR`).

From the run's records (`benchmarks/_goodput.py`): R, S, H and the overlap (job.json); the step time
(the replicas' mean pace); the horizon (the training window); and every failure as it happened: when
(rebuild event `failed_at`), which slot, and its outage (`resumed_at - failed_at`: detection, waiting
for a replacement machine, restart, regroup and transfer as this run paid them). The model then
applies its `isolated` policy (`fleet_model._replica_sim`) to exactly that trace; rdv(R) for the
regroup term comes from the model's usual rendezvous input.

Two predictions are printed:
- `model`: the fleet model as it stands (`isolated`, missed syncs discard the survivors' progress, a
  rebuilt stage restarts from its last synced copy whatever the tier, the other replicas go on
  without the one that is down and never wait for it).
- `model_fixed`: the three corrections these comparisons called for (BENCHMARKS.md, "Fleet model
  against measured runs"): a handoff is exact (the replica loses the step in flight and nothing since
  the last sync); a replica that missed syncs keeps its progress (`missed_sync="catch_up"`: the
  records show it running the missed syncs alone); and matched syncs make the others wait
  (`laggard="wait"`): Streaming DiLoCo's k-th sync of a replica meets the k-th of its peers, so the
  replicas that went on during an outage wait for the lagging one at a later sync or at the end:
  S x the integral of (R - replicas down) over the time some replica is down.

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
from typing import Dict, List, Tuple

from kintsugi.benchmarks import fleet_model as FM
from kintsugi.benchmarks._goodput import EXACT_TIERS, Goodput, RunRecord, account, paces_by_generation

CAUSES = ("outage", "discard", "waits")


@dataclass(frozen=True)
class Failure:
    t: float            # seconds after the training window opened
    replica: int
    stage: int
    outage_s: float
    exact: bool = False  # rebuilt by an exact tier (handoff)


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
    fails = sorted((Failure(o.failed - t0, o.replica, o.stage, o.resumed - o.failed, o.tier in EXACT_TIERS)
                    for o in rec.outages
                    if t0 <= o.failed < t1), key=lambda f: f.t)
    pace = sum(g.pace_s.values()) / len(g.pace_s)
    return RunTrace(rec.replicas, rec.stages, pace, rec.sync_every or 10 ** 9, overlap_steps, t1 - t0, fails)


def outages(tr: RunTrace) -> List[List[Tuple[float, float]]]:
    """Per replica, its down intervals clipped to the horizon (a failure inside one restarts it)."""
    down: List[List[Tuple[float, float]]] = [[] for _ in range(tr.replicas)]
    for f in tr.failures:
        spans = down[f.replica]
        if spans and f.t < spans[-1][1]:
            spans[-1] = (spans[-1][0], f.t + f.outage_s)
        else:
            spans.append((f.t, f.t + f.outage_s))
    return [[(a, min(b, tr.horizon_s)) for a, b in spans] for spans in down]


def matched_sync_waits(tr: RunTrace) -> float:
    """Worker-seconds the replicas that are up wait for those that are down (fleet_model.laggard_waits)."""
    return FM.laggard_waits([span for spans in outages(tr) for span in spans], tr.replicas, tr.stages)


def predict(tr: RunTrace, rdv_r_s: float) -> Dict[str, Dict[str, float]]:
    """Lost worker-seconds by cause and goodput: {"model": ..., "model_fixed": ...}."""
    times = [f.t for f in tr.failures]
    slots = [f.replica * tr.stages + f.stage for f in tr.failures]
    total = tr.workers * tr.horizon_s
    out = {}
    for name, missed, exact, laggard in (("model", "discard", None, "proceed"),
                                         ("model_fixed", "catch_up", [f.exact for f in tr.failures], "wait")):
        c = FM.Costs(workers=tr.workers, stages=tr.stages, step_s=tr.step_s, sync_s=tr.sync_every * tr.step_s,
                     transfer_s=0.0, d_global=0.0, d_replica=0.0,
                     regroup_s=max(0.0, rdv_r_s - tr.overlap_steps * tr.step_s), missed_sync=missed,
                     ft_ready_s=0.0, ft_heal_s=0.0, ckpt_restart_s=0.0, ckpt_save_s=0.0, ckpt_interval_s=math.inf,
                     laggard=laggard)
        lost = FM._replica_sim(times, slots, c, tr.horizon_s, drop_replica=False,
                               durations=[f.outage_s for f in tr.failures], exact=exact)
        b = {"outage": lost["outage"], "discard": lost["discard"], "waits": lost["regroup"] + lost.get("wait", 0.0)}
        out[name] = {**b, "goodput": max(0.0, 1.0 - sum(b.values()) / total),
                     **{f"{k}_fraction": v / total for k, v in b.items()}}
    return out


def measured(g: Goodput, stages: int) -> Dict[str, float]:
    """The run's own accounting in the model's buckets, in worker-seconds (`outage_billed_w`: with the
    unpaid time added back, as the model bills it)."""
    lost = g.lost_machine_s
    b = {k: lost[k] / g.share for k in CAUSES}
    b["outage_billed_w"] = b["outage"] + g.unpaid_machine_s / g.share
    # A wait no failure caused: the replicas starting apart (their paces also differ on shared cores,
    # and a replica that is down frees CPU for the others: not separable, see BENCHMARKS.md).
    b["waits_start"] = g.wait_parts_machine_s["start"] / g.share
    paid = g.paid_machine_s
    t0, t1 = g.window_s
    # Billed as the model bills: W workers through the window, no idle machine, no unpaid gap.
    b["goodput_billed_as_model"] = g.useful_machine_s / (stages * len(g.steps) * g.share * (t1 - t0))
    return {**b, "goodput": g.goodput, **{f"{k}_fraction": lost[k] / paid for k in CAUSES},
            "idle_fraction": lost["idle"] / paid, "stall_fraction": lost["stall"] / paid,
            "pace_fraction": lost["pace"] / paid,
            "unpaid_fraction": g.unpaid_machine_s / paid,
            "waits_start_fraction": g.wait_parts_machine_s["start"] / paid,
            "pace_s": dict(g.pace_s)}


def compare(run_dir: str, rdv_r_s: float) -> dict:
    """Predicted against measured for one run directory."""
    with open(os.path.join(run_dir, "job.json")) as f:
        overlap = int(json.load(f)["diloco"].get("overlap", 0))
    rec = RunRecord.from_run_dir(run_dir)
    g = account(rec)
    tr = trace_of(rec, g, overlap)
    pred, meas = predict(tr, rdv_r_s), measured(g, rec.stages)
    err = {name: {k: p[f"{k}_fraction"] - meas[f"{k}_fraction"] for k in CAUSES}
           | {"goodput": p["goodput"] - meas["goodput"], "goodput_billed": p["goodput"] - meas["goodput_billed_as_model"]}
           for name, p in pred.items()}
    meas["pace_by_generation_s"] = paces_by_generation(rec)
    return {"run_dir": run_dir, "trace": asdict(tr), "measured": meas, **pred, "error": err, "stall_s": g.stall_s}
