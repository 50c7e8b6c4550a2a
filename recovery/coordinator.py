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
(`trainer.coordinator_main`), which also feeds wandb through the `tracker` hooks.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from . import protocol as P
from .auth import Auth, Forged
from .placement import place, rebalance_layout, recoverability_report
from .records import dumps_strict
from .tiers import Unrecoverable, plan_rebuilds

log = logging.getLogger(__name__)
Slot = Tuple[int, int]
EX_SUSPENDED = 75  # EX_TEMPFAIL: the job saved its state and stopped; resume it (a batch script requeues)
EX_RECORD = 74  # EX_IOERR: training finished, but its record could not be written whole (disk full)
TERM_GRACE_S = 5.0  # after a SIGTERM, how long to wait for the workers' leave notices
END_GRACE_S = 3.0  # after the last step and the final evaluation, wait at most this for end markers
HOLD_RELAYED_S = 1.0  # how long a relayed replay waits for its root's own copy
STATE_FILE = "control_state.json"
LOGS = ("join", "rejoin", "suspect", "leave", "intent", "commit", "eval", "event", "ckpt", "suspended", "ready",
        "fault", "died")


@dataclass
class WorkerInfo:
    wid: str
    pid: int
    host: str
    machine: str
    hb: int = -1
    hb_changed: float = field(default_factory=time.monotonic)
    state: str = "spare"          # spare | active | dead | left
    slot: Optional[Slot] = None
    leaving: bool = False         # announced a notice (SIGTERM / Slurm warning / spot notice)
    status: dict = field(default_factory=dict)  # the worker's last heartbeat record


@dataclass
class Cell:
    index: int
    replicas: List[int]
    gen: int = -1
    plan: Optional[dict] = None
    lost: Dict[Slot, dict] = field(default_factory=dict)   # slots without a holder
    rebuilding: Dict[Slot, dict] = field(default_factory=dict)  # holder assigned, state not yet there
    since: float = field(default_factory=time.monotonic)   # last commit or publication
    waiting_since: Optional[float] = None                  # lost slots waiting for spares
    kicks: int = 0
    diverging: bool = False
    needs_plan: bool = False                               # a re-plan that had to wait (a rollback)


class Coordinator:
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
        from parallel.topology import per_stage_layers
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

    def _watchdog(self) -> None:
        """No commit and no plan change for progress_timeout_s: replace whoever never reached the
        cell's newest generation, or re-plan the cell as it is. Never an endless wait."""
        now = time.monotonic()
        for cell in self.cells.values():
            if cell.lost or cell.plan is None or now - cell.since < self.progress_timeout:
                continue
            done = all(self.committed[r] >= self.max_steps - 1 for r in cell.replicas)
            if done and (self.final_val is not None or 0 not in cell.replicas):
                continue
            stuck = [wid for wid in cell.plan["slots"].values()
                     if self.workers[wid].status.get("cell_gen", -1) < cell.gen]
            if stuck and cell.kicks == 0:
                for wid in stuck:
                    self._declare_dead(wid, f"never reached cell {cell.index} generation {cell.gen} within "
                                            f"recovery.progress_timeout_s={self.progress_timeout:.0f}s")
                cell.kicks += 1
                continue
            if cell.kicks >= 3:
                self.error = (f"cell {cell.index} made no progress for {3 * self.progress_timeout:.0f}s through "
                              "3 re-plans; see the workers' logs")
                return
            cell.kicks += 1
            log.warning("cell %d: no progress for %.0fs; re-planning it", cell.index, now - cell.since)
            self._replan_cell(cell, why="no progress")

    def _on_fault(self, f: dict) -> None:
        """A worker could not form a group or its generation failed: re-plan what it reports."""
        scope, gen = f.get("scope"), int(f.get("gen", -1))
        if scope == "cell":
            cell = self.cells.get(int(f.get("cell", -1)))
            if cell is None or gen != cell.gen:
                return
            missing = [w for w in f.get("missing_wids", []) if w in self.workers]
            for wid in missing:
                self._declare_dead(wid, f"never arrived to form cell {cell.index} generation {gen}")
            if not missing and not cell.lost:
                log.warning("cell %d generation %d failed on %s (%s); re-planning", cell.index, gen, f.get("wid"),
                            str(f.get("error", ""))[:120])
                self._replan_cell(cell, why=f"generation failed on {f.get('wid')}")
        elif scope == "checkpoint":
            self._on_corrupt_checkpoint(f)
        elif scope == "diverged":
            self._on_diverged(f)
        elif scope == "stage" and self.stage_groups:
            s = int(f["stage"])
            if gen == self.stage_gen.get(s, -2):
                log.warning("stage %d generation %d failed on %s (%s); publishing the next", s, gen, f.get("wid"),
                            str(f.get("error", ""))[:120])
                self._publish_stage(s)
        elif scope == "xfer":
            slot = tuple(f.get("slot", ()))
            cell = self.cells.get(self.cell_of.get(slot[0], -1)) if slot else None
            wid = f.get("wid")
            if cell is not None and gen == cell.gen and self.slots.get(slot) == wid:
                # The target never got its state: the slot is lost again (never trained from scratch).
                log.warning("slot %s never received its state (%s); re-planning it", list(slot),
                            str(f.get("error", ""))[:120])
                self._declare_dead(wid, "rebuild never received its state")

    def _on_diverged(self, f: dict) -> None:
        """train.max_nonfinite steps of a replica in a row were skipped. Roll it back with half the
        learning rate: under Streaming DiLoCo to its outer global copy (its own cell only), else
        every slot to the last checkpoint; without either, or after 3 divergences, stop saying so."""
        cell = self.cells.get(int(f.get("cell", -1)))
        if cell is None or int(f.get("gen", -1)) != cell.gen or cell.diverging:
            return
        self.divergences += 1
        r, step, count = f.get("replica"), f.get("step"), f.get("count")
        self._event({"kind": "diverged", "replica": r, "step": step, "count": count})
        if self.divergences > 3:
            self.error = (f"training diverged again (replica {r}: {count} non-finite steps in a row up to step "
                          f"{step}, divergence {self.divergences}); lower train.lr or raise train.warmup_steps")
            return
        fix = {"id": f"{self.boot}/{self.divergences}", "lr_factor": 0.5}
        if self.stage_groups:
            fix["reset_to_global"] = True
            log.warning("replica %s diverged (%s non-finite steps in a row up to step %s): it restarts from its "
                        "outer global copy with half the learning rate", r, count, step)
            cell.diverging = True
            self._publish_cell(cell, {}, [], diverged=fix)
            cell.diverging = False
            return
        good = [k for k, n in self.ckpt_counts.items() if n >= self.R * self.S and k not in self.bad_checkpoints]
        if not good:
            self.error = (f"training diverged: replica {r} had {count} non-finite losses or gradient norms in a row "
                          f"up to step {step} and there is no checkpoint to roll back to; lower train.lr, raise "
                          "train.warmup_steps, or set recovery.checkpoint_every to roll back instead")
            return
        self.latest_checkpoint = max(good)
        log.warning("replica %s diverged (%s non-finite steps in a row up to step %s): every slot rolls back to "
                    "step %d with half the learning rate", r, count, step, self.latest_checkpoint)
        self._global_rollback(diverged=fix)

    def _on_corrupt_checkpoint(self, f: dict) -> None:
        """A slot could not restore its checkpoint (a file fails its manifest). The exact state it
        was meant to restore is never replaced by a guess: roll every slot back to the newest step
        that is complete and not known bad, or stop saying why."""
        step = f.get("step")
        if step is None or step in self.bad_checkpoints:
            return
        self.bad_checkpoints.add(int(step))
        log.error("checkpoint of step %s is corrupt (%s: %s)", step, f.get("file"), f.get("reason"))
        self._event({"kind": "checkpoint_corrupt", "step": step, "slot": f.get("slot"), "file": f.get("file"),
                     "reason": f.get("reason")})
        good = [k for k, n in self.ckpt_counts.items() if n >= self.R * self.S and k not in self.bad_checkpoints]
        if not good:
            self.error = (f"the checkpoint of step {step} is corrupt ({f.get('file')}: {f.get('reason')}) and no "
                          "earlier complete checkpoint exists; the exact state cannot be restored")
            return
        self.latest_checkpoint = max(good)
        log.warning("rolling every slot back to step %d instead", self.latest_checkpoint)
        self._global_rollback()

    def _maybe_suspend(self) -> None:
        """Every slot's holder is leaving (Slurm's warning reaches every task; a whole fleet gets its
        notice) and no spare is free: no handoff can happen, so ask each holder to save its exact
        state as a checkpoint and stop. The job exits with EX_TEMPFAIL (75)."""
        if not self.started or self.suspend_gen is not None:
            return
        holders: Dict[Slot, str] = dict(self.slots)
        for cell in self.cells.values():
            for slot, v in cell.lost.items():
                if not v["handed_off"]:
                    return  # a dead slot: the ordinary rebuild path decides
                holders[slot] = v["leaver"]
        if len(holders) < self.R * self.S or not all(self.workers[w].leaving for w in holders.values()):
            return
        if any(w.state == "spare" and not w.leaving for w in self.workers.values()):
            return  # someone can still take a handoff
        self._suspend("every worker is leaving and no spare is free", holders=holders)

    def _suspend(self, why: str, holders: Optional[Dict[Slot, str]] = None, lost: Optional[List[Slot]] = None) -> None:
        holders = dict(self.slots) if holders is None else holders
        if self.layout != self.config_layout:
            os.makedirs(os.path.join(self.run_dir, "checkpoints"), exist_ok=True)
            with open(os.path.join(self.run_dir, "checkpoints", "layout.json"), "w") as f:
                json.dump({"layers_per_stage": self.layout}, f)
        self.suspend_lost = sorted(lost or [])
        P.put_json(self.store, "suspend", {"holders": {P.slot_key(k): v for k, v in holders.items()},
                                           "lost": [list(s) for s in self.suspend_lost]}, auth=self.auth)
        self.suspend_holders = holders
        self.suspend_gen = self.publications
        self._bump()
        self.suspend_deadline = time.monotonic() + max(60.0, 4 * self.hb_timeout)
        log.warning("suspending the job: %s (each slot saves its committed state; continue with train.resume=%s)",
                    why, os.path.abspath(self.run_dir))
        self._event({"kind": "suspend", "why": why, "committed": dict(self.committed),
                     "lost": [list(s) for s in self.suspend_lost]})

    def _maybe_rebalance(self) -> None:
        """Every `rebalance_every` measured steps: if moving layers off the slowest stage predicts a
        step at least `rebalance_min_gain` shorter, publish a new generation of every cell and stage
        group with the new layout (the stages hand layers to each other exactly)."""
        if not self.rebalance or not self.started or self.suspend_gen is not None:
            return
        if any(c.lost or c.rebuilding for c in self.cells.values()):
            return
        warm = 2 * self.R  # the first steps under a new layout build caches; skip them
        if len(self.stage_times) < warm + self.rebalance_every:
            return
        if max(self.committed.values()) >= self.max_steps - 2:
            return
        rows = self.stage_times[warm:]
        mean = [sum(r[s] for r in rows) / len(rows) for s in range(self.S)]
        self.stage_times = []
        counts, predicted = rebalance_layout(self.layout, mean)
        gain = max(mean) / max(predicted, 1e-12) - 1.0
        if counts == self.layout or gain < self.rebalance_min_gain:
            return
        prev, self.layout = self.layout, counts
        self.layout_version += 1
        log.warning("rebalancing: stage compute %s s -> layers per stage %s -> %s (predicted step %.0f%% faster)",
                    [round(t, 4) for t in mean], prev, counts, 100 * gain)
        self._event({"kind": "rebalance", "from": prev, "to": counts, "stage_compute_s": mean,
                     "predicted_gain": gain})
        for cell in self.cells.values():
            self._publish_cell(cell, {}, [], prev_layout=prev)
        if self.stage_groups:
            for s in range(self.S):
                self._publish_stage(s)

    def _suspend_done(self) -> bool:
        if self.suspend_gen is None:
            return False
        expected = set(self.suspend_holders)
        if expected <= set(self.suspended):
            return True
        if time.monotonic() > self.suspend_deadline:
            missing = sorted(expected - set(self.suspended))
            self.error = f"suspend incomplete: slots {missing} did not save; resume falls back to an older checkpoint"
            return True
        return False

    @staticmethod
    def _pool(spares: List[WorkerInfo]) -> Dict[str, List[WorkerInfo]]:
        pool: Dict[str, List[WorkerInfo]] = {}
        for w in spares:
            pool.setdefault(w.machine, []).append(w)
        return pool

    def _pool_sizes(self, spares: List[WorkerInfo]) -> Dict[str, int]:
        return {m: len(ws) for m, ws in self._pool(spares).items()}

    def _assign(self, slot: Slot, w: WorkerInfo) -> None:
        w.state, w.slot = "active", slot
        self.slots[slot] = w.wid
        self._dirty = True

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
            self.latest_checkpoint = max(self.latest_checkpoint or -1, step)
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

    # --- persistence ------------------------------------------------------------------------------
    def _persist(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        state = {
            "incarnation": self.incarnation, "version": self.version, "started": self.started, "port": self.port,
            "run_id": self.run_id,
            "t0": self.t0, "workers": {w.wid: dict(asdict(w), hb_changed=None, slot=list(w.slot) if w.slot else None)
                                       for w in self.workers.values()},
            "slots": {P.slot_key(k): v for k, v in self.slots.items()},
            "cells": {str(c.index): {"gen": c.gen, "plan": c.plan, "kicks": c.kicks,
                                     "waiting": c.waiting_since is not None,
                                     "lost": {P.slot_key(s): {k: v for k, v in info.items() if k != "detected_mono"}
                                              for s, info in c.lost.items()},
                                     "rebuilding": {P.slot_key(s): {k: v for k, v in info.items()
                                                                    if k != "detected_mono"}
                                                    for s, info in c.rebuilding.items()}}
                      for c in self.cells.values()},
            "stage_gen": self.stage_gen, "stage_members": self.stage_members,
            "ready": {P.slot_key(k): v for k, v in self.ready.items()},
            "unsettled": {P.slot_key(k): v for k, v in self.unsettled.items()},
            "committed": self.committed, "totals": self.totals,
            "layout": self.layout, "layout_version": self.layout_version,
            "rebuilds": self.rebuilds, "failures": self.failures, "publications": self.publications,
            "tokens": self.tokens, "final_val": self.final_val, "ckpt_counts": self.ckpt_counts,
            "latest_checkpoint": self.latest_checkpoint, "spares_needed": self.spares_needed,
            "rebuilt_slots": self.rebuilt_slots, "rebuild_plans": self.rebuild_plans,
            "bytes": self._bytes_cache(), "corpus": self.corpus,
        }
        path = os.path.join(self.run_dir, STATE_FILE)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(dumps_strict(state))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            self._dirty = True
            if not getattr(self, "_persist_error", None):
                self._persist_error = str(e)
                log.error("cannot persist the coordinator state (%s); a restart would lose recent changes", e)

    def _bytes_cache(self) -> Dict[str, int]:
        now = time.monotonic()
        if now - getattr(self, "_bytes_at", 0.0) > 2.0:
            self._bytes_at, self._bytes_val = now, self._bytes()
        return self._bytes_val

    def _load_state(self) -> None:
        path = os.path.join(self.run_dir, STATE_FILE)
        with open(path) as f:
            st = json.load(f)
        self.incarnation, self.version, self.started = st["incarnation"], st["version"], st["started"]
        self.run_id = st.get("run_id")
        self.t0 = st["t0"]
        for wid, w in st["workers"].items():
            info = WorkerInfo(wid, w["pid"], w["host"], w["machine"], state=w["state"],
                              slot=tuple(w["slot"]) if w["slot"] else None, leaving=w["leaving"])
            self.workers[wid] = info
        self.slots = {P.parse_slot_key(k): v for k, v in st["slots"].items()}
        now = time.monotonic()
        for k, c in st["cells"].items():
            cell = self.cells[int(k)]
            cell.gen, cell.plan, cell.kicks = c["gen"], c["plan"], c["kicks"]
            cell.lost = {P.parse_slot_key(s): dict(info, detected_mono=now) for s, info in c["lost"].items()}
            cell.rebuilding = {P.parse_slot_key(s): dict(info, detected_mono=now)
                               for s, info in c.get("rebuilding", {}).items()}
            cell.waiting_since = now if c["waiting"] else None
        self.stage_gen = {int(k): v for k, v in st["stage_gen"].items()}
        self.stage_members = {int(k): v for k, v in st["stage_members"].items()}
        self.ready = {P.parse_slot_key(k): v for k, v in st["ready"].items()}
        self.unsettled = {P.parse_slot_key(k): v for k, v in st["unsettled"].items()}
        self.totals = {int(k): v for k, v in st["totals"].items()}
        self.layout, self.layout_version = st["layout"], st["layout_version"]
        self.rebuilds, self.failures, self.publications = st["rebuilds"], st["failures"], st["publications"]
        self.final_val, self.latest_checkpoint = st["final_val"], st["latest_checkpoint"]
        self.ckpt_counts = {int(k): v for k, v in st["ckpt_counts"].items()}
        self.bytes_before = st.get("bytes", {})
        self.rebuilt_slots, self.spares_needed = st.get("rebuilt_slots", 0), st.get("spares_needed", 0)
        self.rebuild_plans = st.get("rebuild_plans", 0)
        self.corpus = self.corpus or st.get("corpus")
        # What was committed is what metrics.jsonl recorded (written before the state file).
        self.tokens = 0
        for rec in _read_jsonl(os.path.join(self.run_dir, "metrics.jsonl")):
            if "replica" in rec and "step" in rec and "val_loss" not in rec and not rec.get("duplicate"):
                r, k = int(rec["replica"]), int(rec["step"])
                if r in self.recorded and k not in self.recorded[r]:
                    self.recorded[r].add(k)
                    self.tokens += int(rec.get("tokens", 0))
                    if k > self.committed[r]:
                        self.committed[r] = k
                        if rec.get("grad_sq") is not None:
                            self.totals[r] = [rec["grad_sq"], rec.get("loss")]
            elif rec.get("final") and "val_loss" in rec:
                self.final_val = rec["val_loss"]

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
        try:
            with open(os.path.join(self.run_dir, "coordinator_state.json"), "w") as f:
                f.write(dumps_strict(state, indent=1))
        except OSError as e:
            log.error("cannot write coordinator_state.json: %s", e)
        if self.bar is not None:
            self.bar.close()
        try:
            self.metrics_f.close()
        except OSError:
            pass
        time.sleep(1.0)  # let workers read `shutdown` before the store goes away


def _read_jsonl(path: str):
    if not os.path.isfile(path):  # absent, or a device / FIFO whose reading may never end
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
