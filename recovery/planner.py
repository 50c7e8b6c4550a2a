"""The coordinator's decisions as pure functions of its state: which worker takes which slot, the
next generation's plan of a cell, how each lost slot is rebuilt, who belongs to a stage group, when
every holder is leaving, and whether moving layers pays.

Nothing here touches a store, a clock it is not given, or a process: the coordinator
(recovery.coordinator) calls these and carries out what they return (publishing, mail, counters).
tests/unit/test_planner.py runs them on states built by hand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .control_state import Cell, CoordinatorState, Loss, Settings, WorkerInfo
from .placement import place, rebalance_layout
from .plan import CellPlan, DonateRequest, Divergence, RebuildEntry, Rollback, Slot
from .tiers import plan_rebuilds


# --- spares ---------------------------------------------------------------------------------------------
def pool(spares: Sequence[WorkerInfo]) -> Dict[str, List[WorkerInfo]]:
    """Free workers by machine, in join order."""
    out: Dict[str, List[WorkerInfo]] = {}
    for w in spares:
        out.setdefault(w.machine, []).append(w)
    return out


def free_spares(st: CoordinatorState) -> List[WorkerInfo]:
    return [w for w in st.workers.values() if w.state == "spare" and not w.leaving]


def handoffs_ready(st: CoordinatorState) -> List[str]:
    """The slot holders under notice that may hand off now, first noticed first: one per spare
    that is free and ready (its beat says it finished warming up and waits for a plan) and not
    yet claimed by a slot that lost its holder (a kill, or a holder that left a moment ago and
    whose cell is not re-planned yet). A holder beyond them trains on: it would otherwise leave
    with nobody to take its slot, or wait in the handoff for a spare still importing."""
    ready = [w for w in free_spares(st) if (w.status or {}).get("phase") == "spare"]
    claimed = sum(len(c.lost) for c in st.cells.values())  # slots already left (or lost) that wait for one
    under_notice = sorted((w for w in st.workers.values() if w.state == "active" and w.leaving and w.slot),
                          key=lambda w: (w.leaving_since if w.leaving_since is not None else float("inf"), w.wid))
    return [w.wid for w in under_notice[:max(0, len(ready) - claimed)]]


def choose_holders(slots: Sequence[Slot], spares: Sequence[WorkerInfo], num_stages: int,
                   fixed: Optional[Dict[Slot, str]] = None) -> Dict[Slot, WorkerInfo]:
    """A spare for each slot, placed so that one machine's loss destroys as little as possible
    (recovery.placement); `fixed`: the machines of the slots that keep their holders."""
    by_machine = pool(spares)
    where = place(list(slots), {m: len(ws) for m, ws in by_machine.items()}, num_stages, fixed=fixed)
    return {slot: by_machine[where[slot]].pop(0) for slot in slots}


# --- cell plans ----------------------------------------------------------------------------------------
def cell_plan(st: CoordinatorState, settings: Settings, cell: Cell, now: float, *,
              rebuild: Optional[Dict[Slot, RebuildEntry]] = None, leavers: Sequence[str] = (),
              rollback: Optional[Rollback] = None, prev_layout: Optional[Sequence[int]] = None,
              diverged: Optional[Divergence] = None) -> CellPlan:
    """The cell's next generation: ranks follow (replica, stage) order, leavers come last (they
    join the new group only to hand their state over)."""
    S = settings.stages
    ranks = {st.slots[(r, s)]: i * S + s for i, r in enumerate(cell.replicas) for s in range(S)}
    for j, wid in enumerate(leavers):
        ranks[wid] = len(cell.replicas) * S + j
    return CellPlan(cell=cell.index, gen=cell.gen + 1, replicas=tuple(cell.replicas),
                    slots={(r, s): st.slots[(r, s)] for r in cell.replicas for s in range(S)}, ranks=ranks,
                    rebuild=dict(rebuild or {}), leavers=tuple(leavers), rollback=rollback,
                    layout=tuple(st.layout), prev_layout=tuple(prev_layout) if prev_layout is not None else None,
                    layout_version=st.layout_version, committed={r: st.committed[r] for r in cell.replicas},
                    published_at=now, diverged=diverged)


@dataclass
class Rebuilds:
    """What re-planning a cell's lost slots decided. `rollback`: a tier needs the checkpoint, so
    every slot rolls back (the caller publishes that instead). `donations`: mail to peer donors.
    `unsettled`: approximately rebuilt slots and the step they resume at."""
    entries: Dict[Slot, RebuildEntry] = field(default_factory=dict)
    donations: List[Tuple[str, DonateRequest]] = field(default_factory=list)
    unsettled: Dict[Slot, int] = field(default_factory=dict)
    rollback: bool = False


def plan_cell_rebuilds(st: CoordinatorState, settings: Settings, cell: Cell, leavers: Sequence[str],
                       xfer_prefix: str) -> Rebuilds:
    """How each slot of the cell whose holder does not yet hold its state (lost now, or rebuilt in a
    generation that never completed) is rebuilt from what is alive now: a slot is never left
    training from initial weights. Raises tiers.Unrecoverable when nothing can rebuild it."""
    out = Rebuilds()
    if not cell.rebuilding:
        return out
    gone = {s for c in st.cells.values() for s in list(c.lost) + list(c.rebuilding)}
    unsettled = {slot for slot, step in st.unsettled.items() if st.committed[slot[0]] < step}
    handed = {s for s, v in cell.rebuilding.items() if v.handed_off and v.leaver in leavers}
    tiers = plan_rebuilds(sorted(gone), settings.replicas, settings.stages, settings.strategy, handed_off=handed,
                          diloco=settings.diloco, have_checkpoint=st.latest_checkpoint is not None,
                          unsettled=unsettled, targets=sorted(cell.rebuilding))
    if any(p.tier == "checkpoint" for p in tiers.values()):
        out.rollback = True
        return out
    for slot, p in tiers.items():
        loss = cell.rebuilding[slot]
        step = st.committed[slot[0]] + 1
        entry = RebuildEntry(p.tier, tuple(p.sources), loss.detected_at, loss.failed_at, step,
                             leaver=loss.leaver if p.tier == "handoff" else None)
        if p.tier == "peer":
            donor = st.slots[p.sources[0]]
            xfer = f"{xfer_prefix}/{slot[1]}"
            entry = RebuildEntry(p.tier, tuple(p.sources), loss.detected_at, loss.failed_at, step, donor=donor,
                                 xfer=xfer)
            out.donations.append((donor, DonateRequest(xfer, st.slots[slot], slot, p.sources[0], gen=cell.gen + 1)))
        if p.tier not in ("handoff", "peer"):
            out.unsettled[slot] = step
        out.entries[slot] = entry
    return out


def plan_resume_rebuilds(st: CoordinatorState, settings: Settings, missing: Sequence[Slot],
                         resume_from: Dict[int, int], now: float, boot: str) -> Rebuilds:
    """Slots a suspend could not save, rebuilt on resume from the restored ones."""
    out = Rebuilds()
    for slot, p in plan_rebuilds(list(missing), settings.replicas, settings.stages, settings.strategy,
                                 diloco=settings.diloco).items():
        step = resume_from[slot[0]] + 1
        entry = RebuildEntry(p.tier, tuple(p.sources), now, now, step)
        if p.tier == "peer":
            donor = st.slots[p.sources[0]]
            xfer = f"xfer/{boot}/resume/{slot[0]}/{slot[1]}"
            entry = RebuildEntry(p.tier, tuple(p.sources), now, now, step, donor=donor, xfer=xfer)
            out.donations.append((donor, DonateRequest(xfer, st.slots[slot], slot, p.sources[0])))
        out.entries[slot] = entry
    return out


def cells_waiting_on(st: CoordinatorState, wid: str) -> List[Cell]:
    """Cells whose newest plan rebuilds a slot from `wid` (a peer donor) or from a slot that no
    longer has a holder: that rebuild waits in vain, so the cell is planned again."""
    return [c for c in st.cells.values() if c.rebuilding and c.plan is not None and any(
        e.donor == wid or any(st.slots.get(src) is None for src in e.sources) for e in c.plan.rebuild.values())]


# --- stage groups --------------------------------------------------------------------------------------
def stage_holders(st: CoordinatorState, settings: Settings, s: int) -> List[Tuple[int, str]]:
    """Stage s's group: the holders of replicas whose pipeline is whole (no slot lost or still being
    rebuilt) and who hold their state. A replica that is down cannot reach its next sync, so it is
    left out while it is down and comes back through the handshake."""
    out = []
    for r in range(settings.replicas):
        cell = st.cell_of(r)
        if cell.lost or cell.rebuilding or (r, s) not in st.slots or not st.ready.get((r, s)):
            continue
        out.append((r, st.slots[(r, s)]))
    return out


# --- leaving, suspending --------------------------------------------------------------------------------
def everyone_leaving(st: CoordinatorState, settings: Settings) -> Optional[Dict[Slot, str]]:
    """Every slot's holder is leaving (Slurm's warning reaches every task; a whole fleet gets its
    notice) and no spare is free to take a handoff: the holders to suspend, else None."""
    holders: Dict[Slot, str] = dict(st.slots)
    for cell in st.cells.values():
        for slot, loss in cell.lost.items():
            if not loss.handed_off:
                return None  # a dead slot: the ordinary rebuild path decides
            holders[slot] = loss.leaver
    if len(holders) < settings.replicas * settings.stages or \
            not all(st.workers[w].leaving for w in holders.values()):
        return None
    if any(w.state == "spare" and not w.leaving for w in st.workers.values()):
        return None  # someone can still take a handoff
    return holders


def new_loss(st: CoordinatorState, slot: Slot, *, detected_at: float, failed_at: float, handed_off: bool,
             leaver: Optional[str], why: str) -> Loss:
    return Loss(detected_at=detected_at, failed_at=failed_at, handed_off=handed_off, leaver=leaver, why=why,
                step=st.committed[slot[0]] + 1)


# --- rebalancing -----------------------------------------------------------------------------------------
def rebalance_decision(layout: Sequence[int], stage_times: Sequence[Sequence[float]], num_stages: int,
                       min_gain: float) -> Optional[Tuple[List[int], List[float], float]]:
    """(new layout, mean stage compute seconds, predicted gain) when moving layers off the slowest
    stage predicts a step at least `min_gain` shorter, else None."""
    mean = [sum(r[s] for r in stage_times) / len(stage_times) for s in range(num_stages)]
    counts, predicted = rebalance_layout(list(layout), mean)
    gain = max(mean) / max(predicted, 1e-12) - 1.0
    if counts == list(layout) or gain < min_gain:
        return None
    return counts, mean, gain
