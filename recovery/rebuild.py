"""Rebuilding a stage's state from what the survivors hold.

State travels as "packages": a dict of tensors and plain values, serialised without pickle
(`recovery/packages.py`: a JSON header plus raw tensor bytes, so a crafted payload can only be
rejected, never run) and sent over the new generation's process group as a length + uint8
payload. Layer parameters are keyed positionally (`layers.<j>.<suffix>` with j the stage-local
index) so the neighbours' j-th layers can be averaged into the lost stage's j-th layer, whatever
their global indices.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Optional, Sequence

import torch

from kintsugi.parallel.transport import Transport

from . import packages
from .packages import PackageError

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
EPS = 1e-4  # CheckFree adds it to each gradient norm so two zero norms still average
# One stage's exact state (weights + AdamW moments) of the largest model a single host holds. The
# data plane is a private network (DESIGN.md); this only stops a garbled length from allocating.
MAX_PACKAGE_BYTES = 1 << 40


def to_positional(sd: Dict[str, torch.Tensor], layer_ids: Sequence[int]) -> Dict[str, torch.Tensor]:
    pos = {g: j for j, g in enumerate(sorted(layer_ids))}
    out = {}
    for k, v in sd.items():
        m = _LAYER.match(k)
        out[f"layers.{pos[int(m.group(1))]}.{m.group(2)}" if m else k] = v
    return out


def from_positional(sd: Dict[str, torch.Tensor], layer_ids: Sequence[int],
                    source_count: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Inverse of to_positional for a stage holding `layer_ids`. If the source stage had fewer layers
    (uneven partition), its layers are reused cyclically."""
    ids = sorted(layer_ids)
    out = {}
    n_src = source_count or len(ids)
    for j, g in enumerate(ids):
        prefix = f"layers.{j % n_src}."
        for k, v in sd.items():
            if k.startswith(prefix):
                out[f"layers.{g}.{k[len(prefix):]}"] = v
    for k, v in sd.items():
        if not k.startswith("layers."):
            out[k] = v
    return out


def checkfree_average(prev: Dict[str, torch.Tensor], nxt: Dict[str, torch.Tensor], w_prev: float,
                      w_next: float) -> Dict[str, torch.Tensor]:
    """W = (w_prev * W_prev + w_next * W_next) / (w_prev + w_next) for every layer tensor both hold.
    Computed in fp32 (the weights are norms + 1e-4, so the denominator is never zero)."""
    out = {}
    denom = w_prev + w_next
    for k, a in prev.items():
        if k in nxt and k.startswith("layers."):
            b = nxt[k]
            out[k] = ((w_prev * a.float() + w_next * b.float()) / denom).to(a.dtype)
    return out


def _finite(params: Dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values() if torch.is_tensor(v) and v.is_floating_point())


def checkfree_weight(grad_norm) -> float:
    """A neighbour's weight in the CheckFree average: its last (clipped) gradient norm plus EPS. A
    non-finite norm counts as zero (the EPS floor stays)."""
    g = float(grad_norm)
    return (g if math.isfinite(g) else 0.0) + EPS


def neighbour_average(tier: str, prev: dict, nxt: dict, num_layers: int) -> Dict[str, torch.Tensor]:
    """The lost stage's layers (positional, `num_layers` of them) from its two neighbours' source
    packages: weighted by `checkfree_weight` (tier "checkfree") or plainly ("average"). A neighbour
    holding non-finite weights is never averaged in (0 x NaN is NaN): the other one is copied. Both
    bad: ValueError, there is nothing sound to rebuild from."""
    ok = [_finite(p["params"]) for p in (prev, nxt)]
    if not any(ok):
        raise ValueError("both neighbours hold non-finite weights; no rebuild from them")
    n = range(num_layers)
    a = to_positional(from_positional(prev["params"], n, prev["layer_count"]), n)
    b = to_positional(from_positional(nxt["params"], n, nxt["layer_count"]), n)
    w_prev, w_next = ((checkfree_weight(prev["grad_norm"]), checkfree_weight(nxt["grad_norm"]))
                      if tier == "checkfree" else (1.0, 1.0))
    if not ok[0]:  # the bad side is replaced by the good one (weight 1): the result is the good one
        return checkfree_average(b, b, 1.0, w_next)
    if not ok[1]:
        return checkfree_average(a, a, w_prev, 1.0)
    return checkfree_average(a, b, w_prev, w_next)


def pack(obj) -> torch.Tensor:
    """`obj` (nested dicts / lists / tuples of tensors and plain values) as a 1-D uint8 tensor."""
    return packages.pack(obj)


def unpack(payload: torch.Tensor):
    """Inverse of `pack`; a malformed payload raises `PackageError` (a ValueError)."""
    return packages.unpack(payload)


def send_package(transport: Transport, obj, dst: int, tag: int) -> int:
    payload = pack(obj)
    transport.send(torch.tensor([payload.numel()], dtype=torch.int64), dst, tag, channel="rebuild")
    transport.send(payload, dst, tag + 1, channel="rebuild")
    transport.flush()
    return payload.numel()


def recv_package_sized(transport: Transport, src: int, tag: int):
    """(the package, its payload's size in bytes as it arrived)."""
    n = int(transport.recv((1,), src, tag, channel="rebuild", dtype=torch.int64).item())
    if not 0 < n <= MAX_PACKAGE_BYTES:  # a garbled length must not become a huge allocation
        raise PackageError(f"package length {n} from rank {src} is outside (0, {MAX_PACKAGE_BYTES}]")
    payload = transport.recv((n,), src, tag + 1, channel="rebuild", dtype=torch.uint8)
    return unpack(payload), n


def recv_package(transport: Transport, src: int, tag: int):
    return recv_package_sized(transport, src, tag)[0]
