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
local mode has one coordinator at a time by construction.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Protocol

from .records import write_strict_atomic


class Fenced(RuntimeError):
    """This process no longer leads the run; the write it attempted was not applied."""


class StateStore(Protocol):
    def load(self) -> Optional[dict]:
        """The newest persisted coordinator state, or None when there is none yet."""

    def save(self, state: dict) -> None:
        """Persist `state` whole (or not at all). Raises Fenced when this process no longer leads."""


class FileStateStore:
    """`control_state.json`: strict JSON, written beside it and renamed, fsynced."""

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

    def __repr__(self) -> str:
        return f"FileStateStore({os.path.basename(self.path)})"
