"""The worker's side of a generation's rebuild plan: who sends which state to whom, and the
periodic copies of the end stages' embedding / head that CheckFree+ restores from.

Deadlock freedom: targets of a rebuild never serve as sources in the same generation (the planner
refuses adjacent losses), so every exchange is a one-way source -> target transfer.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from parallel.topology import Grid
from parallel.transport import Transport
from recovery.rebuild import recv_package, send_package

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("kintsugi.recovery")
REBUILD_TAG = 1 << 20
COPY_TAG = 1 << 22
EXACT_TIERS = ("handoff",)


def _slot(key: str):
    r, s = key.split(",")
    return int(r), int(s)


def dump(name: str, obj) -> None:
    """Test hook: with KINTSUGI_DUMP_DIR set, states around a rebuild are saved so tests can check the
    rebuild against the formula and the sources against themselves. Off (and free) otherwise."""
    directory = os.environ.get("KINTSUGI_DUMP_DIR")
    if directory:
        import torch
        os.makedirs(directory, exist_ok=True)
        torch.save(obj, os.path.join(directory, name + ".pt"))


def snapshot(worker: "Worker") -> dict:
    """A checkpoint's snapshot of the stage, plus the DiLoCo global parameters by name."""
    from .checkpoint import snapshot as stage_snapshot
    snap = stage_snapshot(worker.state, worker.state.step_done)
    snap["diloco_global"] = ({k: v.clone() for k, v in worker.diloco.global_params().items()}
                             if worker.diloco is not None else None)
    return snap


def execute_plan(worker: "Worker", plan: dict, grid: Grid, transport: Transport, slot, my_rebuild) -> None:
    gen = plan["gen"]
    if plan.get("rollback") is not None:
        from .checkpoint import restore
        rollback = plan["rollback"]
        # A resume may continue each replica from its own step (a suspended job's replicas commit
        # independently); an in-run rollback restores one step everywhere.
        step = rollback[str(slot[0])] if isinstance(rollback, dict) else rollback
        restore(worker.state, worker.run_dir, slot, step, worker.diloco)
        worker.data.position = step + 1
        return
    for key, rb in sorted(plan["rebuild"].items()):
        target = _slot(key)
        tier = rb["tier"]
        sources = [tuple(s) for s in rb["sources"]]
        tgt_rank = grid.rank(target)
        if tier == "handoff":
            if target == slot:
                pkg = recv_package(transport, plan["ranks"][rb["leaver"]], REBUILD_TAG)
                worker.state.import_exact(pkg)
                dump(f"g{gen}_target_{key}", dict(snapshot(worker), tier=tier))
            continue
        if target == slot:
            t0 = time.time()
            packages = [recv_package(transport, grid.rank(src), REBUILD_TAG + 4 * i) for i, src in enumerate(sources)]
            if tier == "peer":
                worker.state.import_exact(packages[0])
            else:
                step = rb["step"]
                worker.state.rebuild_from(tier, packages, worker.job.recovery.lr_bump, step)
            dump(f"g{gen}_target_{key}", dict(snapshot(worker), tier=tier, packages=packages))
            log.warning("slot %s rebuilt via %s from %s (%.3fs)", slot, tier, sources, time.time() - t0)
        elif slot in sources:
            i = sources.index(slot)
            t0 = time.time()
            dump(f"g{gen}_source{i}_{key}_before", snapshot(worker))
            send_package(transport, worker.state.export(exact=(tier == "peer")), tgt_rank, REBUILD_TAG + 4 * i)
            dump(f"g{gen}_source{i}_{key}_after", snapshot(worker))
            log.info("sent %s state to %s in %.3fs", tier, target, time.time() - t0)


def refresh_neighbour_copies(worker: "Worker", grid: Grid, transport: Transport, slot, step: int) -> None:
    """Every `recovery.embedding_copy_every` steps the first stage sends its embedding to stage 1 and
    the last stage its norm + head to stage S-2, so a lost end stage gets them back exactly as of
    the last copy. Lower stage sends first, so the S=2 exchange cannot deadlock."""
    job = worker.job
    S = job.parallel.stages
    if S < 2 or not worker._alternate() or step % job.recovery.embedding_copy_every != 0:
        return
    r, s = slot
    st = worker.state
    if s == 0:
        send_package(transport, st.end_params(), grid.rank((r, 1)), COPY_TAG)
    if s == 1 or (S == 2 and s == 1):
        st.neighbour_copy.update(recv_package(transport, grid.rank((r, 0)), COPY_TAG))
    if s == S - 2:
        st.neighbour_copy.update(recv_package(transport, grid.rank((r, S - 1)), COPY_TAG + 2))
    if s == S - 1:
        send_package(transport, st.end_params(), grid.rank((r, S - 2)), COPY_TAG + 2)
