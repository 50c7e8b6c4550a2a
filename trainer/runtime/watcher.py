"""A worker's watcher thread: heartbeat, publications, abort flags, mail, reconnection.

It beats the heartbeat (a sealed counter plus the worker's status), follows the coordinator's
publications (its only steady cost is one read of `version` every few tens of milliseconds), raises
the abort flags when the worker's cell moves to a newer generation or the run stops or suspends,
passes the stage group's newest plan to the worker's `StageLink`, takes mail (peer snapshot
requests, injected faults), and reconnects when the coordinator is away. A coordinator that stays
away beyond `recovery.coordinator_wait_s` sets `store_lost`: the worker saves and exits 75.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

import torch

from kintsugi.parallel.stage_link import StageGroupPlan
from kintsugi.recovery import control as C
from kintsugi.recovery import protocol as P
from kintsugi.recovery.plan import CellPlan, DonateRequest, PlanError, SuspendPlan, mail_kind


log = logging.getLogger("kintsugi.worker")


def peak_memory_bytes() -> int:
    """This process's peak memory: the CUDA allocator's peak on a GPU stage, else the peak resident
    set size (Linux reports ru_maxrss in KiB)."""
    import resource
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Watcher(threading.Thread):
    def __init__(self, worker):
        """`worker`: the trainer.runtime.worker.Worker this thread watches for."""
        super().__init__(daemon=True, name="kintsugi-watcher")
        self.w = worker
        self.control: C.Control = worker.bg  # its own connection: the training thread never delays a beat
        self.interval = worker.job.recovery.heartbeat_interval_s
        self.coordinator_wait_s = worker.job.recovery.coordinator_wait_s
        self.cell_abort = threading.Event()   # the cell's generation moved on (or the run stops)
        self.stop = threading.Event()         # the run ends or suspends: abort everything
        self.shutdown = threading.Event()
        self.store_lost = threading.Event()
        self.suspend_plan: Optional[SuspendPlan] = None
        self.working_cell: Optional[int] = None
        self.working_gen = -1
        self.phase = "starting"  # "spare" once the worker has warmed up and waits for a plan
        self._version = -1
        self._n = 0
        self._mail: Optional[P.LogReader] = None
        self._intent_sent = False
        self._last_beat = 0.0
        self._last_resend = 0.0
        self.rebuilt_slots = 0  # how many slots the run has rebuilt so far (torchrun's exit barrier)

    def begin(self, cell: int, gen: int) -> None:
        """The training thread starts working in `gen` of `cell`."""
        self.working_cell, self.working_gen = cell, gen
        self.cell_abort.clear()
        if self.stop.is_set():
            self.cell_abort.set()
        self._version = -1  # re-read the cell's plan: it may have moved on already

    def _stop_everything(self) -> None:
        self.stop.set()
        self.cell_abort.set()

    def run(self) -> None:
        train_conn = self.w.control
        while not self.shutdown.is_set():
            if not self.control.away:
                train_conn.catch_up(self.control)  # the training thread's own connection
            if self.control.away:
                ended = self.control.locate.ended() if self.control.locate is not None else None
                if ended is not None and not self.control.locate.current():
                    # recovery.control=etcd: the run ended while this worker was away from its
                    # store (the leader closed it first); nobody will lead it again.
                    log.warning("the run ended (%s, recorded in etcd) while the coordinator was away; stopping",
                                ended)
                    self.shutdown.set()
                    self._stop_everything()
                    return
                if not self.control.reconnect():
                    if time.monotonic() - self.control.away_since > self.coordinator_wait_s:
                        log.error("the coordinator has been away for %.0fs (recovery.coordinator_wait_s); stopping",
                                  self.coordinator_wait_s)
                        self.store_lost.set()
                        self._stop_everything()
                        return
                    time.sleep(0.5)
                    continue
                train_conn.reconnect()
                self._version = -1
            try:
                now = time.monotonic()
                if now - self._last_beat >= self.interval:
                    self._beat()
                    self._poll_mail()
                    self._last_beat = now
                if now - self._last_resend >= 1.0:
                    self._last_resend = now
                    self._resend()
                v = int(self.control.call(lambda s: s.add("version", 0)))
                if v != self._version:
                    self._version = v
                    self._refresh()
            except C.CoordinatorAway:
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
        self.control.put_json(P.beat_key(self.control.auth, w.wid), status)
        self.control.put_json(f"bytes/{w.wid}", w.counter.as_dict())
        if w.leaving.is_set() and not self._intent_sent:
            self.control.append("intent", {"wid": w.wid})
            self._intent_sent = True

    def _resend(self) -> None:
        """Commits this stage applied that the coordinator has not recorded are sent again: by the
        replica's root after 2 s, by its other stages after 5 s (their root may be gone)."""
        slot = self.w.slot
        if slot is not None and self.w.state is not None:
            self.w.commit.resend_unrecorded(self.control, slot[0], min_age_s=2.0 if slot[1] == 0 else 5.0)

    def _refresh(self) -> None:
        c, w = self.control, self.w
        self.rebuilt_slots = (c.get_json_or("counters") or {}).get("rebuilt_slots", self.rebuilt_slots)
        if c.get_json_or("shutdown") is not None:
            self.shutdown.set()
            self._stop_everything()
            return
        if self.suspend_plan is None:
            raw = c.get_json_or("suspend")
            self.suspend_plan = SuspendPlan.from_json(raw) if raw is not None else None
        if self.suspend_plan is not None and not self.stop.is_set():
            self._stop_everything()
        if self.working_cell is not None:
            raw = c.get_json_or(f"cell/{self.working_cell}")
            if raw is not None and CellPlan.from_json(raw).gen > self.working_gen >= 0:
                self.cell_abort.set()
        link = w.link
        if link is not None:
            raw = c.get_json_or(f"stage/{link.stage}")
            if raw is not None:
                link.update(StageGroupPlan.from_json(raw))
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
            kind = mail_kind(req)
            try:
                if kind == DonateRequest.KIND:
                    w.donor.request(DonateRequest.from_json(req))
                elif kind == "poison":  # faults kind poison tied to a rebuild (from the launcher)
                    w.poison.set()
                elif kind == "crash_in_commit":  # faults kind crash_in_commit tied to a rebuild
                    w.commit.crash_in_commit.set()
            except PlanError as e:
                log.warning("dropped a malformed %s request: %s", kind, e)
