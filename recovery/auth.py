"""Authenticated control records: nobody without the run's token can steer it.

Threat model. Anyone who reaches the coordinator's port can read and write any key of its store (a
TCPStore has no access control). The token is a shared secret given to the coordinator and to every
worker out of band (the environment, a 0600 file); it never travels or rests in the store. Every
record the control plane writes (plans, acknowledgements, heartbeats, commits, reports, ...) is
sealed with an HMAC-SHA256 keyed from the token and the run, over the record's place (key name, or
log name and index, and the coordinator incarnation) and its JSON bytes. Readers drop anything whose
seal does not verify and log it. So a client without the token can neither forge a record (evict a
worker, end the run, steer a generation) nor replay a genuine one elsewhere (another index, another
incarnation): the place is part of what is sealed. It can still deny service (delete or overwrite
keys, flood the port): the control plane then stalls or re-plans, it is not steered. The data plane
(gloo's point-to-point traffic, group formation keys) is not authenticated: it assumes a private
network (a VPC, or a WireGuard mesh for machines on the internet).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from typing import Any

log = logging.getLogger(__name__)
_MAX_RECORD = 64 << 20  # a sealed record larger than this is refused before parsing


class Forged(ValueError):
    """A record whose seal does not verify (or that is not a sealed record at all)."""


def new_token() -> str:
    return secrets.token_hex(16)


def derive_key(token: str, run_id: str) -> bytes:
    return hmac.new(token.encode(), b"kintsugi-control\x00" + run_id.encode(), hashlib.sha256).digest()


class Auth:
    """Seals and opens control records. `scope` names where a record lives ("cell/0",
    "commit#17"); `boot` (the coordinator incarnation) is part of every scope but the boot
    record's own, so a record from one incarnation is worthless in the next."""

    def __init__(self, token: str, run_id: str, boot: str = ""):
        if not token:
            raise ValueError("a run always has a token")
        self.key = derive_key(token, run_id)
        self.run_id, self.boot = run_id, boot
        self._dropped = 0
        self._last_warn = 0.0

    def _mac(self, scope: str, body: str, with_boot: bool = True) -> str:
        place = f"{self.boot}/{scope}" if with_boot else scope
        return hmac.new(self.key, place.encode() + b"\x00" + body.encode(), hashlib.sha256).hexdigest()

    def seal(self, scope: str, obj: Any, with_boot: bool = True) -> str:
        body = json.dumps(obj, allow_nan=False, separators=(",", ":"))
        return json.dumps({"b": body, "m": self._mac(scope, body, with_boot)}, separators=(",", ":"))

    def open(self, scope: str, raw, with_boot: bool = True) -> Any:
        """The record's content, or Forged."""
        if isinstance(raw, (bytes, bytearray, memoryview)):
            if len(raw) > _MAX_RECORD:
                raise Forged(f"{scope}: a record of {len(raw)} bytes")
            raw = bytes(raw).decode("utf-8", "replace")
        try:
            env = json.loads(raw)
            body, mac = env["b"], env["m"]
            if not isinstance(body, str) or not isinstance(mac, str):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            raise Forged(f"{scope}: not a sealed record") from None
        if not hmac.compare_digest(mac, self._mac(scope, body, with_boot)):
            raise Forged(f"{scope}: the seal does not verify")
        try:
            return json.loads(body)
        except ValueError:
            raise Forged(f"{scope}: sealed but not JSON") from None

    def dropped(self, err: Exception) -> None:
        """Count and log (at most every 5 s) a record that failed verification."""
        self._dropped += 1
        now = time.monotonic()
        if now - self._last_warn > 5.0:
            self._last_warn = now
            log.warning("dropped a record that failed verification (%s); %d so far", err, self._dropped)

    @property
    def dropped_count(self) -> int:
        return self._dropped
