"""A worker's (or launcher's) connection to the coordinator: one that outlives the coordinator,
knows which incarnation it talks to, and never blocks on a hung one.

Identity: the run id is sealed with a key from the token alone; the coordinator's incarnation (its
`boot` id and a number that increases with every restart) is learnt by a challenge, so a copy of an
old incarnation's records written back into a restarted coordinator's store cannot make a worker
believe nothing restarted. Every record then sealed or verified uses that incarnation (recovery.auth).

Where (recovery.control=etcd): a `locate` (recovery.etcd_locate.Locator) tells where the current
leader's store is. The first address comes from it, and while the coordinator is away (or a request
to it hangs while a newer leader has published itself) the connection moves to the new leader's
address, verifies its identity like any restarted coordinator's, and runs `on_new_boot`. Workers get
one from their environment (KINTSUGI_ETCD_ENDPOINTS); without it nothing of etcd is imported.
"""
from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Tuple

from .auth import Auth, Forged, open_run_id, writer_id
from .protocol import (LogReader, TOKEN_ENV, append, connect, get_json, get_json_or, port_open, put_json)

log = logging.getLogger(__name__)


class CoordinatorAway(RuntimeError):
    """The coordinator's store does not answer (it died, hangs, or is restarting)."""


class _OpThread:
    """Runs one store client's operations on a daemon thread, so a caller can give up on one: a
    TCPStore request to a coordinator that hangs (SIGSTOP, a deadlock) never returns by itself.
    A thread left blocked that way is abandoned with its connection; a new pair replaces both."""

    def __init__(self):
        import queue as _queue
        self.q: "_queue.SimpleQueue" = _queue.SimpleQueue()
        threading.Thread(target=self._loop, daemon=True, name="kintsugi-store-op").start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self.q.get()
            try:
                box.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box.append((False, e))
            done.set()

    def run(self, fn, timeout_s: float, give_up: Optional[Callable[[], bool]] = None):
        """`give_up()`: asked every second while `fn` runs; True abandons it (TimeoutError)."""
        box: list = []
        done = threading.Event()
        self.q.put((fn, box, done))
        deadline = time.monotonic() + timeout_s
        while not done.wait(min(1.0, max(0.0, deadline - time.monotonic())) if give_up else timeout_s):
            if give_up is None or time.monotonic() >= deadline or give_up():
                raise TimeoutError
        ok, value = box[0]
        if ok:
            return value
        raise value


class Control:
    role = "worker"  # names the writer of its records (recovery.auth.writer_id)

    """A worker's (or launcher's) connection to the coordinator that outlives the coordinator.

    Every store operation goes through `call`: while the coordinator is away it raises
    CoordinatorAway at once instead of blocking, `append_later` queues a log record to be written
    when it is back, and `reconnect()` (called by a background thread) builds a new client once the
    port answers. A coordinator that came back is a new incarnation (`boot` changed): the callbacks
    in `on_new_boot` run (re-register, replay what it may have missed) before the queued records
    are written."""

    # Each store operation waits at most this long: a hung coordinator (stopped, deadlocked) then
    # costs the training thread seconds, not the minutes of a rendezvous timeout.
    OP_TIMEOUT_S = 10.0

    def __init__(self, host: str, port: int, timeout_s: float = 60.0, store=None, token: Optional[str] = None,
                 locate=None):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.locate = locate        # recovery.etcd_locate.Locator (recovery.control=etcd), else None
        self.leader_epoch = 0       # the etcd epoch of the leader at host:port (0: unknown, or no etcd)
        self._lock = threading.RLock()
        self.store = store if store is not None else connect(host, port, min(timeout_s, self.OP_TIMEOUT_S))
        self.token = token
        self.auth: Optional[Auth] = None
        self.boot: Optional[str] = None
        self.incarnation = 0           # the highest coordinator incarnation this connection has seen
        self._ops = _OpThread()
        self.away_since: Optional[float] = None
        self.outbox: Deque[Tuple[str, Any]] = collections.deque(maxlen=100_000)
        self.on_new_boot: List[Callable[[], None]] = []
        self.kept: List[Tuple[str, Any, str]] = []  # append_kept's records: (log, record, key once recorded)

    def identify(self, store=None, wait_s: float = 5.0) -> Optional[Tuple[str, int]]:
        """The coordinator's current incarnation (boot id, number), learnt by a challenge: write a
        fresh nonce to the `hello` log and wait for the answer sealed over that nonce with the run's
        key. A replayed old identity cannot answer a new nonce. None while no answer came (the
        coordinator is not up, or someone without the token overwrote the run id: it restores it).
        Forged when the run id does not verify for `wait_s` (a wrong token)."""
        store = store if store is not None else self.store
        if not store.check(["run_id"]):
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                run_id = open_run_id(self.token, store.get("run_id"))
                break
            except Forged as e:
                if time.monotonic() > deadline:
                    raise Forged(f"the coordinator's identity does not verify with this token ({e}); set "
                                 f"{TOKEN_ENV} to the run's token") from None
                time.sleep(0.1)
        if self.auth is None or self.auth.run_id != run_id:
            self.auth = Auth(self.token, run_id, writer=writer_id(self.role))
        nonce = secrets.token_hex(12)
        append(store, "hello", {"nonce": nonce})
        while time.monotonic() < deadline:
            if store.check([f"hello/{nonce}"]):
                try:
                    ans = self.auth.open(f"hello/{nonce}", store.get(f"hello/{nonce}"), with_boot=False, fresh=None)
                    boot, inc = str(ans["boot"]), int(ans["incarnation"])
                except (Forged, KeyError, TypeError, ValueError):
                    return None
                if inc < self.incarnation:  # an older incarnation cannot answer a new nonce: broken store
                    log.warning("the coordinator answered as incarnation %d after %d; ignored", inc, self.incarnation)
                    return None
                return boot, inc
            time.sleep(0.01)
        return None

    def _adopt(self, boot: str, inc: int) -> bool:
        """Seal and verify with `boot` from now on; True if it is a new incarnation."""
        new = boot != self.boot
        if new:
            # A new incarnation serves a new store whose logs count from 1 again: the indices this
            # writer used in the old one are no floor there (kept, they read as a wound-back counter).
            self.auth.max_index.clear()
        self.boot, self.incarnation = boot, max(self.incarnation, inc)
        self.auth.boot = boot
        return new

    @property
    def away(self) -> bool:
        return self.away_since is not None

    def call(self, fn: Callable, *args):
        """Run `fn(store, *args)`; CoordinatorAway if the store does not answer within
        OP_TIMEOUT_S (a hung coordinator) or the connection fails (a dead one)."""
        if self.away_since is not None:
            raise CoordinatorAway("the coordinator is away")
        with self._lock:
            store, ops = self.store, self._ops
            try:
                return ops.run(lambda: fn(store, *args), self.OP_TIMEOUT_S,
                               give_up=self._superseded if self.locate is not None else None)
            except TimeoutError:
                self._ops = _OpThread()  # the blocked thread and its connection are left behind
                self._lost(f"no answer within {self.OP_TIMEOUT_S:.0f}s")
                raise CoordinatorAway("the coordinator does not answer") from None
            except (RuntimeError, ConnectionError, OSError) as e:  # DistNetworkError is a RuntimeError
                self._lost(str(e).splitlines()[0][:100])
                raise CoordinatorAway(str(e)) from e

    def catch_up(self, other: "Control") -> None:
        """Reconnect when away, or when `other` (another connection of this process) already reached
        a coordinator that replaced this one's: a newer incarnation or etcd leader. A connection
        that nobody uses for a while would otherwise keep pointing at a dead store, and what it
        alone sends again to a new incarnation (append_kept) would wait for its next use."""
        if not self.away and (other.incarnation > self.incarnation or other.leader_epoch > self.leader_epoch):
            self._lost(f"a newer coordinator leads (incarnation {other.incarnation}, epoch {other.leader_epoch})")
        if self.away:
            self.reconnect()

    def _superseded(self) -> bool:
        """A newer leader published its address: the one this request waits on was deposed."""
        return self.locate.newer_than(self.leader_epoch) is not None

    def _lost(self, why: str) -> None:
        if self.away_since is None:
            self.away_since = time.monotonic()
            log.warning("lost the coordinator at %s:%d (%s); training goes on, reconnecting", self.host, self.port,
                        why)

    # --- conveniences ---------------------------------------------------------------------------
    def get_json(self, key: str) -> Any:
        return self.call(get_json, key, self.auth)

    def get_json_or(self, key: str, default: Any = None) -> Any:
        return self.call(get_json_or, key, default, self.auth)

    def put_json(self, key: str, obj: Any) -> None:
        self.call(put_json, key, obj, self.auth)

    def append(self, log_name: str, obj: Any) -> int:
        return self.call(append, log_name, obj, self.auth)

    def reader(self, log_name: str, **kw) -> "LogReader":
        return LogReader(self.store, log_name, auth=self.auth, **kw)

    def append_later(self, log_name: str, obj: Any) -> None:
        """Append now, or when the coordinator is back (records keep their order)."""
        if self.away_since is None and not self.outbox:
            try:
                self.append(log_name, obj)
                return
            except CoordinatorAway:
                pass
        self.outbox.append((log_name, obj))

    def append_kept(self, log_name: str, obj: Any, recorded_key: str) -> None:
        """A record the run cannot end without (the final evaluation): appended as by append_later,
        and appended again to every new incarnation whose store lacks `recorded_key` (which a
        coordinator puts once it holds the record). A store can take a record its coordinator never
        reads: one suspended by a lost etcd quorum serves its store until it is deposed, and a
        successor starts from what was saved, without it."""
        self.kept.append((log_name, obj, recorded_key))
        self.append_later(log_name, obj)

    def _send_kept_again(self) -> None:
        for log_name, obj, key in self.kept:
            if any(o is obj for _, o in self.outbox):
                continue  # still queued: it goes out with the outbox
            try:
                if not self.check(key):
                    log.warning("the new coordinator lacks the %s record sent to its predecessor; sent again", log_name)
                    self.append_later(log_name, obj)
            except CoordinatorAway:
                return

    def check(self, key: str) -> bool:
        return self.call(lambda s: s.check([key]))

    # --- reconnection -----------------------------------------------------------------------------
    def reconnect(self) -> bool:
        """One attempt (cheap when nothing listens). True once connected and caught up."""
        if self.away_since is None:
            return True
        epoch = self.leader_epoch
        if self.locate is not None:
            info = self.locate.newer_than(self.leader_epoch)
            if info is not None:
                self.host, port = info.address.rsplit(":", 1)
                self.port, epoch = int(port), info.epoch
        if not port_open(self.host, self.port):
            return False
        probe = _OpThread()  # a hung coordinator accepts connections but never answers
        # etcd: an attempt on a leader that a newer one replaced (its port seen open as it died) is abandoned
        moved_on = (lambda: self.locate.newer_than(epoch) is not None) if self.locate is not None else None
        try:
            store = probe.run(lambda: connect(self.host, self.port, timeout_s=min(self.timeout_s, 5.0)), 10.0,
                              give_up=moved_on)
            if not probe.run(lambda: store.check(["job"]), 5.0, give_up=moved_on):
                return False  # a restarted coordinator still filling its store
            ident = probe.run(lambda: self.identify(store), 10.0, give_up=moved_on)
        except Exception:  # noqa: BLE001 - not back yet
            return False
        if ident is None:
            return False
        with self._lock:
            self.store, self._ops = store, probe
            new_boot = self._adopt(*ident)
            moved = epoch != self.leader_epoch
            self.leader_epoch = epoch
            self.away_since = None
        log.warning("coordinator reachable again%s", f" (a new leader, epoch {epoch}, at {self.host}:{self.port})"
                    if moved else " (restarted)" if new_boot else "")
        if new_boot:
            for cb in self.on_new_boot:
                cb()
            self._send_kept_again()
        self.flush()
        return self.away_since is None

    def flush(self) -> None:
        while self.outbox and self.away_since is None:
            name, obj = self.outbox[0]
            try:
                self.append(name, obj)
            except CoordinatorAway:
                return
            self.outbox.popleft()


def open_control(host: str, port: int, token: str, timeout_s: float = 120, store=None, role: str = "worker",
                 locate=None) -> Control:
    """A connection whose seals verify with `token`, once the coordinator answered its challenge;
    Forged if the coordinator's identity does not verify with this token. With `locate` (a
    worker's comes from its environment, recovery.etcd_locate) the address is the current leader's.
    A worker whose coordinator dies while it connects waits for the successor (restarted on its
    port, or the new leader), `timeout_s` in all."""
    if locate is None and role == "worker" and os.environ.get("KINTSUGI_ETCD_ENDPOINTS"):
        from .etcd_locate import from_env  # recovery.control=etcd only: the local mode imports no etcd
        locate = from_env()
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        epoch = 0
        if locate is not None:
            info = locate.wait(max(1.0, deadline - time.monotonic()))
            if store is None or info.address != f"{host}:{port}":
                store = None
                host, port = info.address.rsplit(":", 1)
                port = int(port)
            epoch = info.epoch
        try:
            control = Control(host, port, max(1.0, deadline - time.monotonic()), store=store, token=token,
                              locate=locate)
            control.leader_epoch = epoch
            control.role = role
            while True:
                ident = control.identify()
                if ident is not None:
                    control._adopt(*ident)
                    return control
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the coordinator at {host}:{port} never published its identity")
                time.sleep(0.05)
        except (RuntimeError, ConnectionError) as e:  # DistNetworkError: it died as we connected
            # Its successor (restarted on this port, or a standby that publishes its own address)
            # is the one to talk to, as for a worker that lost a running coordinator.
            if role != "worker":  # a launcher supervises its coordinator itself: it sees the exit
                raise
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            if time.monotonic() > deadline:
                raise RuntimeError(f"the coordinator at {host}:{port} did not answer within {timeout_s:.0f}s "
                                   f"({why})") from None
            if not warned:
                warned = True
                log.warning("the coordinator at %s:%d went away as this process connected (%s); waiting for it "
                            "or its successor", host, port, why)
            store = None
            time.sleep(0.2)
