"""Pure-torch reference of the codec kernels: runs anywhere (CPU, GPU without Triton) and defines
the results the Triton kernels must reproduce (see `kernels.spec` for the format).

Every step is an exact fp32 operation or an IEEE-rounded one that Triton performs the same way
(one multiply and one round per element, two divisions per block), so kernel and reference agree
bit for bit. Where torch has a fast op with the same result (fp8/fp16/bf16 casts, int8 bytes) it is
used instead of the generic formula, for CPU speed.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from kintsugi.kernels.spec import HASH_MULT, CodecSpec, code_nbytes, num_blocks, scale_nbytes

_M32 = 0xFFFFFFFF


def _mul32(a: Tensor, b: int) -> Tensor:
    """(a * b) mod 2^32 for int64 `a` in [0, 2^32), split so that no int64 product overflows."""
    lo = a * (b & 0xFFFF)
    hi = ((a * (b >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def uniform_from_index(index: Tensor, seed: int) -> Tensor:
    """u in [0, 1) per element from a 32-bit integer hash of (index, seed) ("lowbias32").

    A counter-based hash rather than torch's RNG so the kernel can generate the same numbers.
    """
    x = (_mul32(index & _M32, HASH_MULT) + seed) & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (2.0**-24)


def round_up_bf16(x: Tensor) -> Tensor:
    """Smallest bf16 value >= x (x >= 0, finite), returned as fp32."""
    bits = x.view(torch.int32).to(torch.int64)
    bits = (bits + 0xFFFF) & 0xFFFF0000
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)  # back to signed int32 range
    return bits.to(torch.int32).view(torch.float32)


def _pow2(exp: Tensor) -> Tensor:
    """2.0**exp as fp32, built from the exponent bits (exp in the normal range)."""
    return ((exp + 127) << 23).view(torch.float32)


def _quantize(spec: CodecSpec, z: Tensor, noise: Optional[Tensor]) -> Tensor:
    """Codes of already-scaled values z (consumed in place).

    noise=None rounds to nearest even; otherwise floor(v + noise) with noise uniform in [0, 1),
    which rounds up with probability frac(v): unbiased. Returns uint8 codes for 8- and 4-bit
    codecs, int32 for 16-bit ones.
    """
    if spec.kind == "int":
        z = z.round_() if noise is None else z.add_(noise).floor_()
        z.clamp_(-spec.qmax, spec.qmax)
        return z.to(torch.int8).view(torch.uint8) if spec.bits == 8 else z.add_(8).to(torch.uint8)
    if noise is None and spec.name == "fp8_e4m3":  # the grid below, as torch's (fast) cast
        return z.clamp_(-spec.qmax, spec.qmax).to(torch.float8_e4m3fn).view(torch.uint8)
    # Float grid: spacing 2^(e - m), e = max(floor(log2|z|), min_exp); k = round(|z| / spacing).
    # Float codes are monotonic integers: code = (e - min_exp) * 2^m + k covers normals,
    # subnormals (e = min_exp, k < 2^m) and rounding up into the next binade (k = 2^(m+1)).
    m = spec.mant_bits
    sign = (z.view(torch.int32) >> 31) & 1  # sign bit, so -0.0 keeps it like a cast does
    a = z.abs_().clamp_(max=spec.qmax)
    e = (a.view(torch.int32) >> 23).sub_(127).clamp_(min=spec.min_exp)
    a.mul_(((127 + m) - e).bitwise_left_shift_(23).view(torch.float32))
    a = a.round_() if noise is None else a.add_(noise).floor_()
    code = (e.sub_(spec.min_exp) << m).add_(a.to(torch.int32))
    code.bitwise_or_(sign << (spec.bits - 1))
    return code.to(torch.uint8) if spec.bits <= 8 else code


def _dequantize(spec: CodecSpec, code: Tensor) -> Tensor:
    """fp32 grid values of integer codes (before the scale): the formula the kernel uses."""
    code = code.to(torch.int32)
    if spec.kind == "int":
        if spec.bits == 8:
            return code.to(torch.uint8).view(torch.int8).to(torch.float32)
        return (code - 8).to(torch.float32)
    m = spec.mant_bits
    exp_field = (code >> m) & ((1 << spec.exp_bits) - 1)
    mant = code & ((1 << m) - 1)
    normal = ((exp_field - 1 + spec.min_exp + 127) << 23 | (mant << (23 - m))).view(torch.float32)
    sub = mant.to(torch.float32) * (2.0 ** (spec.min_exp - m))
    val = torch.where(exp_field > 0, normal, sub)
    return torch.where((code >> (spec.bits - 1)) & 1 == 1, -val, val)


@functools.lru_cache(maxsize=None)
def _code_table(spec: CodecSpec) -> Tensor:
    """Values of every code of an 8- or 4-bit codec: (2^bits,) fp32."""
    return _dequantize(spec, torch.arange(1 << spec.bits, dtype=torch.int32))


@functools.lru_cache(maxsize=None)
def _byte_table(spec: CodecSpec) -> Tensor:
    """Values of every byte: (256,) for 8-bit codes, (256, 2) for two 4-bit codes per byte."""
    byte = torch.arange(256, dtype=torch.int32)
    if spec.bits == 8:
        return _dequantize(spec, byte)
    return torch.stack([_dequantize(spec, byte & 0xF), _dequantize(spec, byte >> 4)], dim=-1)


def _byte_values(spec: CodecSpec, data: Tensor, numel: int) -> Tensor:
    """(R, nbytes) uint8 codes -> (R, numel) fp32 grid values, by table lookup."""
    if spec.kind == "int" and spec.bits == 8:  # two's complement bytes: a cast is faster
        return data.contiguous().view(torch.int8).to(torch.float32)
    table = _byte_table(spec).to(data.device)
    vals = table.index_select(0, data.reshape(-1).to(torch.int32))
    return vals.view(data.shape[0], -1)[:, :numel]


def _bf16_codes(y: Tensor, noise_index: Tensor, seed: int) -> Tensor:
    """Stochastic bf16: add 16 random bits below the kept ones, then truncate."""
    bits = y.view(torch.int32).to(torch.int64) & _M32
    h = (uniform_from_index(noise_index, seed) * 2.0**24).to(torch.int64) >> 8  # top 16 bits
    code = ((bits + h) >> 16) & 0xFFFF
    return torch.where(torch.isnan(y), 0x7FC0, code).to(torch.int32)


def _code_bytes(spec: CodecSpec, code: Tensor) -> Tensor:
    """(R, n) codes -> (R, code_nbytes) uint8, little-endian / low nibble first."""
    if spec.bits == 8:
        return code
    if spec.bits == 16:
        return torch.stack([code & 0xFF, code >> 8], dim=-1).flatten(-2).to(torch.uint8)
    if code.shape[-1] % 2:
        zero_code = int(_quantize(spec, torch.zeros(1), None))
        code = torch.nn.functional.pad(code, (0, 1), value=zero_code)
    return code[..., 0::2] | (code[..., 1::2] << 4)


def encode(
    spec: CodecSpec,
    x: Tensor,
    block_size: int,
    *,
    seed: Optional[int] = None,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Encode fp32 rows x (R, C) into payload rows (R, row_nbytes). seed=None: round to nearest.

    With `residual` (R, C) the values encoded are x + residual, and residual is overwritten with
    what the encoding lost (error feedback).
    """
    num_rows, numel = x.shape
    y = x if residual is None else x + residual
    if spec.kind == "raw":
        if residual is not None:
            residual.zero_()
        return y.contiguous().view(torch.uint8).clone() if y is x else y.view(torch.uint8)
    noise_index = None
    if seed is not None:
        noise_index = torch.arange(num_rows * numel, device=x.device, dtype=torch.int64)
        noise_index = noise_index.view(num_rows, numel)
    if spec.kind == "bf16":
        if noise_index is None:  # round to nearest even, as the hardware cast does
            payload = y.to(torch.bfloat16).view(torch.uint8)
        else:
            payload = _code_bytes(spec, _bf16_codes(y, noise_index, seed or 0))
        if residual is not None:
            residual.copy_(y - payload.view(torch.bfloat16).to(torch.float32))
        return payload
    if not spec.scaled:  # fp16
        if noise_index is None:  # round to nearest even, as the hardware cast does
            half = y.clamp(-spec.qmax, spec.qmax).to(torch.float16)
            payload = half.view(torch.uint8)
        else:
            code = _quantize(spec, y.clone(), uniform_from_index(noise_index, seed or 0))
            payload = _code_bytes(spec, code)
            half = payload.view(torch.float16)
        if residual is not None:
            residual.copy_(y - half.to(torch.float32))
        return payload
    nb = num_blocks(numel, block_size)
    width = nb * block_size
    yb = y if width == numel else torch.nn.functional.pad(y, (0, width - numel))
    yb = yb.view(num_rows, nb, block_size)
    # max |y| per block (faster than abs().amax()); + 0.0 turns a -0.0 of all-zero blocks into +0.0
    amax = torch.maximum(yb.amax(dim=-1), yb.amin(dim=-1).neg_()).add_(0.0)
    scale = round_up_bf16(amax / spec.qmax)  # (R, nb)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    z = yb * inv.unsqueeze(-1)
    noise = None
    if noise_index is not None:
        idx = torch.nn.functional.pad(noise_index, (0, width - numel), value=0).view_as(z)
        noise = uniform_from_index(idx, seed or 0)
    code = _quantize(spec, z, noise).view(num_rows, width)
    if residual is not None:
        deq = _code_table(spec).to(x.device).index_select(0, code.reshape(-1).to(torch.int32))
        deq = (deq.view(num_rows, nb, block_size) * scale.unsqueeze(-1)).view(num_rows, width)
        residual.copy_(y - deq[:, :numel])
    data = _code_bytes(spec, code[:, :numel])
    sbits = (scale.view(torch.int32) >> 16) & 0xFFFF
    sbytes = torch.stack([sbits & 0xFF, sbits >> 8], dim=-1).flatten(-2).to(torch.uint8)
    return torch.cat([sbytes, data], dim=1)


def dequantize_rows(spec: CodecSpec, payload: Tensor, numel: int, block_size: int) -> Tensor:
    """Payload rows (R, S) -> fp32 values (R, numel); a view of the payload for codec "none"."""
    num_rows = payload.shape[0]
    if spec.kind == "raw":
        return payload.contiguous().view(torch.float32)[:, :numel]
    if spec.kind == "bf16":
        return payload.contiguous().view(torch.bfloat16).to(torch.float32)
    if not spec.scaled:
        return payload.contiguous().view(torch.float16).to(torch.float32)
    sb = scale_nbytes(spec, numel, block_size)
    val = _byte_values(spec, payload[:, sb : sb + code_nbytes(spec, numel)], numel)
    s = payload[:, :sb].to(torch.int32)
    scale = ((s[:, 0::2] | (s[:, 1::2] << 8)) << 16).view(torch.float32)  # (R, nb)
    nb = scale.shape[1]
    if nb * block_size != numel:
        val = torch.nn.functional.pad(val, (0, nb * block_size - numel))
    val = val.view(num_rows, nb, block_size) * scale.unsqueeze(-1)
    return val.view(num_rows, -1)[:, :numel]


def decode(
    spec: CodecSpec,
    payload: Tensor,
    numel: int,
    block_size: int,
    *,
    num_sum: int = 1,
    alpha: float = 1.0,
    out: Optional[Tensor] = None,
    accumulate: bool = False,
) -> Tensor:
    """Decode payload rows (R, S) of `numel` elements each into out (R // num_sum * numel,) fp32.

    Groups of `num_sum` consecutive rows are summed in row order, then multiplied by alpha, then
    added to `out` if accumulate: ``out = out + alpha * (v_0 + v_1 + ...)``.
    """
    vals = dequantize_rows(spec, payload, numel, block_size).reshape(-1, num_sum, numel)
    total = vals[:, 0]
    for i in range(1, num_sum):
        total = total + vals[:, i]
    if alpha != 1.0:  # x * 1.0 == x exactly, so skipping it changes no bit
        total = total * alpha
    total = total.reshape(-1)
    if out is None:
        aliases_payload = spec.kind == "raw" and num_sum == 1 and alpha == 1.0
        return total.clone() if aliases_payload else total
    if accumulate:
        out += total
    else:
        out.copy_(total)
    return out
