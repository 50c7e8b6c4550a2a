"""Placement: which machine runs which (replica, stage) slot, and what losing each machine means.

A spot fleet loses whole machines, so the placement decides what one failure can destroy
(DESIGN.md, "Placement matters"). `place()` spreads the grid so that, where the fleet allows it,
losing one machine never takes

  stage       every replica of a stage (the peer tier then has no exact source),
  adjacent    two adjacent stages of one replica (CheckFree rebuilds a middle stage from both its
              neighbours and CheckFree+ an end stage from its swap partner, which is adjacent),
  neighbours  both neighbours s-1 and s+1 of a stage (two rebuilt guesses around one survivor).

Constraints are met in that priority order; when the fleet is too small for all of them the
placement minimises the violations lexicographically and says which could not be met. The check is
brute force (every machine's loss is examined), and `recoverability_report()` replays each loss
through the coordinator's own planner (`tiers.plan_rebuilds`), so the report cannot disagree with
what the coordinator would do.

`slowest_stage()` and `rebalance()` are the load-balancing half: find the stage that sets the pace
and move one layer from it to its faster neighbour.
"""
from __future__ import annotations

import logging
from typing import Dict, Hashable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .tiers import Unrecoverable, plan_rebuilds

log = logging.getLogger(__name__)

Slot = Tuple[int, int]  # (replica, stage)
Machine = Hashable
CONSTRAINTS = ("stage", "adjacent", "neighbours")  # priority order
MAX_PASSES = 100
MAX_EVALS = 100_000  # bounds the search on big infeasible grids (about 2 s of Python)

# What a rebuild tier recovers, from best to worst. A rollback is exact but costs every replica the
# steps since the checkpoint, so it ranks below an approximate rebuild that loses no steps.
OUTCOMES = ("exact", "approximate", "rollback", "reinitialised", "none")
TIER_OUTCOME = {"handoff": "exact", "peer": "exact", "checkfree": "approximate", "checkfree_plus": "approximate",
                "copy": "approximate", "average": "approximate", "checkpoint": "rollback", "random": "reinitialised"}


# --- the constraints, checked by brute force ----------------------------------------------------------
def constraint_violations(assignment: Mapping[Slot, Machine], num_stages: int) -> Dict[str, List[str]]:
    """For every constraint, the ways losing a single machine would break it (empty lists = all met).
    The stage constraint needs two replicas of the stage; with one replica it cannot apply."""
    out: Dict[str, List[str]] = {c: [] for c in CONSTRAINTS}
    replicas = sorted({r for r, _ in assignment})
    for m in sorted(set(assignment.values()), key=str):
        on = {slot for slot, mm in assignment.items() if mm == m}
        for s in range(num_stages):
            holders = [(r, s) for r in replicas if (r, s) in assignment]
            if len(holders) >= 2 and all(h in on for h in holders):
                out["stage"].append(f"machine {m} holds every replica of stage {s}")
        for r in replicas:
            for s in range(num_stages - 1):
                if (r, s) in on and (r, s + 1) in on:
                    out["adjacent"].append(f"machine {m} holds stages {s} and {s + 1} of replica {r}")
            for s in range(1, num_stages - 1):
                if (r, s - 1) in on and (r, s + 1) in on:
                    out["neighbours"].append(f"machine {m} holds both neighbours of stage {s} of replica {r}")
    return out


class _Cost:
    """Violation counts of one assignment, re-counted locally: moving slot (r, s) can only change
    the stage column s, the adjacent pairs (s-1, s) and (s, s+1) of row r, and the neighbour
    triples centred on s-1 and s+1 of row r. The last term of `total()` (sum of squared machine
    loads) prefers spreading out, so one loss takes as few slots as possible."""

    def __init__(self, where: Dict[Slot, Machine], num_stages: int):
        self.where, self.S = where, num_stages
        self.replicas = sorted({r for r, _ in where})
        self.load: Dict[Machine, int] = {}
        for m in where.values():
            self.load[m] = self.load.get(m, 0) + 1

    def _same(self, a: Slot, b: Slot) -> bool:
        w = self.where
        return a in w and b in w and w[a] == w[b]

    def count(self, changed) -> Tuple[int, int, int]:
        """(stage, adjacent, neighbours) violations among the terms that `changed` slots touch."""
        cols = {s for _, s in changed}
        pairs = {(r, k) for r, s in changed for k in (s - 1, s) if 0 <= k < self.S - 1}
        centres = {(r, k) for r, s in changed for k in (s - 1, s + 1) if 0 < k < self.S - 1}
        stage = 0
        for s in cols:
            ms = {self.where[(r, s)] for r in self.replicas if (r, s) in self.where}
            n = sum((r, s) in self.where for r in self.replicas)
            stage += n >= 2 and len(ms) == 1
        adj = sum(self._same((r, k), (r, k + 1)) for r, k in pairs)
        nbr = sum(self._same((r, k - 1), (r, k + 1)) for r, k in centres)
        return stage, adj, nbr

    def total(self) -> Tuple[int, int, int, int]:
        return self.count(self.where) + (sum(n * n for n in self.load.values()),)


def _initial(slots: List[Slot], machines: List[Machine], capacity: Dict[Machine, int],
             num_stages: int) -> Dict[Slot, Machine]:
    """Deal the slots, replica by replica, round the machines (skipping full ones): adjacent stages
    land on different machines (M >= 2), and so do both neighbours of a stage (M >= 3). When M
    divides S every row would start on the same machine and put all replicas of a stage together,
    so each row then starts one machine later: the (r + s) mod M stripe."""
    if not slots:
        return {}
    left, where, M = dict(capacity), {}, len(machines)
    shift = 1 if num_stages % M == 0 else 0
    p, row = 0, None
    for r, s in slots:
        if r != row and row is not None:
            p += shift
        row = r
        while left[machines[p % M]] == 0:
            p += 1
        where[(r, s)] = machines[p % M]
        left[machines[p % M]] -= 1
        p += 1
    return where


def _least_load_sq(num_slots: int, capacity: Dict[Machine, int]) -> int:
    """The smallest sum of squared loads the capacities allow: fill the emptiest machine first."""
    load = {m: 0 for m in capacity}
    for _ in range(num_slots):
        m = min((m for m in load if load[m] < capacity[m]), key=lambda m: load[m])
        load[m] += 1
    return sum(n * n for n in load.values())


def _improve(where: Dict[Slot, Machine], movable: List[Slot], capacity: Dict[Machine, int],
             num_stages: int) -> None:
    """Hill-climb on swaps of two movable slots and moves of one to a machine with room, accepting
    any change that lowers the cost tuple, until a pass changes nothing or MAX_EVALS candidates
    have been tried (deterministic either way). Slots not in `movable` stay where they are but
    count in the cost; `capacity` counts only the movable slots."""
    cost = _Cost(where, num_stages)
    best = list(cost.total())
    slots = sorted(movable)
    machines = sorted(capacity, key=str)
    used = {m: 0 for m in capacity}
    for a in slots:
        used[where[a]] += 1
    evals = 0

    def delta(changed, change: Dict[Slot, Machine]) -> Tuple[int, ...]:
        """Apply `change` to `where` and return how the violation counts moved."""
        before = cost.count(changed)
        where.update(change)
        return tuple(x - y for x, y in zip(cost.count(changed), before))

    for _ in range(MAX_PASSES):
        improved = False
        for i, a in enumerate(slots):
            for b in slots[i + 1:]:
                ma, mb = where[a], where[b]
                if ma == mb:
                    continue
                evals += 1
                d = delta((a, b), {a: mb, b: ma})
                if tuple(x + y for x, y in zip(best[:3], d)) + (best[3],) < tuple(best):
                    best[:3] = [x + y for x, y in zip(best[:3], d)]
                    improved = True
                else:
                    where[a], where[b] = ma, mb
            for m in machines:
                ma = where[a]
                if m == ma or used[m] >= capacity[m]:
                    continue
                evals += 1
                d = delta((a,), {a: m})
                la, lm = cost.load[ma], cost.load.get(m, 0)
                dload = (la - 1) ** 2 - la ** 2 + (lm + 1) ** 2 - lm ** 2
                cand = [x + y for x, y in zip(best[:3], d)] + [best[3] + dload]
                if cand < best:
                    best, improved = cand, True
                    cost.load[ma], cost.load[m] = la - 1, lm + 1
                    used[ma], used[m] = used[ma] - 1, used[m] + 1
                else:
                    where[a] = ma
            if evals > MAX_EVALS:
                log.debug("placement search stopped after %d candidates", evals)
                return
        if not improved:
            return


def place(slots: Sequence[Slot], machines: Mapping[Machine, int], num_stages: int,
          fixed: Optional[Mapping[Slot, Machine]] = None) -> Dict[Slot, Machine]:
    """Assign each slot a machine (`machines`: machine id -> how many more workers it can hold) so
    that no single machine loss breaks the constraints above, where the fleet's size allows it.
    `fixed` holds slots already running (slot -> machine): they stay put and count in the
    constraints, so replacements for lost slots are placed around the survivors. Returns the
    assignment of `slots` only. Logs a warning naming the constraints it could not meet."""
    fixed = dict(fixed or {})
    slots = sorted(set(map(tuple, slots)) - set(fixed))
    capacity = {m: int(c) for m, c in machines.items() if c > 0}
    if sum(capacity.values()) < len(slots):
        raise ValueError(f"the machines hold {sum(capacity.values())} workers but {len(slots)} slots need one; "
                         "start more workers or lower parallel.replicas / parallel.stages")
    bad = [s for s in slots if not 0 <= s[1] < num_stages]
    if bad:
        raise ValueError(f"slots {bad} name a stage outside 0..{num_stages - 1}")
    order = sorted(capacity, key=str)
    where = dict(fixed)
    where.update(_initial(slots, order, capacity, num_stages))
    cost = _Cost(where, num_stages).total()
    if fixed or cost[:3] != (0, 0, 0) or cost[3] > _least_load_sq(len(slots), capacity):
        _improve(where, slots, capacity, num_stages)  # O(slots^2) per pass: skipped when the stripe is perfect
    unmet = {c: v for c, v in constraint_violations(where, num_stages).items() if v}
    num_machines = len(set(where.values()) | set(capacity))
    if unmet:
        # One machine (the local launcher) can meet nothing; that is no news worth a warning.
        log.log(logging.WARNING if num_machines > 1 else logging.INFO,
                "placement on %d machine(s) could not meet %s (best effort): %s", num_machines,
                " / ".join(unmet), "; ".join(v for vs in unmet.values() for v in vs[:3]))
    return {slot: where[slot] for slot in slots}


# --- what each machine's loss means -------------------------------------------------------------------
class Report(NamedTuple):
    machines: List[dict]  # one per machine: machine, slots, outcomes {slot: {outcome, tier, ...}}, verdict, line
    summary: str          # one paragraph for the coordinator's start-up log


def recoverability_report(assignment: Mapping[Slot, Machine], num_replicas: int, num_stages: int, diloco: bool,
                          strategy: str = "tiered", have_checkpoint: bool = False) -> Report:
    """Replay the loss of each machine (a crash, without notice) through `plan_rebuilds` and say,
    per lost slot, whether it comes back exactly (peer), approximately (CheckFree / CheckFree+),
    by a rollback, or not at all. A slot's sources may not be other slots of the same machine."""
    machines = []
    for m in sorted(set(assignment.values()), key=str):
        lost = sorted(slot for slot, mm in assignment.items() if mm == m)
        outcomes = {}
        for slot in lost:
            others = set(lost) - {slot}
            try:
                plan = plan_rebuilds([slot], num_replicas, num_stages, strategy, diloco=diloco,
                                     have_checkpoint=have_checkpoint, unsettled=others)[slot]
                outcomes[slot] = {"outcome": TIER_OUTCOME.get(plan.tier, "approximate"), "tier": plan.tier,
                                  "sources": plan.sources}
            except Unrecoverable as e:
                outcomes[slot] = {"outcome": "none", "tier": None, "sources": [], "why": str(e)}
        verdict = max((o["outcome"] for o in outcomes.values()), key=OUTCOMES.index, default="exact")
        parts = [f"r{r}s{s} {o['outcome']}" + (f" ({o['tier']})" if o["tier"] else "")
                 for (r, s), o in outcomes.items()]
        machines.append({"machine": m, "slots": lost, "outcomes": outcomes, "verdict": verdict,
                         "line": f"losing machine {m}: {verdict} — " + ", ".join(parts)})
    return Report(machines, _summary(assignment, machines, num_replicas, num_stages, diloco))


def _summary(assignment, machines: List[dict], R: int, S: int, diloco: bool) -> str:
    by_verdict: Dict[str, List[str]] = {}
    for e in machines:
        by_verdict.setdefault(e["verdict"], []).append(str(e["machine"]))
    words = {"exact": "exactly", "approximate": "approximately (CheckFree / CheckFree+)",
             "rollback": "only by rolling back to the last checkpoint",
             "reinitialised": "only by re-initialising stages", "none": "not at all"}
    n = len(machines)
    if len(by_verdict) == 1:
        v = next(iter(by_verdict))
        which = "the only machine" if n == 1 else f"any one of the {n} machines"
        head = f"losing {which} is " + (f"recoverable {words[v]}" if v != "none" else "not recoverable")
    else:
        head = "losing one machine is recoverable " + "; ".join(
            f"{words[v]} for {', '.join(by_verdict[v])}" for v in OUTCOMES if v in by_verdict)
    text = f"Placement of {R} replica(s) x {S} stage(s) on {n} machine(s): {head}."
    unmet = {c: v for c, v in constraint_violations(assignment, S).items() if v}
    if unmet:
        text += " Not met: " + "; ".join(f"{c} ({len(v)}x, e.g. {v[0]})" for c, v in unmet.items()) + "."
    if R == 1:
        text += " With one replica no peer holds a copy of any stage."
    elif not diloco:
        text += " Peer copies are exact only with diloco.enabled=true."
    text += (" With an interruption notice (recovery.notice) a machine's slots are handed off exactly instead,"
             " given spares on other machines.")
    return text


# --- balancing the stages -----------------------------------------------------------------------------
def slowest_stage(step_times: Mapping[Slot, float]) -> Tuple[Slot, float]:
    """The slot with the longest step time (ties: the lowest slot). Pass compute (busy) time, not
    wall time: in a pipeline every stage waits for the slowest, so wall times are all equal."""
    if not step_times:
        raise ValueError("slowest_stage needs at least one slot's step time")
    slot = max(sorted(step_times), key=lambda k: step_times[k])
    return slot, step_times[slot]


def rebalance(layer_counts: Sequence[int], stage_times: Sequence[float]) -> List[int]:
    """Move one layer from the slowest stage to its faster neighbour, if that shortens the slowest
    step. Heuristic: a stage's time is split evenly over its layers (the embedding / head cost rides
    along), so the slow stage saves t_s / n_s and the neighbour pays its own t_n / n_n per layer;
    the move is made only if max(new times) < t_s and the slow stage keeps at least one layer.
    Layer counts stay contiguous, as `parallel.layers_per_stage` requires."""
    counts = list(layer_counts)
    if len(counts) != len(stage_times):
        raise ValueError(f"{len(counts)} layer counts but {len(stage_times)} stage times")
    if any(n < 1 for n in counts):
        raise ValueError(f"layer counts {counts} must all be >= 1")
    if len(counts) < 2:
        return counts
    s = max(range(len(counts)), key=lambda k: (stage_times[k], -k))
    if counts[s] <= 1:
        return counts
    nbrs = [k for k in (s - 1, s + 1) if 0 <= k < len(counts)]
    n = min(nbrs, key=lambda k: (stage_times[k], k))
    t_s = stage_times[s] * (counts[s] - 1) / counts[s]
    t_n = stage_times[n] * (counts[n] + 1) / counts[n]
    if max(t_s, t_n) < stage_times[s]:
        counts[s] -= 1
        counts[n] += 1
    return counts


def rebalance_layout(layer_counts: Sequence[int], stage_times: Sequence[float]) -> Tuple[List[int], float]:
    """Repeat `rebalance` on the predicted times (each stage's measured time per layer, times its
    new layer count) until no move helps: (new counts, predicted time of the slowest stage)."""
    per_layer = [t / n for t, n in zip(stage_times, layer_counts)]
    counts = list(layer_counts)
    for _ in range(sum(counts)):
        moved = rebalance(counts, [per_layer[s] * counts[s] for s in range(len(counts))])
        if moved == counts:
            break
        counts = moved
    return counts, max(per_layer[s] * counts[s] for s in range(len(counts)))
