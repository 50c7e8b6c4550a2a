"""Point-to-point transport between pipeline stages over torch.distributed.

Why our own instead of torch.distributed.pipelining: process groups are rebuilt live when a worker
dies, and the stage order changes per microbatch (CheckFree+), so the transport must be abortable
and route-agnostic.

Abortable waits: on gloo a recv from a SIGSTOPped peer blocks until the group timeout and nothing
unblocks it from another thread. So when an `abort` event is given, each wait runs on the
transport's long-lived waiter thread (`parallel.waiter`) while the caller watches the event; on abort
the blocked wait is left behind (the group is about to be destroyed and replaced) and `Aborted` is
raised. A peer that dies raises within milliseconds on gloo; that becomes `PeerFailure` naming the
peer so the worker can report it.

Devices. A transport carries the tensors of one stage device (`device`, CPU by default):
- CPU: tensors go on the wire as they are.
- CUDA over gloo: gloo cannot send CUDA tensors, so activations and gradients are staged through
  pooled pinned host buffers (`parallel.device.HostStager`). The device -> host copy runs on a side
  stream; a sender thread waits for its CUDA event and posts the gloo send, so the training thread
  goes on launching the next microbatch meanwhile. A receive lands in a pinned buffer and is copied
  to the device on the side stream, the compute stream waiting on its event.
- CUDA over NCCL (`data_group` an `NcclGroup`): activations and gradients (`DATA_CHANNELS`) travel
  as CUDA tensors on the NCCL group; the rest (commit chain, packages) stays on the gloo `group`,
  whose ranks must be the same. NCCL works are polled at `flush`, each under `deadline_s` from its
  post: a killed NCCL peer never makes a receive raise, so the deadline or the abort event ends the
  wait, and a missed deadline aborts the communicator (`NcclGroup.fail`).
Codecs (compression.activations / gradients) encode and decode on the tensor's device: the Triton
kernels on CUDA, the torch reference elsewhere (`kernels.dispatch`).

Pre-posted receives (`post_recv`): a gloo receive posted before the caller needs it reads data that
arrives early straight into its buffer. Never on NCCL: its receives match in issue order per peer,
and one posted early could wait ahead of a send the peer needs first.

A transport that raised `Aborted` or `PeerFailure` is finished, like its generation's groups: a
receive it posted may still be pending in gloo and would swallow the next message with its tag.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .device import HostStager
from .groups import Aborted, Group
from .waiter import POLL_S, PeerFailure, WaiterSlot, poll_works, run_idle, set_idle_hook, wait_inline

__all__ = ["Aborted", "PeerFailure", "ByteCounter", "Transport", "wait_abortable", "set_idle_hook",
           "DATA_CHANNELS"]

DATA_CHANNELS = ("p2p", "p2p_grad")  # activations and their gradients: the stage device's tensors


class ByteCounter:
    """Bytes this process put on the wire, per channel (p2p, outer_sync, ...)."""

    def __init__(self):
        self.sent: Dict[str, int] = defaultdict(int)

    def add(self, channel: str, nbytes: int) -> None:
        self.sent[channel] += int(nbytes)

    def as_dict(self) -> Dict[str, int]:
        return dict(self.sent)


_THREAD_WAITERS = threading.local()


def wait_abortable(work, abort, peer: int = -1) -> None:
    """Wait for a torch.distributed work handle; raise Aborted if `abort` (anything with
    `is_set()`) fires first, PeerFailure if the work raises. Each calling thread has one long-lived
    waiter thread, which ends (within 30 s) after its caller's thread ended."""
    if abort is None:
        wait_inline([(work, peer)])
        return
    slot = getattr(_THREAD_WAITERS, "slot", None)
    if slot is None:
        slot = _THREAD_WAITERS.slot = WaiterSlot("kintsugi-wait", owner=threading.current_thread())
    slot.get().wait([(work, peer)], abort)


def _plain(codec) -> bool:
    return codec is None or getattr(codec, "name", "none") == "none"


class _StagedSender:
    """Posts the gloo sends of staged tensors, in submission order, once their device -> host copy
    completed. Never waits on a peer (a send is only posted), so draining it cannot deadlock."""

    def __init__(self):
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()
        self._submitted = self._finished = 0
        self.works: List[Tuple[object, int, torch.Tensor]] = []  # read by the owner after drain()
        self.error: Optional[PeerFailure] = None
        threading.Thread(target=self._loop, daemon=True, name="kintsugi-staged-send").start()

    def submit(self, host: torch.Tensor, event, group, dst: int, tag: int) -> None:
        with self._lock:
            self._submitted += 1
            self._idle.clear()
        self._jobs.put((host, event, group, dst, tag))

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            host, event, group, dst, tag = job
            if self.error is None:
                try:
                    event.synchronize()  # the copy to `host` is done (a CUDA event; CPU: at once)
                    self.works.append((group.isend(host, dst, tag), dst, host))
                except RuntimeError as e:  # gloo raises synchronously once the pair is known broken
                    self.error = PeerFailure(dst, e)
            job = host = event = group = None
            with self._lock:
                self._finished += 1
                if self._finished == self._submitted:
                    self._idle.set()

    def drain(self, abort) -> List[Tuple[object, int, torch.Tensor]]:
        """Wait until every submitted send is posted; returns (and forgets) their works."""
        while not self._idle.wait(POLL_S if abort is not None else None):
            if abort.is_set():
                raise Aborted()
            run_idle()
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        works, self.works = self.works, []
        return works


class Transport:
    """Send/recv of fixed-shape tensors between ranks of one generation's group
    (`parallel.groups.Group`; ranks are group-local).

    `codec_for(channel)` returns a compression codec (see `compression.get_codec`) or None; lossy
    codecs shrink what crosses the network while the math on either side stays fp32. `device`: the
    stage's device (receives on `DATA_CHANNELS` land there); `data_group`: an NCCL group for the data
    channels (default: `group`); `stager`: host staging for the data channels (built for CUDA over
    gloo; CPU tests pass a CPU `HostStager` to run the staged path); `deadline_s`: each NCCL work's
    deadline.
    """

    def __init__(self, group: Optional[Group] = None, abort: Optional[threading.Event] = None,
                 counter: Optional[ByteCounter] = None, codecs: Optional[Dict[str, object]] = None, *,
                 device=None, data_group: Optional[Group] = None, stager: Optional[HostStager] = None,
                 deadline_s: float = 300.0):
        self.group = group if group is not None else Group.default()
        self.data_group = data_group if data_group is not None else self.group
        self.abort = abort
        self.counter = counter or ByteCounter()
        self.codecs = codecs or {}
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.deadline_s = deadline_s
        self._direct = getattr(self.data_group, "pollable", False)  # NCCL: device tensors on the wire
        if stager is None and self.device.type == "cuda" and not self._direct:
            stager = HostStager(self.device)
        self.stager = None if self._direct else stager
        self._sender: Optional[_StagedSender] = None
        self._pending: List = []   # (work, peer, buffer, staged) sends awaited in flush
        self._inflight: List = []  # NCCL works (work, peer, post time, tensor), polled in flush
        self._posted: Dict[Tuple[int, int], tuple] = {}
        self._mailbox: Dict[int, torch.Tensor] = {}
        self._waiters = WaiterSlot("kintsugi-transport-wait")
        weakref.finalize(self, self._waiters.close)  # the waiter thread ends with its transport
        self.my_rank = self.group.rank()
        self.recv_wait_s = 0.0  # time spent blocked on receives: step time minus this = compute

    # --- raw -----------------------------------------------------------------------------------
    def _group_for(self, channel: str) -> Group:
        return self.data_group if channel in DATA_CHANNELS else self.group

    def _wait(self, request) -> None:
        if self.abort is None:
            wait_inline(request)
        else:
            self._waiters.get().wait(request, self.abort)

    def _isend(self, group: Group, buf: torch.Tensor, dst: int, tag: int, channel: str, staged: bool = False):
        try:
            work = group.isend(buf, dst, tag)
        except RuntimeError as e:  # gloo raises synchronously once the pair is known broken
            raise PeerFailure(dst, e) from e
        self.counter.add(channel, buf.numel() * buf.element_size())
        if group.pollable:
            self._inflight.append((work, dst, time.monotonic(), buf))
        else:
            self._pending.append((work, dst, buf, staged))

    def _send_staged(self, payload: torch.Tensor, dst: int, tag: int, channel: str) -> None:
        if self.stager is None:  # a CUDA tensor on a control channel: staged like the data
            self.stager = HostStager(payload.device)
        host, event = self.stager.to_host(payload)
        if self._sender is None:
            self._sender = _StagedSender()
            weakref.finalize(self, self._sender.stop)
        self.counter.add(channel, payload.numel() * payload.element_size())
        self._sender.submit(host, event, self._group_for(channel), dst, tag)

    def _post(self, numel: int, dtype: torch.dtype, src: int, tag: int, channel: str) -> tuple:
        group = self._group_for(channel)
        if channel in DATA_CHANNELS and self._direct:
            buf, how = torch.empty(numel, dtype=dtype, device=self.device), "direct"
        elif channel in DATA_CHANNELS and self.stager is not None:
            buf, how = self.stager.host_buffer(numel, dtype), "staged"
        else:
            buf, how = torch.empty(numel, dtype=dtype), "host"
        try:
            work = group.irecv(buf, src, tag)
        except RuntimeError as e:
            raise PeerFailure(src, e) from e
        return work, buf, how

    def _wire(self, shape: Sequence[int], channel: str, dtype: torch.dtype) -> Tuple[int, int, torch.dtype]:
        numel = 1
        for d in shape:
            numel *= d
        codec = self.codecs.get(channel)
        if _plain(codec):
            return numel, numel, dtype
        return numel, codec.encoded_nbytes(numel), torch.uint8

    # --- public --------------------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, tag: int, channel: str = "p2p") -> None:
        """Non-blocking: sends are awaited in `flush`, so a sender never waits for its receiver
        (which is what keeps any schedule consistent with one global order deadlock-free)."""
        if dst == self.my_rank:  # a route may visit the same stage twice in a row
            self._mailbox[tag] = tensor.detach().clone()
            return
        codec = self.codecs.get(channel)
        payload = tensor.detach().contiguous() if _plain(codec) else codec.encode(tensor.detach())
        group = self._group_for(channel)
        if group.pollable:
            self._isend(group, payload, dst, tag, channel)
        elif payload.is_cuda or (channel in DATA_CHANNELS and self.stager is not None):
            self._send_staged(payload, dst, tag, channel)
        else:
            self._isend(group, payload, dst, tag, channel)

    def post_recv(self, shape: Sequence[int], src: int, tag: int, channel: str = "p2p",
                  dtype: torch.dtype = torch.float32) -> None:
        """Post the receive `recv(shape, src, tag, channel, dtype)` will take, now (gloo only)."""
        if src == self.my_rank or (src, tag) in self._posted or self._group_for(channel).pollable:
            return
        _, wire_numel, wire_dtype = self._wire(shape, channel, dtype)
        self._posted[(src, tag)] = self._post(wire_numel, wire_dtype, src, tag, channel)

    def recv(self, shape: Sequence[int], src: int, tag: int, channel: str = "p2p",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if src == self.my_rank:
            return self._mailbox.pop(tag)
        numel, wire_numel, wire_dtype = self._wire(shape, channel, dtype)
        posted = self._posted.pop((src, tag), None)
        work, buf, how = posted if posted is not None else self._post(wire_numel, wire_dtype, src, tag, channel)
        if how == "direct":
            work.wait()  # NCCL: the current stream waits for the receive; the CPU does not
            self._inflight.append((work, src, time.monotonic(), buf))
        else:
            t0 = time.perf_counter()
            self._wait([(work, src)])
            self.recv_wait_s += time.perf_counter() - t0
        if how == "staged":
            buf = self.stager.to_device(buf)
        codec = self.codecs.get(channel)
        if _plain(codec):
            return buf.view(tuple(shape))
        return codec.decode(buf, numel).view(tuple(shape))

    def flush(self) -> None:
        """Wait for every outstanding send (also releases the send buffers) and, on NCCL, for every
        receive too, each under its deadline."""
        if self._sender is not None:
            self._pending.extend((w, dst, host, True) for w, dst, host in self._sender.drain(self.abort))
        pending, self._pending = self._pending, []
        if pending:
            self._wait([(work, dst) for work, dst, _buf, _staged in pending])
            for _work, _dst, buf, staged in pending:
                if staged:
                    self.stager.release(buf)
        inflight, self._inflight = self._inflight, []
        if inflight:
            try:
                poll_works([(work, peer, t0) for work, peer, t0, _buf in inflight], self.abort, self.deadline_s)
            except PeerFailure as e:
                self.data_group.fail(e)  # never reused: abort now, releasing kernels stuck on the peer
                raise

    # --- small collectives built from p2p, so a killed peer is noticed in milliseconds ------------
    def chain_allreduce(self, vec: torch.Tensor, ranks: Sequence[int], tag: int,
                        channel: str = "control", on_total: Optional[Callable] = None) -> torch.Tensor:
        """Sum `vec` over `ranks` (a pipeline, in stage order): reduce towards the first, then
        broadcast back. 2(n-1) hops of ~0.1 ms; unlike a gloo collective, a dead peer raises at once.
        `on_total(total)` runs on the first rank when the sum is complete, before the broadcast:
        the commit point of a step. Runs on the CPU in float64 (a CUDA `vec` is copied once: its
        values decide the commit on the host anyway); returns a CPU tensor."""
        idx = list(ranks).index(self.my_rank)
        n = len(ranks)
        vec = vec.detach().to("cpu", torch.float64, copy=True)
        if idx < n - 1:
            vec += self.recv(vec.shape, ranks[idx + 1], tag, channel, dtype=torch.float64)
        if idx == 0 and on_total is not None:
            on_total(vec)
        if idx > 0:
            self.send(vec, ranks[idx - 1], tag, channel)
            self.flush()
            vec = self.recv(vec.shape, ranks[idx - 1], tag + 1, channel, dtype=torch.float64)
        if idx < n - 1:
            self.send(vec, ranks[idx + 1], tag + 1, channel)
            self.flush()
        return vec
