"""The step loop of one slot within one cell generation, with features attached as hooks.

One step: the replica's batch for this step -> the schedule's forward/backward over the pipeline
(parallel.schedules) -> the commit (a chain reduction of [grad sq-norm, loss, stage compute times]
towards stage 0; stage 0 records it in the store BEFORE broadcasting it back, so the optimizer
step runs on all stages of a replica or on none, see recovery_exec.reconcile) -> clip and step ->
hooks. An uncommitted step is retried on the same batch in the next generation.

Hooks (`StepHook`) keep the loop free of `if feature:` branches: LISA picks the trainable layers
before a step; Streaming DiLoCo runs its outer syncs after each commit; checkpoints, the CheckFree+
neighbour copies, peer snapshots for other replicas, evaluation and a graceful leave each attach
after the commit too.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import List

import torch

from kintsugi.parallel.diloco import allreduce_gradients
from kintsugi.parallel.schedules import StageExecutor, actions_for, routes_for
from kintsugi.parallel.topology import Grid
from kintsugi.parallel.transport import Transport
from kintsugi.recovery import protocol as P

from kintsugi.recovery.checkpoint import checkpoint_path, is_complete
from kintsugi.trainer.config.job import fault_events, held_at_boundary
from kintsugi.trainer.data.corpus import ShardedBatches, val_batches
from kintsugi.trainer.model.llama import cross_entropy_loss
from kintsugi.trainer.runtime.rebuild import refresh_neighbour_copies

log = logging.getLogger("kintsugi.worker")
COMMIT_TAG = 1 << 21
INITIAL_STEP = -1  # the checkpoint of the initial state: "committed up to step -1"


def _finite(total) -> bool:
    return bool(torch.isfinite(total[:2]).all())


class Diverged(RuntimeError):
    """train.max_nonfinite steps in a row were skipped: the replica must roll back."""

    def __init__(self, step: int, count: int):
        super().__init__(f"{count} non-finite steps in a row up to step {step}")
        self.step, self.count = step, count


class Leave(Exception):
    """The worker announced it is leaving; the next generation hands its state over."""


class StepHook:
    def before_step(self, step: int) -> None:
        pass

    def after_commit(self, step: int) -> None:
        """`step` has just been committed and applied on this stage."""

    def at_end(self) -> None:
        """Every step is committed (before the final evaluation)."""


class FaultHook(StepHook):
    """Injected faults (the local launcher's `faults.*`) hit an exact step: before step k the holder
    of a slot that an event targets at k says so (hold/<wid>) and waits there; the launcher sends
    the real signal (or asks for poison / a crash inside the commit) and marks the event fired.
    The failure then always interrupts step k, whatever the machine's speed: every run and every
    strategy sees the same failure. A retried step k (after the rebuild) does not wait again."""

    HOLD_LIMIT_S = 10.0  # below recovery.progress_timeout_s: a launcher that never fires is not a hang

    def __init__(self, worker, events):
        self.w, self.events = worker, events

    def before_step(self, step):
        for e in self.events:
            if e["step"] == step:
                self._hold(e)

    def _hold(self, e) -> None:
        w = self.w
        fired_key = f"fired/{e['id']}"
        try:
            if w.control.get_json_or(fired_key) is not None:
                return  # fired on this slot's previous holder: this is the retried step
            w.control.put_json(f"hold/{w.wid}", {"event": e["id"], "step": e["step"]})
        except P.CoordinatorAway:
            return
        deadline = time.monotonic() + self.HOLD_LIMIT_S
        fired, said = None, time.monotonic()
        while fired is None and time.monotonic() < deadline and not w.watcher.cell_abort.is_set():
            w.idle()
            time.sleep(0.002)
            try:
                fired = w.control.get_json_or(fired_key)
                if fired is None and time.monotonic() - said > 0.5:  # a restarted coordinator's store is new
                    w.control.put_json(f"hold/{w.wid}", {"event": e["id"], "step": e["step"]})
                    said = time.monotonic()
            except P.CoordinatorAway:
                pass
        if fired is None:
            log.warning("slot %s: fault event %s at step %d never fired; training on", w.slot, e["id"], e["step"])
            return
        if fired.get("wid") != w.wid:  # it hit a previous holder (re-announced after a coordinator restart)
            return
        kind = fired.get("kind")
        if kind == "poison":
            w.poison.set()
        elif kind == "crash_in_commit":
            w.crash_in_commit.set()
        elif kind == "term":  # the handler sets `leaving` on this (main) thread's next bytecodes
            until = time.monotonic() + 5.0
            while not w.leaving.is_set() and time.monotonic() < until:
                time.sleep(0.001)


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

    def __init__(self, worker, slot):
        self.w, self.slot = worker, slot

    def before_step(self, step):
        ckpt = self.w.checkpointer
        # Once per slot: a worker that took the slot over at step 0 (rebuilt, maybe approximately)
        # must not replace the initial state its predecessor wrote.
        if step == 0 and ckpt.every > 0 and not is_complete(checkpoint_path(self.w.run_dir, INITIAL_STEP, self.slot)):
            ckpt.save(self.w.state, self.slot, INITIAL_STEP, self.w.diloco)

    def after_commit(self, step):
        st = self.w.state
        if self.w.checkpointer.due(step):
            # A checkpoint is a state to roll back to: never one whose weights are not finite (that
            # step's checkpoint then stays incomplete, and the rollback takes the one before).
            if st.last_skipped or not all(bool(torch.isfinite(p).all()) for p in st.model.parameters()):
                log.warning("slot %s: checkpoint of step %d skipped: the weights are not finite", self.slot, step)
                return
            self.w.checkpointer.save(st, self.slot, step, self.w.diloco)

    def at_end(self):
        # The writer is a daemon thread: a checkpoint due at the last step must land before exit.
        self.w.checkpointer.wait()


class NeighbourCopyHook(StepHook):
    def __init__(self, worker, grid, transport, slot):
        self.w, self.grid, self.transport, self.slot = worker, grid, transport, slot

    def after_commit(self, step):
        refresh_neighbour_copies(self.w, self.grid, self.transport, self.slot, step + 1)


class DonorHook(StepHook):
    """Peer snapshots for other replicas are taken between two steps."""

    def __init__(self, worker):
        self.w = worker

    def after_commit(self, step):
        self.w.idle()


class LeaveHook(StepHook):
    def __init__(self, worker):
        self.w = worker

    def after_commit(self, step):
        w = self.w
        if w.leaving.is_set():
            w.control.append_later("leave", {"wid": w.wid, "why": "interruption notice",
                                             "machine": w.machine if w.machine_noticed else None})
            raise Leave()


class EvalHook(StepHook):
    def __init__(self, loop: "StepLoop"):
        self.loop = loop

    def after_commit(self, step):
        ev, n = self.loop.job.train.eval_every, step + 1
        if ev and n % ev == 0 and n < self.loop.job.train.max_steps:
            self.loop.evaluate(n, final=False)


class StepLoop:
    def __init__(self, worker, plan: dict, grid: Grid, transport: Transport, slot, start_step: int):
        self.w, self.plan, self.grid, self.transport, self.slot = worker, plan, grid, transport, slot
        self.job = job = worker.job
        self.step = start_step
        r, s = slot
        S = job.parallel.stages
        self.pipe = grid.pipeline_ranks(r)
        self.routes = routes_for(S, job.train.microbatches, alternate=worker.alternate())
        self.actions = actions_for(job.parallel.schedule, s, S, self.routes)
        self.executor = StageExecutor(worker.state.model, s, S, transport, lambda stage: self.pipe[stage],
                                      job.model.dim, cross_entropy_loss,
                                      autocast_dtype=torch.bfloat16 if job.train.precision == "bf16" else None)
        # The data-parallel baseline keeps every replica on the same step (its gradient all-reduce
        # pairs step k with step k), so its commit spans all replicas: one chain through every
        # slot of the cell commits step k for all replicas or for none.
        self.dp = worker.dp_group is not None
        replicas = plan["replicas"]
        self.chain = [grid.rank((q, t)) for q in replicas for t in range(S)] if self.dp else self.pipe
        self.scale = 1.0 / len(replicas) if self.dp else 1.0  # each replica holds the same averaged gradient
        self.hooks: List[StepHook] = self._hooks()
        self.shards = {}
        self.nonfinite_run = 0
        self._outer_wait_seen = worker.diloco.wait_s if worker.diloco is not None else 0.0

    def _hooks(self) -> List[StepHook]:
        w, job = self.w, self.job
        hooks: List[StepHook] = []
        if job.launcher.name == "local":  # only the local launcher injects faults
            r, s = self.slot
            mine = [e for e in fault_events(job) if held_at_boundary(e) and (e["replica"], e["stage"]) == (r, s)]
            if mine:
                hooks.append(FaultHook(w, mine))
        if w.state.lisa is not None:
            hooks.append(LisaHook(w.state.lisa))
        if w.diloco is not None:
            hooks.append(DilocoHook(w.diloco, job.train.max_steps))
        hooks += [CheckpointHook(w, self.slot), NeighbourCopyHook(w, self.grid, self.transport, self.slot),
                  DonorHook(w), LeaveHook(w)]
        if self.slot[0] == self.plan["replicas"][0] == 0:
            hooks.append(EvalHook(self))
        return hooks

    def run(self) -> bool:
        """Train to the end; True when the run is done for this slot. Raises Aborted when the cell's
        generation changes; returns False after a leave was announced."""
        job, w = self.job, self.w
        w.data.position = self.step
        try:
            while self.step < job.train.max_steps:
                for h in self.hooks:
                    h.before_step(self.step)
                self._one_step()
                done = self.step
                self.step += 1
                for h in self.hooks:
                    h.after_commit(done)
        except Leave:
            while not w.watcher.cell_abort.is_set():  # the coordinator plans the handoff
                w.idle()
                time.sleep(0.005)
            return False
        for h in self.hooks:
            h.at_end()
        # The final evaluation also runs when a generation change landed after the last commit (the
        # loop above is then empty); the last stage marks it done once it is published.
        r = self.slot[0]
        if r == 0:
            try:
                done_already = w.control.get_json_or("final_eval_done") is not None
            except Exception:  # noqa: BLE001 - the coordinator is away: evaluate anyway
                done_already = False
            if not done_already:
                self.evaluate(job.train.max_steps, final=True)
            self._save_final()
        try:  # the final byte counts (the heartbeat's may predate the final evaluation), then "done"
            w.control.put_json(f"bytes/{w.wid}", w.counter.as_dict())
            w.control.put_json(f"end/{w.wid}", True)
        except Exception:  # noqa: BLE001 - the coordinator is away: it reads the heartbeat's counts
            pass
        w._wait_for_shutdown()
        return True

    def _one_step(self) -> None:
        w, job, st = self.w, self.job, self.w.state
        if w.poison.is_set():  # injected fault (faults kind poison): this stage's weights turn NaN
            w.poison.clear()
            with torch.no_grad():
                for p in st.model.parameters():
                    p.mul_(float("nan"))
            log.warning("slot %s: weights poisoned with NaN (injected fault)", self.slot)
        step, (r, s), S = self.step, self.slot, job.parallel.stages
        t0 = time.time()
        inputs, targets = w.data.batch_at(step)
        st.zero_grad()
        wait0 = self.transport.recv_wait_s
        loss = self.executor.run(inputs, targets, self.routes, self.actions)
        compute_s = time.time() - t0 - (self.transport.recv_wait_s - wait0)
        if w.slowdown > 1.0:  # a simulated slower machine: its peers wait for it for real
            time.sleep((w.slowdown - 1.0) * compute_s)
            compute_s *= w.slowdown
        if self.dp:  # the data-parallel baseline: average gradients across replicas every step
            allreduce_gradients(list(st.model.parameters()), w.dp_group, w.counter, w.watcher.cell_abort)
        local_sq = st.local_grad_sq()
        w.pending = (step, local_sq)
        # [grad sq-norm, loss, per-stage compute seconds, per-stage seconds blocked on outer syncs
        # since the stage's previous commit]: summed along the chain.
        vec = torch.zeros(2 + 2 * S, dtype=torch.float64)
        vec[0], vec[1], vec[2 + s] = local_sq, loss or 0.0, compute_s
        if w.diloco is not None:
            vec[2 + S + s] = w.diloco.wait_s - self._outer_wait_seen
            self._outer_wait_seen = w.diloco.wait_s
        replicas = self.plan["replicas"] if self.dp else [r]

        def commit(total):  # runs on the chain's root only, before the broadcast
            total = total * self.scale
            entry = ({"step": step, "total": total.tolist()} if _finite(total)
                     else {"step": step, "total": None, "skipped": True})
            recs = {q: self._record(q, step, total, t0, root=True) for q in replicas}
            for q in replicas:
                # The record rides along: a root that dies before appending it below leaves a step
                # the survivors finish from this entry, and they send its record (worker.py).
                with contextlib.suppress(Exception):  # the coordinator away: reconcile covers it
                    w.control.put_json(f"committed/{q}", dict(entry, record=recs[q]))
            if w.crash_in_commit.is_set():  # injected fault: die in the window between publish and record
                log.warning("slot %s: SIGKILL inside the commit of step %d (injected fault)", self.slot, step)
                os.kill(os.getpid(), signal.SIGKILL)
            for q in replicas:
                rec = recs[q]
                if q != r:
                    w.record_commit(rec)  # the other replicas' records, for a restarted coordinator
                try:
                    w.control.append("commit", rec)
                except P.CoordinatorAway:
                    # Delivered when the coordinator is back; a stage's ring may have replayed it
                    # by then, so it may arrive twice: marked, the coordinator keeps the first.
                    w.control.outbox.append(("commit", dict(rec, replay=True)))

        total = self.transport.chain_allreduce(vec, self.chain, COMMIT_TAG + 2 * (step % 1000),
                                               on_total=commit) * self.scale
        if not _finite(total):
            st.skip_step(step)  # every stage of the replica saw the same total: all skip
            self.nonfinite_run += 1
        else:
            st.apply_step(step, float(total[0]), local_sq)
            self.nonfinite_run = 0
        w.pending = None
        w.data.advance()
        w.record_commit(self._record(r, step, total, t0, root=s == 0))
        if self.nonfinite_run >= job.train.max_nonfinite:
            raise Diverged(step, self.nonfinite_run)

    def _batch_ids(self, q: int, step: int):
        """The sequences this step trained on: as stage 0 read them (observed), or, for another
        replica's record or a stage that reads no tokens, as the shard defines them (marked)."""
        consumed = self.w.data.consumed if q == self.slot[0] else None
        if self.slot[1] == 0 and consumed is not None and consumed[0] == step:
            return consumed[1]
        return {"computed": self.shards[q].batch_ids(step)}

    def _record(self, q: int, step: int, total, t0: float, root: bool) -> dict:
        job, w = self.job, self.w
        S = job.parallel.stages
        if q not in self.shards:
            self.shards[q] = w.data if q == self.slot[0] else ShardedBatches(
                w.train_tokens, job.data.seq_len, job.train.batch_size, q, job.parallel.replicas, job.train.seed)
        finite = _finite(total)
        rec = {"replica": q, "step": step, "loss": float(total[1]) if finite else None,
               "grad_norm": float(total[0]) ** 0.5 if finite else None,
               "grad_sq": float(total[0]) if finite else None, "tokens": job.train.batch_size * job.data.seq_len,
               "lr": w.state.optimizer.param_groups[0]["lr"], "step_s": time.time() - t0,
               "batch_ids": self._batch_ids(q, step), "cell_gen": self.plan["gen"],
               "layout_version": self.plan.get("layout_version", 0),
               "stage_compute_s": [round(float(x), 4) for x in total[2:2 + S]]}
        if w.diloco is not None:  # per stage, blocked on outer syncs since its previous commit
            rec["outer_wait_s"] = [round(float(x), 4) for x in total[2 + S:2 + 2 * S]]
        if not root:
            rec["relayed_by"] = self.slot[1]
        if not finite:
            rec.update(nonfinite=True, tokens=0)  # skipped: nothing of this batch was learned
        return rec

    def evaluate(self, step: int, final: bool) -> None:
        job, w = self.job, self.w
        S = job.parallel.stages
        batches = val_batches(w.val_tokens, job.data.seq_len, job.train.batch_size, job.train.eval_batches)
        routes = routes_for(S, job.train.microbatches, alternate=False)
        fwd = [a for a in actions_for("gpipe", self.executor.stage, S, routes) if a[0] == "F"]
        total, n = 0.0, 0
        # Streaming DiLoCo evaluates the global (outer) parameters, as the paper does.
        with (w.diloco.use_global_params() if w.diloco is not None else contextlib.nullcontext()):
            for inputs, targets in batches:
                loss = self.executor.run(inputs, targets, routes, fwd, train=False)
                if loss is not None:
                    total, n = total + loss, n + 1
        if self.executor.stage == S - 1:
            w.control.append_later("eval", {"step": step, "val_loss": total / max(n, 1), "final": final})
            if final:
                with contextlib.suppress(Exception):
                    w.control.put_json("final_eval_done", True)

    def _save_final(self) -> None:
        """Replica 0 writes its stage's final weights; `kintsugi export` assembles the full model."""
        from safetensors.torch import save_file
        out = os.path.join(self.w.run_dir, "final")
        os.makedirs(out, exist_ok=True)
        stage = self.slot[1]
        sd = {k: v.detach().contiguous() for k, v in self.w.state.model.state_dict().items()}
        tmp = os.path.join(out, f"stage{stage}.safetensors.tmp")
        try:
            save_file(sd, tmp)
            os.replace(tmp, os.path.join(out, f"stage{stage}.safetensors"))
        except Exception as e:  # noqa: BLE001 - disk full (safetensors raises its own error type)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            msg = f"final/stage{stage}.safetensors: {str(e).splitlines()[0][:200]}"
            log.error("cannot write the final weights (%s)", msg)
            with contextlib.suppress(Exception):  # the coordinator's exit code and summary say so
                self.w.control.put_json(f"final_error/{stage}", msg)
