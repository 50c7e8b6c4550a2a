"""The worker's side of a rebuild: the exchanges a cell plan asks of this slot, peer snapshots served
to other replicas, and the periodic copies of the end stages' embedding / head that CheckFree+
restores from.

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
from typing import TYPE_CHECKING, Callable, List, Optional, Protocol

import torch

from kintsugi.parallel.device import load_cpu
from kintsugi.parallel.groups import Aborted, FormationError, form_group
from kintsugi.parallel.topology import Grid
from kintsugi.parallel.transport import PeerFailure, Transport
from kintsugi.recovery.checkpoint import restore
from kintsugi.recovery.plan import CellPlan, DonateRequest, Slot, slot_key
from kintsugi.recovery.rebuild import pack, recv_package_sized, send_package

if TYPE_CHECKING:
    from kintsugi.trainer.config.job import JobConfig
    from kintsugi.recovery.commit import Commit
    from kintsugi.trainer.runtime.stage import StageState

log = logging.getLogger("kintsugi.recovery")
REBUILD_TAG = 1 << 20
COPY_TAG = 1 << 22


class SlotHost(Protocol):
    """What the functions here need from a worker."""
    job: "JobConfig"
    state: Optional["StageState"]
    diloco: object
    slot: Optional[Slot]
    run_dir: str
    data: object
    commit: "Commit"
    control: object

    def connect_store(self) -> object: ...


class XferFailed(RuntimeError):
    """A peer snapshot never arrived (the donor died, or never served it in time)."""


# --- test dumps -------------------------------------------------------------------------------------------
def dumps_on() -> bool:
    return bool(os.environ.get("KINTSUGI_DUMP_DIR"))


def dump(name: str, make: Callable[[], dict]) -> None:
    """Test hook: with KINTSUGI_DUMP_DIR set, states around a rebuild are saved so tests can check the
    rebuild against the formula and the sources against themselves. Off, `make` is never called:
    nothing is copied (a peer donor must not pay a full copy of its stage for a test hook)."""
    directory = os.environ.get("KINTSUGI_DUMP_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        torch.save(make(), os.path.join(directory, name + ".pt"))


def snapshot(host: SlotHost, **extra) -> dict:
    """A copy of the slot's state (`StageState.state_dict`) plus the DiLoCo global parameters by
    name, for a test dump: CPU tensors, whatever the stage's device."""
    from kintsugi.recovery.checkpoint import copy_state
    snap = copy_state(host.state.state_dict())
    snap["diloco_global"] = (copy_state(host.diloco.global_params()) if host.diloco is not None else None)
    return dict(snap, **extra)


def load_dump(path: str) -> dict:
    """A test dump read back, every tensor on the CPU whatever device wrote it (tensors, dicts,
    lists and plain values: never the full unpickler, even for a file in a run directory)."""
    return load_cpu(path, weights_only=True)


def package_event(control, what: str, slot: Slot, src, nbytes: int, step: int) -> None:
    """A `package` event row in metrics.jsonl for every package this slot received (its size as it
    arrived), so the rebuild channel's byte counter can be held to the packages that crossed it."""
    control.append_later("event", {"kind": "package", "what": what, "slot": list(slot),
                                   "src": list(src) if isinstance(src, tuple) else src, "bytes": int(nbytes),
                                   "step": int(step)})


def _receive(host: SlotHost, transport: Transport, what: str, src, rank: int, tag: int, step: int):
    pkg, n = recv_package_sized(transport, rank, tag)
    package_event(host.control, what, host.slot, src, n, step)
    return pkg


# --- the plan ----------------------------------------------------------------------------------------------
def execute_plan(host: SlotHost, plan: CellPlan, grid: Grid, transport: Transport, slot: Slot,
                 committed: int, abort) -> None:
    """This slot's part of the plan: restore a rollback's checkpoint, receive a rebuilt state, or
    send this stage's state to a slot being rebuilt from it."""
    gen = plan.gen
    if plan.rollback is not None:
        host.commit.forget_after(slot[0], plan.rollback.step_for(slot[0]))
    if plan.rollback is not None and slot not in plan.rebuild:
        # A resume may continue each replica from its own step (a suspended job's replicas commit
        # independently); an in-run rollback restores one step everywhere.
        step = plan.rollback.step_for(slot[0])
        restore(host.state, host.run_dir, slot, step)
        host.data.position = step + 1
    for target, rb in sorted(plan.rebuild.items()):
        key = slot_key(target)
        if rb.tier == "checkpoint":
            if target == slot:
                restore(host.state, host.run_dir, slot, committed)
            continue
        if rb.tier == "handoff":
            if target == slot:
                host.state.load_state_dict(_receive(host, transport, "handoff", rb.leaver, plan.ranks[rb.leaver],
                                                    REBUILD_TAG, committed), "handoff")
                _ack_handoff(host, plan, slot)
                dump(f"g{gen}_target_{key}", lambda: snapshot(host, tier=rb.tier))
            continue
        if rb.tier == "peer":
            if target == slot:
                t0 = time.time()
                pkg = receive_snapshot(host, rb.xfer, abort, committed)
                host.state.load_state_dict(pkg, "peer")
                host.state.step_done = committed  # the donor's own step belongs to its replica
                dump(f"g{gen}_target_{key}", lambda: snapshot(host, tier=rb.tier, packages=[pkg]))
                log.warning("slot %s rebuilt via peer from %s (%.3fs)", slot, list(rb.sources), time.time() - t0)
            continue
        sources: List[Slot] = list(rb.sources)
        if target == slot:
            t0 = time.time()
            packages = [_receive(host, transport, rb.tier, src, grid.rank(src), REBUILD_TAG + 4 * i, committed)
                        for i, src in enumerate(sources)]
            host.state.rebuild_from(rb.tier, packages, host.job.recovery.lr_bump, committed + 1)
            if host.diloco is not None:
                host.diloco.needs_state = True  # an approximate stage adopts its group's outer state
            dump(f"g{gen}_target_{key}", lambda: snapshot(host, tier=rb.tier, packages=packages))
            log.warning("slot %s rebuilt via %s from %s (%.3fs)", slot, rb.tier, sources, time.time() - t0)
        elif slot in sources:
            i = sources.index(slot)
            t0 = time.time()
            dump(f"g{gen}_source{i}_{key}_before", lambda: snapshot(host))
            send_package(transport, host.state.source_package(), grid.rank(target), REBUILD_TAG + 4 * i)
            dump(f"g{gen}_source{i}_{key}_after", lambda: snapshot(host))
            log.info("sent %s state to %s in %.3fs", rb.tier, target, time.time() - t0)


HANDOFF_ACK_WAIT_S = 10.0


def _handoff_key(plan: CellPlan, slot: Slot) -> str:
    return f"handoff/{plan.cell}/{plan.gen}/{slot_key(slot)}"


def _ack_handoff(host: SlotHost, plan: CellPlan, slot: Slot) -> None:
    """The new holder has the state: its leaver may exit (the machine is going away)."""
    try:
        host.control.put_json(_handoff_key(plan, slot), {"wid": host.wid})
    except Exception as e:  # noqa: BLE001 - the coordinator away: the leaver waits out its bound instead
        log.info("could not acknowledge the handoff of slot %s: %s", slot, e)


def hand_off(host: SlotHost, plan: CellPlan, transport: Transport, abort=None) -> None:
    """Graceful leave: stream this slot's exact state to the worker that takes it over, then wait
    until it says it holds the state (HANDOFF_ACK_WAIT_S at most). The caller then exits at once:
    a leaver's machine is billed until its process is gone, and closing a socket whose peer has
    not read everything yet could cut the transfer short."""
    dst = plan.slots[host.slot]
    dump(f"g{plan.gen}_leaver_{slot_key(host.slot)}", lambda: snapshot(host))
    send_package(transport, host.state.state_dict(), plan.ranks[dst], REBUILD_TAG)
    key, deadline = _handoff_key(plan, host.slot), time.monotonic() + HANDOFF_ACK_WAIT_S
    while time.monotonic() < deadline and not (abort is not None and abort.is_set()):
        try:
            if host.control.get_json_or(key) is not None:
                break
        except Exception:  # noqa: BLE001 - the coordinator away: keep waiting out the bound
            pass
        time.sleep(0.01)
    log.info("handed slot %s over to %s", host.slot, dst)


# --- peer snapshots across replicas ---------------------------------------------------------------------
def receive_snapshot(host: SlotHost, xfer: str, abort, step: int) -> dict:
    """The target of a peer rebuild: rank 1 of the two-rank group `xfer`, waiting for the donor."""
    timeout = host.job.recovery.init_timeout_s
    try:
        group = form_group(host.connect_store, xfer, 1, 2, timeout, abort=abort, name=xfer)
    except FormationError as e:
        raise XferFailed(f"the peer donor never came ({e})") from e
    try:
        return _receive(host, Transport(group, abort), "peer", xfer, 0, REBUILD_TAG, step)
    except PeerFailure as e:
        raise XferFailed(f"the peer donor failed while sending ({e})") from e
    finally:
        group.close()


class Donor:
    """Serves peer snapshots of this worker's stage to other replicas' rebuilt slots. The training
    thread calls `serve()` at safe points (between steps and while it waits): the state is
    serialised there (one copy, the package's bytes), the transfer runs on a thread of its own."""

    def __init__(self, host: SlotHost, stop: threading.Event):
        self.host, self.stop = host, stop
        self.requests: List[DonateRequest] = []
        self.lock = threading.Lock()
        self.served = 0

    def request(self, req: DonateRequest) -> None:
        with self.lock:
            self.requests.append(req)

    def serve(self) -> None:
        if not self.requests:
            return
        with self.lock:
            todo, self.requests = self.requests, []
        host = self.host
        for req in todo:
            if host.state is None or host.slot is None or tuple(host.slot) != req.source:
                log.warning("asked for a peer snapshot of %s but holding %s; not served", req.source, host.slot)
                continue
            if req.gen is not None:
                dump(f"g{req.gen}_source0_{slot_key(req.slot)}_before", lambda: snapshot(host))
            # In-flight outer syncs have not touched the global copies; the receiver redoes them.
            payload = pack(host.state.state_dict())
            threading.Thread(target=self._send, args=(req.xfer, payload), daemon=True, name="kintsugi-donor").start()
            self.served += 1
            log.info("serving a peer snapshot of slot %s to %s", host.slot, req.target)

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
def refresh_neighbour_copies(state: "StageState", grid: Grid, transport: Transport, slot: Slot, num_stages: int,
                             report: Callable[[Slot, int], None] = lambda src, n: None) -> None:
    """The first stage sends its embedding to stage 1 and the last stage its norm + head to stage
    S-2, so a lost end stage gets them back exactly as of this copy. Lower stage sends first, so the
    S=2 exchange cannot deadlock."""
    r, s = slot
    S = num_stages
    if s == 0:
        send_package(transport, state.end_params(), grid.rank((r, 1)), COPY_TAG)
    if s == 1:
        pkg, n = recv_package_sized(transport, grid.rank((r, 0)), COPY_TAG)
        state.neighbour_copy.update(pkg)
        report((r, 0), n)
    if s == S - 2:
        pkg, n = recv_package_sized(transport, grid.rank((r, S - 1)), COPY_TAG + 2)
        state.neighbour_copy.update(pkg)
        report((r, S - 1), n)
    if s == S - 1:
        send_package(transport, state.end_params(), grid.rank((r, S - 2)), COPY_TAG + 2)
