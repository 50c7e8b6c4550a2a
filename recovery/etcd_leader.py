"""A coordinator process's leadership of a run on etcd (`recovery.control=etcd`): its start, in
order, and how it stops acting.

    lead = Leadership(settings, flush_s, on_deposed=...)
    lead.check()                  # the cluster answers with a quorum and these credentials; else one line
    lead.refuse_taken()           # a new run (not --standby, not train.resume): the prefix holds no state
    lead.campaign()               # blocks; a standby waits here holding nothing but a lease
    saved = lead.store.load()     # None: a new run; else what the previous leader saved
    coordinator = Coordinator(..., restore=saved is not None, state_store=lead.store,
                              min_incarnation=lead.epoch)   # its own TCPStore, filled
    lead.publish(host, port)      # last: a worker that finds the address finds a store that is ready
    coordinator.serve(); lead.resign()

Nothing is started before `check()` passed. The incarnation is `max(saved + 1, epoch)`: epochs are
unique and increase across leaders, so even a leader that died before its first save never shares
an incarnation with its successor, and every worker's identity challenge sees a higher one.

Stepping down. The election ends a leadership when the lease runs out (`on_lost`, from the renewal
thread, at the last moment this process can be sure it still leads), when a fenced write is refused
(a successor leads), or when it resigns. In the first two cases `on_deposed(why)` runs at once, from
whatever thread noticed: the coordinator's entry point re-executes the process as a standby, which
closes its TCPStore (its workers see their coordinator away and look for the next). A process that
was paused (SIGSTOP) past its lease notices in either thread the moment it runs again: the
coordinator also checks `store.leading()` before every record it handles and every write it releases.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Callable, Optional

from .etcd_client import EtcdClient, EtcdSettings
from .etcd_election import Election, LeaderInfo, find_leader
from .etcd_state import EtcdStateStore

log = logging.getLogger(__name__)


class PrefixTaken(ValueError):
    """A new run's prefix already holds another run's state (one line: what, and the fixes)."""


def refuse_taken(client: EtcdClient, settings: EtcdSettings) -> None:
    """PrefixTaken (one line: whose state, and the fixes) when `settings.prefix` holds a run's state."""
    kv = client.get(settings.prefix + "state")
    if kv is None:
        return
    try:
        doc = json.loads(kv["value"])
        what = doc["state"].get("ended") or "in progress or crashed"
        by = f"epoch {doc['epoch']}, {doc['candidate']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        what, by = "unreadable", "unknown writer"
    p = settings.prefix
    raise PrefixTaken(
        f"recovery.etcd.prefix={p} already holds a run's control state ({what}; {by}): give this run a prefix "
        f"of its own, clear the old one (python -m kintsugi.recovery.etcd_tool clear --endpoints "
        f"{','.join(settings.endpoints)} --prefix {p}), or start a coordinator with --standby to take that run over")


def _default_deposed(why: str) -> None:
    from .runfiles import EX_DEPOSED
    log.error("deposed (%s); exiting", why)
    logging.shutdown()
    os._exit(EX_DEPOSED)


class Leadership:
    def __init__(self, settings: EtcdSettings, flush_s: float = 1.0, candidate: Optional[str] = None,
                 on_deposed: Optional[Callable[[str], None]] = None, client: Optional[EtcdClient] = None):
        self.settings = settings
        self.client = client or EtcdClient.from_settings(settings)   # ValueError: credentials incomplete
        self.on_deposed = on_deposed or _default_deposed
        self.election = Election(self.client, settings.prefix, ttl_s=settings.lease_ttl_s, candidate=candidate,
                                 on_lost=self._lost, grace_s=settings.lease_grace_s)
        self.store = EtcdStateStore(self.client, settings.prefix, self.election, flush_s=flush_s)
        self._resigning = False
        self._once = threading.Lock()

    # --- the start --------------------------------------------------------------------------------
    def check(self) -> None:
        """EtcdUnavailable / EtcdAuthError (one line) when the cluster cannot be used."""
        self.client.check(self.settings.prefix)

    def refuse_taken(self) -> None:
        """A new run must not adopt another run's state: PrefixTaken when the prefix holds one."""
        refuse_taken(self.client, self.settings)

    def leader(self) -> Optional[LeaderInfo]:
        return find_leader(self.client, self.settings.prefix)

    def campaign(self, stop: Optional[threading.Event] = None) -> bool:
        """Block until this process leads (True) or `stop` is set (False)."""
        now = None
        try:
            now = self.leader()
        except Exception:  # noqa: BLE001 - only for the log line; the campaign waits out an outage
            pass
        if now is not None:
            log.info("standby: campaigning for %s; epoch %d (%s) leads at %s", self.settings.prefix, now.epoch,
                     now.candidate, now.address)
        won = self.election.campaign(stop=stop)
        if won:
            log.warning("leading %s (epoch %d)", self.settings.prefix, self.election.epoch)
        return won

    @property
    def epoch(self) -> int:
        return int(self.election.epoch or 0)

    def publish(self, host: str, port: int) -> None:
        """Announce this leader's TCPStore (fenced; a refusal deposes, see the module's docstring)."""
        self.election.publish(f"{host}:{port}")
        log.info("published the store %s:%d (epoch %d)", host, port, self.epoch)

    # --- the end ----------------------------------------------------------------------------------
    def resign(self) -> None:
        """After the final save: a standby then wins at once, reads `ended`, and exits."""
        self._resigning = True
        self.election.close()

    def _lost(self) -> None:
        if self._resigning or not self._once.acquire(blocking=False):
            return
        self.on_deposed(f"its etcd leadership of epoch {self.epoch} ended")
