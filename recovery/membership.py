"""Membership: who the workers are, which slot each holds, and when one is gone.

Workers join with a sealed record (the seal proves the token), beat a sealed heartbeat counter, and
leave by dying (a SIGKILLed peer is reported at once by its neighbours, a hung one stops beating,
the launcher reports an exit) or by announcing it (SIGTERM, Slurm's warning, a spot notice: its
state is handed off). A lost slot goes to its cell's `lost` list with when and why; the coordinator
re-plans the cell once a spare can take it.
"""
from __future__ import annotations

import collections
import json
import logging
import statistics
import time
from typing import Callable, Dict, Optional, Set, Tuple

from . import protocol as P
from .auth import Forged
from .board import Board
from .control_state import CoordinatorState, Settings, WorkerInfo
from .plan import Slot
from .planner import cells_waiting_on, new_loss

log = logging.getLogger(__name__)


class Membership:
    def __init__(self, st: CoordinatorState, settings: Settings, board: Board, changed: Callable[[], None],
                 on_slot_lost: Callable[[], None]):
        """`changed()`: the state changed (persist it); `on_slot_lost()`: a replica is down, so the
        stage groups must leave it out."""
        self.st, self.settings, self.board = st, settings, board
        self.changed, self.on_slot_lost = changed, on_slot_lost
        self.reporters: Dict[Tuple[int, int], Set[str]] = {}  # (cell, gen) -> workers that reported a failure
        self.peak_bytes: Dict[int, int] = {}  # per stage, the largest peak any holder reported
        self.refused_joins = 0
        self._last_refusal = 0.0
        self._refused_ids: Set[str] = set()
        self._last_hb_check: Optional[float] = None
        self._intervals: Dict[str, "collections.deque[float]"] = {}  # recent beat intervals per worker
        self._blind_until = 0.0  # after a stall of the coordinator's own loop: silence not yet counted
        self._rejoined: Set[str] = set()  # re-registered with this incarnation, no beat since
        # A restarted (or newly elected) coordinator: the members it restored, until each one
        # re-registered or died, and the newest step each re-registered one says its replica
        # committed (its replay of what this incarnation missed follows the re-registration).
        self._awaiting: Set[str] = set()
        self._claimed: Dict[str, Tuple[int, int]] = {}  # wid -> (replica, newest committed step it holds)
        self._restored_at: Optional[float] = None

    def restored(self) -> None:
        """This incarnation restored the state of an earlier one: its members trained on meanwhile."""
        self._restored_at = time.monotonic()
        self._awaiting = {w.wid for w in self.st.workers.values() if w.state == "active"}

    def caught_up(self, cell) -> bool:
        """Whether `cell` may be planned now. After a restore the step a plan resumes at comes from
        the committed steps, and those this incarnation missed arrive with the members' replays: a
        plan made before them would have the cell train committed steps again. So a cell waits until
        each of its members re-registered (or died) and the steps they hold were replayed, at most
        3 x recovery.heartbeat_timeout_s (5 s at least) after the restore."""
        if self._restored_at is None:
            return True
        if time.monotonic() - self._restored_at > max(5.0, 3 * self.settings.heartbeat_timeout_s):
            self._restored_at = None
            return True
        members = {self.st.slots.get((r, s)) for r in cell.replicas for s in range(self.settings.stages)}
        if members & self._awaiting:
            return False
        return all(self.st.committed.get(r, -1) >= k for wid, (r, k) in self._claimed.items()
                   if wid in members and r in cell.replicas)

    # --- arriving --------------------------------------------------------------------------------------
    def on_join(self, req: dict) -> None:
        wid = str(req["wid"])
        known = self.st.workers.get(wid)
        if known is not None:
            # The same process asking again: an earlier incarnation took its join (restored from the
            # saved state) but the answer went down with that incarnation's store. Answer it again.
            # Anything else (a worker id used twice) leaves the first one as it is.
            if known.pid == int(req["pid"]) and known.host == str(req["host"]) and known.state in ("spare", "active"):
                self.board.put(f"ack/{wid}", "ok")
            return
        self.st.workers[wid] = WorkerInfo(wid, int(req["pid"]), str(req["host"]), str(req.get("machine", req["host"])))
        self.board.put(P.beat_key(self.board.auth, wid), {"n": -1})
        self.board.put(f"ack/{wid}", "ok")
        self.changed()
        log.info("worker %s joined (pid %s on %s)", wid, req["pid"], req["host"])

    def on_forged_join(self, raw) -> None:
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
            self.board.refuse(claimed)
        log.warning("refused join from %s: its record does not verify with the run's token (wrong or missing "
                    "KINTSUGI_TOKEN); %d refused so far", claimed, self.refused_joins)

    def on_rejoin(self, req: dict) -> None:
        """A worker re-registers with a restarted coordinator."""
        wid = str(req["wid"])
        w = self.st.workers.get(wid)
        if w is None or w.state in ("dead", "left"):
            log.warning("worker %s re-registered but is not a member (%s); it is told to stop", wid,
                        "unknown" if w is None else w.state)
            self.board.put(f"ack/{wid}", "refused")
            return
        w.hb_changed = time.monotonic()
        self._rejoined.add(wid)
        self._awaiting.discard(wid)
        held = req.get("committed")
        if isinstance(held, list) and len(held) == 2 and all(isinstance(x, int) for x in held):
            self._claimed[wid] = (held[0], held[1])
        self.board.put(f"ack/{wid}", "ok")
        log.info("worker %s re-registered (slot %s, step %s)", wid, req.get("slot"), req.get("step_done"))

    def assign(self, slot: Slot, w: WorkerInfo) -> None:
        w.state, w.slot = "active", slot
        self.st.slots[slot] = w.wid
        self.changed()

    # --- leaving ---------------------------------------------------------------------------------------
    def declare_dead(self, wid: str, why: str, handed_off: bool = False) -> None:
        st = self.st
        w = st.workers.get(wid)
        if w is None or w.state in ("dead", "left"):
            return
        was_active = w.state == "active"
        w.state = "left" if handed_off else "dead"
        self._awaiting.discard(wid)
        self._claimed.pop(wid, None)
        self.changed()
        log.warning("worker %s %s (%s)", wid, "left" if handed_off else "declared dead", why)
        if was_active and w.slot is not None:
            slot = w.slot
            if not handed_off:
                st.failures += 1
            injected = self.board.get(f"injected/{wid}")
            # A handoff's outage starts when the holder stops training (it may have trained on
            # under its notice); a failure's when it was injected or last gave a sign of life.
            failed_at = time.time() if handed_off else (
                injected["t"] if injected else time.time() - (time.monotonic() - w.hb_changed))
            cell = st.cell_of(slot[0])
            cell.rebuilding.pop(slot, None)
            cell.lost[slot] = new_loss(st, slot, detected_at=time.time(), failed_at=failed_at, handed_off=handed_off,
                                       leaver=wid if handed_off else None, why=why)
            del st.slots[slot]
            st.ready[slot] = False
            # The replica's pipeline is down until it is rebuilt: every stage group leaves it out,
            # so the live replicas keep syncing without waiting for it.
            self.on_slot_lost()
        # A rebuild elsewhere that was to take its state from this worker (a peer donor, a
        # neighbour) waits for it in vain: plan that cell again.
        for c in cells_waiting_on(st, wid):
            c.needs_plan = True

    def silence_bound(self, w: WorkerInfo) -> float:
        """How long `w` may stay silent before its silence alone counts: recovery.heartbeat_timeout_s,
        or longer when its recent beats came far apart (a loaded machine starves the heartbeat
        thread; a hung process stops it altogether): three times the longest recent interval."""
        recent = self._intervals.get(w.wid)
        bound = max(self.settings.heartbeat_timeout_s, 3.0 * max(recent) if recent else 0.0)
        if w.wid in self._rejoined:
            # It re-registered with this (restarted) coordinator and has not beaten since: its
            # beating connection finds the new incarnation on its own, after the one that
            # re-registered, and under load (or someone writing old beats back) that takes seconds.
            bound = max(bound, 3.0 * self.settings.heartbeat_timeout_s)
        return bound

    def last_sign_of_life(self, w: WorkerInfo) -> float:
        """Its last beat, or its cell's last commit when that came after the beat was overdue (two
        of its usual intervals): a commit needs every stage of the cell, so the worker was alive
        and its links worked then although its heartbeat thread was starved (slow, not dead). A
        commit while the beats were on time says nothing they did not, and counting it would
        date a hang right after a commit from the commit instead of from the last beat."""
        if w.state != "active" or w.slot is None:
            return w.hb_changed
        cell = self.st.cell_of(w.slot[0])
        if cell.committed_at is None or cell.plan is None or w.wid not in cell.plan.slots.values():
            return w.hb_changed
        recent = self._intervals.get(w.wid)
        usual = max(self.settings.heartbeat_interval_s, statistics.median(recent) if recent else 0.0)
        return cell.committed_at if cell.committed_at > w.hb_changed + 2 * usual else w.hb_changed

    def check_heartbeats(self) -> None:
        """Certain deaths (a broken link reported by a neighbour, the launcher seeing the process
        exit) act at once, elsewhere. Silence acts here: a beat counts only when its counter went
        up (a replayed old beat does not), and a worker is evicted once neither a beat nor a commit
        of its cell came for `silence_bound`, confirmed: the other workers' beats arrive on time
        (when everyone is late, the machine or this coordinator is slow, not that one worker dead;
        up to three bounds), and this coordinator was looking (after a stall of its own loop it
        waits as long again before it counts silence)."""
        now = time.monotonic()
        gap = now - (self._last_hb_check if self._last_hb_check is not None else now)
        if self._last_hb_check is not None and gap < 0.05:
            return
        self._last_hb_check = now
        if gap > 0.5:  # this loop stalled (a flood of records, a busy machine): beats were not read
            self._blind_until = max(self._blind_until, now + min(gap, 3 * self.settings.heartbeat_timeout_s))
        live = [w for w in self.st.workers.values() if w.state in ("active", "spare")]
        if not live:
            return
        beat_keys = {w.wid: P.beat_key(self.board.auth, w.wid) for w in live}
        keys = list(beat_keys.values())
        store = self.board.store
        try:
            # multi_get waits for a missing key as long as the store's timeout (minutes), and a key
            # can be missing: a joiner's beat key still held for the state save (write-ahead,
            # recovery.control=etcd), or deleted by someone without the token. Read those present;
            # a missing beat is no beat.
            if not store.check(keys):
                keys = [k for k in keys if store.check([k])]
            values = dict(zip(keys, store.multi_get(keys) if keys else []))
        except RuntimeError:
            return
        silent = []
        for w in live:
            raw, status = values.get(beat_keys[w.wid]), None
            try:
                if raw is not None:
                    status = self.board.auth.open(beat_keys[w.wid], raw)
                n = int(status.get("n", -1)) if status is not None else w.hb
            except Forged as e:  # a forged beat never keeps a dead worker alive
                self.board.auth.dropped(e)
                n = w.hb
            except (ValueError, AttributeError, TypeError):
                continue
            if n > w.hb:
                self._rejoined.discard(w.wid)
                if w.hb >= 0:
                    self._intervals.setdefault(w.wid, collections.deque(maxlen=32)).append(now - w.hb_changed)
                w.hb, w.hb_changed, w.status = n, now, status
                stage, peak = status.get("stage"), status.get("peak_bytes")
                if isinstance(stage, int) and isinstance(peak, int):  # memory.peak_bytes per stage
                    self.peak_bytes[stage] = max(self.peak_bytes.get(stage, 0), peak)
            elif now - self.last_sign_of_life(w) > self.silence_bound(w):
                silent.append(w)
        for w in silent:
            quiet, bound = now - self.last_sign_of_life(w), self.silence_bound(w)
            others = [x for x in live if x is not w]
            everyone_late = bool(others) and not any(now - self.last_sign_of_life(x) < bound / 2 for x in others)
            if (now < self._blind_until or everyone_late) and quiet < 3 * bound:
                continue
            self.declare_dead(w.wid, f"no heartbeat for {now - w.hb_changed:.1f}s")

    def on_suspect(self, rep: dict) -> None:
        wid = rep["peer_wid"]
        w = self.st.workers.get(wid)
        if w is None or w.slot is None:
            return
        cell = self.st.cell_of(w.slot[0])
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
        self.declare_dead(wid, f"reported by {rep['reporter']}: {str(rep.get('why', ''))[:80]}")

    def on_intent(self, it: dict) -> None:
        w = self.st.workers.get(it["wid"])
        if w is not None:
            w.leaving = True
            if w.leaving_since is None:  # first come, first served when spares are scarce
                w.leaving_since = time.monotonic()

    def on_leave(self, lv: dict) -> None:
        self.declare_dead(lv["wid"], lv.get("why", "leaving"), handed_off=True)
        if lv.get("machine"):
            # That machine is going away: its waiting spares get no slot (they leave too).
            for w in self.st.workers.values():
                if w.machine == lv["machine"] and w.state == "spare":
                    w.state = "left"

    def on_died(self, d: dict) -> None:
        """A launcher saw the process exit: no need to wait for its heartbeat to go stale."""
        w = self.st.workers.get(d["wid"])
        if w is not None and w.state in ("active", "spare"):
            self.declare_dead(w.wid, f"process exited (code {d.get('rc')})")

    def on_ready(self, rd: dict) -> None:
        slot = tuple(rd["slot"])
        if self.st.slots.get(slot) == rd["wid"]:
            cell = self.st.cell_of(slot[0])
            if slot in cell.rebuilding and int(rd.get("gen", -1)) != cell.gen:
                return  # an older generation's rebuild: the newest plan rebuilds it again
            cell.rebuilding.pop(slot, None)
            self.st.ready[slot] = True
            self.changed()

    def heartbeat_ages(self) -> Dict[str, Optional[float]]:
        now = time.monotonic()
        return {w.wid: now - w.hb_changed for w in list(self.st.workers.values())}
