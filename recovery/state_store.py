"""Where the coordinator's state rests between its writes: the `StateStore` seam.

The coordinator persists its whole state (membership, slots, generations, pending rebuilds,
committed-step watermarks, counters) as one JSON object on every change and reads it back when it
starts again. Two implementations sit behind one small protocol:

- `FileStateStore`: `control_state.json` in the run directory, written atomically (the local mode;
  it imports nothing beyond the standard library and `recovery.records`).
- `recovery.etcd_state.EtcdStateStore`: one key in etcd, written by a transaction that only the
  current leader's can pass (`recovery.control=etcd`).

`Fenced` is how a store says "you no longer lead": the caller must stop acting on the run (publish
no plan, accept no join) and may campaign again as a standby. The file store never raises it: the
local mode has one coordinator at a time by construction. `Unavailable` says "not written now, try
again": etcd without a quorum is no deposition (the leader's lease decides that).

Beside `load` and `save`, a store tells the coordinator how to use it:

- `write_ahead`: whether what the coordinator writes to its TCPStore (plans, acknowledgements,
  counters) must wait until the state that caused it is saved (etcd: a successor must find in the
  store every plan and membership that workers could have seen). The file store: no, as before.
- `due(state, waiting)` (`state()` builds the state, only if needed): whether to save this dirty state now. The file store: always. etcd: at
  once when writes wait on it or the control part changed, else (watermarks only) at most every
  `recovery.etcd.flush_s`.
- `leading()`: whether this process may still act on the run (always, for the file store; etcd: it
  may wait out a suspended lease, up to recovery.etcd.lease_grace_s).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Protocol

from .records import write_strict_atomic


class Fenced(RuntimeError):
    """This process no longer leads the run; the write it attempted was not applied."""


class Unavailable(RuntimeError):
    """The state could not be saved now (no quorum, a timeout); nothing says this process was deposed."""


class StateStore(Protocol):
    write_ahead: bool

    def load(self) -> Optional[dict]:
        """The newest persisted coordinator state, or None when there is none yet."""

    def save(self, state: dict) -> None:
        """Persist `state` whole (or not at all). Raises Fenced when this process no longer leads,
        Unavailable when it cannot tell (retry later), OSError for a local failure."""

    def due(self, state: Callable[[], dict], waiting: bool) -> bool:
        """Whether the dirty state (`state()` builds it) is to be saved now; `waiting`: store
        writes wait on it."""

    def leading(self) -> bool:
        """Whether this process may still act on the run."""


class FileStateStore:
    """`control_state.json`: strict JSON, written beside it and renamed, fsynced."""

    write_ahead = False

    def __init__(self, path: str):
        self.path = path

    def load(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def save(self, state: dict) -> None:
        write_strict_atomic(self.path, state, fsync=True)

    def due(self, state: Callable[[], dict], waiting: bool) -> bool:
        return True

    def leading(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"FileStateStore({os.path.basename(self.path)})"
