"""Features attached to the step loop. Each hook receives what it uses, never the worker.

Points of a step (trainer.runtime.step_loop): `before_step(step)`, `after_backward(step, compute_s)`
(the stage's gradients are complete; returns the compute seconds the commit reports),
`after_commit(step)` (committed and applied on this stage), `at_end()` (every step committed).

- LisaHook: picks the trainable layers before a step.
- DilocoHook: Streaming DiLoCo's outer syncs after each commit (the last ones land before the end).
- CheckpointHook: the initial state before step 0 and periodic checkpoints after commits.
- NeighbourCopyHook: CheckFree+'s copies of the end stages' embedding / head.
- DonorHook: peer snapshots for other replicas, served between two steps.
- LeaveHook: a worker told it is leaving stops after a commit (its state is then handed off).
- EvalHook: periodic validation (replica 0).
- DataParallelHook: the data-parallel baseline's gradient all-reduce after the backward.
- FaultHook: the local launcher's injected faults (a held step, poison, a crash inside the commit)
  and a simulated slower machine.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, List, Optional

import torch

from kintsugi.parallel.diloco import allreduce_gradients
from kintsugi.parallel.topology import Grid
from kintsugi.parallel.transport import ByteCounter, Transport
from kintsugi.recovery import control as C
from kintsugi.recovery.checkpoint import checkpoint_path, is_complete
from kintsugi.recovery.commit import Commit
from kintsugi.recovery.plan import Slot
from kintsugi.trainer.runtime.rebuild import package_event, refresh_neighbour_copies

log = logging.getLogger("kintsugi.worker")
INITIAL_STEP = -1  # the checkpoint of the initial state: "committed up to step -1"


class Leave(Exception):
    """The worker announced it is leaving; the next generation hands its state over."""


class StepHook:
    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int, compute_s: float) -> float:
        return compute_s

    def after_commit(self, step: int) -> None:
        """`step` has just been committed and applied on this stage."""

    def at_end(self) -> None:
        """Every step is committed (before the final evaluation)."""


class LisaHook(StepHook):
    def __init__(self, lisa):
        self.lisa = lisa

    def before_step(self, step):
        self.lisa.before_step(step)


class DilocoHook(StepHook):
    def __init__(self, diloco, max_steps: int):
        self.diloco, self.max_steps = diloco, max_steps

    def after_commit(self, step):
        self.diloco.after_inner_step(step + 1)
        if step + 1 == self.max_steps:
            self.diloco.finish_all()  # the last syncs land before the final evaluation

    def at_end(self):
        self.diloco.finish_all()


class CheckpointHook(StepHook):
    """Periodic checkpoints, and one of the initial state (`step_-1`, the state before step 0)
    written once before the first step of a fresh run: a failure before the first periodic
    checkpoint then rolls every stage back to the start instead of stopping the run."""

    def __init__(self, checkpointer, state, slot: Slot, run_dir: str):
        self.ckpt, self.state, self.slot, self.run_dir = checkpointer, state, slot, run_dir

    def before_step(self, step):
        # Once per slot: a worker that took the slot over at step 0 (rebuilt, maybe approximately)
        # must not replace the initial state its predecessor wrote.
        if step == 0 and self.ckpt.every > 0 and not is_complete(checkpoint_path(self.run_dir, INITIAL_STEP, self.slot)):
            self.ckpt.save(self.state, self.slot, INITIAL_STEP)

    def after_commit(self, step):
        st = self.state
        if self.ckpt.due(step):
            # A checkpoint is a state to roll back to: never one whose weights are not finite (that
            # step's checkpoint then stays incomplete, and the rollback takes the one before).
            if st.last_skipped or not st.params_finite():  # one host synchronisation, not one per tensor
                log.warning("slot %s: checkpoint of step %d skipped: the weights are not finite", self.slot, step)
                return
            self.ckpt.save(st, self.slot, step)

    def at_end(self):
        # The writer is a daemon thread: a checkpoint due at the last step must land before exit.
        self.ckpt.wait()


class NeighbourCopyHook(StepHook):
    """Every `every` steps (CheckFree+ only) the end stages refresh the copies their neighbours keep."""

    def __init__(self, state, grid: Grid, transport: Transport, slot: Slot, num_stages: int, every: int, control):
        self.state, self.grid, self.transport, self.slot = state, grid, transport, slot
        self.num_stages, self.every, self.control = num_stages, every, control

    def after_commit(self, step):
        if (step + 1) % self.every == 0:
            refresh_neighbour_copies(self.state, self.grid, self.transport, self.slot, self.num_stages,
                                     lambda src, n: package_event(self.control, "copy", self.slot, src, n, step))


class DonorHook(StepHook):
    """Peer snapshots for other replicas are taken between two steps."""

    def __init__(self, serve: Callable[[], None]):
        self.serve = serve

    def after_commit(self, step):
        self.serve()


class LeaveHook(StepHook):
    """Under an interruption notice the slot's holder trains on until `may_leave()` (a spare is
    ready and reserved for it) or for `train_s` at most, then announces its leave after the step.
    After the run's last step there is nothing left to hand over: the holder ends the run instead."""

    def __init__(self, leaving: threading.Event, announce: Callable[[], None], may_leave: Callable[[], bool],
                 train_s: float, max_steps: int):
        self.leaving, self.announce, self.may_leave, self.train_s = leaving, announce, may_leave, train_s
        self.max_steps = max_steps
        self.noticed_at: Optional[float] = None

    def after_commit(self, step):
        if not self.leaving.is_set() or step + 1 >= self.max_steps:
            return
        now = time.monotonic()
        self.noticed_at = self.noticed_at if self.noticed_at is not None else now
        if now - self.noticed_at >= self.train_s or self.may_leave():
            self.announce()
            raise Leave()


class EvalHook(StepHook):
    def __init__(self, evaluate: Callable[[int, bool], None], every: int, max_steps: int):
        self.evaluate, self.every, self.max_steps = evaluate, every, max_steps

    def after_commit(self, step):
        n = step + 1
        if self.every and n % self.every == 0 and n < self.max_steps:
            self.evaluate(n, False)


class DataParallelHook(StepHook):
    """The data-parallel baseline: gradients averaged across replicas after every backward."""

    def __init__(self, params: List[torch.Tensor], group, counter: ByteCounter, abort):
        self.params, self.group, self.counter, self.abort = params, group, counter, abort

    def after_backward(self, step, compute_s):
        try:
            allreduce_gradients(self.params, self.group, self.counter, self.abort)
        except RuntimeError as e:  # an NCCL collective past its deadline: abort it now, never reuse it
            if hasattr(self.group, "fail"):
                self.group.fail(e)
            raise
        return compute_s


class FaultHook(StepHook):
    """Injected faults (the local launcher's `faults.*`) hit an exact step: before step k the holder
    of a slot that an event targets at k says so (hold/<wid>) and waits there; the launcher sends
    the real signal (or asks for poison / a crash inside the commit) and marks the event fired.
    The failure then always interrupts step k, whatever the machine's speed: every run and every
    strategy sees the same failure. A retried step k (after the rebuild) does not wait again.
    `slowdown` > 1 makes this slot's machine that many times slower (its peers wait for real)."""

    HOLD_LIMIT_S = 10.0  # below recovery.progress_timeout_s: a launcher that never fires is not a hang

    def __init__(self, control: C.Control, wid: str, slot: Slot, events: List[dict], state, commit: Commit,
                 poison: threading.Event, abort: threading.Event, leaving: threading.Event, idle: Callable[[], None],
                 slowdown: float = 1.0):
        """`poison`: set by this hook for a held event, or by the worker's mail (an event tied to a
        rebuild); the weights turn NaN at the start of the next step."""
        self.control, self.wid, self.slot, self.events = control, wid, slot, events
        self.state, self.commit, self.poison = state, commit, poison
        self.abort, self.leaving, self.idle, self.slowdown = abort, leaving, idle, slowdown

    def before_step(self, step):
        for e in self.events:
            if e["step"] == step:
                self._hold(e)
        if self.poison.is_set():  # the weights turn NaN (a memory fault, a bad update)
            self.poison.clear()
            with torch.no_grad():
                for p in self.state.model.parameters():
                    p.mul_(float("nan"))
            log.warning("slot %s: weights poisoned with NaN (injected fault)", self.slot)

    def after_backward(self, step, compute_s):
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * compute_s)
            compute_s *= self.slowdown
        return compute_s

    def _hold(self, e: dict) -> None:
        fired_key, hold = f"fired/{e['id']}", {"event": e["id"], "step": e["step"]}
        try:
            if self.control.get_json_or(fired_key) is not None:
                return  # fired on this slot's previous holder: this is the retried step
            self.control.put_json(f"hold/{self.wid}", hold)
        except C.CoordinatorAway:
            return
        deadline = time.monotonic() + self.HOLD_LIMIT_S
        fired: Optional[dict] = None
        said = time.monotonic()
        while fired is None and time.monotonic() < deadline and not self.abort.is_set():
            self.idle()
            time.sleep(0.002)
            try:
                fired = self.control.get_json_or(fired_key)
                if fired is None and time.monotonic() - said > 0.5:  # a restarted coordinator's store is new
                    self.control.put_json(f"hold/{self.wid}", hold)
                    said = time.monotonic()
            except C.CoordinatorAway:
                pass
        if fired is None:
            log.warning("slot %s: fault event %s at step %d never fired; training on", self.slot, e["id"], e["step"])
            return
        if fired.get("wid") != self.wid:  # it hit a previous holder (re-announced after a coordinator restart)
            return
        kind = fired.get("kind")
        if kind == "poison":
            self.poison.set()
        elif kind == "crash_in_commit":
            self.commit.crash_in_commit.set()
        elif kind == "term":  # the handler sets `leaving` on this (main) thread's next bytecodes
            until = time.monotonic() + 5.0
            while not self.leaving.is_set() and time.monotonic() < until:
                time.sleep(0.001)
