"""Where a stage runs, and the lines that touch CUDA: device binding, pinned host staging (side
streams, events), NCCL communicators (creation, abort) and CPU-only loading of what a GPU saved.

Everything else in the data path is device-agnostic and runs in the CPU tests; this module keeps
the CUDA-only lines few and behind interfaces that also exist on CPU:

- Binding. `local_index(launcher, env, worker_index, num_gpus)` picks which of the machine's visible
  GPUs a worker uses: the local launcher goes round-robin over them (more stage processes than GPUs
  share, which gloo allows and NCCL refuses), torchrun and DeepSpeed by LOCAL_RANK, Slurm one GPU per
  task by SLURM_LOCALID, `kintsugi join` one worker per device (`join_devices`, each worker sees its
  device as cuda:0). `bind_worker` resolves `train.device` ("auto" is CUDA when one is visible) and
  makes the device current.
- Staging. gloo cannot send CUDA tensors. `HostStager` copies device -> host into pooled pinned
  buffers on a side stream ordered after the compute stream, and reports completion by a CUDA event;
  host -> device the same way, the compute stream waiting on the event (no CPU block). On CPU the
  copies are synchronous and events are complete at once, so the staged path of `Transport` (its
  sender thread, the buffer pool) runs in CPU tests.
- NCCL. `nccl_backend` builds a non-blocking communicator with the error handling that keeps a
  survivor alive (`NCCL_ENV`); `abort_backend` aborts it from a helper thread under a deadline and
  exits the process if the abort itself hangs. `require_nccl` fails with one line where NCCL cannot run.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .waiter import call_with_deadline

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
LAUNCHERS = ("local", "torchrun", "deepspeed", "slurm", "join")
# TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (CleanUpOnly): on an error or timeout torch's watchdog aborts the
# communicator but never tears the process down (1 and 3 do), so a survivor of a dead peer lives on
# and rebuilds. The heartbeat monitor would kill a process whose watchdog is stuck in an abort; our
# own deadline (`abort_backend`) decides that instead, with a status that says why.
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_ENABLE_MONITORING": "0"}


# --- binding --------------------------------------------------------------------------------------
def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(requested: str, num_gpus: Optional[int] = None) -> str:
    """"cpu" or "cuda" for `train.device` (`auto`: CUDA when a GPU is visible)."""
    if requested not in DEVICES:
        raise ValueError(f"train.device={requested!r} is unknown; use one of {', '.join(DEVICES)}")
    n = cuda_count() if num_gpus is None else num_gpus
    if requested == "auto":
        return "cuda" if n > 0 else "cpu"
    if requested == "cuda" and n == 0:
        raise ValueError("train.device=cuda: no CUDA device is visible here (torch.cuda.is_available() is "
                         "False or CUDA_VISIBLE_DEVICES is empty); use train.device=auto or train.device=cpu")
    return requested


def _env_int(env: Mapping[str, str], key: str, launcher: str) -> int:
    value = env.get(key)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise ValueError(f"launcher={launcher}: {key} is {'missing' if value is None else repr(value)} in this "
                         f"worker's environment; start workers with the {launcher} launcher (it sets {key})")
    return int(value)


def local_index(launcher: str, env: Mapping[str, str], worker_index: int, num_gpus: int) -> int:
    """Which visible GPU (an index below `num_gpus`) the worker uses. `worker_index`: the local
    launcher's count of workers it started on this machine (spares included); others ignore it."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r} is unknown; use one of {', '.join(LAUNCHERS)}")
    if num_gpus < 1:
        raise ValueError("no CUDA device is visible to bind a worker to; use train.device=cpu")
    if launcher in ("torchrun", "deepspeed"):
        index = _env_int(env, "LOCAL_RANK", launcher)
    elif launcher == "slurm":
        index = _env_int(env, "SLURM_LOCALID", launcher)
    elif launcher == "join":
        index = 0 if num_gpus == 1 else worker_index  # join hides all but the worker's own device
    else:
        index = worker_index
    if launcher in ("torchrun", "deepspeed", "slurm") and index >= num_gpus and num_gpus > 1:
        raise ValueError(f"launcher={launcher}: local rank {index} but this task sees {num_gpus} GPUs; start at "
                         f"most {num_gpus} tasks per node or give each task one GPU (--gpus-per-task=1)")
    return index % num_gpus


def lowest_free_index(taken) -> int:
    """The worker index the local launcher gives a worker it starts: the lowest one no live worker
    holds, so a replacement binds its predecessor's GPU (`local_index` = index % GPUs) and processes
    stay spread evenly over the GPUs however many were replaced."""
    taken = set(taken)
    return next(i for i in range(len(taken) + 1) if i not in taken)


def join_devices(num_workers: int, visible: Sequence[str]) -> List[Optional[str]]:
    """CUDA_VISIBLE_DEVICES for each worker `kintsugi join` starts: one device each, round-robin when
    there are more workers than devices; None (leave the variable alone) without CUDA."""
    if num_workers < 1:
        raise ValueError(f"--workers={num_workers} must be >= 1")
    if not visible:
        return [None] * num_workers
    if num_workers > len(visible):
        log.warning("%d workers on %d GPUs: some share a GPU (fine with gloo, refused by NCCL)", num_workers, len(visible))
    return [visible[i % len(visible)] for i in range(num_workers)]


def bind(device: str, index: int = 0) -> torch.device:
    """Make `device` (index `index` for CUDA) this process's device: allocations, streams and NCCL
    communicators go there. Returns it as a torch.device."""
    if device == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def bind_worker(requested: str, launcher: str, env: Optional[Mapping[str, str]] = None,
                worker_index: int = 0) -> torch.device:
    """Resolve `train.device` and bind this worker to its GPU (see `local_index`)."""
    device = resolve(requested)
    if device == "cpu":
        return torch.device("cpu")
    return bind("cuda", local_index(launcher, os.environ if env is None else env, worker_index, cuda_count()))


def load_cpu(f, weights_only: bool = True):
    """Load what `torch.save` wrote, every tensor on the CPU, whatever device saved it: packages,
    checkpoints and dumps of a CUDA stage load on a CPU-only machine (a GPU stage rebuilt on a CPU
    spare, and back)."""
    return torch.load(f, map_location="cpu", weights_only=weights_only)


# --- staging through host memory ---------------------------------------------------------------------
class _Ready:
    """The event of a synchronous (CPU) copy: complete at once."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


READY = _Ready()
POOL_KEEP = 8  # free host buffers kept per (numel, dtype): a step reuses a handful of activation sizes


class HostStager:
    """Device <-> host copies for a transport whose back-end only moves host memory (gloo)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._free: Dict[Tuple[int, torch.dtype], List[Tuple[torch.Tensor, object]]] = {}
        self.allocated = 0  # host buffers created (tests: the pool reuses them)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D host buffer (pinned on CUDA) from the pool: one whose last copy completed."""
        free = self._free.get((numel, dtype), [])
        for i, (buf, event) in enumerate(free):
            if event.query():
                del free[i]
                return buf
        self.allocated += 1
        return torch.empty(numel, dtype=dtype, pin_memory=self.cuda)

    def release(self, buf: torch.Tensor, event=READY) -> None:
        """Give `buf` back; it is reused only once `event` (the last copy reading or writing it) is done."""
        free = self._free.setdefault((buf.numel(), buf.dtype), [])
        if len(free) < POOL_KEEP:
            free.append((buf.view(-1), event))

    def to_host(self, t: torch.Tensor):
        """Start copying `t` into a host buffer; returns (host tensor shaped like t, event). The
        host tensor is valid once `event.synchronize()` returned (`release` it after the send)."""
        buf = self.host_buffer(t.numel(), t.dtype)
        if not self.cuda:
            buf.copy_(t.reshape(-1))
            return buf.view(t.shape), READY
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(compute)  # after the kernels that produce t
            buf.copy_(t.reshape(-1), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        t.record_stream(self._stream)  # the allocator must not hand t's memory out before the copy ran
        return buf.view(t.shape), event

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A device tensor with `host`'s contents, usable on the current stream at once (the stream
        waits for the copy); `host` returns to the pool, reused after the copy completed."""
        if not self.cuda:
            out = host.clone()  # a distinct tensor, as on CUDA: the pooled buffer is reused
            self.release(host, READY)
            return out
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            out.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        compute.wait_event(event)
        out.record_stream(compute)  # allocated on the side stream, used on the compute stream
        self.release(host, event)
        return out


# --- timing a stage's own kernels ------------------------------------------------------------------
class KernelClock:
    """Seconds a stage's own kernels ran on its GPU during one step: CUDA events around each compute
    section (after the stream waited for the section's input, after its last kernel), summed. Wall
    time minus time blocked in receives does not measure this on a GPU: the host runs ahead of the
    device, and over NCCL it never blocks in a receive at all. On CPU it measures nothing (None)."""

    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda"
        self._open = None
        self._sections: List[Tuple[object, object]] = []

    def reset(self) -> None:
        self._open, self._sections = None, []

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()

    def stop(self) -> None:
        if self.cuda and self._open is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._sections.append((self._open, end))
            self._open = None

    def seconds(self) -> Optional[float]:
        """The sections' total since `reset`, None on CPU. Waits for the last section's kernels (the
        step's commit waits for them anyway)."""
        if not self.cuda:
            return None
        if not self._sections:
            return 0.0
        self._sections[-1][1].synchronize()  # one stream: every earlier event is complete too
        return sum(a.elapsed_time(b) for a, b in self._sections) / 1000.0


# --- NCCL --------------------------------------------------------------------------------------------
def require_nccl(device: Optional[torch.device]) -> None:
    """Raise one line unless this process can run an NCCL communicator on `device`."""
    if not torch.cuda.is_available():
        raise ValueError("parallel.backend=nccl needs a CUDA device per stage process and this process sees "
                         "none (torch.cuda.is_available() is False); use parallel.backend=gloo")
    if not dist.is_nccl_available():
        raise ValueError("parallel.backend=nccl: this torch build has no NCCL; install a CUDA build of torch "
                         "or use parallel.backend=gloo")
    if device is None or torch.device(device).type != "cuda":
        raise ValueError(f"parallel.backend=nccl carries CUDA tensors but this stage runs on {device}; use "
                         "train.device=cuda (or auto) with it, or parallel.backend=gloo")


def gpu_identity(device: torch.device) -> str:
    """What NCCL compares to refuse two ranks on one GPU: the GPU's UUID and NCCL_HOSTID (ranks with
    distinct host ids may share a GPU, the way tests run NCCL on one card)."""
    return f"{torch.cuda.get_device_properties(device).uuid}@{os.environ.get('NCCL_HOSTID', '')}"


def shared_gpus(identities: Sequence[str]) -> Dict[str, List[int]]:
    """GPU identity -> ranks, for every GPU that more than one rank of a group sits on."""
    ranks: Dict[str, List[int]] = {}
    for rank, ident in enumerate(identities):
        ranks.setdefault(ident, []).append(rank)
    return {ident: rs for ident, rs in ranks.items() if len(rs) > 1}


def nccl_env() -> None:
    """Set NCCL_ENV before a communicator is built (torch reads it at construction)."""
    for key, value in NCCL_ENV.items():
        if os.environ.get(key, value) != value:
            log.warning("%s=%s overridden with %s: a dead peer must not take survivors down", key,
                        os.environ[key], value)
        os.environ[key] = value


def nccl_backend(store, rank: int, size: int, timeout_s: float, device: torch.device):
    """A non-blocking NCCL communicator of `size` ranks on `device`, connected eagerly (its
    formation fails or completes here, not at the first send)."""
    nccl_env()
    os.environ.setdefault("TORCH_NCCL_NONBLOCKING_TIMEOUT", str(int(max(1, timeout_s))))
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.blocking = False  # calls return at once; a hung peer never pins the calling thread
    opts._timeout = timedelta(seconds=timeout_s)
    backend = dist.ProcessGroupNCCL(store, rank, size, opts)
    if hasattr(backend, "eager_connect_single_device"):
        backend.eager_connect_single_device(torch.device(device))
    return backend


def abort_backend(backend, deadline_s: float, what: str,
                  on_hang: Optional[Callable[[str], None]] = None):
    """Abort an NCCL communicator from a helper thread (releases kernels stuck on a dead peer); if
    the abort has not returned after `deadline_s`, the process exits (`waiter.EXIT_ABORT_HUNG`).
    Returns the helper thread."""
    return call_with_deadline(backend.abort, deadline_s, what, on_hang)


def memory_in_use(device: torch.device) -> int:
    """Bytes of GPU memory in use on `device` (all processes): watched per generation, since
    communicator create/abort cycles have leaked memory in some NCCL versions."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free
