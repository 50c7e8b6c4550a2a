"""The coordinator's side of its store: sealed writes, verified reads, mail, the version bump.

Every part of the coordinator (membership, the ledger, the reactions to faults) writes through one
`Board`, so every record it leaves in the store is sealed with the current incarnation's key.
"""
from __future__ import annotations

from typing import Any, Optional

from . import protocol as P
from .auth import Auth


class Board:
    def __init__(self, store, auth: Auth):
        self.store, self.auth = store, auth

    def put(self, key: str, obj: Any) -> None:
        P.put_json(self.store, key, obj, auth=self.auth)

    def get(self, key: str, default: Any = None) -> Any:
        """The verified value, or `default` when missing or forged (counted as dropped)."""
        return P.get_json_or(self.store, key, default, auth=self.auth)

    def mail(self, wid: str, obj: Any) -> None:
        P.append(self.store, f"mail/{wid}", obj, auth=self.auth)

    def bump(self) -> int:
        """Watchers poll only `version`: a new value makes them read the plans again."""
        return int(self.store.add("version", 1))

    def refuse(self, wid: str) -> None:
        """An unsealed refusal: a worker whose token is wrong cannot verify a sealed one."""
        self.store.set(f"ack/{wid}", "refused")

    def check(self, keys) -> bool:
        return self.store.check(list(keys))

    def raw(self, key: str) -> Optional[bytes]:
        return self.store.get(key) if self.store.check([key]) else None
