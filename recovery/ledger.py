"""The ledger: every committed step, evaluation and event of the run, in `metrics.jsonl`.

A step's commit record comes from its chain's root (stage 0), or, when the root died between
publishing the step and recording it, from a stage that applied it (`relayed_by`); after a
coordinator restart the workers replay what it may have missed (`replay`). The ledger keeps the
first record of each (replica, step): a relayed replay waits a moment for its root's own copy (which
names the batch stage 0 read), a replay of a recorded step is dropped, and a second genuine commit
of one step is written marked `duplicate` and logged as an error: never silently repeated.

It also counts tokens and non-finite (skipped) steps, learns which checkpoint steps every slot
wrote, collects each stage's compute time for rebalancing, and sums the workers' byte counters.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from . import protocol as P
from .board import Board
from .control_state import CoordinatorState, Settings
from .records import dumps_strict
from .runfiles import METRICS, read_jsonl, standing_commits

log = logging.getLogger(__name__)
HOLD_RELAYED_S = 1.0  # how long a relayed replay waits for its root's own copy


class Ledger:
    def __init__(self, st: CoordinatorState, settings: Settings, board: Board, run_dir: str,
                 changed: Callable[[], None], tracker=None, bar=None):
        self.st, self.settings, self.board, self.run_dir = st, settings, board, run_dir
        self.changed, self.tracker, self.bar = changed, tracker, bar
        self.recorded: Dict[int, Set[int]] = {r: set() for r in range(settings.replicas)}
        self._prefix_hint: Dict[int, int] = {}
        self._published_prefix: Dict[int, int] = {}
        self.held: Dict[Tuple[int, int], Tuple[dict, float]] = {}  # relayed replays, see on_commit
        self.stage_times: List[List[float]] = []   # per commit, each stage's compute seconds
        self.nonfinite_steps = 0
        self.checkpoint_errors: List[dict] = []
        self.write_error: Optional[str] = None
        self.bytes_before: Dict[str, int] = dict(st.bytes)  # what a previous incarnation saw
        self._bytes_at = 0.0
        self.metrics_f = open(os.path.join(run_dir, METRICS), "a", buffering=1)

    def restore(self) -> None:
        """A restarted coordinator: what was committed is what metrics.jsonl recorded (it is written
        before the state file), so the steps, tokens, last totals and final loss come from there."""
        st = self.st
        st.tokens = 0
        standing, _ = standing_commits(self.run_dir)  # rows a rollback or a resume undid do not count
        for rec in standing:
            r, k = int(rec["replica"]), int(rec["step"])
            if r in self.recorded and k not in self.recorded[r]:
                self.recorded[r].add(k)
                st.tokens += int(rec.get("tokens", 0))
                if k > st.committed[r]:
                    st.committed[r] = k
                    if rec.get("grad_sq") is not None:
                        st.totals[r] = [rec["grad_sq"], rec.get("loss")]
        for rec in read_jsonl(os.path.join(self.run_dir, METRICS)):
            if rec.get("final") and "val_loss" in rec:
                st.final_val = rec["val_loss"]

    def resumed(self, resume_from: Dict[int, int]) -> None:
        """train.resume: every step up to each replica's resume point is in the earlier run's record
        (or named missing by the resume event), so no worker is asked to send it again."""
        for r, k in resume_from.items():
            if r in self.recorded:
                self.recorded[r].update(range(int(k) + 1))

    def recorded_prefix(self, r: int) -> int:
        """Every step of replica r up to this one is in metrics.jsonl (replays start after it)."""
        prefix = self._prefix_hint.get(r, -1)
        if prefix >= 0 and prefix not in self.recorded[r]:  # a rollback forgot steps
            prefix = -1
        while prefix + 1 in self.recorded[r]:
            prefix += 1
        self._prefix_hint[r] = prefix
        return prefix

    def missing_steps(self, max_steps: int):
        """Per replica, the steps below its highest recorded one (or below `max_steps` once the run
        is over) that metrics.jsonl does not hold: a record that never arrived."""
        return {r: [k for k in range(max_steps) if k not in done] for r, done in self.recorded.items()
                if len(done) < max_steps}

    # --- writing ---------------------------------------------------------------------------------------
    def write(self, line: str) -> None:
        try:
            self.metrics_f.write(line + "\n")
        except OSError as e:  # disk full: say so, keep coordinating
            if not self.write_error:
                self.write_error = str(e)
                log.error("cannot write metrics.jsonl (%s); training goes on, the record has a gap", e)

    def event(self, ev: dict) -> None:
        ev = dict(ev, t=time.time() - self.st.t0)
        self.write(dumps_strict({"event": ev}))
        if self.tracker is not None:
            self.tracker.event(ev)

    # --- commits ---------------------------------------------------------------------------------------
    def on_commit(self, c: dict) -> None:
        r, k = int(c["replica"]), int(c["step"])
        if r not in self.recorded:
            raise ValueError(f"replica {r} is not in this job")
        if c.get("replay") and c.get("relayed_by") is not None and k not in self.recorded[r]:
            # A stage's copy of a commit its root wrote while the coordinator was away: the root's
            # own copy (which names the batch stage 0 read) may follow from its outbox. Held a
            # moment so that copy wins; released as it is if none comes.
            self.held.setdefault((r, k), (c, time.monotonic()))
            return
        self.accept(r, k, c)

    def release_held(self, all_: bool = False) -> None:
        now = time.monotonic()
        for key, (c, t) in list(self.held.items()):
            if all_ or now - t > HOLD_RELAYED_S:
                del self.held[key]
                if key[1] not in self.recorded[key[0]]:
                    self.accept(key[0], key[1], c)

    def accept(self, r: int, k: int, c: dict) -> None:
        st = self.st
        self.held.pop((r, k), None)
        if k in self.recorded[r]:
            if c.get("replay"):
                return  # a worker replaying what a restarted coordinator may have missed
            self.write(dumps_strict(dict(c, wall_s=time.time() - st.t0, duplicate=True)))
            log.error("step %d of replica %d was committed twice", k, r)
            return
        self.recorded[r].add(k)
        prefix = self.recorded_prefix(r)
        if prefix != self._published_prefix.get(r):  # workers resend what this does not cover
            self._published_prefix[r] = prefix
            self.board.put(f"recorded/{r}", {"step": prefix})
        cell = st.cell_of(r)
        cell.since, cell.kicks = time.monotonic(), 0
        cell.committed_at = cell.since
        if k > st.committed[r]:
            st.committed[r] = k
            if c.get("grad_sq") is not None:
                st.totals[r] = [c["grad_sq"], c.get("loss")]
        st.tokens += int(c.get("tokens", 0))
        if c.get("nonfinite"):
            self.nonfinite_steps += 1
        if self.settings.rebalance and c.get("stage_compute_s") and c.get("layout_version", 0) == st.layout_version:
            self.stage_times.append(c["stage_compute_s"])
        rec = dict(c, wall_s=time.time() - st.t0, gen=cell.gen)
        rec.pop("replay", None)
        self.write(dumps_strict(rec))
        self.changed()
        if self.tracker is not None:
            self.tracker.commit(c)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{c['loss']:.3f}" if c.get("loss") is not None else "skipped",
                                 tok_s=f"{st.tokens / (time.time() - st.t0):.0f}", refresh=False)

    def forget_after(self, r: int, k: int) -> List[int]:
        """A rollback to step k undoes replica r's later steps (training them again is no second
        commit). Returns the steps discarded."""
        discarded = sorted(x for x in self.recorded[r] if x > k)
        self.recorded[r] = {x for x in self.recorded[r] if x <= k}
        self.held = {key: v for key, v in self.held.items() if key[0] != r or key[1] <= k}
        self._published_prefix[r] = self.recorded_prefix(r)
        self.board.put(f"recorded/{r}", {"step": self._published_prefix[r]})
        return discarded

    # --- evaluations, checkpoints, events ---------------------------------------------------------------
    def on_eval(self, e: dict) -> None:
        if e.get("final") and self.st.final_val is not None:
            return  # sent again to this incarnation (Control.append_kept): recorded already
        self.write(dumps_strict(dict(e, wall_s=time.time() - self.st.t0)))
        if e.get("final"):
            self.st.final_val = e["val_loss"]
            self.board.put(P.FINAL_EVAL_KEY, True)
            self.changed()
        if self.tracker is not None:
            self.tracker.evaluation(e)
        if self.bar is not None:
            self.bar.write(f"step {e['step']}: val_loss {e['val_loss']:.4f}")

    def on_ckpt(self, c: dict) -> None:
        st = self.st
        step = int(c["step"])
        st.ckpt_counts[step] = st.ckpt_counts.get(step, 0) + 1
        if st.ckpt_counts[step] == self.settings.replicas * self.settings.stages:
            st.latest_checkpoint = step if st.latest_checkpoint is None else max(st.latest_checkpoint, step)
            self.changed()

    def on_event(self, ev: dict) -> None:
        if ev.get("kind") == "checkpoint_failed":
            log.error("slot %s could not write its checkpoint of step %s: %s", ev.get("slot"), ev.get("step"),
                      ev.get("error"))
            self.checkpoint_errors.append({k: ev.get(k) for k in ("step", "slot", "error")})
        if ev.get("kind") == "rebuild":
            S, R = self.settings.stages, self.settings.replicas
            if not any(r["slot"] == ev["slot"] and r["step"] == ev["step"] and r["tier"] == ev["tier"]
                       for r in self.st.rebuilds[-2 * R * S:]):
                self.st.rebuilds.append({k: ev[k] for k in ("step", "slot", "tier", "detect_s", "recover_s")})
            if self.bar is not None:
                self.bar.write(f"rebuilt slot {ev['slot']} via {ev['tier']} at step {ev['step']}: detected in "
                               f"{ev['detect_s']:.3f}s, training again {ev['recover_s']:.2f}s after the failure")
        self.event(ev)

    # --- bytes --------------------------------------------------------------------------------------------
    def bytes(self) -> Dict[str, int]:
        total: Dict[str, int] = {}
        for wid in self.st.workers:
            try:
                got = self.board.get(f"bytes/{wid}", {}) or {}
            except (RuntimeError, ValueError):
                got = {}
            for ch, n in got.items():
                total[ch] = total.get(ch, 0) + n
        for ch, n in self.bytes_before.items():
            total[ch] = max(total.get(ch, 0), n)
        return total

    def refresh_bytes(self) -> None:
        """The byte counts in the persisted state, refreshed at most every 2 s."""
        now = time.monotonic()
        if now - self._bytes_at > 2.0:
            self._bytes_at = now
            self.st.bytes = self.bytes()

    def close(self) -> None:
        try:
            self.metrics_f.close()
        except OSError:
            pass
