"""Fused quantize / dequantize(-accumulate) kernels for the codecs of `compression`.

`encode` and `decode` pick the implementation: the Triton kernels (`kernels.triton_kernels`) for
CUDA tensors when Triton imports, the pure-torch reference (`kernels.reference`) otherwise. Both
produce the same bytes and values. Triton is imported lazily, so CPU-only users never load it.

Override with the environment variable ``KINTSUGI_KERNELS`` or `set_backend`: "auto" (default),
"reference", or "triton" (forces the kernels, e.g. on CPU tensors under ``TRITON_INTERPRET=1``).
A job selects its path once, at start, with `configure(name, device_type)`, which checks that the
choice can run in this process (one line naming the fix otherwise); `active_backend()` says which
module CPU and CUDA tensors get.
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
           "row_nbytes", "check_block_size", "triton_available", "configure", "active_backend",
           "BACKENDS"]

logger = logging.getLogger(__name__)
_BACKENDS = BACKENDS = ("auto", "reference", "triton")
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


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")


def configure(name: str, device_type: str = "cpu") -> str:
    """Select the kernel path a job asked for (`compression.kernels`) for a stage whose tensors live
    on `device_type`, after checking it can run here: "triton" needs triton importable and, for CPU
    tensors, Triton's interpreter (TRITON_INTERPRET=1 in the environment the process started with:
    triton reads it when the kernels are defined). Returns the backend set."""
    if name not in _BACKENDS:
        raise ValueError(f"compression.kernels={name!r} is unknown; use one of {', '.join(_BACKENDS)}")
    if name == "triton":
        if device_type != "cuda" and not _interpreted():
            raise ValueError("compression.kernels=triton on CPU tensors runs Triton's interpreter: start the "
                             "job with TRITON_INTERPRET=1 in its environment, or use compression.kernels=auto")
        if not triton_available():
            raise ValueError("compression.kernels=triton: triton cannot be imported in this environment; "
                             "install it (pip install triton) or use compression.kernels=auto")
    set_backend(name)
    return name


def active_backend() -> dict:
    """Which implementation CPU and CUDA tensors get now: {"cpu": ..., "cuda": ...}, each
    "reference" or "triton" (what a job reports about its kernels)."""
    def name_of(is_cuda: bool) -> str:
        if _backend == "reference":
            return "reference"
        if (_backend == "triton" or is_cuda) and triton_available():
            return "triton"
        return "reference"
    return {"cpu": name_of(False), "cuda": name_of(True)}


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
