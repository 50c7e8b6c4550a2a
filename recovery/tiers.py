"""Rebuild planning: for each slot that lost its worker, which tier rebuilds it and from where.

Pure functions of the membership picture, so they are unit-tested without processes. Tiers, cheapest
exact source first (DESIGN.md): handoff > peer > checkfree > checkfree_plus > checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

Slot = Tuple[int, int]


class Unrecoverable(RuntimeError):
    """No tier can rebuild the lost slots; the message says why and what would have helped."""


@dataclass
class RebuildPlan:
    tier: str
    sources: List[Slot] = field(default_factory=list)

    def to_json(self):
        return {"tier": self.tier, "sources": [list(s) for s in self.sources]}


def _neighbours(stage: int, num_stages: int) -> List[int]:
    return [s for s in (stage - 1, stage + 1) if 0 <= s < num_stages]


def swap_partner(stage: int, num_stages: int) -> Optional[int]:
    from kintsugi.parallel.schedules import swap_partners  # one definition of the CheckFree+ pairing
    return swap_partners(num_stages).get(stage)


def plan_rebuilds(lost: Sequence[Slot], num_replicas: int, num_stages: int, strategy: str,
                  handed_off: Set[Slot] = frozenset(), diloco: bool = False,
                  have_checkpoint: bool = False, unsettled: Set[Slot] = frozenset(),
                  targets: Optional[Sequence[Slot]] = None) -> Dict[Slot, RebuildPlan]:
    """Map each lost slot (or only `targets`, a subset: one cell's slots, while the others' losses
    still count as missing sources) to a RebuildPlan. Sources are always slots that were NOT lost and
    are not `unsettled` (approximately rebuilt and not yet through a committed step): averaging from
    a guess would compound the error, so such a neighbour counts as missing."""
    lost_set = set(lost)
    alive = lambda slot: slot not in lost_set and slot not in unsettled  # noqa: E731
    plans: Dict[Slot, RebuildPlan] = {}
    for slot in sorted(lost_set if targets is None else set(targets)):
        r, s = slot
        plans[slot] = _plan_one(r, s, num_replicas, num_stages, strategy, alive, slot in handed_off,
                                diloco, have_checkpoint)
    if any(p.tier == "checkpoint" for p in plans.values()):
        # A rollback is global: every slot restores the checkpoint, so one plan covers them all.
        return {slot: RebuildPlan("checkpoint") for slot in plans}
    return plans


def _plan_one(r, s, R, S, strategy, alive, handed_off, diloco, have_checkpoint) -> RebuildPlan:
    nbrs = [(r, n) for n in _neighbours(s, S)]
    if strategy == "none":
        return RebuildPlan("random")
    if strategy == "random":
        return RebuildPlan("random")
    if strategy == "checkpoint":
        if not have_checkpoint:
            raise Unrecoverable(f"slot (replica {r}, stage {s}) lost before any checkpoint was complete (not "
                                "even the initial one, written as step 0 starts); nothing to roll back to")
        return RebuildPlan("checkpoint")
    if strategy == "copy":
        src = [n for n in nbrs if alive(n)]
        if not src:
            raise Unrecoverable(f"stage {s} of replica {r} lost together with its neighbours; nothing to copy")
        return RebuildPlan("copy", [src[0]])
    if strategy == "average":
        if len(nbrs) == 2 and all(alive(n) for n in nbrs):
            return RebuildPlan("average", nbrs)
        return _copy_or_fail(r, s, nbrs, alive)
    if strategy in ("checkfree", "checkfree_plus"):
        plan = _checkfree(r, s, S, nbrs, alive, plus=(strategy == "checkfree_plus"))
        if plan:
            return plan
        raise Unrecoverable(_adjacent_msg(r, s, nbrs, alive))
    # tiered: the cascade, cheapest exact source first.
    if handed_off:
        return RebuildPlan("handoff")
    if diloco:
        peers = [(q, s) for q in range(R) if q != r and alive((q, s))]
        if peers:
            return RebuildPlan("peer", [peers[0]])
    plan = _checkfree(r, s, S, nbrs, alive, plus=True)
    if plan:
        return plan
    if have_checkpoint:
        return RebuildPlan("checkpoint")
    raise Unrecoverable(_adjacent_msg(r, s, nbrs, alive) + "; enable recovery.checkpoint_every or "
                        "run parallel.replicas>=2 with diloco.enabled=true for an exact source")


def _checkfree(r, s, S, nbrs, alive, plus: bool) -> Optional[RebuildPlan]:
    if 0 < s < S - 1:
        if all(alive(n) for n in nbrs):
            return RebuildPlan("checkfree", nbrs)
        return None
    if S == 1:
        return None
    # First / last stage: copy the swap partner (CheckFree+ trains it to stand in); the embedding
    # or head comes from the copy kept on the neighbouring stage.
    partner = swap_partner(s, S)
    if partner is None:  # 3 stages: the last stage has no partner; its neighbour is the best we have
        partner = s - 1 if s == S - 1 else s + 1
    if alive((r, partner)):
        return RebuildPlan("checkfree_plus" if plus else "copy", [(r, partner)])
    return None


def _copy_or_fail(r, s, nbrs, alive) -> RebuildPlan:
    src = [n for n in nbrs if alive(n)]
    if not src:
        raise Unrecoverable(f"stage {s} of replica {r} lost together with its neighbours")
    return RebuildPlan("copy", [src[0]])


def _adjacent_msg(r, s, nbrs, alive) -> str:
    dead = [n[1] for n in nbrs if not alive(n)]
    return (f"stage {s} of replica {r} cannot be rebuilt from its neighbours: adjacent stage(s) {dead} "
            "were lost at the same time, and averaging from a rebuilt neighbour would compound the error")
