"""The coordinator: a process that is not a worker, so no worker's death takes the store down.

It hosts the TCPStore and owns membership: which worker holds which (replica, stage) slot, the spare
pool, heartbeats, and the generations of every group, each with its own number:

- a *cell* is the set of replicas whose pipelines train as one unit: one replica under Streaming
  DiLoCo (or with a single replica), every replica for plain data-parallel training (their gradients
  meet every step). A failure re-plans its own cell only: the other replicas never abandon a step.
- a *stage group* (Streaming DiLoCo, R > 1) holds one stage of every replica for the outer syncs. A
  lost member leaves it at once (the others keep syncing among themselves) and its replacement
  joins once it holds its state (see parallel.stage_link).

Formation is watched: a worker that cannot form a group reports it (`fault`) and the cell is
re-planned, dropping whoever never arrived; a cell that neither commits nor changes for
`recovery.progress_timeout_s` is re-planned too, and a worker that never moved to its cell's newest
generation is replaced. When the lost slots outnumber the free spares it says which slots wait and
how to add a worker, and after `recovery.spare_wait_s` suspends the job (exit 75).

Its state (membership, slots, generations, pending rebuilds, committed steps, counters) is written
to `control_state.json` in the run directory on every change (atomically): started again with
`--resume`, it rebuilds its store, the workers re-register and replay what it missed, and the run
goes on. All timeouts use the monotonic clock. Starting it is the trainer's job
(`trainer.cli.coordinator`), which also feeds wandb through the `tracker` hooks.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from typing import Dict, List, Optional, Set, Tuple

from . import protocol as P
from .auth import Auth, Forged
from .placement import place, recoverability_report
from .records import write_strict_atomic
from .tiers import Unrecoverable, plan_rebuilds
from .coordinator_common import (END_GRACE_S, EX_RECORD, EX_SUSPENDED, LOGS, STATE_FILE, TERM_GRACE_S, Cell, Slot,
                                 WorkerInfo, log)
from .coordinator_faults import FaultsMixin
from .coordinator_persist import PersistMixin
from .coordinator_records import RecordsMixin


class Coordinator(FaultsMixin, RecordsMixin, PersistMixin):
    def __init__(self, job: dict, run_dir: str, port: int, host: str = "127.0.0.1", token: Optional[str] = None,
                 progress: bool = True, tracker=None, resume_from: Optional[Dict[int, int]] = None,
                 resume_missing: Optional[Dict[int, List[int]]] = None, layout: Optional[List[int]] = None,
                 corpus: Optional[dict] = None, restore: bool = False):
        self.job, self.run_dir = job, run_dir
        par, rec = job["parallel"], job["recovery"]
        self.R, self.S = par["replicas"], par["stages"]
        self.max_steps = job["train"]["max_steps"]
        self.hb_timeout = rec["heartbeat_timeout_s"]
        self.progress_timeout = float(rec.get("progress_timeout_s", 300.0))
        self.spare_wait = float(rec.get("spare_wait_s", 600.0))
        self.strategy = rec["strategy"]
        self.global_generations = rec.get("generations", "per_group") == "global"
        self.diloco = job["diloco"]["enabled"]
        self.token, self.tracker, self.corpus, self.port = token, tracker, corpus, port
        # Cells: the replicas trained as one unit. Plain data-parallel couples them every step.
        if self.R > 1 and not self.diloco:
            self.cells = {0: Cell(0, list(range(self.R)))}
        else:
            self.cells = {r: Cell(r, [r]) for r in range(self.R)}
        self.cell_of = {r: c.index for c in self.cells.values() for r in c.replicas}
        self.stage_groups = self.diloco and self.R > 1
        self.stage_gen = {s: -1 for s in range(self.S)}
        self._stage_trust_spent: Dict[int, bool] = {}
        self.stage_members: Dict[int, Dict[str, int]] = {s: {} for s in range(self.S)}
        self.ready: Dict[Slot, bool] = {}       # the holder has its state (may join its stage group)
        self.workers: Dict[str, WorkerInfo] = {}
        self.slots: Dict[Slot, str] = {}
        self.version = 0
        self.started = False
        self._full_since: Optional[float] = None
        # Approximately rebuilt slots -> the step they resume at; they are no source for another
        # rebuild until their replica commits that step.
        self.unsettled: Dict[Slot, int] = {}
        # Failures that happen together (one machine, one SIGKILL of a group) are reported within
        # milliseconds of each other; wait this long after the first so they are planned together.
        self.settle_s = max(0.25, 2 * rec["heartbeat_interval_s"])
        self.committed = {r: -1 for r in range(self.R)}
        self.recorded: Dict[int, Set[int]] = {r: set() for r in range(self.R)}
        self.held: Dict[Tuple[int, int], Tuple[dict, float]] = {}  # relayed replays, see _on_commit
        self.peak_bytes: Dict[int, int] = {}  # per stage, the largest peak any holder reported
        self.totals: Dict[int, list] = {}
        from kintsugi.parallel.topology import per_stage_layers
        self.layout = layout or [len(x) for x in per_stage_layers(job["model"]["n_layers"], self.S,
                                                                   par.get("layers_per_stage"))]
        self.config_layout = [len(x) for x in per_stage_layers(job["model"]["n_layers"], self.S,
                                                                par.get("layers_per_stage"))]
        self.layout_version = 0
        self.rebalance = bool(par.get("rebalance"))
        self.rebalance_every = int(par.get("rebalance_every", 10))
        self.rebalance_min_gain = float(par.get("rebalance_min_gain", 0.1))
        self.stage_times: List[List[float]] = []
        self.rebuilds: List[dict] = []
        self.failures = 0
        self.publications = 0
        self.final_val: Optional[float] = None
        self.error: Optional[str] = None
        self.exit_code = 3  # with an error: 3 = cannot recover, 143 = terminated
        self.ckpt_counts: Dict[int, int] = {}
        self.latest_checkpoint: Optional[int] = None
        self.suspend_gen: Optional[int] = None   # set once a suspend was published
        self.suspended: Dict[Slot, int] = {}
        self.suspend_lost: List[Slot] = []
        self.suspend_deadline = 0.0
        self.terminating: Optional[float] = None
        self.resume_from, self.resume_missing = resume_from, resume_missing or {}
        self.spares_needed = 0
        self.rebuilt_slots = 0  # slots given to spares by rebuilds: a launcher replaces each consumed spare
        self.rebuild_plans = 0  # generations published with a rebuild in them (fault injection keys on it)
        self._waiting_logged: Set[Slot] = set()
        self.reporters: Dict[Tuple[int, int], Set[str]] = {}  # (cell, gen) -> workers that reported a failure
        self.bad_checkpoints: Set[int] = set()
        self.divergences = 0
        self.nonfinite_steps = 0
        self.checkpoint_errors: List[dict] = []
        self._dirty = True
        self._last_hb_check = 0.0
        self.t0 = time.time()
        self.tokens = 0
        self.incarnation = 0
        self.run_id: Optional[str] = None
        self.store = P.connect(host, port, is_master=True, timeout_s=rec["init_timeout_s"])
        os.makedirs(run_dir, exist_ok=True)
        if restore:
            self._load_state()
        if self.resume_from is not None:
            for r, k in self.resume_from.items():
                self.committed[r] = k
                self.latest_checkpoint = k if len(set(self.resume_from.values())) == 1 else None
        self.incarnation += 1
        self.boot = f"{uuid.uuid4().hex[:8]}-{self.incarnation}"
        if not token:
            raise ValueError("a run always has a token: give the coordinator one (KINTSUGI_TOKEN)")
        self.run_id = self.run_id or uuid.uuid4().hex
        self.auth = Auth(token, self.run_id, self.boot)
        self.refused_joins, self._last_refusal, self._refused_ids = 0, 0.0, set()
        self.store.set("run_id", self.run_id)
        self.store.set("boot", self.auth.seal("boot", {"boot": self.boot}, with_boot=False))
        self._fill_store()
        self.readers = {name: P.LogReader(self.store, name, auth=self.auth,
                                          on_forged=self._on_forged_join if name == "join" else None)
                        for name in LOGS}
        self.metrics_f = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.bar = None
        if progress:
            from tqdm import tqdm
            # In a log file (not a terminal) a redraw per step would flood it: every 10 s is enough.
            self.bar = tqdm(total=self.max_steps * self.R, initial=sum(len(v) for v in self.recorded.values()),
                            desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.2 if sys.stderr.isatty() else 10.0)
        if restore:
            log.warning("coordinator restarted (incarnation %d): %d workers known, committed %s; waiting for "
                        "them to re-register", self.incarnation, len(self.workers), self.committed)
            now = time.monotonic()
            for w in self.workers.values():
                w.hb_changed = now  # their heartbeats count from now
            for c in self.cells.values():
                c.since = now
                if c.waiting_since is not None:
                    c.waiting_since = now

    # --- the store --------------------------------------------------------------------------------
    def _fill_store(self) -> None:
        """Everything a worker reads: on a restart the store is new and empty."""
        st = self.store
        P.put_json(st, "job", self.job, auth=self.auth)
        if self.corpus is not None:
            P.put_json(st, "corpus", self.corpus, auth=self.auth)
        P.put_json(st, "run_dir", os.path.abspath(self.run_dir), auth=self.auth)
        for r, k in self.committed.items():
            P.put_json(st, f"committed/{r}", {"step": k, "total": self.totals.get(r)}, auth=self.auth)
            # Every step up to this one is in metrics.jsonl: workers replay their commit records
            # after it (the store's committed/<r> moves on as soon as a root commits again).
            prefix = -1
            while prefix + 1 in self.recorded[r]:
                prefix += 1
            P.put_json(st, f"recorded/{r}", {"step": prefix}, auth=self.auth)
        for c in self.cells.values():
            if c.plan is not None:
                P.put_json(st, f"cell/{c.index}", c.plan, auth=self.auth)
        for s in range(self.S):
            if self.stage_gen[s] >= 0:
                P.put_json(st, f"stage/{s}", self._stage_plan(s), auth=self.auth)
        for w in self.workers.values():
            P.put_json(st, f"hb/{w.wid}", {"n": -1}, auth=self.auth)
            if w.slot is not None and w.state == "active":
                P.put_json(st, f"role/{w.wid}", {"cell": self.cell_of[w.slot[0]]}, auth=self.auth)
        P.put_json(st, "slots", {P.slot_key(k): v for k, v in self.slots.items()}, auth=self.auth)
        if self.started:
            P.put_json(st, "started", True, auth=self.auth)
        self._put_counters()
        st.add("version", self.version + 1)

    def _put_counters(self) -> None:
        """What launchers act on, sealed: a forged count must not make them start processes."""
        P.put_json(self.store, "counters", {"rebuilt_slots": self.rebuilt_slots, "rebuild_plans": self.rebuild_plans,
                                            "spares_needed": self.spares_needed}, auth=self.auth)

    def _bump(self) -> None:
        self.version = int(self.store.add("version", 1))
        self._dirty = True

    # --- membership -------------------------------------------------------------------------------
    def _on_join(self, req: dict) -> None:
        wid = str(req["wid"])
        if wid in self.workers:
            return  # a replayed join (or a worker id used twice): the first one holds
        self.workers[wid] = WorkerInfo(wid, int(req["pid"]), str(req["host"]), str(req.get("machine", req["host"])))
        P.put_json(self.store, f"hb/{wid}", {"n": -1}, auth=self.auth)
        P.put_json(self.store, f"ack/{wid}", "ok", auth=self.auth)
        self._dirty = True
        log.info("worker %s joined (pid %s on %s)", wid, req["pid"], req["host"])

    def _on_forged_join(self, raw) -> None:
        """A join whose seal does not verify: a worker with a wrong or missing token (or anyone).
        It gets a refusal it can read as one (it cannot verify it either), once per claimed id and
        at most a few per second; the log line is rate-limited the same way."""
        self.refused_joins += 1
        try:
            claimed = str(json.loads(json.loads(bytes(raw).decode())["b"]).get("wid", "?"))[:80]
        except (ValueError, KeyError, TypeError, AttributeError):
            claimed = "?"
        now = time.monotonic()
        if now - self._last_refusal < 0.2 or claimed in self._refused_ids:
            return
        self._last_refusal = now
        if len(self._refused_ids) < 1000:
            self._refused_ids.add(claimed)
            self.store.set(f"ack/{claimed}", "refused")
        log.warning("refused join from %s: its record does not verify with the run's token (wrong or missing "
                    "KINTSUGI_TOKEN); %d refused so far", claimed, self.refused_joins)

    def _on_rejoin(self, req: dict) -> None:
        """A worker re-registers with a restarted coordinator."""
        wid = str(req["wid"])
        w = self.workers.get(wid)
        if w is None or w.state in ("dead", "left"):
            log.warning("worker %s re-registered but is not a member (%s); it is told to stop", wid,
                        "unknown" if w is None else w.state)
            P.put_json(self.store, f"ack/{wid}", "refused", auth=self.auth)
            return
        w.hb_changed = time.monotonic()
        P.put_json(self.store, f"ack/{wid}", "ok", auth=self.auth)
        log.info("worker %s re-registered (slot %s, step %s)", wid, req.get("slot"), req.get("step_done"))

    def _declare_dead(self, wid: str, why: str, handed_off: bool = False) -> None:
        w = self.workers.get(wid)
        if w is None or w.state in ("dead", "left"):
            return
        was_active = w.state == "active"
        w.state = "left" if handed_off else "dead"
        self._dirty = True
        log.warning("worker %s %s (%s)", wid, "left" if handed_off else "declared dead", why)
        if was_active and w.slot is not None:
            slot = w.slot
            if not handed_off:
                self.failures += 1
            injected = P.get_json_or(self.store, f"injected/{wid}", auth=self.auth)
            failed_at = injected["t"] if injected else (time.time() if handed_off else
                                                         time.time() - (time.monotonic() - w.hb_changed))
            cell = self.cells[self.cell_of[slot[0]]]
            cell.rebuilding.pop(slot, None)
            cell.lost[slot] = {"detected_at": time.time(), "detected_mono": time.monotonic(), "failed_at": failed_at,
                               "handed_off": handed_off, "leaver": wid if handed_off else None, "why": why,
                               "step": self.committed[slot[0]] + 1}
            del self.slots[slot]
            self.ready[slot] = False
            # The replica's pipeline is down until it is rebuilt: every stage group leaves it out,
            # so the live replicas keep syncing without waiting for it (see _maybe_stage_groups).
            self._maybe_stage_groups()
        # A rebuild elsewhere that was to take its state from this worker (a peer donor, a
        # neighbour) waits for it in vain: plan that cell again.
        for c in self.cells.values():
            if c.rebuilding and c.plan is not None and any(
                    rb.get("donor") == wid or any(self.slots.get(tuple(src)) is None for src in rb.get("sources", []))
                    for rb in c.plan["rebuild"].values()):
                c.needs_plan = True

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        if now - self._last_hb_check < 0.05:
            return
        self._last_hb_check = now
        live = [w for w in self.workers.values() if w.state in ("active", "spare")]
        if not live:
            return
        try:
            values = self.store.multi_get([f"hb/{w.wid}" for w in live])
        except RuntimeError:
            return
        for w, raw in zip(live, values):
            try:
                status = self.auth.open(f"hb/{w.wid}", raw)
                n = int(status.get("n", -1))
            except Forged as e:  # a forged beat never keeps a dead worker alive
                self.auth.dropped(e)
                n = w.hb
            except (ValueError, AttributeError, TypeError):
                continue
            if n != w.hb:
                w.hb, w.hb_changed, w.status = n, now, status
                stage, peak = status.get("stage"), status.get("peak_bytes")
                if isinstance(stage, int) and isinstance(peak, int):  # memory.peak_bytes per stage
                    self.peak_bytes[stage] = max(self.peak_bytes.get(stage, 0), peak)
            elif now - w.hb_changed > self.hb_timeout:
                self._declare_dead(w.wid, f"no heartbeat for {now - w.hb_changed:.1f}s")

    # --- generations ------------------------------------------------------------------------------
    def _cell_plan(self, cell: Cell, rebuild: dict, leavers: List[str], rollback=None, prev_layout=None) -> dict:
        ranks = {}
        for i, r in enumerate(cell.replicas):
            for s in range(self.S):
                ranks[self.slots[(r, s)]] = i * self.S + s
        for j, wid in enumerate(leavers):  # leavers join the new group only to hand their state over
            ranks[wid] = len(cell.replicas) * self.S + j
        cell.gen += 1
        return {"cell": cell.index, "gen": cell.gen, "replicas": list(cell.replicas),
                "slots": {P.slot_key((r, s)): self.slots[(r, s)] for r in cell.replicas for s in range(self.S)},
                "ranks": ranks, "world_size": len(ranks), "rebuild": rebuild, "leavers": leavers,
                "rollback": rollback, "layout": list(self.layout), "prev_layout": prev_layout,
                "layout_version": self.layout_version,
                "committed": {str(r): self.committed[r] for r in cell.replicas}, "published_at": time.time()}

    def _publish_cell(self, cell: Cell, rebuild: dict, leavers: List[str], rollback=None, prev_layout=None,
                      diverged: Optional[dict] = None) -> None:
        plan = self._cell_plan(cell, rebuild, leavers, rollback, prev_layout)
        if diverged is not None:
            plan["diverged"] = diverged
        cell.plan, cell.since = plan, time.monotonic()
        for wid in plan["slots"].values():
            P.put_json(self.store, f"role/{wid}", {"cell": cell.index}, auth=self.auth)
        P.put_json(self.store, f"cell/{cell.index}", plan, auth=self.auth)
        P.put_json(self.store, "slots", {P.slot_key(k): v for k, v in self.slots.items()}, auth=self.auth)
        self.publications += 1
        if rebuild:
            self.rebuild_plans += 1
            self._put_counters()
        self._bump()
        if rebuild:
            log.warning("cell %d generation %d: rebuilding %s", cell.index, cell.gen,
                        ", ".join(f"slot {k} via {v['tier']}" for k, v in rebuild.items()))
        else:
            log.info("cell %d generation %d published (%d workers)", cell.index, cell.gen, len(plan["ranks"]))

    def _stage_plan(self, s: int) -> dict:
        # The first generation of a fresh run needs no handshake (identical seeds, nothing synced).
        trusted = self.stage_gen[s] == 0 and self.resume_from is None and not self._stage_trust_spent.get(s)
        return {"stage": s, "gen": self.stage_gen[s], "members": dict(self.stage_members[s]),
                "layout_version": self.layout_version, "trusted": trusted}

    def _publish_stage(self, s: int) -> None:
        holders = self._stage_holders(s)
        self.stage_members[s] = {wid: i for i, (_, wid) in enumerate(holders)}
        self.stage_gen[s] += 1
        P.put_json(self.store, f"stage/{s}", self._stage_plan(s), auth=self.auth)
        self._bump()
        log.info("stage %d generation %d: replicas %s", s, self.stage_gen[s], [r for r, _ in holders])

    def _maybe_publish(self) -> None:
        if self.suspend_gen is not None:
            return
        spares = [w for w in self.workers.values() if w.state == "spare" and not w.leaving]
        if not self.started:
            self._initial_placement(spares)
            return
        for cell in self.cells.values():
            if cell.needs_plan and not cell.lost:
                cell.needs_plan = False
                self._replan_cell(cell, why="waited for every lost slot to have a holder")
        lost_cells = [c for c in self.cells.values() if c.lost]
        # What the waiting slots lack, counted every loop (a launcher starts that many workers).
        self._set_spares_needed(max(0, sum(len(c.lost) for c in lost_cells) - len(spares)))
        if not lost_cells:
            return
        now = time.monotonic()
        # Oldest losses first: a cell is re-planned when every one of its lost slots has a spare.
        for cell in sorted(lost_cells, key=lambda c: min(v["detected_mono"] for v in c.lost.values())):
            if now - min(v["detected_mono"] for v in cell.lost.values()) < self.settle_s:
                continue
            lost = sorted(cell.lost)
            if len(spares) < len(lost):
                self._wait_for_spares(cell, lost, len(spares))
                continue
            cell.waiting_since = None
            alive = {slot: self.workers[wid].machine for slot, wid in self.slots.items()}
            where = place(lost, self._pool_sizes(spares), self.S, fixed=alive)
            pool = self._pool(spares)
            for slot in lost:
                w = pool[where[slot]].pop(0)
                spares.remove(w)
                self._assign(slot, w)
            self.rebuilt_slots += len(lost)
            self._put_counters()
            leavers = [v["leaver"] for v in cell.lost.values() if v["leaver"]]
            cell.rebuilding.update(cell.lost)
            cell.lost.clear()
            cell.kicks = 0
            cell.needs_plan = False
            self._replan_cell(cell, leavers)
            if self.error:
                return
            self._set_spares_needed(max(0, sum(len(c.lost) for c in self.cells.values()) - len(spares)))
            if self.global_generations:  # the comparison design: everyone starts a new generation
                for other in self.cells.values():
                    if other is not cell and not other.lost:
                        self._replan_cell(other, why="global generation")
                if self.stage_groups:
                    for s in range(self.S):
                        self._publish_stage(s)

    def _replan_cell(self, cell: Cell, leavers: Optional[List[str]] = None, why: str = "") -> None:
        """Publish the cell's next generation. Every slot whose holder does not yet hold its state
        (lost now, or rebuilt in an earlier generation that never completed) is planned again from
        what is alive now: a slot is never left training from its initial weights."""
        if cell.rebuilding:
            gone = {s for c in self.cells.values() for s in list(c.lost) + list(c.rebuilding)}
            unsettled = {slot for slot, step in self.unsettled.items() if self.committed[slot[0]] < step}
            handed = {s for s, v in cell.rebuilding.items() if v["handed_off"] and v["leaver"] in (leavers or [])}
            try:
                plans = plan_rebuilds(sorted(gone), self.R, self.S, self.strategy, handed_off=handed,
                                      diloco=self.diloco, have_checkpoint=self.latest_checkpoint is not None,
                                      unsettled=unsettled, targets=sorted(cell.rebuilding))
            except Unrecoverable as e:
                self.error = str(e)
                log.error("cannot recover: %s", e)
                return
            if any(p.tier == "checkpoint" for p in plans.values()):
                self._global_rollback()
                return
        else:
            plans = {}
        rebuild = {}
        for slot, plan in plans.items():
            info = cell.rebuilding[slot]
            entry = dict(plan.to_json(), detected_at=info["detected_at"], failed_at=info["failed_at"],
                         step=self.committed[slot[0]] + 1, leaver=info["leaver"] if plan.tier == "handoff" else None)
            if plan.tier == "peer":
                donor = self.slots[plan.sources[0]]
                entry.update(donor=donor, xfer=f"xfer/{self.boot}/{cell.index}/{cell.gen + 1}/{slot[1]}")
                P.append(self.store, f"mail/{donor}", {"kind": "donate", "xfer": entry["xfer"],
                                                       "target": self.slots[slot], "slot": list(slot),
                                                       "source": list(plan.sources[0]), "gen": cell.gen + 1},
                         auth=self.auth)
            if plan.tier not in ("handoff", "peer"):
                self.unsettled[slot] = self.committed[slot[0]] + 1
            rebuild[P.slot_key(slot)] = entry
        self._publish_cell(cell, rebuild, [w for w in (leavers or []) if any(
            e.get("leaver") == w for e in rebuild.values())])
        if why:
            self._event({"kind": "replan", "cell": cell.index, "gen": cell.gen, "why": why})

    def _initial_placement(self, spares: List[WorkerInfo]) -> None:
        if len(spares) < self.R * self.S:
            return
        # Place over the whole starting fleet: wait for the expected spares too (briefly), or the
        # first R x S joiners, whatever machines they happen to be on, would decide the layout.
        expected = self.R * self.S + int(self.job["faults"].get("spares", 0))
        if self._full_since is None:
            self._full_since = time.monotonic()
        if len(spares) < expected and time.monotonic() - self._full_since < 3.0:
            return
        slots = [(r, s) for r in range(self.R) for s in range(self.S)]
        where = place(slots, self._pool_sizes(spares), self.S)
        pool = self._pool(spares)
        for slot in slots:
            self._assign(slot, pool[where[slot]].pop(0))
        report = recoverability_report(where, self.R, self.S, self.diloco, self.strategy,
                                       have_checkpoint=bool(self.job["recovery"].get("checkpoint_every"))
                                       or self.strategy == "checkpoint")
        log.info("placement: %s", report.summary)
        for entry in report.machines:
            log.info("  %s", entry["line"])
        self._event({"kind": "placement", "summary": report.summary,
                     "machines": {str(e["machine"]): e["verdict"] for e in report.machines}})
        rollback, rebuild_at_resume = None, {}
        if self.resume_from is not None:
            rollback = {str(r): k for r, k in self.resume_from.items()}
            missing = sorted((r, s) for r, stages in self.resume_missing.items() for s in stages)
            if missing:  # slots lost before a suspend: rebuilt from the restored ones
                try:
                    plans = plan_rebuilds(missing, self.R, self.S, self.strategy, diloco=self.diloco)
                except Unrecoverable as e:
                    self.error = f"resume: {e}"
                    return
                for slot, p in plans.items():
                    entry = dict(p.to_json(), detected_at=time.time(), failed_at=time.time(),
                                 step=self.resume_from[slot[0]] + 1, leaver=None)
                    if p.tier == "peer":
                        entry.update(donor=self.slots[p.sources[0]],
                                     xfer=f"xfer/{self.boot}/resume/{slot[0]}/{slot[1]}")
                        P.append(self.store, f"mail/{entry['donor']}",
                                 {"kind": "donate", "xfer": entry["xfer"], "target": self.slots[slot],
                                  "slot": list(slot), "source": list(p.sources[0])}, auth=self.auth)
                    rebuild_at_resume[P.slot_key(slot)] = entry
            for r, k in self.resume_from.items():
                self.totals.pop(r, None)
                P.put_json(self.store, f"committed/{r}", {"step": k, "total": None}, auth=self.auth)
        for slot in slots:
            self.ready[slot] = P.slot_key(slot) not in rebuild_at_resume
            if not self.ready[slot]:
                e = rebuild_at_resume[P.slot_key(slot)]
                self.cells[self.cell_of[slot[0]]].rebuilding[slot] = {
                    "detected_at": e["detected_at"], "detected_mono": time.monotonic(), "failed_at": e["failed_at"],
                    "handed_off": False, "leaver": None, "why": "lost before the suspend", "step": e["step"]}
        for cell in self.cells.values():
            rb = {k: v for k, v in rebuild_at_resume.items() if P.parse_slot_key(k)[0] in cell.replicas}
            self._publish_cell(cell, rb, [], rollback=rollback)
        if self.stage_groups:
            for s in range(self.S):
                self._publish_stage(s)
        self.started = True
        P.put_json(self.store, "started", True, auth=self.auth)

    def _global_rollback(self, diverged: Optional[dict] = None) -> None:
        """The checkpoint tier: every slot of every replica restores the last complete checkpoint,
        once every lost slot has a holder (until then the cells wait for spares)."""
        if any(c.lost for c in self.cells.values()):
            for c in self.cells.values():
                c.needs_plan = bool(c.rebuilding)
            return
        k = self.latest_checkpoint
        discarded = {}
        for r in range(self.R):
            # The steps after the checkpoint are undone: training them again is no second commit.
            discarded[str(r)] = sorted(x for x in self.recorded[r] if x > k)
            self.recorded[r] = {x for x in self.recorded[r] if x <= k}
            self.held = {key: v for key, v in self.held.items() if key[0] != r or key[1] <= k}
            self.committed[r] = k
            self.totals.pop(r, None)
            P.put_json(self.store, f"committed/{r}", {"step": k, "total": None}, auth=self.auth)
        self._event({"kind": "rollback", "step": k, "discarded": discarded})
        for cell in self.cells.values():
            rebuild = {P.slot_key(slot): {"tier": "checkpoint", "sources": [], "detected_at": v["detected_at"],
                                          "failed_at": v["failed_at"], "step": k + 1, "leaver": None}
                       for slot, v in cell.rebuilding.items()}
            cell.needs_plan = False
            self._publish_cell(cell, rebuild, [], rollback=k, diverged=diverged)
        if self.stage_groups:
            for s in range(self.S):
                self._publish_stage(s)

    def _wait_for_spares(self, cell: Cell, lost: List[Slot], free: int) -> None:
        now = time.monotonic()
        if cell.waiting_since is None:
            cell.waiting_since = now
        new = [s for s in lost if s not in self._waiting_logged]
        if new:
            self._waiting_logged.update(new)
            where = self.job["recovery"].get("coordinator") or "<this host>:<port>"
            log.warning("slots %s wait for a worker (%d free spare(s), %d needed); add one with "
                        "`KINTSUGI_TOKEN=... kintsugi join --coordinator %s`; the job suspends after %.0fs "
                        "without one (recovery.spare_wait_s)", [list(s) for s in lost], free, len(lost), where,
                        self.spare_wait)
            self._event({"kind": "waiting_for_spares", "slots": [list(s) for s in lost], "free": free})
        if now - cell.waiting_since > self.spare_wait:
            self._suspend(f"no spare for slots {[list(s) for s in lost]} within recovery.spare_wait_s="
                          f"{self.spare_wait:.0f}s", lost=[s for c in self.cells.values() for s in c.lost])

    def _set_spares_needed(self, n: int) -> None:
        if n != self.spares_needed:
            self.spares_needed = n
            self._put_counters()
            self._dirty = True

    def _stage_holders(self, s: int) -> List[Tuple[int, str]]:
        """Stage s's group: the holders of replicas whose pipeline is whole (no slot lost or still
        being rebuilt) and who hold their state. A replica that is down cannot reach its next sync,
        so it is left out while it is down and comes back through the handshake."""
        out = []
        for r in range(self.R):
            cell = self.cells[self.cell_of[r]]
            if cell.lost or cell.rebuilding or (r, s) not in self.slots or not self.ready.get((r, s)):
                continue
            out.append((r, self.slots[(r, s)]))
        return out

    def _maybe_stage_groups(self) -> None:
        """Stage groups follow the replicas that are whole: out when one goes down, back when rebuilt."""
        if not self.stage_groups or not self.started:
            return
        for s in range(self.S):
            if {w for _, w in self._stage_holders(s)} != set(self.stage_members[s]):
                self._publish_stage(s)

    # --- the end ----------------------------------------------------------------------------------
    def on_sigterm(self, *_):
        """A scheduler's SIGTERM (a time limit, scancel) usually reaches the workers too: keep serving
        a few seconds so they can announce leaving and the job suspends (exit 75); otherwise 143."""
        if self.terminating is None:
            self.terminating = time.monotonic()
            log.warning("SIGTERM: waiting up to %.0fs for the workers to suspend", TERM_GRACE_S)

    def finished(self) -> bool:
        """Every step committed and the final evaluation in; then a moment (END_GRACE_S at most)
        for every slot holder's end marker, which follows its final byte counts."""
        if not (all(k >= self.max_steps - 1 for k in self.committed.values()) and self.final_val is not None):
            return False
        now = time.monotonic()
        self._finished_at = getattr(self, "_finished_at", None) or now
        if now - self._finished_at > END_GRACE_S:
            return True
        try:
            return self.store.check([f"end/{wid}" for wid in set(self.slots.values())])
        except RuntimeError:
            return True

    def serve(self, poll_s: float = 0.01) -> int:
        clean = False
        try:
            while True:
                if self.corpus is None and self.store.check(["corpus"]):  # a launcher put it: keep it
                    self.corpus = P.get_json_or(self.store, "corpus", auth=self.auth)
                    self._dirty = True
                self._drain_logs()
                self._release_held()
                if self.started and self.suspend_gen is None:
                    self._check_heartbeats()
                    self._watchdog()
                self._maybe_suspend()
                self._maybe_publish()
                self._maybe_stage_groups()
                self._maybe_rebalance()
                self._persist()
                self._alive()
                if self.error or self.finished() or self._suspend_done():
                    break
                if self.terminating and self.suspend_gen is None and \
                        time.monotonic() - self.terminating > TERM_GRACE_S:
                    self.error = "terminated by SIGTERM"
                    self.exit_code = 128 + signal.SIGTERM
                    break
                time.sleep(poll_s)
            clean = True
        finally:
            self._finish_run(clean)
        if self.error:
            print(f"kintsugi: run stopped: {self.error}", file=sys.stderr)
            return self.exit_code
        if self.suspend_gen is not None:
            print(f"kintsugi: job suspended at step(s) {sorted(set(self.suspended.values()))}"
                  + (f" (slots {[list(s) for s in self.suspend_lost]} were lost and are rebuilt on resume)"
                     if self.suspend_lost else "")
                  + f"; continue with train.resume={os.path.abspath(self.run_dir)}", file=sys.stderr)
            return EX_SUSPENDED
        lost = [f"{name}: {err}" for name, err in (("metrics.jsonl", getattr(self, "_write_error", None)),
                                                    (STATE_FILE, getattr(self, "_persist_error", None))) if err]
        lost += self.final_errors
        if lost:
            print(f"kintsugi: training finished, but its record is incomplete ({'; '.join(lost)}); "
                  "free space in the run directory -- the final weights and summary.json say what was kept",
                  file=sys.stderr)
            return EX_RECORD
        return 0

    def _finish_run(self, clean: bool) -> None:
        if not clean and self.error is None:
            self.error = "the coordinator failed; see its log"
        try:
            P.put_json(self.store, "shutdown", {"reason": self.error or "ok"}, auth=self.auth)
            self.store.add("version", 1)
        except RuntimeError:
            pass
        self._release_held(all_=True)
        self.final_errors = []  # final weights a stage could not write (disk full)
        for s in range(self.S):
            try:
                err = P.get_json_or(self.store, f"final_error/{s}", None, auth=self.auth)
            except (RuntimeError, ValueError):
                err = None
            if err:
                self.final_errors.append(str(err))
        self._dirty = True
        self._persist()
        state = {"final_val_loss": self.final_val, "committed": self.committed, "rebuilds": self.rebuilds,
                 "failures": self.failures, "bytes": self._bytes(), "tokens": self.tokens,
                 "wall_s": time.time() - self.t0, "generations": self.publications, "error": self.error,
                 "stage_generations": {str(s): g + 1 for s, g in self.stage_gen.items()} if self.stage_groups else None,
                 "coordinator_incarnations": self.incarnation,
                 "layout": self.layout, "layout_version": self.layout_version,
                 "suspended": ({P.slot_key(s): k for s, k in sorted(self.suspended.items())}
                               if self.suspend_gen is not None else None),
                 "suspend_lost": [list(s) for s in self.suspend_lost] or None,
                 "write_error": getattr(self, "_write_error", None),
                 "persist_error": getattr(self, "_persist_error", None),
                 "final_errors": self.final_errors or None,
                 "checkpoint_errors": self.checkpoint_errors or None,
                 "refused_joins": self.refused_joins, "forged_records_dropped": self.auth.dropped_count,
                 "nonfinite_steps": self.nonfinite_steps, "divergences": self.divergences,
                 "memory": {"peak_bytes": {str(s): v for s, v in sorted(self.peak_bytes.items())}}}
        if self.tracker is not None:
            try:
                self.tracker.finish(state)
                state["wandb_live"] = True
            except Exception as e:  # noqa: BLE001 - tracking must not hide the run's own outcome
                log.warning("wandb finish failed: %s", e)
        try:  # whole or not at all: a full disk must not leave a truncated record to be read as one
            write_strict_atomic(os.path.join(self.run_dir, "coordinator_state.json"), state, indent=1)
        except OSError as e:
            log.error("cannot write coordinator_state.json: %s", e)
        if self.bar is not None:
            self.bar.close()
        try:
            self.metrics_f.close()
        except OSError:
            pass
        time.sleep(1.0)  # let workers read `shutdown` before the store goes away
