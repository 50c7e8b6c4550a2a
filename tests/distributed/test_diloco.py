"""Streaming DiLoCo across 2 spawned gloo replicas (one stage each).

Spawned once (process start-up dominates the cost): every rank runs all scenarios and saves what it
saw; the tests below check it. Inner steps are simulated by replica-specific random updates, so the
replicas' parameters really differ between syncs.
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kintsugi.parallel.diloco import StreamingDiLoCo
from kintsugi.parallel.transport import Aborted, ByteCounter
from kintsugi.trainer.config.job import DilocoConfig

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

NAMES = ["tok_embeddings.weight"] + [f"layers.{l}.w{k}" for l in range(4) for k in range(2)] + ["output.weight"]
PEER_DELAY_S = 1.0


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(37, 29, generator=g) * 0.1) for n in NAMES}


def _inner_step(params, rank: int, t: int) -> None:
    g = torch.Generator().manual_seed(1000 * rank + t)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)


def _snap(d):
    return {n: v.clone() for n, v in d.items()}


def _cfg(**kw):
    base = dict(enabled=True, sync_every=4, fragments=2, overlap=1, alpha=0.5, quant="none",
                outer_lr=0.7, outer_momentum=0.9)
    base.update(kw)
    return DilocoConfig(**base)


def _mean_scenario(rank, group):
    """H = 1, outer lr 1, momentum 0, alpha 0, fp32: global = mean of the replicas' params."""
    params = _params()
    d = StreamingDiLoCo(params, _cfg(sync_every=1, overlap=0, alpha=0.0, outer_lr=1.0, outer_momentum=0.0),
                        group, ByteCounter())
    out = []
    for t in range(1, 6):
        _inner_step(params, rank, t)
        before = _snap({n: p.detach() for n, p in params.items()})
        d.after_inner_step(t)
        out.append({"before": before, "global": _snap(d.global_params()),
                    "after": _snap({n: p.detach() for n, p in params.items()})})
    return out


def _identical_scenario(rank, group, quant):
    """Every sync leaves bitwise-identical global copies on every replica."""
    params = _params()
    d = StreamingDiLoCo(params, _cfg(quant=quant), group, ByteCounter())
    snaps = []
    for t in range(1, 15):
        _inner_step(params, rank, t)
        n = d.num_syncs
        d.after_inner_step(t)
        if d.num_syncs != n:
            snaps.append((t, _snap(d.global_params())))
    return {"snaps": snaps, "bytes": d.counter.as_dict()["outer_sync"], "peak": d.peak_sync_bytes,
            "num_fragments": d.num_fragments, "events": [e[:3] for e in d.events]}


def _overlap_scenario(rank, group):
    """tau = 2: the sync started after step 4 is awaited after step 6; replica 1 joins it late, so
    replica 0 must run steps 5 and 6 while the all-reduce is still incomplete."""
    params = _params()
    d = StreamingDiLoCo(params, _cfg(sync_every=4, fragments=1, overlap=2), group, ByteCounter())
    times = {}
    for t in range(1, 9):
        _inner_step(params, rank, t)
        if rank == 1 and t == 4:
            time.sleep(PEER_DELAY_S)
        times[f"enter{t}"] = time.time()
        d.after_inner_step(t)
        times[f"return{t}"] = time.time()
    return {"times": times, "events": [e[:3] for e in d.events]}


def _abort_scenario(rank, group):
    """A wait on a sync whose peer is late raises Aborted when `abort` fires; abandon() leaves the
    global copy untouched."""
    params = _params()
    abort = threading.Event()
    d = StreamingDiLoCo(params, _cfg(sync_every=2, fragments=1, overlap=0), group, ByteCounter(), abort)
    before = _snap(d.global_params())
    _inner_step(params, rank, 1)
    d.after_inner_step(1)
    _inner_step(params, rank, 2)
    raised = False
    if rank == 0:
        threading.Timer(0.3, abort.set).start()
        try:
            d.after_inner_step(2)
        except Aborted:
            raised = True
        d.abandon()
    else:
        time.sleep(PEER_DELAY_S)  # joins late, so the abandoned collective still completes
        d.after_inner_step(2)
    unchanged = all(torch.equal(before[n], g) for n, g in d.global_params().items())
    return {"raised": raised, "unchanged": unchanged, "inflight": len(d._inflight)}


def _state_scenario(rank, group):
    """Peer tier: replica 1 is replaced by a fresh worker that loads replica 0's state."""
    params = _params()
    d = StreamingDiLoCo(params, _cfg(quant="fp4", sync_every=3), group, ByteCounter())
    for t in range(1, 10):
        _inner_step(params, rank, t)
        d.after_inner_step(t)
    d.finish_all()
    box = [d.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if rank == 1:  # a replacement: different initial weights, then the peer's state
        params = _params(seed=99)
        d = StreamingDiLoCo(params, _cfg(quant="fp4", sync_every=3), group, ByteCounter())
        d.load_state_dict(box[0])
    out = {"loaded_global": _snap(d.global_params()), "local": _snap({n: p.detach() for n, p in params.items()}),
           "state": d.state_dict(), "later": []}
    for t in range(10, 19):  # training goes on; syncs keep the replicas bitwise equal
        _inner_step(params, rank, t)
        n = d.num_syncs
        d.after_inner_step(t)
        if d.num_syncs != n:
            out["later"].append(_snap(d.global_params()))
    d.finish_all()
    # resync: replica 1 corrupts its global copy; a broadcast from replica 0 restores agreement.
    if rank == 1:
        with torch.no_grad():
            d.fragments[0].glob[0].add_(1.0)
    d.resync(0)
    out["resynced"] = _snap(d.global_params())
    return out


def _proc(rank, world, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))  # the stage group: used for DiLoCo syncs only
    res = {"mean": _mean_scenario(rank, group),
           "identical": {q: _identical_scenario(rank, group, q) for q in ("none", "fp4", "int8")},
           "overlap": _overlap_scenario(rank, group),
           "abort": _abort_scenario(rank, group)}
    # The abandoned sync ran on `group`; later scenarios take a fresh group, as a new generation would.
    res["state"] = _state_scenario(rank, dist.new_group(list(range(world))))
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diloco")
    t0 = time.time()
    mp.start_processes(_proc, args=(2, str(tmp / "store"), str(tmp)), nprocs=2, start_method="spawn", join=True)
    res = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    res[0]["wall_s"] = time.time() - t0
    return res


def test_h1_global_is_mean_of_replicas(results):
    for step0, step1 in zip(results[0]["mean"], results[1]["mean"]):
        for n in NAMES:
            mean = (step0["before"][n] + step1["before"][n]) / 2
            torch.testing.assert_close(step0["global"][n], mean, rtol=0, atol=1e-6)
            assert torch.equal(step0["global"][n], step1["global"][n])
            assert torch.equal(step0["after"][n], step0["global"][n])  # alpha = 0: local = global
        assert not torch.equal(step0["before"]["layers.0.w0"], step1["before"]["layers.0.w0"])


@pytest.mark.parametrize("quant", ["none", "fp4", "int8"])
def test_replicas_hold_bitwise_identical_globals(results, quant):
    a, b = results[0]["identical"][quant], results[1]["identical"][quant]
    assert a["num_fragments"] == 2
    # H = 4, P = 2, tau = 1: fragment 0 starts at 4, 8, 12 and fragment 1 at 6, 10, 14; each is applied 1 later.
    assert [e for e in a["events"] if e[0] == "start"] == [("start", p, t) for t, p in
                                                          [(4, 0), (6, 1), (8, 0), (10, 1), (12, 0), (14, 1)]]
    assert [e for e in a["events"] if e[0] == "finish"] == [("finish", p, t) for t, p in
                                                           [(5, 0), (7, 1), (9, 0), (11, 1), (13, 0)]]
    assert len(a["snaps"]) == len(b["snaps"]) == 5
    first = a["snaps"][0][1]
    for (ta, ga), (tb, gb) in zip(a["snaps"], b["snaps"]):
        assert ta == tb
        for n in NAMES:
            assert torch.equal(ga[n], gb[n]), (quant, ta, n)
    assert not torch.equal(first["layers.0.w0"], a["snaps"][-1][1]["layers.0.w0"])
    # Six syncs, three per fragment; fragment 0 holds 6 of the 10 tensors (the ends + layers 0, 2).
    assert abs(a["peak"] * 5 - a["bytes"]) <= 0.02 * a["bytes"]
    if quant == "fp4":
        fp32 = results[0]["identical"]["none"]["bytes"]
        assert a["bytes"] * 7 < fp32, "fp4 sends about 4.1 bits per value against 32"


def test_sync_overlaps_inner_steps(results):
    t0, t1 = results[0]["overlap"]["times"], results[1]["overlap"]["times"]
    ev = results[0]["overlap"]["events"]
    assert ("start", 0, 4) in ev and ("finish", 0, 6) in ev and ("start", 0, 8) in ev
    peer_joined = t1["enter4"]  # replica 1 starts its side of the all-reduce only now
    # Replica 0's start returned, and its steps 5 and 6 ran, before the collective could complete.
    assert t0["return4"] < peer_joined
    assert t0["enter6"] < peer_joined
    assert t0["return4"] - t0["enter4"] < PEER_DELAY_S / 4, "starting a sync must not block the step"
    # The wait happens tau = 2 steps later, and only then does replica 0 block on the late peer.
    assert t0["return6"] >= peer_joined


def test_abort_interrupts_a_sync_wait(results):
    r0 = results[0]["abort"]
    assert r0["raised"] and r0["unchanged"] and r0["inflight"] == 0


def test_state_dict_round_trip_gives_bitwise_equal_replica(results):
    a, b = results[0]["state"], results[1]["state"]
    for n in NAMES:
        assert torch.equal(a["loaded_global"][n], b["loaded_global"][n])
        assert torch.equal(b["local"][n], b["loaded_global"][n])  # the rebuilt replica starts from global
    for fa, fb in zip(a["state"]["fragments"], b["state"]["fragments"]):
        assert fa["momentum"] and fa["momentum"].keys() == fb["momentum"].keys()
        for n in fa["momentum"]:
            assert torch.equal(fa["momentum"][n], fb["momentum"][n])
    assert a["state"]["step"] == b["state"]["step"] == 9
    assert len(a["later"]) == len(b["later"]) >= 2
    for ga, gb in zip(a["later"], b["later"]):
        for n in NAMES:
            assert torch.equal(ga[n], gb[n])
    for n in NAMES:
        assert torch.equal(a["resynced"][n], b["resynced"][n])


def test_runtime_is_bounded(results):
    assert results[0]["wall_s"] < 60
