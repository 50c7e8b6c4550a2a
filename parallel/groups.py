"""Process groups without torch's global state: one gloo back-end per scope and generation.

Why not `init_process_group` / `new_group`: they register every group in torch's process-wide
registry and a failed `init_process_group` leaves its group counter advanced, so the next group
this process builds rendezvouses under keys a fresh process would not use — a spare and a survivor
that both retried could never meet again. A `Group` here is a `ProcessGroupGloo` built directly on a
`PrefixStore`: no default group, no registry, nothing left behind by a failed attempt, and any
number of groups (a replica's pipeline, a stage across replicas, a two-rank transfer) live side by
side, each with its own prefix and lifetime. Ranks are group-local.

Formation is abortable: the gloo rendezvous blocks in C++ until every rank arrived or the timeout
passed, so it runs in a helper thread while the caller watches its abort event (the generation moved
on). Each rank first writes a presence key, so a formation that times out names the ranks that never
came (`FormationError.missing`).

Closing: an operation still pending on an abandoned group (a recv whose sender moved on, a send
nobody will receive) keeps gloo's connections open until the group's timeout, and an unread message
on such a connection makes gloo's event loop spin at full CPU. So `close()` hands the group to a
reaper thread that first closes every connection: on each pair it waits for a dummy receive with a
1 ms timeout, and gloo closes a pair whose operation timed out ("Application timeout caused pair
closure"). Pending operations on both ends then fail at once and everything is released. A group is
only closed when nobody still needs it (the worker closes a generation's groups after the next
generation's group formed, so no neighbour mistakes the closure for its death).

NCCL (`form_group(..., backend="nccl", device=...)`, CUDA only): the same formation, plus a check
that no two ranks sit on one GPU (NCCL refuses them; the check names the ranks), then a non-blocking
communicator built by `parallel.device.nccl_backend`. An `NcclGroup` is never reused after a failure:
`close()` (or `fail()`) aborts the communicator on a helper thread under a deadline — a killed peer
leaves NCCL kernels waiting in CUDA until then — and a process whose abort hangs exits. Without CUDA
`form_group(backend="nccl")` raises one line before anything starts.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timedelta
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from .errors import Aborted

log = logging.getLogger(__name__)
CLOSE_TAG = (1 << 30) - 7  # a tag no other message uses: the dummy receive that closes a pair


class FormationError(RuntimeError):
    """A group could not form: `missing` are the ranks whose presence key never appeared."""

    def __init__(self, msg: str, missing: List[int]):
        super().__init__(msg)
        self.missing = missing


class _Done:
    """A work handle that is already complete (groups of one rank)."""

    def wait(self, timeout=None):  # noqa: ARG002 - same signature as torch's Work.wait
        return True

    def is_completed(self) -> bool:
        return True


class Group:
    """A formed group: the raw back-end plus the collectives the rest of the code uses. All
    methods return a work handle (`wait()`); a group of one rank needs no back-end at all."""

    backend = "gloo"
    pollable = False  # gloo p2p works cannot be polled: waits run on a waiter thread

    def __init__(self, pg, rank: int, size: int, name: str, store=None):
        self.pg, self._rank, self._size, self.name = pg, rank, size, name
        self._store = store  # the formation's store client: it deletes this rank's keys on close
        self.closed = False

    @classmethod
    def default(cls) -> "Group":
        """torch's default group (set up by `init_process_group`), for tests and benchmarks that
        run one fixed group; never closed here."""
        pg = dist.distributed_c10d._get_default_group()
        g = cls(pg, dist.get_rank(), dist.get_world_size(), "default")
        g.closed = True
        return g

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    # --- point to point ------------------------------------------------------------------------
    def isend(self, tensor: torch.Tensor, dst: int, tag: int):
        return self.pg.send([tensor], dst, tag)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int):
        return self.pg.recv([tensor], src, tag)

    # --- collectives ---------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, async_op: bool = True):
        if self._size == 1:
            return _Done()
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        return self._maybe_wait(self.pg.allreduce([tensor], opts), async_op)

    def broadcast(self, tensor: torch.Tensor, root: int, async_op: bool = True):
        if self._size == 1:
            return _Done()
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = root, 0
        return self._maybe_wait(self.pg.broadcast([tensor], opts), async_op)

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
        if self._size == 1:
            out.copy_(inp)
            return _Done()
        return self._maybe_wait(self.pg.alltoall_base(out, inp, [], [], dist.AllToAllOptions()), async_op)

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
        if self._size == 1:
            out.copy_(inp.view(out.shape))
            return _Done()
        return self._maybe_wait(self.pg._allgather_base(out, inp), async_op)  # gloo: flat tensors

    def barrier(self, async_op: bool = True):
        if self._size == 1:
            return _Done()
        return self._maybe_wait(self.pg.barrier(dist.BarrierOptions()), async_op)

    @staticmethod
    def _maybe_wait(work, async_op: bool):
        if not async_op:
            work.wait()
        return work

    def close(self) -> None:
        """Close every connection and let the back-end go, on the reaper thread."""
        if self.closed:
            return
        self.closed = True
        pg, self.pg = self.pg, None
        store, self._store = self._store, None
        if pg is not None:
            _reaper().put((pg, self._rank, self._size, store))


class _Reaper(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True, name="kintsugi-group-reaper")
        self.q: "queue.SimpleQueue" = queue.SimpleQueue()
        self.start()

    def put(self, pg) -> None:
        self.q.put(pg)

    def run(self) -> None:
        while True:
            pg, rank, size, store = self.q.get()
            for peer in range(size):
                if peer == rank:
                    continue
                try:  # a timed-out operation makes gloo close the pair to that peer
                    pg.recv([torch.zeros(1)], peer, CLOSE_TAG).wait(timedelta(milliseconds=1))
                except Exception:  # noqa: BLE001 - the expected timeout, or the pair was closed already
                    pass
            del pg  # the last reference: gloo's destructor runs here, not on a training thread
            _forget(store, rank)
            del store  # and the formation's store connection


def _forget(store, rank: int, presence: bool = True, extra: tuple = ()) -> None:
    """Delete this rank's formation keys (gloo's address key and, with `presence`, the presence
    key): every peer read them long ago (the group formed and is closing, or the formation was
    given up), and a long run would otherwise leave two keys per rank per generation."""
    if store is None:
        return
    for key in ((f"here/{rank}",) if presence else ()) + (f"0/{rank}",) + tuple(extra):
        try:
            store.delete_key(key)
        except Exception:  # noqa: BLE001 - the store is gone: nothing left to tidy
            return


_REAPER: Optional[_Reaper] = None
_REAPER_LOCK = threading.Lock()


def _reaper() -> _Reaper:
    global _REAPER
    with _REAPER_LOCK:
        if _REAPER is None:
            _REAPER = _Reaper()
        return _REAPER


class NcclGroup(Group):
    """A group whose back-end is an NCCL communicator on this process's GPU (see the module
    docstring). Works can be polled (CUDA events), so waits need no thread."""

    backend = "nccl"
    pollable = True

    def __init__(self, pg, rank: int, size: int, name: str, store=None, device=None,
                 abort_deadline_s: float = 30.0, deadline_s: float = 300.0):
        super().__init__(pg, rank, size, name, store)
        self.device, self.abort_deadline_s = device, abort_deadline_s
        self.deadline_s = deadline_s  # each collective's (compression.allreduce polls it)
        self.failed: Optional[BaseException] = None
        self.abort_thread: Optional[threading.Thread] = None

    def _live(self):
        if self.failed is not None or self.closed:
            raise RuntimeError(f"NCCL group {self.name} was aborted ({self.failed or 'closed'}); a communicator "
                               "is never reused after a failure: build the next generation's group")
        return self.pg

    def isend(self, tensor: torch.Tensor, dst: int, tag: int):
        return self._live().send([tensor], dst, tag)  # NCCL ignores the tag: issue order matches

    def irecv(self, tensor: torch.Tensor, src: int, tag: int):
        return self._live().recv([tensor], src, tag)

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = True):
        self._live()
        return super().all_reduce(tensor, async_op)

    def broadcast(self, tensor: torch.Tensor, root: int, async_op: bool = True):
        self._live()
        return super().broadcast(tensor, root, async_op)

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
        self._live()
        return super().all_to_all_single(out, inp, async_op)

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
        self._live()
        return super().all_gather_into_tensor(out, inp, async_op)

    def fail(self, error: BaseException) -> None:
        """A wait on this group failed or missed its deadline: abort now, refuse every later call."""
        if self.failed is None:
            self.failed = error
        self.close()

    def close(self) -> None:
        """Abort the communicator on a helper thread under `abort_deadline_s` (the process exits if
        the abort hangs); returns at once. NCCL's destroy is collective and hangs on a dead peer."""
        if self.closed:
            return
        self.closed = True
        pg, self.pg = self.pg, None
        store, self._store = self._store, None
        if pg is not None:
            from .device import abort_backend
            self.abort_thread = abort_backend(pg, self.abort_deadline_s, f"abort of NCCL group {self.name}")
        _forget(store, self._rank, extra=(f"gpu/{self._rank}",))


def _nccl_check_gpus(store, rank: int, size: int, timeout_s: float, device, name: str) -> None:
    """Every rank publishes its GPU identity; two ranks on one GPU fail the formation with one line."""
    from .device import gpu_identity, shared_gpus
    store.set(f"gpu/{rank}", gpu_identity(device))
    store.wait([f"gpu/{r}" for r in range(size)], timedelta(seconds=timeout_s))
    shared = shared_gpus([store.get(f"gpu/{r}").decode() for r in range(size)])
    if shared:
        ident, ranks = next(iter(shared.items()))
        raise ValueError(f"NCCL group {name}: ranks {ranks} share GPU {ident.split('@')[0]}; NCCL needs one GPU per "
                         "rank: give each stage process its own GPU or use parallel.backend=gloo")


def form_group(connect: Callable[[], object], prefix: str, rank: int, size: int, timeout_s: float,
               abort: Optional[threading.Event] = None, poll_s: float = 0.01, name: str = "",
               backend: str = "gloo", device=None) -> Group:
    """Build the group `prefix` as `rank` of `size`. `connect()` returns a store client of its own
    (the rendezvous blocks on it, so it must not be shared with a thread that needs the store
    meanwhile). Raises Aborted when `abort` fires first, FormationError on a timeout or an error.
    `backend="nccl"` (with this process's CUDA `device`) builds an `NcclGroup`; without CUDA it
    raises ValueError at once."""
    name = name or prefix
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r} is unknown; use gloo or nccl")
    if backend == "nccl":
        from .device import require_nccl
        require_nccl(device)
    if size == 1:
        return Group(None, 0, 1, name)
    result: dict = {}
    done = threading.Event()
    lock = threading.Lock()  # who owns a group that forms after its caller gave up: see below

    def _form():
        store = pg = None
        try:
            store = dist.PrefixStore(prefix, connect())
            store.set(f"here/{rank}", "1")
            if backend == "nccl":
                from .device import nccl_backend
                _nccl_check_gpus(store, rank, size, timeout_s, device, name)
                pg = nccl_backend(store, rank, size, timeout_s, device)
            else:
                pg = dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=timeout_s))
        except BaseException as e:  # noqa: BLE001 - surfaced in the caller's thread
            result["error"] = e
            if store is not None:
                try:
                    result["missing"] = [r for r in range(size) if not store.check([f"here/{r}"])]
                except Exception:  # noqa: BLE001 - the store itself may be gone
                    result["missing"] = []
        with lock:
            abandoned = result.get("abandoned")
            if pg is None:
                # Failed: gloo's address key goes; the presence key stays while the caller may still
                # report the formation (peers name the ranks whose presence key is missing, and a
                # live rank named there would be declared dead). An abandoned formation (the
                # generation moved on) reports nothing: both go.
                _forget(store, rank, presence=bool(abandoned))
                store = None  # the exception keeps this frame alive: drop the connection now, not at gc
            elif abandoned:  # the caller left: nobody will ever close this group
                _wrap(pg, rank, size, name, store, backend, device).close()
            if abandoned:
                return
            result["pg"], result["store"] = pg, store
            done.set()

    threading.Thread(target=_form, daemon=True, name=f"kintsugi-form-{name}").start()
    t0 = time.monotonic()
    while not done.wait(poll_s):
        if abort is not None and abort.is_set():
            with lock:
                if not done.is_set():
                    result["abandoned"] = True
                    raise Aborted(f"group {name} abandoned while forming")
            if result.get("pg") is not None:  # it formed just now: close it, the caller gave up
                _wrap(result["pg"], rank, size, name, result["store"], backend, device).close()
            raise Aborted(f"group {name} abandoned while forming")
    if "error" in result:
        err = result["error"]
        if isinstance(err, ValueError):  # a configuration error (two ranks on one GPU): no retry helps
            raise ValueError(str(err)) from err
        missing = result.get("missing", [])
        raise FormationError(f"group {name} (rank {rank} of {size}) did not form after "
                             f"{time.monotonic() - t0:.1f}s: {str(err).splitlines()[0][:160]}"
                             + (f"; ranks never arrived: {missing}" if missing else ""), missing) from err
    return _wrap(result["pg"], rank, size, name, result["store"], backend, device)


def _wrap(pg, rank: int, size: int, name: str, store, backend: str, device) -> Group:
    if backend == "nccl":
        return NcclGroup(pg, rank, size, name, store, device)
    return Group(pg, rank, size, name, store)
