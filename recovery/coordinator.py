"""The coordinator: a process that is not a worker, so no worker's death takes the store down.

It hosts the TCPStore and publishes the generations of every group, each with its own number:

- a *cell* is the set of replicas whose pipelines train as one unit: one replica under Streaming
  DiLoCo (or with a single replica), every replica for plain data-parallel training (their gradients
  meet every step). A failure re-plans its own cell only: the other replicas never abandon a step.
- a *stage group* (Streaming DiLoCo, R > 1) holds one stage of every replica for the outer syncs. A
  lost member leaves it at once (the others keep syncing among themselves) and its replacement
  joins once it holds its state (see parallel.stage_link).

Its parts, by concept: `CoordinatorState` (recovery.control_state: everything it knows, persisted
whole on every change), `Membership` (joins, heartbeats, deaths), the pure `planner` (who takes
which slot, the next plan of a cell, the rebuild tiers), the `Ledger` (metrics.jsonl), and the
`Reactions` to stalls, divergence, corrupt checkpoints, suspends and slow machines. This class owns
the store, the loop, and publishing: every plan goes out through `publish_cell` / `publish_stage`.

Formation is watched: a worker that cannot form a group reports it (`fault`) and the cell is
re-planned, dropping whoever never arrived; a cell that neither commits nor changes for
`recovery.progress_timeout_s` is re-planned too. When the lost slots outnumber the free spares it
says which slots wait and how to add a worker, and after `recovery.spare_wait_s` suspends the job
(exit 75). Started again with `restore=True`, it reads its state back, the workers re-register and
replay what it missed, and the run goes on. All timeouts use the monotonic clock.

Where the state rests is its `state_store` (recovery.state_store). With etcd (recovery.control=etcd,
see recovery.etcd_leader) the store also decides who may act: the coordinator checks `leading()`
before every record it handles and every write it releases, holds its TCPStore writes until the
state that caused them is saved (write-ahead), and once deposed acts no further: `serve()` returns
EX_DEPOSED without ending the run. Its incarnation is at least the election's epoch
(`min_incarnation`), so every leader's is higher than its predecessors'.
"""
from __future__ import annotations

import collections
import logging
import os
import signal
import sys
import time
import uuid
from typing import Dict, List, Optional, Tuple

from kintsugi.parallel.topology import per_stage_layers

from . import protocol as P
from .auth import Auth, seal_run_id, writer_id
from .board import Board
from .control_state import CoordinatorState, Settings
from .ledger import Ledger
from .membership import Membership
from .plan import slot_key
from .generations import Generations
from .reactions import Reactions
from .salvage import Salvage, load_state
from .state_store import Fenced, FileStateStore, StateStore, Unavailable
from .records import write_strict_atomic
from .runfiles import (ALIVE, CONTROL_STATE, EX_CANNOT_RECOVER, EX_DEPOSED, EX_RECORD, EX_RESTART_STORE,
                       EX_SUSPENDED, FINAL_STATE, METRICS)

log = logging.getLogger(__name__)
STATE_FILE = CONTROL_STATE
TERM_GRACE_S = 5.0  # after a SIGTERM, how long to wait for the workers' leave notices
END_GRACE_S = 3.0  # after the last step and the final evaluation, wait at most this for end markers
HOLE_GRACE_S = 15.0  # ... and this long for commit records that went missing (workers resend them)
LOGS = ("join", "rejoin", "suspect", "leave", "intent", "commit", "eval", "event", "ckpt", "suspended", "ready",
        "fault", "died")


def resident_bytes():
    """This process's resident set size now (Linux), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Coordinator:
    def __init__(self, job: dict, run_dir: str, port: int, host: str = "127.0.0.1", token: Optional[str] = None,
                 progress: bool = True, tracker=None, resume_from: Optional[Dict[int, int]] = None,
                 resume_missing: Optional[Dict[int, List[int]]] = None, layout: Optional[List[int]] = None,
                 corpus: Optional[dict] = None, restore: bool = False, state_store: Optional[StateStore] = None,
                 min_incarnation: int = 0):
        if not token:
            raise ValueError("a run always has a token: give the coordinator one (KINTSUGI_TOKEN)")
        self.job, self.run_dir = job, run_dir
        self.settings = s = Settings.from_job(job)
        self.config_layout = [len(x) for x in per_stage_layers(s.n_layers, s.stages, s.layers_per_stage)]
        self.resume_from, self.resume_missing = resume_from, resume_missing or {}
        # The flood guard's baseline, taken before the store listens: a flood that arrives while this
        # process starts (a restart's port answers at once) must not become part of the baseline.
        rss_start = resident_bytes()
        self.store = P.connect(host, port, is_master=True, timeout_s=s.init_timeout_s)
        os.makedirs(run_dir, exist_ok=True)
        self.state_store = state_store or FileStateStore(os.path.join(run_dir, CONTROL_STATE))
        # A state that cannot be read back is not fatal: recovery.salvage suspends the job instead.
        self.st, damaged = load_state(self.state_store, restore,
                                      lambda: CoordinatorState.fresh(s, port, layout or self.config_layout))
        st = self.st
        st.corpus = corpus if corpus is not None else st.corpus
        if resume_from is not None:
            for r, k in resume_from.items():
                st.committed[r] = k
                st.latest_checkpoint = k if len(set(resume_from.values())) == 1 else None
        st.incarnation = max(st.incarnation + 1, min_incarnation)
        self.boot = f"{uuid.uuid4().hex[:8]}-{st.incarnation}"
        st.run_id = st.run_id or uuid.uuid4().hex
        self.auth = Auth(token, st.run_id, self.boot, writer=writer_id("coordinator"))
        self.token = token
        self.board = Board(self.store, self.auth)
        self.error: Optional[str] = None
        self.exit_code = EX_CANNOT_RECOVER  # with an error: 3 = cannot recover, 143 = terminated
        self.terminating: Optional[float] = None
        self.persist_error: Optional[str] = None
        self.deposed: Optional[str] = None  # recovery.control=etcd: why this process no longer leads
        self._save_waiting = False          # the store could not save (etcd without quorum); retrying
        self.final_errors: List[str] = []
        self.missing_steps: Dict[int, List[int]] = {}  # committed, never recorded (the record has a hole)
        self._restart_store = False
        self._tampering_before, self._tampering_saved = dict(st.tampering), dict(st.tampering)
        self._memory_checked, self._flood_logged = 0.0, False
        self._rss_start = rss_start
        self._dirty = True
        self._finished_at: Optional[float] = None
        self._alive_at = 0.0
        # Failures that happen together (one machine, one SIGKILL of a group) are reported within
        # milliseconds of each other; wait this long after the first so they are planned together.
        self.settle_s = max(0.25, 2 * s.heartbeat_interval_s)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=s.max_steps * s.replicas, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 10.0)
        self.membership = Membership(st, s, self.board, self.changed, lambda: self.generations.maybe_stage_groups())
        self.ledger = Ledger(st, s, self.board, run_dir, self.changed, tracker=tracker, bar=bar)
        self.reactions = Reactions(self)
        self.generations = Generations(self)
        if resume_from is not None and not restore:
            self.ledger.resumed(resume_from)
        if restore:
            self.ledger.restore()
            if bar is not None:
                bar.update(sum(len(v) for v in self.ledger.recorded.values()))
        self.tracker = tracker
        self._identity = {"run_id": seal_run_id(token, st.run_id).encode()}
        self.store.set("run_id", self._identity["run_id"])
        self.hello = P.LogReader(self.store, "hello", hole_timeout_s=1.0)
        self._answered: "collections.deque[Tuple[float, str]]" = collections.deque()
        self._identity_checked = 0.0
        self._fill_store()
        if self.state_store.write_ahead:
            self.board.hold_writes()
        self.readers = {name: P.LogReader(self.store, name, auth=self.auth, on_forged=(
            self.membership.on_forged_join if name == "join" else None)) for name in LOGS}
        self.handlers = {"join": self.membership.on_join, "rejoin": self.membership.on_rejoin,
                         "suspect": self.membership.on_suspect, "intent": self.membership.on_intent,
                         "leave": self.membership.on_leave, "died": self.membership.on_died,
                         "ready": self.membership.on_ready, "commit": self.ledger.on_commit,
                         "eval": self.ledger.on_eval, "ckpt": self.ledger.on_ckpt, "event": self.ledger.on_event,
                         "suspended": self.reactions.on_suspended, "fault": self.reactions.on_fault}
        self.salvage = Salvage(self, damaged) if damaged else None
        if restore:
            self.membership.restored()
            log.warning("coordinator restarted (incarnation %d): %d workers known, committed %s; waiting for "
                        "them to re-register", st.incarnation, len(st.workers), st.committed)

    # --- the store ---------------------------------------------------------------------------------------
    def changed(self) -> None:
        self._dirty = True

    def bump(self) -> None:
        self.st.version = self.board.bump()
        self._dirty = True

    def _fill_store(self) -> None:
        """Everything a worker reads: on a restart the store is new and empty."""
        st, b = self.st, self.board
        b.put("job", self.job)
        if st.corpus is not None:
            b.put("corpus", st.corpus)
        b.put("run_dir", os.path.abspath(self.run_dir))
        for r, k in st.committed.items():
            b.put(f"committed/{r}", {"step": k, "total": st.totals.get(r)})
            # Every step up to this one is in metrics.jsonl: workers replay their commit records
            # after it (the store's committed/<r> moves on as soon as a root commits again).
            b.put(f"recorded/{r}", {"step": self.ledger.recorded_prefix(r)})
        for c in st.cells.values():
            if c.plan is not None:
                b.put(f"cell/{c.index}", c.plan.to_json())
        for s in range(self.settings.stages):
            if st.stage_gen[s] >= 0:
                b.put(f"stage/{s}", self.generations.stage_plan(s).to_json())
        for w in st.workers.values():
            b.put(P.beat_key(b.auth, w.wid), {"n": -1})
            if w.slot is not None and w.state == "active":
                b.put(f"role/{w.wid}", {"cell": st.cell_of(w.slot[0]).index})
        b.put("slots", {slot_key(k): v for k, v in st.slots.items()})
        if st.started:
            b.put("started", True)
        if st.final_val is not None:
            b.put(P.FINAL_EVAL_KEY, True)
        self.generations.put_counters()
        self.store.add("version", st.version + 1)

    # --- the loop ------------------------------------------------------------------------------------------
    def on_sigterm(self, *_):
        """A scheduler's SIGTERM (a time limit, scancel) usually reaches the workers too: keep serving
        a few seconds so they can announce leaving and the job suspends (exit 75); otherwise 143."""
        if self.terminating is None:
            self.terminating = time.monotonic()
            log.warning("SIGTERM: waiting up to %.0fs for the workers to suspend", TERM_GRACE_S)

    def finished(self) -> bool:
        """Every step committed and the final evaluation in; then a moment (END_GRACE_S at most)
        for every slot holder's end marker, which follows its final byte counts. A step committed
        but missing from metrics.jsonl (its record lost on the way) is waited for: the workers
        send again what `recorded/<r>` does not cover. After HOLE_GRACE_S the run ends anyway and
        says which steps are missing (exit code 74: the record is not whole)."""
        st = self.st
        if not (all(k >= self.settings.max_steps - 1 for k in st.committed.values()) and st.final_val is not None):
            return False
        now = time.monotonic()
        self._finished_at = self._finished_at or now
        complete = all(self.ledger.recorded_prefix(r) >= self.settings.max_steps - 1 for r in st.committed)
        if not complete:
            if now - self._finished_at <= HOLE_GRACE_S:
                return False
            self.missing_steps = self.ledger.missing_steps(self.settings.max_steps)
            log.error("the record of steps %s never arrived; metrics.jsonl misses them", self.missing_steps)
            return True
        if now - self._finished_at > END_GRACE_S:
            return True
        try:
            return self.store.check([f"end/{wid}" for wid in set(st.slots.values())])
        except RuntimeError:
            return True

    # --- identity -------------------------------------------------------------------------------------
    HELLO_PER_LOOP = 64
    HELLO_KEEP_S = 60.0

    def _answer_hello(self) -> None:
        """The identity challenge: each fresh nonce in the `hello` log gets this incarnation's boot id
        and number, sealed over the nonce (recovery.control.Control.identify). Answers are deleted
        after a minute; at most HELLO_PER_LOOP per loop, so a flood of nonces cannot stall it."""
        now = time.monotonic()
        for rec in self.hello.poll(max_items=self.HELLO_PER_LOOP):
            nonce = rec.get("nonce") if isinstance(rec, dict) else None
            if not (isinstance(nonce, str) and 8 <= len(nonce) <= 64 and nonce.isalnum()):
                continue
            key = f"hello/{nonce}"
            self.store.set(key, self.auth.seal(key, {"boot": self.boot, "incarnation": self.st.incarnation},
                                               with_boot=False))
            self._answered.append((now, key))
        while self._answered and now - self._answered[0][0] > self.HELLO_KEEP_S:
            self.store.delete_key(self._answered.popleft()[1])

    FLOOD_MARGIN_BYTES = 256 << 20
    MAX_STORE_RESTARTS = 5

    def _guard_memory(self) -> bool:
        """The store holds whatever any client on the port writes (TCPStore has no limits): a flood
        of big values grows this process towards an out-of-memory kill. Its resident size is
        watched (twice a second: one read of /proc/self/statm); past twice its size at start, or
        that plus FLOOD_MARGIN_BYTES, the coordinator saves its state and starts again with an
        empty store (the workers reconnect, re-register and replay), at most MAX_STORE_RESTARTS
        times. True: restart now."""
        now = time.monotonic()
        if now - self._memory_checked < 0.5:
            return False
        self._memory_checked = now
        rss = resident_bytes()
        if rss is None or self._rss_start is None:
            return False
        if rss <= max(2 * self._rss_start, self._rss_start + self.FLOOD_MARGIN_BYTES):
            return False
        restarts = self.st.store_restarts
        if restarts >= self.MAX_STORE_RESTARTS:
            if not self._flood_logged:
                self._flood_logged = True
                log.error("the coordinator holds %d MB (%d MB at start): its store is being flooded; it restarted "
                          "%d times already and carries on", rss >> 20, self._rss_start >> 20, restarts)
            return False
        self.st.store_restarts = restarts + 1
        self.auth.drop("flood", f"the store grew this process to {rss >> 20} MB ({self._rss_start >> 20} MB at start)")
        log.error("the coordinator holds %d MB (%d MB at start): someone is flooding its store; saving the state "
                  "and starting again with an empty store (restart %d of %d)", rss >> 20, self._rss_start >> 20,
                  restarts + 1, self.MAX_STORE_RESTARTS)
        return True

    def _guard_identity(self) -> None:
        """The run id is the coordinator's: put it back (and count the tampering) when someone
        without the token overwrote or deleted it. Checked five times a second."""
        now = time.monotonic()
        if now - self._identity_checked < 0.2:
            return
        self._identity_checked = now
        for key, value in self._identity.items():
            current = self.store.get(key) if self.store.check([key]) else None
            if current is None or bytes(current) != value:
                self.store.set(key, value)
                self.auth.drop("overwritten", f"{key} was changed by someone without the token; restored")

    def _drain_logs(self) -> None:
        for name in LOGS:
            for rec in self.readers[name].poll():
                if not self._leads():  # deposed: this record is for the successor (workers replay it)
                    return
                try:
                    self.handlers[name](rec)
                except (KeyError, TypeError, ValueError, AttributeError) as e:
                    log.warning("dropped a malformed %s record (%s): %.200s", name, e, rec)

    def serve(self, poll_s: float = 0.01) -> int:
        st, rx = self.st, self.reactions
        clean = False
        try:
            while True:
                if not self._leads():
                    break
                if st.corpus is None and self.store.check(["corpus"]):  # a launcher put it: keep it
                    st.corpus = self.board.get("corpus")
                    self._dirty = True
                if self._guard_memory():
                    self._restart_store = True
                    break
                self._answer_hello()
                self._guard_identity()
                self._drain_logs()
                if self.salvage is not None:
                    self.salvage.poll()
                self.ledger.release_held()
                if st.started and rx.suspend_gen is None:
                    self.membership.check_heartbeats()
                    rx.watchdog()
                rx.maybe_suspend()
                self.generations.maybe_publish()
                self.generations.track_spares()
                self.generations.maybe_stage_groups()
                rx.maybe_rebalance()
                self._persist()
                self._alive()
                if self.error or self.finished() or rx.suspend_done():
                    break
                if self.terminating and rx.suspend_gen is None and time.monotonic() - self.terminating > TERM_GRACE_S:
                    self.error = "terminated by SIGTERM"
                    self.exit_code = 128 + signal.SIGTERM
                    break
                time.sleep(poll_s)
            clean = True
        finally:
            if self.deposed is not None:  # the run goes on under the successor: no shutdown, no final record
                self.ledger.close()
            elif self._restart_store:
                self._dirty = True
                self._persist(final=True)
                self.ledger.close()
            else:
                self._finish_run(clean)
        if self.deposed is not None:
            return EX_DEPOSED
        return EX_RESTART_STORE if self._restart_store else self._exit_status()

    def _exit_status(self) -> int:
        rx = self.reactions
        if self.error:
            print(f"kintsugi: run stopped: {self.error}", file=sys.stderr)
            return self.exit_code
        if rx.suspend_gen is not None:
            print(f"kintsugi: job suspended at step(s) {sorted(set(rx.suspended.values()))}"
                  + (f" (slots {[list(s) for s in rx.suspend_lost]} were lost and are rebuilt on resume)"
                     if rx.suspend_lost else "")
                  + f"; continue with train.resume={os.path.abspath(self.run_dir)}", file=sys.stderr)
            return EX_SUSPENDED
        lost = [f"{name}: {err}" for name, err in ((METRICS, self.ledger.write_error),
                                                    (STATE_FILE, self.persist_error)) if err]
        lost += self.final_errors
        lost += [f"metrics.jsonl: replica {r} misses steps {v[:20]}" for r, v in self.missing_steps.items()]
        if lost:
            print(f"kintsugi: training finished, but its record is incomplete ({'; '.join(lost)}); "
                  "free space in the run directory -- the final weights and summary.json say what was kept",
                  file=sys.stderr)
            return EX_RECORD
        return 0

    def tampering(self) -> Dict[str, int]:
        """Forged, stale, rewound, overwritten, flood: what every incarnation of this run dropped or
        repaired (the counts survive a restart with the persisted state)."""
        out = dict(self._tampering_before)
        for kind, n in self.auth.dropped_by_kind.items():
            out[kind] = out.get(kind, 0) + n
        return out

    def _leads(self) -> bool:
        if self.deposed is None and not self.state_store.leading():
            self._depose("its etcd lease ran out")
        return self.deposed is None

    def _depose(self, why: str) -> None:
        if self.deposed is None:
            self.deposed = why
            log.error("this coordinator no longer leads the run (%s); it acts no further", why)

    def _persist(self, final: bool = False) -> None:
        """Save the state if it changed and the store says it is due (`final`: now), then release
        the TCPStore writes that waited on it (write-ahead) while this process still leads."""
        store = self.state_store
        self.st.tampering = self.tampering()
        if self.st.tampering != self._tampering_saved:
            self._dirty = True
        if self._dirty:
            built: List[dict] = []

            def state() -> dict:
                if not built:
                    self.ledger.refresh_bytes()
                    built.append(self.st.to_json())
                return built[0]
            if not (final or store.due(state, self.board.holding)):
                return
            self._dirty = False
            try:
                store.save(state())
            except Fenced as e:
                self._depose(str(e))
                return
            except Unavailable as e:  # no quorum: not a deposition (the lease decides); retried
                self._dirty = True
                if not self._save_waiting:
                    log.warning("cannot save the coordinator state (%s); retrying, plans wait", e)
                self._save_waiting = True
                return
            except OSError as e:
                self._dirty = True
                if not self.persist_error:
                    self.persist_error = str(e)
                    log.error("cannot persist the coordinator state (%s); a restart would lose recent changes", e)
            else:
                self._save_waiting = False
                self._tampering_saved = dict(self.st.tampering)
        if self.board.holding and self._leads():
            self.board.release()

    def _alive(self) -> None:
        """Touch RUN_DIR/.coordinator_alive about once a second: a launcher replaces a coordinator
        whose file stops moving (hung, stopped) like one that died."""
        now = time.monotonic()
        if now - self._alive_at < 1.0:
            return
        self._alive_at = now
        path = os.path.join(self.run_dir, ALIVE)
        try:
            with open(path, "a"):
                os.utime(path)
        except OSError:
            pass

    def _finish_run(self, clean: bool) -> None:
        st, rx, led = self.st, self.reactions, self.ledger
        if not clean and self.error is None:
            self.error = "the coordinator failed; see its log"
        try:
            self.board.put("shutdown", {"reason": self.error or "ok"})
            self.store.add("version", 1)
        except RuntimeError:
            pass
        led.release_held(all_=True)
        for s in range(self.settings.stages):  # final weights a stage could not write (disk full)
            try:
                err = self.board.get(f"final_error/{s}")
            except (RuntimeError, ValueError):
                err = None
            if err:
                self.final_errors.append(str(err))
        st.ended = ("suspended" if rx.suspend_gen is not None else f"stopped: {self.error}" if self.error
                    else "finished")
        self._dirty = True
        for _ in range(20):  # etcd may be briefly without quorum: the final save matters (a standby reads it)
            self._persist(final=True)
            if not (self._dirty and self._save_waiting and self._leads()):
                break
            time.sleep(0.25)
        if self.deposed is not None:  # refused at the very end: the successor ends the run
            led.close()
            return
        state = {"final_val_loss": st.final_val, "committed": st.committed, "rebuilds": st.rebuilds,
                 "failures": st.failures, "bytes": led.bytes(), "tokens": st.tokens,
                 "t0": st.t0, "wall_s": time.time() - st.t0, "generations": st.publications, "error": self.error,
                 "stage_generations": ({str(s): g + 1 for s, g in st.stage_gen.items()}
                                       if self.settings.stage_groups else None),
                 "coordinator_incarnations": st.incarnation,
                 "layout": st.layout, "layout_version": st.layout_version,
                 "suspended": ({slot_key(s): k for s, k in sorted(rx.suspended.items())}
                               if rx.suspend_gen is not None else None),
                 "suspend_lost": [list(s) for s in rx.suspend_lost] or None,
                 "write_error": led.write_error, "persist_error": self.persist_error,
                 "final_errors": self.final_errors or None,
                 "checkpoint_errors": led.checkpoint_errors or None,
                 "refused_joins": self.membership.refused_joins,
                 "forged_records_dropped": sum(self.tampering().values()), "tampering": self.tampering(),
                 "missing_steps": {str(r): v for r, v in self.missing_steps.items()} or None,
                 "nonfinite_steps": led.nonfinite_steps, "divergences": rx.divergences,
                 "memory": {"peak_bytes": {str(s): v for s, v in sorted(self.membership.peak_bytes.items())}}}
        if self.tracker is not None:
            try:
                self.tracker.finish(state)
                state["wandb_live"] = True
            except Exception as e:  # noqa: BLE001 - tracking must not hide the run's own outcome
                log.warning("wandb finish failed: %s", e)
        try:  # whole or not at all: a full disk must not leave a truncated record to be read as one
            write_strict_atomic(os.path.join(self.run_dir, FINAL_STATE), state, indent=1)
        except OSError as e:
            log.error("cannot write %s: %s", FINAL_STATE, e)
        if led.bar is not None:
            led.bar.close()
        led.close()
        time.sleep(1.0)  # let workers read `shutdown` before the store goes away
