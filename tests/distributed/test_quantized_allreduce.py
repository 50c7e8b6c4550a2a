"""Quantized all-reduce across 2 and 4 spawned gloo processes, checked against the fp32 all-reduce.

Four processes are spawned once (start-up dominates the cost). They run every scenario on the
4-rank world group, then on two 2-rank subgroups ({0, 1} and {2, 3}, concurrently), and write their
measurements to JSON files that the tests below read.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

# (codec, block size) -> bound on the relative L2 error of the all-reduced mean (Gaussian, t3).
# About 1.3x the measured values; REFERENCE.md (8 ranks, two-shot): bf16 2.3e-3, fp8 3.6e-2,
# int8-256 9.8e-3 / 2.3e-2, int4-32 0.14.
BOUNDS = {
    ("none", 256): (1e-6, 1e-6),
    ("bf16", 256): (4e-3, 4e-3),
    ("fp16", 256): (6e-4, 6e-4),
    ("int8", 256): (1.4e-2, 3.5e-2),
    ("fp8_e4m3", 128): (4.5e-2, 4.5e-2),
    ("int4", 32): (0.18, 0.25),
    ("fp4_e3m0", 32): (0.32, 0.32),
}
SHAPES = [(96, 257), (1000,), (17,), (64, 64), (3, 5, 7)]  # 1-D and odd-sized on purpose


def _data(kind: str, rank: int, step: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + 7 * step + (kind == "t"))
    if kind == "gauss":
        return [torch.randn(s, generator=gen) for s in SHAPES]
    t3 = torch.distributions.StudentT(3.0)
    torch.manual_seed(1000 * rank + step)
    return [t3.sample(s) for s in SHAPES]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _exact(ts, group, op="avg"):
    out = [t.clone() for t in ts]
    for t in out:
        dist.all_reduce(t, group=group)
        if op == "avg":
            t /= dist.get_world_size(group)
    return out


def _scenarios(rank: int, group) -> dict:
    import functools

    from kintsugi.compression.api import ErrorFeedback, get_codec
    from kintsugi.compression.api import all_reduce as _all_reduce

    all_reduce = functools.partial(_all_reduce, group=group)
    _exact_g = functools.partial(_exact, group=group)
    res: dict = {}
    for kind in ("gauss", "t"):
        data = _data(kind, rank)
        exact = _flat(_exact_g(data))
        for (name, bs) in BOUNDS:
            for alg in ("two_shot", "gather"):
                ts = [t.clone() for t in data]
                h = all_reduce(ts, get_codec(name, bs), op="avg", algorithm=alg, async_op=True)
                h.wait(timeout=60)
                out = _flat(ts)
                res[f"{kind}/{name}/{alg}"] = {
                    "rel": _rel(out, exact), "bytes_sent": h.bytes_sent,
                    "digest": hashlib.sha1(out.numpy().tobytes()).hexdigest()}
    # op="sum" and dtype/shape preservation.
    data = [t.to(torch.bfloat16) if i == 1 else t for i, t in enumerate(_data("gauss", rank))]
    ts = [t.clone() for t in data]
    all_reduce(ts, get_codec("int8"), op="sum", algorithm="two_shot")
    exact = _exact_g([t.float() for t in data], op="sum")
    res["sum_rel"] = _rel(_flat([t.float() for t in ts]), _flat(exact))
    res["sum_dtypes"] = [str(t.dtype) for t in ts] == [str(t.dtype) for t in data]
    # Two async all-reduces in flight at once, waited in reverse order.
    a, b = _data("gauss", rank, 1), _data("gauss", rank, 2)
    ea, eb = _flat(_exact_g(a)), _flat(_exact_g(b))
    ha = all_reduce(a, get_codec("int8"), algorithm="two_shot", async_op=True)
    hb = all_reduce(b, get_codec("fp4"), algorithm="gather", async_op=True)
    hb.wait(timeout=60)
    ha.wait(timeout=60)
    res["overlap_rel"] = [_rel(_flat(a), ea), _rel(_flat(b), eb)]
    # Stochastic rounding is unbiased: averaging many reductions of the same data converges.
    x = _data("gauss", rank, 3)
    ex = _flat(_exact_g(x))
    codec = get_codec("int4", 32, stochastic=True)
    acc = torch.zeros_like(ex)
    rels = {}
    for step in range(1, 17):
        ts = [t.clone() for t in x]
        all_reduce(ts, codec, algorithm="two_shot")
        acc += _flat(ts)
        if step in (1, 16):
            rels[step] = _rel(acc / step, ex)
    res["stochastic_rel"] = [rels[1], rels[16]]
    # Error feedback: the time-averaged result converges to the exact mean; without it, it doesn't.
    for alg in ("two_shot", "gather"):
        for use_ef in (False, True):
            codec = get_codec("int4", 32)
            codec = ErrorFeedback(codec) if use_ef else codec
            acc = torch.zeros_like(ex)
            rels = {}
            for step in range(1, 17):
                ts = [t.clone() for t in x]
                all_reduce(ts, codec, algorithm=alg, key="frag0")
                acc += _flat(ts)
                if step in (1, 4, 16):
                    rels[step] = _rel(acc / step, ex)
            res[f"ef/{alg}/{use_ef}"] = [rels[1], rels[4], rels[16]]
    return res


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    res = {4: _scenarios(rank, dist.group.WORLD), 2: _scenarios(rank, pairs[rank // 2])}
    dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    # Skip interpreter teardown (seconds per process on a loaded 2-core machine); results are on
    # disk and every rank passed the barrier, so no peer still needs this one.
    os._exit(0)


@pytest.fixture(scope="module")
def all_results(tmp_path_factory) -> dict[int, list[dict]]:
    tmp = tmp_path_factory.mktemp("allreduce")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers
    mp.spawn(_worker, args=(4, str(tmp / "init"), str(tmp)), nprocs=4, join=True)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(4)]
    return {4: [r["4"] for r in ranks], 2: [r["2"] for r in ranks[:2]]}


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def results(request, all_results):
    return request.param, all_results[request.param]


def test_matches_fp32_within_codec_bound(results):
    world, ranks = results
    failures = []
    for (name, _bs), (bound_g, bound_t) in BOUNDS.items():
        for kind, bound in (("gauss", bound_g), ("t", bound_t)):
            for alg in ("two_shot", "gather"):
                rel = ranks[0][f"{kind}/{name}/{alg}"]["rel"]
                if not rel <= bound:
                    failures.append(f"{kind}/{name}/{alg}: {rel:.3g} > {bound:.3g}")
    assert not failures, failures


def test_every_rank_gets_identical_result(results):
    world, ranks = results
    for k, v in ranks[0].items():
        if isinstance(v, dict) and "digest" in v:
            assert all(r[k]["digest"] == v["digest"] for r in ranks), k


def test_bytes_on_the_wire(results):
    world, ranks = results
    r0 = ranks[0]
    fp32 = r0["gauss/none/two_shot"]["bytes_sent"]
    assert fp32 > 0
    # Targets 3.9x (8-bit) and 7x (4-bit) hold for large buffers (tests/unit/test_codecs.py);
    # this 31k-element one loses up to 3% to chunk padding (W x block_size elements).
    for name, min_ratio in (("bf16", 2.0), ("int8", 3.9), ("fp8_e4m3", 3.9), ("int4", 7.0)):
        ratio = fp32 / r0[f"gauss/{name}/two_shot"]["bytes_sent"]
        assert ratio >= 0.97 * min_ratio, (name, ratio)
    # gather sends (W-1) payloads, two-shot 2(W-1)/W: equal at W=2, gather costlier beyond.
    g, t = r0["gauss/int8/gather"]["bytes_sent"], r0["gauss/int8/two_shot"]["bytes_sent"]
    assert (g <= 1.05 * t) if world == 2 else (g > t)


def test_sum_and_dtypes(results):
    _, ranks = results
    assert ranks[0]["sum_rel"] < 1.4e-2
    assert ranks[0]["sum_dtypes"]


def test_async_handles_in_flight_together(results):
    _, ranks = results
    rel_int8, rel_fp4 = ranks[0]["overlap_rel"]
    assert rel_int8 < BOUNDS[("int8", 256)][0] and rel_fp4 < 0.4


def test_stochastic_rounding_averages_out(results):
    _, ranks = results
    rel1, rel16 = ranks[0]["stochastic_rel"]
    assert rel16 < rel1 / 2.5  # ~1/sqrt(16) for unbiased, independent noise


def test_error_feedback_time_average_converges(results):
    world, ranks = results
    for alg in ("two_shot", "gather"):
        plain = ranks[0][f"ef/{alg}/False"]
        ef = ranks[0][f"ef/{alg}/True"]
        assert ef[0] == pytest.approx(plain[0], rel=1e-6)  # first step: nothing fed back yet
        assert ef[2] < ef[1] < ef[0]  # shrinks as steps accumulate
        assert ef[2] < ef[0] / 10
        assert plain[2] > plain[0] / 2  # deterministic rounding without feedback does not
