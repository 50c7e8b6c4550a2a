"""Generations: the coordinator publishes every plan through here.

A cell's next generation is published when its lost slots all have a holder (`maybe_publish`: the
oldest losses first, after `settle_s` so failures that happen together are planned together; a
cell whose losses outnumber the free spares waits, says how to add a worker, and suspends the job
after `recovery.spare_wait_s`), when a rebuild it depended on fails, or when a reaction re-plans it
(a stall, a failed formation). The first placement, a resume's rollback and an in-run rollback to
the checkpoint tier are generations too. Stage groups (Streaming DiLoCo) follow the replicas that
are whole. Decisions come from the pure planner (recovery.planner); this part carries them out.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Sequence

from kintsugi.parallel.stage_link import StageGroupPlan

from .control_state import Cell
from .placement import recoverability_report
from .plan import Divergence, RebuildEntry, Rollback, Slot, slot_key
from .planner import (cell_plan, choose_holders, free_spares, handoffs_ready, new_loss, plan_cell_rebuilds,
                      plan_resume_rebuilds, stage_holders)
from .tiers import Unrecoverable


log = logging.getLogger(__name__)


class Generations:
    def __init__(self, coordinator):
        """`coordinator`: the recovery.coordinator.Coordinator these generations belong to."""
        self.c = coordinator
        self._full_since: Optional[float] = None
        self._short_since: Optional[float] = None   # the start waits for workers since (this incarnation)
        self._short_logged = False
        self._handoffs_ready: List[str] = []
        self._waiting_logged = set()

    def put_counters(self) -> None:
        """What launchers act on, sealed: a forged count must not make them start processes."""
        st = self.c.st
        self.c.board.put("counters", {"rebuilt_slots": st.rebuilt_slots, "rebuild_plans": st.rebuild_plans,
                                    "spares_needed": st.spares_needed, "handoffs_ready": self._handoffs_ready})

    def track_spares(self) -> None:
        """Slot holders under an interruption notice train on until a spare is ready to take their
        slot (recovery.train_under_notice_s at most): `handoffs_ready` in the sealed counters names
        them, one per ready spare in the order their notices came, without a round trip through
        the coordinator after their notice."""
        ready = handoffs_ready(self.c.st)
        if ready != self._handoffs_ready:
            self._handoffs_ready = ready
            self.put_counters()

    def _set_spares_needed(self, n: int) -> None:
        if n != self.c.st.spares_needed:
            self.c.st.spares_needed = n
            self.put_counters()
            self.c.changed()

    # --- publishing ----------------------------------------------------------------------------------------
    def publish_cell(self, cell: Cell, rebuild: Optional[Dict[Slot, RebuildEntry]] = None,
                     leavers: Sequence[str] = (), rollback: Optional[Rollback] = None,
                     prev_layout: Optional[Sequence[int]] = None, diverged: Optional[Divergence] = None) -> None:
        st = self.c.st
        rebuild = rebuild or {}
        plan = cell_plan(st, self.c.settings, cell, time.time(), rebuild=rebuild, leavers=leavers, rollback=rollback,
                         prev_layout=prev_layout, diverged=diverged)
        cell.gen, cell.plan, cell.since = plan.gen, plan, time.monotonic()
        for wid in plan.slots.values():
            self.c.board.put(f"role/{wid}", {"cell": cell.index})
        self.c.board.put(f"cell/{cell.index}", plan.to_json())
        self.c.board.put("slots", {slot_key(k): v for k, v in st.slots.items()})
        st.publications += 1
        if rebuild:
            st.rebuild_plans += 1
            self.put_counters()
        self.c.bump()
        if rebuild:
            log.warning("cell %d generation %d: rebuilding %s", cell.index, cell.gen,
                        ", ".join(f"slot {slot_key(k)} via {v.tier}" for k, v in rebuild.items()))
        else:
            log.info("cell %d generation %d published (%d workers)", cell.index, cell.gen, plan.world_size)

    def stage_plan(self, s: int) -> StageGroupPlan:
        st = self.c.st
        # The first generation of a fresh run needs no handshake (identical seeds, nothing synced).
        trusted = st.stage_gen[s] == 0 and self.c.resume_from is None
        return StageGroupPlan(s, st.stage_gen[s], dict(st.stage_members[s]), st.layout_version, trusted)

    def publish_stage(self, s: int) -> None:
        st = self.c.st
        holders = stage_holders(st, self.c.settings, s)
        st.stage_members[s] = {wid: i for i, (_, wid) in enumerate(holders)}
        st.stage_gen[s] += 1
        self.c.board.put(f"stage/{s}", self.stage_plan(s).to_json())
        self.c.bump()
        log.info("stage %d generation %d: replicas %s", s, st.stage_gen[s], [r for r, _ in holders])

    def maybe_stage_groups(self) -> None:
        """Stage groups follow the replicas that are whole: out when one goes down, back when rebuilt."""
        if not self.c.settings.stage_groups or not self.c.st.started:
            return
        for s in range(self.c.settings.stages):
            if {w for _, w in stage_holders(self.c.st, self.c.settings, s)} != set(self.c.st.stage_members[s]):
                self.publish_stage(s)

    # --- generations ---------------------------------------------------------------------------------------
    def maybe_publish(self) -> None:
        st, s = self.c.st, self.c.settings
        if self.c.reactions.suspend_gen is not None:
            return
        spares = free_spares(st)
        if not st.started:
            self._initial_placement(spares)
            return
        for cell in st.cells.values():
            if cell.needs_plan and not cell.lost and self.c.membership.caught_up(cell):
                cell.needs_plan = False
                self.replan_cell(cell, why="waited for every lost slot to have a holder")
        lost_cells = [c for c in st.cells.values() if c.lost]
        # What the waiting slots lack, counted every loop (a launcher starts that many workers).
        self._set_spares_needed(max(0, sum(len(c.lost) for c in lost_cells) - len(spares)))
        now = time.monotonic()
        # Oldest losses first: a cell is re-planned when every one of its lost slots has a spare.
        for cell in sorted(lost_cells, key=lambda c: min(v.detected_mono for v in c.lost.values())):
            if now - min(v.detected_mono for v in cell.lost.values()) < self._settle_s(cell):
                continue
            if not self.c.membership.caught_up(cell):  # a new incarnation: the replays come first
                continue
            lost = sorted(cell.lost)
            if len(spares) < len(lost):
                self._wait_for_spares(cell, lost, len(spares))
                continue
            cell.waiting_since = None
            alive = {slot: st.workers[wid].machine for slot, wid in st.slots.items()}
            for slot, w in choose_holders(lost, spares, s.stages, fixed=alive).items():
                spares.remove(w)
                self.c.membership.assign(slot, w)
            st.rebuilt_slots += len(lost)
            self.put_counters()
            leavers = [v.leaver for v in cell.lost.values() if v.leaver]
            cell.rebuilding.update(cell.lost)
            cell.lost.clear()
            cell.kicks = 0
            cell.needs_plan = False
            self.replan_cell(cell, leavers)
            if self.c.error:
                return
            self._set_spares_needed(max(0, sum(len(c.lost) for c in st.cells.values()) - len(spares)))
            if s.global_generations:  # the comparison design: everyone starts a new generation
                for other in st.cells.values():
                    if other is not cell and not other.lost:
                        self.replan_cell(other, why="global generation")
                if s.stage_groups:
                    for stage in range(s.stages):
                        self.publish_stage(stage)

    def _settle_s(self, cell: Cell) -> float:
        """How long after its first loss a cell waits for more: failures that come together are
        planned together. Handoffs announced by their holders need no wait unless another holder
        of the cell may leave any moment (its spare is reserved): they are planned at once."""
        st = self.c.st
        if not all(v.handed_off for v in cell.lost.values()):
            return self.c.settle_s
        imminent = any(st.workers[wid].slot[0] in cell.replicas for wid in handoffs_ready(st))
        return self.c.settle_s if imminent else 0.0

    def replan_cell(self, cell: Cell, leavers: Sequence[str] = (), why: str = "") -> None:
        """Publish the cell's next generation, rebuilding every slot whose holder does not yet hold
        its state from what is alive now (planner.plan_cell_rebuilds)."""
        try:
            plan = plan_cell_rebuilds(self.c.st, self.c.settings, cell, leavers, f"xfer/{self.c.boot}/{cell.index}/{cell.gen + 1}")
        except Unrecoverable as e:
            self.c.error = str(e)
            log.error("cannot recover: %s", e)
            return
        if plan.rollback:
            self.global_rollback()
            return
        for donor, req in plan.donations:
            self.c.board.mail(donor, req.to_json())
        self.c.st.unsettled.update(plan.unsettled)
        self.publish_cell(cell, plan.entries, [w for w in leavers if any(
            e.leaver == w for e in plan.entries.values())])
        if why:
            self.c.ledger.event({"kind": "replan", "cell": cell.index, "gen": cell.gen, "why": why})

    def _initial_placement(self, spares) -> None:
        st, s = self.c.st, self.c.settings
        need = s.replicas * s.stages
        if len(spares) < need:
            self._short_of_workers(len(spares), need)
            return
        # Place over the whole starting fleet: wait for the expected spares too (briefly), or the
        # first R x S joiners, whatever machines they happen to be on, would decide the layout.
        if self._full_since is None:
            self._full_since = time.monotonic()
        if len(spares) < s.replicas * s.stages + s.spares and time.monotonic() - self._full_since < 3.0:
            return
        slots = [(r, stage) for r in range(s.replicas) for stage in range(s.stages)]
        holders = choose_holders(slots, spares, s.stages)
        for slot in slots:
            self.c.membership.assign(slot, holders[slot])
        where = {slot: w.machine for slot, w in holders.items()}
        report = recoverability_report(where, s.replicas, s.stages, s.diloco, s.strategy, have_checkpoint=s.checkpoints)
        log.info("placement: %s", report.summary)
        for entry in report.machines:
            log.info("  %s", entry["line"])
        self.c.ledger.event({"kind": "placement", "summary": report.summary,
                           "machines": {str(e["machine"]): e["verdict"] for e in report.machines}})
        rollback, at_resume = None, {}
        if self.c.resume_from is not None:
            rollback = Rollback(dict(self.c.resume_from))
            missing = sorted((r, stage) for r, stages in self.c.resume_missing.items() for stage in stages)
            if missing:  # slots lost before a suspend: rebuilt from the restored ones
                try:
                    plan = plan_resume_rebuilds(st, s, missing, self.c.resume_from, time.time(), self.c.boot)
                except Unrecoverable as e:
                    self.c.error = f"resume: {e}"
                    return
                for donor, req in plan.donations:
                    self.c.board.mail(donor, req.to_json())
                at_resume = plan.entries
            for r, k in self.c.resume_from.items():
                st.totals.pop(r, None)
                self.c.board.put(f"committed/{r}", {"step": k, "total": None})
        for slot in slots:
            st.ready[slot] = slot not in at_resume
            if slot in at_resume:
                e = at_resume[slot]
                st.cell_of(slot[0]).rebuilding[slot] = new_loss(
                    st, slot, detected_at=e.detected_at, failed_at=e.failed_at, handed_off=False, leaver=None,
                    why="lost before the suspend")
        for cell in st.cells.values():
            self.publish_cell(cell, {k: v for k, v in at_resume.items() if k[0] in cell.replicas}, rollback=rollback)
        if s.stage_groups:
            for stage in range(s.stages):
                self.publish_stage(stage)
        st.started = True
        self.c.board.put("started", True)

    def global_rollback(self, diverged: Optional[Divergence] = None) -> None:
        """The checkpoint tier: every slot of every replica restores the last complete checkpoint,
        once every lost slot has a holder (until then the cells wait for spares)."""
        st = self.c.st
        if any(c.lost for c in st.cells.values()):
            for c in st.cells.values():
                c.needs_plan = bool(c.rebuilding)
            return
        k = st.latest_checkpoint
        discarded = {}
        for r in range(self.c.settings.replicas):
            # The steps after the checkpoint are undone: training them again is no second commit.
            discarded[str(r)] = self.c.ledger.forget_after(r, k)
            st.committed[r] = k
            st.totals.pop(r, None)
            self.c.board.put(f"committed/{r}", {"step": k, "total": None})
        self.c.ledger.event({"kind": "rollback", "step": k, "discarded": discarded})
        for cell in st.cells.values():
            rebuild = {slot: RebuildEntry("checkpoint", (), v.detected_at, v.failed_at, k + 1)
                       for slot, v in cell.rebuilding.items()}
            cell.needs_plan = False
            self.publish_cell(cell, rebuild, rollback=Rollback({r: k for r in cell.replicas}), diverged=diverged)
        if self.c.settings.stage_groups:
            for s in range(self.c.settings.stages):
                self.publish_stage(s)

    def _short_of_workers(self, joined: int, need: int) -> None:
        """The run cannot start with fewer workers than slots. Ask a launcher for the difference
        (with faults.respawn it starts them), say so after a while, and after recovery.spare_wait_s
        end with that line instead of waiting for ever (a worker that died before it joined, a
        launcher that started too few)."""
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        self._set_spares_needed(need - joined)
        waited = now - self._short_since
        where = self.c.settings.coordinator_addr or "<this host>:<port>"
        if waited > 30.0 and not self._short_logged:
            self._short_logged = True
            log.warning("%d of the %d workers the run needs to start have joined after %.0fs; add one with "
                        "`KINTSUGI_TOKEN=... kintsugi join --coordinator %s`; the run ends after %.0fs without "
                        "them (recovery.spare_wait_s)", joined, need, waited, where, self.c.settings.spare_wait_s)
        if waited > self.c.settings.spare_wait_s:
            self.c.error = (f"only {joined} of the {need} workers the run needs (parallel.replicas x parallel.stages) "
                            f"joined within recovery.spare_wait_s={self.c.settings.spare_wait_s:.0f}s; start more "
                            f"(kintsugi join --coordinator {where}) or raise recovery.spare_wait_s")

    def _wait_for_spares(self, cell: Cell, lost: List[Slot], free: int) -> None:
        now = time.monotonic()
        if cell.waiting_since is None:
            cell.waiting_since = now
        new = [s for s in lost if s not in self._waiting_logged]
        if new:
            self._waiting_logged.update(new)
            where = self.c.settings.coordinator_addr or "<this host>:<port>"
            log.warning("slots %s wait for a worker (%d free spare(s), %d needed); add one with "
                        "`KINTSUGI_TOKEN=... kintsugi join --coordinator %s`; the job suspends after %.0fs "
                        "without one (recovery.spare_wait_s)", [list(s) for s in lost], free, len(lost), where,
                        self.c.settings.spare_wait_s)
            self.c.ledger.event({"kind": "waiting_for_spares", "slots": [list(s) for s in lost], "free": free})
        if now - cell.waiting_since > self.c.settings.spare_wait_s:
            self.c.reactions.suspend(f"no spare for slots {[list(s) for s in lost]} within recovery.spare_wait_s="
                                   f"{self.c.settings.spare_wait_s:.0f}s",
                                   lost=[s for c in self.c.st.cells.values() for s in c.lost])
