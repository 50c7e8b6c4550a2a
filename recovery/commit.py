"""The commit: when a step of a replica (of a cell, under plain data-parallel) counts as done, on
every stage or on none, and how the coordinator learns it exactly once.

One step's commit, on one worker:

1. `pending(step, local_sq)`: this stage's backward of `step` is done (its gradients are held).
2. `reduce(...)`: the chain reduction of every stage's [grad sq-norm, loss, timings] towards the
   chain's root (stage 0; the first slot of the cell under data-parallel). The root holds the total:
   that is the commit point. Before sending the total back it records the step in the store
   (`committed/<r>`, with its commit record riding along) and appends the record to the `commit` log
   (or its outbox while the coordinator is away). A root killed in between leaves the survivors a
   step they apply and the coordinator lacks: they finish it from the store's entry and send its
   record (`replay_unrecorded`). Then the total travels back along the chain; every stage applies
   (or, non-finite, skips) the same step.
3. `remember(record)`: each stage keeps its last records in a ring. A coordinator that restarts
   missed whatever was committed while it was away: `replay_after_restart` sends what its
   `recorded/<r>` does not cover, marked `replay` (the coordinator keeps the first copy of a step).

At the start of a generation `reconcile` makes the cell agree which step committed last (a failure
can leave some stages having applied step K and others holding K's gradients only); a stage one step
behind applies K with the total a peer or the store holds. Nothing here knows the model: the stage
is seen through `CommitTarget`.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
from typing import Callable, Deque, Dict, Optional, Protocol, Sequence, Tuple

import torch

from kintsugi.parallel.transport import Transport, wait_abortable

from . import control as C

log = logging.getLogger(__name__)
COMMIT_TAG = 1 << 21


def finite_total(total: torch.Tensor) -> bool:
    """The step's summed grad sq-norm and loss are finite: it is applied (else skipped everywhere)."""
    return bool(torch.isfinite(total[:2]).all())


class CommitTarget(Protocol):
    """What the commit needs of a stage's state."""
    step_done: int
    last_total: Optional[float]
    last_skipped: bool

    def apply_step(self, step: int, total_sq: float, local_sq: float) -> float: ...
    def skip_step(self, step: int) -> None: ...
    def zero_grad(self) -> None: ...


class Commit:
    """The worker's side of the commit protocol; it lives as long as the worker (the ring and a
    pending step outlast a generation)."""

    RING = 4096

    def __init__(self, control: C.Control):
        self.control = control
        self.pending: Optional[Tuple[int, float]] = None  # (step, local sq-norm): backward done, commit not seen
        self._ring: Deque[Tuple[float, dict]] = collections.deque(maxlen=self.RING)  # (when, record)
        self._resent: Dict[Tuple[int, int], float] = {}  # (replica, step) -> when it was last resent
        self._lock = threading.Lock()
        self.crash_in_commit = threading.Event()  # injected fault: die between publishing and recording

    # --- one step --------------------------------------------------------------------------------------
    def reduce(self, transport: Transport, vec: torch.Tensor, chain: Sequence[int], step: int, scale: float,
               records: Callable[[torch.Tensor], Dict[int, dict]], own_replica: int,
               exact_tail: int = 0) -> torch.Tensor:
        """Sum `vec` along `chain` (the replica's stages in order, or the cell's slots); the root
        records the commit before anyone applies it. `records(total)` builds the commit record of
        every replica the chain commits (the root calls it once). Returns the scaled total. The last
        `exact_tail` entries are facts one member states and the others leave at zero (the batch ids
        stage 0 read): summed, never scaled, so they arrive exactly as stated."""
        tag = COMMIT_TAG + 2 * (step % 1000)
        me = list(chain).index(transport.my_rank)
        n = len(chain)
        vec = vec.detach().clone().to(torch.float64)
        factor = torch.full_like(vec, scale)
        if exact_tail:
            factor[len(vec) - exact_tail:] = 1.0
        if me < n - 1:
            vec += transport.recv(vec.shape, chain[me + 1], tag, "control", dtype=torch.float64)
        if me == 0:
            self._publish(step, vec * factor, records(vec * factor), own_replica, len(vec) - exact_tail)
        else:
            transport.send(vec, chain[me - 1], tag, "control")
            transport.flush()
            vec = transport.recv(vec.shape, chain[me - 1], tag + 1, "control", dtype=torch.float64)
        if me < n - 1:
            transport.send(vec, chain[me + 1], tag + 1, "control")
            transport.flush()
        return vec * factor

    def _publish(self, step: int, total: torch.Tensor, recs: Dict[int, dict], own_replica: int,
                 head: Optional[int] = None) -> None:
        """The commit point, on the root: the store entry (with the record riding along), then the
        record itself; only then does the total travel back along the chain. The entry keeps the
        total's first `head` entries (the sums; the records carry the rest)."""
        entry = ({"step": step, "total": total[:head].tolist()} if finite_total(total)
                 else {"step": step, "total": None, "skipped": True})
        for q, rec in recs.items():
            with contextlib.suppress(Exception):  # the coordinator away: reconcile covers it
                self.control.put_json(f"committed/{q}", dict(entry, record=rec))
        if self.crash_in_commit.is_set():
            log.warning("SIGKILL inside the commit of step %d (injected fault)", step)
            os.kill(os.getpid(), signal.SIGKILL)
        for q, rec in recs.items():
            if q != own_replica:
                self.remember(rec)  # the other replicas' records, for a restarted coordinator
            try:
                self.control.append("commit", rec)
            except C.CoordinatorAway:
                # Delivered when the coordinator is back; a stage's ring may have replayed it by
                # then, so it may arrive twice: marked, the coordinator keeps the first.
                self.control.outbox.append(("commit", dict(rec, replay=True)))

    def remember(self, rec: dict) -> None:
        with self._lock:
            self._ring.append((time.monotonic(), rec))

    def forget_after(self, replica: int, step: int) -> None:
        """A rollback to `step`: the ring's later records of this replica were discarded with their
        steps (trained again, committed again); sending them again would only make duplicates."""
        with self._lock:
            self._ring = collections.deque(((t, r) for t, r in self._ring
                                            if r.get("replica") != replica or r["step"] <= step), maxlen=self.RING)

    def newest(self, replica: int) -> Optional[int]:
        """The newest step of `replica` this stage applied and still holds the record of."""
        steps = [r["step"] for r in self._records() if r.get("replica") == replica]
        return max(steps) if steps else None

    def _records(self):
        with self._lock:
            return [r for _, r in self._ring]

    def resend_unrecorded(self, control, replica: int, min_age_s: float, every_s: float = 10.0) -> int:
        """The writer's side of a log that must not lose a record: whatever this stage applied that
        the coordinator's `recorded/<r>` (every step up to there is in metrics.jsonl) does not yet
        cover, committed at least `min_age_s` ago (the normal path had its chance), is sent again,
        marked `replay` (the coordinator keeps the first copy). Each step at most every `every_s`.
        A commit log whose counter was wound back or whose entries were deleted loses nothing."""
        known = (control.get_json_or(f"recorded/{replica}") or {}).get("step", -1)
        now = time.monotonic()
        with self._lock:
            due = [r for t, r in self._ring if r.get("replica") == replica and r["step"] > known
                   and now - t >= min_age_s and now - self._resent.get((replica, r["step"]), -1e9) >= every_s]
            for r in due:
                self._resent[(replica, r["step"])] = now
            if len(self._resent) > 4 * self.RING:
                self._resent = {k: v for k, v in self._resent.items() if k[1] > known}
        for r in due:
            control.append("commit", dict(r, replay=True))
        if due:
            log.warning("replica %d: steps %s not recorded by the coordinator after %.0fs; sent again", replica,
                        [r["step"] for r in due][:10], min_age_s)
        return len(due)

    # --- a coordinator that missed records ----------------------------------------------------------------
    def replay_after_restart(self, control: C.Control, replica: int) -> None:
        """The coordinator came back as a new incarnation: send the records its `recorded/<r>` (every
        step up to there is in metrics.jsonl) does not cover."""
        known = (control.get_json_or(f"recorded/{replica}") or {}).get("step", -1)
        replay = [r for r in self._records() if r["step"] > known]
        for r in replay:
            control.append("commit", dict(r, replay=True))
        if replay:
            log.warning("replayed %d commit records (steps %d..%d) to the restarted coordinator", len(replay),
                        replay[0]["step"], replay[-1]["step"])

    def replay_unrecorded(self, replica: int, known: Optional[int], committed: int) -> None:
        """A root killed after publishing a step's commit but before appending its record leaves the
        coordinator without that record (`known` is what it recorded), while the survivors applied
        the step. Their rings hold it (relayed): send those steps, marked as replays (the
        coordinator keeps the first copy, and prefers the root's if one comes)."""
        if known is None or committed <= known:
            return
        missing = [r for r in self._records() if r.get("replica") == replica and known < r["step"] <= committed]
        if committed not in {r["step"] for r in missing}:
            # Finished from the store's entry (the root died before any broadcast): its record is there.
            try:
                entry = self.control.get_json_or(f"committed/{replica}")
            except C.CoordinatorAway:
                entry = None
            if isinstance(entry, dict) and entry.get("step") == committed and isinstance(entry.get("record"), dict):
                missing.append(entry["record"])
        for rec in missing:
            self.control.append_later("commit", dict(rec, replay=True))
        if missing:
            log.warning("replica %d: steps %s were committed but never recorded (their root died in between); "
                        "sent this stage's copy", replica, [r["step"] for r in missing])

    # --- a generation's start ------------------------------------------------------------------------------
    def reconcile(self, target: CommitTarget, group, abort, has_state: bool, store_commit: Optional[dict],
                  floor: int, who) -> int:
        """The cell agrees on its last committed step K and finishes it where it was cut short.

        Every rank of the new group contributes [has state, last applied step, its commit total, has
        a total, pending step, skipped]; K is the highest applied step among ranks with state, or
        the store's record when it is higher (the root recorded K and died before any broadcast
        arrived). Ranks one step behind apply their pending K with the total a peer (or the store)
        holds. Returns K (the cell resumes at K + 1)."""
        st = target
        pending = self.pending if has_state else None
        has_total = has_state and st.last_total is not None
        skipped = has_state and st.last_skipped
        row = torch.tensor([float(has_state), float(st.step_done if has_state else -1),
                            float(st.last_total if has_total else 0.0), float(has_total),
                            float(pending[0] if pending is not None else -1), float(skipped)], dtype=torch.float64)
        rows = torch.empty(group.size() * row.numel(), dtype=torch.float64)
        wait_abortable(group.all_gather_into_tensor(rows, row), abort)
        rows = rows.view(group.size(), row.numel())
        live = rows[rows[:, 0] == 1.0]
        k_live = int(live[:, 1].max()) if len(live) else floor
        k, total = k_live, None  # with no stage left that holds state, the coordinator's record
        with_total = live[(live[:, 1] == k_live) & (live[:, 3] == 1.0)] if len(live) else live
        if len(with_total):
            total = float(with_total[0, 2])
        skip = bool(len(live)) and bool((live[live[:, 1] == k_live][:, 5] == 1.0).any())
        if store_commit is not None and int(store_commit["step"]) > k and (
                store_commit.get("total") is not None or store_commit.get("skipped")):
            k = int(store_commit["step"])
            skip = bool(store_commit.get("skipped"))
            total = None if skip else float(store_commit["total"][0])
        if has_state:
            if st.step_done < k:
                if st.step_done == k - 1 and pending is not None and pending[0] == k and skip:
                    st.skip_step(k)
                    log.info("step %d was skipped by the cell (non-finite): skipped here too", k)
                elif st.step_done == k - 1 and pending is not None and pending[0] == k and total is not None:
                    st.apply_step(k, total, pending[1])
                    st.last_total = total
                    log.info("finished step %d from the cell's commit record", k)
                else:
                    raise RuntimeError(f"slot {who} applied step {st.step_done} but its cell committed {k}; "
                                       "the stages disagree by more than one step")
            elif st.step_done > k:
                raise RuntimeError(f"slot {who} applied step {st.step_done}, beyond the cell's {k}")
        self.pending = None
        st.zero_grad()
        return k
