"""A worker process: joins the coordinator, takes a (replica, stage) slot, trains, and survives
membership changes without restarting.

Life of a worker: join with the token -> wait as a spare until the coordinator gives it a cell (the
replicas trained as one unit, see recovery.coordinator) -> for each generation of that cell: build
the cell's group, agree which step committed (recovery.commit), execute its part of the rebuild
plan (trainer.runtime.rebuild), train (trainer.runtime.step_loop) until the run ends or the cell's
generation changes -> drop the group, go again. At the end of the run it runs the end protocol:
the final evaluation and weights (replica 0), its last byte counts, then waits for the shutdown.

Its stage group (Streaming DiLoCo across replicas) lives beside that, with generations of its own
(parallel.stage_link): another replica's failure never interrupts this one's steps. The watcher
thread (trainer.runtime.watcher) beats the heartbeat and follows the coordinator. While the
coordinator is away training goes on: commit records wait in a ring and are replayed to the one
that comes back. A worker whose coordinator stays away beyond `recovery.coordinator_wait_s` saves
its committed state and exits 75 (resumable), never 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import List, Optional

import torch

from kintsugi.parallel.diloco import StreamingDiLoCo
from kintsugi.parallel.groups import Aborted, FormationError, Group, form_group
from kintsugi.parallel.schedules import routes_for
from kintsugi.parallel.stage_link import StageGroupPlan, StageLink
from kintsugi.parallel.topology import Grid, per_stage_layers
from kintsugi.parallel.transport import ByteCounter, PeerFailure, Transport, set_idle_hook
from kintsugi.recovery import control as C
from kintsugi.recovery import protocol as P
from kintsugi.recovery.checkpoint import AsyncCheckpointer, CheckpointCorrupt
from kintsugi.recovery.commit import Commit
from kintsugi.recovery.plan import CellPlan
from kintsugi.trainer.config.faults import fault_events, held_at_boundary
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.data.batches import ShardedBatches, load_tokens
from kintsugi.trainer.runtime import devices, ending, joining
from kintsugi.trainer.runtime import hooks as H
from kintsugi.trainer.runtime.rebuild import Donor, XferFailed, execute_plan, hand_off
from kintsugi.trainer.runtime.stage import StageState
from kintsugi.trainer.runtime.step_loop import Diverged, Evaluator, StepLoop, make_executor
from kintsugi.trainer.runtime.watcher import Watcher

log = logging.getLogger("kintsugi.worker")


class Worker:
    def __init__(self, control: C.Control, wid: str, token: Optional[str], bg: Optional[C.Control] = None):
        self.control, self.wid, self.token = control, wid, token
        # Its own connection for the watcher: the training thread's reads must never delay a beat.
        self.bg = bg or control
        self.job = JobConfig.from_dict(control.get_json("job"))
        self.device = devices.bind(self.job)  # this worker's GPU (or the CPU) and its codec kernels
        torch.manual_seed(self.job.train.seed)
        self.counter = ByteCounter()
        self.machine = os.environ.get("KINTSUGI_MACHINE", socket.gethostname())
        self.slot = None
        self.cell = None
        self.state: Optional[StageState] = None
        self.diloco: Optional[StreamingDiLoCo] = None
        self.link: Optional[StageLink] = None
        self.data = None
        self.commit = Commit(control)
        self.cell_group: Optional[Group] = None
        self.dp_group: Optional[Group] = None
        self.nccl_group: Optional[Group] = None  # the cell's data plane under parallel.backend=nccl
        self._retired: List[Group] = []
        self._divergences_handled: set = set()
        self.state_valid = False  # the stage holds a real state (not weights waiting for a rebuild)
        self.leaving = threading.Event()
        self.poison = threading.Event()  # injected fault: the weights turn NaN at the next step
        self.machine_noticed = False
        self.watcher = Watcher(self)
        self.donor = Donor(self, self.watcher.stop)
        self.bg.on_new_boot.append(lambda: joining.rejoin(self))
        joining.join(self.control, self.wid, self.machine)
        # Beat from now on: loading the corpus and warming up can take seconds on a busy machine.
        self.watcher.start()
        for name in self.job.recovery.notice_signals:
            signal.signal(getattr(signal, name), lambda *_: self.leaving.set())
        # A spot interruption notice from the cloud's metadata service means the same as SIGTERM.
        from kintsugi.recovery.notices import make_watcher
        address = self.job.recovery.metadata_address
        if address and "{machine}" in address:  # one metadata endpoint per (simulated) machine
            address = address.replace("{machine}", self.machine)
        self.notice_watcher = make_watcher(self.job.recovery.notice, self._on_machine_notice, address=address,
                                           interval_s=self.job.recovery.notice_interval_s)
        if self.notice_watcher is not None:
            self.notice_watcher.start()
        corpus = self._until_back(lambda: control.get_json("corpus"))
        self.train_tokens = load_tokens(corpus["train_path"], corpus["dtype"])
        self.val_tokens = load_tokens(corpus["val_path"], corpus["dtype"])
        # launcher.slow_machines: this (simulated) machine computes this many times slower.
        self.slowdown = float(os.environ.get("KINTSUGI_SLOWDOWN") or 1.0)
        self.run_dir = self._until_back(lambda: control.get_json("run_dir"))
        rec = self.job.recovery
        every = rec.checkpoint_every or (10 if rec.strategy == "checkpoint" else 0)
        self.checkpointer = AsyncCheckpointer(
            lambda record: self.bg.append_later("ckpt", record), self.run_dir, every, keep=rec.keep_checkpoints,
            grid=(self.job.parallel.replicas, self.job.parallel.stages),
            on_error=lambda step, e: self.bg.append_later("event", {
                "kind": "checkpoint_failed", "step": step, "slot": list(self.slot) if self.slot else None,
                "error": f"{type(e).__name__}: {str(e)[:300]}"}))
        set_idle_hook(self.idle)
        self._warm_up()

    def _until_back(self, read):
        """A read this worker cannot start without, made again while its coordinator is away (the
        watcher reconnects both connections and re-registers with a successor), for
        recovery.coordinator_wait_s at most, as a running worker waits."""
        give_up = time.monotonic() + self.job.recovery.coordinator_wait_s
        while True:
            try:
                return read()
            except C.CoordinatorAway:
                if time.monotonic() > give_up:
                    raise SystemExit(f"kintsugi: the coordinator stayed away for recovery.coordinator_wait_s="
                                     f"{self.job.recovery.coordinator_wait_s:.0f}s before worker {self.wid} "
                                     "could start") from None
                time.sleep(0.05)

    # --- membership -------------------------------------------------------------------------------
    def connect_store(self):
        """A fresh store client (group formation blocks on it)."""
        return P.connect(self.control.host, self.control.port, timeout_s=60)

    def _on_machine_notice(self, notice) -> None:
        # The whole machine is going away (unlike a SIGTERM to this one process): say so when
        # leaving, so the coordinator stops handing this machine's spares any slot.
        self.machine_noticed = True
        self.leaving.set()

    def _warm_up(self) -> None:
        """Pay the first-use costs (model construction, autograd, kernels) while waiting in the pool,
        not in the middle of someone's recovery: a spare then takes a slot in milliseconds."""
        st = StageState(self.job, self.job.parallel.stages - 1, device=self.device)
        x = torch.randn(1, 8, self.job.model.dim, device=self.device)
        st.model.forward_layers(x).sum().backward()
        st.zero_grad()

    def idle(self) -> None:
        """Called by the training thread while it waits (and between steps): serve peer snapshots."""
        self.donor.serve()

    def alternate(self) -> bool:
        return self.job.recovery.strategy in ("checkfree_plus", "tiered") and self.job.parallel.stages >= 2

    # --- the generation loop ------------------------------------------------------------------------
    def run(self) -> int:
        seen = {}
        self.watcher.phase = "spare"  # warmed up: a holder under notice may hand its slot to this one
        while True:
            what, plan = self._next_plan(seen)
            if what == "shutdown":
                return 0
            if what == "lost":
                return ending.give_up(self)
            if what == "suspend":
                return ending.suspend(self, plan)
            if what == "leave":
                return 0
            seen[plan.cell] = plan.gen
            if self.wid not in plan.ranks:
                if self.slot is not None:
                    log.warning("no longer in the plan of cell %d generation %d; exiting", plan.cell, plan.gen)
                    return 0
                continue
            try:
                done = self._run_generation(plan)
            except Aborted:
                done = False
            except PeerFailure as e:
                self._report_peer(plan, e)
                done = False
            except Diverged as e:
                log.error("replica %d diverged: %s", self.slot[0], e)
                self._fault(plan, "diverged", replica=self.slot[0], step=e.step, count=e.count)
                done = False
            except (FormationError, XferFailed, RuntimeError) as e:
                self._report_fault(plan, e)
                done = False
            except CheckpointCorrupt as e:  # an exact state that cannot be restored: never guess
                log.error("cannot restore the checkpoint: %s", e)
                self._fault(plan, "checkpoint", slot=list(self.slot) if self.slot else None, file=e.file,
                            reason=e.reason, step=(plan.rollback.step_for(self.slot[0])
                                                   if plan.rollback is not None and self.slot else None))
                done = False
            finally:
                self._close_groups()
            if done:
                return 0
            self._await_next_generation()

    def _next_plan(self, seen: dict):
        w = self.watcher
        role_cell = self.cell
        while True:
            if w.shutdown.is_set():
                return "shutdown", None
            if w.store_lost.is_set():
                return "lost", None
            if w.suspend_plan is not None:
                return "suspend", w.suspend_plan
            if self.leaving.is_set() and self.slot is None:
                # A spare whose machine is going away leaves the pool instead of taking a slot.
                self.control.append_later("leave", {"wid": self.wid, "why": "interruption notice (spare)",
                                                    "machine": self.machine if self.machine_noticed else None})
                return "leave", None
            self.idle()
            try:
                if role_cell is None:
                    role = self.control.get_json_or(f"role/{self.wid}")
                    role_cell = role["cell"] if role else None
                if role_cell is not None:
                    raw = self.control.get_json_or(f"cell/{role_cell}")
                    plan = CellPlan.from_json(raw) if raw is not None else None
                    if plan is not None and plan.gen > seen.get(role_cell, -1):
                        self.cell = role_cell
                        return "cell", plan
            except C.CoordinatorAway:
                pass
            time.sleep(0.01)

    def _await_next_generation(self) -> None:
        """Wait for the coordinator to move this cell on (or the run to end) before rebuilding."""
        while not self.watcher.cell_abort.is_set():
            self.idle()
            if self.diloco is not None:
                self.diloco.serve_idle()
            time.sleep(0.005)

    def _fault(self, plan: CellPlan, scope: str, **fields) -> None:
        self.control.append_later("fault", dict(wid=self.wid, scope=scope, cell=plan.cell, gen=plan.gen, **fields))

    def _report_peer(self, plan: CellPlan, err: PeerFailure) -> None:
        peer_wid = plan.wid_of_rank(err.peer)
        if peer_wid is not None:
            self.control.append_later("suspect", {"gen": plan.gen, "cell": plan.cell, "scope": "cell",
                                                  "reporter": self.wid, "peer_wid": peer_wid, "why": str(err)})

    def _report_fault(self, plan: CellPlan, err: Exception) -> None:
        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        log.warning("cell %d generation %d failed: %s", plan.cell, plan.gen, msg)
        if isinstance(err, XferFailed):
            self._fault(plan, "xfer", error=msg, slot=list(self.slot))
        elif isinstance(err, FormationError):
            missing = [plan.wid_of_rank(r) for r in err.missing]
            self._fault(plan, "cell", error=msg, missing_wids=[w for w in missing if w is not None and w != self.wid])
        else:
            self._fault(plan, "cell", error=msg)

    def _run_generation(self, plan: CellPlan) -> bool:
        """Form the cell's group, agree on the committed step, execute the plan, train."""
        cell, gen = plan.cell, plan.gen
        self.watcher.begin(cell, gen)
        self.watcher.phase = "forming"
        abort = self.watcher.cell_abort
        t_gen = time.time()
        timeout = self.job.recovery.init_timeout_s
        self.cell_group = group = form_group(self.connect_store, f"cell{cell}/gen{gen}", plan.ranks[self.wid],
                                             plan.world_size, timeout, abort=abort)
        self._close_retired()  # aborts the last generation's NCCL groups before new GPU work starts
        transport, self.nccl_group = devices.cell_transport(self.job, self.connect_store, f"cell{cell}/gen{gen}",
                                                            plan.ranks[self.wid], plan.world_size, group, abort,
                                                            self.counter, self.device)
        log.info("cell %d gen %d: group ready in %.3fs (%.3fs after publication)", cell, gen, time.time() - t_gen,
                 time.time() - plan.published_at)
        devices.log_memory(self.device, f"cell {cell} gen {gen}")
        grid = Grid(len(plan.replicas), self.job.parallel.stages, list(plan.replicas))
        leaving = self.wid in plan.leavers
        slot = None if leaving else plan.slot_of(self.wid)
        rebuild = plan.rebuild.get(slot) if slot is not None else None
        new_here = slot is not None and self.slot != slot
        if new_here:
            self._take_slot(slot, plan)
            # A fresh slot's initial weights are its state only where nothing is to be rebuilt
            # (the first placement); a rebuilt one has a state once its rebuild completed.
            self.state_valid = rebuild is None and plan.rollback is None
        # Plain data-parallel: the stage groups live inside the cell (every replica, every step).
        self.dp_group = None
        if len(plan.replicas) > 1 and not self.job.diloco.enabled and slot is not None:
            self.dp_group = devices.stage_group(self.job, self.connect_store, f"cell{cell}/gen{gen}/stage{slot[1]}",
                                                plan.replicas.index(slot[0]), len(plan.replicas), abort, self.device)
        committed = self._agree_on_step(plan, group, abort,
                                        has_state=not new_here and self.state is not None and self.state_valid)
        if leaving:
            hand_off(self, plan, transport, abort)
            return True  # the run is over for this worker: it exits now (its machine is going away)
        self.commit.replay_unrecorded(slot[0], plan.committed.get(slot[0]), committed)
        t_start = time.time()
        execute_plan(self, plan, grid, transport, slot, committed, abort)
        self.state_valid = True
        self._recover_from_divergence(plan)
        if plan.prev_layout is not None and self.state.layer_ids != self._layer_ids(slot[1], plan.layout):
            from kintsugi.trainer.runtime.relayout import relayout
            relayout(self, plan, grid, transport, slot)
        if self.link is not None:
            self.link.layout_version = plan.layout_version
        if rebuild is not None or new_here:
            self.control.append_later("ready", {"wid": self.wid, "slot": list(slot), "cell": cell, "gen": gen})
        if rebuild is not None:
            now = time.time()
            self.control.append_later("event", {
                "kind": "rebuild", "slot": list(slot), "tier": rebuild.tier, "step": committed + 1,
                "detect_s": rebuild.detected_at - rebuild.failed_at, "recover_s": now - rebuild.failed_at,
                "setup_s": now - t_start, "failed_at": rebuild.failed_at, "resumed_at": now})
        log.info("cell %d gen %d: plan executed %.3fs after publication", cell, gen, time.time() - plan.published_at)
        self.watcher.phase = "training"
        loop = self._step_loop(plan, grid, transport, slot, committed + 1)
        if loop.run():
            ending.end_of_run(self)
            return True
        while not self.watcher.cell_abort.is_set():  # left: the coordinator plans the handoff
            self.idle()
            time.sleep(0.005)
        return False

    def _step_loop(self, plan: CellPlan, grid: Grid, transport: Transport, slot, start: int) -> StepLoop:
        """The step loop of this generation, with the features this slot uses attached as hooks."""
        job, st = self.job, self.state
        S = job.parallel.stages
        routes = routes_for(S, job.train.microbatches, alternate=self.alternate())
        executor = make_executor(job, st, transport, grid.pipeline_ranks(slot[0]))
        self.evaluate = Evaluator(job, executor, self.val_tokens, self.diloco, self.control, device=st.device)
        hooks: List[H.StepHook] = []
        if st.lisa is not None:
            hooks.append(H.LisaHook(st.lisa))
        if self.diloco is not None:
            hooks.append(H.DilocoHook(self.diloco, job.train.max_steps))
        hooks.append(H.CheckpointHook(self.checkpointer, st, slot, self.run_dir))
        if S >= 2 and self.alternate():
            hooks.append(H.NeighbourCopyHook(st, grid, transport, slot, S, job.recovery.embedding_copy_every,
                                                self.control))
        hooks += [H.DonorHook(self.idle), H.LeaveHook(self.leaving, self._announce_leave, self._spare_ready,
                                                             job.recovery.train_under_notice_s,
                                                             job.train.max_steps)]
        if slot[0] == plan.replicas[0] == 0:
            hooks.append(H.EvalHook(self.evaluate, job.train.eval_every, job.train.max_steps))
        if job.launcher.name == "local":  # only the local launcher injects faults
            mine = [e for e in fault_events(job) if held_at_boundary(e) and (e["replica"], e["stage"]) == slot]
            hooks.append(H.FaultHook(self.control, self.wid, slot, mine, st, self.commit, self.poison,
                                     self.watcher.cell_abort, self.leaving, self.idle, self.slowdown))
        if self.dp_group is not None:
            hooks.append(H.DataParallelHook(list(st.model.parameters()), self.dp_group, self.counter,
                                            self.watcher.cell_abort))
        return StepLoop(job, st, self.data, self.commit, transport, grid, plan, slot, start, executor=executor,
                        routes=routes, data_parallel=self.dp_group is not None, diloco=self.diloco,
                        hooks=hooks)

    def _spare_ready(self) -> bool:
        """A ready spare is reserved for this holder (the coordinator's sealed `handoffs_ready`);
        a coordinator that is away cannot say so: train on."""
        try:
            return self.wid in ((self.control.get_json_or("counters") or {}).get("handoffs_ready") or ())
        except C.CoordinatorAway:
            return False

    def _announce_leave(self) -> None:
        self.control.append_later("leave", {"wid": self.wid, "why": "interruption notice",
                                            "machine": self.machine if self.machine_noticed else None})

    def _recover_from_divergence(self, plan: CellPlan) -> None:
        """A plan that answers a divergence (train.max_nonfinite skipped steps in a row): under
        Streaming DiLoCo the stage restarts from its outer global copy (the last synced state),
        otherwise the rollback restored a checkpoint; either way with a fresh inner optimizer (its
        moments may hold non-finite values) and the learning rate scaled down. Once per plan."""
        fix = plan.diverged
        if fix is None or fix.id in self._divergences_handled:
            return
        self._divergences_handled.add(fix.id)
        st = self.state
        if fix.reset_to_global and self.diloco is not None:
            with torch.no_grad():
                for f in self.diloco.fragments:
                    for g, p in zip(f.glob, f.local):
                        p.copy_(g.to(p.device, p.dtype))
        st.fresh_optimizer()
        st.lr_scale *= float(fix.lr_factor)
        log.warning("slot %s restarts from %s with learning rate x %.3g (now x %.3g)", self.slot,
                    "its outer global copy" if fix.reset_to_global else "the checkpoint", fix.lr_factor, st.lr_scale)

    def _agree_on_step(self, plan: CellPlan, group, abort, has_state: bool) -> int:
        if plan.rollback is not None:
            return plan.rollback.step_for(self.slot[0]) if self.slot is not None else -1
        floor = plan.committed_floor()
        store_commit = None
        if self.slot is not None:
            try:
                store_commit = self.control.get_json_or(f"committed/{self.slot[0]}")
            except C.CoordinatorAway:
                pass
        if self.state is None:  # a leaver without a stage cannot happen; a fresh worker has none yet
            return floor
        return self.commit.reconcile(self.state, group, abort, has_state, store_commit, floor, self.slot)

    def _take_slot(self, slot, plan: CellPlan) -> None:
        """New here: build the stage (a rebuild replaces its state below)."""
        if plan.layout:  # live rebalancing: the layout every new stage is built with
            self.job.parallel.layers_per_stage = list(plan.layout)
        self.slot = slot
        self.state = StageState(self.job, slot[1], device=self.device)
        devices.announce(self.control, self.wid, slot, self.device)  # summary.json says where slots ran
        if self.job.model.init_from:
            from kintsugi.trainer.model.pretrained import load_into_stage
            load_into_stage(self.state, self.job.model.init_from)
        if self.job.lisa.enabled:
            from kintsugi.trainer.runtime.lisa import LisaController
            self.state.attach_lisa(LisaController(self.job.lisa, self.state, self.job.train.seed, replica=slot[0]))
        self.data = ShardedBatches(self.train_tokens, self.job.data.seq_len, self.job.train.batch_size,
                                   slot[0], self.job.parallel.replicas, self.job.train.seed)
        self.commit.pending = None
        self.diloco = None
        if self.job.diloco.enabled and self.job.parallel.replicas > 1:
            if self.link is None or self.link.stage != slot[1]:
                self.link = StageLink(self.connect_store, slot[1], self.wid, self.job.recovery.init_timeout_s,
                                      stop=self.watcher.stop, on_fault=self._stage_fault)
                raw = self.control.get_json_or(f"stage/{slot[1]}")
                if raw is not None:
                    self.link.update(StageGroupPlan.from_json(raw))
            self.link.layout_version = plan.layout_version
            self.new_outer_sync()

    def _stage_fault(self, gen: int, err: Exception) -> None:
        """The stage group's generation broke: the coordinator publishes the next one (without a
        member that died; the same members when the group never formed)."""
        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        self.bg.append_later("fault", {"wid": self.wid, "scope": "stage", "stage": self.link.stage, "gen": gen,
                                       "error": msg})

    def new_outer_sync(self) -> None:
        self.diloco = StreamingDiLoCo(dict(self.state.model.named_parameters()), self.job.diloco, self.link,
                                      self.counter, self.watcher.cell_abort)
        self.state.attach_diloco(self.diloco)

    def _close_groups(self) -> None:
        """Retire this generation's groups. They are closed only once the next generation's group
        formed: closing drops their connections, and a neighbour still waiting on one would take
        that for this worker's death and report it (a cascade of false suspects)."""
        for g in (self.cell_group, self.dp_group, self.nccl_group):
            if g is not None:
                self._retired.append(g)
        self.cell_group = self.dp_group = self.nccl_group = None

    def _close_retired(self) -> None:
        while self._retired:
            self._retired.pop().close()

    def _layer_ids(self, stage: int, layout=None):
        layout = self.job.parallel.layers_per_stage if layout is None else list(layout)
        return per_stage_layers(self.job.model.n_layers, self.job.parallel.stages, layout)[stage]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Kintsugi worker: joins a coordinator and trains one stage")
    ap.add_argument("--coordinator", required=True, help="host:port of the coordinator")
    ap.add_argument("--wid", default=None)
    args = ap.parse_args(argv)
    P.die_with_parent()
    torch.set_num_threads(1)
    wid = args.wid or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    logging.basicConfig(level=os.environ.get("KINTSUGI_LOG", "WARNING"),
                        format=f"[worker {wid}] %(levelname)s %(message)s")
    host, port = P.parse_addr(args.coordinator)
    rc = run_worker(host, port, wid, os.environ.get(P.TOKEN_ENV))
    # Waits abandoned in helper threads (a dead peer's recv) must not hold up or crash the exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def run_worker(host: str, port: int, wid: str, token: Optional[str], timeout_s: float = 120) -> int:
    if not token:
        print(f"kintsugi worker: no token; set {P.TOKEN_ENV} to the run's token (the coordinator shows it once, "
              "or writes it to <run dir>/.token)", file=sys.stderr)
        return 2
    try:
        control = C.open_control(host, port, token, timeout_s)
        bg = C.open_control(host, port, token, timeout_s)
    except P.Forged as e:
        print(f"kintsugi worker: {e}", file=sys.stderr)
        return 2
    try:
        worker = Worker(control, wid, token, bg=bg)
    except devices.DeviceError as e:  # train.device / compression.kernels cannot run in this process
        print(f"kintsugi worker: {e}", file=sys.stderr)
        return 2
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
