"""Live rebalancing on the worker's side: layers change stage inside one replica.

Each moving layer's weights and AdamW state go from its old holder to its new one, in global layer
order (every pair of ranks meets its transfers in the same order, so blocking sends cannot
deadlock); the stage is then rebuilt around the layers it now holds. The pipeline computes exactly
the same function after. Under Streaming DiLoCo a layer's global copy and outer momentum travel with
it (by name) and the stage's fragments are split again the same way on every replica.
"""
from __future__ import annotations

import logging
import time

import torch

from kintsugi.parallel.topology import Grid, per_stage_layers
from kintsugi.parallel.transport import Transport
from kintsugi.recovery.plan import CellPlan
from kintsugi.recovery.rebuild import recv_package_sized, send_package

from kintsugi.trainer.runtime.rebuild import package_event
from kintsugi.trainer.runtime.stage import StageState

log = logging.getLogger("kintsugi.relayout")
REBALANCE_TAG = 1 << 23


def _layer_ids(job, stage: int, layout):
    return per_stage_layers(job.model.n_layers, job.parallel.stages, layout)[stage]


def relayout(host, plan: CellPlan, grid: Grid, transport: Transport, slot) -> None:
    """`host`: the worker (job, state, diloco, new_outer_sync())."""
    job = host.job
    r, s = slot
    S = job.parallel.stages
    old_owner = {l: t for t in range(S) for l in _layer_ids(job, t, list(plan.prev_layout))}
    new_owner = {l: t for t in range(S) for l in _layer_ids(job, t, list(plan.layout))}
    st = host.state
    named = dict(st.model.named_parameters())
    params = {n: p.detach() for n, p in named.items()}
    opt = {n: st.optimizer.state[p] for n, p in named.items() if st.optimizer.state.get(p)}
    outer = {}
    diloco = host.diloco
    if diloco is not None:
        for f in diloco.state_dict(as_if_abandoned=True)["fragments"]:
            for n, g in f["global"].items():
                outer[n] = (g, f["momentum"].get(n))
        old_counts = [f.syncs for f in diloco.fragments]
        old_syncs = diloco.num_syncs
        old_step = diloco.step
        needs_state = diloco.needs_state
    t0 = time.time()
    for l in sorted(old_owner):
        a, b = old_owner[l], new_owner[l]
        if a == b or s not in (a, b):
            continue
        if a == s:
            names = [n for n in named if n.startswith(f"layers.{l}.")]
            send_package(transport, {"params": {n: params[n] for n in names},
                                     "opt": {n: opt[n] for n in names if n in opt},
                                     "outer": {n: outer[n] for n in names if n in outer}},
                         grid.rank((r, b)), REBALANCE_TAG + 4 * l)
        else:
            pkg, n = recv_package_sized(transport, grid.rank((r, a)), REBALANCE_TAG + 4 * l)
            package_event(host.control, "relayout", slot, (r, a), n, st.step_done)
            params.update(pkg["params"])
            opt.update(pkg["opt"])
            outer.update(pkg["outer"])
    job.parallel.layers_per_stage = list(plan.layout)
    new = StageState(job, s, device=st.device)
    with torch.no_grad():
        for n, p in new.model.named_parameters():
            p.copy_(params[n])  # received layers are CPU tensors: copied onto the stage's device
            if n in opt:
                new.adopt_optimizer_state(p, opt[n])
    new.lr_scale, new.grad_norm, new.step_done = st.lr_scale, st.grad_norm, st.step_done
    new.last_total = st.last_total
    new.neighbour_copy = dict(st.neighbour_copy)
    host.state = new
    if diloco is not None:
        # A new fragment split over the new layers; fragment p keeps fragment p's sync count, so
        # every replica (same old counts, same new split) agrees on what is owed.
        host.new_outer_sync()
        d = host.diloco
        state = {"step": old_step, "num_syncs": old_syncs, "fragments": [
            {"names": list(f.names), "global": {n: outer[n][0] for n in f.names},
             "momentum": {n: outer[n][1] for n in f.names if outer[n][1] is not None},
             "syncs": old_counts[min(f.index, len(old_counts) - 1)]} for f in d.fragments]}
        d.load_state_dict(state, reset_local=False)
        d.needs_state = needs_state
    log.warning("slot %s rebalanced: layers %s -> %s (%.3fs)", slot, st.layer_ids, new.layer_ids, time.time() - t0)
