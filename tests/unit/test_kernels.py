"""Kernel dispatch and the torch reference's contracts (CPU, single process)."""

from __future__ import annotations

import pytest
import torch

from kintsugi.kernels import dispatch as kernels
from kintsugi.kernels import reference
from kintsugi.kernels.spec import SPECS, row_nbytes

LOSSY = [name for name, spec in SPECS.items() if spec.kind != "raw"]


def test_dispatch_uses_reference_on_cpu():
    x = torch.randn(1, 10)
    assert kernels.backend_for(x, SPECS["int8"]) is reference
    with pytest.raises(ValueError, match="reference"):
        kernels.set_backend("fast")


@pytest.mark.parametrize("name", LOSSY)
def test_rows_are_independent_payloads(name):
    """Encoding (R, C) rows equals encoding each row alone: what the all-to-all relies on."""
    spec = SPECS[name]
    x = torch.randn(4, 512) * torch.logspace(-3, 2, 4).unsqueeze(1)
    rows = kernels.encode(spec, x, 64)
    assert rows.shape == (4, row_nbytes(spec, 512, 64))
    for r in range(4):
        assert torch.equal(rows[r], kernels.encode(spec, x[r : r + 1].contiguous(), 64)[0])


@pytest.mark.parametrize("name", LOSSY)
def test_decode_sums_rows_then_scales_then_accumulates(name):
    spec = SPECS[name]
    x = torch.randn(3, 777)  # odd length: partial block, half-filled last byte for 4-bit codecs
    payload = kernels.encode(spec, x, 32)
    each = kernels.decode(spec, payload, 777, 32).view(3, 777)
    total = kernels.decode(spec, payload, 777, 32, num_sum=3, alpha=0.25)
    assert torch.equal(total, ((each[0] + each[1]) + each[2]) * 0.25)
    out = torch.ones(777)
    kernels.decode(spec, payload, 777, 32, num_sum=3, alpha=0.25, out=out, accumulate=True)
    assert torch.equal(out, 1.0 + total)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("stochastic", [False, True])
def test_residual_is_what_the_payload_lost(name, stochastic):
    spec = SPECS[name]
    x, res = torch.randn(2, 1000), torch.randn(2, 1000) * 0.1
    wanted = x + res
    payload = kernels.encode(spec, x, 256, seed=3 if stochastic else None, residual=res)
    delivered = kernels.decode(spec, payload, 1000, 256).view(2, 1000)
    assert torch.allclose(delivered + res, wanted, rtol=0, atol=1e-6)
    assert not torch.equal(res, torch.zeros_like(res))


def test_hash_noise_is_uniform_and_seeded():
    idx = torch.arange(1 << 16)
    u = reference.uniform_from_index(idx, 5)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(u, reference.uniform_from_index(idx, 5))
    assert not torch.equal(u, reference.uniform_from_index(idx, 6))


def test_scales_round_up_so_nothing_clips():
    x = torch.tensor([[127.0 * 1.001, -3.0] + [0.0] * 30])
    payload = kernels.encode(SPECS["int8"], x, 32)
    scale = payload[0, :2].view(torch.bfloat16).float()
    assert float(scale) >= 1.001 and float(scale) <= 1.001 * (1 + 2**-7)
    assert torch.allclose(kernels.decode(SPECS["int8"], payload, 32, 32), x[0], rtol=0, atol=0.6)
