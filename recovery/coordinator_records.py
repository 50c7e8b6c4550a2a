"""The coordinator's logs and records: metrics.jsonl (commits, duplicates, events), the logs
workers append to, byte counts and the liveness file."""
from __future__ import annotations

import os
import time
from typing import Dict

from . import protocol as P
from .records import dumps_strict
from .coordinator_common import HOLD_RELAYED_S, LOGS, log


class RecordsMixin:
    """Part of `Coordinator` (recovery/coordinator.py); state lives there."""

    # --- records ----------------------------------------------------------------------------------
    def _event(self, ev: dict) -> None:
        ev = dict(ev, t=time.time() - self.t0)
        self._write(dumps_strict({"event": ev}))
        if self.tracker is not None:
            self.tracker.event(ev)

    def _write(self, line: str) -> None:
        try:
            self.metrics_f.write(line + "\n")
        except OSError as e:  # disk full: say so, keep coordinating
            if not getattr(self, "_write_error", None):
                self._write_error = str(e)
                log.error("cannot write metrics.jsonl (%s); training goes on, the record has a gap", e)

    def _on_commit(self, c: dict) -> None:
        r, k = int(c["replica"]), int(c["step"])
        if r not in self.recorded:
            raise ValueError(f"replica {r} is not in this job")
        if c.get("replay") and c.get("relayed_by") is not None and k not in self.recorded[r]:
            # A stage's copy of a commit its root wrote while the coordinator was away: the root's
            # own copy (which names the batch stage 0 read) may follow from its outbox. Held a
            # moment so that copy wins; released as it is if none comes.
            self.held.setdefault((r, k), (c, time.monotonic()))
            return
        self._accept_commit(r, k, c)

    def _release_held(self, all_: bool = False) -> None:
        now = time.monotonic()
        for key, (c, t) in list(self.held.items()):
            if all_ or now - t > HOLD_RELAYED_S:
                del self.held[key]
                if key[1] not in self.recorded[key[0]]:
                    self._accept_commit(key[0], key[1], c)

    def _accept_commit(self, r: int, k: int, c: dict) -> None:
        self.held.pop((r, k), None)
        if k in self.recorded[r]:
            if c.get("replay"):
                return  # a worker replaying what a restarted coordinator may have missed
            rec = dict(c, wall_s=time.time() - self.t0, duplicate=True)
            self._write(dumps_strict(rec))
            log.error("step %d of replica %d was committed twice", k, r)
            return
        self.recorded[r].add(k)
        cell = self.cells[self.cell_of[r]]
        cell.since, cell.kicks = time.monotonic(), 0
        if k > self.committed[r]:
            self.committed[r] = k
            if c.get("grad_sq") is not None:
                self.totals[r] = [c["grad_sq"], c.get("loss")]
        self.tokens += int(c.get("tokens", 0))
        if c.get("nonfinite"):
            self.nonfinite_steps += 1
        if self.rebalance and c.get("stage_compute_s") and c.get("layout_version", 0) == self.layout_version:
            self.stage_times.append(c["stage_compute_s"])
        rec = dict(c, wall_s=time.time() - self.t0, gen=cell.gen)
        rec.pop("replay", None)
        self._write(dumps_strict(rec))
        self._dirty = True
        if self.tracker is not None:
            self.tracker.commit(c)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{c['loss']:.3f}" if c.get("loss") is not None else "skipped",
                                 tok_s=f"{self.tokens / (time.time() - self.t0):.0f}", refresh=False)

    def _drain_logs(self) -> None:
        handlers = {"join": self._on_join, "rejoin": self._on_rejoin, "suspect": self._on_suspect,
                    "intent": self._on_intent, "suspended": self._on_suspended, "leave": self._on_leave,
                    "commit": self._on_commit, "eval": self._on_eval, "ckpt": self._on_ckpt,
                    "event": self._on_event, "ready": self._on_ready, "fault": self._on_fault,
                    "died": self._on_died}
        for name in LOGS:
            for rec in self.readers[name].poll():
                try:
                    handlers[name](rec)
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    log.warning("dropped a malformed %s record (%s): %.200s", name, e, rec)

    def _on_suspect(self, rep: dict) -> None:
        wid = rep["peer_wid"]
        w = self.workers.get(wid)
        if w is None or w.slot is None:
            return
        cell = self.cells[self.cell_of[w.slot[0]]]
        if rep.get("scope", "cell") != "cell" or int(rep["gen"]) != cell.gen:
            return
        reporters = self.reporters.setdefault((cell.index, cell.gen), set())
        reporters.add(rep["reporter"])
        if wid in reporters:
            # It reported a failure itself in this generation, so it was alive then; its peer saw
            # it leave the step, not die. A dead worker's heartbeat still gives it away.
            log.info("ignored a suspect report against %s from %s: it reported a failure itself", wid,
                     rep["reporter"])
            return
        self._declare_dead(wid, f"reported by {rep['reporter']}: {str(rep.get('why', ''))[:80]}")

    def _on_intent(self, it: dict) -> None:
        if it["wid"] in self.workers:
            self.workers[it["wid"]].leaving = True

    def _on_suspended(self, sv: dict) -> None:
        self.suspended[tuple(sv["slot"])] = int(sv["step"])

    def _on_leave(self, lv: dict) -> None:
        self._declare_dead(lv["wid"], lv.get("why", "leaving"), handed_off=True)
        if lv.get("machine"):
            # That machine is going away: its waiting spares get no slot (they leave too).
            for w in self.workers.values():
                if w.machine == lv["machine"] and w.state == "spare":
                    w.state = "left"

    def _on_died(self, d: dict) -> None:
        """A launcher saw the process exit: no need to wait for its heartbeat to go stale."""
        w = self.workers.get(d["wid"])
        if w is not None and w.state in ("active", "spare"):
            self._declare_dead(w.wid, f"process exited (code {d.get('rc')})")

    def _on_ready(self, rd: dict) -> None:
        slot = tuple(rd["slot"])
        if self.slots.get(slot) == rd["wid"]:
            cell = self.cells[self.cell_of[slot[0]]]
            if slot in cell.rebuilding and int(rd.get("gen", -1)) != cell.gen:
                return  # an older generation's rebuild: the newest plan rebuilds it again
            cell.rebuilding.pop(slot, None)
            self.ready[slot] = True
            self._dirty = True

    def _on_eval(self, e: dict) -> None:
        rec = dict(e, wall_s=time.time() - self.t0)
        self._write(dumps_strict(rec))
        if e.get("final"):
            self.final_val = e["val_loss"]
            self._dirty = True
        if self.tracker is not None:
            self.tracker.evaluation(e)
        if self.bar is not None:
            self.bar.write(f"step {e['step']}: val_loss {e['val_loss']:.4f}")

    def _on_ckpt(self, c: dict) -> None:
        step = int(c["step"])
        self.ckpt_counts[step] = self.ckpt_counts.get(step, 0) + 1
        if self.ckpt_counts[step] == self.R * self.S:
            self.latest_checkpoint = step if self.latest_checkpoint is None else max(self.latest_checkpoint, step)
            self._dirty = True

    def _on_event(self, ev: dict) -> None:
        if ev.get("kind") == "checkpoint_failed":
            log.error("slot %s could not write its checkpoint of step %s: %s", ev.get("slot"), ev.get("step"),
                      ev.get("error"))
            self.checkpoint_errors.append({k: ev.get(k) for k in ("step", "slot", "error")})
        if ev.get("kind") == "rebuild":
            if not any(r["slot"] == ev["slot"] and r["step"] == ev["step"] and r["tier"] == ev["tier"]
                       for r in self.rebuilds[-2 * self.R * self.S:]):
                self.rebuilds.append({k: ev[k] for k in ("step", "slot", "tier", "detect_s", "recover_s")})
            if self.bar is not None:
                self.bar.write(f"rebuilt slot {ev['slot']} via {ev['tier']} at step {ev['step']}: detected in "
                               f"{ev['detect_s']:.3f}s, training again {ev['recover_s']:.2f}s after the failure")
        self._event(ev)

    def _bytes(self) -> Dict[str, int]:
        total: Dict[str, int] = {}
        for wid in self.workers:
            try:
                got = P.get_json_or(self.store, f"bytes/{wid}", {}, auth=self.auth) or {}
            except (RuntimeError, ValueError):
                got = {}
            for ch, n in got.items():
                total[ch] = total.get(ch, 0) + n
        for ch, n in getattr(self, "bytes_before", {}).items():
            total[ch] = max(total.get(ch, 0), n)
        return total

    def _alive(self) -> None:
        """Touch RUN_DIR/.coordinator_alive about once a second: a launcher replaces a coordinator
        whose file stops moving (hung, stopped) like one that died."""
        now = time.monotonic()
        if now - getattr(self, "_alive_at", 0.0) < 1.0:
            return
        self._alive_at = now
        path = os.path.join(self.run_dir, ".coordinator_alive")
        try:
            with open(path, "a"):
                os.utime(path)
        except OSError:
            pass
