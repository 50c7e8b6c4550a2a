"""Codecs: fp32 tensors to compact uint8 payloads and back.

`get_codec(name, block_size, stochastic)` builds a `Codec` for one of "none", "bf16", "fp16",
"int8", "fp8_e4m3", "int4", "fp4_e3m0" (alias "fp4"). The bit formats and the payload layout live in
`kernels.spec`; the work is done by `kernels.encode` / `kernels.decode` (Triton on CUDA, torch
elsewhere). A payload is self-contained: block scales travel inside it.

Scales are per block of `block_size` consecutive elements of the flattened tensor, never per row,
so a 1-D bias costs the same bytes per element as a large matrix.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from kintsugi.kernels import dispatch as kernels
from kintsugi.kernels.spec import ALIASES, SPECS, CodecSpec

__all__ = ["Codec", "get_codec", "CODEC_NAMES", "mix_seed"]

CODEC_NAMES = tuple(SPECS) + tuple(ALIASES)


def mix_seed(*values: int) -> int:
    """Hash integers into a seed in [0, 2^31) (splitmix64 finaliser), for stochastic rounding."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFF


def as_fp32_rows(x: Tensor, num_rows: int = 1) -> Tensor:
    """x as a contiguous fp32 (num_rows, -1) tensor; copies only when dtype or layout need it."""
    return x.detach().to(torch.float32).contiguous().view(num_rows, -1)


class Codec:
    """Encode float tensors of any shape into 1-D uint8 payloads (scales included) and back."""

    def __init__(self, spec: CodecSpec, block_size: int = 256, stochastic: bool = False,
                 seed: int = 0):
        kernels.check_block_size(block_size)
        if stochastic and spec.kind == "raw":
            warnings.warn("codec 'none' is exact: stochastic=True is ignored", stacklevel=3)
            stochastic = False
        self.spec = spec
        self.block_size = block_size
        self.stochastic = stochastic
        self.seed = seed
        self._num_calls = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def lossless(self) -> bool:
        return self.spec.kind == "raw"

    def __repr__(self) -> str:
        return (f"Codec({self.name!r}, block_size={self.block_size}, "
                f"stochastic={self.stochastic})")

    def encoded_nbytes(self, numel: int) -> int:
        """Payload bytes for `numel` elements, scales included."""
        return kernels.row_nbytes(self.spec, numel, self.block_size)

    def bits_per_element(self, numel: int) -> float:
        return 8.0 * self.encoded_nbytes(numel) / max(numel, 1)

    def next_seed(self, *salt: int) -> Optional[int]:
        """Seed for the next stochastic encoding (None when rounding to nearest).

        Counter-based, so runs are reproducible; callers on several ranks add the rank as salt so
        their rounding noise is independent (correlated noise would not average out in a sum).
        """
        if not self.stochastic:
            return None
        self._num_calls += 1
        return mix_seed(self.seed, self._num_calls, *salt)

    def encode_rows(self, x_rows: Tensor, *, seed: Optional[int] = None,
                    residual: Optional[Tensor] = None) -> Tensor:
        """fp32 (R, C) -> payload rows (R, encoded_nbytes(C)); see `kernels.encode`."""
        return kernels.encode(self.spec, x_rows, self.block_size, seed=seed, residual=residual)

    def decode_rows(self, payload_rows: Tensor, numel: int, *, num_sum: int = 1,
                    alpha: float = 1.0, out: Optional[Tensor] = None,
                    accumulate: bool = False) -> Tensor:
        """Payload rows (R, S) -> fp32 (R // num_sum * numel,); see `kernels.decode`."""
        return kernels.decode(self.spec, payload_rows, numel, self.block_size, num_sum=num_sum,
                              alpha=alpha, out=out, accumulate=accumulate)

    def encode(self, x: Tensor) -> Tensor:
        """Any float tensor -> 1-D contiguous uint8 payload of `encoded_nbytes(x.numel())` bytes."""
        if not x.is_floating_point():
            raise ValueError(f"codec {self.name!r} encodes float tensors, got {x.dtype}")
        payload = self.encode_rows(as_fp32_rows(x), seed=self.next_seed())
        return payload.view(-1)

    def decode(self, payload: Tensor, numel: int, out: Optional[Tensor] = None,
               accumulate: bool = False) -> Tensor:
        """Payload -> fp32 1-D tensor of `numel` values, written to (or added to) `out` if given."""
        check_payload(self, payload, numel)
        if out is None:
            return self.decode_rows(payload.reshape(1, -1), numel)
        check_out(out, numel)
        self.decode_rows(payload.reshape(1, -1), numel, out=out.view(-1), accumulate=accumulate)
        return out


def check_payload(codec, payload: Tensor, numel: int) -> None:
    expected = codec.encoded_nbytes(numel)
    if payload.dtype != torch.uint8 or payload.numel() != expected:
        raise ValueError(
            f"payload for {numel} elements of codec {codec.name!r} must be {expected} uint8 bytes, "
            f"got {payload.numel()} of {payload.dtype}: decode with the codec and numel that "
            "encoded it")


def check_out(out: Tensor, numel: int) -> None:
    if out.dtype != torch.float32 or out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of {numel} elements, got "
                         f"{out.dtype} {tuple(out.shape)}")


def get_codec(name: str, block_size: int = 256, stochastic: bool = False, seed: int = 0) -> Codec:
    """The codec called `name`: one of "none", "bf16", "fp16", "int8", "fp8_e4m3", "int4",
    "fp4_e3m0" (aliases "fp4", "fp8", "fp32"). block_size applies to the block-scaled codecs
    (int8, fp8_e4m3, int4, fp4_e3m0); stochastic=True rounds up or down at random, unbiased."""
    key = ALIASES.get(name, name)
    if key not in SPECS:
        raise ValueError(f"unknown codec {name!r}: choose one of {', '.join(CODEC_NAMES)}")
    return Codec(SPECS[key], block_size=block_size, stochastic=stochastic, seed=seed)
