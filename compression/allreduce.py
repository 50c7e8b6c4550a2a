"""Quantized all-reduce over torch.distributed (gloo and NCCL), synchronous or asynchronous.

Algorithms (all send raw uint8 payloads; integer codes are never summed as integers):

- "two_shot": split the packed buffer into one chunk per rank; encode every chunk (one launch),
  all-to-all; each rank decodes the W versions of the chunk it owns and sums them in fp32,
  re-encodes that sum once; all-gather, decode. Two quantizations; each rank sends 2 (W-1)/W of
  a payload.
- "gather": encode the whole buffer once, all-gather, every rank decodes and sums all W payloads.
  One quantization but (W-1) payloads sent; best for W = 2 (same bytes) and small buffers.
- codec "none": an ordinary fp32 `dist.all_reduce`.

Every rank ends with bit-identical results (sums run in rank order on identical payloads), which
Streaming DiLoCo needs to keep replicas in sync.

Devices: the codec work runs where the tensors are (the Triton kernels on CUDA). A group that
cannot carry CUDA tensors (gloo: anything but NCCL) gets the payloads through host memory, one
copy each way per collective (payloads are the compressed bytes, so the copies are small).

Asynchrony: the work runs on one daemon thread per process group, in submission order, so every
rank issues its collectives in the same order while the caller computes. While quantized
all-reduces are in flight on a group, issue no other collective on that group from another thread
(use a dedicated group for syncs). Inputs are packed at call time; results land in the tensors
when `handle.wait()` returns. On CUDA the work runs on a side stream ordered after the caller's.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from kintsugi.compression.codecs import Codec, get_codec, mix_seed
from kintsugi.compression.error_feedback import ErrorFeedback
from kintsugi.compression.packing import PackMeta, pack, unpack_into

__all__ = ["all_reduce", "AllReduceHandle", "plan_all_reduce"]

_OPS = ("avg", "sum")
_ALGORITHMS = ("auto", "two_shot", "gather")
# "auto" gathers below this payload size: latency, not bytes, dominates there.
_GATHER_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class AllReducePlan:
    """Sizes of one all-reduce; `bytes_sent` is what this rank puts on the wire."""

    algorithm: str  # "fp32", "gather" or "two_shot"
    numel: int  # elements of the packed tensors
    padded: int  # elements of the flat buffer (two-shot: world * chunk)
    chunk: int  # two-shot: elements each rank owns
    row_bytes: int  # bytes of one payload row sent
    bytes_sent: int


def plan_all_reduce(codec: Codec, numel: int, world: int, algorithm: str = "auto") -> AllReducePlan:
    if codec.lossless:  # ring all-reduce: reduce-scatter then all-gather of fp32 chunks
        chunk = math.ceil(numel / world)
        return AllReducePlan("fp32", numel, numel, chunk, 4 * chunk, 2 * (world - 1) * 4 * chunk)
    payload = codec.encoded_nbytes(numel)
    if algorithm == "auto":
        small = world <= 8 and payload <= _GATHER_MAX_BYTES
        algorithm = "gather" if world <= 2 or small else "two_shot"
    if algorithm == "gather":
        return AllReducePlan("gather", numel, numel, numel, payload, (world - 1) * payload)
    unit = codec.block_size if codec.spec.scaled else 2  # chunks start on block boundaries
    chunk = math.ceil(math.ceil(numel / world) / unit) * unit
    row = codec.encoded_nbytes(chunk)
    return AllReducePlan("two_shot", numel, world * chunk, chunk, row, 2 * (world - 1) * row)


class _GroupWorker:
    """A daemon thread that runs one process group's all-reduces in submission order."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="kintsugi-allreduce", daemon=True).start()

    def submit(self, fn) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as err:  # handed to the waiter, who re-raises it
                    fut.set_exception(err)
            # Drop the job (and the process group it holds) now: a group kept alive by this
            # idle thread is destroyed at interpreter exit, which aborts inside gloo.
            del item, fn, fut


_workers: "weakref.WeakKeyDictionary[object, _GroupWorker]" = weakref.WeakKeyDictionary()
_workers_lock = threading.Lock()
_side_streams: dict = {}


def _worker_for(group) -> _GroupWorker:
    with _workers_lock:
        worker = _workers.get(group)
        if worker is None:
            worker = _workers[group] = _GroupWorker()
            weakref.finalize(group, worker.stop)  # the thread exits with its group
        return worker


class AllReduceHandle:
    """Returned by `all_reduce`; `wait()` returns the tensors once they hold the result."""

    def __init__(self, tensors: list[Tensor], bytes_sent: int, plan: Optional[AllReducePlan] = None,
                 future: Optional[concurrent.futures.Future] = None, flat: Optional[Tensor] = None,
                 meta: Optional[PackMeta] = None, done_event=None):
        self.tensors = tensors
        self.bytes_sent = bytes_sent
        self.plan = plan
        self._future, self._flat, self._meta, self._done_event = future, flat, meta, done_event

    def is_completed(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self, timeout: Optional[float] = None) -> list[Tensor]:
        """Block until done (TimeoutError after `timeout` s), then write results into the tensors.

        After a timeout or an error the group is unusable: build a new one.
        """
        if self._future is not None:
            self._future.result(timeout=timeout)  # re-raises the worker's exception
            if self._done_event is not None:  # order the caller's stream after the side stream
                torch.cuda.current_stream(self._flat.device).wait_event(self._done_event)
            unpack_into(self._flat, self._meta, self.tensors)
            self._future = self._flat = None
        return self.tensors


def _is_own_group(group) -> bool:
    """A group that is not registered with torch.distributed (parallel.groups.Group: a back-end
    built per scope and generation without a default group) brings its own collectives."""
    return group is not None and not isinstance(group, dist.ProcessGroup)


def _world_size(group) -> int:
    if _is_own_group(group):
        return group.size()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _rank(group) -> int:
    return group.rank() if _is_own_group(group) else dist.get_rank(group)


def _carries_cuda(group) -> bool:
    """NCCL moves CUDA tensors itself; every other back-end gets host copies."""
    if _is_own_group(group):
        return getattr(group, "backend", "gloo") == "nccl"
    return dist.get_backend(group) == "nccl"


def _wait(work, group) -> None:
    """Wait for a collective of our own group. NCCL's `wait()` only orders the current stream after
    it, so a dead peer would surface at the next host synchronisation, forever: its works are polled
    (`is_completed()`) under the group's `deadline_s` instead, and a missed deadline raises here."""
    if not getattr(group, "pollable", False):
        work.wait()
        return
    t0, deadline = time.monotonic(), getattr(group, "deadline_s", 300.0)
    while not work.is_completed():
        if time.monotonic() - t0 > deadline:
            raise RuntimeError(f"collective on group {getattr(group, 'name', '?')} not complete after its "
                               f"{deadline:.0f} s deadline")
        time.sleep(0.0005)
    if work.exception() is not None:
        raise RuntimeError(f"collective on group {getattr(group, 'name', '?')} failed: {work.exception()}")


def _via_host(out: Tensor, group):
    """(where the collective writes, copy back?) for a result tensor `out`."""
    if out.device.type == "cpu" or _carries_cuda(group):
        return out, False
    return torch.empty(out.shape, dtype=out.dtype), True


def _all_reduce_sum(flat: Tensor, group) -> None:
    buf, back = _via_host(flat, group)
    if back:
        buf.copy_(flat)
    if _is_own_group(group):
        _wait(group.all_reduce(buf), group)
    else:
        dist.all_reduce(buf, group=group)
    if back:
        flat.copy_(buf)


def _all_to_all(out: Tensor, inp: Tensor, group) -> None:
    buf, back = _via_host(out, group)
    inp = inp.cpu() if back else inp
    if _is_own_group(group):
        _wait(group.all_to_all_single(buf, inp), group)
    else:
        dist.all_to_all_single(buf, inp, group=group)
    if back:
        out.copy_(buf)


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    buf, back = _via_host(out, group)
    inp = inp.cpu() if back else inp
    if _is_own_group(group):
        _wait(group.all_gather_into_tensor(buf.view(-1), inp.view(-1)), group)
    else:
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(buf.view(-1), inp.view(-1), group=group)  # gloo wants flat tensors
    if back:
        out.copy_(buf)


def _reduce_flat(plan: AllReducePlan, codec: Codec, flat: Tensor, group, world: int, avg: bool,
                 seeds: tuple, send_res: Optional[Tensor], owner_res: Optional[Tensor]) -> None:
    """The collective part, run on the group's worker thread; leaves the result in `flat`."""
    if plan.algorithm == "fp32":
        _all_reduce_sum(flat, group)
        if avg:
            flat.div_(world)
        return
    alpha = 1.0 / world if avg else 1.0
    res = None
    if send_res is not None:  # residual padded like the buffer (padding stays exactly zero)
        res = send_res if plan.padded == plan.numel else torch.zeros_like(flat)
        if res is not send_res:
            res[: plan.numel].copy_(send_res)
    if plan.algorithm == "gather":
        payload = codec.encode_rows(flat.view(1, -1), seed=seeds[0],
                                    residual=None if res is None else res.view(1, -1))
        gathered = torch.empty(world, plan.row_bytes, dtype=torch.uint8, device=flat.device)
        _all_gather(gathered, payload.view(-1), group)
        codec.decode_rows(gathered, plan.numel, num_sum=world, alpha=alpha, out=flat)
    else:
        send = codec.encode_rows(flat.view(world, plan.chunk), seed=seeds[0],
                                 residual=None if res is None else res.view(world, plan.chunk))
        recv = torch.empty_like(send)
        _all_to_all(recv, send, group)
        del send
        owned = codec.decode_rows(recv, plan.chunk, num_sum=world, alpha=alpha)  # fp32 sum
        del recv
        mine = codec.encode_rows(owned.view(1, -1), seed=seeds[1],
                                 residual=None if owner_res is None else owner_res.view(1, -1))
        gathered = torch.empty(world, plan.row_bytes, dtype=torch.uint8, device=flat.device)
        _all_gather(gathered, mine.view(-1), group)
        codec.decode_rows(gathered, plan.chunk, out=flat)
    if res is not None and res is not send_res:
        send_res.copy_(res[: plan.numel])


def all_reduce(
    tensors: Sequence[Tensor],
    codec: Union[Codec, ErrorFeedback, str],
    group=None,
    op: str = "avg",
    algorithm: str = "auto",
    async_op: bool = False,
    key: Hashable = None,
) -> AllReduceHandle:
    """All-reduce `tensors` in place through `codec`; returns a handle (already done if sync).

    op: "avg" or "sum". algorithm: "auto", "two_shot" or "gather" (ignored for codec "none").
    With an `ErrorFeedback` codec, each rank carries the residual of what it sent and, for
    two-shot, of the chunk it re-encoded, under `key` (default: the tensors' addresses; pass a
    stable key when the buffers are reallocated between calls). World size 1: no-op.
    """
    if op not in _OPS:
        raise ValueError(f"op={op!r} is not supported: use one of {_OPS}")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is unknown: use one of {_ALGORITHMS}")
    codec = get_codec(codec) if isinstance(codec, str) else codec
    ef = codec if isinstance(codec, ErrorFeedback) else None
    base: Codec = ef.codec if ef is not None else codec
    tensors = list(tensors)
    world = _world_size(group)
    numel = sum(t.numel() for t in tensors)
    if world == 1 or numel == 0:
        return AllReduceHandle(tensors, 0)
    group = group if group is not None else dist.group.WORLD
    rank = _rank(group)
    plan = plan_all_reduce(base, numel, world, algorithm)
    flat, meta = pack(tensors, pad_to=plan.padded)
    seeds = (None, None)
    if base.stochastic:  # independent noise per rank and per quantization
        s = base.next_seed(rank)
        seeds = (s, mix_seed(s, 0x5EED))
    send_res = owner_res = None
    if ef is not None and plan.algorithm != "fp32":
        key = key if key is not None else tuple((t.data_ptr(), t.numel()) for t in tensors)
        send_res = ef.residual_buffer(("all_reduce", key), numel, flat.device)
        if plan.algorithm == "two_shot":
            # The owned chunk depends on (world, rank); after a membership change start afresh.
            owner_key = ("all_reduce_owner", key, world, rank)
            for k in ef.keys():
                if isinstance(k, tuple) and k[:2] == owner_key[:2] and k != owner_key:
                    ef.reset(k)
            owner_res = ef.residual_buffer(owner_key, plan.chunk, flat.device)
    avg = op == "avg"

    def job():
        _reduce_flat(plan, base, flat, group, world, avg, seeds, send_res, owner_res)

    done_event = None
    if flat.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
        done_event = torch.cuda.Event()
        stream = _side_streams.setdefault(flat.device, torch.cuda.Stream(flat.device))
        host_job = job

        def job():  # noqa: F811 - same work, on the side stream after the caller's packing
            with torch.cuda.device(flat.device), torch.cuda.stream(stream):
                stream.wait_event(ready)
                host_job()
                done_event.record(stream)

    future = _worker_for(group).submit(job)
    handle = AllReduceHandle(tensors, plan.bytes_sent, plan, future, flat, meta, done_event)
    if not async_op:
        handle.wait()
    return handle
