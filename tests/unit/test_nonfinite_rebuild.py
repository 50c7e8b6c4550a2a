"""CheckFree never averages a non-finite neighbour (checked against values worked out by hand)."""
import math

import pytest
import torch

from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.model.llama import ModelConfig
from kintsugi.trainer.runtime.stage import StageState


def _job():
    return JobConfig(model=ModelConfig(dim=16, n_layers=4, n_heads=2, n_kv_heads=2, vocab_size=32, max_seq_len=256))


def _pkg(stage, value, grad_norm):
    st = StageState(_job(), stage)
    with torch.no_grad():
        for p in st.model.parameters():
            p.fill_(value)
    pkg = st.source_package()
    pkg["grad_norm"] = grad_norm
    return pkg


def test_a_nan_neighbour_is_left_out_and_the_other_copied():
    target = StageState(_job(), 1)
    target.rebuild_from("checkfree", [_pkg(0, float("nan"), 0.5), _pkg(2, 2.0, 0.25)], lr_bump=1.1, step=5)
    layers = {k: v for k, v in target.model.state_dict().items() if k.startswith("layers.")}
    assert layers and all(torch.equal(v, torch.full_like(v, 2.0)) for v in layers.values())


def test_a_nan_gradient_norm_counts_as_zero_weight():
    target = StageState(_job(), 1)
    target.rebuild_from("checkfree", [_pkg(0, 1.0, float("nan")), _pkg(2, 3.0, 0.5)], lr_bump=1.1, step=5)
    # weights: (0 + 1e-4) and (0.5 + 1e-4): W = (1e-4 * 1 + 0.5001 * 3) / 0.5002
    want = (1e-4 * 1.0 + 0.5001 * 3.0) / 0.5002
    v = next(v for k, v in target.model.state_dict().items() if k.startswith("layers."))
    assert math.isclose(float(v.flatten()[0]), want, rel_tol=1e-6)


def test_both_neighbours_non_finite_is_refused():
    target = StageState(_job(), 1)
    with pytest.raises(RuntimeError, match="non-finite"):
        target.rebuild_from("checkfree", [_pkg(0, float("inf"), 0.5), _pkg(2, float("nan"), 0.5)], lr_bump=1.1,
                            step=5)
