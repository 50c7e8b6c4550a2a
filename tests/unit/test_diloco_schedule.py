"""Streaming DiLoCo schedule and fragment split (single process): the sync times follow
`(t - p*H//P) % H == 0, t >= H`, fragments are strided or sequential, and at world size 1 the outer
loop runs without a process group."""
import pytest
import torch

from kintsugi.parallel.diloco import (StreamingDiLoCo, data_parallel_bytes_per_step, fragment_of_layer, split_fragments,
                             sync_due, sync_offset)
from kintsugi.trainer.config.job import DilocoConfig


@pytest.mark.parametrize("H,P", [(1, 1), (4, 1), (4, 2), (10, 3), (12, 4), (100, 8), (3, 5)])
def test_schedule_follows_formula(H, P):
    T = 5 * H + 7
    for p in range(P):
        t_p = p * H // P
        want = [t for t in range(1, T + 1) if t >= H and (t - t_p) % H == 0]
        got = [t for t in range(1, T + 1) if sync_due(t, p, H, P)]
        assert got == want
        assert sync_offset(p, H, P) == t_p
        # One sync per period after the first H steps, the first at H + t_p (or H for p = 0).
        assert got[0] == (H if t_p == 0 else H + t_p)
        assert all(b - a == H for a, b in zip(got, got[1:]))
    if P <= H:  # offsets distinct and evenly spread: at most one fragment starts per step
        for t in range(1, T + 1):
            assert sum(sync_due(t, p, H, P) for p in range(P)) <= 1


def test_every_fragment_syncs_once_per_period():
    H, P = 12, 4
    for start in range(H, 6 * H, H):
        window = range(start, start + H)
        assert sorted(p for t in window for p in range(P) if sync_due(t, p, H, P)) == list(range(P))


def test_fragment_assignment():
    assert [fragment_of_layer(l, 8, 3, "strided") for l in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [fragment_of_layer(l, 8, 4, "sequential") for l in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [fragment_of_layer(l, 7, 3, "sequential") for l in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        fragment_of_layer(8, 8, 2, "strided")
    with pytest.raises(ValueError):
        fragment_of_layer(0, 8, 2, "random")


def test_split_uses_stage_local_layer_ids_and_puts_ends_in_fragment_0():
    names = ["tok_embeddings.weight"] + [f"layers.{g}.{w}" for g in (4, 5, 6, 7) for w in ("wq.weight", "ffn_norm.weight")] \
        + ["norm.weight", "output.weight"]
    strided = split_fragments(names, 2, "strided")
    assert strided[0] == ["tok_embeddings.weight", "layers.4.wq.weight", "layers.4.ffn_norm.weight",
                          "layers.6.wq.weight", "layers.6.ffn_norm.weight", "norm.weight", "output.weight"]
    assert strided[1] == ["layers.5.wq.weight", "layers.5.ffn_norm.weight", "layers.7.wq.weight",
                          "layers.7.ffn_norm.weight"]
    seq = split_fragments(names, 2, "sequential")
    assert {n.split(".")[1] for n in seq[1]} == {"6", "7"}
    assert len(split_fragments(names, 9, "strided")) == 4  # clamped: no empty fragment


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    names = ["tok_embeddings.weight", "layers.0.w", "layers.1.w", "layers.2.w"]
    return {n: torch.nn.Parameter(torch.randn(4, 3, generator=g)) for n in names}


def test_world_size_one_runs_without_a_group():
    """R = 1: no communication; the outer step moves the global copy towards the local one."""
    params = _params()
    cfg = DilocoConfig(enabled=True, sync_every=2, fragments=2, overlap=0, alpha=0.0, outer_lr=1.0, outer_momentum=0.0)
    d = StreamingDiLoCo(params, cfg)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    d.after_inner_step(1)
    assert d.num_syncs == 0
    d.after_inner_step(2)  # fragment 0 due (t_0 = 0); fragment 1 first at 3
    assert d.num_syncs == 1 and d.counter.as_dict().get("outer_sync", 0) == 0
    glob = d.global_params()
    for n in d.fragments[0].names:
        torch.testing.assert_close(glob[n], params[n].detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        params["layers.1.w"].add_(5.0)
        before = params["layers.1.w"].detach().clone()
    with d.use_global_params():  # swapped in for evaluation, then restored
        assert not torch.equal(params["layers.1.w"], before)
    assert torch.equal(params["layers.1.w"].detach(), before)


def test_overlap_must_be_below_sync_every():
    with pytest.raises(ValueError, match="overlap"):
        StreamingDiLoCo(_params(), DilocoConfig(sync_every=2, overlap=2))


def test_data_parallel_bytes():
    assert data_parallel_bytes_per_step(1000, 1) == 0
    assert data_parallel_bytes_per_step(1000, 2) == 4000  # ring: 2 (W-1)/W of the fp32 bytes
    assert data_parallel_bytes_per_step(1000, 4) == 6000
