"""A worker process: joins the coordinator, takes a (replica, stage) slot, trains, and survives
membership changes without restarting.

Life of a worker: join with the token -> wait as a spare until the coordinator gives it a cell (the
replicas trained as one unit, see recovery.coordinator) -> for each generation of that cell: build
the cell's group, agree which step committed, execute its part of the rebuild plan, train
(trainer.runtime.step_loop) until the run ends or the cell's generation changes -> drop the group, go again.

Its stage group (Streaming DiLoCo across replicas) lives beside that, with generations of its own
(parallel.stage_link): another replica's failure never interrupts this one's steps.

The watcher thread beats the heartbeat, follows the coordinator's publications (its only steady
cost is one read of `version` every few tens of milliseconds), raises the abort flags, takes peer
snapshot requests, and reconnects when the coordinator is away. While it is away training goes on:
commit records wait in a ring and are replayed to the coordinator that comes back; only what needs
the coordinator (a new generation after a failure) waits for it. A worker whose coordinator stays
away beyond `recovery.coordinator_wait_s` saves its committed state and exits 75 (resumable), never
0.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Optional

import torch

from kintsugi.parallel.diloco import StreamingDiLoCo
from kintsugi.parallel.groups import Aborted, FormationError, Group, form_group
from kintsugi.parallel.stage_link import StageLink
from kintsugi.parallel.topology import Grid
from kintsugi.parallel.transport import ByteCounter, PeerFailure, Transport, set_idle_hook
from kintsugi.recovery import protocol as P

from kintsugi.recovery.checkpoint import CheckpointCorrupt
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.data.corpus import ShardedBatches, load_tokens
from kintsugi.trainer.runtime.rebuild import Donor, XferFailed, execute_plan, reconcile, snapshot
from kintsugi.trainer.runtime.stage import StageState
from kintsugi.trainer.runtime.step_loop import Diverged

log = logging.getLogger("kintsugi.worker")
EX_RESUMABLE = 75



def peak_memory_bytes() -> int:
    """This process's peak memory: the CUDA allocator's peak on a GPU stage, else the peak resident
    set size (Linux reports ru_maxrss in KiB)."""
    import resource
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

class Shutdown(Exception):
    pass


class Watcher(threading.Thread):
    """Heartbeat, publications, abort flags, peer requests, reconnection."""

    def __init__(self, worker: "Worker"):
        super().__init__(daemon=True, name="kintsugi-watcher")
        self.w = worker
        self.control: P.Control = worker.bg
        self.interval = worker.job.recovery.heartbeat_interval_s
        self.cell_abort = threading.Event()   # the cell's generation moved on (or the run stops)
        self.stop = threading.Event()         # the run ends or suspends: abort everything
        self.shutdown = threading.Event()
        self.store_lost = threading.Event()
        self.suspend_plan: Optional[dict] = None
        self.working_cell: Optional[int] = None
        self.working_gen = -1
        self.phase = "spare"
        self._version = -1
        self._n = 0
        self._mail: Optional[P.LogReader] = None
        self._intent_sent = False
        self._last_beat = 0.0
        self.rebuilt_slots = 0  # how many slots the run has rebuilt so far (torchrun's exit barrier)

    def begin(self, cell: int, gen: int) -> None:
        """The training thread starts working in `gen` of `cell`."""
        self.working_cell, self.working_gen = cell, gen
        self.cell_abort.clear()
        if self.stop.is_set():
            self.cell_abort.set()
        self._version = -1  # re-read the cell's plan: it may have moved on already

    def run(self) -> None:
        rec = self.w.job.recovery
        while not self.shutdown.is_set():
            if self.w.control.away and not self.control.away:
                self.w.control.reconnect()  # the training thread's own connection
            if self.control.away:
                if not self.control.reconnect():
                    if time.monotonic() - self.control.away_since > rec.coordinator_wait_s:
                        log.error("the coordinator has been away for %.0fs (recovery.coordinator_wait_s); stopping",
                                  rec.coordinator_wait_s)
                        self.store_lost.set()
                        self.stop.set()
                        self.cell_abort.set()
                        return
                    time.sleep(0.5)
                    continue
                self.w.control.reconnect()
                self._version = -1
            try:
                now = time.monotonic()
                if now - self._last_beat >= self.interval:
                    self._beat()
                    self._poll_mail()
                    self._last_beat = now
                v = int(self.control.call(lambda s: s.add("version", 0)))
                if v != self._version:
                    self._version = v
                    self._refresh()
            except P.CoordinatorAway:
                continue
            except Exception as e:  # noqa: BLE001 - a malformed record must not kill the heartbeat
                log.warning("watcher: %s", str(e).splitlines()[0][:200])
            time.sleep(0.02)

    def _beat(self) -> None:
        self._n += 1
        w = self.w
        status = {"n": self._n, "cell": self.working_cell, "cell_gen": self.working_gen, "phase": self.phase,
                  "step": w.state.step_done if w.state is not None else None,
                  "stage": w.slot[1] if w.slot is not None else None, "peak_bytes": peak_memory_bytes()}
        self.control.put_json(f"hb/{w.wid}", status)
        self.control.put_json(f"bytes/{w.wid}", w.counter.as_dict())
        if w.leaving.is_set() and not self._intent_sent:
            self.control.append("intent", {"wid": w.wid})
            self._intent_sent = True

    def _refresh(self) -> None:
        c, w = self.control, self.w
        self.rebuilt_slots = (c.get_json_or("counters") or {}).get("rebuilt_slots", self.rebuilt_slots)
        if c.get_json_or("shutdown") is not None:
            self.shutdown.set()
            self.stop.set()
            self.cell_abort.set()
            return
        if self.suspend_plan is None:
            self.suspend_plan = c.get_json_or("suspend")
        if self.suspend_plan is not None and not self.stop.is_set():
            self.stop.set()
            self.cell_abort.set()
        if self.working_cell is not None:
            plan = c.get_json_or(f"cell/{self.working_cell}")
            if plan is not None and plan["gen"] > self.working_gen >= 0:
                self.cell_abort.set()
        if w.link is not None:
            sp = c.get_json_or(f"stage/{w.link.stage}")
            if sp is not None:
                w.link.update(sp)
        self._poll_mail()

    def _poll_mail(self) -> None:
        """Requests to this worker (peer snapshots, injected faults): every beat and on a change."""
        c, w = self.control, self.w
        if self._mail is None:
            self._mail = c.reader(f"mail/{w.wid}")
        self._mail.auth = c.auth

        def poll(store):
            self._mail.store = store
            return self._mail.poll()
        for req in c.call(poll):
            if req.get("kind") == "donate":
                w.donor.request(req)
            elif req.get("kind") == "poison":  # faults kind poison (fault injection, from the launcher)
                w.poison.set()
            elif req.get("kind") == "crash_in_commit":  # faults kind crash_in_commit (fault injection)
                w.crash_in_commit.set()


class Worker:
    def __init__(self, control: P.Control, wid: str, token: Optional[str], bg: Optional[P.Control] = None):
        self.control, self.wid, self.token = control, wid, token
        # Its own connection for the watcher: the training thread's reads must never delay a beat.
        self.bg = bg or control
        self.job = JobConfig.from_dict(control.get_json("job"))
        torch.manual_seed(self.job.train.seed)
        self.counter = ByteCounter()
        self.machine = os.environ.get("KINTSUGI_MACHINE", socket.gethostname())
        self.slot = None
        self.cell = None
        self.state: Optional[StageState] = None
        self.diloco: Optional[StreamingDiLoCo] = None
        self.link: Optional[StageLink] = None
        self.data = None
        self.pending = None  # (step, local_sq) of a step whose backward finished but not its commit
        self.cell_group: Optional[Group] = None
        self.dp_group: Optional[Group] = None
        self._retired: list = []
        self._divergences_handled: set = set()
        self.state_valid = False  # the stage holds a real state (not weights waiting for a rebuild)
        self.recent = collections.deque(maxlen=4096)  # this stage's commit records (replayed after a restart)
        self.recent_lock = threading.Lock()
        self.leaving = threading.Event()
        self.poison = threading.Event()
        self.crash_in_commit = threading.Event()
        self.machine_noticed = False
        self.watcher = Watcher(self)
        self.donor = Donor(self, self.watcher.stop)
        self.bg.on_new_boot.append(self._rejoin)
        self._join()
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
        corpus = control.get_json("corpus")
        self.train_tokens = load_tokens(corpus["train_path"], corpus["dtype"])
        self.val_tokens = load_tokens(corpus["val_path"], corpus["dtype"])
        # launcher.slow_machines: this (simulated) machine computes this many times slower.
        self.slowdown = float(os.environ.get("KINTSUGI_SLOWDOWN") or 1.0)
        self.run_dir = control.get_json("run_dir")
        rec = self.job.recovery
        every = rec.checkpoint_every or (10 if rec.strategy == "checkpoint" else 0)
        from kintsugi.recovery.checkpoint import AsyncCheckpointer
        self.checkpointer = AsyncCheckpointer(
            lambda record: self.bg.append_later("ckpt", record), self.run_dir, every, keep=rec.keep_checkpoints,
            grid=(self.job.parallel.replicas, self.job.parallel.stages),
            on_error=lambda step, e: self.bg.append_later("event", {
                "kind": "checkpoint_failed", "step": step, "slot": list(self.slot) if self.slot else None,
                "error": f"{type(e).__name__}: {str(e)[:300]}"}))
        set_idle_hook(self.idle)
        self._warm_up()

    # --- membership -------------------------------------------------------------------------------
    def connect_store(self):
        """A fresh store client (group formation blocks on it)."""
        return P.connect(self.control.host, self.control.port, timeout_s=60)

    def _join(self) -> None:
        """The join record proves the token by its seal; the token itself never leaves here."""
        self.control.append("join", {"wid": self.wid, "pid": os.getpid(), "host": socket.gethostname(),
                                     "machine": self.machine})
        ack = self._await_ack(self.control, 120.0)
        if ack != "ok":
            raise SystemExit(f"kintsugi: the coordinator refused this worker ({ack}); set KINTSUGI_TOKEN to the "
                             "run's token")

    def _await_ack(self, c: P.Control, timeout_s: float) -> str:
        """The coordinator's verified answer. An answer that does not verify is a refusal (a
        coordinator that could not verify our token cannot seal for us either) once no verified one
        came for a few seconds: someone else may have written it."""
        deadline, unverified_since = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if c.check(f"ack/{self.wid}"):
                ack = c.get_json_or(f"ack/{self.wid}")
                if ack is not None:
                    return ack
                unverified_since = unverified_since or time.monotonic()
                if time.monotonic() - unverified_since > 5.0:
                    return "refused: its answer does not verify with this token"
            time.sleep(0.05)
        return "no answer"

    def _rejoin(self) -> None:
        """The coordinator came back (a new incarnation): re-register, then replay the commits it may
        not have recorded (it keeps the first record of each step)."""
        c = self.bg
        st = self.state
        c.append("rejoin", {"wid": self.wid, "pid": os.getpid(), "host": socket.gethostname(),
                            "machine": self.machine, "slot": list(self.slot) if self.slot else None,
                            "cell": self.watcher.working_cell, "cell_gen": self.watcher.working_gen,
                            "step_done": st.step_done if st is not None else None})
        if self._await_ack(c, 30.0) not in ("ok", "no answer"):
            log.warning("the restarted coordinator does not count this worker as a member; stopping")
            self.watcher.shutdown.set()
            self.watcher.stop.set()
            self.watcher.cell_abort.set()
            return
        if self.slot is not None:
            known = (c.get_json_or(f"recorded/{self.slot[0]}") or {}).get("step", -1)
            with self.recent_lock:
                replay = [r for r in self.recent if r["step"] > known]
            for r in replay:
                c.append("commit", dict(r, replay=True))
            if replay:
                log.warning("replayed %d commit records (steps %d..%d) to the restarted coordinator", len(replay),
                            replay[0]["step"], replay[-1]["step"])

    def _on_machine_notice(self, notice) -> None:
        # The whole machine is going away (unlike a SIGTERM to this one process): say so when
        # leaving, so the coordinator stops handing this machine's spares any slot.
        self.machine_noticed = True
        self.leaving.set()

    def _warm_up(self) -> None:
        """Pay the first-use costs (model construction, autograd, kernels) while waiting in the pool,
        not in the middle of someone's recovery: a spare then takes a slot in milliseconds."""
        st = StageState(self.job, self.job.parallel.stages - 1)
        x = torch.randn(1, 8, self.job.model.dim)
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
        while True:
            what, plan = self._next_plan(seen)
            if what == "shutdown":
                return 0
            if what == "lost":
                return self._give_up()
            if what == "suspend":
                return self._suspend(plan)
            if what == "leave":
                return 0
            seen[plan["cell"]] = plan["gen"]
            if self.wid not in plan["ranks"]:
                if self.slot is not None:
                    log.warning("no longer in the plan of cell %d generation %d; exiting", plan["cell"], plan["gen"])
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
                self.control.append_later("fault", {"wid": self.wid, "scope": "diverged", "cell": plan["cell"],
                                                    "gen": plan["gen"], "replica": self.slot[0], "step": e.step,
                                                    "count": e.count})
                done = False
            except (FormationError, XferFailed, RuntimeError) as e:
                self._report_fault(plan, e)
                done = False
            except CheckpointCorrupt as e:  # an exact state that cannot be restored: never guess
                log.error("cannot restore the checkpoint: %s", e)
                self.control.append_later("fault", {"wid": self.wid, "scope": "checkpoint", "cell": plan["cell"],
                                                    "gen": plan["gen"], "slot": list(self.slot) if self.slot else None,
                                                    "file": e.file, "reason": e.reason,
                                                    "step": _rollback_step(plan, self.slot)})
                done = False
            finally:
                self._close_groups()
            if done:
                return 0
            self._await_next_generation(plan)

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
                    plan = self.control.get_json_or(f"cell/{role_cell}")
                    if plan is not None and plan["gen"] > seen.get(role_cell, -1):
                        self.cell = role_cell
                        return "cell", plan
            except P.CoordinatorAway:
                pass
            time.sleep(0.01)

    def _await_next_generation(self, plan) -> None:
        """Wait for the coordinator to move this cell on (or the run to end) before rebuilding."""
        while not self.watcher.cell_abort.is_set():
            self.idle()
            if self.diloco is not None:
                self.diloco.serve_idle()
            time.sleep(0.005)

    def _report_peer(self, plan, err: PeerFailure) -> None:
        peer_wid = next((w for w, r in plan["ranks"].items() if r == err.peer), None)
        if peer_wid is not None:
            self.control.append_later("suspect", {"gen": plan["gen"], "cell": plan["cell"], "scope": "cell",
                                                  "reporter": self.wid, "peer_wid": peer_wid, "why": str(err)})

    def _report_fault(self, plan, err: Exception) -> None:
        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        log.warning("cell %d generation %d failed: %s", plan["cell"], plan["gen"], msg)
        rec = {"wid": self.wid, "scope": "cell", "cell": plan["cell"], "gen": plan["gen"], "error": msg}
        if isinstance(err, FormationError):
            by_rank = {r: wid for wid, r in plan["ranks"].items()}
            rec["missing_wids"] = [by_rank[r] for r in err.missing if r in by_rank and by_rank[r] != self.wid]
        if isinstance(err, XferFailed):
            rec.update(scope="xfer", slot=list(self.slot))
        self.control.append_later("fault", rec)

    def _run_generation(self, plan):
        """Form the cell's group, agree on the committed step, execute the plan, train."""
        from kintsugi.trainer.runtime.step_loop import StepLoop
        cell, gen = plan["cell"], plan["gen"]
        self.watcher.begin(cell, gen)
        self.watcher.phase = "forming"
        abort = self.watcher.cell_abort
        rank, world = plan["ranks"][self.wid], plan["world_size"]
        t_gen = time.time()
        timeout = self.job.recovery.init_timeout_s
        self.cell_group = group = form_group(self.connect_store, f"cell{cell}/gen{gen}", rank, world, timeout,
                                             abort=abort)
        self._close_retired()
        log.info("cell %d gen %d: group ready in %.3fs (%.3fs after publication)", cell, gen, time.time() - t_gen,
                 time.time() - plan["published_at"])
        S = self.job.parallel.stages
        grid = Grid(len(plan["replicas"]), S, plan["replicas"])
        transport = Transport(group, abort, self.counter, self._codecs())
        leaving = self.wid in plan["leavers"]
        slot = None if leaving else P.parse_slot_key(next(k for k, w in plan["slots"].items() if w == self.wid))
        rebuild = plan["rebuild"].get(P.slot_key(slot)) if slot is not None else None
        new_here = slot is not None and self.slot != slot
        if new_here:
            self._take_slot(slot, plan)
            # A fresh slot's initial weights are its state only where nothing is to be rebuilt
            # (the first placement); a rebuilt one has a state once its rebuild completed.
            self.state_valid = rebuild is None and plan.get("rollback") is None
        # Plain data-parallel: the stage groups live inside the cell (every replica, every step).
        self.dp_group = None
        if len(plan["replicas"]) > 1 and not self.job.diloco.enabled and slot is not None:
            self.dp_group = form_group(self.connect_store, f"cell{cell}/gen{gen}/stage{slot[1]}",
                                       plan["replicas"].index(slot[0]), len(plan["replicas"]), timeout, abort=abort)
        committed = self._agree_on_step(plan, group, abort,
                                        has_state=not new_here and self.state is not None and self.state_valid)
        if leaving:
            self._hand_off(plan, transport)
            raise SystemExit(0)
        self._replay_unrecorded(plan, slot, committed)
        t_start = time.time()
        execute_plan(self, plan, grid, transport, slot, rebuild, committed, abort)
        self.state_valid = True
        self._recover_from_divergence(plan)
        if plan.get("prev_layout") is not None and self.state.layer_ids != self._layer_ids(slot[1], plan["layout"]):
            from kintsugi.trainer.runtime.relayout import relayout
            relayout(self, plan, grid, transport, slot)
        if self.link is not None:
            self.link.layout_version = plan.get("layout_version", 0)
        if rebuild is not None or new_here:
            self.control.append_later("ready", {"wid": self.wid, "slot": list(slot), "cell": cell, "gen": gen})
        if rebuild is not None:
            now = time.time()
            self.control.append_later("event", {
                "kind": "rebuild", "slot": list(slot), "tier": rebuild["tier"], "step": committed + 1,
                "detect_s": rebuild["detected_at"] - rebuild["failed_at"], "recover_s": now - rebuild["failed_at"],
                "setup_s": now - t_start, "failed_at": rebuild["failed_at"], "resumed_at": now})
        log.info("cell %d gen %d: plan executed %.3fs after publication", cell, gen, time.time() - plan["published_at"])
        self.watcher.phase = "training"
        return StepLoop(self, plan, grid, transport, slot, committed + 1).run()

    def _recover_from_divergence(self, plan) -> None:
        """A plan that answers a divergence (train.max_nonfinite skipped steps in a row): under
        Streaming DiLoCo the stage restarts from its outer global copy (the last synced state),
        otherwise the rollback restored a checkpoint; either way with a fresh inner optimizer (its
        moments may hold non-finite values) and the learning rate scaled down. Once per plan."""
        fix = plan.get("diverged")
        if not fix or fix["id"] in self._divergences_handled:
            return
        self._divergences_handled.add(fix["id"])
        st = self.state
        if fix.get("reset_to_global") and self.diloco is not None:
            with torch.no_grad():
                for f in self.diloco.fragments:
                    for g, p in zip(f.glob, f.local):
                        p.copy_(g.to(p.device, p.dtype))
        st.fresh_optimizer()
        st.lr_scale *= float(fix["lr_factor"])
        log.warning("slot %s restarts from %s with learning rate x %.3g (now x %.3g)", self.slot,
                    "its outer global copy" if fix.get("reset_to_global") else "the checkpoint", fix["lr_factor"],
                    st.lr_scale)

    def _agree_on_step(self, plan, group, abort, has_state: bool) -> int:
        rollback = plan.get("rollback")
        if rollback is not None:
            if self.slot is None:
                return -1
            return rollback[str(self.slot[0])] if isinstance(rollback, dict) else rollback
        floor = max(int(plan["committed"].get(str(r), -1)) for r in plan["replicas"])
        store_commit = None
        if self.slot is not None:
            try:
                store_commit = self.control.get_json_or(f"committed/{self.slot[0]}")
            except P.CoordinatorAway:
                pass
        if self.state is None:  # a leaver without a stage cannot happen; a fresh worker has none yet
            return floor
        return reconcile(self, group, abort, has_state, store_commit, floor)

    def _take_slot(self, slot, plan) -> None:
        """New here: build the stage (a rebuild replaces its state below)."""
        if plan.get("layout") is not None:  # live rebalancing: the layout every new stage is built with
            self.job.parallel.layers_per_stage = list(plan["layout"])
        self.slot = slot
        self.state = StageState(self.job, slot[1])
        if self.job.model.init_from:
            from kintsugi.trainer.model.pretrained import load_into_stage
            load_into_stage(self.state, self.job.model.init_from)
        if self.job.lisa.enabled:
            from kintsugi.trainer.runtime.lisa import LisaController
            self.state.lisa = LisaController(self.job.lisa, self.state, self.job.train.seed, replica=slot[0])
        self.data = ShardedBatches(self.train_tokens, self.job.data.seq_len, self.job.train.batch_size,
                                   slot[0], self.job.parallel.replicas, self.job.train.seed)
        self.pending = None
        self.diloco = None
        if self.job.diloco.enabled and self.job.parallel.replicas > 1:
            if self.link is None or self.link.stage != slot[1]:
                self.link = StageLink(self.connect_store, slot[1], self.wid, self.job.recovery.init_timeout_s,
                                      stop=self.watcher.stop, on_fault=self._stage_fault)
                sp = self.control.get_json_or(f"stage/{slot[1]}")
                if sp is not None:
                    self.link.update(sp)
            self.link.layout_version = plan.get("layout_version", 0)
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
        self.state.diloco = self.diloco

    def _close_groups(self) -> None:
        """Retire this generation's groups. They are closed only once the next generation's group
        formed: closing drops their connections, and a neighbour still waiting on one would take
        that for this worker's death and report it (a cascade of false suspects)."""
        for name in ("cell_group", "dp_group"):
            g: Optional[Group] = getattr(self, name, None)
            if g is not None:
                self._retired.append(g)
            setattr(self, name, None)

    def _close_retired(self) -> None:
        while self._retired:
            self._retired.pop().close()

    def _layer_ids(self, stage: int, layout=None):
        from kintsugi.parallel.topology import per_stage_layers
        layout = self.job.parallel.layers_per_stage if layout is None else layout
        return per_stage_layers(self.job.model.n_layers, self.job.parallel.stages, layout)[stage]

    def _codecs(self):
        c = self.job.compression
        if c.activations == "none" and c.gradients == "none":
            return {}
        from kintsugi.compression.api import get_codec
        return {"p2p": get_codec(c.activations, c.block_size), "p2p_grad": get_codec(c.gradients, c.block_size)}

    # --- leaving ------------------------------------------------------------------------------------
    def _hand_off(self, plan, transport) -> None:
        """Graceful leave: stream the exact state to the worker that takes our slot."""
        dst_wid = plan["slots"][P.slot_key(self.slot)]
        from kintsugi.trainer.runtime.rebuild import REBUILD_TAG, dump
        from kintsugi.recovery.rebuild import send_package
        dump(f"g{plan['gen']}_leaver_{self.slot[0]},{self.slot[1]}", snapshot(self))
        send_package(transport, self.state.export(exact=True, in_flight_ok=True), plan["ranks"][dst_wid], REBUILD_TAG)
        log.info("handed slot %s over to %s", self.slot, dst_wid)

    def _suspend(self, plan) -> int:
        """The job is being preempted and no spare is left to hand off to: write this slot's last
        committed state as a checkpoint (`train.resume` continues from it exactly) and exit."""
        key = P.slot_key(self.slot) if self.slot is not None else None
        if key is None or plan["holders"].get(key) != self.wid:
            return 0  # a spare, or a slot someone else holds
        step = self._save_committed()
        self.control.append_later("suspended", {"wid": self.wid, "slot": list(self.slot), "step": step})
        self._wait_for_shutdown()
        return 0

    def _save_committed(self) -> int:
        if self.pending is not None:
            # A step whose commit we never saw: the checkpoint is of the step before (a resume
            # retries it on the same batch).
            self.pending = None
        step = self.state.step_done
        if step >= 0:
            path = self.checkpointer.save_now(self.state, self.slot, step, self.diloco)
            log.warning("slot %s saved at step %d to %s", self.slot, step, path)
        return step

    def _give_up(self) -> int:
        """The coordinator never came back: keep what this slot committed, exit resumable."""
        if self.state is not None and self.slot is not None and self.state.step_done >= 0:
            step = self._save_committed()
            print(f"kintsugi worker {self.wid}: the coordinator is gone; slot {list(self.slot)} saved at step "
                  f"{step} in {self.run_dir}/checkpoints; restart it with `kintsugi coordinator --resume "
                  f"--run-dir {self.run_dir} --port {self.control.port}` or resume the job with train.resume",
                  file=sys.stderr)
            return EX_RESUMABLE
        print(f"kintsugi worker {self.wid}: the coordinator is gone and this worker held no state", file=sys.stderr)
        return 1

    def _wait_for_shutdown(self) -> None:
        while not self.watcher.shutdown.is_set() and not self.watcher.store_lost.is_set():
            self.idle()
            if self.diloco is not None and self.watcher.suspend_plan is None:
                self.diloco.serve_idle()
            time.sleep(0.02)

    def _replay_unrecorded(self, plan, slot, committed: int) -> None:
        """A root killed after publishing a step's commit but before appending its record leaves the
        coordinator without that record (the plan's `committed` is what it recorded), while the
        survivors applied the step. Their rings hold it (relayed): send those steps, marked as
        replays (the coordinator keeps the first copy, and prefers the root's if one comes)."""
        if slot is None:
            return
        known = (plan.get("committed") or {}).get(str(slot[0]))
        if known is None or committed <= int(known):
            return
        with self.recent_lock:
            missing = [r for r in self.recent if r.get("replica") == slot[0] and int(known) < r["step"] <= committed]
        if committed not in {r["step"] for r in missing}:
            # Finished from the store's entry (the root died before any broadcast): its record is there.
            try:
                entry = self.control.get_json_or(f"committed/{slot[0]}")
            except P.CoordinatorAway:
                entry = None
            if isinstance(entry, dict) and entry.get("step") == committed and isinstance(entry.get("record"), dict):
                missing.append(entry["record"])
        for rec in missing:
            self.control.append_later("commit", dict(rec, replay=True))
        if missing:
            log.warning("replica %d: steps %s were committed but never recorded (their root died in between); "
                        "sent this stage's copy", slot[0], [r["step"] for r in missing])

    def record_commit(self, rec: dict) -> None:
        with self.recent_lock:
            self.recent.append(rec)


def _rollback_step(plan: dict, slot) -> Optional[int]:
    rb = plan.get("rollback")
    if rb is None or slot is None:
        return None
    return rb[str(slot[0])] if isinstance(rb, dict) else rb


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
        control = P.open_control(host, port, token, timeout_s)
        bg = P.open_control(host, port, token, timeout_s)
    except P.Forged as e:
        print(f"kintsugi worker: {e}", file=sys.stderr)
        return 2
    try:
        return Worker(control, wid, token, bg=bg).run()
    except Shutdown:
        return 0


if __name__ == "__main__":
    sys.exit(main())
