"""Point-to-point transport between pipeline stages over torch.distributed.

Why our own instead of torch.distributed.pipelining: process groups are rebuilt live when a worker
dies, and the stage order changes per microbatch (CheckFree+), so the transport must be abortable
and route-agnostic.

Abortable waits: on gloo a recv from a SIGSTOPped peer blocks until the group timeout and nothing
unblocks it from another thread. So when an `abort` event is given, each wait runs in a helper
thread while the caller watches the event; on abort the blocked wait is left behind (the group is
about to be destroyed and replaced) and `Aborted` is raised. A peer that dies raises within
milliseconds on gloo; that becomes `PeerFailure` naming the peer so the worker can report it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .groups import Aborted, Group

__all__ = ["Aborted", "PeerFailure", "ByteCounter", "Transport", "wait_abortable", "set_idle_hook"]


class PeerFailure(RuntimeError):
    """Communication with a peer raised: the peer is suspect (killed, crashed or partitioned)."""

    def __init__(self, peer: int, cause: BaseException):
        super().__init__(f"communication with rank {peer} failed: {cause}")
        self.peer = peer


class ByteCounter:
    """Bytes this process put on the wire, per channel (p2p, outer_sync, ...)."""

    def __init__(self):
        self.sent: Dict[str, int] = defaultdict(int)

    def add(self, channel: str, nbytes: int) -> None:
        self.sent[channel] += int(nbytes)

    def as_dict(self) -> Dict[str, int]:
        return dict(self.sent)


_IDLE: List[Callable[[], None]] = []


def set_idle_hook(fn: Optional[Callable[[], None]]) -> None:
    """`fn()` runs on the main thread, about every 50 ms, while it waits for communication (a worker
    serves peer snapshots there: its state is consistent while it waits)."""
    _IDLE[:] = [fn] if fn is not None else []


def _idle() -> None:
    if _IDLE and threading.current_thread() is threading.main_thread():
        try:
            _IDLE[0]()
        except Exception:  # noqa: BLE001 - a failing hook must not break the wait it runs in
            logging.getLogger(__name__).exception("idle hook failed")


def wait_abortable(work, abort, peer: int = -1) -> None:
    """Wait for a torch.distributed work handle; raise Aborted if `abort` (anything with
    `is_set()`) fires first."""
    if abort is None:
        try:
            work.wait()
        except RuntimeError as e:
            raise PeerFailure(peer, e) from e
        return
    if abort.is_set():
        raise Aborted()
    done = threading.Event()
    error: List[BaseException] = []

    def _run():
        try:
            work.wait()
        except BaseException as e:  # noqa: BLE001 - surfaced in the caller's thread
            error.append(e)
        done.set()

    threading.Thread(target=_run, daemon=True, name="kintsugi-wait").start()
    while not done.wait(0.05):
        if abort.is_set():
            raise Aborted()
        _idle()
    if error:
        raise PeerFailure(peer, error[0]) from error[0]


class Transport:
    """Send/recv of fixed-shape float tensors between ranks of one generation's group
    (`parallel.groups.Group`; ranks are group-local).

    `codec_for(channel)` returns a compression codec (see `compression.get_codec`) or None; lossy
    codecs shrink what crosses the network while the math on either side stays fp32.
    """

    def __init__(self, group: Optional[Group] = None, abort: Optional[threading.Event] = None,
                 counter: Optional[ByteCounter] = None, codecs: Optional[Dict[str, object]] = None):
        self.group = group if group is not None else Group.default()
        self.abort = abort
        self.counter = counter or ByteCounter()
        self.codecs = codecs or {}
        self._pending: List = []
        self._mailbox: Dict[int, torch.Tensor] = {}
        self.my_rank = self.group.rank()
        self.recv_wait_s = 0.0  # time spent blocked on receives: step time minus this = compute

    # --- raw -----------------------------------------------------------------------------------
    def _isend(self, buf: torch.Tensor, dst: int, tag: int, channel: str):
        try:
            work = self.group.isend(buf, dst, tag)
        except RuntimeError as e:  # gloo raises synchronously once the pair is known broken
            raise PeerFailure(dst, e) from e
        self.counter.add(channel, buf.numel() * buf.element_size())
        self._pending.append((work, dst, buf))

    def _recv_into(self, buf: torch.Tensor, src: int, tag: int) -> None:
        try:
            work = self.group.irecv(buf, src, tag)
        except RuntimeError as e:
            raise PeerFailure(src, e) from e
        t0 = time.perf_counter()
        wait_abortable(work, self.abort, src)
        self.recv_wait_s += time.perf_counter() - t0

    # --- public --------------------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, tag: int, channel: str = "p2p") -> None:
        """Non-blocking: sends are awaited in `flush`, so a sender never waits for its receiver
        (which is what keeps any schedule consistent with one global order deadlock-free)."""
        if dst == self.my_rank:  # a route may visit the same stage twice in a row
            self._mailbox[tag] = tensor.detach().clone()
            return
        codec = self.codecs.get(channel)
        if codec is None or getattr(codec, "name", "none") == "none":
            self._isend(tensor.detach().contiguous(), dst, tag, channel)
        else:
            self._isend(codec.encode(tensor.detach()), dst, tag, channel)

    def recv(self, shape: Sequence[int], src: int, tag: int, channel: str = "p2p",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if src == self.my_rank:
            return self._mailbox.pop(tag)
        numel = 1
        for d in shape:
            numel *= d
        codec = self.codecs.get(channel)
        if codec is None or getattr(codec, "name", "none") == "none":
            out = torch.empty(tuple(shape), dtype=dtype)
            self._recv_into(out, src, tag)
            return out
        payload = torch.empty(codec.encoded_nbytes(numel), dtype=torch.uint8)
        self._recv_into(payload, src, tag)
        return codec.decode(payload, numel).view(tuple(shape))

    def flush(self) -> None:
        """Wait for every outstanding send (also releases the send buffers)."""
        pending, self._pending = self._pending, []
        for work, dst, _buf in pending:
            wait_abortable(work, self.abort, dst)

    # --- small collectives built from p2p, so a killed peer is noticed in milliseconds ------------
    def chain_allreduce(self, vec: torch.Tensor, ranks: Sequence[int], tag: int,
                        channel: str = "control", on_total: Optional[Callable] = None) -> torch.Tensor:
        """Sum `vec` over `ranks` (a pipeline, in stage order): reduce towards the first, then
        broadcast back. 2(n-1) hops of ~0.1 ms; unlike a gloo collective, a dead peer raises at once.
        `on_total(total)` runs on the first rank when the sum is complete, before the broadcast:
        the commit point of a step."""
        idx = list(ranks).index(self.my_rank)
        n = len(ranks)
        vec = vec.detach().clone().to(torch.float64)
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
