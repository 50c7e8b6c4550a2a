"""Authenticated, fresh control records: nobody without the run's token can steer the run, and
nobody can replay or rewind what those with it wrote.

Threat model. Anyone who reaches the coordinator's port can read and write any key of its store (a
TCPStore has no access control). The token is a shared secret given to the coordinator and to every
worker out of band (the environment, a 0600 file); it never travels or rests in the store.

Origin. Every record the control plane writes is sealed with an HMAC-SHA256 keyed from the token and
the run, over the record's place (key name, or log name and index, and the coordinator incarnation's
`boot`), its writer, its sequence number and its JSON bytes. Readers drop anything whose seal does not
verify (`Forged`). The run's id itself is sealed with a key from the token alone (`seal_run_id`).

Freshness. A seal proves who wrote a value, not that it is the newest one. Every writer (a process)
has an id and numbers its records 1, 2, 3, ...; a reader remembers, per key and writer, the last
number it accepted and refuses an older one (`Stale`, a kind of Forged): a copy of an old genuine
value written back under its key changes nothing. Log entries must strictly increase per writer (an
entry is read once, so a second copy is a replay). The coordinator's incarnation increases with
every restart and is learnt by a challenge (`recovery.control`), so an old incarnation's records
cannot pass for the new one's.

What remains possible without the token: deny service (delete or overwrite keys, flood the port).
The control plane then stalls, re-plans or restarts its store; it is not steered. The data plane
(gloo's traffic, group formation keys) is not authenticated: it assumes a private network.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger(__name__)
_MAX_RECORD = 64 << 20  # a sealed record larger than this is refused before parsing


class Forged(ValueError):
    """A record whose seal does not verify (or that is not a sealed record at all)."""

    kind = "forged"


class Stale(Forged):
    """A genuine record older than one already accepted from the same writer: a replay."""

    kind = "stale"


def new_token() -> str:
    return secrets.token_hex(16)


def derive_key(token: str, run_id: str) -> bytes:
    return hmac.new(token.encode(), b"kintsugi-control\x00" + run_id.encode(), hashlib.sha256).digest()


def _run_id_mac(token: str, run_id: str) -> str:
    return hmac.new(token.encode(), b"kintsugi-run-id\x00" + run_id.encode(), hashlib.sha256).hexdigest()


def seal_run_id(token: str, run_id: str) -> str:
    """The `run_id` key's value: the id and a MAC from the token alone (every other key derives from
    the run id, so it cannot be checked with them)."""
    return json.dumps({"run_id": run_id, "m": _run_id_mac(token, run_id)}, separators=(",", ":"))


def open_run_id(token: str, raw) -> str:
    """The run id, or Forged when it was not written by a holder of `token`."""
    try:
        env = json.loads(bytes(raw).decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else raw)
        run_id, mac = env["run_id"], env["m"]
        if not isinstance(run_id, str) or not isinstance(mac, str):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise Forged("run_id: not a sealed record") from None
    if not hmac.compare_digest(mac, _run_id_mac(token, run_id)):
        raise Forged("run_id: the seal does not verify")
    return run_id


def writer_id(role: str) -> str:
    """A process's writer id: unique per process life, so a restarted process numbers afresh."""
    return f"{role}:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Auth:
    """Seals and opens control records. `scope` names where a record lives ("cell/0",
    "commit#17"); `boot` (the coordinator incarnation) is part of every scope but a few bootstrap
    records', so a record from one incarnation is worthless in the next."""

    def __init__(self, token: str, run_id: str, boot: str = "", writer: Optional[str] = None):
        if not token:
            raise ValueError("a run always has a token")
        self.key = derive_key(token, run_id)
        self.run_id, self.boot = run_id, boot
        self.writer = writer or writer_id("p")
        self._seq = 0
        self._lock = threading.Lock()
        self._seen: Dict[Tuple[str, str], int] = {}  # (key, writer) -> last sequence number accepted
        self.max_index: Dict[str, int] = {}  # log -> the highest index this writer appended at
        self._dropped: Counter = Counter()
        self._last_warn = 0.0

    def private_key(self, name: str) -> str:
        """A store key that only holders of the token can name: `name` and a tag derived from the
        token and the run. TCPStore lists no keys, so a client without the token cannot find the
        key to overwrite, rewind or delete it (an eavesdropper on the network still can: the
        store's traffic is not encrypted). For keys whose loss alone does harm: a beat that
        someone keeps overwriting with garbage reads as no beat, and evicts a live worker."""
        tag = hmac.new(self.key, b"key-name\x00" + name.encode(), hashlib.sha256).hexdigest()[:24]
        return f"{name}/{tag}"

    def _mac(self, scope: str, writer: str, seq: int, body: str, with_boot: bool) -> str:
        place = f"{self.boot}/{scope}" if with_boot else scope
        msg = b"\x00".join((place.encode(), writer.encode(), str(seq).encode(), body.encode()))
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest()

    def seal(self, scope: str, obj: Any, with_boot: bool = True) -> str:
        body = json.dumps(obj, allow_nan=False, separators=(",", ":"))
        with self._lock:
            self._seq += 1
            seq = self._seq
        return json.dumps({"b": body, "w": self.writer, "s": seq, "m": self._mac(scope, self.writer, seq, body,
                                                                                   with_boot)},
                          separators=(",", ":"))

    def open_record(self, scope: str, raw, with_boot: bool = True) -> Tuple[Any, str, int]:
        """(content, writer, sequence number) of a record whose seal verifies, or Forged."""
        if isinstance(raw, (bytes, bytearray, memoryview)):
            if len(raw) > _MAX_RECORD:
                raise Forged(f"{scope}: a record of {len(raw)} bytes")
            raw = bytes(raw).decode("utf-8", "replace")
        try:
            env = json.loads(raw)
            body, writer, seq, mac = env["b"], env["w"], env["s"], env["m"]
            if not (isinstance(body, str) and isinstance(writer, str) and type(seq) is int and isinstance(mac, str)):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            raise Forged(f"{scope}: not a sealed record") from None
        if not hmac.compare_digest(mac, self._mac(scope, writer, seq, body, with_boot)):
            raise Forged(f"{scope}: the seal does not verify")
        try:
            return json.loads(body), writer, seq
        except ValueError:
            raise Forged(f"{scope}: sealed but not JSON") from None

    def open(self, scope: str, raw, with_boot: bool = True, fresh: str = "key") -> Any:
        """The record's content if its seal verifies and it is fresh: under `fresh="key"` not older
        than the last record accepted from its writer under this scope (the same record read again
        is fine); under `fresh="log"` strictly newer than any entry accepted from its writer in
        this log (`scope` is then the log's name); `fresh=None`: no check. Forged or Stale."""
        obj, writer, seq = self.open_record(scope, raw, with_boot)
        if fresh == "key":
            self.check_fresh(scope, writer, seq, strict=False)
        elif fresh == "log":
            self.check_fresh("log:" + scope.split("#")[0], writer, seq, strict=True)
        return obj

    def check_fresh(self, where: str, writer: str, seq: int, strict: bool) -> None:
        key = (where, writer)
        with self._lock:
            last = self._seen.get(key)
            if last is not None and (seq < last or (strict and seq == last)):
                raise Stale(f"{where}: record {seq} of {writer} after {last} (a replay)")
            self._seen[key] = seq

    def dropped(self, err: Exception) -> None:
        """Count (by kind) and log (at most every 5 s) a record that failed verification."""
        self._dropped[getattr(err, "kind", "forged")] += 1
        now = time.monotonic()
        if now - self._last_warn > 5.0:
            self._last_warn = now
            log.warning("dropped a record that failed verification (%s); %d so far", err, self.dropped_count)

    def drop(self, kind: str, why: str) -> None:
        """Count a tampering that is not a bad record (a log counter wound back, a key overwritten)."""
        self.dropped(type("Tampering", (Forged,), {"kind": kind})(why))

    @property
    def dropped_count(self) -> int:
        return sum(self._dropped.values())

    @property
    def dropped_by_kind(self) -> Dict[str, int]:
        return dict(self._dropped)
