"""The step loop of one slot within one cell generation.

One step reads: the replica's batch for this step -> the schedule's forward / backward over the
pipeline (parallel.schedules) -> the commit (recovery.commit: the chain reduction of [grad sq-norm,
loss, stage compute times]; the root records it in the store before sending the total back, so the
optimizer step runs on all stages of a replica or on none) -> apply (clip and step, or skip a
non-finite step everywhere) -> hooks (trainer.runtime.hooks). An uncommitted step is retried on the
same batch in the next generation.

Hooks keep the loop free of `if feature:` branches; `Evaluator` is the validation pass replica 0
runs every `train.eval_every` steps and at the end.

Devices: batches are read on the CPU and moved to the stage's device here (pinned, non-blocking);
the step waits for the device once, for the gradient norm the commit needs. The compute seconds a
stage reports (the rebalancer's input) are wall time minus time blocked in receives on the CPU, and
on a GPU the seconds its own kernels ran (CUDA events: the host runs ahead of the device there).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import List, Sequence

import torch

from kintsugi.parallel.schedules import StageExecutor, actions_for, routes_for
from kintsugi.parallel.topology import Grid
from kintsugi.parallel.transport import Transport
from kintsugi.recovery import control as C
from kintsugi.recovery.protocol import FINAL_EVAL_KEY
from kintsugi.recovery.commit import Commit, finite_total
from kintsugi.recovery.plan import CellPlan, Slot
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.data.batches import ShardedBatches, val_batches
from kintsugi.trainer.model.llama import cross_entropy_loss
from kintsugi.trainer.runtime.devices import to_device
from kintsugi.trainer.runtime.hooks import Leave, StepHook

log = logging.getLogger("kintsugi.worker")


class Diverged(RuntimeError):
    """train.max_nonfinite steps in a row were skipped: the replica must roll back."""

    def __init__(self, step: int, count: int):
        super().__init__(f"{count} non-finite steps in a row up to step {step}")
        self.step, self.count = step, count


def make_executor(job: JobConfig, state, transport: Transport, pipe: Sequence[int]) -> StageExecutor:
    return StageExecutor(state.model, state.stage, job.parallel.stages, transport, lambda stage: pipe[stage],
                         job.model.dim, cross_entropy_loss,
                         autocast_dtype=torch.bfloat16 if job.train.precision == "bf16" else None,
                         device_type=state.device.type)  # bf16 autocast on the stage's device


class Evaluator:
    """Validation loss over `train.eval_batches` held-out batches, forward only, on replica 0's
    pipeline; Streaming DiLoCo evaluates the global (outer) parameters, as the paper does. The last
    stage records it (and, for the final one, marks it done so it is not run twice)."""

    def __init__(self, job: JobConfig, executor: StageExecutor, val_tokens, diloco, control: C.Control,
                 device=None):
        self.job, self.executor, self.val_tokens, self.diloco, self.control = job, executor, val_tokens, diloco, control
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __call__(self, step: int, final: bool) -> None:
        job = self.job
        S = job.parallel.stages
        batches = val_batches(self.val_tokens, job.data.seq_len, job.train.batch_size, job.train.eval_batches)
        routes = routes_for(S, job.train.microbatches, alternate=False)
        fwd = [a for a in actions_for("gpipe", self.executor.stage, S, routes) if a[0] == "F"]
        total, n = 0.0, 0
        with (self.diloco.use_global_params() if self.diloco is not None else contextlib.nullcontext()):
            for inputs, targets in batches:
                inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
                loss = self.executor.run(inputs, targets, routes, fwd, train=False)
                if loss is not None:
                    total, n = total + loss, n + 1
        if self.executor.stage == S - 1:
            rec = {"step": step, "val_loss": total / max(n, 1), "final": final}
            if final:  # the run cannot end without it: a new coordinator that lacks it gets it again
                self.control.append_kept("eval", rec, FINAL_EVAL_KEY)
                with contextlib.suppress(Exception):
                    self.control.put_json(FINAL_EVAL_KEY, True)
            else:
                self.control.append_later("eval", rec)


class StepLoop:
    def __init__(self, job: JobConfig, state, data: ShardedBatches, commit: Commit, transport: Transport,
                 grid: Grid, plan: CellPlan, slot: Slot, start_step: int, *, executor: StageExecutor, routes,
                 data_parallel: bool, diloco, hooks: List[StepHook]):
        self.job, self.state, self.data, self.commit = job, state, data, commit
        self.transport, self.grid, self.plan, self.slot = transport, grid, plan, slot
        self.step = start_step
        self.executor, self.routes, self.diloco = executor, routes, diloco
        r, s = slot
        S = job.parallel.stages
        self.actions = actions_for(job.parallel.schedule, s, S, routes)
        # The data-parallel baseline keeps every replica on the same step (its gradient all-reduce
        # pairs step k with step k), so its commit spans all replicas: one chain through every
        # slot of the cell commits step k for all replicas or for none.
        self.dp = data_parallel
        pipe = grid.pipeline_ranks(r)
        self.chain = [grid.rank((q, t)) for q in plan.replicas for t in range(S)] if self.dp else pipe
        self.replicas = list(plan.replicas) if self.dp else [r]
        self.scale = 1.0 / len(plan.replicas) if self.dp else 1.0  # each replica holds the same averaged gradient
        self.hooks = hooks
        self.nonfinite_run = 0
        self._outer_wait_seen = diloco.wait_s if diloco is not None else 0.0

    def run(self) -> bool:
        """Train to the end: True when every step is committed (the hooks' `at_end` has run), False
        after a leave was announced. Raises Aborted when the cell's generation changes."""
        max_steps = self.job.train.max_steps
        self.data.position = self.step
        try:
            while self.step < max_steps:
                for h in self.hooks:
                    h.before_step(self.step)
                self._one_step()
                done = self.step
                self.step += 1
                for h in self.hooks:
                    h.after_commit(done)
        except Leave:
            return False
        for h in self.hooks:
            h.at_end()
        return True

    def _one_step(self) -> None:
        job, st = self.job, self.state
        step, (r, s), S = self.step, self.slot, job.parallel.stages
        t0 = time.time()
        inputs, targets = self.data.batch_at(step)
        inputs, targets = to_device(inputs, st.device), to_device(targets, st.device)
        st.zero_grad()
        wait0 = self.transport.recv_wait_s
        loss = self.executor.run(inputs, targets, self.routes, self.actions)
        kernel_s = self.executor.clock.seconds()  # None on CPU
        compute_s = kernel_s if kernel_s is not None else time.time() - t0 - (self.transport.recv_wait_s - wait0)
        for h in self.hooks:
            compute_s = h.after_backward(step, compute_s)
        local_sq = st.local_grad_sq()
        self.commit.pending = (step, local_sq)
        # [grad sq-norm, loss, per-stage compute seconds, per-stage seconds blocked on outer syncs
        # since the stage's previous commit]: summed along the chain.
        # Then, per replica of the chain, 1 + the id of each sequence its stage 0 read (0: not stated).
        B = job.train.batch_size
        vec = torch.zeros(2 + 2 * S + B * len(self.replicas), dtype=torch.float64)
        vec[0], vec[1], vec[2 + s] = local_sq, loss or 0.0, compute_s
        if self.diloco is not None:
            vec[2 + S + s] = self.diloco.wait_s - self._outer_wait_seen
            self._outer_wait_seen = self.diloco.wait_s
        consumed = self.data.consumed
        if s == 0 and consumed is not None and consumed[0] == step:
            at = 2 + 2 * S + B * self.replicas.index(r)
            vec[at:at + B] = torch.tensor(consumed[1], dtype=torch.float64) + 1
        total = self.commit.reduce(
            self.transport, vec, self.chain, step, self.scale, own_replica=r, exact_tail=B * len(self.replicas),
            records=lambda tot: {q: self._record(q, step, tot, t0, root=True) for q in self.replicas})
        if not finite_total(total):
            st.skip_step(step)  # every stage of the replica saw the same total: all skip
            self.nonfinite_run += 1
        else:
            st.apply_step(step, float(total[0]), local_sq)
            self.nonfinite_run = 0
        self.commit.pending = None
        self.data.advance()
        self.commit.remember(self._record(r, step, total, t0, root=s == 0))
        if self.nonfinite_run >= job.train.max_nonfinite:
            raise Diverged(step, self.nonfinite_run)

    def _batch_ids(self, q: int, total) -> list:
        """The sequences replica q's step trained on, as its stage 0 read them and stated them in
        the commit's sum (whichever stage writes the record). A stage 0 that stated nothing (never
        expected) shows as None, which every exactly-once check reports."""
        B, S = self.job.train.batch_size, self.job.parallel.stages
        at = 2 + 2 * S + B * self.replicas.index(q)
        ids = [int(x) - 1 for x in total[at:at + B].tolist()]
        return ids if min(ids) >= 0 else None

    def _record(self, q: int, step: int, total, t0: float, root: bool) -> dict:
        job = self.job
        S = job.parallel.stages
        finite = finite_total(total)
        rec = {"replica": q, "step": step, "loss": float(total[1]) if finite else None,
               "grad_norm": float(total[0]) ** 0.5 if finite else None,
               "grad_sq": float(total[0]) if finite else None, "tokens": job.train.batch_size * job.data.seq_len,
               "lr": self.state.optimizer.param_groups[0]["lr"], "step_s": time.time() - t0,
               "batch_ids": self._batch_ids(q, total), "cell_gen": self.plan.gen,
               "layout_version": self.plan.layout_version,
               "stage_compute_s": [round(float(x), 4) for x in total[2:2 + S]]}
        if self.diloco is not None:  # per stage, blocked on outer syncs since its previous commit
            rec["outer_wait_s"] = [round(float(x), 4) for x in total[2 + S:2 + 2 * S]]
        if not root:
            rec["relayed_by"] = self.slot[1]
        if not finite:
            rec.update(nonfinite=True, tokens=0)  # skipped: nothing of this batch was learned
        return rec
