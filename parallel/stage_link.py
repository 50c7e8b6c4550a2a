"""A worker's membership in its stage group — one stage across the replicas — with generations of its
own, so that Streaming DiLoCo's outer syncs never tie one replica's failure to the others' steps.

The coordinator publishes a stage plan per stage (`members`: worker id -> rank, `gen`, `layout`).
When a member dies the stage gets a new generation without it (the live replicas keep syncing
among themselves); when its replacement holds its state, another generation takes it back in.
Nothing here stops a pipeline: a replica only meets its stage group inside an outer sync, which
Streaming DiLoCo already overlaps with the inner steps.

How a generation is used:
- Jobs (one all-reduce of a fragment's pseudo-gradients each) run on one thread per link, in the
  order the training thread submits them; every member submits the same sequence (the sync
  schedule is a function of the per-fragment sync counts), so they meet in the same collectives.
- The group forms lazily, inside the first job of a generation, on this thread: members arrive when
  they reach their next sync, not when the plan appears.
- The first job of a generation starts with a handshake: every member's per-fragment sync counts,
  whether it holds a real outer state (`needs_state`: an approximately rebuilt stage does not) and
  a checksum of its global copies are all-gathered. Equal everywhere: go on. Otherwise, per
  fragment, the member with the most syncs (among those with real state) broadcasts its global
  copy, momentum and count; every member raises `NeedsResync` carrying the result, the training
  thread adopts it and starts its syncs again. All members see the same gathered rows, so they all
  take the same decision — no extra round.
- A newer generation (or a stopping run) makes every job of an older one raise `Aborted`, also one
  blocked in a collective with a hung peer: that collective is left behind, its group closed.
- A job that fails with a dead peer marks its generation broken: nothing new starts on it until
  the coordinator publishes the next one.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .groups import Aborted, FormationError, Group, form_group
from .transport import PeerFailure, wait_abortable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageGroupPlan:
    """One generation of a stage group, as the coordinator publishes it: `members` maps worker id ->
    rank; `trusted` marks a fresh run's first generation (every member built its stage from the same
    seed and synced nothing yet: no handshake needed). Strict JSON in and out, like the cell plans
    of recovery.plan (this layer cannot import that one)."""
    stage: int
    gen: int
    members: Dict[str, int]
    layout_version: int = 0
    trusted: bool = False

    def to_json(self) -> dict:
        return {"stage": self.stage, "gen": self.gen, "members": dict(self.members),
                "layout_version": self.layout_version, "trusted": self.trusted}

    @classmethod
    def from_json(cls, d) -> "StageGroupPlan":
        keys = ("stage", "gen", "members", "layout_version", "trusted")
        if not isinstance(d, dict) or set(d) != set(keys):
            raise ValueError(f"stage group plan: expected exactly the keys {keys}, got {d!r:.200}")
        ints = all(type(d[k]) is int for k in ("stage", "gen", "layout_version"))
        members_ok = isinstance(d["members"], dict) and all(
            isinstance(w, str) and type(r) is int for w, r in d["members"].items())
        if not ints or not members_ok or not isinstance(d["trusted"], bool):
            raise ValueError(f"stage group plan: a field has the wrong type: {d!r:.200}")
        return cls(d["stage"], d["gen"], dict(d["members"]), d["layout_version"], d["trusted"])


class NeedsResync(RuntimeError):
    """The members' outer states differed at a generation's handshake; `state` is what every
    member adopts: {fragment index: (global tensors, momentum tensors or None, sync count)}."""

    def __init__(self, state: dict, reset_local: bool):
        super().__init__("stage group members resynced their outer state")
        self.state, self.reset_local = state, reset_local


class _Predicate:
    """Something with `is_set()` (what `form_group` and `wait_abortable` poll)."""

    def __init__(self, fn: Callable[[], bool]):
        self.fn = fn

    def is_set(self) -> bool:
        return self.fn()


class LinkHandle:
    def __init__(self, gen: int, future: concurrent.futures.Future):
        self.gen, self.future = gen, future


class StageLink:
    """`connect()` gives a fresh store client (formation blocks on it); `stop` aborts everything
    (the run is ending or suspending)."""

    def __init__(self, connect: Callable[[], object], stage: int, wid: str, timeout_s: float,
                 stop: Optional[threading.Event] = None, on_fault: Optional[Callable[[int, Exception], None]] = None):
        """`on_fault(gen, error)`: a generation broke (a member died, or its group never formed):
        the coordinator publishes the next one."""
        self.connect, self.stage, self.wid, self.timeout_s = connect, stage, wid, timeout_s
        self.on_fault = on_fault
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self.plan: Optional[StageGroupPlan] = None
        self._group: Optional[Group] = None
        self._group_gen = -1
        self._ready_gen = -1        # the generation whose handshake is done
        self._hello_gen = -1        # the generation a handshake was submitted for
        self.broken_gen = -1
        self._epoch = 0             # bumped by a resync: jobs submitted before it are cancelled
        self.layout_version = 0     # this member's layer layout (live rebalancing)
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self.formed: List[int] = []  # generations formed (tests, metrics)
        self.pending_resync: Optional[NeedsResync] = None  # a handshake's verdict, until adopted
        threading.Thread(target=self._loop, daemon=True, name=f"kintsugi-stage{stage}").start()

    # --- plans (the worker's watcher thread calls update) ------------------------------------------
    def update(self, plan: StageGroupPlan) -> None:
        with self._lock:
            if self.plan is None or plan.gen > self.plan.gen:
                self.plan = plan
                if plan.trusted:
                    # A fresh run's first generation: every member built its stage from the same
                    # seed and has synced nothing yet, so there is nothing to reconcile.
                    self._ready_gen = self._hello_gen = plan.gen

    @property
    def gen(self) -> int:
        return self.plan.gen if self.plan is not None else -1

    def member(self) -> bool:
        return self.plan is not None and self.wid in self.plan.members

    def can_start(self) -> bool:
        """A sync may start now: we are a member of the newest generation, it is not broken, and
        every member works with our layer layout."""
        p = self.plan
        return (p is not None and self.wid in p.members and p.gen > self.broken_gen
                and p.layout_version == self.layout_version and not self.stop.is_set())

    def needs_hello(self) -> bool:
        """The next job opens a generation: it must carry this member's handshake row."""
        return self._hello_gen < self.gen

    def settled(self, gen: int) -> bool:
        """`gen` is the newest generation and its handshake is done: every member holds the same
        sync counts, so each reaches every sync on its own, and waiting for one cannot deadlock.
        While a generation forms, members may be at different counts (one would wait for a sync
        another will only start after its own pipeline moves on): nobody blocks on it then."""
        return gen == self.gen == self._ready_gen

    def take_resync(self) -> Optional[NeedsResync]:
        rs, self.pending_resync = self.pending_resync, None
        return rs

    def size(self) -> int:
        return len(self.plan.members) if self.plan is not None else 1

    # --- jobs --------------------------------------------------------------------------------------
    def submit(self, fn: Callable[[Group], object], hello: Optional[dict] = None,
               state_fn: Optional[Callable[[], list]] = None) -> LinkHandle:
        """Run `fn(group)` on the current generation's group. `hello` (see `hello_row`) must be given
        when `needs_hello()`; `state_fn()` returns this member's per-fragment (globals, momentum)
        for a resync broadcast."""
        gen = self.gen
        if hello is not None:
            self._hello_gen = gen
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((gen, self._epoch, fn, hello, state_fn, fut))
        return LinkHandle(gen, fut)

    def wait(self, handle: LinkHandle, abort=None):
        """Wait for a job; Aborted when its generation is superseded (or `abort` fires),
        NeedsResync / PeerFailure as the job raised them."""
        stale = _Predicate(lambda: self.gen != handle.gen or self.stop.is_set()
                           or (abort is not None and abort.is_set()))
        while True:
            try:
                return handle.future.result(timeout=0.02)
            except concurrent.futures.TimeoutError:
                if stale.is_set():
                    raise Aborted(f"stage {self.stage} generation {handle.gen} superseded") from None

    def _loop(self) -> None:
        while True:
            gen, epoch, fn, hello, state_fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._run(gen, epoch, fn, hello, state_fn))
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                if isinstance(e, NeedsResync):
                    self.pending_resync = e  # kept: the training thread may never wait on this job
                if isinstance(e, (PeerFailure, FormationError)):
                    self.broken_gen = max(self.broken_gen, gen)
                    self._drop_group()
                    if self.on_fault is not None and gen == self.gen:
                        try:
                            self.on_fault(gen, e)
                        except Exception:  # noqa: BLE001 - reporting is best effort
                            log.exception("stage %d: could not report a broken generation", self.stage)
                fut.set_exception(e)
            del fn, fut, state_fn

    def _run(self, gen, epoch, fn, hello, state_fn):
        stale = _Predicate(lambda: self.gen != gen or self.stop.is_set())
        if stale.is_set() or gen <= self.broken_gen:
            raise Aborted(f"stage {self.stage} generation {gen} superseded before its job ran")
        if epoch != self._epoch:
            raise Aborted("cancelled by a resync of the outer state")
        group = self._group_for(gen, stale)
        if self._ready_gen != gen:
            if hello is None:
                raise Aborted(f"stage {self.stage} generation {gen}: no handshake row (its opening job failed)")
            state = self._handshake(group, hello, state_fn, stale)
            self._ready_gen = gen
            if state is not None:
                self._epoch += 1
                raise state
        return fn(group, stale) if fn is not None else None  # None: a handshake-only job

    def _group_for(self, gen: int, stale) -> Group:
        if self._group is not None and self._group_gen == gen:
            return self._group
        self._drop_group()
        members = self.plan.members
        rank, size = members[self.wid], len(members)
        try:
            group = form_group(self.connect, f"stage{self.stage}/gen{gen}", rank, size, self.timeout_s,
                               abort=stale, name=f"stage{self.stage}/gen{gen}")
        except FormationError:
            self.broken_gen = max(self.broken_gen, gen)
            raise
        self._group, self._group_gen = group, gen
        self.formed.append(gen)
        return group

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group, self._group_gen = None, -1

    # --- the handshake -----------------------------------------------------------------------------
    def _handshake(self, group: Group, hello: dict, state_fn, stale) -> Optional[NeedsResync]:
        row = hello_tensor(hello)
        rows = torch.empty(group.size() * row.numel(), dtype=torch.int64)
        wait_abortable(group.all_gather_into_tensor(rows, row), stale)
        rows = rows.view(group.size(), -1)
        if bool((rows == rows[0]).all()) and int(rows[0, 0]) == 0:
            return None
        if not bool((rows[:, 2] == rows[0, 2]).all()):
            raise RuntimeError(f"stage {self.stage}: members disagree on the layer layout of this stage "
                               "(a rebalance was applied on some replicas only)")
        num_frag = rows.shape[1] - 3
        real = [i for i in range(group.size()) if int(rows[i, 0]) == 0] or list(range(group.size()))
        mine = state_fn() if state_fn is not None else None
        out: Dict[int, tuple] = {}
        for p in range(num_frag):
            counts = rows[:, 3 + p]
            src = max(real, key=lambda i: (int(counts[i]), -i))
            count = int(counts[src])
            globs, moms = mine[p]
            # In host memory on every member (gloo; a GPU member's copies come back via `.copy_`).
            flat = torch.cat([g.detach().reshape(-1).float().cpu() for g in globs]) if group.rank() == src \
                else torch.empty(sum(g.numel() for g in globs), dtype=torch.float32)
            wait_abortable(group.broadcast(flat, src), stale)
            has_mom = bool(hello.get("momentum")) and count > 0
            mflat = None
            if has_mom:
                mflat = torch.cat([m.detach().reshape(-1).float().cpu() for m in moms]) if group.rank() == src \
                    else torch.empty_like(flat)
                wait_abortable(group.broadcast(mflat, src), stale)
            out[p] = (_split_like(flat, globs), _split_like(mflat, globs) if mflat is not None else None, count)
        log.warning("stage %d: outer state resynced at generation handshake (sync counts %s)", self.stage,
                    rows[:, 3:].tolist())
        return NeedsResync(out, reset_local=bool(hello.get("needs_state")))


def hello_tensor(hello: dict) -> torch.Tensor:
    """[needs_state, checksum, layout hash, sync count per fragment] as int64."""
    return torch.tensor([int(bool(hello["needs_state"])), int(hello["checksum"]), int(hello["layout"])]
                        + [int(c) for c in hello["counts"]], dtype=torch.int64)


def checksum(tensors) -> int:
    """An order-sensitive checksum of tensors' bits (equal states give equal sums; a differing bit
    almost surely changes it). Not cryptographic: it detects divergence, it does not defend."""
    total = 0
    for i, t in enumerate(tensors):
        bits = t.detach().contiguous().view(-1)
        if bits.dtype.itemsize == 4:
            bits = bits.view(torch.int32)
        elif bits.dtype.itemsize == 2:
            bits = bits.view(torch.int16)
        elif bits.dtype.itemsize == 8:
            bits = bits.view(torch.int64)
        total = (total * 1000003 + int(bits.to(torch.int64).sum()) + i) % (1 << 61)
    return total


def _split_like(flat: torch.Tensor, like) -> list:
    out, off = [], 0
    for g in like:
        n = g.numel()
        out.append(flat[off:off + n].view(g.shape).clone())
        off += n
    return out
