"""Error feedback: what a lossy encoding drops is added to the next send of the same buffer.

With it the error of a *sum over steps* stays bounded by one step's error instead of growing, so
time-averaged quantities (DiLoCo outer gradients, accumulated updates) converge to the exact ones.
The residual add, quantization and new residual come out of one kernel pass.
"""

from __future__ import annotations

from typing import Hashable, Optional

import torch
from torch import Tensor

from kintsugi.compression.codecs import Codec, as_fp32_rows

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Wraps a codec; same encode/decode interface, with one fp32 residual per key.

    Use one key per logical buffer (e.g. the fragment id); a key's residual has a fixed size.
    """

    def __init__(self, codec: Codec):
        if isinstance(codec, ErrorFeedback):
            raise ValueError("ErrorFeedback(codec) wraps a plain codec, not another ErrorFeedback")
        self.codec = codec
        self._residuals: dict[Hashable, Tensor] = {}

    @property
    def name(self) -> str:
        return self.codec.name

    @property
    def lossless(self) -> bool:
        return self.codec.lossless

    @property
    def block_size(self) -> int:
        return self.codec.block_size

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.codec!r}, keys={len(self._residuals)})"

    def encoded_nbytes(self, numel: int) -> int:
        return self.codec.encoded_nbytes(numel)

    def residual_buffer(self, key: Hashable, numel: int, device: torch.device) -> Tensor:
        """The residual for `key` (created as zeros on first use)."""
        r = self._residuals.get(key)
        if r is None:
            r = self._residuals[key] = torch.zeros(numel, dtype=torch.float32, device=device)
        elif r.numel() != numel:
            raise ValueError(f"error-feedback key {key!r} holds {r.numel()} elements but got "
                             f"{numel}: use a distinct key per buffer")
        return r

    def keys(self) -> list:
        """Keys holding a residual (tuples are the all-reduce's own, see `all_reduce`)."""
        return list(self._residuals)

    def residual(self, key: Hashable = None) -> Optional[Tensor]:
        return self._residuals.get(key)

    def reset(self, key: Hashable = None, *, all_keys: bool = False) -> None:
        """Forget the residual of `key` (or of every key), e.g. after a rebuild."""
        if all_keys:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def encode(self, x: Tensor, key: Hashable = None) -> Tensor:
        """Encode x + residual[key]; residual[key] becomes what this payload fails to carry."""
        r = self.residual_buffer(key, x.numel(), x.device)
        rows = as_fp32_rows(x)
        payload = self.codec.encode_rows(rows, seed=self.codec.next_seed(), residual=r.view(1, -1))
        return payload.view(-1)

    def decode(self, payload: Tensor, numel: int, out: Optional[Tensor] = None,
               accumulate: bool = False) -> Tensor:
        return self.codec.decode(payload, numel, out=out, accumulate=accumulate)

    def state_dict(self) -> dict:
        """Residuals (for checkpoints and hand-offs: they are part of the exact training state)."""
        return {"residuals": {k: v.clone() for k, v in self._residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._residuals = {k: v.clone().to(torch.float32) for k, v in state["residuals"].items()}
