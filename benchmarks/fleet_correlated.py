"""Prediction, not measurement: the fleet model (`benchmarks/fleet_model.py`) with correlated losses
next to independent ones: a whole machine, a zone, and the coordinator's machine.

Same fleet, inputs and policies as the fleet model (R replicas x S = 8 stages, 1B model, step 1 s,
H = 100, 10 Gbit/s, rdv() from `benchmarks/rendezvous.py`), one GPU failure rate (`--rate`, 10 %/h),
per-replica isolation read as Kintsugi behaves when measured (`benchmarks/fleet_check.py`: missed
syncs caught up, matched syncs make the others wait for a lagging replica). Scenarios, each a trace
of events shared by every policy (paired):

- independent: every GPU fails alone (the fleet model's own trace).
- notice: the same events, of which NOTICE_SHARE come with an interruption notice (the share
  `benchmarks/spot_fleet.py` assumes: 30 % act as kills). A noticed loss is handed off: under
  isolation and global generations the holder sends its own state after its step (exact: no unsynced
  progress lost), and the outage is the group re-formation, the transfer and HANDOFF_S (a handoff's
  fixed cost measured here) instead of detection + the exchange of a rebuild; checkpoint-restart
  saves once more on the notice and rolls nothing back; torchft has no handoff (a noticed loss is
  a loss).
- machine: 8 GPUs per machine, and any failure of one takes the machine; its 8 slots belong to 8
  different replicas, each a different stage (a placement that keeps every lost stage's peers on
  other machines, as Kintsugi's placement check asks). Same number of events as `independent`, 8
  slots each.
- zone: `independent`, plus one zone lost at a uniformly random time: a quarter of the machines (W/4
  slots, spread over the replicas the same way) at once.
- coordinator_etcd: the same trace as `coordinator` with the control plane on etcd
  (`recovery.control=etcd`, a standby on another machine): the stall and the failover are those
  `benchmarks/control_failover.py` measures in training (ETCD_STALL_S, ETCD_FAILOVER_S; `--etcd-stall-s`,
  `--etcd-failover-s`). The `coordinator` row keeps the local control plane's restart in place, which
  a real loss of that machine does not allow: there the workers save and exit after
  `recovery.coordinator_wait_s` and the run waits for a person to resume it (not modelled).
- coordinator: `independent`, plus the coordinator's machine failing at the machine rate (8 GPUs'
  worth). Two costs, both measured here: every replica stalls `stall_s` (`benchmarks/fleet_check.py`,
  trace 2x2-coord: the coordinator SIGKILLed, restarted by the launcher 0.3 s later, and the replicas
  stopped 4.6 s and 7.1 s; their mean, read from outputs/benchmarks/fleet_check.json, or
  `--stall-s`), and a rebuild that starts while it is down ends `failover_s` after the loss at the
  earliest (the etcd lease failover of `benchmarks/control_failover.py`, BENCHMARKS.md: 3.04 s mean,
  TTL 3 s; `--failover-s`). torchrun elastic keeps its rendezvous store on one node: the model
  restarts the job (a failure of every worker) when that node is lost. torchft's lighthouse is
  treated like Kintsugi's coordinator (the same stall and delay).

    python -m benchmarks.fleet_check          # once: the coordinator stall (outputs/benchmarks/fleet_check.json)
    python -m benchmarks.fleet_correlated [--quick] [--rate 0.10] [--failover-s 3.04] [--stall-s S]

Prints one JSON line; the Markdown table goes to stderr and outputs/benchmarks/fleet_correlated.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict
from typing import Dict, List, Sequence, Tuple

import numpy as np

from kintsugi.benchmarks import fleet_model as FM

GPUS_PER_MACHINE = 8
ZONES = 4
FAILOVER_S = 3.04     # BENCHMARKS.md, "Control plane on etcd": mean etcd failover, lease TTL 3 s
SCENARIOS = ("independent", "notice", "machine", "zone", "coordinator", "coordinator_etcd")
NOTICE_SHARE = 0.7    # benchmarks/spot_fleet.py: NO_NOTICE_FRACTION = 0.3 of preemptions act as kills
# A handoff's fixed cost, measured: `python -m benchmarks.spot_fleet` r2 (2026-12-07, quiet, BENCHMARKS.md
# "A ready spare reserved per holder"): recover_s 0.11 and 0.28 s, group formation and a tiny transfer included.
HANDOFF_S = 0.2
# recovery.control=etcd, measured by `python -m benchmarks.control_failover --runs 1 --saves 10 --train-runs 3
# --train-steps 40 --pairs 0` (2026-12-06, load 2.8, BENCHMARKS.md "Control plane on etcd"): the
# standby's address seen 2.93-2.98 s after the leader's SIGKILL, and the replicas stopped 0.32-0.66 s
# (mean 0.443 s; benchmarks._goodput's stall, no failure of their own) while they trained on.
ETCD_FAILOVER_S = 2.967
ETCD_STALL_S = 0.443
POLICIES = ("global", "isolated", "isolated_matched_syncs", "checkpoint", "drop_replica")


def _spread(first: int, count: int, workers: int, stages: int) -> List[int]:
    """`count` distinct slots starting at slot `first`: consecutive replicas, each a different stage
    (slot j: replica r0 + j, stage s + j + j // R), so that a lost stage keeps peers elsewhere."""
    replicas = workers // stages
    r0, s = divmod(first, stages)
    return [((r0 + j) % replicas) * stages + (s + j + j // replicas) % stages for j in range(count)]


def events(scenario: str, workers: int, stages: int, rate: float, horizon: float, seed: int):
    """(times, slots, coordinator loss times, noticed), times sorted; one entry per lost slot;
    noticed[i]: loss i came with an interruption notice."""
    times, slots = FM.failure_trace(workers, rate, horizon, seed)
    times, slots = list(times), [int(m) for m in slots]
    coord: List[float] = []
    rng = np.random.default_rng(seed + 7919)
    if scenario == "notice":
        notice_rng = np.random.default_rng(seed + 104729)
        return times, slots, coord, [bool(x) for x in notice_rng.random(len(times)) < NOTICE_SHARE]
    if scenario == "machine":
        times, slots = [t for t in times for _ in range(GPUS_PER_MACHINE)], \
            [x for m in slots for x in _spread(m, min(GPUS_PER_MACHINE, workers // stages), workers, stages)]
    elif scenario == "zone":
        t = float(rng.uniform(0.0, horizon))
        lost = _spread(int(rng.integers(0, workers)), workers // ZONES, workers, stages)
        merged = sorted([*zip(times, slots), *((t, x) for x in lost)])
        times, slots = [a for a, _ in merged], [b for _, b in merged]
    elif scenario in ("coordinator", "coordinator_etcd"):
        n = rng.poisson(GPUS_PER_MACHINE * FM.hazard_per_s(rate) * horizon)
        coord = sorted(rng.uniform(0.0, horizon, n).tolist())
    return times, slots, coord, [False] * len(times)


def delayed(times: Sequence[float], base, coord: Sequence[float], failover: float) -> List[float]:
    """Each failure's outage: `base` (one for all, or one per failure), or until `failover` after a
    coordinator loss it starts inside."""
    bases = list(base) if isinstance(base, (list, tuple)) else [base] * len(times)
    out = []
    for t, b in zip(times, bases):
        ends = [c + failover for c in coord if c <= t < c + failover]
        out.append(max(b, max(ends) - t) if ends else b)
    return out


def measured_stall(path: str = os.path.join(FM.REPORT_DIR, "fleet_check.json")) -> Tuple[float, str]:
    """Mean replica stall after a coordinator loss, from the last full `benchmarks.fleet_check` run."""
    with open(path) as f:
        stalls = json.loads(f.readline())["coordinator_stall_s"]
    if not stalls:
        raise ValueError(f"{path} has no 2x2-coord stall; run `python -m benchmarks.fleet_check` again")
    return statistics.mean(stalls.values()), os.path.relpath(path, FM.ROOT)


def run_policy(policy: str, inp: FM.Inputs, workers: int, gbit: float, rate: float, horizon: float,
               times, slots, coord, noticed, failover: float, stall: float) -> Dict[str, float]:
    if policy == "isolated_matched_syncs":
        inp = FM.Inputs(**{**asdict(inp), "missed_sync": "catch_up", "laggard": "wait"})
    c = FM.costs(inp, workers, gbit, rate)

    def outages(rebuild: float) -> List[float]:  # a handoff: no detection, HANDOFF_S instead of the exchange
        handoff = rebuild - inp.detect_s - inp.exchange_s + HANDOFF_S
        return delayed(times, [handoff if n else rebuild for n in noticed], coord, failover)

    if policy in ("global",):
        lost = FM.sim_global(times, c, horizon, durations=outages(c.d_global), exact=noticed)
    elif policy in ("isolated", "isolated_matched_syncs"):
        lost = FM._replica_sim(times, slots, c, horizon, drop_replica=False, durations=outages(c.d_replica),
                               exact=noticed)
    elif policy == "checkpoint":
        merged = sorted([*zip(times, noticed), *((t, False) for t in coord)])
        lost = FM.sim_checkpoint([t for t, _ in merged], c, horizon, noticed=[n for _, n in merged])
    else:
        lost = FM.sim_drop_replica(times, slots, c, horizon)
    if policy != "checkpoint" and coord:
        lost["coordinator"] = workers * stall * len(coord)
    lost["goodput"] = max(0.0, 1.0 - sum(lost.values()) / (workers * horizon))
    return lost


def table(cells: List[dict], workers: Sequence[int]) -> str:
    lines = ["| scenario | policy | " + " | ".join(f"W={w}" for w in workers) + " |",
             "|---|---|" + "---|" * len(workers)]
    for sc in SCENARIOS:
        for p in POLICIES:
            row = [next(c for c in cells if (c["scenario"], c["policy"], c["workers"]) == (sc, p, w)) for w in workers]
            lines.append(f"| {sc} | {FM.LABELS.get(p, p)} | "
                         + " | ".join(f"{c['goodput_mean']:.3f}" for c in row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 h of fleet time, 2 seeds")
    ap.add_argument("--rate", type=float, default=0.10, help="per GPU, probability of failing within an hour")
    ap.add_argument("--gbit", type=float, default=10.0)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--failover-s", type=float, default=FAILOVER_S)
    ap.add_argument("--etcd-failover-s", type=float, default=ETCD_FAILOVER_S)
    ap.add_argument("--etcd-stall-s", type=float, default=ETCD_STALL_S)
    ap.add_argument("--stall-s", type=float, default=None,
                    help="replica stall per coordinator loss (default: outputs/benchmarks/fleet_check.json)")
    ap.add_argument("--md", default=os.path.join(FM.REPORT_DIR, "fleet_correlated.md"))
    args = ap.parse_args(argv)
    hours, seeds = (2.0, 2) if args.quick else (args.hours, args.seeds)
    horizon = hours * 3600
    workers = (64, 256, 1024, 4096)
    rdv_data, source = FM.load_rendezvous()
    inp = FM.Inputs(rdv=rdv_data["fit_wall"], process_start_s=rdv_data["process_start_s"])
    stall, stall_source = (args.stall_s, "--stall-s") if args.stall_s is not None else measured_stall()
    cells = []
    for w in workers:
        for sc in SCENARIOS:
            traces = [events(sc, w, inp.stages, args.rate, horizon, 1000003 * seed + w) for seed in range(seeds)]
            for p in POLICIES:
                failover, pause = ((args.etcd_failover_s, args.etcd_stall_s) if sc == "coordinator_etcd"
                                   else (args.failover_s, stall))
                runs = [run_policy(p, inp, w, args.gbit, args.rate, horizon, *tr, failover, pause) for tr in traces]
                g = [r["goodput"] for r in runs]
                cells.append({"workers": w, "scenario": sc, "policy": p, "goodput_mean": statistics.mean(g),
                              "goodput_min": min(g), "goodput_max": max(g),
                              "events_mean": statistics.mean(len(tr[0]) for tr in traces),
                              "coordinator_losses_mean": statistics.mean(len(tr[2]) for tr in traces),
                              "lost_fraction": {k: round(statistics.mean(r.get(k, 0.0) for r in runs) / (w * horizon), 5)
                                                for k in ("outage", "discard", "checkpoint", "regroup", "wait", "coordinator")}})
    md = table(cells, workers)
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
        f.write(md + "\n")
    print(md, file=sys.stderr)
    print(json.dumps({"benchmark": "fleet_correlated", "quick": args.quick, "hours": hours, "seeds": seeds,
                      "rate_per_h": args.rate, "gbit": args.gbit, "failover_s": args.failover_s, "etcd_failover_s": args.etcd_failover_s, "etcd_stall_s": args.etcd_stall_s,
                      "coordinator_stall_s": stall, "stall_source": stall_source,
                      "gpus_per_machine": GPUS_PER_MACHINE, "zones": ZONES, "rdv_source": source, "cells": cells}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
