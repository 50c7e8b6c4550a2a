"""The worker's side of a cell generation: agreeing which step committed, the rebuild exchanges of
the plan, peer snapshots served to other replicas, and the periodic copies of the end stages'
embedding / head that CheckFree+ restores from.

Everything here takes a `SlotHost` (the worker, seen through the few attributes it needs), never
the worker module itself.

Deadlock freedom: targets of a rebuild never serve as sources in the same generation (the planner
refuses adjacent losses), so every exchange is a one-way source -> target transfer. A peer source
sits in another replica's cell: it sends a snapshot, taken between two of its own steps, over a
two-rank group of its own (`xfer/...`) from a background thread, so the donor replica never stops.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Optional, Protocol

import torch

from kintsugi.parallel.groups import Aborted, FormationError, Group, form_group
from kintsugi.parallel.topology import Grid
from kintsugi.parallel.transport import PeerFailure, Transport
from kintsugi.recovery.rebuild import pack, recv_package, send_package

if TYPE_CHECKING:
    from kintsugi.trainer.config.job import JobConfig
    from kintsugi.trainer.runtime.stage import StageState

log = logging.getLogger("kintsugi.recovery")
REBUILD_TAG = 1 << 20
COPY_TAG = 1 << 22


class SlotHost(Protocol):
    """What the functions here need from a worker."""
    job: "JobConfig"
    state: Optional["StageState"]
    diloco: object
    slot: Optional[tuple]
    run_dir: str
    data: object
    pending: Optional[tuple]

    def connect_store(self) -> object: ...
    def alternate(self) -> bool: ...


class XferFailed(RuntimeError):
    """A peer snapshot never arrived (the donor died, or never served it in time)."""


def _slot(key: str):
    r, s = key.split(",")
    return int(r), int(s)


def dump(name: str, obj) -> None:
    """Test hook: with KINTSUGI_DUMP_DIR set, states around a rebuild are saved so tests can check the
    rebuild against the formula and the sources against themselves. Off (and free) otherwise."""
    directory = os.environ.get("KINTSUGI_DUMP_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        torch.save(obj, os.path.join(directory, name + ".pt"))


def snapshot(host: SlotHost) -> dict:
    """A checkpoint's snapshot of the stage, plus the DiLoCo global parameters by name."""
    from kintsugi.recovery.checkpoint import snapshot as stage_snapshot
    snap = stage_snapshot(host.state, host.state.step_done)
    snap["diloco_global"] = ({k: v.clone() for k, v in host.diloco.global_params().items()}
                             if host.diloco is not None else None)
    return snap


# --- which step committed -----------------------------------------------------------------------------
def reconcile(host: SlotHost, group: Group, abort, has_state: bool, store_commit: Optional[dict],
              floor: int) -> int:
    """The cell agrees on its last committed step K and finishes it where it was cut short.

    A step commits when the chain's root holds the summed commit vector; the root records it in the
    store (when the coordinator is there) and broadcasts it. A failure or a coordinator restart can
    leave some stages having applied K and others holding K's gradients only. Every rank of the new
    group contributes [has state, last applied step, its commit total, pending step]; K is the
    highest applied step among ranks with state, or the store's record when it is higher (the root
    recorded K and died before any broadcast arrived). Ranks one step behind apply their pending
    K with the total a peer (or the store) holds. Returns K (the cell resumes at K + 1)."""
    st = host.state
    pending = host.pending if has_state else None
    has_total = has_state and st.last_total is not None
    skipped = has_state and st.last_skipped
    row = torch.tensor([float(has_state), float(st.step_done if has_state else -1),
                        float(st.last_total if has_total else 0.0), float(has_total),
                        float(pending[0] if pending is not None else -1), float(skipped)], dtype=torch.float64)
    rows = torch.empty(group.size() * row.numel(), dtype=torch.float64)
    from kintsugi.parallel.transport import wait_abortable
    wait_abortable(group.all_gather_into_tensor(rows, row), abort)
    rows = rows.view(group.size(), row.numel())
    live = rows[rows[:, 0] == 1.0]
    k_live = int(live[:, 1].max()) if len(live) else floor
    k, total = k_live, None  # with no stage left that holds state, the coordinator's record
    with_total = live[(live[:, 1] == k_live) & (live[:, 3] == 1.0)] if len(live) else live
    if len(with_total):
        total = float(with_total[0, 2])
    skip = bool(len(live)) and bool((live[live[:, 1] == k_live][:, 5] == 1.0).any())
    if store_commit is not None and int(store_commit["step"]) > k and (
            store_commit.get("total") is not None or store_commit.get("skipped")):
        k = int(store_commit["step"])
        skip = bool(store_commit.get("skipped"))
        total = None if skip else float(store_commit["total"][0])
    if has_state:
        if st.step_done < k:
            if st.step_done == k - 1 and pending is not None and pending[0] == k and skip:
                st.skip_step(k)
                log.info("step %d was skipped by the cell (non-finite): skipped here too", k)
            elif st.step_done == k - 1 and pending is not None and pending[0] == k and total is not None:
                st.apply_step(k, total, pending[1])
                st.last_total = total
                log.info("finished step %d from the cell's commit record", k)
            else:
                raise RuntimeError(f"slot {host.slot} applied step {st.step_done} but its cell committed {k}; "
                                   "the stages disagree by more than one step")
        elif st.step_done > k:
            raise RuntimeError(f"slot {host.slot} applied step {st.step_done}, beyond the cell's {k}")
    host.pending = None
    st.zero_grad()
    return k


# --- the plan -----------------------------------------------------------------------------------------
def execute_plan(host: SlotHost, plan: dict, grid: Grid, transport: Transport, slot, my_rebuild,
                 committed: int, abort) -> None:
    gen = plan["gen"]
    rollback = plan.get("rollback")
    rebuilt_here = {_slot(k) for k in plan["rebuild"]}
    if rollback is not None and slot not in rebuilt_here:
        from kintsugi.recovery.checkpoint import restore
        # A resume may continue each replica from its own step (a suspended job's replicas commit
        # independently); an in-run rollback restores one step everywhere.
        step = rollback[str(slot[0])] if isinstance(rollback, dict) else rollback
        restore(host.state, host.run_dir, slot, step, host.diloco)
        host.data.position = step + 1
    for key, rb in sorted(plan["rebuild"].items()):
        target = _slot(key)
        tier = rb["tier"]
        if tier == "checkpoint":
            if target == slot:
                from kintsugi.recovery.checkpoint import restore
                restore(host.state, host.run_dir, slot, committed, host.diloco)
            continue
        sources = [tuple(s) for s in rb["sources"]]
        if tier == "handoff":
            if target == slot:
                pkg = recv_package(transport, plan["ranks"][rb["leaver"]], REBUILD_TAG)
                host.state.import_exact(pkg)
                dump(f"g{gen}_target_{key}", dict(snapshot(host), tier=tier))
            continue
        if tier == "peer":
            if target == slot:
                t0 = time.time()
                pkg = receive_snapshot(host, rb["xfer"], abort)
                host.state.import_exact(pkg)
                host.state.step_done = committed  # the donor's own step belongs to its replica
                dump(f"g{gen}_target_{key}", dict(snapshot(host), tier=tier, packages=[pkg]))
                log.warning("slot %s rebuilt via peer from %s (%.3fs)", slot, sources, time.time() - t0)
            continue
        if target == slot:
            t0 = time.time()
            packages = [recv_package(transport, grid.rank(src), REBUILD_TAG + 4 * i) for i, src in enumerate(sources)]
            host.state.rebuild_from(tier, packages, host.job.recovery.lr_bump, committed + 1)
            if host.diloco is not None:
                host.diloco.needs_state = True  # an approximate stage adopts its group's outer state
            dump(f"g{gen}_target_{key}", dict(snapshot(host), tier=tier, packages=packages))
            log.warning("slot %s rebuilt via %s from %s (%.3fs)", slot, tier, sources, time.time() - t0)
        elif slot in sources:
            i = sources.index(slot)
            t0 = time.time()
            dump(f"g{gen}_source{i}_{key}_before", snapshot(host))
            send_package(transport, host.state.export(exact=False), grid.rank(target), REBUILD_TAG + 4 * i)
            dump(f"g{gen}_source{i}_{key}_after", snapshot(host))
            log.info("sent %s state to %s in %.3fs", tier, target, time.time() - t0)


# --- peer snapshots across replicas -------------------------------------------------------------------
def receive_snapshot(host: SlotHost, xfer: str, abort) -> dict:
    """The target of a peer rebuild: rank 1 of the two-rank group `xfer`, waiting for the donor."""
    timeout = host.job.recovery.init_timeout_s
    try:
        group = form_group(host.connect_store, xfer, 1, 2, timeout, abort=abort, name=xfer)
    except FormationError as e:
        raise XferFailed(f"the peer donor never came ({e})") from e
    try:
        t = Transport(group, abort)
        return recv_package(t, 0, REBUILD_TAG)
    except PeerFailure as e:
        raise XferFailed(f"the peer donor failed while sending ({e})") from e
    finally:
        group.close()


class Donor:
    """Serves peer snapshots of this worker's stage to other replicas' rebuilt slots. The training
    thread calls `serve()` at safe points (between steps and while it waits); the snapshot is
    serialised there (a copy), the transfer runs on a thread of its own."""

    def __init__(self, host: SlotHost, stop: threading.Event):
        self.host, self.stop = host, stop
        self.requests: list = []
        self.lock = threading.Lock()
        self.served = 0

    def request(self, req: dict) -> None:
        with self.lock:
            self.requests.append(req)

    def serve(self) -> None:
        if not self.requests:
            return
        with self.lock:
            todo, self.requests = self.requests, []
        host = self.host
        for req in todo:
            if host.state is None or host.slot is None or list(host.slot) != list(req["source"]):
                log.warning("asked for a peer snapshot of %s but holding %s; not served", req["source"], host.slot)
                continue
            if "gen" in req:
                dump(f"g{req['gen']}_source0_{req['slot'][0]},{req['slot'][1]}_before", snapshot(host))
            payload = pack(host.state.export(exact=True, in_flight_ok=True))
            threading.Thread(target=self._send, args=(req["xfer"], payload), daemon=True,
                             name="kintsugi-donor").start()
            self.served += 1
            log.info("serving a peer snapshot of slot %s to %s", host.slot, req["target"])

    def _send(self, xfer: str, payload: torch.Tensor) -> None:
        try:
            group = form_group(self.host.connect_store, xfer, 0, 2, self.host.job.recovery.init_timeout_s,
                               abort=self.stop, name=xfer)
        except (FormationError, Aborted) as e:
            log.warning("peer snapshot %s not delivered: %s", xfer, str(e).splitlines()[0][:160])
            return
        try:
            t = Transport(group, self.stop)
            t.send(torch.tensor([payload.numel()], dtype=torch.int64), 1, REBUILD_TAG, channel="rebuild")
            t.send(payload, 1, REBUILD_TAG + 1, channel="rebuild")
            t.flush()
        except (PeerFailure, Aborted) as e:
            log.warning("peer snapshot %s not delivered: %s", xfer, str(e).splitlines()[0][:160])
        finally:
            group.close()


# --- CheckFree+'s copies of the end stages ------------------------------------------------------------
def refresh_neighbour_copies(host: SlotHost, grid: Grid, transport: Transport, slot, step: int) -> None:
    """Every `recovery.embedding_copy_every` steps the first stage sends its embedding to stage 1 and
    the last stage its norm + head to stage S-2, so a lost end stage gets them back exactly as of
    the last copy. Lower stage sends first, so the S=2 exchange cannot deadlock."""
    job = host.job
    S = job.parallel.stages
    if S < 2 or not host.alternate() or step % job.recovery.embedding_copy_every != 0:
        return
    r, s = slot
    st = host.state
    if s == 0:
        send_package(transport, st.end_params(), grid.rank((r, 1)), COPY_TAG)
    if s == 1:
        st.neighbour_copy.update(recv_package(transport, grid.rank((r, 0)), COPY_TAG))
    if s == S - 2:
        st.neighbour_copy.update(recv_package(transport, grid.rank((r, S - 1)), COPY_TAG + 2))
    if s == S - 1:
        send_package(transport, st.end_params(), grid.rank((r, S - 2)), COPY_TAG + 2)
