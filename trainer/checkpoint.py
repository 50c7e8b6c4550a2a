"""Asynchronous per-slot checkpoints: the last-resort rebuild tier (`recovery.strategy=checkpoint`,
or `tiered` with `recovery.checkpoint_every`) and the baseline CheckFree is compared against.

Each worker snapshots its stage (weights, optimizer, lr scale, LISA state) in memory at a committed
step, then a background thread writes it with torch.save to `<run_dir>/checkpoints/step_<k>/r<r>s<s>.pt`
(tmp file + rename, so a crash mid-write never leaves a torn file) and appends to the store's `ckpt`
log. The coordinator declares step k restorable once every slot has written it. A rollback restores
every slot of the job to that step: the whole job loses the work since then, which is the cost the
CheckFree tiers avoid.
"""
from __future__ import annotations

import copy
import os
import threading
from typing import Optional

import torch

from recovery import protocol as P


def checkpoint_path(run_dir: str, step: int, slot) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step}", f"r{slot[0]}s{slot[1]}.pt")


class AsyncCheckpointer:
    def __init__(self, store, run_dir: str, every: int):
        self.store, self.run_dir, self.every = store, run_dir, every
        self._thread: Optional[threading.Thread] = None

    def due(self, committed_step: int) -> bool:
        return self.every > 0 and (committed_step + 1) % self.every == 0

    def save(self, state, slot, step: int) -> None:
        """Snapshot now (cheap copies), write in the background; one write in flight at a time."""
        if self._thread is not None:
            self._thread.join()
        snap = {"params": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
                "optimizer": copy.deepcopy(state.optimizer.state_dict()), "lr_scale": state.lr_scale,
                "grad_norm": state.grad_norm, "step_done": step,
                "neighbour_copy": {k: v.clone() for k, v in state.neighbour_copy.items()},
                "lisa": state.lisa.state_dict() if state.lisa is not None else None}
        path = checkpoint_path(self.run_dir, step, slot)

        def write():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(snap, path + ".tmp")
            os.replace(path + ".tmp", path)
            try:
                P.append(self.store, "ckpt", {"slot": list(slot), "step": step})
            except Exception:  # noqa: BLE001 - the run may be ending; the file is still there
                pass

        self._thread = threading.Thread(target=write, daemon=True, name="kintsugi-ckpt")
        self._thread.start()


def restore(state, run_dir: str, slot, step: int) -> None:
    snap = torch.load(checkpoint_path(run_dir, step, slot), weights_only=False)
    with torch.no_grad():
        own = state.model.state_dict()
        for k, v in snap["params"].items():
            own[k].copy_(v)
    if state.lisa is not None and snap.get("lisa") is not None:
        state.lisa.load_state_dict(snap["lisa"])
    state.optimizer.load_state_dict(snap["optimizer"])
    state.lr_scale, state.grad_norm, state.step_done = snap["lr_scale"], snap["grad_norm"], snap["step_done"]
    state.neighbour_copy = dict(snap["neighbour_copy"])
