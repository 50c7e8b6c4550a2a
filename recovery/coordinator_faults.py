"""The coordinator's reactions to faults: the progress watchdog, failed formations and transfers,
divergence, corrupt checkpoints, suspends, rebalancing and the spare pool."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

from . import protocol as P
from .placement import rebalance_layout
from .coordinator_common import Slot, WorkerInfo, log


class FaultsMixin:
    """Part of `Coordinator` (recovery/coordinator.py); state lives there."""

    def _watchdog(self) -> None:
        """No commit and no plan change for progress_timeout_s: replace whoever never reached the
        cell's newest generation, or re-plan the cell as it is. Never an endless wait."""
        now = time.monotonic()
        for cell in self.cells.values():
            if cell.lost or cell.plan is None or now - cell.since < self.progress_timeout:
                continue
            done = all(self.committed[r] >= self.max_steps - 1 for r in cell.replicas)
            if done and (self.final_val is not None or 0 not in cell.replicas):
                continue
            stuck = [wid for wid in cell.plan["slots"].values()
                     if self.workers[wid].status.get("cell_gen", -1) < cell.gen]
            if stuck and cell.kicks == 0:
                for wid in stuck:
                    self._declare_dead(wid, f"never reached cell {cell.index} generation {cell.gen} within "
                                            f"recovery.progress_timeout_s={self.progress_timeout:.0f}s")
                cell.kicks += 1
                continue
            if cell.kicks >= 3:
                self.error = (f"cell {cell.index} made no progress for {3 * self.progress_timeout:.0f}s through "
                              "3 re-plans; see the workers' logs")
                return
            cell.kicks += 1
            log.warning("cell %d: no progress for %.0fs; re-planning it", cell.index, now - cell.since)
            self._replan_cell(cell, why="no progress")

    def _on_fault(self, f: dict) -> None:
        """A worker could not form a group or its generation failed: re-plan what it reports."""
        scope, gen = f.get("scope"), int(f.get("gen", -1))
        if scope == "cell":
            cell = self.cells.get(int(f.get("cell", -1)))
            if cell is None or gen != cell.gen:
                return
            missing = [w for w in f.get("missing_wids", []) if w in self.workers]
            for wid in missing:
                self._declare_dead(wid, f"never arrived to form cell {cell.index} generation {gen}")
            if not missing and not cell.lost:
                log.warning("cell %d generation %d failed on %s (%s); re-planning", cell.index, gen, f.get("wid"),
                            str(f.get("error", ""))[:120])
                self._replan_cell(cell, why=f"generation failed on {f.get('wid')}")
        elif scope == "checkpoint":
            self._on_corrupt_checkpoint(f)
        elif scope == "diverged":
            self._on_diverged(f)
        elif scope == "stage" and self.stage_groups:
            s = int(f["stage"])
            if gen == self.stage_gen.get(s, -2):
                log.warning("stage %d generation %d failed on %s (%s); publishing the next", s, gen, f.get("wid"),
                            str(f.get("error", ""))[:120])
                self._publish_stage(s)
        elif scope == "xfer":
            slot = tuple(f.get("slot", ()))
            cell = self.cells.get(self.cell_of.get(slot[0], -1)) if slot else None
            wid = f.get("wid")
            if cell is not None and gen == cell.gen and self.slots.get(slot) == wid:
                # The target never got its state: the slot is lost again (never trained from scratch).
                log.warning("slot %s never received its state (%s); re-planning it", list(slot),
                            str(f.get("error", ""))[:120])
                self._declare_dead(wid, "rebuild never received its state")

    def _on_diverged(self, f: dict) -> None:
        """train.max_nonfinite steps of a replica in a row were skipped. Roll it back with half the
        learning rate: under Streaming DiLoCo to its outer global copy (its own cell only), else
        every slot to the last checkpoint; without either, or after 3 divergences, stop saying so."""
        cell = self.cells.get(int(f.get("cell", -1)))
        if cell is None or int(f.get("gen", -1)) != cell.gen or cell.diverging:
            return
        self.divergences += 1
        r, step, count = f.get("replica"), f.get("step"), f.get("count")
        self._event({"kind": "diverged", "replica": r, "step": step, "count": count})
        if self.divergences > 3:
            self.error = (f"training diverged again (replica {r}: {count} non-finite steps in a row up to step "
                          f"{step}, divergence {self.divergences}); lower train.lr or raise train.warmup_steps")
            return
        fix = {"id": f"{self.boot}/{self.divergences}", "lr_factor": 0.5}
        if self.stage_groups:
            fix["reset_to_global"] = True
            log.warning("replica %s diverged (%s non-finite steps in a row up to step %s): it restarts from its "
                        "outer global copy with half the learning rate", r, count, step)
            cell.diverging = True
            self._publish_cell(cell, {}, [], diverged=fix)
            cell.diverging = False
            return
        good = [k for k, n in self.ckpt_counts.items() if n >= self.R * self.S and k not in self.bad_checkpoints]
        if not good:
            self.error = (f"training diverged: replica {r} had {count} non-finite losses or gradient norms in a row "
                          f"up to step {step} and there is no checkpoint to roll back to; lower train.lr, raise "
                          "train.warmup_steps, or set recovery.checkpoint_every to roll back instead")
            return
        self.latest_checkpoint = max(good)
        log.warning("replica %s diverged (%s non-finite steps in a row up to step %s): every slot rolls back to "
                    "step %d with half the learning rate", r, count, step, self.latest_checkpoint)
        self._global_rollback(diverged=fix)

    def _on_corrupt_checkpoint(self, f: dict) -> None:
        """A slot could not restore its checkpoint (a file fails its manifest). The exact state it
        was meant to restore is never replaced by a guess: roll every slot back to the newest step
        that is complete and not known bad, or stop saying why."""
        step = f.get("step")
        if step is None or step in self.bad_checkpoints:
            return
        self.bad_checkpoints.add(int(step))
        log.error("checkpoint of step %s is corrupt (%s: %s)", step, f.get("file"), f.get("reason"))
        self._event({"kind": "checkpoint_corrupt", "step": step, "slot": f.get("slot"), "file": f.get("file"),
                     "reason": f.get("reason")})
        good = [k for k, n in self.ckpt_counts.items() if n >= self.R * self.S and k not in self.bad_checkpoints]
        if not good:
            self.error = (f"the checkpoint of step {step} is corrupt ({f.get('file')}: {f.get('reason')}) and no "
                          "earlier complete checkpoint exists; the exact state cannot be restored")
            return
        self.latest_checkpoint = max(good)
        log.warning("rolling every slot back to step %d instead", self.latest_checkpoint)
        self._global_rollback()

    def _maybe_suspend(self) -> None:
        """Every slot's holder is leaving (Slurm's warning reaches every task; a whole fleet gets its
        notice) and no spare is free: no handoff can happen, so ask each holder to save its exact
        state as a checkpoint and stop. The job exits with EX_TEMPFAIL (75)."""
        if not self.started or self.suspend_gen is not None:
            return
        holders: Dict[Slot, str] = dict(self.slots)
        for cell in self.cells.values():
            for slot, v in cell.lost.items():
                if not v["handed_off"]:
                    return  # a dead slot: the ordinary rebuild path decides
                holders[slot] = v["leaver"]
        if len(holders) < self.R * self.S or not all(self.workers[w].leaving for w in holders.values()):
            return
        if any(w.state == "spare" and not w.leaving for w in self.workers.values()):
            return  # someone can still take a handoff
        self._suspend("every worker is leaving and no spare is free", holders=holders)

    def _suspend(self, why: str, holders: Optional[Dict[Slot, str]] = None, lost: Optional[List[Slot]] = None) -> None:
        holders = dict(self.slots) if holders is None else holders
        if self.layout != self.config_layout:
            os.makedirs(os.path.join(self.run_dir, "checkpoints"), exist_ok=True)
            with open(os.path.join(self.run_dir, "checkpoints", "layout.json"), "w") as f:
                json.dump({"layers_per_stage": self.layout}, f)
        self.suspend_lost = sorted(lost or [])
        P.put_json(self.store, "suspend", {"holders": {P.slot_key(k): v for k, v in holders.items()},
                                           "lost": [list(s) for s in self.suspend_lost]}, auth=self.auth)
        self.suspend_holders = holders
        self.suspend_gen = self.publications
        self._bump()
        self.suspend_deadline = time.monotonic() + max(60.0, 4 * self.hb_timeout)
        log.warning("suspending the job: %s (each slot saves its committed state; continue with train.resume=%s)",
                    why, os.path.abspath(self.run_dir))
        self._event({"kind": "suspend", "why": why, "committed": dict(self.committed),
                     "lost": [list(s) for s in self.suspend_lost]})

    def _maybe_rebalance(self) -> None:
        """Every `rebalance_every` measured steps: if moving layers off the slowest stage predicts a
        step at least `rebalance_min_gain` shorter, publish a new generation of every cell and stage
        group with the new layout (the stages hand layers to each other exactly)."""
        if not self.rebalance or not self.started or self.suspend_gen is not None:
            return
        if any(c.lost or c.rebuilding for c in self.cells.values()):
            return
        warm = 2 * self.R  # the first steps under a new layout build caches; skip them
        if len(self.stage_times) < warm + self.rebalance_every:
            return
        if max(self.committed.values()) >= self.max_steps - 2:
            return
        rows = self.stage_times[warm:]
        mean = [sum(r[s] for r in rows) / len(rows) for s in range(self.S)]
        self.stage_times = []
        counts, predicted = rebalance_layout(self.layout, mean)
        gain = max(mean) / max(predicted, 1e-12) - 1.0
        if counts == self.layout or gain < self.rebalance_min_gain:
            return
        prev, self.layout = self.layout, counts
        self.layout_version += 1
        log.warning("rebalancing: stage compute %s s -> layers per stage %s -> %s (predicted step %.0f%% faster)",
                    [round(t, 4) for t in mean], prev, counts, 100 * gain)
        self._event({"kind": "rebalance", "from": prev, "to": counts, "stage_compute_s": mean,
                     "predicted_gain": gain})
        for cell in self.cells.values():
            self._publish_cell(cell, {}, [], prev_layout=prev)
        if self.stage_groups:
            for s in range(self.S):
                self._publish_stage(s)

    def _suspend_done(self) -> bool:
        if self.suspend_gen is None:
            return False
        expected = set(self.suspend_holders)
        if expected <= set(self.suspended):
            return True
        if time.monotonic() > self.suspend_deadline:
            missing = sorted(expected - set(self.suspended))
            self.error = f"suspend incomplete: slots {missing} did not save; resume falls back to an older checkpoint"
            return True
        return False

    @staticmethod
    def _pool(spares: List[WorkerInfo]) -> Dict[str, List[WorkerInfo]]:
        pool: Dict[str, List[WorkerInfo]] = {}
        for w in spares:
            pool.setdefault(w.machine, []).append(w)
        return pool

    def _pool_sizes(self, spares: List[WorkerInfo]) -> Dict[str, int]:
        return {m: len(ws) for m, ws in self._pool(spares).items()}

    def _assign(self, slot: Slot, w: WorkerInfo) -> None:
        w.state, w.slot = "active", slot
        self.slots[slot] = w.wid
        self._dirty = True
