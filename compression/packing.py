"""Many tensors in one flat fp32 buffer, so that one codec launch and one collective serve them all.

Block scales then run across tensor boundaries: a 1-D tensor of 1000 elements costs the same bytes
per element as a 10^8-element matrix. `align` can start each tensor on a block boundary instead
(useful when neighbouring tensors differ wildly in magnitude), at the price of padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["PackMeta", "pack", "unpack", "unpack_into"]


@dataclass(frozen=True)
class PackMeta:
    """Where each tensor lives in the flat buffer."""

    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    numel: int  # elements used, padding between tensors included, trailing padding excluded

    def __len__(self) -> int:
        return len(self.shapes)


def _check(tensors: Sequence[Tensor]) -> None:
    if not tensors:
        return
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise ValueError(f"tensor {i} has dtype {t.dtype}: only float tensors can be packed")
        if t.device != device:
            raise ValueError(f"tensor {i} is on {t.device}, tensor 0 on {device}: pack tensors of "
                             "one device per call")


def pack(tensors: Sequence[Tensor], align: int = 1, pad_to: int = 1) -> tuple[Tensor, PackMeta]:
    """Copy tensors into one flat fp32 buffer; returns (flat, meta).

    Each tensor starts at a multiple of `align` elements; the buffer length is rounded up to a
    multiple of `pad_to`. Padding is zero. fp32, bf16 and fp16 tensors round-trip exactly.
    """
    if align < 1 or pad_to < 1:
        raise ValueError(f"align={align} and pad_to={pad_to} must be >= 1")
    _check(tensors)
    offsets, pos = [], 0
    for t in tensors:
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += t.numel()
    total = -(-pos // pad_to) * pad_to
    device = tensors[0].device if tensors else torch.device("cpu")
    meta = PackMeta(tuple(t.shape for t in tensors), tuple(t.dtype for t in tensors),
                    tuple(offsets), pos)
    if align == 1 and tensors:  # one cat, no zero-fill of the used part
        flat = torch.empty(total, dtype=torch.float32, device=device)
        torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors], out=flat[:pos])
        flat[pos:].zero_()
        return flat, meta
    flat = torch.zeros(total, dtype=torch.float32, device=device)
    for t, off in zip(tensors, offsets):
        flat[off : off + t.numel()].copy_(t.detach().reshape(-1))
    return flat, meta


def unpack(flat: Tensor, meta: PackMeta) -> list[Tensor]:
    """Tensors of the original shapes and dtypes; fp32 ones are views of `flat` (no copy)."""
    out = []
    for shape, dtype, off in zip(meta.shapes, meta.dtypes, meta.offsets):
        n = shape.numel()
        out.append(flat[off : off + n].view(shape).to(dtype))
    return out


def unpack_into(flat: Tensor, meta: PackMeta, tensors: Sequence[Tensor]) -> None:
    """Copy the buffer back into `tensors` in place (casting to their dtypes)."""
    if len(tensors) != len(meta):
        raise ValueError(f"{len(tensors)} tensors given for a pack of {len(meta)}")
    with torch.no_grad():
        for t, shape, off in zip(tensors, meta.shapes, meta.offsets):
            t.copy_(flat[off : off + shape.numel()].view(shape))
