"""Per-slot checkpoints in torch.distributed.checkpoint (DCP) format: the last-resort rebuild tier
(`recovery.strategy=checkpoint`, or `tiered` with `recovery.checkpoint_every`), the baseline CheckFree
is compared against, and what `train.resume` continues from after a preemption.

Layout: `<run_dir>/checkpoints/step_<k>/r<r>s<s>/` is one DCP directory per slot (`.metadata` +
`*.distcp`), written by that slot's worker alone (`no_dist=True`: no collective, so a worker
writes in the background while its group trains, and a slot's file never waits for another slot).
It holds the stage's weights, optimizer state, lr scale, LISA state, the Streaming DiLoCo outer
state (global copies, momentum, sync counts) and the RNG state: everything an exact resume needs;
the data cursor is the step itself.

Periodic checkpoints: the worker snapshots its stage in memory at a committed step, a background
thread writes it (into `<dir>.tmp`, renamed when complete, so a crash mid-write never leaves a torn
checkpoint) and appends to the store's `ckpt` log; the coordinator declares step k restorable once
every slot has written it. A rollback restores every slot to that step.

Suspend (`save_now`): when the whole job is being preempted (Slurm's warning signal to every task,
no spare left to hand off to), each worker writes its replica's last committed step synchronously
and exits; `train.resume` then continues every replica from its own newest complete step.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
import warnings
from typing import Dict, List, Optional

import torch

from recovery import protocol as P

log = logging.getLogger("kintsugi.checkpoint")


def checkpoint_path(run_dir: str, step: int, slot) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step}", f"r{slot[0]}s{slot[1]}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))


# --- DCP read / write of one slot's snapshot ----------------------------------------------------------
class _Tree:
    """The snapshot's structure with tensors replaced by their index: saved by DCP as one pickled
    object, so int keys (optimizer state), empty dicts and None survive exactly."""

    def __init__(self, tree):
        self.tree = tree


class _Ref:
    def __init__(self, i: int):
        self.i = i


def _split(obj, tensors: List[torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach().cpu())
        return _Ref(len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, tensors) for v in obj)
    return obj


def _join(obj, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, _Ref):
        return tensors[f"t{obj.i}"]
    if isinstance(obj, dict):
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_join(v, tensors) for v in obj)
    return obj


def write_snapshot(snap: dict, path: str) -> None:
    """Write `snap` (nested dicts / lists of tensors and plain values) as a DCP checkpoint at `path`."""
    import torch.distributed.checkpoint as dcp
    tensors: List[torch.Tensor] = []
    tree = _split(snap, tensors)
    state = {f"t{i}": t for i, t in enumerate(tensors)}
    state["tree"] = _Tree(tree)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no_dist's deprecation notice; it is exactly what we need
        dcp.save(state, checkpoint_id=tmp, no_dist=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def read_snapshot(path: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    if not is_complete(path):
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    meta = FileSystemReader(path).read_metadata()
    state = {k: (torch.empty(v.size, dtype=v.properties.dtype) if isinstance(v, TensorStorageMetadata) else None)
             for k, v in meta.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=path, no_dist=True)
    return _join(state["tree"].tree, state)


# --- what a slot saves -----------------------------------------------------------------------------
def snapshot(state, step: int, diloco=None) -> dict:
    """Copies of everything an exact resume of this stage needs (cheap: memory copies only)."""
    return {"params": {k: v.detach().clone() for k, v in state.model.state_dict().items()},
            "optimizer": copy.deepcopy(state.optimizer.state_dict()), "lr_scale": state.lr_scale,
            "grad_norm": state.grad_norm, "step_done": step,
            "neighbour_copy": {k: v.clone() for k, v in state.neighbour_copy.items()},
            "lisa": state.lisa.state_dict() if state.lisa is not None else None,
            "diloco": diloco.state_dict(as_if_abandoned=True) if diloco is not None else None,
            "rng": torch.get_rng_state()}


class AsyncCheckpointer:
    def __init__(self, store, run_dir: str, every: int):
        self.store, self.run_dir, self.every = store, run_dir, every
        self._thread: Optional[threading.Thread] = None

    def due(self, committed_step: int) -> bool:
        return self.every > 0 and (committed_step + 1) % self.every == 0

    def save(self, state, slot, step: int, diloco=None) -> None:
        """Snapshot now (cheap copies), write in the background; one write in flight at a time."""
        self.wait()
        snap = snapshot(state, step, diloco)

        def write():
            self._write(snap, slot, step)
            try:
                P.append(self.store, "ckpt", {"slot": list(slot), "step": step})
            except Exception:  # noqa: BLE001 - the run may be ending; the checkpoint is still there
                pass

        self._thread = threading.Thread(target=write, daemon=True, name="kintsugi-ckpt")
        self._thread.start()

    def save_now(self, state, slot, step: int, diloco=None) -> str:
        """Synchronous write (the job is being suspended): returns the path."""
        self.wait()
        return self._write(snapshot(state, step, diloco), slot, step)

    def _write(self, snap: dict, slot, step: int) -> str:
        path = checkpoint_path(self.run_dir, step, slot)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_snapshot(snap, path)
        return path

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def restore(state, run_dir: str, slot, step: int, diloco=None) -> None:
    snap = read_snapshot(checkpoint_path(run_dir, step, slot))
    with torch.no_grad():
        own = state.model.state_dict()
        for k, v in snap["params"].items():
            own[k].copy_(v)
    if state.lisa is not None and snap.get("lisa") is not None:
        state.lisa.load_state_dict(snap["lisa"])
    state.optimizer.load_state_dict(snap["optimizer"])
    state.lr_scale, state.grad_norm, state.step_done = snap["lr_scale"], snap["grad_norm"], snap["step_done"]
    state.neighbour_copy = dict(snap["neighbour_copy"])
    if diloco is not None and snap.get("diloco") is not None:
        diloco.load_state_dict(snap["diloco"], reset_local=False)
    if snap.get("rng") is not None:
        torch.set_rng_state(snap["rng"])


def resume_points(run_dir: str, replicas: int, stages: int) -> Optional[Dict[int, int]]:
    """Per replica, the newest step whose checkpoint every stage of that replica completed; None
    unless every replica has one. Replicas may differ after a suspend (each commits on its own)."""
    root = os.path.join(run_dir, "checkpoints")
    best: Dict[int, int] = {}
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if not name.startswith("step_") or name.endswith(".tmp"):
            continue
        step = int(name[5:])
        for r in range(replicas):
            if all(is_complete(checkpoint_path(run_dir, step, (r, s))) for s in range(stages)):
                best[r] = max(best.get(r, -1), step)
    return best if len(best) == replicas else None
