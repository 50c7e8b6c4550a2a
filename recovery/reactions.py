"""How the coordinator reacts to what goes wrong besides a lost worker (membership handles that):
a cell that stops making progress, a group that never forms, a transfer that never arrives, a
replica whose loss diverges, a corrupt checkpoint, a job whose every worker is leaving (suspend),
and machines of unequal speed (live rebalancing).

Every reaction ends in something the coordinator publishes (a re-plan, a rollback, a suspend, a new
layout) or in a stop with a message that says why: never an endless wait.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Set

from .plan import Divergence, Slot, SuspendPlan
from .planner import everyone_leaving, rebalance_decision
from .records import write_strict_atomic


log = logging.getLogger(__name__)


class Reactions:
    def __init__(self, coordinator):
        """`coordinator`: the recovery.coordinator.Coordinator reacting."""
        self.c = coordinator
        self.divergences = 0
        self.bad_checkpoints: Set[int] = set()
        # A suspend, once published: every holder saves its committed state; the job exits 75.
        self.suspend_gen: Optional[int] = None
        self.suspend_holders: Dict[Slot, str] = {}
        self.suspended: Dict[Slot, int] = {}
        self.suspend_lost: List[Slot] = []
        self.suspend_deadline = 0.0

    # --- stalls and failed generations -------------------------------------------------------------------
    def watchdog(self) -> None:
        """No commit and no plan change for progress_timeout_s: replace whoever never reached the
        cell's newest generation, or re-plan the cell as it is. Never an endless wait."""
        c, st = self.c, self.c.st
        timeout = c.settings.progress_timeout_s
        now = time.monotonic()
        for cell in st.cells.values():
            if cell.lost or cell.plan is None or now - cell.since < timeout:
                continue
            done = all(st.committed[r] >= c.settings.max_steps - 1 for r in cell.replicas)
            if done and (st.final_val is not None or 0 not in cell.replicas):
                continue
            stuck = [wid for wid in cell.plan.slots.values() if st.workers[wid].status.get("cell_gen", -1) < cell.gen]
            if stuck and cell.kicks == 0:
                for wid in stuck:
                    c.membership.declare_dead(wid, f"never reached cell {cell.index} generation {cell.gen} within "
                                                   f"recovery.progress_timeout_s={timeout:.0f}s")
                cell.kicks += 1
                continue
            if cell.kicks >= 3:
                c.error = (f"cell {cell.index} made no progress for {3 * timeout:.0f}s through 3 re-plans; see the "
                           "workers' logs")
                return
            cell.kicks += 1
            log.warning("cell %d: no progress for %.0fs; re-planning it", cell.index, now - cell.since)
            c.generations.replan_cell(cell, why="no progress")

    def on_fault(self, f: dict) -> None:
        """A worker could not form a group or its generation failed: re-plan what it reports."""
        c, st = self.c, self.c.st
        scope, gen = f.get("scope"), int(f.get("gen", -1))
        if scope == "cell":
            cell = st.cells.get(int(f.get("cell", -1)))
            if cell is None or gen != cell.gen:
                return
            missing = [w for w in f.get("missing_wids", []) if w in st.workers]
            for wid in missing:
                c.membership.declare_dead(wid, f"never arrived to form cell {cell.index} generation {gen}")
            if not missing and not cell.lost:
                log.warning("cell %d generation %d failed on %s (%s); re-planning", cell.index, gen, f.get("wid"),
                            str(f.get("error", ""))[:120])
                c.generations.replan_cell(cell, why=f"generation failed on {f.get('wid')}")
        elif scope == "checkpoint":
            self._on_corrupt_checkpoint(f)
        elif scope == "diverged":
            self._on_diverged(f)
        elif scope == "stage" and c.settings.stage_groups:
            s = int(f["stage"])
            if gen == st.stage_gen.get(s, -2):
                log.warning("stage %d generation %d failed on %s (%s); publishing the next", s, gen, f.get("wid"),
                            str(f.get("error", ""))[:120])
                c.generations.publish_stage(s)
        elif scope == "xfer":
            slot = tuple(f.get("slot", ()))
            cell = st.cell_of(slot[0]) if slot and slot[0] in st.committed else None
            wid = f.get("wid")
            if cell is not None and gen == cell.gen and st.slots.get(slot) == wid:
                # The target never got its state: the slot is lost again (never trained from scratch).
                log.warning("slot %s never received its state (%s); re-planning it", list(slot),
                            str(f.get("error", ""))[:120])
                c.membership.declare_dead(wid, "rebuild never received its state")

    # --- numbers and checkpoints ----------------------------------------------------------------------------
    def _good_checkpoints(self) -> List[int]:
        st, s = self.c.st, self.c.settings
        return [k for k, n in st.ckpt_counts.items() if n >= s.replicas * s.stages and k not in self.bad_checkpoints]

    def _on_diverged(self, f: dict) -> None:
        """train.max_nonfinite steps of a replica in a row were skipped. Roll it back with half the
        learning rate: under Streaming DiLoCo to its outer global copy (its own cell only), else
        every slot to the last checkpoint; without either, or after 3 divergences, stop saying so."""
        c, st = self.c, self.c.st
        cell = st.cells.get(int(f.get("cell", -1)))
        if cell is None or int(f.get("gen", -1)) != cell.gen or cell.diverging:
            return
        self.divergences += 1
        r, step, count = f.get("replica"), f.get("step"), f.get("count")
        c.ledger.event({"kind": "diverged", "replica": r, "step": step, "count": count})
        if self.divergences > 3:
            c.error = (f"training diverged again (replica {r}: {count} non-finite steps in a row up to step "
                       f"{step}, divergence {self.divergences}); lower train.lr or raise train.warmup_steps")
            return
        fix_id = f"{c.boot}/{self.divergences}"
        if c.settings.stage_groups:
            log.warning("replica %s diverged (%s non-finite steps in a row up to step %s): it restarts from its "
                        "outer global copy with half the learning rate", r, count, step)
            cell.diverging = True
            c.generations.publish_cell(cell, diverged=Divergence(fix_id, 0.5, reset_to_global=True))
            cell.diverging = False
            return
        good = self._good_checkpoints()
        if not good:
            c.error = (f"training diverged: replica {r} had {count} non-finite losses or gradient norms in a row "
                       f"up to step {step} and there is no checkpoint to roll back to; lower train.lr, raise "
                       "train.warmup_steps, or set recovery.checkpoint_every to roll back instead")
            return
        st.latest_checkpoint = max(good)
        log.warning("replica %s diverged (%s non-finite steps in a row up to step %s): every slot rolls back to "
                    "step %d with half the learning rate", r, count, step, st.latest_checkpoint)
        c.generations.global_rollback(diverged=Divergence(fix_id, 0.5))

    def _on_corrupt_checkpoint(self, f: dict) -> None:
        """A slot could not restore its checkpoint (a file fails its manifest). The exact state it
        was meant to restore is never replaced by a guess: roll every slot back to the newest step
        that is complete and not known bad, or stop saying why."""
        c, st = self.c, self.c.st
        step = f.get("step")
        if step is None or step in self.bad_checkpoints:
            return
        self.bad_checkpoints.add(int(step))
        log.error("checkpoint of step %s is corrupt (%s: %s)", step, f.get("file"), f.get("reason"))
        c.ledger.event({"kind": "checkpoint_corrupt", "step": step, "slot": f.get("slot"), "file": f.get("file"),
                        "reason": f.get("reason")})
        good = self._good_checkpoints()
        if not good:
            c.error = (f"the checkpoint of step {step} is corrupt ({f.get('file')}: {f.get('reason')}) and no "
                       "earlier complete checkpoint exists; the exact state cannot be restored")
            return
        st.latest_checkpoint = max(good)
        log.warning("rolling every slot back to step %d instead", st.latest_checkpoint)
        c.generations.global_rollback()

    # --- suspend -----------------------------------------------------------------------------------------------
    def maybe_suspend(self) -> None:
        """Every holder is leaving and no spare is free: no handoff can happen, so ask each holder to
        save its exact state as a checkpoint and stop. The job exits with EX_TEMPFAIL (75)."""
        c = self.c
        if not c.st.started or self.suspend_gen is not None:
            return
        holders = everyone_leaving(c.st, c.settings)
        if holders is not None:
            self.suspend("every worker is leaving and no spare is free", holders=holders)

    def suspend(self, why: str, holders: Optional[Dict[Slot, str]] = None, lost: Optional[List[Slot]] = None) -> None:
        c, st = self.c, self.c.st
        holders = dict(st.slots) if holders is None else holders
        if st.layout != c.config_layout:
            os.makedirs(os.path.join(c.run_dir, "checkpoints"), exist_ok=True)
            write_strict_atomic(os.path.join(c.run_dir, "checkpoints", "layout.json"), {"layers_per_stage": st.layout})
        self.suspend_lost = sorted(lost or [])
        c.board.put("suspend", SuspendPlan(holders, tuple(self.suspend_lost)).to_json())
        self.suspend_holders = holders
        self.suspend_gen = st.publications
        c.bump()
        self.suspend_deadline = time.monotonic() + max(60.0, 4 * c.settings.heartbeat_timeout_s)
        log.warning("suspending the job: %s (each slot saves its committed state; continue with train.resume=%s)",
                    why, os.path.abspath(c.run_dir))
        c.ledger.event({"kind": "suspend", "why": why, "committed": dict(st.committed),
                        "lost": [list(s) for s in self.suspend_lost]})

    def on_suspended(self, sv: dict) -> None:
        self.suspended[tuple(sv["slot"])] = int(sv["step"])

    def suspend_done(self) -> bool:
        if self.suspend_gen is None:
            return False
        expected = set(self.suspend_holders)
        if expected <= set(self.suspended):
            return True
        if time.monotonic() > self.suspend_deadline:
            missing = sorted(expected - set(self.suspended))
            self.c.error = f"suspend incomplete: slots {missing} did not save; resume falls back to an older checkpoint"
            return True
        return False

    # --- rebalancing ------------------------------------------------------------------------------------------
    def maybe_rebalance(self) -> None:
        """Every `rebalance_every` measured steps: if moving layers off the slowest stage predicts a
        step at least `rebalance_min_gain` shorter, publish a new generation of every cell and stage
        group with the new layout (the stages hand layers to each other exactly)."""
        c, st, s = self.c, self.c.st, self.c.settings
        if not s.rebalance or not st.started or self.suspend_gen is not None:
            return
        if any(cell.lost or cell.rebuilding for cell in st.cells.values()):
            return
        warm = 2 * s.replicas  # the first steps under a new layout build caches; skip them
        times = c.ledger.stage_times
        if len(times) < warm + s.rebalance_every or max(st.committed.values()) >= s.max_steps - 2:
            return
        decision = rebalance_decision(st.layout, times[warm:], s.stages, s.rebalance_min_gain)
        c.ledger.stage_times = []
        if decision is None:
            return
        counts, mean, gain = decision
        prev, st.layout = st.layout, counts
        st.layout_version += 1
        log.warning("rebalancing: stage compute %s s -> layers per stage %s -> %s (predicted step %.0f%% faster)",
                    [round(t, 4) for t in mean], prev, counts, 100 * gain)
        c.ledger.event({"kind": "rebalance", "from": prev, "to": counts, "stage_compute_s": mean,
                        "predicted_gain": gain})
        for cell in st.cells.values():
            c.generations.publish_cell(cell, prev_layout=prev)
        if s.stage_groups:
            for stage in range(s.stages):
                c.generations.publish_stage(stage)
