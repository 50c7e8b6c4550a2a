"""Compare the Triton kernels with the torch reference on every codec; print one JSON line.

    TRITON_INTERPRET=1 python -m kernels.check            # CPU, small tensors (interpreter)
    python -m kernels.check --device cuda --numel 4000000  # compiled kernels on a GPU

The unit tests run the first form in a subprocess so that TRITON_INTERPRET never leaks into the
test process; the GPU tests call `compare` directly. Each case reports whether payloads, residuals
and decoded values are bit-identical and the largest differences otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

from kernels import reference
from kernels.spec import SPECS


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return bool(torch.equal(a, b))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.dtype == torch.uint8:
        return float((a != b).float().mean()) if a.numel() else 0.0
    return float((a - b).abs().max()) if a.numel() else 0.0


def _test_data(num_rows: int, numel: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """Gaussian with a heavy-tailed envelope, exact zeros and a zero block: exercises every path."""
    x = torch.randn(num_rows, numel, generator=gen) * torch.rand(num_rows, numel, generator=gen) ** 4
    x *= 10.0
    x[0, :7] = 0.0
    if numel >= 96:
        x[-1, 32:64] = 0.0  # an all-zero block at block size 32: scale 0
    x[0, -1] = -3.5e-3
    return x.to(device)


def compare_case(spec_name: str, block_size: int, num_rows: int, numel: int, stochastic: bool,
                 with_residual: bool, device: str = "cpu", seed: int = 0) -> dict:
    from kernels import triton_kernels as tk

    spec = SPECS[spec_name]
    gen = torch.Generator().manual_seed(seed)
    x = _test_data(num_rows, numel, device, gen)
    res_ref = (torch.randn(num_rows, numel, generator=gen) * 1e-2).to(device) if with_residual else None
    res_tri = res_ref.clone() if with_residual else None
    noise_seed = 12345 + seed if stochastic else None
    p_ref = reference.encode(spec, x, block_size, seed=noise_seed, residual=res_ref)
    p_tri = tk.encode(spec, x, block_size, seed=noise_seed, residual=res_tri)
    out = {"codec": spec_name, "block_size": block_size, "rows": num_rows, "numel": numel,
           "stochastic": stochastic, "residual": with_residual,
           "payload_equal": _bitwise_equal(p_ref, p_tri),
           "payload_mismatch_frac": _max_diff(p_ref, p_tri)}
    if with_residual:
        out["residual_equal"] = _bitwise_equal(res_ref, res_tri)
        out["residual_max_diff"] = _max_diff(res_ref, res_tri)
    # Decode the reference payload with both, in the three modes the callers use.
    d_ref = reference.decode(spec, p_ref, numel, block_size)
    d_tri = tk.decode(spec, p_ref, numel, block_size)
    acc_ref = torch.randn(num_rows * numel, generator=gen).to(device)
    acc_tri = acc_ref.clone()
    reference.decode(spec, p_ref, numel, block_size, out=acc_ref, accumulate=True)
    tk.decode(spec, p_ref, numel, block_size, out=acc_tri, accumulate=True)
    s_ref = reference.decode(spec, p_ref, numel, block_size, num_sum=num_rows, alpha=1 / 3)
    s_tri = tk.decode(spec, p_ref, numel, block_size, num_sum=num_rows, alpha=1 / 3)
    out["decode_equal"] = all(_bitwise_equal(a, b) for a, b in
                              [(d_ref, d_tri), (acc_ref, acc_tri), (s_ref, s_tri)])
    out["decode_max_diff"] = max(_max_diff(a, b) for a, b in
                                 [(d_ref, d_tri), (acc_ref, acc_tri), (s_ref, s_tri)])
    out["rel_err"] = float((d_ref.view_as(x) - x).norm() / x.norm())
    return out


def cases(numel: int) -> list[tuple]:
    """(codec, block_size, rows, numel, stochastic, residual) covering every kernel branch."""
    out = []
    for name, spec in SPECS.items():
        if spec.kind == "raw":
            continue
        block_sizes = (32, 256) if spec.scaled else (256,)
        shapes = ((1, numel), (1, numel - 223), (4, 512))  # odd length, partial block, many rows
        for bs, (rows, n), (stoch, res) in itertools.product(
                block_sizes, shapes, ((False, False), (True, True), (False, True))):
            out.append((name, bs, rows, n, stoch, res))
    return out


def compare(device: str = "cpu", numel: int = 1000) -> list[dict]:
    return [compare_case(*c, device=device, seed=i) for i, c in enumerate(cases(numel))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--numel", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        import numpy as np

        np.seterr(all="ignore")  # the interpreter's uint32 hash overflows on purpose
    except ImportError:
        pass
    results = compare(args.device, args.numel)
    print(json.dumps({"cases": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
