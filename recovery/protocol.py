"""The key layout of the coordinator's TCPStore and small helpers both sides use.

Every exchange between the coordinator and the workers goes through these keys, so the protocol
can be read in one place:

  job                       the job config (JSON) every worker trains with
  join/<i>                  log of join requests (worker id, token, pid, host); ack/<wid> = ok | refused
  hb/<wid>                  heartbeat counter, bumped by the worker's heartbeat thread
  bytes/<wid>               bytes the worker sent, per channel (JSON), refreshed by the heartbeat
  suspect/<i>               log of "peer X failed" reports, tagged with the reporter's generation
  leave/<i>                 log of graceful-leave notices (SIGTERM, Slurm warning, spot notice)
  gen                       current generation number; gen/<g> its plan (JSON)
  commit/<i>                log of committed steps (replica, step, loss, grad norm, tokens)
  eval/<i>                  log of validation losses
  event/<i>                 log of events for the run record (rebuild timings, ...)
  done/<wid>                the worker finished; shutdown = the coordinator ends the run
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist

TOKEN_ENV = "KINTSUGI_TOKEN"


def connect(host: str, port: int, timeout_s: float = 60.0, is_master: bool = False) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=is_master, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False, multi_tenant=False, use_libuv=True)


def parse_addr(addr: str):
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"recovery.coordinator={addr!r} is not host:port; e.g. 10.0.0.1:29400")
    return host, int(port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def put_json(store, key: str, obj: Any) -> None:
    store.set(key, json.dumps(obj))


def get_json(store, key: str) -> Any:
    return json.loads(store.get(key).decode())


def has(store, key: str) -> bool:
    return store.check([key])


def get_json_or(store, key: str, default: Any = None) -> Any:
    return get_json(store, key) if store.check([key]) else default


def counter(store, key: str) -> int:
    return int(store.add(key, 0))


def append(store, log: str, obj: Any) -> int:
    """Append to a multi-writer log kept as `<log>/n` (a counter) + `<log>/<i>` entries."""
    i = int(store.add(f"{log}/n", 1))
    put_json(store, f"{log}/{i}", obj)
    return i


class LogReader:
    """Reads a log written by `append` in order. A writer that reserved an index and died before
    writing it leaves a hole; holes are skipped after `hole_timeout_s` so the reader never blocks."""

    def __init__(self, store, log: str, hole_timeout_s: float = 5.0):
        self.store, self.log, self.hole_timeout_s = store, log, hole_timeout_s
        self.next = 1
        self._hole_since: Optional[float] = None

    def poll(self):
        out = []
        n = int(self.store.add(f"{self.log}/n", 0))
        while self.next <= n:
            key = f"{self.log}/{self.next}"
            if self.store.check([key]):
                out.append(get_json(self.store, key))
                self.next += 1
                self._hole_since = None
                continue
            now = time.time()
            if self._hole_since is None:
                self._hole_since = now
            if now - self._hole_since < self.hole_timeout_s:
                break
            self.next += 1  # the writer died between reserving and writing
            self._hole_since = None
        return out


def die_with_parent() -> None:
    """When started by the local launcher (KINTSUGI_PDEATHSIG=1), die with it: no orphan processes
    even if the launcher is SIGKILLed."""
    if os.environ.get("KINTSUGI_PDEATHSIG") == "1" and sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def resolve_token(configured: str) -> Optional[str]:
    return configured or os.environ.get(TOKEN_ENV) or None
