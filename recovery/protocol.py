"""The key layout of the coordinator's TCPStore and the client both sides use.

Every exchange between the coordinator and the workers goes through these keys, so the protocol
can be read in one place:

  run_id                    the run's id (plain): with the token it keys every seal (recovery.auth)
  job, corpus, run_dir      the job config (JSON), its token cache, the run directory
  boot                      this coordinator incarnation's id: a new one means it was restarted
  version                   bumped after every publication below: watchers poll only this key
  started                   the first placement is published
  join/<i>                  log of join requests (worker id, pid, host; the seal proves the token,
                            which is never sent); ack/<wid> = ok | refused
  rejoin/<i>                log of workers re-registering with a restarted coordinator (their state)
  hb/<wid>                  the worker's status (JSON: beat counter, cell, generation, step, phase)
  bytes/<wid>               bytes the worker sent, per channel (JSON), refreshed by the heartbeat
                            and written once more when it finished training
  end/<wid>                 the worker finished training (its final bytes/<wid> are in)
  final_error/<s>           stage s could not write its final weights (disk full): the run exits 74
  cell/<c>                  the newest plan of cell c: the replicas whose pipelines are trained as
                            one unit (a replica under Streaming DiLoCo; all replicas when plain
                            data-parallel couples them every step), with its generation number
  stage/<s>                 the newest stage-group plan of stage s (Streaming DiLoCo: its members)
  role/<wid>                {"cell": c}: the cell a worker belongs to (absent while a spare)
  slots                     {"r,s": wid} for every held slot (launchers, fault injection, tests)
  suspend                   a suspend plan: every holder saves its committed state and stops
  committed/<r>             the last committed step of replica r (and its commit vector)
  recorded/<r>              the steps of replica r a restarted coordinator already holds (replays start after)
  counters                  rebuilt slots, rebuild generations, spares the waiting slots lack
  mail/<wid>/<i>            requests to one worker (donate a peer snapshot)
  suspect/<i>               log of "peer X failed" reports, tagged with the reporter's generation
  fault/<i>                 log of failed formations and generation errors (re-planned)
  died/<i>                  log of worker processes a launcher saw exit
  leave/<i>, intent/<i>     graceful-leave notices (SIGTERM, Slurm warning, spot notice)
  ready/<i>                 a rebuilt worker holds its state (it may rejoin its stage group)
  commit/<i>, eval/<i>      committed steps and validation losses
  event/<i>, ckpt/<i>       events for the run record, written checkpoints
  suspended/<i>             slots saved by a suspend
  shutdown                  the coordinator ends the run

Every value but `run_id`, `version` and the logs' `n` counters is a sealed record (recovery.auth):
an HMAC keyed from the token over the key (or log name and index) and the incarnation. Readers drop
what does not verify. Counters only say "look again"; nothing trusts them for content. Logs are
deleted as they are read, and groups delete their formation keys when they close
(parallel.groups), so the store does not grow with the run's length.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Deque, List, Optional, Tuple

import torch.distributed as dist

from .auth import Auth, Forged

log = logging.getLogger(__name__)
TOKEN_ENV = "KINTSUGI_TOKEN"


_LISTENING: List[socket.socket] = []


def connect(host: str, port: int, timeout_s: float = 60.0, is_master: bool = False) -> dist.TCPStore:
    """A store client, or (is_master) the server: it listens on `host` only. TCPStore itself binds
    every interface whatever host it is given, so the server gets a socket bound here."""
    if not is_master:
        return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False, multi_tenant=False, use_libuv=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    store = dist.TCPStore(host, port, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                          multi_tenant=False, use_libuv=True, master_listen_fd=sock.fileno())
    _LISTENING.append(sock)  # the store serves on this socket: keep it (and its descriptor) open
    return store


def wait_for_store(host: str, port: int, timeout_s: float, process=None, poll_s: float = 0.1):
    """A client of the coordinator's store once it serves the job (its first record). `process`
    (the coordinator's Popen, when this process started it): raise as soon as it exited. Raises
    RuntimeError naming the address after `timeout_s` (monotonic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the coordinator exited with code {process.returncode} before it served; see "
                               "its log above")
        try:
            store = connect(host, port, timeout_s=min(10.0, timeout_s))
            if store.check(["job"]):
                return store
        except RuntimeError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no coordinator answered at {host}:{port} within {timeout_s:.0f}s; see its log")
        time.sleep(poll_s)


def parse_addr(addr: str):
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"recovery.coordinator={addr!r} is not host:port; e.g. 10.0.0.1:29400")
    return host, int(port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something listens at host:port (a cheap probe before building a store client,
    whose failed attempts log at length)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def put_json(store, key: str, obj: Any, auth: Optional[Auth] = None) -> None:
    store.set(key, auth.seal(key, obj) if auth is not None else json.dumps(obj))


def get_json(store, key: str, auth: Optional[Auth] = None) -> Any:
    raw = store.get(key)
    return auth.open(key, raw) if auth is not None else json.loads(raw.decode())


def has(store, key: str) -> bool:
    return store.check([key])


def get_json_or(store, key: str, default: Any = None, auth: Optional[Auth] = None) -> Any:
    """The verified value, or `default` when the key is missing or its seal does not verify."""
    if not store.check([key]):
        return default
    try:
        return get_json(store, key, auth)
    except Forged as e:
        auth.dropped(e)
        return default
    except ValueError:
        log.warning("dropped a malformed value at %s", key)
        return default


def counter(store, key: str) -> int:
    return int(store.add(key, 0))


def append(store, log_name: str, obj: Any, auth: Optional[Auth] = None) -> int:
    """Append to a multi-writer log kept as `<log>/n` (a counter) + `<log>/<i>` entries; a sealed
    entry is sealed with its index, so it is worthless anywhere else."""
    i = int(store.add(f"{log_name}/n", 1))
    store.set(f"{log_name}/{i}", auth.seal(f"{log_name}#{i}", obj) if auth is not None else json.dumps(obj))
    return i


class LogReader:
    """Reads a log written by `append` in order, dropping entries that do not verify (and, with
    `on_forged`, showing them to the caller unverified: the coordinator answers a join with a wrong
    token). Entries are deleted once read, so the store does not grow with the run.

    Holes: a writer that reserved an index and died before writing leaves one; it is skipped after
    `hole_timeout_s`. A counter bumped far ahead (by someone without the token) would leave millions:
    after the timeout the reader jumps to the lowest entry that exists near the counter."""

    MAX_SCAN = 1024

    def __init__(self, store, log_name: str, hole_timeout_s: float = 5.0, start: int = 1,
                 auth: Optional[Auth] = None, on_forged=None, delete: bool = True):
        self.store, self.log, self.hole_timeout_s = store, log_name, hole_timeout_s
        self.auth, self.on_forged, self.delete = auth, on_forged, delete
        self.next = start
        self._hole_since: Optional[float] = None

    def _read(self, i: int):
        key = f"{self.log}/{i}"
        raw = self.store.get(key)
        if self.delete:
            self.store.delete_key(key)
        if self.auth is None:
            return json.loads(raw.decode())
        try:
            return self.auth.open(f"{self.log}#{i}", raw)
        except Forged as e:
            self.auth.dropped(e)
            if self.on_forged is not None:
                self.on_forged(raw)
            return None

    def poll(self):
        out = []
        n = int(self.store.add(f"{self.log}/n", 0))
        while self.next <= n:
            key = f"{self.log}/{self.next}"
            if self.store.check([key]):
                try:
                    rec = self._read(self.next)
                    if rec is not None:
                        out.append(rec)
                except ValueError:
                    log.warning("dropped a malformed record %s", key)
                self.next += 1
                self._hole_since = None
                continue
            now = time.monotonic()
            if self._hole_since is None:
                self._hole_since = now
            if now - self._hole_since < self.hole_timeout_s:
                break
            self._hole_since = None
            self.next = self._after_hole(n)
        return out

    def _after_hole(self, n: int) -> int:
        """The index to read next after a hole timed out: the next one that exists, found without
        scanning more than MAX_SCAN keys whatever the counter says."""
        for i in range(self.next + 1, min(n, self.next + self.MAX_SCAN) + 1):
            if self.store.check([f"{self.log}/{i}"]):
                return i
        if n - self.next <= self.MAX_SCAN:
            return n + 1
        lowest = n + 1  # a counter bumped far ahead: the entries written since sit just below n
        for i in range(n, max(self.next, n - self.MAX_SCAN), -1):
            if self.store.check([f"{self.log}/{i}"]):
                lowest = i
            else:
                break
        log.warning("log %s: skipped %d missing entries (its counter jumped ahead)", self.log, lowest - self.next)
        return lowest


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

    def run(self, fn, timeout_s: float):
        box: list = []
        done = threading.Event()
        self.q.put((fn, box, done))
        if not done.wait(timeout_s):
            raise TimeoutError
        ok, value = box[0]
        if ok:
            return value
        raise value


class Control:
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

    def __init__(self, host: str, port: int, timeout_s: float = 60.0, store=None, token: Optional[str] = None):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._lock = threading.RLock()
        self.store = store if store is not None else connect(host, port, min(timeout_s, self.OP_TIMEOUT_S))
        self.token = token
        self.auth: Optional[Auth] = None
        self._ops = _OpThread()
        self.boot = self._read_boot()
        self.away_since: Optional[float] = None
        self.outbox: Deque[Tuple[str, Any]] = collections.deque(maxlen=100_000)
        self.on_new_boot: List[Callable[[], None]] = []

    def _read_boot(self, store=None) -> Optional[str]:
        """The coordinator's incarnation, verified: with a token, the keys every seal uses."""
        store = store if store is not None else self.store
        try:
            if not store.check(["boot"]):
                return None
            if self.token is None:
                return json.loads(store.get("boot").decode()).get("b")
            run_id = store.get("run_id").decode()
            auth = Auth(self.token, run_id)
            boot = auth.open("boot", store.get("boot"), with_boot=False)["boot"]
            auth.boot = boot
            self.auth = auth
            return boot
        except Forged as e:
            raise Forged(f"the coordinator's identity does not verify with this token ({e}); set KINTSUGI_TOKEN "
                         "to the run's token") from None
        except Exception:  # noqa: BLE001 - not there yet
            return None

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
                return ops.run(lambda: fn(store, *args), self.OP_TIMEOUT_S)
            except TimeoutError:
                self._ops = _OpThread()  # the blocked thread and its connection are left behind
                self._lost(f"no answer within {self.OP_TIMEOUT_S:.0f}s")
                raise CoordinatorAway("the coordinator does not answer") from None
            except (RuntimeError, ConnectionError, OSError) as e:  # DistNetworkError is a RuntimeError
                self._lost(str(e).splitlines()[0][:100])
                raise CoordinatorAway(str(e)) from e

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

    def check(self, key: str) -> bool:
        return self.call(lambda s: s.check([key]))

    # --- reconnection -----------------------------------------------------------------------------
    def reconnect(self) -> bool:
        """One attempt (cheap when nothing listens). True once connected and caught up."""
        if self.away_since is None:
            return True
        if not port_open(self.host, self.port):
            return False
        probe = _OpThread()  # a hung coordinator accepts connections but never answers
        try:
            store = probe.run(lambda: connect(self.host, self.port, timeout_s=min(self.timeout_s, 5.0)), 10.0)
            if not probe.run(lambda: store.check(["job"]), 5.0):
                return False  # a restarted coordinator still filling its store
            boot = probe.run(lambda: self._read_boot(store), 5.0)
        except Exception:  # noqa: BLE001 - not back yet
            return False
        with self._lock:
            self.store, self._ops = store, probe
            new_boot = boot != self.boot
            self.boot = boot
            self.away_since = None
        log.warning("coordinator reachable again%s", " (restarted)" if new_boot else "")
        if new_boot:
            for cb in self.on_new_boot:
                cb()
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


def open_control(host: str, port: int, token: str, timeout_s: float = 120, store=None) -> Control:
    """A connection whose seals verify with `token`, once the coordinator published its identity;
    Forged if that identity does not verify with this token."""
    control = Control(host, port, timeout_s, store=store, token=token)
    deadline = time.monotonic() + timeout_s
    while control.auth is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator at {host}:{port} never published its identity")
        time.sleep(0.05)
        control.boot = control._read_boot()
    return control


def die_with_parent() -> None:
    """When started by the local launcher (KINTSUGI_PDEATHSIG=1), die with it: no orphan processes
    even if the launcher is SIGKILLed."""
    if os.environ.get("KINTSUGI_PDEATHSIG") == "1" and sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def resolve_token(configured: str) -> Optional[str]:
    return configured or os.environ.get(TOKEN_ENV) or None


def slot_key(slot) -> str:
    return f"{slot[0]},{slot[1]}"


def parse_slot_key(key: str) -> Tuple[int, int]:
    r, s = key.split(",")
    return int(r), int(s)
