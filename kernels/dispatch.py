"""Fused quantize / dequantize(-accumulate) kernels for the codecs of `compression`.

`encode` and `decode` pick the implementation: the Triton kernels (`kernels.triton_kernels`) for
CUDA tensors when Triton imports, the pure-torch reference (`kernels.reference`) otherwise. Both
produce the same bytes and values. Triton is imported lazily, so CPU-only users never load it.

Override with the environment variable ``KINTSUGI_KERNELS`` or `set_backend`: "auto" (default),
"reference", or "triton" (forces the kernels, e.g. on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
from torch import Tensor

from kintsugi.kernels import reference
from kintsugi.kernels.spec import ALIASES, SPECS, CodecSpec, check_block_size, row_nbytes

__all__ = ["CodecSpec", "SPECS", "ALIASES", "encode", "decode", "set_backend", "backend_for",
           "row_nbytes", "check_block_size", "triton_available"]

logger = logging.getLogger(__name__)
_BACKENDS = ("auto", "reference", "triton")
_backend = os.environ.get("KINTSUGI_KERNELS", "auto")


def set_backend(name: str) -> None:
    """Choose "auto", "reference" or "triton" for every later call."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"kernel backend {name!r} is unknown: use one of {_BACKENDS}")
    _backend = name


@functools.lru_cache(maxsize=None)
def _triton_module():
    try:
        from kintsugi.kernels import triton_kernels
    except ImportError as err:  # triton missing or broken: the reference does the work
        logger.warning("Triton kernels unavailable (%s); using the torch reference", err)
        return None
    return triton_kernels


def triton_available() -> bool:
    return _triton_module() is not None


def backend_for(x: Tensor, spec: CodecSpec):
    """The module (reference or triton_kernels) that runs `spec` on tensors like `x`."""
    if _backend not in _BACKENDS:
        raise ValueError(f"KINTSUGI_KERNELS={_backend!r} is unknown: use one of {_BACKENDS}")
    if spec.kind == "raw" or _backend == "reference":
        return reference
    if _backend == "triton" or x.is_cuda:
        mod = _triton_module()
        if mod is not None:
            return mod
        if _backend == "triton":
            raise RuntimeError("KINTSUGI_KERNELS=triton but triton cannot be imported")
    return reference


def encode(spec: CodecSpec, x: Tensor, block_size: int, *, seed: Optional[int] = None,
           residual: Optional[Tensor] = None) -> Tensor:
    """Encode contiguous fp32 rows x (R, C) into payload rows (R, row_nbytes(spec, C, block_size)).

    seed=None rounds to nearest; an int seed rounds stochastically with noise hashed from
    (element index, seed). With `residual` (R, C, fp32) the encoded values are x + residual and
    residual is overwritten with the part the encoding lost (error feedback), in the same pass.
    """
    if x.numel() == 0:
        return x.new_empty((x.shape[0], 0), dtype=torch.uint8)
    return backend_for(x, spec).encode(spec, x, block_size, seed=seed, residual=residual)


def decode(spec: CodecSpec, payload: Tensor, numel: int, block_size: int, *, num_sum: int = 1,
           alpha: float = 1.0, out: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
    """Decode payload rows (R, S) of `numel` elements into fp32 (R // num_sum * numel,).

    Each group of `num_sum` consecutive rows is summed in row order (fp32), times alpha, then
    written to `out` or added to it (accumulate): ``out = out + alpha * (v_0 + v_1 + ...)``.
    """
    if numel == 0 or payload.shape[0] == 0:
        return out if out is not None else payload.new_empty(0, dtype=torch.float32)
    return backend_for(payload, spec).decode(spec, payload, numel, block_size, num_sum=num_sum,
                                             alpha=alpha, out=out, accumulate=accumulate)
