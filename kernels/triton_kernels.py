"""Triton kernels (compiled to CUDA on NVIDIA GPUs) for the codecs of `kernels.spec`.

Two kernels cover every codec, specialised by constexpr parameters:

- `_encode_kernel`: (optional residual add) + block amax + bf16 scale + quantize + pack + (optional
  new residual), one launch for any number of rows; each program handles G blocks.
- `_decode_kernel`: unpack + dequantize + sum of `num_sum` rows + alpha + (optional accumulate into
  the output), one launch; the quantized all-reduce uses it to reduce the chunks it owns.

Many tensors share one launch because callers pack them into one flat buffer first.
`kernels.reference` holds the torch version; tests compare the two bit for bit (TRITON_INTERPRET=1
on CPU, compiled on CUDA). Launches disable FMA contraction (`enable_fp_fusion=False`): it would
fuse `y - q * scale` and `out + alpha * sum` into one rounding, unlike the reference (the kernels
are memory-bound, so the extra instruction should not show). Divisions are `div_rn` (IEEE).
Round-to-nearest-even uses `libdevice.rint` when compiled and, in the interpreter (which lacks it),
the exact fp32 identity rint(v) = (v + 1.5 * 2^23) - 1.5 * 2^23 for |v| < 2^22; stochastic
rounding is floor(v + u).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from kintsugi.kernels.spec import CodecSpec, num_blocks, row_nbytes

_KIND_ID = {"bf16": 1, "int": 2, "float": 3}
_TILE_ELEMS = 2048  # elements per program: G blocks of BS
_UNSCALED_BS = 1024  # tile width for codecs without scales (bf16, fp16)
_USE_RINT = os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True")


@triton.jit
def _pow2(e):
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _uniform(idx, seed):
    """lowbias32 hash of (idx, seed) -> uint32 (same as `kernels.reference.uniform_from_index`)."""
    x = idx.to(tl.uint32) * tl.full((), 0x9E3779B1, tl.uint32) + seed.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _round(v, idx, seed, STOCHASTIC: tl.constexpr, USE_RINT: tl.constexpr):
    """Nearest even, or floor(v + u) with u uniform in [0, 1) hashed from (idx, seed)."""
    if STOCHASTIC:
        return tl.floor(v + (_uniform(idx, seed) >> 8).to(tl.float32) * (1.0 / 16777216.0))
    elif USE_RINT:
        return libdevice.rint(v)
    else:
        return (v + 12582912.0) - 12582912.0  # exact for |v| < 2^22, which holds here


@triton.jit
def _quantize(z, idx, seed, KIND: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
              MANT: tl.constexpr, EMIN: tl.constexpr, STOCHASTIC: tl.constexpr,
              USE_RINT: tl.constexpr):
    """Scaled values -> int32 codes."""
    if KIND == 1:  # bf16: integer rounding of the fp32 bit pattern
        bits = z.to(tl.uint32, bitcast=True)
        if STOCHASTIC:
            add = _uniform(idx, seed) >> 16
        else:
            add = 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
        code = ((bits + add) >> 16).to(tl.int32)
        code = tl.where(z != z, 0x7FC0, code)
    elif KIND == 2:  # int grid, |q| <= QMAX
        q = _round(z, idx, seed, STOCHASTIC, USE_RINT)
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX).to(tl.int32)
        if BITS == 8:
            code = q & 0xFF
        else:
            code = q + 8
    elif BITS == 16 and not STOCHASTIC:  # fp16, nearest even: the hardware cast, saturated
        half = tl.minimum(tl.maximum(z, -QMAX), QMAX).to(tl.float16)
        code = half.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        # Float grid: spacing 2^(e - MANT), e = max(floor(log2|z|), EMIN), k = round(|z| / spacing).
        # Float codes are monotonic integers, code = (e - EMIN) * 2^MANT + k, which covers
        # normals, subnormals (k < 2^MANT) and rounding up into the next binade.
        a = tl.minimum(tl.abs(z), QMAX)
        e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, EMIN)
        k = _round(a * _pow2(MANT - e), idx, seed, STOCHASTIC, USE_RINT).to(tl.int32)
        sign = (z.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)  # -0.0 keeps it, as in a cast
        code = (sign << (BITS - 1)) | (((e - EMIN) << MANT) + k)
    return code


@triton.jit
def _dequantize(code, KIND: tl.constexpr, BITS: tl.constexpr, MANT: tl.constexpr,
                EMIN: tl.constexpr):
    """int32 codes -> fp32 grid values (before the scale)."""
    if KIND == 1:
        val = (code.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 2:
        if BITS == 8:
            val = code.to(tl.int8).to(tl.float32)  # two's complement byte
        else:
            val = (code - 8).to(tl.float32)
    else:
        exp_field = (code >> MANT) & ((1 << (BITS - 1 - MANT)) - 1)
        mant = code & ((1 << MANT) - 1)
        normal = (((exp_field - 1 + EMIN + 127) << 23) | (mant << (23 - MANT))).to(
            tl.float32, bitcast=True)
        sub = mant.to(tl.float32) * _pow2(tl.full((), EMIN - MANT, tl.int32))
        val = tl.where(exp_field > 0, normal, sub)
        val = tl.where(((code >> (BITS - 1)) & 1) == 1, -val, val)
    return val


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 must stay a runtime value
def _encode_kernel(x_ptr, res_ptr, out_ptr, numel, row_bytes, nb_row, total_blocks, seed,
                   BS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
                   SCALED: tl.constexpr, QMAX: tl.constexpr, MANT: tl.constexpr,
                   EMIN: tl.constexpr, HAS_RES: tl.constexpr, STOCHASTIC: tl.constexpr,
                   USE_RINT: tl.constexpr, LANES_P2: tl.constexpr):
    blk = tl.program_id(0) * G + tl.arange(0, G)
    blk_ok = blk < total_blocks
    row = (blk // nb_row).to(tl.int64)
    jb = blk % nb_row
    # 4-bit codecs split each block into even/odd halves that share a byte. Lanes are padded to
    # a power of two (tl.arange needs one) so any even block size works.
    LANES: tl.constexpr = BS // 2 if BITS == 4 else BS
    STEP: tl.constexpr = 2 if BITS == 4 else 1
    lane = tl.arange(0, LANES_P2)[None, :]
    col = jb[:, None] * BS + STEP * lane  # [G, LANES_P2]
    m0 = blk_ok[:, None] & (lane < LANES) & (col < numel)
    off0 = row[:, None] * numel + col
    y0 = tl.load(x_ptr + off0, mask=m0, other=0.0)
    if HAS_RES:
        y0 = y0 + tl.load(res_ptr + off0, mask=m0, other=0.0)
    if BITS == 4:
        m1 = blk_ok[:, None] & (lane < LANES) & (col + 1 < numel)
        y1 = tl.load(x_ptr + off0 + 1, mask=m1, other=0.0)
        if HAS_RES:
            y1 = y1 + tl.load(res_ptr + off0 + 1, mask=m1, other=0.0)
    data_base = row * row_bytes
    if SCALED:
        amax = tl.max(tl.abs(y0), axis=1)
        if BITS == 4:
            amax = tl.maximum(amax, tl.max(tl.abs(y1), axis=1))
        # IEEE-rounded divisions (plain `/` may compile to an approximate one on CUDA).
        sbits = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
        sbits = (sbits.to(tl.uint32, bitcast=True) + 0xFFFF) >> 16
        scale = (sbits << 16).to(tl.float32, bitcast=True)  # bf16 rounded up: nothing clips
        inv = tl.where(scale > 0, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale),
                       0.0)
        sptr = out_ptr + data_base + 2 * jb
        tl.store(sptr, (sbits & 0xFF).to(tl.uint8), mask=blk_ok)
        tl.store(sptr + 1, (sbits >> 8).to(tl.uint8), mask=blk_ok)
        data_base = data_base + 2 * nb_row
        z0 = y0 * inv[:, None]
    else:
        z0 = y0
    code0 = _quantize(z0, off0, seed, KIND, BITS, QMAX, MANT, EMIN, STOCHASTIC, USE_RINT)
    if BITS == 8:
        tl.store(out_ptr + data_base[:, None] + col, code0.to(tl.uint8), mask=m0)
    elif BITS == 16:
        dptr = out_ptr + data_base[:, None] + 2 * col
        tl.store(dptr, (code0 & 0xFF).to(tl.uint8), mask=m0)
        tl.store(dptr + 1, (code0 >> 8).to(tl.uint8), mask=m0)
    else:
        z1 = y1 * inv[:, None]
        code1 = _quantize(z1, off0 + 1, seed, KIND, BITS, QMAX, MANT, EMIN, STOCHASTIC,
                          USE_RINT)
        tl.store(out_ptr + data_base[:, None] + col // 2, (code0 | (code1 << 4)).to(tl.uint8),
                 mask=m0)
    if HAS_RES:  # error feedback: keep what this encoding lost
        deq0 = _dequantize(code0, KIND, BITS, MANT, EMIN)
        if SCALED:
            deq0 = deq0 * scale[:, None]
        tl.store(res_ptr + off0, y0 - deq0, mask=m0)
        if BITS == 4:
            deq1 = _dequantize(code1, KIND, BITS, MANT, EMIN) * scale[:, None]
            tl.store(res_ptr + off0 + 1, y1 - deq1, mask=m1)


@triton.jit
def _load_vals(p_ptr, base, col, m, ok, jb, nb_row, BS: tl.constexpr, KIND: tl.constexpr,
               BITS: tl.constexpr, SCALED: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr):
    """Dequantized values of one payload row at columns `col` (even columns for 4-bit codecs,
    whose odd neighbours come back as the second result)."""
    if SCALED:
        s_lo = tl.load(p_ptr + base + 2 * jb, mask=ok, other=0).to(tl.uint32)
        s_hi = tl.load(p_ptr + base + 2 * jb + 1, mask=ok, other=0).to(tl.uint32)
        scale = ((s_lo | (s_hi << 8)) << 16).to(tl.float32, bitcast=True)[:, None]
        base = base + 2 * nb_row
    if BITS == 8:
        code = tl.load(p_ptr + base[:, None] + col, mask=m, other=0).to(tl.int32)
    elif BITS == 16:
        lo = tl.load(p_ptr + base[:, None] + 2 * col, mask=m, other=0).to(tl.int32)
        hi = tl.load(p_ptr + base[:, None] + 2 * col + 1, mask=m, other=0).to(tl.int32)
        code = lo | (hi << 8)
    else:
        byte = tl.load(p_ptr + base[:, None] + col // 2, mask=m, other=0).to(tl.int32)
        code = byte & 0xF
        code1 = byte >> 4
    v0 = _dequantize(code, KIND, BITS, MANT, EMIN)
    v1 = v0
    if BITS == 4:
        v1 = _dequantize(code1, KIND, BITS, MANT, EMIN) * scale
    if SCALED:
        v0 = v0 * scale
    return v0, v1


@triton.jit
def _decode_kernel(p_ptr, out_ptr, numel, row_bytes, nb_row, total_blocks, num_sum, alpha,
                   BS: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
                   SCALED: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                   ACCUMULATE: tl.constexpr, LANES_P2: tl.constexpr):
    blk = tl.program_id(0) * G + tl.arange(0, G)
    blk_ok = blk < total_blocks
    orow = (blk // nb_row).to(tl.int64)
    jb = blk % nb_row
    LANES: tl.constexpr = BS // 2 if BITS == 4 else BS
    STEP: tl.constexpr = 2 if BITS == 4 else 1
    lane = tl.arange(0, LANES_P2)[None, :]
    col = jb[:, None] * BS + STEP * lane
    m0 = blk_ok[:, None] & (lane < LANES) & (col < numel)
    m1 = blk_ok[:, None] & (lane < LANES) & (col + 1 < numel)
    # Sum in row order starting from row 0 itself (not 0.0 + row 0) to match the reference's -0.0.
    acc0, acc1 = _load_vals(p_ptr, orow * num_sum * row_bytes, col, m0, blk_ok, jb, nb_row, BS,
                            KIND, BITS, SCALED, MANT, EMIN)
    for s in range(1, num_sum):
        v0, v1 = _load_vals(p_ptr, (orow * num_sum + s) * row_bytes, col, m0, blk_ok, jb,
                            nb_row, BS, KIND, BITS, SCALED, MANT, EMIN)
        acc0 = acc0 + v0
        acc1 = acc1 + v1
    acc0 = acc0 * alpha
    acc1 = acc1 * alpha
    off0 = orow[:, None] * numel + col
    if ACCUMULATE:
        acc0 = tl.load(out_ptr + off0, mask=m0, other=0.0) + acc0
    tl.store(out_ptr + off0, acc0, mask=m0)
    if BITS == 4:
        if ACCUMULATE:
            acc1 = tl.load(out_ptr + off0 + 1, mask=m1, other=0.0) + acc1
        tl.store(out_ptr + off0 + 1, acc1, mask=m1)


def _launch_shape(spec: CodecSpec, numel: int, num_rows: int, block_size: int):
    bs = block_size if spec.scaled else _UNSCALED_BS
    nb_row = num_blocks(numel, bs)
    group = max(1, _TILE_ELEMS // triton.next_power_of_2(bs))
    total = num_rows * nb_row
    return bs, nb_row, group, total, (triton.cdiv(total, group),)


def _constexprs(spec: CodecSpec, bs: int, group: int) -> dict:
    lanes = bs // 2 if spec.bits == 4 else bs
    return dict(BS=bs, G=group, KIND=_KIND_ID[spec.kind], BITS=spec.bits, SCALED=spec.scaled,
                MANT=spec.mant_bits, EMIN=spec.min_exp, LANES_P2=triton.next_power_of_2(lanes))


def encode(spec: CodecSpec, x: Tensor, block_size: int, *, seed: Optional[int] = None,
           residual: Optional[Tensor] = None) -> Tensor:
    """Triton version of `kernels.reference.encode` (same arguments, same bytes)."""
    num_rows, numel = x.shape
    out = torch.empty(num_rows, row_nbytes(spec, numel, block_size), dtype=torch.uint8,
                      device=x.device)
    bs, nb_row, group, total, grid = _launch_shape(spec, numel, num_rows, block_size)
    res = residual if residual is not None else x  # unused pointer when HAS_RES is False
    _encode_kernel[grid](x, res, out, numel, out.shape[1], nb_row, total, seed or 0,
                         QMAX=float(spec.qmax) if spec.kind == "float" else int(spec.qmax),
                         HAS_RES=residual is not None, STOCHASTIC=seed is not None,
                         USE_RINT=_USE_RINT, enable_fp_fusion=False,
                         **_constexprs(spec, bs, group))
    return out


def decode(spec: CodecSpec, payload: Tensor, numel: int, block_size: int, *, num_sum: int = 1,
           alpha: float = 1.0, out: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
    """Triton version of `kernels.reference.decode` (same arguments, same values)."""
    num_out_rows = payload.shape[0] // num_sum
    if out is None:
        out = torch.empty(num_out_rows * numel, dtype=torch.float32, device=payload.device)
        accumulate = False
    bs, nb_row, group, total, grid = _launch_shape(spec, numel, num_out_rows, block_size)
    _decode_kernel[grid](payload, out, numel, payload.shape[1], nb_row, total, num_sum,
                         float(alpha), ACCUMULATE=accumulate, enable_fp_fusion=False,
                         **_constexprs(spec, bs, group))
    return out
