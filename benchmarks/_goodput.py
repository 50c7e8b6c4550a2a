"""Goodput of a run from its own records, split by cause, in machine-seconds.

Read from the run directory: the launcher's machine lifetimes (`machines.json`), the coordinator's
clock (`control_state.json` t0), the commits and rebuild events (`metrics.jsonl`) and the grid
(`job.json`). Nothing is compared with another run, so a machine that is uniformly slower or faster
while the run goes on moves the useful work and the paid time together.

Window. Training runs from the first step's start (the earliest first commit minus that replica's
pace) to the last commit. Machine time outside it (imports, corpus, spawning; the final evaluation
and shutdown) is a per-job constant that does not grow with the run or with failures: it is reported
as `startup_teardown` and `goodput_lifetime`, and left out of `goodput`.

Pace. A replica's pace is the mean gap between its consecutive commits in one generation, less the
time its stages sat blocked on an outer sync in that gap (those waits are their own bucket), over the
gaps within 1/4 to 4 times their median (commit times are the coordinator's: while it restarts, the
commits reach it late and in a batch). The mean, not the median: the mean is what a failure-free
step costs this run, syncs' own compute and slow patches included; with a median those show up as a
loss that no failure caused. The waits at outer syncs in rounds of H steps that no outage touched
(`healthy_sync_wait`) are part of that cost too: replicas on noisy shared cores wait for each other
at every sync with nothing failed, so a failure-free step is priced with its share of them, and only
the waits beyond it (a rebuilt replica lagging, the others waiting) are the `waits` loss.

Accounting, per replica r (S slots, each one `share` machine: machines per worker at the start),
over the window of length T:

    S x T = n_r x (pace_r x S + w_r) - unsynced useful (distinct committed steps; w_r: r's healthy
                                                 sync wait per step, its stages summed)
          + S x sum of r's outages               outage: failure -> training again (rebuild event),
                                                 split into detection, waiting for a replacement
                                                 machine (failure -> its start) and restart+regroup+transfer
          + S x (failure - last commit before)   discard: the step in flight when it failed (at
                                                   most one pace),
            + repeated steps x pace x S            steps committed again after a rollback,
            + (k mod H) x pace                     and the rebuilt stage's progress since its last
                                                   outer sync when a tier other than handoff rebuilt
                                                   it (peer copies the last synced state; k = the
                                                   step it resumes at): those steps stay committed,
                                                   but that stage's work on them is gone, so it
                                                   moves from useful to discard
          + sum of outer-sync waits - n_r x w_r   waits: at syncs beyond the failure-free share,
            + S x (head_r + tail_r)                and before r's first step and after its last
                                                   commit (the final meeting point)
          + S x sum of (gap - pace) over gaps     stall: the replica stopped with no failure of its
            outside 1/4 to 4 medians               own (the coordinator away: a long gap, then the
                                                   late commits in a batch; net over both)
          + the rest                             pace: steps slower than the pace (warm-up after a
                                                 resume, noise); can be < 0

Machines. n(t) = machines alive (machines.json); slot_machines = R x S x share. Machine time beyond
slot_machines holds no slot: `idle` (spares, a replacement that boots while the notice holder still
hands off, a notice holder after handoff). Time below it (a killed machine not yet replaced) is not
paid: `unpaid`, taken off the outage (first from waiting for a replacement). So

    paid = useful + outage + discard + waits + idle + stall + pace,    goodput = useful / paid.

    python -m benchmarks._goodput RUN_DIR    # one JSON line
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from kintsugi.recovery.runfiles import CONTROL_STATE, FINAL_STATE, JOB, MACHINES, read_metrics

CAUSES = ("outage", "discard", "waits", "idle", "stall", "pace")
OUTAGE_PARTS = ("detect", "replacement", "restart_regroup_transfer")
EXACT_TIERS = ("handoff",)              # the leaving worker's own state: nothing since the last sync is lost
DISCARD_PARTS = ("in_flight", "repeated", "unsynced")
WAIT_PARTS = ("sync", "start", "end")   # at outer syncs; before a replica's first step; after its last commit


@dataclass(frozen=True)
class Machine:
    name: str
    start: float        # seconds since the coordinator's t0
    end: float
    cause: Optional[str]
    workers: int


@dataclass(frozen=True)
class Commit:
    replica: int
    step: int
    t: float            # coordinator time of the commit
    gen: int
    outer_wait_s: Tuple[float, ...] = ()


@dataclass(frozen=True)
class Outage:
    replica: int
    stage: int
    tier: str
    step: int
    failed: float       # seconds since t0
    resumed: float
    detect_s: float


@dataclass
class RunRecord:
    """What the goodput needs from a run directory, typed; times in seconds since the coordinator's t0."""
    replicas: int
    stages: int
    sync_every: int
    machines: List[Machine]
    commits: List[Commit]
    outages: List[Outage]

    @classmethod
    def from_run_dir(cls, run_dir: str) -> "RunRecord":
        with open(os.path.join(run_dir, JOB)) as f:
            job = json.load(f)
        # The run's clock: the state file (local control plane), else the coordinator's final record
        # (under recovery.control=etcd the state lives in etcd).
        path = os.path.join(run_dir, CONTROL_STATE)
        with open(path if os.path.exists(path) else os.path.join(run_dir, FINAL_STATE)) as f:
            t0 = float(json.load(f)["t0"])
        with open(os.path.join(run_dir, MACHINES)) as f:
            machines = [Machine(name, m["start"] - t0, m["end"] - t0, m.get("cause"), len(m.get("workers", [])) or 1)
                        for name, m in json.load(f).items()]
        m = read_metrics(run_dir)
        commits = [Commit(int(c["replica"]), int(c["step"]), float(c["wall_s"]), int(c.get("gen", c.get("cell_gen", 0))),
                          tuple(c.get("outer_wait_s") or ()))
                   for c in m.commits if not c.get("duplicate") and "wall_s" in c]
        outages = [Outage(int(e["slot"][0]), int(e["slot"][1]), e["tier"], int(e["step"]),
                          e["failed_at"] - t0, e["resumed_at"] - t0, float(e["detect_s"]))
                   for e in m.events if e.get("kind") == "rebuild" and "failed_at" in e and "resumed_at" in e]
        return cls(int(job["parallel"]["replicas"]), int(job["parallel"]["stages"]),
                   int(job["diloco"]["sync_every"]) if job["diloco"]["enabled"] else 0,
                   machines, commits, outages)


@dataclass
class Goodput:
    goodput: float
    goodput_lifetime: float
    paid_machine_s: float              # in the window
    useful_machine_s: float
    lost_machine_s: Dict[str, float]   # CAUSES
    outage_parts_machine_s: Dict[str, float]
    discard_parts_machine_s: Dict[str, float]
    wait_parts_machine_s: Dict[str, float]
    unpaid_machine_s: float
    startup_teardown_machine_s: float
    window_s: Tuple[float, float]
    pace_s: Dict[int, float]           # replica -> mean healthy step
    pace_median_s: Dict[int, float]
    stall_s: Dict[int, float]          # replica -> seconds stopped with no failure of its own
    steps: Dict[int, int]              # replica -> distinct committed steps
    share: float                       # machines per worker

    def goodput_without_stalls(self) -> float:
        """Useful over paid less the stalls: where nothing of the run failed (no coordinator loss),
        a stall is the host pausing the job, not the run's doing."""
        return self.useful_machine_s / (self.paid_machine_s - self.lost_machine_s["stall"])

    def fractions(self) -> Dict[str, float]:
        return {k: v / self.paid_machine_s for k, v in self.lost_machine_s.items()}

    def to_json(self) -> dict:
        d = asdict(self)
        d["lost_fraction"] = self.fractions()
        d["goodput_without_stalls"] = self.goodput_without_stalls()
        return d


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def paces_by_generation(rec: RunRecord) -> Dict[int, Dict[int, float]]:
    """Replica -> generation -> mean healthy gap: on shared cores a replica that comes back after an
    outage runs faster while the others wait for it (they give it their CPU)."""
    out: Dict[int, Dict[int, float]] = {}
    for r in range(rec.replicas):
        seen: Dict[int, Commit] = {}
        for c in sorted((c for c in rec.commits if c.replica == r), key=lambda c: c.t):
            seen.setdefault(c.step, c)
        gaps: Dict[int, List[float]] = {}
        for k, c in seen.items():
            prev = seen.get(k - 1)
            if prev is not None and prev.gen == c.gen and c.t > prev.t:
                gaps.setdefault(c.gen, []).append(c.t - prev.t - max(c.outer_wait_s, default=0.0))
        out[r] = {gen: statistics.fmean(x) for gen, x in sorted(gaps.items())}
    return out


def paces(rec: RunRecord) -> Tuple[Dict[int, float], Dict[int, float], Dict[int, float]]:
    """Per replica: mean and median healthy gap (consecutive steps in one generation, minus the
    longest stage's outer-sync wait in that gap), and the stall: the excess over the mean of the gaps
    outside 1/4 to 4 medians (the coordinator away, a hung peer: no failure of the replica's own)."""
    mean, med, stall = {}, {}, {}
    for r in range(rec.replicas):
        seen: Dict[int, Commit] = {}
        for c in sorted((c for c in rec.commits if c.replica == r), key=lambda c: c.t):
            seen.setdefault(c.step, c)
        gaps = []
        for k, c in seen.items():
            prev = seen.get(k - 1)
            if prev is not None and prev.gen == c.gen and c.t > prev.t:
                gaps.append(c.t - prev.t - max(c.outer_wait_s, default=0.0))
        if not gaps:
            raise ValueError(f"replica {r} has no two consecutive commits in one generation: no pace to price steps at")
        med[r] = statistics.median(gaps)
        # Commit times are the coordinator's: while it is away (restarting) the commits arrive in a
        # batch, a long gap and then near-zero ones that say nothing about the steps.
        kept = [g for g in gaps if 0.25 * med[r] <= g <= 4.0 * med[r]]
        mean[r] = statistics.fmean(kept)
        # A long gap and the batch after it, net: the time those steps took beyond the pace.
        stall[r] = sum(g - mean[r] for g in gaps if not 0.25 * med[r] <= g <= 4.0 * med[r])
    return mean, med, stall


def healthy_sync_wait(rec: RunRecord, r: int, commits: List[Commit], median_gap: float) -> float:
    """Replica r's outer-sync waits per step in rounds that no failure touched (machine-seconds,
    its stages summed): part of its failure-free pace. Two replicas on shared, noisy cores wait
    for each other at every sync with nothing failed; only what a failure adds (the replica that
    was rebuilt lags, the others wait for it) is a loss. A round of H steps is touched when an
    outage of any replica overlaps it or the round before it (a rebuilt replica lags into the
    next round), or when one of its waits is longer than 4 median steps (a lag that outlived
    those rounds: noise does not hold a replica back for steps)."""
    H = rec.sync_every
    if not H:
        return 0.0
    rounds: Dict[int, List[Commit]] = {}
    for c in commits:
        rounds.setdefault(c.step // H, []).append(c)
    healthy = []
    for i, cs in sorted(rounds.items()):
        if len({c.step for c in cs}) < H:  # a round cut short (the run's end, a rollback)
            continue
        if any(w > 4.0 * median_gap for c in cs for w in c.outer_wait_s):
            continue
        a, b = min(c.t for c in rounds.get(i - 1, cs)), max(c.t for c in cs)
        if any(_overlap(o.failed, o.resumed, a, b) > 0 or a <= o.failed <= b for o in rec.outages):
            continue
        healthy.append(sum(sum(c.outer_wait_s) for c in cs))
    return statistics.fmean(healthy) / H if healthy else 0.0


def machine_counts(machines: List[Machine], t0: float, t1: float, slot_machines: float) -> Tuple[float, float, float]:
    """(paid, idle, unpaid) machine-seconds in [t0, t1] from the step function n(t)."""
    edges = sorted({t0, t1, *(x for m in machines for x in (m.start, m.end) if t0 < x < t1)})
    paid = idle = unpaid = 0.0
    for a, b in zip(edges, edges[1:]):
        mid = 0.5 * (a + b)
        n_machines = sum(1 for m in machines if m.start <= mid < m.end)
        paid += n_machines * (b - a)
        idle += max(0.0, n_machines - slot_machines) * (b - a)
        unpaid += max(0.0, slot_machines - n_machines) * (b - a)
    return paid, idle, unpaid


def account(rec: RunRecord) -> Goodput:
    R, S = rec.replicas, rec.stages
    if not rec.machines:
        raise ValueError("the run has no machines.json lifetimes: run it with launcher.machines=K")
    first = [m for m in rec.machines if m.start <= min(x.start for x in rec.machines) + 1.0]
    share = len(first) / sum(m.workers for m in first)
    pace, pace_med, stalls = paces(rec)
    by_r = {r: sorted((c for c in rec.commits if c.replica == r), key=lambda c: c.t) for r in range(R)}
    start = {r: by_r[r][0].t - pace[r] for r in range(R)}
    t0, t1 = min(start.values()), max(cs[-1].t for cs in by_r.values())
    T = t1 - t0
    useful = outage = 0.0
    parts = dict.fromkeys(OUTAGE_PARTS, 0.0)
    discard_parts = dict.fromkeys(DISCARD_PARTS, 0.0)
    wait_parts = dict.fromkeys(WAIT_PARTS, 0.0)
    steps = {}
    for r in range(R):
        cs = by_r[r]
        distinct = {c.step for c in cs}
        steps[r] = len(distinct)
        repeated = len(cs) - len(distinct)
        synced = steps[r] * healthy_sync_wait(rec, r, cs, pace_med[r])  # a failure-free run's syncs wait this long too
        useful += steps[r] * pace[r] * S + synced
        discard_parts["repeated"] += repeated * pace[r] * S
        wait_parts["sync"] += sum(sum(c.outer_wait_s) for c in cs) - synced
        wait_parts["start"] += S * (start[r] - t0)
        wait_parts["end"] += S * (t1 - cs[-1].t)
        for o in (o for o in rec.outages if o.replica == r):
            d = _overlap(o.failed, o.resumed, t0, t1)
            outage += S * d
            before = [c.t for c in cs if c.t <= o.failed]
            if before:  # at most one step: a later last commit may not have reached the coordinator yet
                discard_parts["in_flight"] += S * min(pace[r], max(0.0, o.failed - before[-1]))
            if rec.sync_every and o.tier not in EXACT_TIERS:
                discard_parts["unsynced"] += (o.step % rec.sync_every) * pace[r]
            detect = min(o.detect_s, d)
            later = [m.start for m in rec.machines if o.failed < m.start < o.resumed]
            replacement = max(0.0, min(later) - o.failed - detect) if later else 0.0
            replacement = min(replacement, d - detect)
            parts["detect"] += S * detect
            parts["replacement"] += S * replacement
            parts["restart_regroup_transfer"] += S * (d - detect - replacement)
    useful -= discard_parts["unsynced"]
    waits, discard = sum(wait_parts.values()), sum(discard_parts.values())
    slot_time = R * S * T
    stall = S * sum(stalls.values())
    pace_rest = slot_time - (useful + outage + discard + waits + stall)
    paid, idle, unpaid = machine_counts(rec.machines, t0, t1, R * S * share)
    # Unpaid machine time lies in outages (a lost machine not yet replaced): off the replacement wait first.
    cut = min(unpaid, parts["replacement"] * share)
    parts["replacement"] = parts["replacement"] * share - cut
    parts["restart_regroup_transfer"] = parts["restart_regroup_transfer"] * share - (unpaid - cut)
    parts["detect"] *= share
    lost = {"outage": outage * share - unpaid, "discard": discard * share, "waits": waits * share,
            "idle": idle, "stall": stall * share, "pace": pace_rest * share}
    useful_m = useful * share
    lifetime = sum(m.end - m.start for m in rec.machines)
    return Goodput(goodput=useful_m / paid, goodput_lifetime=useful_m / lifetime, paid_machine_s=paid,
                   useful_machine_s=useful_m, lost_machine_s=lost, outage_parts_machine_s=parts,
                   discard_parts_machine_s={k: v * share for k, v in discard_parts.items()},
                   wait_parts_machine_s={k: v * share for k, v in wait_parts.items()},
                   unpaid_machine_s=unpaid, startup_teardown_machine_s=lifetime - paid, window_s=(t0, t1),
                   pace_s=pace, pace_median_s=pace_med, stall_s=stalls, steps=steps, share=share)


def goodput_of(run_dir: str) -> Goodput:
    return account(RunRecord.from_run_dir(run_dir))


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks._goodput RUN_DIR", file=sys.stderr)
        return 2
    print(json.dumps(goodput_of(args[0]).to_json()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
