"""Reading the token cache: `load_tokens` (a memmap of train.bin / val.bin), each replica's
deterministic stream of batches, and the validation batches.

`ShardedBatches.batch_at(k)` is a pure function of k and the cursor advances only when a step
commits, so a retried step, a rebuilt worker or a resumed run sees exactly the same samples.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch


def load_tokens(path: str, dtype) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


# ---- batches --------------------------------------------------------------------------------

class ShardedBatches:
    """A replica's deterministic stream of (inputs, targets) batches over a flat token array.

    Sequence i is tokens[i*seq_len : i*seq_len + seq_len + 1]; it belongs to replica
    i % num_replicas. Each epoch visits the replica's sequences in a permutation seeded by
    (seed, epoch, replica) and drops the remainder that does not fill a batch.
    """

    def __init__(self, tokens, seq_len: int, batch_size: int, replica: int = 0, num_replicas: int = 1, seed: int = 0):
        if not 0 <= replica < num_replicas:
            raise ValueError(f"replica={replica}: must be in [0, parallel.replicas={num_replicas})")
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size}: must be >= 1")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.replica, self.num_replicas, self.seed = replica, num_replicas, seed
        self.num_sequences = max(0, (len(tokens) - 1) // seq_len)
        self.local_ids = np.arange(replica, self.num_sequences, num_replicas, dtype=np.int64)
        self.batches_per_epoch = len(self.local_ids) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"data.seq_len={seq_len}: replica {replica} has {len(self.local_ids)} sequences, fewer than one batch of {batch_size}; lower data.seq_len or the batch size, or use more data")
        self.position = 0
        self.consumed = None
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # memo only; the value depends on epoch alone
            rng = np.random.default_rng([self.seed, epoch, self.replica])
            self._perm, self._perm_epoch = rng.permutation(len(self.local_ids)), epoch
        return self._perm

    def batch_ids(self, k: int) -> List[int]:
        """Global sequence indices of the k-th batch this replica consumes."""
        epoch, j = divmod(k, self.batches_per_epoch)
        perm = self._permutation(epoch)
        return self.local_ids[perm[j * self.batch_size:(j + 1) * self.batch_size]].tolist()

    def batch_at(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        ids = self.batch_ids(k)
        self.consumed = (k, list(ids))  # what was actually read, for the commit record
        return _gather(self.tokens, ids, self.seq_len)

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The batch of the step in progress; call `advance()` once that step commits."""
        return self.batch_at(self.position)

    def advance(self) -> None:
        self.position += 1

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def _identity(self) -> dict:
        return dict(seed=self.seed, replica=self.replica, num_replicas=self.num_replicas,
                    seq_len=self.seq_len, batch_size=self.batch_size, num_sequences=self.num_sequences)

    def state_dict(self) -> dict:
        return dict(self._identity(), position=self.position)

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"data cursor was saved with different settings {mismatched} (saved, current); restore with the same data and batch settings")
        self.position = int(state["position"])


def _gather(tokens, ids: List[int], seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1]) for i in ids])
    windows = torch.from_numpy(windows.astype(np.int64))  # (B, T+1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def val_batches(tokens, seq_len: int, batch_size: int, max_batches: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Up to max_batches (0 = all) full batches of sequences spread evenly over the val tokens;
    one smaller batch if there are fewer sequences than batch_size. Same on every process."""
    num_seqs = max(0, (len(tokens) - 1) // seq_len)
    if num_seqs == 0:
        raise ValueError(f"data.seq_len={seq_len}: the validation split has {len(tokens)} tokens, less than one sequence; raise data.val_fraction or lower data.seq_len")
    num_batches = max(1, num_seqs // batch_size)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    total = min(num_seqs, num_batches * batch_size)
    ids = (np.arange(total) * num_seqs // total).tolist()  # evenly spread, distinct
    return [_gather(tokens, ids[i:i + batch_size], seq_len) for i in range(0, total, batch_size)]
