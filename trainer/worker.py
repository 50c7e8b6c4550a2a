"""A worker process: joins the coordinator, takes a (replica, stage) slot, trains, and survives
membership changes without restarting.

Life of a worker: join with the token -> wait for a generation that gives it a slot -> build the
generation's process group under the store prefix `gen<g>` -> execute its part of the rebuild plan
-> train until the run ends or the generation changes -> drop the group and go again.

Commit protocol: after its backward every stage adds [grad sq-norm, loss, tokens] into a chain
reduction towards stage 0. Stage 0 holding the total means every stage finished its backward; it
writes `committed/<replica>` (with the total) to the store BEFORE broadcasting it back. A stage cut
off before the broadcast arrives finishes the step from the store in the next generation, so the
optimizer step runs on all stages of a replica or on none, and an uncommitted step is retried on
the same batch.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from parallel.diloco import StreamingDiLoCo, allreduce_gradients
from parallel.schedules import StageExecutor, actions_for, routes_for
from parallel.topology import Grid
from parallel.transport import Aborted, ByteCounter, PeerFailure, Transport, wait_abortable
from recovery import protocol as P
from recovery.rebuild import recv_package, send_package

from .config import JobConfig
from .data import ShardedBatches, load_tokens, val_batches
from .model import cross_entropy_loss
from .stage import StageState

log = logging.getLogger("kintsugi.worker")
REBUILD_TAG = 1 << 20
COMMIT_TAG = 1 << 21
COPY_TAG = 1 << 22
REBALANCE_TAG = 1 << 23


class Shutdown(Exception):
    pass


class Heartbeat(threading.Thread):
    """Bumps hb/<wid>, publishes byte counts, and raises the abort flag when the generation moves on
    or the run ends. Runs beside the training thread, so a long step never looks like a hang."""

    def __init__(self, store, wid: str, interval: float, counter: ByteCounter):
        super().__init__(daemon=True, name="kintsugi-heartbeat")
        self.store, self.wid, self.interval, self.counter = store, wid, interval, counter
        self.working_gen = -1
        self.latest_gen = -1
        self.abort = threading.Event()
        self.shutdown = threading.Event()
        self.store_lost = threading.Event()
        # Set by a notice signal; announced at once (from this thread, which never blocks on a
        # peer) so the coordinator knows who is leaving even while their step is stuck on a peer
        # that already left: when every holder is leaving and no spare is free it suspends the job.
        self.leaving: Optional[threading.Event] = None
        self._intent_sent = False

    def run(self):
        misses = 0
        while not self.shutdown.is_set():
            try:
                self.store.add(f"hb/{self.wid}", 1)
                P.put_json(self.store, f"bytes/{self.wid}", self.counter.as_dict())
                self.latest_gen = int(self.store.get("gen"))
                if self.leaving is not None and self.leaving.is_set() and not self._intent_sent:
                    P.append(self.store, "intent", {"wid": self.wid})
                    self._intent_sent = True
                if self.store.check(["shutdown"]):
                    self.shutdown.set()
                misses = 0
            except Exception:  # noqa: BLE001 - the coordinator is gone or unreachable
                misses += 1
                if misses * self.interval > 10.0:
                    self.store_lost.set()
                    self.shutdown.set()
            if self.latest_gen > self.working_gen >= 0 or self.shutdown.is_set():
                self.abort.set()
            time.sleep(self.interval)


class Worker:
    def __init__(self, store, wid: str, token: Optional[str], hb_store=None):
        self.store, self.wid = store, wid
        self.job = JobConfig.from_dict(P.get_json(store, "job"))
        torch.manual_seed(self.job.train.seed)
        self.counter = ByteCounter()
        self._join(token)
        # Its own store connection: a TCPStore client serialises requests, and the main thread's
        # blocking rendezvous inside init_process_group must never delay a heartbeat.
        self.hb = Heartbeat(hb_store or store, wid, self.job.recovery.heartbeat_interval_s, self.counter)
        self.leaving = threading.Event()
        self.hb.leaving = self.leaving
        self.hb.start()
        self.machine_noticed = False
        for name in self.job.recovery.notice_signals:
            signal.signal(getattr(signal, name), lambda *_: self.leaving.set())
        # A spot interruption notice from the cloud's metadata service means the same as SIGTERM.
        from recovery.notices import make_watcher
        address = self.job.recovery.metadata_address
        if address and "{machine}" in address:  # one metadata endpoint per (simulated) machine
            address = address.replace("{machine}", self.machine)
        self.notice_watcher = make_watcher(self.job.recovery.notice, self._on_machine_notice,
                                           address=address,
                                           interval_s=self.job.recovery.notice_interval_s)
        if self.notice_watcher is not None:
            self.notice_watcher.start()
        self.slot = None
        self.state: Optional[StageState] = None
        self.diloco = None
        self.stage_group = None
        self.data = None
        corpus = P.get_json(store, "corpus")
        self.train_tokens = load_tokens(corpus["train_path"], corpus["dtype"])
        self.val_tokens = load_tokens(corpus["val_path"], corpus["dtype"])
        self.pending = None  # (step, local_sq) of a step whose backward finished but not its commit
        # launcher.slow_machines: this (simulated) machine computes this many times slower.
        self.slowdown = float(os.environ.get("KINTSUGI_SLOWDOWN") or 1.0)
        self.run_dir = store.get("run_dir").decode()
        rec = self.job.recovery
        every = rec.checkpoint_every or (10 if rec.strategy == "checkpoint" else 0)
        from .checkpoint import AsyncCheckpointer
        self.checkpointer = AsyncCheckpointer(store, self.run_dir, every)
        self._warm_up()

    def _warm_up(self) -> None:
        """Pay the first-use costs (model construction, autograd, kernels) while waiting in the pool,
        not in the middle of someone's recovery: a spare then takes a slot in milliseconds."""
        st = StageState(self.job, self.job.parallel.stages - 1)
        x = torch.randn(1, 8, self.job.model.dim)
        st.model.forward_layers(x).sum().backward()
        st.zero_grad()

    def _on_machine_notice(self, notice) -> None:
        # The whole machine is going away (unlike a SIGTERM to this one process): say so when
        # leaving, so the coordinator stops handing this machine's spares any slot.
        self.machine_noticed = True
        self.leaving.set()

    def _join(self, token):
        self.machine = os.environ.get("KINTSUGI_MACHINE", socket.gethostname())
        P.append(self.store, "join", {"wid": self.wid, "token": token, "pid": os.getpid(),
                                      "host": socket.gethostname(), "machine": self.machine})
        ack = self.store.get(f"ack/{self.wid}").decode()
        if ack != "ok":
            raise SystemExit(f"kintsugi: the coordinator refused this worker ({ack}); set KINTSUGI_TOKEN or recovery.token")

    # --- generation loop ----------------------------------------------------------------------------
    def run(self) -> int:
        seen = -1
        while True:
            plan = self._next_plan(seen)
            if plan is None:
                return 0
            seen = plan["gen"]
            if plan.get("suspend"):
                return self._suspend(plan)
            if self.wid not in plan["ranks"]:
                if self.slot is not None:
                    log.warning("no longer in the plan of generation %d; exiting", seen)
                    return 0
                continue  # still a spare
            try:
                done = self._run_generation(plan)
            except (Aborted, PeerFailure) as e:
                if isinstance(e, PeerFailure):
                    self._report(plan, e)
                done = False
            except RuntimeError as e:  # any other torch.distributed error: let the coordinator decide
                log.warning("generation %d failed: %s", seen, str(e).splitlines()[0][:200])
                self._await_next_generation()
                done = False
            finally:
                self._drop_group()
            if done:
                return 0

    def _next_plan(self, seen: int):
        while True:
            if self.hb.shutdown.is_set():
                return None
            if self.leaving.is_set() and self.slot is None:
                # A spare whose machine is going away leaves the pool instead of taking a slot.
                P.append(self.store, "leave", {"wid": self.wid, "why": "interruption notice (spare)",
                                               "machine": self.machine if self.machine_noticed else None})
                return None
            g = int(self.store.get("gen"))
            if g > seen:
                return P.get_json(self.store, f"gen/{g}")
            time.sleep(0.01)

    def _report(self, plan, err: PeerFailure) -> None:
        peer_wid = next((w for w, r in plan["ranks"].items() if r == err.peer), None)
        if peer_wid is not None:
            P.append(self.store, "suspect", {"gen": plan["gen"], "reporter": self.wid, "peer_wid": peer_wid,
                                             "why": str(err)})
        self._await_next_generation()

    def _await_next_generation(self) -> None:
        """Wait for the coordinator to move on (or for the run to end) before rebuilding."""
        while not self.hb.abort.is_set():
            time.sleep(0.005)

    def _drop_group(self):
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the old group may already be broken
                pass

    def _run_generation(self, plan) -> bool:
        gen = plan["gen"]
        self.hb.abort.clear()
        self.hb.working_gen = gen
        rank, world = plan["ranks"][self.wid], plan["world_size"]
        backend = "gloo"
        t_gen = time.time()
        log.info("gen %d: building group (rank %d of %d), %.3fs after publication", gen, rank, world,
                 t_gen - plan["published_at"])
        dist.init_process_group(backend, store=dist.PrefixStore(f"gen{gen}", self.store), rank=rank,
                                world_size=world, timeout=timedelta(seconds=self.job.recovery.init_timeout_s))
        grid = Grid(self.job.parallel.replicas, self.job.parallel.stages)
        wait_abortable(dist.barrier(async_op=True), self.hb.abort)
        log.info("gen %d: group ready in %.3fs", gen, time.time() - t_gen)
        transport = Transport(None, self.hb.abort, self.counter, self._codecs())
        # Stage groups (one per stage, across replicas) for Streaming DiLoCo / data parallelism.
        # new_group is collective over the whole world, so every rank (leavers too) creates all.
        stage_groups = [dist.new_group(grid.stage_ranks(s)) for s in range(grid.stages)] if grid.replicas > 1 else None
        if self.wid in plan["leavers"]:
            self._hand_off(plan, transport)
            raise SystemExit(0)
        slot = next(tuple(map(int, k.split(","))) for k, w in plan["slots"].items() if w == self.wid)
        t_start = time.time()
        if plan.get("layout") is not None:  # live rebalancing: the layout every new stage is built with
            self.job.parallel.layers_per_stage = list(plan["layout"])
        rebuild = plan["rebuild"].get(f"{slot[0]},{slot[1]}")
        if self.slot != slot:  # new here: build the stage (it is replaced below if being rebuilt)
            self.slot = slot
            self.state = StageState(self.job, slot[1])
            if self.job.model.init_from:
                from .pretrained import load_into_stage
                load_into_stage(self.state, self.job.model.init_from)
            if self.job.lisa.enabled:
                from .lisa import LisaController
                self.state.lisa = LisaController(self.job.lisa, self.state, self.job.train.seed, replica=slot[0])
            self.data = ShardedBatches(self.train_tokens, self.job.data.seq_len, self.job.train.batch_size,
                                       slot[0], self.job.parallel.replicas, self.job.train.seed)
        self._finish_pending(slot)
        self.stage_group = stage_groups[slot[1]] if stage_groups else None
        self._setup_outer_sync()
        from .recovery_exec import execute_plan  # the rebuild exchanges of this generation
        execute_plan(self, plan, grid, transport, slot, rebuild)
        if self.diloco is not None:
            # Bitwise agreement of the global copies again: a replica may have finished a sync that
            # its peers abandoned. Broadcast from the first replica that was not rebuilt.
            rebuilt = {int(k.split(",")[0]) for k, v in plan["rebuild"].items() if int(k.split(",")[1]) == slot[1]}
            src = next((q for q in range(grid.replicas) if q not in rebuilt), 0)
            self.diloco.resync(src=src, reset_local=slot[0] in rebuilt and src != slot[0])
        if plan.get("prev_layout") is not None and self.state.layer_ids != self._layer_ids(slot[1]):
            self._relayout(plan, grid, transport, slot)
        log.info("gen %d: plan executed %.3fs after publication", gen, time.time() - plan["published_at"])
        if rebuild is not None:
            now = time.time()
            P.append(self.store, "event", {"kind": "rebuild", "slot": list(slot), "tier": rebuild["tier"],
                                           "step": rebuild["step"], "detect_s": rebuild["detected_at"] - rebuild["failed_at"],
                                           "recover_s": now - rebuild["failed_at"], "setup_s": now - t_start,
                                           "failed_at": rebuild["failed_at"], "resumed_at": now})
        return self._train(plan, grid, transport, slot)

    def _layer_ids(self, stage: int, layout=None):
        from parallel.topology import per_stage_layers
        layout = self.job.parallel.layers_per_stage if layout is None else layout
        return per_stage_layers(self.job.model.n_layers, self.job.parallel.stages, layout)[stage]

    def _relayout(self, plan, grid: Grid, transport: Transport, slot) -> None:
        """Live rebalancing: layers change stage. Each moving layer's weights and AdamW state go
        from its old holder to its new one, in global layer order (every pair of ranks meets its
        transfers in the same order, so blocking sends cannot deadlock); the stage is then rebuilt
        around the layers it now holds. The pipeline computes exactly the same function after."""
        r, s = slot
        S = self.job.parallel.stages
        old_owner = {l: t for t in range(S) for l in self._layer_ids(t, plan["prev_layout"])}
        new_owner = {l: t for t in range(S) for l in self._layer_ids(t, plan["layout"])}
        st = self.state
        named = dict(st.model.named_parameters())
        params = {n: p.detach() for n, p in named.items()}
        opt = {n: st.optimizer.state[p] for n, p in named.items() if st.optimizer.state.get(p)}
        # Streaming DiLoCo: a layer's global copy and outer momentum travel with it (by name).
        outer = {}
        if self.diloco is not None:
            for f in self.diloco.state_dict(as_if_abandoned=True)["fragments"]:
                for n, g in f["global"].items():
                    outer[n] = (g, f["momentum"].get(n))
            old_counts = [f.syncs for f in self.diloco.fragments]
            old_syncs = self.diloco.num_syncs
        t0 = time.time()
        for l in sorted(old_owner):
            a, b = old_owner[l], new_owner[l]
            if a == b or s not in (a, b):
                continue
            if a == s:
                names = [n for n in named if n.startswith(f"layers.{l}.")]
                send_package(transport, {"params": {n: params[n] for n in names},
                                         "opt": {n: opt[n] for n in names if n in opt},
                                         "outer": {n: outer[n] for n in names if n in outer}},
                             grid.rank((r, b)), REBALANCE_TAG + 4 * l)
            else:
                pkg = recv_package(transport, grid.rank((r, a)), REBALANCE_TAG + 4 * l)
                params.update(pkg["params"])
                opt.update(pkg["opt"])
                outer.update(pkg["outer"])
        new = StageState(self.job, s)
        with torch.no_grad():
            for n, p in new.model.named_parameters():
                p.copy_(params[n])
                if n in opt:
                    new.optimizer.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt[n].items()}
        new.lr_scale, new.grad_norm, new.step_done = st.lr_scale, st.grad_norm, st.step_done
        new.neighbour_copy = dict(st.neighbour_copy)
        self.state = new
        if self.diloco is not None:
            # A new fragment split over the new layers; fragment p keeps fragment p's sync count, so
            # every replica (same old counts after resync, same new split) agrees on what is owed.
            self.diloco = None
            self._setup_outer_sync()
            state = {"step": self.diloco.step, "num_syncs": old_syncs, "fragments": [
                {"names": list(f.names), "global": {n: outer[n][0] for n in f.names},
                 "momentum": {n: outer[n][1] for n in f.names if outer[n][1] is not None},
                 "syncs": old_counts[min(f.index, len(old_counts) - 1)]} for f in self.diloco.fragments]}
            self.diloco.load_state_dict(state, reset_local=False)
        log.warning("slot %s rebalanced: layers %s -> %s (%.3fs)", slot, st.layer_ids, new.layer_ids,
                    time.time() - t0)

    def _codecs(self):
        c = self.job.compression
        if c.activations == "none" and c.gradients == "none":
            return {}
        from compression import get_codec
        return {"p2p": get_codec(c.activations, c.block_size), "p2p_grad": get_codec(c.gradients, c.block_size)}

    def _finish_pending(self, slot):
        """If our replica committed the step we had finished the backward of, apply it now."""
        rec = P.get_json_or(self.store, f"committed/{slot[0]}")
        if self.pending is not None and rec is not None and rec["step"] == self.pending[0] \
                and self.state.step_done < rec["step"]:
            self.state.apply_step(rec["step"], rec["total"][0], self.pending[1])
            self.data.position = rec["step"] + 1
        self.pending = None
        self.state.zero_grad()

    def _suspend(self, plan) -> int:
        """The whole job is being preempted and no spare is left to hand off to: write this slot's
        last committed state as a checkpoint (`train.resume` continues from it exactly) and exit."""
        key = f"{self.slot[0]},{self.slot[1]}" if self.slot is not None else None
        if key is None or plan["holders"].get(key) != self.wid:
            return 0  # a spare, or a slot someone else holds
        self._finish_pending(self.slot)  # a step our replica committed but we had not applied
        if self.diloco is not None:
            self.diloco.abandon()
        step = self.state.step_done
        if step >= 0:
            path = self.checkpointer.save_now(self.state, self.slot, step, self.diloco)
            log.warning("suspended: slot %s saved at step %d to %s", self.slot, step, path)
        P.append(self.store, "suspended", {"wid": self.wid, "slot": list(self.slot), "step": step})
        self._wait_for_shutdown()
        return 0

    def _hand_off(self, plan, transport):
        """Graceful leave: stream the exact state to the worker that takes our slot."""
        dst_wid = plan["slots"][f"{self.slot[0]},{self.slot[1]}"]
        if self.diloco is not None:
            self.diloco.abandon()  # its syncs in flight belonged to the old group; the global copy is intact
        from .recovery_exec import dump, snapshot
        dump(f"g{plan['gen']}_leaver_{self.slot[0]},{self.slot[1]}", snapshot(self))
        send_package(transport, self.state.export(exact=True), plan["ranks"][dst_wid], REBUILD_TAG)
        log.info("handed slot %s over to %s", self.slot, dst_wid)

    # --- training -----------------------------------------------------------------------------------
    def _train(self, plan, grid: Grid, transport: Transport, slot) -> bool:
        job, st = self.job, self.state
        r, s = slot
        S = job.parallel.stages
        pipe = grid.pipeline_ranks(r)
        rec = P.get_json_or(self.store, f"committed/{r}")
        step = (rec["step"] + 1) if rec else 0
        self.data.position = step
        routes = routes_for(S, job.train.microbatches, alternate=self._alternate())
        actions = actions_for(job.parallel.schedule, s, S, routes)
        executor = StageExecutor(st.model, s, S, transport, lambda stage: pipe[stage], job.model.dim,
                                 cross_entropy_loss)
        tokens_per_step = job.train.batch_size * job.data.seq_len
        R = grid.replicas
        # The data-parallel baseline keeps every replica on the same step (its gradient all-reduce
        # pairs step k with step k), so its commit spans all replicas: one chain through every
        # slot, rooted at (0, 0), commits step k for all replicas or for none. Per-replica commits
        # could let one replica commit k while another retries it, and the all-reduces would then
        # pair different steps and leave the last one without a partner.
        dp = self.stage_group is not None and self.diloco is None
        chain = [grid.rank((q, t)) for q in range(R) for t in range(S)] if dp else pipe
        scale = 1.0 / R if dp else 1.0  # each replica holds the same averaged gradient
        shards = {}
        while step < job.train.max_steps:
            t0 = time.time()
            inputs, targets = self.data.batch_at(step)
            if st.lisa is not None:
                st.lisa.before_step(step)
            st.zero_grad()
            wait0 = transport.recv_wait_s
            loss = executor.run(inputs, targets, routes, actions)
            compute_s = time.time() - t0 - (transport.recv_wait_s - wait0)
            if self.slowdown > 1.0:  # a simulated slower machine: its peers wait for it for real
                time.sleep((self.slowdown - 1.0) * compute_s)
                compute_s *= self.slowdown
            if dp:  # the data-parallel baseline: average gradients across replicas every step
                allreduce_gradients(list(st.model.parameters()), self.stage_group, self.counter, self.hb.abort)
            local_sq = st.local_grad_sq()
            self.pending = (step, local_sq)
            # [grad sq-norm, loss, per-stage compute seconds...]: summed along the pipeline.
            vec = torch.zeros(2 + S, dtype=torch.float64)
            vec[0], vec[1], vec[2 + s] = local_sq, loss or 0.0, compute_s

            def commit(total, _step=step):  # runs on the chain's root only, before the broadcast
                total = total * scale
                for q in (range(R) if dp else [r]):
                    P.put_json(self.store, f"committed/{q}", {"step": _step, "total": total.tolist()})
                for q in (range(R) if dp else [r]):
                    if q not in shards:
                        shards[q] = self.data if q == r else ShardedBatches(
                            self.train_tokens, job.data.seq_len, job.train.batch_size, q, R, job.train.seed)
                    P.append(self.store, "commit", {"replica": q, "step": _step, "loss": float(total[1]),
                                                    "grad_norm": float(total[0]) ** 0.5, "tokens": tokens_per_step,
                                                    "lr": st.optimizer.param_groups[0]["lr"],
                                                    "step_s": time.time() - t0,
                                                    "batch_ids": shards[q].batch_ids(_step),
                                                    "stage_compute_s": [round(float(x), 4) for x in total[2:]]})
            total = transport.chain_allreduce(vec, chain, COMMIT_TAG + 2 * (step % 1000), on_total=commit) * scale
            st.apply_step(step, float(total[0]), local_sq)
            self.pending = None
            self.data.advance()
            if self.diloco is not None:
                self.diloco.after_inner_step(step + 1)
                if step + 1 == job.train.max_steps:
                    self.diloco.finish_all()  # the last syncs land before the final evaluation
            if self.checkpointer.due(step):
                self.checkpointer.save(st, slot, step, self.diloco)
            step += 1
            self._after_step(plan, grid, transport, slot, step)
            if self.leaving.is_set():
                P.append(self.store, "leave", {"wid": self.wid, "why": "interruption notice",
                                               "machine": self.machine if self.machine_noticed else None})
                self._wait_for_handoff_gen(plan)
                return False
            ev = job.train.eval_every
            if r == 0 and ev and step % ev == 0 and step < job.train.max_steps:
                self._evaluate(executor, step, final=False)
        # The final evaluation also runs when a generation change landed after the last commit
        # (the loop above is then empty); the last stage marks it done once it is published.
        if r == 0 and not self.store.check(["final_eval_done"]):
            self._evaluate(executor, job.train.max_steps, final=True)
        if r == 0:
            self._save_final(s)
        self._wait_for_shutdown()
        return True

    def _alternate(self) -> bool:
        return self.job.recovery.strategy in ("checkfree_plus", "tiered") and self.job.parallel.stages >= 2

    def _after_step(self, plan, grid, transport, slot, step):
        from .recovery_exec import refresh_neighbour_copies
        refresh_neighbour_copies(self, grid, transport, slot, step)

    def _save_final(self, stage: int) -> None:
        """Replica 0 writes its stage's final weights; `kintsugi export` assembles the full model."""
        from safetensors.torch import save_file
        out = os.path.join(self.run_dir, "final")
        os.makedirs(out, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.state.model.state_dict().items()}
        save_file(sd, os.path.join(out, f"stage{stage}.safetensors.tmp"))
        os.replace(os.path.join(out, f"stage{stage}.safetensors.tmp"), os.path.join(out, f"stage{stage}.safetensors"))

    def _setup_outer_sync(self) -> None:
        """Streaming DiLoCo across the replicas of this stage (only with several replicas)."""
        if not (self.job.diloco.enabled and self.stage_group is not None):
            self.diloco = None
            return
        if getattr(self, "diloco", None) is None or self.diloco_slot != self.slot:
            self.diloco = StreamingDiLoCo(dict(self.state.model.named_parameters()), self.job.diloco,
                                          self.stage_group, self.counter, self.hb.abort)
            self.diloco_slot = self.slot
        else:
            self.diloco.abandon()  # syncs in flight belonged to the old generation's group
            self.diloco.set_group(self.stage_group, self.hb.abort)
        self.state.diloco = self.diloco

    def _evaluate(self, executor: StageExecutor, step: int, final: bool):
        job = self.job
        S = job.parallel.stages
        batches = val_batches(self.val_tokens, job.data.seq_len, job.train.batch_size, job.train.eval_batches)
        routes = routes_for(S, job.train.microbatches, alternate=False)
        fwd = [a for a in actions_for("gpipe", executor.stage, S, routes) if a[0] == "F"]
        total, n = 0.0, 0
        # Streaming DiLoCo evaluates the global (outer) parameters, as the paper does.
        with (self.diloco.use_global_params() if self.diloco is not None else contextlib.nullcontext()):
            for inputs, targets in batches:
                loss = executor.run(inputs, targets, routes, fwd, train=False)
                if loss is not None:
                    total, n = total + loss, n + 1
        if executor.stage == S - 1:
            P.append(self.store, "eval", {"step": step, "val_loss": total / max(n, 1), "final": final})
            if final:
                self.store.set("final_eval_done", "1")

    def _wait_for_handoff_gen(self, plan):
        while not self.hb.abort.is_set():
            time.sleep(0.005)

    def _wait_for_shutdown(self):
        while not self.hb.shutdown.is_set():
            time.sleep(0.02)


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
    store = P.connect(host, port, timeout_s=120)
    token = os.environ.get(P.TOKEN_ENV)
    try:
        rc = Worker(store, wid, token, hb_store=P.connect(host, port, timeout_s=120)).run()
    except Shutdown:
        rc = 0
    # Waits abandoned in helper threads (a dead peer's recv) must not hold up or crash the exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
