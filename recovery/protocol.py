"""The key layout of the coordinator's TCPStore and the client both sides use.

Every exchange between the coordinator and the workers goes through these keys, so the protocol
can be read in one place:

  run_id                    the run's id, sealed with a key from the token alone: with the token it
                            keys every other seal (recovery.auth)
  hello/<i>, hello/<nonce>  the identity challenge: a client writes a fresh nonce, the coordinator
                            answers with its incarnation (boot id, number) sealed over that nonce
  job, corpus, run_dir      the job config (JSON), its token cache, the run directory
  version                   bumped after every publication below: watchers poll only this key
  started                   the first placement is published
  join/<i>                  log of join requests (worker id, pid, host; the seal proves the token,
                            which is never sent); ack/<wid> = ok | refused
  rejoin/<i>                log of workers re-registering with a restarted coordinator (their state)
  hb/<wid>/<tag>            the worker's status (JSON: beat counter, cell, generation, step, phase);
                            the tag comes from the token (`beat_key`): TCPStore lists no keys, so a
                            client without the token cannot find a beat to overwrite or delete
  bytes/<wid>               bytes the worker sent, per channel (JSON), refreshed by the heartbeat
                            and written once more when it finished training
  end/<wid>                 the worker finished training (its final bytes/<wid> are in)
  handoff/<c>/<g>/<r,s>     the worker that took slot r,s in a handoff holds its state: the leaver
                            may exit now (it waits for this at most 10 s)
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
  counters                  rebuilt slots, rebuild generations, spares the waiting slots lack, and
                            the holders under notice that may hand off now (one per ready spare,
                            first noticed first)
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

Every value but `version`, the logs' `n` counters and the hello log is a sealed record
(recovery.auth): an HMAC keyed from the token over the key (or log name and index), the
incarnation, its writer and that writer's sequence number. Readers drop what does not verify and
what is older than what they accepted (a replay). Counters only say "look again"; nothing trusts
them for content, and one wound back is detected and counted (`LogReader`). Logs are
deleted as they are read, and groups delete their formation keys when they close
(parallel.groups), so the store does not grow with the run's length.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from datetime import timedelta
from typing import Any, List, Optional, Tuple

import torch.distributed as dist

from .auth import Auth, Forged, Stale

log = logging.getLogger(__name__)
TOKEN_ENV = "KINTSUGI_TOKEN"
# Put once the coordinator holds the final evaluation (by the evaluating worker too, so that no
# other runs it twice); a new incarnation's store has it only if the state it restored has it.
FINAL_EVAL_KEY = "final_eval_done"


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


def beat_key(auth: Auth, wid: str) -> str:
    """Where worker `wid` beats: a key only token holders can name (`Auth.private_key`)."""
    return auth.private_key(f"hb/{wid}")


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
    entry is sealed with its index, so it is worthless anywhere else. The entry is written only into
    an empty slot (compare-and-set), and never below an index this writer already used: a counter
    wound back by someone makes the writer jump past its own entries rather than write where the
    reader has already been, and never overwrite an entry nobody has read yet."""
    mine = auth.max_index if auth is not None else {}
    while True:
        i = int(store.add(f"{log_name}/n", 1))
        floor = max(0, mine.get(log_name, 0))
        if i <= floor:  # wound back below what this writer already used: jump past it, take a slot again
            store.add(f"{log_name}/n", floor - i + 1)
            if auth is not None:
                auth.drop("rewound", f"log {log_name}: its counter was wound back to {i - 1} below this writer's "
                                     f"index {floor}")
            continue
        value = auth.seal(f"{log_name}#{i}", obj) if auth is not None else json.dumps(obj)
        if bytes(store.compare_set(f"{log_name}/{i}", "", value)) == value.encode():
            mine[log_name] = i
            return i


class LogReader:
    """Reads a log written by `append` in order, dropping entries that do not verify (and, with
    `on_forged`, showing them to the caller unverified: the coordinator answers a join with a wrong
    token) or that replay an entry already read (each writer numbers its records; `Auth.open` with
    fresh="log"). Entries are deleted once read, so the store does not grow with the run.

    Holes: a writer that reserved an index and died before writing leaves one; it is skipped after
    `hole_timeout_s`. A counter bumped far ahead (by someone without the token) would leave millions:
    after the timeout the reader jumps to the lowest entry that exists near the counter. A counter
    wound back is tampering too: it is logged and counted, and the reader goes back to the lowest
    unread entry, so nothing written after it is lost (writers never overwrite an unread entry)."""

    MAX_SCAN = 1024

    def __init__(self, store, log_name: str, hole_timeout_s: float = 5.0, start: int = 1,
                 auth: Optional[Auth] = None, on_forged=None, delete: bool = True):
        self.store, self.log, self.hole_timeout_s = store, log_name, hole_timeout_s
        self.auth, self.on_forged, self.delete = auth, on_forged, delete
        self.next = start
        self.rewinds = 0
        self._last_n = start - 1
        self._hole_since: Optional[float] = None

    def _read(self, i: int):
        key = f"{self.log}/{i}"
        raw = self.store.get(key)
        if self.delete:
            self.store.delete_key(key)
        if self.auth is None:
            return json.loads(raw.decode())
        try:
            return self.auth.open(f"{self.log}#{i}", raw, fresh="log")
        except Forged as e:
            self.auth.dropped(e)
            if self.on_forged is not None and not isinstance(e, Stale):
                self.on_forged(raw)
            return None

    def poll(self, max_items: int = 1 << 30):
        out = []
        n = int(self.store.add(f"{self.log}/n", 0))
        # Read entries are deleted: one back at the last index read, or a counter lower than the
        # last one seen, means the counter was wound back and someone wrote where we have been.
        if n < self._last_n or (self.next > 1 and self.store.check([f"{self.log}/{self.next - 1}"])):
            self._wound_back(n)
        self._last_n = n
        while self.next <= n and len(out) < max_items:
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

    def _wound_back(self, n: int) -> None:
        """Someone moved the counter from above our position back to `n`. Writers continue from
        n + 1 (and skip slots still holding unread entries): read on from the lowest entry that
        exists at or below our position."""
        self.rewinds += 1
        why = f"log {self.log}: its counter went back from {self._last_n} to {n}"
        log.warning("%s (tampering: someone without the token wrote it); reading on from the lowest unread entry",
                    why)
        if self.auth is not None:
            self.auth.drop("rewound", why)
        top = max(min(self.next, n + 1), 1)
        lo = max(1, top - self.MAX_SCAN)
        self.next = next((i for i in range(lo, top) if self.store.check([f"{self.log}/{i}"])), top)

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
