"""Pipeline schedules (GPipe, 1F1B) over per-microbatch routes.

A route is the sequence of hops one microbatch takes; a hop is (stage, parts) where parts is a
subset of ("embed", "layers", "head"). The plain route visits every stage once. CheckFree+ sends
odd microbatches along a swapped route (E, S2, S1, S3, ..., S_n, S_{n-1}, E^-1) so neighbouring
end stages learn to stand in for each other; there the first stage runs twice per microbatch
(embedding, then its layers) and so does the last.

Deadlock freedom: every stage executes its actions in an order that is a subsequence of one global
topological order, and sends never block (they are awaited at the end), so the earliest unfinished
action always has its input available.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .device import KernelClock
from .transport import Transport

EMBED, LAYERS, HEAD = "embed", "layers", "head"


@dataclass(frozen=True)
class Hop:
    stage: int
    parts: Tuple[str, ...]


Route = Tuple[Hop, ...]


def plain_route(num_stages: int) -> Route:
    hops = []
    for s in range(num_stages):
        parts = ((EMBED,) if s == 0 else ()) + (LAYERS,) + ((HEAD,) if s == num_stages - 1 else ())
        hops.append(Hop(s, parts))
    return tuple(hops)


def swap_partners(num_stages: int) -> Dict[int, int]:
    """Which stage stands in for which under CheckFree+: the first two swap, the last two swap.
    With 3 stages only the first pair can swap (the middle stage cannot be in both pairs)."""
    if num_stages < 2:
        return {}
    partners = {0: 1, 1: 0}
    if num_stages >= 4:
        partners.update({num_stages - 1: num_stages - 2, num_stages - 2: num_stages - 1})
    elif num_stages == 2:
        pass  # the two stages are each other's partner already
    return partners


def swapped_route(num_stages: int) -> Route:
    """CheckFree+'s odd-microbatch route for any stage count >= 2."""
    if num_stages < 2:
        return plain_route(num_stages)
    order = list(range(num_stages))
    order[0], order[1] = order[1], order[0]
    if num_stages >= 4:
        order[-1], order[-2] = order[-2], order[-1]
    last = num_stages - 1
    hops = [Hop(0, (EMBED,))]
    hops += [Hop(s, (LAYERS,)) for s in order]
    hops.append(Hop(last, (HEAD,)))
    # Merge the embedding / head into the adjacent hop when the stage is the same anyway.
    merged: List[Hop] = []
    for hop in hops:
        if merged and merged[-1].stage == hop.stage:
            merged[-1] = Hop(hop.stage, merged[-1].parts + hop.parts)
        else:
            merged.append(hop)
    return tuple(merged)


def routes_for(num_stages: int, num_microbatches: int, alternate: bool) -> List[Route]:
    plain = plain_route(num_stages)
    if not alternate:
        return [plain] * num_microbatches
    swapped = swapped_route(num_stages)
    return [swapped if mb % 2 == 1 else plain for mb in range(num_microbatches)]


Action = Tuple[str, int, int]  # ("F" | "B", microbatch, hop index in its route)


def gpipe_actions(stage: int, routes: Sequence[Route]) -> List[Action]:
    fwd = [("F", mb, h) for mb, r in enumerate(routes) for h, hop in enumerate(r) if hop.stage == stage]
    bwd = [("B", mb, h) for mb in reversed(range(len(routes)))
           for h in reversed(range(len(routes[mb]))) if routes[mb][h].stage == stage]
    return fwd + bwd


def one_f_one_b_actions(stage: int, num_stages: int, num_microbatches: int) -> List[Action]:
    """Classic 1F1B on the plain route: warm up with (S - s - 1) forwards, alternate, cool down."""
    warmup = min(num_stages - stage - 1, num_microbatches)
    acts: List[Action] = [("F", mb, stage) for mb in range(warmup)]
    f, b = warmup, 0
    while f < num_microbatches:
        acts.append(("F", f, stage))
        f += 1
        acts.append(("B", b, stage))
        b += 1
    while b < num_microbatches:
        acts.append(("B", b, stage))
        b += 1
    return acts


def _messages(routes: Sequence[Route], a: Action):
    """(received, sent) by action `a`: each None or ((src stage, dst stage), message id)."""
    kind, mb, h = a
    route = routes[mb]
    here = route[h].stage
    if kind == "F":
        recv = ((route[h - 1].stage, here), ("F", mb, h)) if h > 0 else None
        send = ((here, route[h + 1].stage), ("F", mb, h + 1)) if HEAD not in route[h].parts else None
    else:
        recv = ((route[h + 1].stage, here), ("B", mb, h + 1)) if HEAD not in route[h].parts else None
        send = ((here, route[h - 1].stage), ("B", mb, h)) if h > 0 else None
    return recv, send


def simulated_1f1b(routes: Sequence[Route], num_stages: int) -> Dict[int, List[Action]]:
    """1F1B for arbitrary routes (CheckFree+'s alternating ones), by simulating a run in unit-time
    ticks: each tick every stage runs one ready action, a backward first, else the next forward if
    fewer than S - s microbatches are in flight on it (the classic 1F1B memory bound). Each stage's
    order is the order it ran things in the simulation, so all orders fit one global topological
    order and the real run cannot deadlock.

    Every directed edge is first-in first-out: an action that receives is ready only once its
    message is the oldest one unreceived on that edge. So on every edge the receiver takes messages
    in the order the sender sent them, which a back-end that ignores tags and matches point-to-point
    messages in issue order (NCCL) needs; without it, CheckFree+'s swapped routes made e.g. stage 0
    send F(mb2) then B(mb1) while stage 1 received B(mb1) then F(mb2): same shapes, silently
    swapped. The head of every edge's queue is always ready, so the FIFO rule cannot stall the
    simulation; if the memory bound would, it is waived for that tick."""
    done = set()
    pending = {s: [] for s in range(num_stages)}
    for mb, r in enumerate(routes):
        for h, hop in enumerate(r):
            pending[hop.stage].append(("F", mb, h))
            pending[hop.stage].append(("B", mb, h))
    order: Dict[int, List[Action]] = {s: [] for s in range(num_stages)}
    started = {s: set() for s in range(num_stages)}   # microbatches with a forward here
    finished = {s: set() for s in range(num_stages)}  # ... whose every backward here is done
    queues: Dict[Tuple[int, int], List[tuple]] = {}   # per directed edge, messages sent, not received

    def ready(a):
        kind, mb, h = a
        recv, _ = _messages(routes, a)
        if kind == "B" and ("F", mb, h) not in done:
            return False
        if recv is None:
            return True
        q = queues.get(recv[0])
        return bool(q) and q[0] == recv[1]

    def pick(s, bounded):
        cands = [a for a in pending[s] if ready(a)]
        bwd = sorted(a for a in cands if a[0] == "B")
        if bwd:
            return bwd[0]
        fwd = sorted((a for a in cands if a[0] == "F"), key=lambda a: (a[1], a[2]))
        if bounded:
            limit = num_stages - s
            fwd = [a for a in fwd if a[1] in started[s] or len(started[s] - finished[s]) < limit]
        return fwd[0] if fwd else None

    while any(pending.values()):
        tick = [(s, a) for s in range(num_stages) if (a := pick(s, True)) is not None]
        if not tick:
            tick = [(s, a) for s in range(num_stages) if (a := pick(s, False)) is not None]
        if not tick:
            raise RuntimeError("1F1B simulation stalled")  # cannot happen: an edge's oldest message is ready
        for s, a in tick:
            pending[s].remove(a)
            order[s].append(a)
            done.add(a)
            recv, send = _messages(routes, a)
            if recv is not None:
                queues[recv[0]].pop(0)
            if send is not None:
                queues.setdefault(send[0], []).append(send[1])
            if a[0] == "F":
                started[s].add(a[1])
            elif not any(x[1] == a[1] and x[0] == "B" for x in pending[s]):
                finished[s].add(a[1])
    return order


def actions_for(schedule: str, stage: int, num_stages: int, routes: Sequence[Route]) -> List[Action]:
    plain = plain_route(num_stages)
    if schedule == "1f1b":
        if all(r == plain for r in routes):
            return one_f_one_b_actions(stage, num_stages, len(routes))
        return simulated_1f1b(routes, num_stages)[stage]
    return gpipe_actions(stage, routes)


def run_parts(model, parts: Sequence[str], x: torch.Tensor) -> torch.Tensor:
    if EMBED in parts:
        x = model.embed(x)
    if LAYERS in parts:
        x = model.forward_layers(x)
    if HEAD in parts:
        x = model.head(x)
    return x


class StageExecutor:
    """Runs one stage's share of a step: forwards, backwards and the p2p traffic between them."""

    def __init__(self, model, stage: int, num_stages: int, transport: Transport,
                 rank_of_stage: Callable[[int], int], hidden_dim: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 autocast_dtype: Optional[torch.dtype] = None, device_type: str = "cpu"):
        self.model, self.stage, self.num_stages = model, stage, num_stages
        self.transport, self.rank_of_stage = transport, rank_of_stage
        self.hidden_dim, self.loss_fn = hidden_dim, loss_fn
        # Mixed precision: the forward runs under autocast (weights stay fp32); what leaves the
        # stage is fp32, so the wire format and the receiver's buffers do not depend on it.
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        self.clock = KernelClock(device_type)  # this stage's GPU seconds per run (None on CPU)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    @staticmethod
    def _tag(mb: int, hop: int, backward: bool) -> int:
        return (mb * 64 + hop) * 2 + int(backward)

    def _receive_of(self, routes: Sequence[Route], action: Action):
        """(src rank, tag, channel) of the message `action` receives, or None."""
        kind, mb, h = action
        route = routes[mb]
        if kind == "F":
            return (self.rank_of_stage(route[h - 1].stage), self._tag(mb, h, False), "p2p") if h > 0 else None
        if HEAD in route[h].parts:
            return None
        return self.rank_of_stage(route[h + 1].stage), self._tag(mb, h + 1, True), "p2p_grad"

    def run(self, inputs: torch.Tensor, targets: torch.Tensor,
            routes: Sequence[Route], actions: Sequence[Action], train: bool = True) -> Optional[float]:
        """Execute `actions`. Returns the summed per-microbatch mean loss on the stage that runs a
        head hop (divided by the microbatch count, i.e. the batch mean), else None.

        Tensors stay on the inputs' device; the loss is read back once, at the end (the step's only
        host synchronisation). Before each action the next action's receive is posted (where the
        transport supports it), so a message that arrives early lands in its buffer at once."""
        num_mb = len(routes)
        mb_size = inputs.shape[0] // num_mb  # every stage gets the batch; only shapes matter off the ends
        act_shape = (mb_size, inputs.shape[1], self.hidden_dim)  # what crosses every edge, both ways
        receives = [self._receive_of(routes, a) for a in actions]
        ahead = [j for j, r in enumerate(receives) if r is not None]
        post = getattr(self.transport, "post_recv", None)  # recording transports in tests have none
        next_ahead = 0
        saved: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}
        loss_total: Optional[torch.Tensor] = None
        self.clock.reset()
        for i, (kind, mb, h) in enumerate(actions):
            while next_ahead < len(ahead) and ahead[next_ahead] <= i:
                next_ahead += 1
            if post is not None and next_ahead < len(ahead):
                src, tag, channel = receives[ahead[next_ahead]]
                post(act_shape, src, tag, channel)
            route = routes[mb]
            hop = route[h]
            if kind == "F":
                if h == 0:
                    x = inputs[mb * mb_size:(mb + 1) * mb_size]
                else:
                    src, tag, channel = receives[i]
                    x = self.transport.recv(act_shape, src, tag, channel)
                    x.requires_grad_(train)
                with torch.set_grad_enabled(train):
                    self.clock.start()
                    with self._autocast():
                        out = run_parts(self.model, hop.parts, x)
                    if HEAD in hop.parts:
                        tgt = targets[mb * mb_size:(mb + 1) * mb_size]
                        out = self.loss_fn(out.float(), tgt) / num_mb  # the loss in fp32
                        mb_loss = out.detach().to(torch.float64)
                        loss_total = mb_loss if loss_total is None else loss_total + mb_loss
                        self.clock.stop()
                    else:
                        out = out.float()  # a no-op in fp32
                        self.clock.stop()
                        self.transport.send(out, self.rank_of_stage(route[h + 1].stage), self._tag(mb, h + 1, False))
                if train:
                    saved[(mb, h)] = (x, out)
            else:
                x, out = saved.pop((mb, h))
                if HEAD in hop.parts:
                    grad = None
                else:
                    src, tag, channel = receives[i]
                    grad = self.transport.recv(act_shape, src, tag, channel)
                if out.requires_grad:
                    self.clock.start()
                    torch.autograd.backward(out, grad)
                    self.clock.stop()
                if h > 0:
                    g = x.grad if x.grad is not None else torch.zeros_like(x)
                    self.transport.send(g, self.rank_of_stage(route[h - 1].stage), self._tag(mb, h, True),
                                        channel="p2p_grad")
        self.transport.flush()
        return float(loss_total) if loss_total is not None else None
