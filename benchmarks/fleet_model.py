"""Prediction, not measurement: goodput of a large fleet under machine failures, for four recovery
policies, from a seeded discrete-event model driven by times measured on this machine.

Fleet. W machines = W workers (one GPU each) = R replicas x S stages; spares are not billed. Replicas
train with (Streaming) DiLoCo and meet every H steps. Goodput = useful worker-seconds / (W x wall).
Every lost worker-second is put in one bucket: `outage` (workers stopped), `discard` (work done but
thrown away), `checkpoint` (blocking saves), `regroup` (everyone waiting on a cross-replica group)
or `wait` (replicas waiting for a lagging one at a matched sync; `laggard="wait"` only).

Inputs and where they come from (printed in the JSON line under "inputs"):
- measured here, `benchmarks/rendezvous.py` (outputs/benchmarks/rendezvous.json, or its --quick run
  when that file is missing): rdv(n), the seconds to form an n-rank gloo group, from the fit over
  n = 2..32 on loopback, extrapolated to n <= 4096 (default: the wall-time fit, the better of a + b*N
  and a + b*N*log2(N); `--rdv-basis`, `--rdv-form` change it, and the JSON's "rdv_sensitivity" gives
  goodput at 10 %/h, 10 Gbit/s under every fitted form); `process_start_s`, spawn -> `import torch` done
  (the floor of any process restart; model build and CUDA init excluded).
- measured here, BENCHMARKS.md "Recovery" (`benchmarks/recovery.py`, SIGKILL, n = 3, tiny model,
  4 stages): detection `detect_s` = 0.042 s (median detect_s) and the fixed exchange latency
  `exchange_s` = 0.72 - 0.042 = 0.678 s (median recover_s minus detect_s: generation publication, new
  groups, a tiny-stage transfer; it includes a 4-rank group formation that rdv() also charges, so it
  counts that twice — a few ms).
- assumed: a 1B-parameter model, 16 bytes per parameter (fp32 weights, grads, two Adam moments),
  S = 8 stages, so one stage's state is 2 GB; transfer = stage bytes / link bandwidth (1 or
  10 Gbit/s, nothing else on the link); step 1 s; H = 100 steps; overlap tau = 1 step; a warm spare
  pool that is never empty (a spare takes a slot the moment it is asked, no provisioning delay);
  checkpoints written and read at the link bandwidth (remote storage behind the same NIC) and
  blocking; checkpoint interval = Young/Daly's optimum sqrt(2 x save x fleet MTBF) (the baseline's
  best case), at least one step.

Failures. Each machine fails as a Poisson process; "x %/h" is the probability of failing within an
hour (the CheckFree paper's convention), hazard = -ln(1 - x) per hour. A slot's replacement fails at
the same rate, so the fleet sees a Poisson stream at W x hazard with a uniformly random machine. One
trace per (W, rate, seed) is shared by all policies and both bandwidths (paired comparison).

Policies; D is the outage of the unit named, t the failure time, e the unit's last resume,
phase = (t - e) mod step (the step in flight), unsynced = time the failed replica has trained since
the last outer sync it took part in (syncs every H steps of wall time for replicas that are up; for
global generations every H steps of the fleet's up-time, since everyone stops together):
- global: D = detect + rdv(W) + exchange + transfer, all W workers stop. Lost:
  W x D + (W - 1) x phase (every replica retries its step) + unsynced (the dead stage restarts from
  the last synced copy).
- isolated (per-replica generations): D = detect + rdv(S) + exchange + transfer, only the replica's S
  workers stop. Lost: S x D + (S - 1) x phase + unsynced, + W x max(0, rdv(R) - tau x step) (the lost
  stage's cross-replica group re-forms at its next sync; the excess over the overlap stalls all).
  Others proceed without the replica at a sync that falls inside its outage; the replica then missed
  it and adopts the new global state, discarding its survivors' progress: + (S - 1) x (unsynced - phase)
  (`missed_sync="discard"`, the default and the conservative reading). `"catch_up"` instead applies
  the missed outer update to the replica's local state and keeps its progress: nothing more is lost;
  it is reported next to the default as "isolated_catch_up".
  `laggard="wait"` (reported as "isolated_matched_syncs"): what Kintsugi's Streaming DiLoCo does as
  measured (BENCHMARKS.md, "Fleet model against measured runs"): the k-th sync of a replica meets
  the k-th of its peers, so the replicas that went on during an outage wait for the lagging one at a
  later sync (or at the end of a fixed-steps job). Whenever at least one replica is down, every
  replica that is up eventually waits as long: + S x the integral of (R - replicas down) over the
  time some replica is down (bucket `wait`); with catch-up on missed syncs.
- checkpoint (torchrun elastic): every failure restarts all W from the last checkpoint.
  D = detect + process_start + rdv(W) + load. Training runs in cycles of interval + save (all W
  blocked while saving). Lost: W x D + W x (training since the last completed save) + W x saves.
- drop replica (torchft): the failed replica leaves, the others go on at (R - 1)/R. Its S processes
  restart (detect + process_start + rdv(S)), wait for the next outer sync (torchft's quorum runs in
  the DiLoCo sync) and heal from a peer (exchange + transfer, per stage in parallel). Lost: S x D +
  S x unsynced (the heal overwrites the replica's local progress) + 2 x W x max(0, rdv(R) - tau x step)
  (the quorum changes when it leaves and when it rejoins).
A failure inside an outage restarts that outage and discards nothing more (second order).

Left out here: correlated failures (a whole machine, a zone, the coordinator's machine: see
`benchmarks/fleet_correlated.py`, which runs this model on such traces), stragglers, convergence
effects (an absent replica or a rebuilt stage changes the loss, not just the time), fragments
(Streaming DiLoCo's P staggered syncs miss P times as often, each costing 1/P: the same to first
order), links shared by concurrent rebuilds, and rdv() beyond 32 ranks, which is an extrapolation of
a loopback fit. Waiting for a lagging replica at a matched sync is `laggard="wait"` (above); checked
against measured runs by `benchmarks/fleet_check.py`.

    python -m benchmarks.fleet_model [--quick] [--plot docs/fleet_model.png]
    python -m benchmarks.fleet_model --trace RUN_DIR     # one measured run: predicted vs recorded

Prints one JSON line; the Markdown table goes to stderr and outputs/benchmarks/fleet_model.md (--md).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from kintsugi.benchmarks import rendezvous

log = logging.getLogger("benchmarks.fleet_model")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_DIR = os.path.join(ROOT, "outputs", "benchmarks")
POLICIES = ("global", "isolated", "checkpoint", "drop_replica")
LABELS = {"global": "global generations", "isolated": "per-replica isolation",
          "checkpoint": "checkpoint-restart (torchrun elastic)", "drop_replica": "drop replica (torchft)",
          "isolated_catch_up": "per-replica isolation, catch-up on a missed sync",
          "isolated_matched_syncs": "per-replica isolation, matched syncs (Kintsugi as measured)"}
# BENCHMARKS.md, "Recovery" (benchmarks/recovery.py, SIGKILL, n = 3): median detect_s and recover_s.
BENCH_DETECT_S = 0.042
BENCH_RECOVER_S = 0.72


@dataclass
class Inputs:
    """Everything the model needs, in seconds and bytes; `rdv` is a `rendezvous.fit_models` result."""
    rdv: dict
    rdv_form: Optional[str] = None          # None: the fit's `best`
    process_start_s: float = 0.64
    detect_s: float = BENCH_DETECT_S
    exchange_s: float = BENCH_RECOVER_S - BENCH_DETECT_S
    stages: int = 8
    params: float = 1e9
    bytes_per_param: int = 16
    step_s: float = 1.0
    sync_every: int = 100                   # H
    overlap_steps: int = 1                  # tau
    ckpt_interval_s: Optional[float] = None  # None: Young/Daly optimum for the cell
    storage_gbit: Optional[float] = None    # None: the link bandwidth
    missed_sync: str = "discard"            # or "catch_up" (isolated only; see the module docstring)
    laggard: str = "proceed"                # or "wait": matched syncs (isolated only; see the docstring)

    def __post_init__(self):
        if self.missed_sync not in ("discard", "catch_up"):
            raise ValueError(f"missed_sync={self.missed_sync!r}: use 'discard' or 'catch_up'")
        if self.laggard not in ("proceed", "wait"):
            raise ValueError(f"laggard={self.laggard!r}: use 'proceed' or 'wait'")

    def rdv_s(self, n: int) -> float:
        return rendezvous.predict(self.rdv, n, self.rdv_form)


@dataclass
class Costs:
    """Per-cell durations derived from Inputs (see the module docstring for the formulas)."""
    workers: int
    stages: int
    step_s: float
    sync_s: float
    transfer_s: float
    d_global: float
    d_replica: float
    regroup_s: float
    missed_sync: str
    ft_ready_s: float
    ft_heal_s: float
    ckpt_restart_s: float
    ckpt_save_s: float
    ckpt_interval_s: float
    laggard: str = "proceed"

    @property
    def replicas(self) -> int:
        return self.workers // self.stages


def hazard_per_s(rate_per_h: float) -> float:
    """'x per hour' as the probability of failing within an hour -> Poisson hazard per second."""
    return -math.log1p(-rate_per_h) / 3600.0


def costs(inp: Inputs, workers: int, gbit: float, rate_per_h: float) -> Costs:
    s = inp.stages
    if workers % s or workers // s < 2:
        raise ValueError(f"workers={workers} must be a multiple of stages={s} with at least 2 replicas")
    stage_bytes = inp.params * inp.bytes_per_param / s
    transfer = stage_bytes * 8 / (gbit * 1e9)
    storage = stage_bytes * 8 / ((inp.storage_gbit or gbit) * 1e9)
    rebuild = inp.exchange_s + transfer
    haz = hazard_per_s(rate_per_h)
    mtbf = 1 / (workers * haz) if haz > 0 else math.inf
    interval = inp.ckpt_interval_s or max(inp.step_s, math.sqrt(2 * storage * mtbf))
    return Costs(workers=workers, stages=s, step_s=inp.step_s, sync_s=inp.sync_every * inp.step_s,
                 transfer_s=transfer,
                 d_global=inp.detect_s + inp.rdv_s(workers) + rebuild,
                 d_replica=inp.detect_s + inp.rdv_s(s) + rebuild,
                 regroup_s=max(0.0, inp.rdv_s(workers // s) - inp.overlap_steps * inp.step_s),
                 missed_sync=inp.missed_sync, laggard=inp.laggard,
                 ft_ready_s=inp.detect_s + inp.process_start_s + inp.rdv_s(s), ft_heal_s=rebuild,
                 ckpt_restart_s=inp.detect_s + inp.process_start_s + inp.rdv_s(workers) + storage,
                 ckpt_save_s=storage, ckpt_interval_s=interval)


def failure_trace(workers: int, rate_per_h: float, horizon_s: float, seed: int):
    """Sorted failure times and the machine of each: a Poisson stream at workers x hazard."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(workers * hazard_per_s(rate_per_h) * horizon_s)
    return np.sort(rng.uniform(0.0, horizon_s, n)), rng.integers(0, workers, n)


def _lost(**buckets) -> Dict[str, float]:
    return {k: float(v) for k, v in buckets.items()}


def sim_global(times: Sequence[float], c: Costs, horizon: float,
               durations: Optional[Sequence[float]] = None,
               exact: Optional[Sequence[bool]] = None) -> Dict[str, float]:
    """`durations`: each failure's own outage instead of `c.d_global` (benchmarks/fleet_correlated.py).
    `exact`: the failures announced by a notice, handed off: the holder sends its own state after
    its step and the others stop at their step's end, so nothing is thrown away."""
    w = c.workers
    outage = discard = 0.0
    up_before = 0.0                    # fleet up-time before the last resume (the sync clock)
    down_start, down_until = None, 0.0
    for i, t in enumerate(times):
        d = c.d_global if durations is None else durations[i]
        if t < down_until:             # a failure during the rebuild restarts it
            down_until = max(down_until, t + d)
            continue
        if down_start is not None:
            outage += w * (down_until - down_start)
        up = t - down_until
        phase = up % c.step_s
        if exact is None or not exact[i]:
            discard += (w - 1) * phase + (up_before + up) % c.sync_s
        up_before += up
        down_start, down_until = t, t + d
    if down_start is not None:
        outage += w * (min(down_until, horizon) - down_start)
    return _lost(outage=outage, discard=discard)


def laggard_waits(spans: Sequence[tuple], replicas: int, stages: int) -> float:
    """Worker-seconds the replicas that are up wait for those that are down, under matched syncs:
    S x the integral of (R - replicas down) over the time at least one is down. `spans`: every
    replica's (start, end) down intervals, disjoint within a replica."""
    edges = sorted((t, d) for a, b in spans if b > a for t, d in ((a, 1), (b, -1)))
    total, down, last = 0.0, 0, None
    for t, d in edges:
        if down > 0:
            total += stages * (replicas - down) * (t - last)
        down, last = down + d, t
    return total


def _replica_sim(times, machines, c: Costs, horizon: float, drop_replica: bool,
                 durations: Optional[Sequence[float]] = None,
                 exact: Optional[Sequence[bool]] = None) -> Dict[str, float]:
    """Per-replica units: `isolated` (rebuild in place) or `drop_replica` (torchft-style heal).
    A measured trace (benchmarks/fleet_trace.py) gives each failure's own outage (`durations`, instead
    of `c.d_replica`) and whether its rebuild was exact (`exact`: a handoff of the leaving worker's own
    state; the replica loses the step in flight, S x phase, and nothing since the last sync)."""
    s, r_count, sync = c.stages, c.replicas, c.sync_s
    down_start = [None] * r_count
    down_until = [0.0] * r_count
    unsynced_at_resume = [0.0] * r_count  # unsynced progress the replica carries into its resume
    kept = [0.0] * r_count                # survivors' unsynced progress at the failure (isolated)
    acc = {"outage": 0.0, "discard": 0.0, "regroup": 0.0}
    spans = []                            # (start, end) of every outage, clipped to the horizon
    last_regroup_t = None

    def rejoin(t: float, i: int) -> float:
        if not drop_replica:
            return t + (c.d_replica if durations is None else durations[i])
        return math.ceil((t + c.ft_ready_s) / sync) * sync + c.ft_heal_s

    def close(r: int) -> None:
        start, end = down_start[r], down_until[r]
        if start is None:
            return
        acc["outage"] += s * (min(end, horizon) - start)
        spans.append((start, min(end, horizon)))
        missed = math.floor(end / sync) * sync > start  # a sync fell inside the outage
        if drop_replica:
            unsynced_at_resume[r] = 0.0                 # healed to the global state
        elif missed and c.missed_sync == "discard":
            if math.floor(end / sync) * sync < horizon:
                acc["discard"] += (s - 1) * kept[r]
            unsynced_at_resume[r] = 0.0
        else:
            unsynced_at_resume[r] = kept[r]
        down_start[r] = None

    for i, (t, m) in enumerate(zip(times, machines)):
        r = int(m) // s
        if t < down_until[r]:
            down_until[r] = max(down_until[r], rejoin(t, i))
            continue
        close(r)
        e = down_until[r]
        last_sync = math.floor(t / sync) * sync
        unsynced = t - last_sync if last_sync >= e else unsynced_at_resume[r] + (t - e)
        phase = (t - e) % c.step_s
        # Replicas lost at the same moment (a machine, a zone: benchmarks/fleet_correlated.py) share
        # one re-formation of the cross-replica groups.
        regroup = 0.0 if t == last_regroup_t else c.workers * c.regroup_s
        last_regroup_t = t
        if drop_replica:
            acc["discard"] += s * unsynced
            acc["regroup"] += 2 * regroup
        elif exact is not None and exact[i]:
            acc["discard"] += s * phase
            kept[r] = unsynced - phase
            acc["regroup"] += regroup
        else:
            acc["discard"] += unsynced + (s - 1) * phase
            kept[r] = unsynced - phase
            acc["regroup"] += regroup
        down_start[r], down_until[r] = t, rejoin(t, i)
    for r in range(r_count):
        close(r)
    if c.laggard == "wait" and not drop_replica:
        acc["wait"] = laggard_waits(spans, r_count, s)
    return _lost(**acc)


def sim_isolated(times, machines, c: Costs, horizon: float) -> Dict[str, float]:
    return _replica_sim(times, machines, c, horizon, drop_replica=False)


def sim_drop_replica(times, machines, c: Costs, horizon: float) -> Dict[str, float]:
    return _replica_sim(times, machines, c, horizon, drop_replica=True)


def sim_checkpoint(times: Sequence[float], c: Costs, horizon: float,
                   noticed: Optional[Sequence[bool]] = None) -> Dict[str, float]:
    """`noticed`: the failures announced by a notice: the job saves once more on the notice (all W
    blocked for a save) and restarts from that, so nothing is rolled back."""
    w, tau, save = c.workers, c.ckpt_interval_s, c.ckpt_save_s
    outage = rollback = saves = 0.0
    down_start, down_until = None, 0.0

    def segment(x: float):  # x seconds of (train tau, save) cycles since a resume
        cycles = math.floor(x / (tau + save))
        rem = x - cycles * (tau + save)
        return cycles * save + max(0.0, rem - tau), min(rem, tau)  # (saving, training since last save)

    for i, t in enumerate(times):
        if t < down_until:
            down_until = t + c.ckpt_restart_s
            continue
        if down_start is not None:
            outage += w * (down_until - down_start)
        saving, unsaved = segment(t - down_until)
        saves += w * saving
        if noticed is not None and noticed[i]:
            saves += w * save
        else:
            rollback += w * unsaved
        down_start, down_until = t, t + c.ckpt_restart_s
    if down_start is not None:
        outage += w * (min(down_until, horizon) - down_start)
    if down_until < horizon:
        saves += w * segment(horizon - down_until)[0]   # the training after the last save is kept
    return _lost(outage=outage, discard=rollback, checkpoint=saves)


def simulate(policy: str, times, machines, c: Costs, horizon: float) -> Dict[str, float]:
    """Lost worker-seconds by bucket, plus `goodput`."""
    if policy == "global":
        lost = sim_global(times, c, horizon)
    elif policy == "isolated":
        lost = sim_isolated(times, machines, c, horizon)
    elif policy == "checkpoint":
        lost = sim_checkpoint(times, c, horizon)
    elif policy == "drop_replica":
        lost = sim_drop_replica(times, machines, c, horizon)
    else:
        raise ValueError(f"policy={policy!r}: use one of {POLICIES}")
    total = c.workers * horizon
    lost["goodput"] = max(0.0, 1.0 - sum(lost.values()) / total)
    return lost


def sweep(inp: Inputs, workers: Sequence[int], rates: Sequence[float], gbits: Sequence[float],
          horizon_s: float, seeds: Sequence[int], policies: Sequence[str] = POLICIES) -> List[dict]:
    cells = []
    for w in workers:
        for rate in rates:
            traces = [failure_trace(w, rate, horizon_s, 1000003 * seed + w + int(rate * 1000)) for seed in seeds]
            for gbit in gbits:
                c = costs(inp, w, gbit, rate)
                for policy in policies:
                    runs = [simulate(policy, t, m, c, horizon_s) for t, m in traces]
                    g = [run["goodput"] for run in runs]
                    buckets = {k: statistics.mean(run.get(k, 0.0) for run in runs) / (w * horizon_s)
                               for k in ("outage", "discard", "checkpoint", "regroup", "wait")}
                    cells.append({"workers": w, "replicas": w // inp.stages, "rate_per_h": rate, "gbit": gbit,
                                  "policy": policy, "goodput_mean": statistics.mean(g),
                                  "goodput_min": min(g), "goodput_max": max(g),
                                  "goodput_std": statistics.stdev(g) if len(g) > 1 else 0.0,
                                  "failures_mean": statistics.mean(len(t) for t, _ in traces),
                                  "lost_fraction": {k: round(v, 5) for k, v in buckets.items() if v}})
    return cells


def cost_table(inp: Inputs, workers, gbits, rates) -> List[dict]:
    rows = []
    for w in workers:
        for gbit in gbits:
            c = costs(inp, w, gbit, rates[0])
            rows.append({"workers": w, "gbit": gbit, **{k: round(v, 4) for k, v in asdict(c).items()
                                                          if k not in ("workers", "stages", "ckpt_interval_s", "missed_sync", "laggard")},
                         "rdv_W_s": round(inp.rdv_s(w), 4), "rdv_S_s": round(inp.rdv_s(inp.stages), 4),
                         "rdv_R_s": round(inp.rdv_s(w // inp.stages), 4)})
    return rows


def rdv_sensitivity(inp: Inputs, workers, horizon_s: float, seeds, rate: float = 0.10, gbit: float = 10.0) -> dict:
    """Goodput at one rate and bandwidth under each fitted rendezvous form: how much the
    extrapolation of rdv() beyond 32 ranks decides."""
    out = {}
    for form in rendezvous.FIT_FORMS:
        alt = Inputs(**{**asdict(inp), "rdv_form": form})
        cells = sweep(alt, workers, [rate], [gbit], horizon_s, seeds)
        out[form] = {"rdv_s": {str(w): round(alt.rdv_s(w), 3) for w in workers},
                     "goodput": {p: {str(c["workers"]): round(c["goodput_mean"], 4) for c in cells if c["policy"] == p}
                                 for p in POLICIES}}
    return {"rate_per_h": rate, "gbit": gbit, "forms": out}


def markdown(cells: List[dict], workers, rates, gbits) -> str:
    lines = []
    rows = [p for p in LABELS if any(c["policy"] == p for c in cells)]
    for gbit in gbits:
        lines += [f"Goodput at {gbit:g} Gbit/s (mean over seeds; min-max in brackets when they differ by >= 0.005)",
                  "", "| policy | rate %/h | " + " | ".join(f"W={w}" for w in workers) + " |",
                  "|---|---|" + "---|" * len(workers)]
        for policy in rows:
            for rate in rates:
                row = []
                for w in workers:
                    c = next(x for x in cells if (x["workers"], x["rate_per_h"], x["gbit"], x["policy"])
                             == (w, rate, gbit, policy))
                    txt = f"{c['goodput_mean']:.3f}"
                    if c["goodput_max"] - c["goodput_min"] >= 0.005:
                        txt += f" ({c['goodput_min']:.3f}-{c['goodput_max']:.3f})"
                    row.append(txt)
                lines.append(f"| {LABELS[policy]} | {rate * 100:g} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(cells: List[dict], workers, rates, gbit: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(rates), figsize=(3.2 * len(rates), 3.2), sharey=True)
    for ax, rate in zip(np.atleast_1d(axes), rates):
        for policy in POLICIES:
            sel = [next(x for x in cells if (x["workers"], x["rate_per_h"], x["gbit"], x["policy"])
                        == (w, rate, gbit, policy)) for w in workers]
            mean = [x["goodput_mean"] for x in sel]
            err = [[m - x["goodput_min"] for m, x in zip(mean, sel)], [x["goodput_max"] - m for m, x in zip(mean, sel)]]
            ax.errorbar(workers, mean, yerr=err, marker="o", ms=3, capsize=2, label=LABELS[policy])
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(workers), [str(w) for w in workers])
        ax.set_title(f"{rate * 100:g} %/h per machine", fontsize=9)
        ax.set_xlabel("workers W (S = 8)", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel("goodput (predicted)", fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"Fleet model: goodput vs fleet size, {gbit:g} Gbit/s, 1B model "
                 "(benchmarks/fleet_model.py)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_rendezvous(path: str = rendezvous.OUT_PATH) -> tuple:
    """(rendezvous JSON, where it came from): the saved run at `path`, else a fresh --quick run saved there."""
    shown = os.path.relpath(path, ROOT)
    if os.path.exists(path):
        with open(path) as f:
            data = json.loads(f.readline())
        return data, f"{shown} ({'--quick' if data.get('quick') else 'full'} run)"
    log.info("%s missing: running `python -m benchmarks.rendezvous --quick` (~15 s)", shown)
    data = rendezvous.run(quick=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(data) + "\n")
    return data, f"fresh `benchmarks.rendezvous --quick` run (saved to {shown})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 h of fleet time, 2 seeds (< 60 s)")
    ap.add_argument("--hours", type=float, default=24.0, help="simulated wall time per cell")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rdv-basis", choices=("wall", "rank_cpu"), default="wall",
                    help="fit of the measured wall time (default) or of one rank's CPU time")
    ap.add_argument("--rdv-form", choices=tuple(rendezvous.FIT_FORMS), default=None,
                    help="force one fitted form (default: the better of a+b*N and a+b*N*log2(N))")
    ap.add_argument("--md", default=os.path.join(REPORT_DIR, "fleet_model.md"), help="where the table goes")
    ap.add_argument("--rendezvous", default=rendezvous.OUT_PATH, help="benchmarks.rendezvous output to read")
    ap.add_argument("--plot", default=None, help="write the 10 Gbit/s figure here (e.g. docs/fleet_model.png)")
    ap.add_argument("--trace", default=None, metavar="RUN_DIR",
                    help="predict one measured run from its own failure trace, next to what it recorded "
                         "(benchmarks/fleet_trace.py), instead of the fleet-scale sweep")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.trace:
        from kintsugi.benchmarks import fleet_trace  # it imports this module: not at the top
        rdv_data, source = load_rendezvous(args.rendezvous)
        with open(os.path.join(args.trace, "job.json")) as f:
            replicas = int(json.load(f)["parallel"]["replicas"])
        rdv_r = rendezvous.predict(rdv_data[f"fit_{args.rdv_basis}"], replicas, args.rdv_form)
        print(json.dumps({"benchmark": "fleet_model", "mode": "trace", "rdv_source": source,
                          **fleet_trace.compare(args.trace, rdv_r)}))
        return 0
    hours, seeds = (2.0, 2) if args.quick else (args.hours, args.seeds)
    workers, rates, gbits = (64, 256, 1024, 4096), (0.05, 0.10, 0.16, 0.33), (1.0, 10.0)

    rdv_data, source = load_rendezvous(args.rendezvous)
    log.info("rendezvous input: %s", source)
    fit = rdv_data[f"fit_{args.rdv_basis}"]
    inp = Inputs(rdv=fit, rdv_form=args.rdv_form, process_start_s=rdv_data["process_start_s"])
    t0 = time.monotonic()
    cells = sweep(inp, workers, rates, gbits, hours * 3600, list(range(seeds)))
    catch_up = Inputs(**{**asdict(inp), "missed_sync": "catch_up"})
    cells += [dict(c, policy="isolated_catch_up")
              for c in sweep(catch_up, workers, rates, gbits, hours * 3600, list(range(seeds)), ("isolated",))]
    matched = Inputs(**{**asdict(inp), "missed_sync": "catch_up", "laggard": "wait"})
    cells += [dict(c, policy="isolated_matched_syncs")
              for c in sweep(matched, workers, rates, gbits, hours * 3600, list(range(seeds)), ("isolated",))]
    sensitivity = rdv_sensitivity(inp, workers, hours * 3600, list(range(seeds)))
    table = markdown(cells, workers, rates, gbits)
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
        f.write(table + "\n")
    print(table, file=sys.stderr)
    if args.plot:
        plot(cells, workers, rates, 10.0, args.plot)
        log.info("plot written to %s", args.plot)
    form = args.rdv_form or fit["best"]
    inputs = {k: v for k, v in asdict(inp).items() if k != "rdv"}
    inputs.update({
        "rdv_source": source, "rdv_basis": args.rdv_basis, "rdv_form": form,
        "rdv_a": fit["models"][form]["a"], "rdv_b": fit["models"][form]["b"],
        "rdv_measured_median_s": {n: v["median_s"] for n, v in rdv_data["per_n"].items()},
        "rdv_detection_kill_n2_median_s": rdv_data["detection_kill_n2"]["median_s"],
        "measured": ["rdv (benchmarks/rendezvous.py)", "process_start_s (benchmarks/rendezvous.py, N=2)",
                     "detect_s (BENCHMARKS.md Recovery, SIGKILL median)",
                     "exchange_s (BENCHMARKS.md Recovery, recover_s - detect_s medians)"],
        "assumed": ["stages=8", "1e9 params x 16 B", "step 1 s", "H=100", "tau=1", "warm spare pool, no delay",
                    "checkpoint at link bandwidth, blocking, Young/Daly interval", "hazard=-ln(1-x)/h"],
    })
    out = {"benchmark": "fleet_model", "quick": args.quick, "hours": hours, "seeds": seeds,
           "inputs": inputs, "costs": cost_table(inp, workers, gbits, rates), "cells": cells,
           "rdv_sensitivity": sensitivity, "plot": args.plot, "sim_s": round(time.monotonic() - t0, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
