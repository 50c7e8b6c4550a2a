"""Codec formats and payload layout shared by the Triton kernels and their torch reference.

A codec turns fp32 values into fixed-width codes. Block-scaled codecs ("int8", "fp8_e4m3", "int4",
"fp4_e3m0") divide the values into blocks of `block_size` consecutive elements, each with one scale,
``scale = round_up_to_bf16(max|x| / qmax)``; codes are the values divided by the scale, rounded to
the codec's grid. The scale is stored as bf16 rounded *up*, so no value overflows the grid and a
scale costs 2 bytes (int8 at block 256: 8.0625 bits per element, 3.97x fewer bytes than fp32; int4
at block 32: 4.5 bits, 7.1x). bf16 keeps fp32's exponent range, so tiny gradients do not flush to
zero as they would with fp16 scales.

Payload layout of one row of ``numel`` elements (rows are independent; the all-reduce encodes one
row per destination rank)::

    [scale of block 0: bf16 little-endian (2 bytes)] ... [scale of block nb-1] [codes]

Codes: 8-bit codecs one byte per element; 4-bit codecs two per byte (element 2i in the low nibble,
2i+1 in the high one); 16-bit codecs two bytes per element, little-endian. A partial last block is
padded with zeros that quantize to the code of 0.

Rounding: to the nearest grid point, ties to even, like a hardware cast (the fp8 and fp16 codes are
exactly what torch's casts give); stochastic rounding takes floor(v + u) with u uniform in [0, 1)
hashed from (element index, seed), which is unbiased. Grid steps are powers of two applied with
exact fp32 operations, so the kernel and the reference agree bit for bit. Rows whose scale would be
0 (all-zero blocks) encode as zeros. Non-finite inputs are not supported by the scaled codecs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CodecSpec:
    """The bit format of one codec (no block size: that is a codec parameter)."""

    name: str
    kind: str  # "raw" (fp32 bytes), "bf16" (bit rounding), "int" or "float" (grid rounding)
    bits: int  # bits per element in the payload
    scaled: bool  # one bf16 scale per block
    qmax: float = 0.0  # largest magnitude on the grid: int 127/7, float 448/64/65504
    mant_bits: int = 0  # float grids: mantissa bits
    min_exp: int = 0  # float grids: exponent of the smallest normal value

    @property
    def exp_bits(self) -> int:
        return self.bits - 1 - self.mant_bits


SPECS: dict[str, CodecSpec] = {
    "none": CodecSpec("none", "raw", 32, False),
    "bf16": CodecSpec("bf16", "bf16", 16, False),
    # Plain fp16 cast, values beyond 65504 saturate; no scale, so |x| < 6e-8 flushes to zero.
    "fp16": CodecSpec("fp16", "float", 16, False, qmax=65504.0, mant_bits=10, min_exp=-14),
    "int8": CodecSpec("int8", "int", 8, True, qmax=127.0),
    "fp8_e4m3": CodecSpec("fp8_e4m3", "float", 8, True, qmax=448.0, mant_bits=3, min_exp=-6),
    "int4": CodecSpec("int4", "int", 4, True, qmax=7.0),
    # E3M0: magnitudes {0, 1, 2, 4, ..., 64} x scale (code 0 is zero, code e is 2^(e-1)), as in
    # Streaming DiLoCo's 4-bit outer gradients.
    "fp4_e3m0": CodecSpec("fp4_e3m0", "float", 4, True, qmax=64.0, mant_bits=0, min_exp=0),
}

ALIASES = {"fp4": "fp4_e3m0", "fp8": "fp8_e4m3", "fp32": "none"}

# Multiplier of the per-element hash for stochastic rounding (golden ratio, odd).
HASH_MULT = 0x9E3779B1


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def scale_nbytes(spec: CodecSpec, numel: int, block_size: int) -> int:
    return 2 * num_blocks(numel, block_size) if spec.scaled else 0


def code_nbytes(spec: CodecSpec, numel: int) -> int:
    return -(-numel * spec.bits // 8)


def row_nbytes(spec: CodecSpec, numel: int, block_size: int) -> int:
    """Bytes of one encoded row of `numel` elements, scales included."""
    return scale_nbytes(spec, numel, block_size) + code_nbytes(spec, numel)


def check_block_size(block_size: int) -> None:
    # Even, so that 4-bit pairs never straddle a block and rows of whole blocks stay byte-aligned.
    if not isinstance(block_size, int) or block_size < 2 or block_size > 65536 or block_size % 2:
        raise ValueError(f"block_size={block_size} is invalid: use an even number between 2 and "
                         "65536 (powers of two such as 256 are fastest on GPUs)")
