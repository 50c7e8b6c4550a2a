"""Compiled Triton kernels on CUDA: equal to the torch reference at full size, and fast.

Skipped without CUDA or Triton. Bandwidth is reported as a fraction of what `torch.clone` of the
same tensor reaches (the device's practical copy bandwidth) and printed as JSON.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def tk():
    pytest.importorskip("triton")
    from kintsugi.kernels import triton_kernels

    return triton_kernels


def test_dispatch_picks_triton_on_cuda(tk):
    from kintsugi.kernels import dispatch as kernels
    from kintsugi.kernels.spec import SPECS

    assert kernels.backend_for(torch.zeros(1, device="cuda"), SPECS["int8"]) is tk


def test_kernels_match_reference_at_full_size(tk):
    from kintsugi.kernels.check import compare

    cases = compare(device="cuda", numel=1 << 24)  # >= 16M elements
    report = [(c["codec"], c["block_size"], c["rows"], c["numel"], c["payload_mismatch_frac"],
               c["decode_max_diff"], c.get("residual_max_diff", 0.0)) for c in cases]
    print(json.dumps({"gpu_vs_reference": report}))
    for c in cases:
        # Bitwise: the kernels use IEEE divisions, rint and no FMA contraction, like the reference
        # (tests/unit/test_kernels_interpret.py checks the compiled PTX for exactly that).
        assert c["payload_equal"] and c["decode_equal"] and c.get("residual_equal", True), c


def _time_ms(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "int4", "fp4_e3m0", "bf16"])
def test_bandwidth_near_copy(tk, name):
    from kintsugi.compression.api import get_codec

    numel = 1 << 26  # 256 MB of fp32
    codec = get_codec(name)
    x = torch.randn(1, numel, device="cuda")
    payload = codec.encode_rows(x)
    out = torch.empty(numel, device="cuda")
    clone_ms = _time_ms(lambda: x.clone())
    enc_ms = _time_ms(lambda: codec.encode_rows(x))
    dec_ms = _time_ms(lambda: codec.decode_rows(payload, numel, out=out, accumulate=True))
    clone_gbs = 2 * 4 * numel / clone_ms / 1e6
    enc_gbs = (4 * numel + payload.numel()) / enc_ms / 1e6
    dec_gbs = (8 * numel + payload.numel()) / dec_ms / 1e6  # read payload + out, write out
    print(json.dumps({"codec": name, "clone_GBps": clone_gbs, "encode_GBps": enc_gbs,
                      "decode_accumulate_GBps": dec_gbs}))
    # Memory-bound kernels: well within a small factor of a plain copy.
    assert enc_gbs > 0.3 * clone_gbs and dec_gbs > 0.3 * clone_gbs
