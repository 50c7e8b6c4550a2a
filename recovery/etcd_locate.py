"""Where the run's coordinator is, for the processes that talk to it (workers, the local launcher,
`kintsugi join`) when `recovery.control=etcd`: the address the leader published in etcd.

Workers learn the cluster from their environment, like the token: `KINTSUGI_ETCD_ENDPOINTS`
(comma-separated client URLs) and `KINTSUGI_ETCD_PREFIX` (the run's `recovery.etcd.prefix`), plus
the credentials of recovery.etcd_client (`KINTSUGI_ETCD_USER`, `..._PASSWORD[_FILE]`, TLS files);
a role that may only read the prefix is enough. Launchers set them for the processes they start
(`worker_env`). Without `KINTSUGI_ETCD_ENDPOINTS` nothing here is imported (the local mode).

A `Locator` answers "who leads now" from one cached read (`CACHE_S`): a recovery.control.Control
asks it when its coordinator is away (and while a request to it hangs), and moves to the new
leader's address once that leader has published it. An address from etcd is never trusted alone:
the Control still verifies the store's identity with the run's token before it talks to it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Dict, Mapping, Optional

from .etcd_client import EtcdClient, EtcdSettings
from .etcd_election import LeaderInfo, find_leader

log = logging.getLogger(__name__)

ENV_ENDPOINTS, ENV_PREFIX = "KINTSUGI_ETCD_ENDPOINTS", "KINTSUGI_ETCD_PREFIX"
ENV_TIMEOUT = "KINTSUGI_ETCD_REQUEST_TIMEOUT_S"
CACHE_S = 0.25   # one etcd read per quarter second at most, however many callers ask


class Locator:
    def __init__(self, settings: EtcdSettings, client: Optional[EtcdClient] = None):
        self.settings = settings
        self.client = client or EtcdClient.from_settings(settings)
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._info: Optional[LeaderInfo] = None
        self._outage = False
        self._state: Optional[str] = None
        self._state_at = float("-inf")

    def current(self) -> Optional[LeaderInfo]:
        """The leader that published its address, or None (no leader yet, or etcd unreachable)."""
        with self._lock:
            now = time.monotonic()
            if now - self._at < CACHE_S:
                return self._info
            try:
                info = find_leader(self.client, self.settings.prefix)
                self._outage = False
            except Exception as e:  # noqa: BLE001 - etcd away: keep training, ask again later
                if not self._outage:
                    log.warning("cannot read the run's leader from etcd (%s); retrying", str(e).splitlines()[0][:200])
                self._outage = True
                info = None
            self._at = time.monotonic()
            self._info = info if info is not None and info.address else None
            return self._info

    def run_state(self) -> Optional[str]:
        """The run's state in etcd, read at most once a second: None (none there, or unreadable),
        "running", or how it ended ("finished", ...). Only a leader holding the lease writes it."""
        with self._lock:
            now = time.monotonic()
            if now - self._state_at < 1.0:
                return self._state
            self._state_at = now
            try:
                kv = self.client.get(self.settings.prefix + "state")
                ended = json.loads(kv["value"])["state"].get("ended") if kv is not None else None
                self._state = None if kv is None else str(ended) if ended else "running"
            except Exception:  # noqa: BLE001 - unreadable or unreachable: nothing known
                self._state = None
            return self._state

    def ended(self) -> Optional[str]:
        """How the run ended when its state in etcd says so, else None: a worker whose coordinator
        closed its store before the worker read `shutdown` learns here that nobody will lead again."""
        state = self.run_state()
        return state if state not in (None, "running") else None

    def newer_than(self, epoch: int) -> Optional[LeaderInfo]:
        info = self.current()
        return info if info is not None and info.epoch > epoch else None

    def wait(self, timeout_s: float) -> LeaderInfo:
        """The leader, once one has published its address; RuntimeError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.current()
            if info is not None:
                return info
            if time.monotonic() > deadline:
                raise RuntimeError(f"no coordinator published its address under {self.settings.prefix} in etcd "
                                   f"within {timeout_s:.0f}s; start one (kintsugi coordinator) or check "
                                   f"{ENV_PREFIX}")
            time.sleep(CACHE_S)


def worker_env(settings: EtcdSettings) -> Dict[str, str]:
    """What a launcher adds to a worker's environment (nothing secret: credentials stay where they are)."""
    env = {ENV_ENDPOINTS: ",".join(settings.endpoints), ENV_PREFIX: settings.prefix,
           ENV_TIMEOUT: str(settings.request_timeout_s)}
    from .etcd_client import ENV_CA, ENV_CERT, ENV_KEY, ENV_PASSWORD_FILE, ENV_USER
    for var, value in ((ENV_USER, settings.user), (ENV_PASSWORD_FILE, settings.password_file),
                       (ENV_CA, settings.ca_file), (ENV_CERT, settings.cert_file), (ENV_KEY, settings.key_file)):
        if value:  # paths and a user name from the config; the password itself never travels here
            env[var] = value
    return env


_shared: Dict[tuple, Locator] = {}
_shared_lock = threading.Lock()


def from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[Locator]:
    """This process's locator (one per settings, shared by its connections), or None without
    KINTSUGI_ETCD_ENDPOINTS. ValueError (one line) for a bad value or incomplete credentials."""
    env = os.environ if environ is None else environ
    endpoints = env.get(ENV_ENDPOINTS, "").strip()
    if not endpoints:
        return None
    prefix = env.get(ENV_PREFIX, "").strip()
    if not prefix:
        raise ValueError(f"{ENV_ENDPOINTS} is set but {ENV_PREFIX} is not: set it to the run's recovery.etcd.prefix")
    try:
        timeout = float(env.get(ENV_TIMEOUT) or 2.0)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}={env.get(ENV_TIMEOUT)!r} is not a number of seconds") from None
    settings = EtcdSettings(endpoints=endpoints, prefix=prefix, request_timeout_s=timeout)
    key = (settings.endpoints, settings.prefix)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Locator(settings, EtcdClient.from_settings(settings, env))
        return _shared[key]
