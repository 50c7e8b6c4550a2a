"""The coordinator's side of its store: sealed writes, verified reads, mail, the version bump.

Every part of the coordinator (membership, the ledger, the reactions to faults) writes through one
`Board`, so every record it leaves in the store is sealed with the current incarnation's key.

Write-ahead (`hold_writes()`, recovery.control=etcd): from then on the board's writes wait, in
order, until `release()`, which the coordinator calls once the state that caused them is saved and
it still leads. A worker can then never see a plan, an acknowledgement or a counter that a successor
would not find in etcd, and a deposed leader's last writes never reach anyone. `recorded/<r>` goes
out at once: what it says is already in metrics.jsonl, which a successor reads.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from . import protocol as P
from .auth import Auth


UNHELD = ("recorded/",)  # keys written at once even under write-ahead (see the module's docstring)


class Board:
    def __init__(self, store, auth: Auth):
        self.store, self.auth = store, auth
        self._held: Optional[List[Callable[[], Any]]] = None
        self._version = 0  # the store's `version` as last seen (a held bump cannot read it)

    # --- write-ahead --------------------------------------------------------------------------------
    def hold_writes(self) -> None:
        self._version = int(self.store.add("version", 0))
        self._held = []

    @property
    def holding(self) -> bool:
        """Writes wait for a save."""
        return bool(self._held)

    def release(self) -> None:
        """Write what waited, in order (sealed now: sequence numbers follow the store's order)."""
        while self._held:
            self._held.pop(0)()

    def _write(self, fn: Callable[[], Any], key: str = "") -> None:
        if self._held is None or key.startswith(UNHELD):
            fn()
        else:
            self._held.append(fn)

    def put(self, key: str, obj: Any) -> None:
        self._write(lambda: P.put_json(self.store, key, obj, auth=self.auth), key)

    def get(self, key: str, default: Any = None) -> Any:
        """The verified value, or `default` when missing or forged (counted as dropped)."""
        return P.get_json_or(self.store, key, default, auth=self.auth)

    def mail(self, wid: str, obj: Any) -> None:
        self._write(lambda: P.append(self.store, f"mail/{wid}", obj, auth=self.auth))

    def bump(self) -> int:
        """Watchers poll only `version`: a new value makes them read the plans again. Held, it
        returns the value it will have (only this board adds to it)."""
        def add() -> None:
            self._version = int(self.store.add("version", 1))
        if self._held is None:
            add()
            return self._version
        self._held.append(add)
        self._version += 1
        return self._version

    def refuse(self, wid: str) -> None:
        """An unsealed refusal: a worker whose token is wrong cannot verify a sealed one."""
        self.store.set(f"ack/{wid}", "refused")

    def check(self, keys) -> bool:
        return self.store.check(list(keys))

    def raw(self, key: str) -> Optional[bytes]:
        return self.store.get(key) if self.store.check([key]) else None
