"""Grid topology: which global layers each stage holds, and how (replica, stage) slots map to ranks
of one generation's process group."""
from __future__ import annotations

from typing import List, Optional, Tuple

Slot = Tuple[int, int]  # (replica, stage)


def per_stage_layers(num_layers: int, num_stages: int, counts: Optional[List[int]] = None) -> List[List[int]]:
    """Global layer indices held by each stage: explicit counts, or balanced with the extra layers
    given to the middle stages (the first holds the embedding and the last the head)."""
    if counts is None:
        base, extra = divmod(num_layers, num_stages)
        counts = [base] * num_stages
        # Middle stages first: the end stages already carry the embedding / head.
        order = sorted(range(num_stages), key=lambda s: (s in (0, num_stages - 1), s))
        for s in order[:extra]:
            counts[s] += 1
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def slot_name(slot: Slot) -> str:
    return f"r{slot[0]}s{slot[1]}"


def parse_slot(name: str) -> Slot:
    r, s = name[1:].split("s")
    return int(r), int(s)


class Grid:
    """The slots of one group: `replicas` x S. A group's rank of slot (r, s) is i*S + s where i is
    r's position in `replica_ids` (default 0..replicas-1), so every worker derives the same ranks
    from the plan without talking. A replica's own pipeline group is Grid(1, S, [r])."""

    def __init__(self, replicas: int, stages: int, replica_ids: Optional[List[int]] = None):
        self.replica_ids = list(replica_ids) if replica_ids is not None else list(range(replicas))
        if len(self.replica_ids) != replicas:
            raise ValueError(f"{replicas} replicas but replica_ids={replica_ids}")
        self.replicas, self.stages = replicas, stages
        self._index = {r: i for i, r in enumerate(self.replica_ids)}

    @property
    def world_size(self) -> int:
        return self.replicas * self.stages

    def rank(self, slot: Slot) -> int:
        return self._index[slot[0]] * self.stages + slot[1]

    def slot(self, rank: int) -> Slot:
        i, s = divmod(rank, self.stages)
        return self.replica_ids[i], s

    def slots(self) -> List[Slot]:
        return [(r, s) for r in self.replica_ids for s in range(self.stages)]

    def pipeline_ranks(self, replica: int) -> List[int]:
        return [self.rank((replica, s)) for s in range(self.stages)]

    def stage_ranks(self, stage: int) -> List[int]:
        return [self.rank((r, stage)) for r in self.replica_ids]
