"""Where a worker's stage runs, and the data plane it trains over: the trainer's side of
`parallel.device`.

- `bind(job)`: at worker start, resolve `train.device` on this machine and make the worker's GPU
  current (which GPU: `device.local_index` for the launcher that started it; the local launcher
  passes its count of started workers as KINTSUGI_WORKER_INDEX, `kintsugi join` marks its workers
  with KINTSUGI_LAUNCHER=join), then select the codec kernels (`compression.kernels`) for it.
- `cell_transport`: one generation's `Transport`. gloo carries everything on CPU stages and, under
  `parallel.backend=gloo`, CUDA activations staged through pinned host memory; under
  `parallel.backend=nccl` an NCCL group of the same ranks carries activations and gradients while
  the gloo group keeps the commit chain and state packages. Each NCCL group is new per generation
  and aborted, never reused, once retired (`parallel.groups.NcclGroup.close`).
- `to_device`: a CPU batch onto the stage's device, from pinned memory without blocking the host.
- `describe`: the device in words for logs and summary.json ("cuda:0 NVIDIA H100 80GB HBM3").

The state that leaves a worker (packages, checkpoints, dumps, final weights) is always CPU tensors;
what comes back is copied into the stage's device parameters, so a GPU stage can be rebuilt on a
CPU spare and back.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping, Optional, Tuple

import torch

from kintsugi.kernels import dispatch
from kintsugi.parallel import device as D
from kintsugi.parallel.groups import Group, form_group
from kintsugi.parallel.transport import Transport

log = logging.getLogger("kintsugi.worker")
LAUNCHER_ENV = "KINTSUGI_LAUNCHER"          # overrides launcher.name for binding (`kintsugi join`)
WORKER_INDEX_ENV = "KINTSUGI_WORKER_INDEX"  # the local launcher's index of this worker on the machine


class DeviceError(ValueError):
    """This worker process cannot run the job's `train.device` / `compression.kernels` (one line)."""


def bind(job, env: Optional[Mapping[str, str]] = None) -> torch.device:
    """Bind this worker process to its device and select its kernels; returns the device. Raises
    DeviceError (one line naming the key and the fix) where that cannot run here."""
    env = os.environ if env is None else env
    launcher = env.get(LAUNCHER_ENV) or job.launcher.name
    index = env.get(WORKER_INDEX_ENV, "0")
    try:
        if not index.isdigit():
            raise ValueError(f"{WORKER_INDEX_ENV}={index!r} is not a worker index; start workers with a "
                             "Kintsugi launcher")
        dev = D.bind_worker(job.train.device, launcher, env, int(index))
        dispatch.configure(job.compression.kernels, dev.type)  # per process: each worker chooses for its device
    except ValueError as e:
        raise DeviceError(str(e)) from None
    log.info("stage device %s, kernels %s", describe(dev), dispatch.active_backend())
    return dev


def announce(control, wid: str, slot, dev: torch.device) -> None:
    """Record where a slot runs (an event row of metrics.jsonl; summary.json reports it)."""
    control.append_later("event", {"kind": "device", "slot": list(slot), "wid": wid, "device": describe(dev),
                                   "kernels": dispatch.active_backend()})


def describe(dev: torch.device) -> str:
    if dev.type != "cuda":
        return str(dev)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """`t` (a CPU batch) on `dev`. To a GPU: through pinned memory with a non-blocking copy, so the
    host goes on launching kernels (the pinned block is not reused before the copy completed)."""
    if dev.type != "cuda":
        return t
    return t.pin_memory().to(dev, non_blocking=True)


def codecs(compression) -> dict:
    """The transport's codecs per channel (`compression.activations` / `gradients`); {} when none."""
    c = compression
    if c.activations == "none" and c.gradients == "none":
        return {}
    from kintsugi.compression.codecs import get_codec
    return {"p2p": get_codec(c.activations, c.block_size), "p2p_grad": get_codec(c.gradients, c.block_size)}


def cell_transport(job, connect, prefix: str, rank: int, world: int, group: Group, abort, counter,
                   dev: torch.device) -> Tuple[Transport, Optional[Group]]:
    """The generation's transport over the formed gloo `group`, and the NCCL data group it carries
    activations and gradients on (None unless parallel.backend=nccl; the caller retires it with the
    gloo group). The NCCL group forms after the previous generation's groups were closed (aborted):
    a kernel stuck on a dead peer holds the GPU's stream until its communicator is aborted."""
    deadline_s = job.recovery.p2p_deadline_s
    data_group = None
    if job.parallel.backend == "nccl":
        data_group = form_group(connect, f"{prefix}/nccl", rank, world, job.recovery.init_timeout_s, abort=abort,
                                backend="nccl", device=dev)
        data_group.deadline_s = deadline_s
    transport = Transport(group, abort, counter, codecs(job.compression), device=dev, data_group=data_group,
                          deadline_s=deadline_s)
    return transport, data_group


def stage_group(job, connect, prefix: str, rank: int, world: int, abort, dev: torch.device) -> Group:
    """The data-parallel baseline's gradient all-reduce group: NCCL under parallel.backend=nccl
    (its collectives polled under recovery.p2p_deadline_s by compression.all_reduce), else gloo."""
    timeout_s = job.recovery.init_timeout_s
    if job.parallel.backend != "nccl":
        return form_group(connect, prefix, rank, world, timeout_s, abort=abort)
    group = form_group(connect, prefix, rank, world, timeout_s, abort=abort, backend="nccl", device=dev)
    group.deadline_s = job.recovery.p2p_deadline_s
    return group


def log_memory(dev: torch.device, what: str) -> None:
    """GPU memory in use, once per generation: communicator create / abort cycles have leaked
    memory with some NCCL versions, and this is where a leak shows."""
    if dev.type == "cuda":
        log.info("%s: GPU memory in use %.0f MiB", what, D.memory_in_use(dev) / 2**20)
