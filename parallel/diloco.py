"""Streaming DiLoCo (arXiv 2501.18512) for one pipeline stage, plus the data-parallel baseline.

Owns: the split of a stage's parameters into P fragments, the staggered sync schedule, the fp32
global (outer) copies with their Nesterov SGD, the asynchronous quantized all-reduce of
pseudo-gradients over the stage group, and the merge back into the replica's parameters.

Schedule convention (`sync_due`): t counts completed inner steps (t >= 1, called after each inner
optimizer step). Fragment p has offset t_p = p*H // P and starts a sync after step t when
`t >= H and (t - t_p) % H == 0`. The `t >= H` term means every fragment trains at least H steps
before its first sync (fragment p first syncs at H + t_p, fragment 0 at H), so the first outer
gradient of every fragment spans H or more inner steps; afterwards each fragment syncs every H steps
and the P syncs of one period are spread evenly, which divides the peak bandwidth by P.

Overlap: the all-reduce started after step t is awaited after step t + tau; meanwhile the inner
steps go on. Then `global = OuterSGD(global, mean_m(global - local_m(t)))` and
`local = alpha * local(t + tau) + (1 - alpha) * global`. tau = 0 finishes in the same call.
All replicas get bit-identical averages from `compression.all_reduce` (rank-ordered fp32 sums of
identical payloads) and run the same fp32 outer step, so their global copies stay bitwise equal —
which is what lets a lost replica be rebuilt exactly from any peer (`state_dict` / `load_state_dict`).
This needs identical global copies at construction: build every replica's stage from the same seed.

Syncs are matched by number, not by step: the k-th sync of fragment p (k = 0, 1, ...) is due at
t = H + t_p + k*H and starts at the first call with t at or past that point. In steady state that is
exactly the formula above; after a generation change, when replicas resume from different committed
steps, a replica that is past a due point starts the owed sync at once and a replica behind it starts
it on arrival, so the k-th all-reduce of every replica meets the k-th of its peers (a schedule keyed
on the step alone would leave the leader waiting in a sync the others had abandoned).

Generation changes: a sync in flight belongs to the old process group. After `Aborted` (or any
generation change) call `abandon()` — the fragment's progress is not lost, its next pseudo-gradient
covers it — then `set_group(new_group, abort)`. A replica that finished a sync its peers abandoned
would diverge; `resync(src)` re-broadcasts the global state and the per-fragment sync counts from one
replica to close that hole.

In a training job the group is a `parallel.stage_link.StageLink` instead: the stage group has
generations of its own (a replica's failure never stops the other replicas' steps), syncs start only
while this replica is a member of the newest generation, a superseded or failed sync is abandoned
and started again on the next generation (it is overdue, so at once), and the handshake that opens
each generation replaces `resync` (see that module).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import threading
import time
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from kintsugi.compression import api as compression

from .groups import Aborted, FormationError
from .stage_link import LinkHandle, NeedsResync, StageLink, checksum
from .transport import ByteCounter, PeerFailure, wait_abortable

log = logging.getLogger(__name__)

QUANT_CODECS = {"none": "none", "bf16": "bf16", "int8": "int8", "fp4": "fp4_e3m0"}
OUTER_CHANNEL = "outer_sync"
DP_CHANNEL = "data_parallel"


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


# --- schedule ---------------------------------------------------------------------------------------
def fragment_of_layer(local_layer_index: int, num_layers_in_stage: int, P: int, assignment: str = "strided") -> int:
    """Fragment of a stage's local layer: strided puts layer l in fragment l mod P (the paper's
    default, slightly better), sequential gives each fragment a contiguous run of layers."""
    if not 0 <= local_layer_index < num_layers_in_stage:
        raise ValueError(f"local layer {local_layer_index} is outside 0..{num_layers_in_stage - 1}")
    if assignment == "strided":
        return local_layer_index % P
    if assignment == "sequential":
        return local_layer_index * P // num_layers_in_stage
    raise ValueError(f"diloco.assignment={assignment!r} is not valid; choose strided or sequential")


def sync_offset(p: int, H: int, P: int) -> int:
    """t_p: fragment p's phase within the period H, spread evenly (integer floor of p*H/P)."""
    return p * H // P


def sync_due(t: int, p: int, H: int, P: int) -> bool:
    """Whether fragment p starts a sync after t completed inner steps (see the module docstring)."""
    return t >= H and (t - sync_offset(p, H, P)) % H == 0


def next_due(k: int, p: int, H: int, P: int) -> int:
    """The step after which fragment p's k-th sync (0-based) is due: H + t_p + k*H."""
    return H + sync_offset(p, H, P) + k * H


def split_fragments(names: Iterable[str], P: int, assignment: str = "strided") -> List[List[str]]:
    """Parameter names per fragment. `layers.<global id>.*` go by the stage-local rank of the id;
    everything else (embedding, final norm, head) is fragment 0. P is clamped to the number of
    layers so that no fragment is empty."""
    names = list(names)
    layer_ids = sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})
    P = max(1, min(P, len(layer_ids))) if layer_ids else 1
    local = {g: i for i, g in enumerate(layer_ids)}
    out: List[List[str]] = [[] for _ in range(P)]
    for n in names:
        p = fragment_of_layer(local[int(n.split(".")[1])], len(layer_ids), P, assignment) \
            if n.startswith("layers.") else 0
        out[p].append(n)
    return out


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every tensor is finite, with one host synchronisation for the lot (on CUDA each
    bool() of a device tensor waits for the GPU: one per parameter would stall every sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


# --- the outer optimizer ----------------------------------------------------------------------------
class _Fragment:
    """One fragment's local parameters, fp32 global copies (whose .grad holds the pseudo-gradient
    buffer) and outer Nesterov SGD."""

    def __init__(self, index: int, named: Dict[str, torch.nn.Parameter], cfg, device):
        self.index, self.names = index, list(named)
        self.local = [named[n] for n in self.names]
        self.glob = [p.detach().to(device=device, dtype=torch.float32, copy=True) for p in self.local]
        for g in self.glob:
            g.requires_grad_(True)
            g.grad = torch.zeros_like(g)
        # torch refuses nesterov without momentum; momentum 0 is plain SGD, same math.
        self.opt = torch.optim.SGD(self.glob, lr=cfg.outer_lr, momentum=cfg.outer_momentum,
                                   nesterov=cfg.outer_momentum > 0)
        self.numel = sum(g.numel() for g in self.glob)
        self.syncs = 0  # completed outer steps of this fragment: the number of the next sync


class StreamingDiLoCo:
    """Outer loop of one stage across the replicas of its stage group.

    `named_params`: the stage's parameters by name (`model.named_parameters()`). `group`: a process
    group holding this stage of every replica and used for nothing else (the quantized all-reduce
    runs on a background thread). Call `after_inner_step(t)` after each inner optimizer step.
    """

    def __init__(self, named_params: Dict[str, torch.nn.Parameter], cfg, group=None,
                 counter: Optional[ByteCounter] = None, abort: Optional[threading.Event] = None):
        if cfg.overlap >= cfg.sync_every:
            raise ValueError(f"diloco.overlap={cfg.overlap} must be smaller than diloco.sync_every={cfg.sync_every}")
        self.cfg, self.abort = cfg, abort
        self.link: Optional[StageLink] = group if isinstance(group, StageLink) else None
        self.group = None if self.link is not None else group
        # An approximately rebuilt stage's outer state is not the group's: it adopts the others'
        # at the next handshake (the local parameters too).
        self.needs_state = False
        self.counter = counter if counter is not None else ByteCounter()
        named = dict(named_params)
        parts = split_fragments(named, cfg.fragments, cfg.assignment)
        if len(parts) < cfg.fragments:
            log.warning("diloco.fragments=%d exceeds this stage's %d layers; using %d fragments",
                        cfg.fragments, len(parts), len(parts))
        first = next(iter(named.values()))
        device = torch.device("cpu") if cfg.offload else first.device
        self.fragments = [_Fragment(i, {n: named[n] for n in names}, cfg, device) for i, names in enumerate(parts)]
        self.codec = compression.get_codec(QUANT_CODECS[cfg.quant])
        self.step = 0                       # last t seen by after_inner_step
        self.num_syncs = 0                  # outer steps applied (all fragments)
        self.peak_sync_bytes = 0            # bytes of the largest single-fragment sync
        self.wait_s = 0.0                   # time the training thread spent blocked on syncs
        self.nonfinite_deltas = 0           # pseudo-gradients that were not finite (sent as zeros)
        self._inflight: Dict[int, tuple] = {}  # fragment -> (start t, handle)
        # (event, fragment, t, perf_counter): for metrics and for tests of the overlap.
        self.events: collections.deque = collections.deque(maxlen=4096)

    @property
    def num_fragments(self) -> int:
        return len(self.fragments)

    # --- the step hook ------------------------------------------------------------------------------
    def after_inner_step(self, t: Optional[int] = None) -> None:
        """t = inner steps completed (defaults to one more than last time). Starts the syncs due
        now, then finishes those started tau or more steps ago (>=: after a rebuild t may jump),
        then starts syncs that had to wait for their fragment's previous sync to finish."""
        t = self.step + 1 if t is None else int(t)
        self.step = t
        self._link_housekeeping()
        self._start_due(t)
        for p, (t0, _) in sorted(self._inflight.items(), key=lambda kv: kv[1][0]):
            if t - t0 >= self.cfg.overlap and p in self._inflight:
                self._finish(self.fragments[p], t)
        self._start_due(t)

    def _link_housekeeping(self) -> None:
        """Adopt a handshake's verdict; open a newer stage generation at once (a handshake-only job,
        not waited for), so every member meets in it within a step instead of when a sync is due."""
        link = self.link
        if link is None:
            return
        rs = link.take_resync()
        if rs is not None:
            self._apply_resync(rs)
        if link.can_start() and link.needs_hello():
            self._hello_handle = link.submit(None, hello=self._hello(), state_fn=self._resync_source)

    def _start_due(self, t: int) -> None:
        """Owed syncs start in order of their due step, and a sync never overtakes an earlier-due one
        that must wait (its fragment still in flight): then every replica starts the same sequence
        of all-reduces, also when one is several steps past due after a generation change (a
        replica behind starts them one by one on arrival). Fragment order would not do: with
        P = 2, a replica at t = 8 owing fragment 1 (due 6) and fragment 0 (due 8) would start
        fragment 0 first while a replica at t = 6 starts fragment 1."""
        H, P = self.cfg.sync_every, self.num_fragments
        if self.link is not None:
            if not self.link.can_start():
                return  # not a member of the newest stage generation (yet), or it is broken
            stale = [p for p, (_, h) in self._inflight.items() if h.gen != self.link.gen]
            for p in stale:  # syncs of a superseded generation: every member abandons them
                del self._inflight[p]
        def due(f) -> int:  # a fragment in flight is next due for its following sync, not this one
            return next_due(f.syncs + (f.index in self._inflight), f.index, H, P)

        for frag in sorted(self.fragments, key=lambda f: (due(f), f.index)):
            if t < due(frag) or frag.index in self._inflight:
                break
            self._start(frag, t)

    def finish_all(self) -> None:
        """Start every sync owed up to the current step and finish them all (at the end of
        training: every replica then has run the same syncs, whatever step it jumped from).
        With a stage link, a sync that cannot run (the group lost a member and no new generation
        takes us in) is given up after a bounded number of attempts: the run is ending."""
        attempts = 0
        while True:
            self._link_housekeeping()
            self._start_due(self.step)
            if not self._inflight:
                if self.link is None or not self._owed() or attempts > 50:
                    return
                attempts += 1
                time.sleep(0.1)  # owed syncs wait for a stage generation we can start on
                if self.abort is not None and self.abort.is_set():
                    raise Aborted()
                continue
            for p, _ in sorted(self._inflight.items(), key=lambda kv: kv[1][0]):
                if p in self._inflight:
                    self._finish(self.fragments[p], self.step, block=True)

    def _owed(self) -> bool:
        H, P = self.cfg.sync_every, self.num_fragments
        return any(self.step >= next_due(f.syncs, f.index, H, P) for f in self.fragments)

    def serve_idle(self) -> None:
        """While the training thread waits (between generations, after the last step), this stage
        still answers its stage group: a newer generation that takes it in is opened with a
        handshake, so a newcomer adopts this state instead of waiting for syncs nobody will start."""
        self._link_housekeeping()

    def abandon(self) -> None:
        """Forget syncs in flight (their group is gone); the next sync of each fragment carries the
        progress, because its pseudo-gradient is measured from the unchanged global copy."""
        if self._inflight:
            log.info("abandoning %d diloco syncs in flight", len(self._inflight))
        self._inflight.clear()

    def set_group(self, group, abort: Optional[threading.Event] = None) -> None:
        """Switch to a new generation's stage group; syncs of the old group must be abandoned."""
        if self._inflight:
            raise RuntimeError("syncs are in flight on the old group; call abandon() or finish_all() first")
        self.group, self.abort = group, abort

    @torch.no_grad()
    def _start(self, frag: _Fragment, t: int) -> None:
        for g, p in zip(frag.glob, frag.local):
            g.grad.copy_(g).sub_(p.detach().to(g.device, torch.float32))  # delta = global - local
        if not _all_finite(g.grad for g in frag.glob):
            # This replica's weights went non-finite: it contributes no change rather than poison
            # every replica's global copy (the trainer rolls it back to that copy).
            for g in frag.glob:
                g.grad.zero_()
            self.nonfinite_deltas += 1
            log.warning("fragment %d: non-finite pseudo-gradient replaced by zeros in outer sync %d", frag.index,
                        frag.syncs)
        if self.link is not None:
            handle = self._submit_link(frag)
        else:
            handle = compression.all_reduce([g.grad for g in frag.glob], self.codec, group=self.group,
                                            op="avg", async_op=True)
            self.counter.add(OUTER_CHANNEL, handle.bytes_sent)
            self.peak_sync_bytes = max(self.peak_sync_bytes, handle.bytes_sent)
        self._inflight[frag.index] = (t, handle)
        self.events.append(("start", frag.index, t, time.perf_counter()))

    def _submit_link(self, frag: _Fragment) -> LinkHandle:
        tensors, codec, counter = [g.grad for g in frag.glob], self.codec, self.counter

        def job(group, stale):  # on the link's thread, on this generation's group
            handle = compression.all_reduce(tensors, codec, group=group, op="avg", async_op=True)
            counter.add(OUTER_CHANNEL, handle.bytes_sent)
            self.peak_sync_bytes = max(self.peak_sync_bytes, handle.bytes_sent)
            wait_abortable(handle, stale)
            return handle.bytes_sent

        hello = self._hello() if self.link.needs_hello() else None
        return self.link.submit(job, hello=hello, state_fn=self._resync_source)

    def _hello(self) -> dict:
        """This member's row of a stage generation's handshake (see parallel.stage_link)."""
        names = [n for f in self.fragments for n in f.names]
        tensors = [g for f in self.fragments for g in f.glob]
        tensors += [f.opt.state[g]["momentum_buffer"] for f in self.fragments for g in f.glob
                    if "momentum_buffer" in f.opt.state.get(g, {})]
        return {"needs_state": self.needs_state, "checksum": checksum(tensors),
                "layout": int.from_bytes(_digest("|".join(names)), "little") >> 2,
                "counts": [f.syncs for f in self.fragments], "momentum": self.cfg.outer_momentum > 0}

    def _resync_source(self) -> list:
        out = []
        for f in self.fragments:
            moms = [f.opt.state.get(g, {}).get("momentum_buffer") for g in f.glob]
            out.append((list(f.glob), moms if all(m is not None for m in moms) else [torch.zeros_like(g) for g in f.glob]))
        return out

    @torch.no_grad()
    def _apply_resync(self, e: NeedsResync) -> None:
        """Adopt the outer state every member of the stage group agreed on at a handshake."""
        self._inflight.clear()
        for p, (globs, moms, count) in e.state.items():
            f = self.fragments[p]
            f.syncs = count
            for i, g in enumerate(f.glob):
                g.copy_(globs[i])
                if moms is not None:
                    f.opt.state[g]["momentum_buffer"] = moms[i].to(g.device).clone()
                else:
                    f.opt.state.pop(g, None)
        self.num_syncs = sum(f.syncs for f in self.fragments)
        if e.reset_local or self.needs_state:
            for f in self.fragments:
                for g, p in zip(f.glob, f.local):
                    p.copy_(g.to(p.device, p.dtype))
        self.needs_state = False

    @torch.no_grad()
    def _finish(self, frag: _Fragment, t: int, block: bool = False) -> None:
        _, handle = self._inflight[frag.index]
        if self.link is not None:
            if not (block or self.link.settled(handle.gen)) and not handle.future.done():
                return  # the stage generation is still forming: merge later, never block on it now
            t0 = time.perf_counter()
            try:
                self.link.wait(handle, self.abort)
            except NeedsResync as e:
                if self.link.pending_resync is e:
                    self.link.take_resync()
                self._apply_resync(e)   # every member does the same; owed syncs start again
                return
            except (PeerFailure, FormationError) as e:
                log.warning("stage %d outer sync of fragment %d failed (%s); it runs again on the next "
                            "stage generation", self.link.stage, frag.index, str(e).splitlines()[0][:120])
                self._inflight.pop(frag.index, None)
                return
            except Aborted:
                if self.abort is not None and self.abort.is_set():
                    raise  # our own pipeline is changing generation: keep the sync for later
                rs = self.link.take_resync()
                if rs is not None:  # cancelled by a resync whose verdict came with another job
                    self._apply_resync(rs)
                    return
                self._inflight.pop(frag.index, None)  # superseded stage generation: it runs again
                return
            finally:
                self.wait_s += time.perf_counter() - t0
            self.needs_state = False
        else:
            wait_abortable(handle, self.abort)   # raises Aborted / PeerFailure; entry stays for abandon()
        del self._inflight[frag.index]
        frag.syncs += 1
        if not _all_finite(g.grad for g in frag.glob):
            # Every replica received these same bytes, so every replica skips this outer step.
            log.warning("fragment %d: outer sync %d averaged to non-finite values; outer step skipped", frag.index,
                        frag.syncs - 1)
            self.num_syncs += 1
            return
        frag.opt.step()
        a = self.cfg.alpha
        for g, p in zip(frag.glob, frag.local):
            merged = g.to(p.device, p.dtype)
            if a:
                merged = p.detach() * a + merged * (1.0 - a)
            p.copy_(merged)
        self.num_syncs += 1
        self.events.append(("finish", frag.index, t, time.perf_counter()))

    # --- views for evaluation -----------------------------------------------------------------------
    def global_params(self) -> Dict[str, torch.Tensor]:
        """The outer (global) parameters by name: fp32, identical on every replica. Do not modify."""
        return {n: g.detach() for f in self.fragments for n, g in zip(f.names, f.glob)}

    @contextlib.contextmanager
    def use_global_params(self):
        """Evaluate the global parameters: swap them into the model, restore the local ones after."""
        saved = []
        with torch.no_grad():
            for f in self.fragments:
                for g, p in zip(f.glob, f.local):
                    saved.append(p.detach().clone())
                    p.copy_(g.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip((p for f in self.fragments for p in f.local), saved):
                    p.copy_(s)

    # --- state for the peer rebuild tier ----------------------------------------------------------
    def state_dict(self, as_if_abandoned: bool = False) -> dict:
        """Global copies, outer momentum and counters (cloned). Only without syncs in flight: call
        `finish_all()` (healthy group) or `abandon()` (broken group, on every replica) first, or pass
        `as_if_abandoned` (a checkpoint: syncs in flight have not touched this state and are redone
        after a restore, which is what `abandon()` would leave)."""
        if self._inflight and not as_if_abandoned:
            raise RuntimeError("diloco syncs are in flight; call finish_all() or abandon() before state_dict()")
        frags = []
        for f in self.fragments:
            mom = {}
            for n, g in zip(f.names, f.glob):
                buf = f.opt.state.get(g, {}).get("momentum_buffer")
                if buf is not None:
                    mom[n] = buf.clone()
            frags.append({"names": list(f.names), "global": {n: g.detach().clone() for n, g in zip(f.names, f.glob)},
                          "momentum": mom, "syncs": f.syncs})
        return {"step": self.step, "num_syncs": self.num_syncs, "fragments": frags}

    @torch.no_grad()
    def load_state_dict(self, state: dict, reset_local: bool = True) -> None:
        """Take a peer replica's outer state; with `reset_local` the stage's own parameters become
        the global ones, so the rebuilt replica is exact up to the peer's last sync."""
        if [f["names"] for f in state["fragments"]] != [f.names for f in self.fragments]:
            raise ValueError("diloco state has a different fragment split; use the same diloco.fragments, "
                             "diloco.assignment and stage layout as the peer")
        self.abandon()
        for f, fs in zip(self.fragments, state["fragments"]):
            f.syncs = int(fs.get("syncs", 0))
            for n, g in zip(f.names, f.glob):
                g.copy_(fs["global"][n])
                if n in fs["momentum"]:
                    f.opt.state[g]["momentum_buffer"] = fs["momentum"][n].to(g.device).clone()
                else:
                    f.opt.state.pop(g, None)
        self.step, self.num_syncs = int(state["step"]), int(state["num_syncs"])
        self.needs_state = False
        if reset_local:
            for f in self.fragments:
                for g, p in zip(f.glob, f.local):
                    p.copy_(g.to(p.device, p.dtype))

    @torch.no_grad()
    def resync(self, src: int = 0, reset_local: bool = False) -> None:
        """Broadcast the global copies and momentum from group rank `src` to the whole stage group:
        restores bitwise agreement after a generation change (or builds it for a stage that every
        replica lost). `reset_local` also sets the local parameters to the global ones; survivors
        keep theirs, so they lose no inner progress."""
        if self._inflight:
            raise RuntimeError("diloco syncs are in flight; call finish_all() or abandon() before resync()")
        gsrc = dist.get_global_rank(self.group, src) if self.group is not None else src
        counts = torch.tensor([f.syncs for f in self.fragments] + [self.num_syncs], dtype=torch.int64)
        wait_abortable(dist.broadcast(counts, gsrc, group=self.group, async_op=True), self.abort)
        for f, c in zip(self.fragments, counts.tolist()):
            f.syncs = int(c)
        self.num_syncs = int(counts[-1])
        for f in self.fragments:
            bufs = [f.opt.state.setdefault(g, {}).setdefault("momentum_buffer", torch.zeros_like(g))
                    for g in f.glob] if self.cfg.outer_momentum > 0 else []
            for t in list(f.glob) + bufs:
                wait_abortable(dist.broadcast(t.data, gsrc, group=self.group, async_op=True), self.abort)
            if reset_local:
                for g, p in zip(f.glob, f.local):
                    p.copy_(g.to(p.device, p.dtype))


# --- the data-parallel baseline ------------------------------------------------------------------------
def allreduce_gradients(params: Iterable[torch.nn.Parameter], group=None, counter: Optional[ByteCounter] = None,
                        abort: Optional[threading.Event] = None) -> int:
    """Average the gradients over `group` in fp32 (one fused ring all-reduce) every step; the
    bytes go to channel "data_parallel". Returns the bytes this rank sent."""
    grads = [p.grad for p in params if p.grad is not None]
    handle = compression.all_reduce(grads, "none", group=group, op="avg", async_op=True)
    wait_abortable(handle, abort)
    if counter is not None:
        counter.add(DP_CHANNEL, handle.bytes_sent)
    return handle.bytes_sent


def data_parallel_bytes_per_step(numel: int, world: int) -> int:
    """What a ring fp32 all-reduce of `numel` gradients sends per rank per step: the
    `data_parallel_equivalent` that outer-sync bytes are compared with."""
    if world <= 1:
        return 0
    chunk = -(-numel // world)
    return 2 * (world - 1) * 4 * chunk
