"""Pure-torch reference of the codec kernels: runs anywhere (CPU, GPU without Triton) and defines
the results the Triton kernels must reproduce (see `kernels.spec` for the format).

Every rounding step is an exact fp32 operation or an IEEE-rounded one that Triton performs the same
way (one multiply, one add, one division per block), so kernel and reference agree bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kernels.spec import HASH_MULT, CodecSpec, code_nbytes, num_blocks, scale_nbytes

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


def _quantize(spec: CodecSpec, z: Tensor, rnd: Tensor | float) -> Tensor:
    """Codes (int32, in [0, 2^bits)) of already-scaled values z; rnd is 0.5 or uniform noise."""
    if spec.kind == "int":
        k = torch.trunc(z.abs() + rnd).clamp_(max=spec.qmax).to(torch.int32)
        q = torch.where(z < 0, -k, k)
        return q & 0xFF if spec.bits == 8 else q + 8
    # Float grid: spacing 2^(e - mant) with e = max(floor(log2|z|), min_exp); all steps exact.
    a = z.abs().clamp_(max=spec.qmax)
    e = ((a.view(torch.int32) >> 23) - 127).clamp_(min=spec.min_exp)
    k = torch.trunc(a * _pow2(spec.mant_bits - e) + rnd).to(torch.int32)
    qv = k.to(torch.float32) * _pow2(e - spec.mant_bits)
    biased = qv.view(torch.int32) >> 23
    normal = biased - 127 >= spec.min_exp
    exp_field = torch.where(normal, biased - 127 - spec.min_exp + 1, 0)
    mant = torch.where(normal, (qv.view(torch.int32) & 0x7FFFFF) >> (23 - spec.mant_bits), k)
    sign = (z < 0).to(torch.int32) << (spec.bits - 1)
    return sign | (exp_field << spec.mant_bits) | mant


def _dequantize(spec: CodecSpec, code: Tensor) -> Tensor:
    """fp32 grid values of int32 codes (before multiplying by the scale)."""
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


def _bf16_codes(y: Tensor, noise_index: Optional[Tensor], seed: int) -> Tensor:
    if noise_index is None:  # round to nearest even, as the hardware cast does
        return y.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    bits = y.view(torch.int32).to(torch.int64) & _M32
    h = (uniform_from_index(noise_index, seed) * 2.0**24).to(torch.int64) >> 8  # top 16 bits
    code = ((bits + h) >> 16) & 0xFFFF
    return torch.where(torch.isnan(y), 0x7FC0, code).to(torch.int32)


def _code_bytes(spec: CodecSpec, code: Tensor) -> Tensor:
    """(R, n) int32 codes -> (R, code_nbytes) uint8, little-endian / low nibble first."""
    if spec.bits == 8:
        return code.to(torch.uint8)
    if spec.bits == 16:
        return torch.stack([code & 0xFF, code >> 8], dim=-1).flatten(-2).to(torch.uint8)
    if code.shape[-1] % 2:
        code = torch.nn.functional.pad(code, (0, 1), value=int(_quantize(spec, torch.zeros(1), 0.5)))
    return (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)


def _byte_codes(spec: CodecSpec, data: Tensor, numel: int) -> Tensor:
    """Inverse of `_code_bytes`: (R, nbytes) uint8 -> (R, numel) int32 codes."""
    d = data.to(torch.int32)
    if spec.bits == 8:
        return d
    if spec.bits == 16:
        return d[..., 0::2] | (d[..., 1::2] << 8)
    return torch.stack([d & 0xF, d >> 4], dim=-1).flatten(-2)[..., :numel]


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
        code = _bf16_codes(y, noise_index, seed or 0).view(num_rows, numel)
        payload = _code_bytes(spec, code)
        if residual is not None:
            residual.copy_(y - payload.view(torch.bfloat16).to(torch.float32))
        return payload
    nb = num_blocks(numel, block_size) if spec.scaled else 1
    width = nb * block_size if spec.scaled else numel
    yb = torch.nn.functional.pad(y, (0, width - numel)).view(num_rows, nb, -1)
    if spec.scaled:
        scale = round_up_bf16(yb.abs().amax(dim=-1) / spec.qmax)  # (R, nb)
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        z = yb * inv.unsqueeze(-1)
    else:
        z = yb
    if noise_index is None:
        rnd: Tensor | float = 0.5
    else:
        idx = torch.nn.functional.pad(noise_index, (0, width - numel), value=0).view_as(z)
        rnd = uniform_from_index(idx, seed or 0)
    code = _quantize(spec, z, rnd).view(num_rows, width)[:, :numel]
    data = _code_bytes(spec, code)
    if residual is not None:
        deq = _dequantize(spec, code)
        if spec.scaled:
            deq = torch.nn.functional.pad(deq, (0, width - numel)).view(num_rows, nb, -1)
            deq = (deq * scale.unsqueeze(-1)).view(num_rows, width)[:, :numel]
        residual.copy_(y - deq)
    if not spec.scaled:
        return data
    sbits = (scale.view(torch.int32) >> 16) & 0xFFFF
    sbytes = torch.stack([sbits & 0xFF, sbits >> 8], dim=-1).flatten(-2).to(torch.uint8)
    return torch.cat([sbytes, data], dim=1)


def dequantize_rows(spec: CodecSpec, payload: Tensor, numel: int, block_size: int) -> Tensor:
    """Payload rows (R, S) -> fp32 values (R, numel)."""
    num_rows = payload.shape[0]
    if spec.kind == "raw":
        return payload.contiguous().view(torch.float32)[:, :numel]
    if spec.kind == "bf16":
        return payload.contiguous().view(torch.bfloat16).to(torch.float32)
    sb = scale_nbytes(spec, numel, block_size)
    code = _byte_codes(spec, payload[:, sb : sb + code_nbytes(spec, numel)], numel)
    val = _dequantize(spec, code)
    if not spec.scaled:
        return val
    s = payload[:, :sb].to(torch.int32)
    scale = ((s[:, 0::2] | (s[:, 1::2] << 8)) << 16).view(torch.float32)  # (R, nb)
    nb = scale.shape[1]
    val = torch.nn.functional.pad(val, (0, nb * block_size - numel)).view(num_rows, nb, -1)
    return (val * scale.unsqueeze(-1)).view(num_rows, -1)[:, :numel]


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
    vals = dequantize_rows(spec, payload, numel, block_size)
    vals = vals.view(-1, num_sum, numel)
    total = vals[:, 0].clone()
    for i in range(1, num_sum):
        total += vals[:, i]
    total = (total * alpha).reshape(-1)
    if out is None:
        return total
    if accumulate:
        out += total
    else:
        out.copy_(total)
    return out
