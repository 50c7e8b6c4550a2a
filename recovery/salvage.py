"""A restarted coordinator whose persisted state cannot be read back (`control_state.json` cut short,
overwritten, not JSON, or JSON that is not a state): what it still does instead of dying.

Without its state it no longer knows the generations, plans and pending rebuilds, so it cannot
continue the run; dying would leave the launcher nothing but an exit 1 while every worker still
holds its exact state. So it falls back on what the other records hold and suspends the job:

- the committed steps, tokens and final loss come from metrics.jsonl (`Ledger.restore`), the job
  from job.json, as on any restart; the run id and incarnation are read from what is left of the
  damaged file when they can be (so the new incarnation still counts up), else new ones are made;
- every worker that re-registers (`rejoin`, which carries its slot and last step) is taken at its
  word and acknowledged, then replays the commits the dead coordinator may not have recorded, so
  metrics.jsonl gets back what the workers still hold;
- once every slot has a holder (or after `wait_s`), the job suspends (`Reactions.suspend`): each
  holder saves its committed state as a checkpoint, the job exits 75 and says to continue with
  `train.resume`; slots nobody claimed are listed as lost and rebuilt on resume.

`load_state` is the one place the coordinator reads its state back; it returns why the state is
unusable instead of raising.
"""
from __future__ import annotations

import logging
import os
import re
import time
from typing import Callable, Dict, Optional, Tuple

from .control_state import CoordinatorState, WorkerInfo
from .plan import Slot
from .state_store import StateStore

log = logging.getLogger(__name__)
_INCARNATION = re.compile(rb'"incarnation":\s*(\d+)')
_RUN_ID = re.compile(rb'"run_id":\s*"([0-9a-f]{8,64})"')
_T0 = re.compile(rb'"t0":\s*([0-9]+(?:\.[0-9]+)?)')


def load_state(store: StateStore, restore: bool,
               fresh: Callable[[], CoordinatorState]) -> Tuple[CoordinatorState, Optional[str]]:
    """(the state to start from, None) -- or, when `restore` finds the persisted state unusable, (a
    fresh state keeping whatever identity the damaged record still shows, why it is unusable)."""
    if not restore:
        return fresh(), None
    try:
        saved = store.load()
        return (CoordinatorState.from_json(saved) if saved is not None else fresh()), None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        why = f"{store!r} cannot be read back ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    st = fresh()
    raw = _raw(store)
    path = getattr(store, "path", None)
    if path and raw:  # kept for whoever investigates: the next save replaces the file
        try:
            with open(f"{path}.damaged", "wb") as f:
                f.write(raw)
            why += f"; kept as {os.path.basename(path)}.damaged"
        except OSError:
            pass
    if (m := _RUN_ID.search(raw)) is not None:
        st.run_id = m.group(1).decode()
    if (m := _INCARNATION.search(raw)) is not None:
        st.incarnation = int(m.group(1))
    if (m := _T0.search(raw)) is not None:
        st.t0 = float(m.group(1))
    return st, why


def _raw(store: StateStore) -> bytes:
    path = getattr(store, "path", None)
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except (OSError, TypeError):
        return b""


class Salvage:
    """Collects the re-registering workers of a coordinator that lost its state, then suspends."""

    SETTLE_S = 1.0  # after the last re-registration, time for the replays it triggers

    def __init__(self, coordinator, why: str):
        """`coordinator`: the recovery.coordinator.Coordinator; its `rejoin` handler becomes ours."""
        self.c, self.why = coordinator, why
        s = coordinator.settings
        self.wait_s = max(10.0, 3 * s.heartbeat_timeout_s)
        self.claims: Dict[Slot, Tuple[str, int]] = {}  # slot -> (worker, its last step)
        self.since = time.monotonic()
        self.last_rejoin = self.since
        self.done = False
        coordinator.handlers["rejoin"] = self.on_rejoin
        log.error("%s; the run cannot go on from it: every worker that re-registers saves its committed state "
                  "and the job suspends (exit 75); continue it with train.resume=%s", why,
                  os.path.abspath(coordinator.run_dir))
        coordinator.ledger.event({"kind": "state_lost", "why": why})

    def on_rejoin(self, req: dict) -> None:
        st, s = self.c.st, self.c.settings
        wid = str(req["wid"])
        slot = tuple(int(x) for x in req["slot"]) if req.get("slot") else None
        if slot is not None and not (0 <= slot[0] < s.replicas and 0 <= slot[1] < s.stages):
            slot = None
        step = req.get("step_done")
        step = int(step) if isinstance(step, int) else -1
        if wid not in st.workers:
            # A spare is kept out of any placement (it has nothing to save): "left".
            st.workers[wid] = WorkerInfo(wid, int(req["pid"]), str(req["host"]), str(req.get("machine", req["host"])),
                                         state="active" if slot else "left", slot=slot)
        if slot is not None and not self.done:
            held = self.claims.get(slot)
            if held is None or step > held[1]:  # two claimants: the one further on (the other is stale)
                self.claims[slot] = (wid, step)
                st.slots[slot] = wid
        self.c.board.put(f"ack/{wid}", "ok")
        self.last_rejoin = time.monotonic()
        self.c.changed()
        log.info("worker %s re-registered with slot %s at step %s", wid, slot, step)

    def poll(self) -> None:
        if self.done:
            return
        s, now = self.c.settings, time.monotonic()
        complete = len(self.claims) == s.replicas * s.stages
        if not (complete and now - self.last_rejoin > self.SETTLE_S) and now - self.since < self.wait_s:
            return
        self.done = True
        if not self.claims:
            self.c.error = (f"{self.why}, and no worker re-registered within {self.wait_s:.0f}s: nothing holds the "
                            f"run's state; continue from its last checkpoint with train.resume="
                            f"{os.path.abspath(self.c.run_dir)} if it has one")
            return
        lost = sorted({(r, x) for r in range(s.replicas) for x in range(s.stages)} - set(self.claims))
        self.c.reactions.suspend(f"{self.why}; the workers save what they hold",
                                 holders={slot: wid for slot, (wid, _) in self.claims.items()}, lost=lost)
