"""Leader election among coordinators on etcd, with an epoch that fences a deposed leader.

Keys (under the run's prefix):
  election/leader  {"candidate", "epoch", "address"}; attached to the leader's lease, so it vanishes
                   when the leader stops renewing it (killed, paused, partitioned from the quorum).
  election/epoch   the last epoch handed out (1, 2, 3, ...).

A candidate holds a lease (TTL `ttl_s`) renewed by a thread, and wins with one transaction: "the
leader key does not exist and the epoch key is as I read it" -> create the leader key on my lease
and bump the epoch. Two candidates cannot both pass it, and no epoch is ever handed out twice, even
to a leader that dies before it writes anything (the new leader's boot/incarnation derives from it).
The leader key's create revision is the fence: every control write is a transaction comparing it
(`fence()`), so once the key has expired or belongs to a successor, a deposed leader's writes fail
on the server whatever its own clock says.

A leader must also stop acting on things etcd does not guard (its own TCPStore, its workers)
before anyone can succeed it. The lease expires on the server no earlier than TTL after the server
received the last renewal, hence no earlier than TTL after this process *sent* it; `is_leader` turns
False at send time + TTL - margin, strictly before any successor can win. From then the leader is
suspended: `confirm()` (what the coordinator and the state store ask) blocks, so it acts on
nothing. If etcd answers a renewal, the lease was never gone and the leadership resumes: losing
etcd's raft leader leaves no member able to renew for 1-2 s, and with a 3 s TTL a coordinator
would otherwise give up a run it still holds. If etcd says the lease is gone, or it stays silent
for `grace_s` (recovery.etcd.lease_grace_s, default the TTL) more, the leadership ends and
`on_lost` fires (from the renewal thread). A process that was paused (SIGSTOP) comes back with its
deadline passed.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, List, Optional

from .etcd_client import EtcdClient, EtcdError, EtcdUnavailable, LeaseNotFound, b64
from .state_store import Fenced

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaderInfo:
    epoch: int
    candidate: str
    address: Optional[str]   # the leader's TCPStore "host:port", once published
    revision: int            # create revision of the leader key (the fence)


def _margin(ttl_s: float) -> float:
    # Covers the time between checking `is_leader` and acting on it, and clock-rate differences
    # between this machine and the etcd leader's (ppm, but the margin costs nothing in failover).
    return max(0.25, 0.1 * ttl_s)


class Election:
    """One candidate. `campaign()` blocks until it leads (True) or gives up (False); afterwards
    `is_leader`, `epoch`, `fence()`, `publish(address)`, `resign()`."""

    def __init__(self, client: EtcdClient, prefix: str, ttl_s: int = 3, candidate: Optional[str] = None,
                 on_lost: Optional[Callable[[], None]] = None, poll_s: float = 0.1, grace_s: Optional[float] = None):
        self.client = client
        self.election_prefix = prefix + "election/"
        self.leader_key, self.epoch_key = self.election_prefix + "leader", self.election_prefix + "epoch"
        self.ttl_s = int(ttl_s)
        self.candidate = candidate or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.on_lost = on_lost
        self.poll_s = poll_s
        self.epoch: Optional[int] = None
        self.revision: Optional[int] = None
        self.lost_at: Optional[float] = None   # monotonic time the last leadership ended: is_leader
                                               # was False from then on (a lapsed lease: its deadline)
        self._lease: Optional[int] = None
        self._valid_until = 0.0            # monotonic; the lease is surely alive on the server before it
        self._leading = False
        self._lost = threading.Event()     # set when a leadership ends (lease gone, fenced, resigned)
        self._cond = threading.Condition()
        self._renewer: Optional[threading.Thread] = None
        self._closed = False
        self._stale: List[int] = []        # leases given up at their deadline, maybe still alive in etcd
        self._renew_failing = False
        # How long past the lease deadline a leader that cannot reach etcd stays suspended before
        # it gives up (see `confirm`): etcd's leaderless window after its raft leader dies.
        self.grace_s = float(self.ttl_s if grace_s is None else grace_s)

    # --- the lease --------------------------------------------------------------------------------
    def _lease_alive(self) -> bool:
        return self._lease is not None and time.monotonic() < self._valid_until

    def _grant(self) -> None:
        sent = time.monotonic()
        lease, ttl = self.client.grant(self.ttl_s)
        with self._cond:
            self._lease, self._valid_until = lease, sent + ttl - _margin(ttl)
            self._cond.notify_all()
        if self._renewer is None or not self._renewer.is_alive():
            # Its own client: a renewal must not queue behind a slow request of the main thread, and
            # it gives up on a member after a quarter TTL so that the next member still has time.
            client = self.client.clone(timeout_s=min(self.client.timeout_s, ttl / 4))
            self._renewer = threading.Thread(target=self._renew, args=(client,), name="etcd-lease", daemon=True)
            self._renewer.start()

    def _renew(self, client: EtcdClient) -> None:
        while True:
            with self._cond:
                while self._lease is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                lease, until = self._lease, self._valid_until
            sent = time.monotonic()
            if sent >= until + self.grace_s:
                # etcd may still hold it (a leader change there extends every lease): revoke it at
                # the next campaign, so that the leader key goes at once rather than a TTL later.
                self._stale.append(lease)
                self._lease_gone(lease, "not renewed in time", at=until)   # it stopped acting then
                continue
            try:
                ttl: Optional[int] = client.keepalive(lease)
            except EtcdUnavailable as e:
                if not self._renew_failing:   # once per outage
                    log.warning("cannot renew the etcd lease (%s); still valid for %.1f s", e,
                                until - time.monotonic())
                self._renew_failing = True
                ttl = None
            except EtcdError:
                ttl = 0
            if ttl == 0:
                self._lease_gone(lease, "etcd no longer has it")
                continue
            if ttl:
                self._renew_failing = False
                if sent >= until:
                    log.warning("coordinator %s leads again (epoch %s): etcd renewed its lease %.1f s past the "
                                "deadline", self.candidate, self.epoch, sent - until)
            with self._cond:
                if self._lease != lease:
                    continue
                if ttl:
                    self._valid_until = sent + ttl - _margin(ttl)
                # Renew four times per TTL (sooner after a failure); wake at the deadline at the
                # latest: past it this leader is suspended until a renewal answers or the grace ends.
                pause = self.ttl_s / 4.0 if ttl else 0.1
                self._cond.notify_all()
                self._cond.wait(max(0.0, min(pause, self._valid_until + self.grace_s - time.monotonic())))

    def _lease_gone(self, lease: int, why: str, at: Optional[float] = None) -> None:
        with self._cond:
            if self._lease != lease:
                return
            self._lease = None
        self._end_leadership(f"its etcd lease expired ({why})", at)

    def _end_leadership(self, why: str, at: Optional[float] = None) -> None:
        with self._cond:
            was = self._leading
            self._leading = False
            self._cond.notify_all()
        if was:
            self.lost_at = time.monotonic() if at is None else at
            self._lost.set()
            log.warning("coordinator %s no longer leads (epoch %s): %s", self.candidate, self.epoch, why)
            if self.on_lost is not None:
                self.on_lost()

    # --- leading ----------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self._leading and self._lease_alive()

    def confirm(self, timeout_s: Optional[float] = None) -> bool:
        """Whether this process leads, waiting out a suspension: past the lease deadline with etcd
        not answering (a raft election after its leader died takes 1-2 s), the leadership is neither
        sure nor lost. A renewal that etcd answers resumes it - the lease, hence the leader key, was
        never gone, so nobody else can have won; etcd saying the lease is gone, or the grace
        (`grace_s`) running out, ends it. Waits at most `timeout_s` (default: the grace)."""
        give_up = time.monotonic() + (self.grace_s if timeout_s is None else timeout_s)
        with self._cond:
            while self._leading and not self._lease_alive() and self._lease is not None and not self._closed:
                left = give_up - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self.is_leader

    @property
    def lost(self) -> threading.Event:
        """Set when the current leadership ended; cleared by the next `campaign()`."""
        return self._lost

    def campaign(self, timeout_s: Optional[float] = None, stop: Optional[threading.Event] = None) -> bool:
        """Block until this candidate leads (True), `timeout_s` passes or `stop` is set (False).
        An unreachable cluster is waited out (logged once per outage)."""
        if self.is_leader:
            return True
        self._lost.clear()
        give_up = None if timeout_s is None else time.monotonic() + timeout_s
        outage = False
        while not (stop is not None and stop.is_set()):
            try:
                self._revoke_stale()
                if not self._lease_alive():
                    self._grant()
                if self._try_win() and self.is_leader:
                    return True
                outage = False
            except LeaseNotFound:
                self._lease = None       # expired between two polls (a long pause): take a new one
                continue
            except EtcdUnavailable as e:
                if not outage:
                    log.warning("campaigning without etcd (%s); retrying", e)
                outage = True
            now = time.monotonic()
            if give_up is not None and now >= give_up:
                return False
            time.sleep(self.poll_s if give_up is None else max(0.0, min(self.poll_s, give_up - now)))
        return False

    def _revoke_stale(self) -> None:
        while self._stale:
            self.client.revoke(self._stale[0])   # EtcdUnavailable: kept for the next round
            self._stale.pop(0)

    def _try_win(self) -> bool:
        kvs, _ = self.client.range(self.election_prefix, prefix=True)
        by_key = {kv["key"].decode(): kv for kv in kvs}
        leader, counter = by_key.get(self.leader_key), by_key.get(self.epoch_key)
        if leader is not None:
            if leader["lease"] == self._lease:   # our own earlier attempt won, its answer was lost
                return self._won(int(json.loads(leader["value"])["epoch"]), leader["create_revision"])
            return False
        epoch = int(counter["value"]) + 1 if counter else 1
        compare = [{"key": b64(self.leader_key), "target": "CREATE", "result": "EQUAL", "create_revision": 0},
                   {"key": b64(self.epoch_key), "target": "MOD", "result": "EQUAL",
                    "mod_revision": counter["mod_revision"] if counter else 0}]
        value = json.dumps({"candidate": self.candidate, "epoch": epoch, "address": None})
        success = [{"request_put": {"key": b64(self.leader_key), "value": b64(value), "lease": self._lease}},
                   {"request_put": {"key": b64(self.epoch_key), "value": b64(str(epoch))}}]
        result = self.client.txn(compare, success)
        if not result["succeeded"]:
            return False
        return self._won(epoch, int(result["header"]["revision"]))

    def _won(self, epoch: int, revision: int) -> bool:
        with self._cond:
            self.epoch, self.revision, self._leading = epoch, revision, True
        log.info("coordinator %s leads the run (epoch %d)", self.candidate, epoch)
        return True

    def fence(self) -> List[dict]:
        """The compare that makes a transaction a leader's: the leader key is still the one this
        process created. Raises Fenced when it knows it no longer leads."""
        if not self.confirm():
            raise Fenced(f"coordinator {self.candidate} (epoch {self.epoch}) does not lead the run")
        return [{"key": b64(self.leader_key), "target": "CREATE", "result": "EQUAL", "create_revision": self.revision}]

    def refused(self, result: dict) -> Fenced:
        """A fenced transaction failed: this process is deposed. Its failure branch read the leader
        key (`leader_probe()`); name the successor, end the leadership, return what to raise."""
        now = None
        for r in result.get("responses", []):
            for kv in r.get("response_range", {}).get("kvs", []):
                now = json.loads(base64.b64decode(kv["value"]))
        who = f"epoch {now['epoch']} ({now['candidate']}) leads now" if now else "nobody leads now"
        self._end_leadership(f"a write was refused: {who}")
        return Fenced(f"coordinator {self.candidate} (epoch {self.epoch}) was deposed; {who}")

    def leader_probe(self) -> List[dict]:
        """The failure branch of a fenced transaction: read who leads instead."""
        return [{"request_range": {"key": b64(self.leader_key)}}]

    def publish(self, address: str) -> None:
        """Announce this leader's TCPStore address to the workers (fenced)."""
        value = json.dumps({"candidate": self.candidate, "epoch": self.epoch, "address": address})
        put = {"request_put": {"key": b64(self.leader_key), "value": b64(value), "lease": self._lease}}
        result = self.client.txn(self.fence(), [put], self.leader_probe())
        if not result["succeeded"]:
            raise self.refused(result)

    def resign(self) -> None:
        """Step down now: revoking the lease deletes the leader key, so a standby wins at its next
        poll instead of after the TTL."""
        with self._cond:
            lease, self._lease = self._lease, None
            self._cond.notify_all()
        self._end_leadership("it resigned")
        if lease is not None:
            try:
                self.client.revoke(lease)
            except EtcdUnavailable as e:
                log.warning("could not revoke the etcd lease (%s); it expires within %d s", e, self.ttl_s)

    def close(self) -> None:
        self.resign()
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def find_leader(client: EtcdClient, prefix: str) -> Optional[LeaderInfo]:
    """Who leads the run now (None: nobody; `address` None: it has not published its store yet)."""
    kv = client.get(prefix + "election/leader")
    if kv is None:
        return None
    v = json.loads(kv["value"])
    return LeaderInfo(int(v["epoch"]), v["candidate"], v.get("address"), kv["create_revision"])


def wait_for_leader(client: EtcdClient, prefix: str, newer_than: int = 0, timeout_s: Optional[float] = None,
                    poll_s: float = 0.25, stop: Optional[threading.Event] = None) -> Optional[LeaderInfo]:
    """Poll until a leader with an epoch above `newer_than` has published its address (a worker
    whose coordinator went away passes the epoch it knew). None when `timeout_s` passes or `stop`
    is set; an unreachable cluster is waited out, as workers keep training meanwhile."""
    give_up = None if timeout_s is None else time.monotonic() + timeout_s
    while not (stop is not None and stop.is_set()):
        try:
            info = find_leader(client, prefix)
            if info is not None and info.epoch > newer_than and info.address:
                return info
        except EtcdUnavailable:
            pass
        if give_up is not None and time.monotonic() >= give_up:
            return None
        time.sleep(poll_s)
    return None
