"""The plans the coordinator publishes, as typed objects with strict JSON in and out.

A `CellPlan` is one generation of a cell (the replicas trained as one unit): who holds which slot,
each worker's rank in the cell's group, the slots to rebuild and from where (`RebuildEntry`), a
rollback to restore (`Rollback`), a divergence to answer (`Divergence`), and the layer layout. A
`SuspendPlan` asks every holder to save its committed state and stop; a `DonateRequest` (mail to one
worker) asks a peer replica's holder for a snapshot of its stage.

Everything that crosses the store is built here and read back here: `from_json` checks every field's
presence and type and refuses unknown keys (`PlanError`, a ValueError), so no code outside this
module indexes a plan by string, and a malformed (or forged-but-sealed) plan fails in one place with
a message naming the field. Slots are `(replica, stage)` tuples in Python and "r,s" keys in JSON.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

Slot = Tuple[int, int]
TIERS = ("handoff", "peer", "checkfree", "checkfree_plus", "copy", "average", "random", "checkpoint")


class PlanError(ValueError):
    """A plan whose JSON is missing a field, has one of the wrong type, or has one it should not."""


def slot_key(slot: Slot) -> str:
    return f"{slot[0]},{slot[1]}"


def parse_slot_key(key: str) -> Slot:
    r, s = key.split(",")
    return int(r), int(s)


# --- strict readers ---------------------------------------------------------------------------------
def _fields(d: Any, what: str, required: Tuple[str, ...], optional: Tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(d, dict):
        raise PlanError(f"{what}: expected an object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    unknown = [k for k in d if k not in required and k not in optional]
    if missing or unknown:
        raise PlanError(f"{what}: missing {missing} / unknown {unknown}")
    return d


def _int(v: Any, what: str) -> int:
    if type(v) is not int:
        raise PlanError(f"{what}: expected an integer, got {v!r}")
    return v


def _num(v: Any, what: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise PlanError(f"{what}: expected a finite number, got {v!r}")
    return float(v)


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise PlanError(f"{what}: expected a string, got {v!r}")
    return v


def _opt(v: Any, read, what: str):
    return None if v is None else read(v, what)


def _slot(v: Any, what: str) -> Slot:
    if isinstance(v, str):
        try:
            return parse_slot_key(v)
        except ValueError:
            raise PlanError(f"{what}: {v!r} is not a slot key 'replica,stage'") from None
    if isinstance(v, list) and len(v) == 2:
        return _int(v[0], what), _int(v[1], what)
    raise PlanError(f"{what}: expected a slot [replica, stage], got {v!r}")


def _ints(v: Any, what: str) -> List[int]:
    if not isinstance(v, list):
        raise PlanError(f"{what}: expected a list of integers, got {v!r}")
    return [_int(x, what) for x in v]


def _strs(v: Any, what: str) -> List[str]:
    if not isinstance(v, list):
        raise PlanError(f"{what}: expected a list of strings, got {v!r}")
    return [_str(x, what) for x in v]


def _int_keys(v: Any, read, what: str) -> Dict[int, Any]:
    if not isinstance(v, dict):
        raise PlanError(f"{what}: expected an object, got {v!r}")
    try:
        return {int(k): read(x, f"{what}[{k}]") for k, x in v.items()}
    except ValueError as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"{what}: keys must be integers") from None


# --- the parts of a cell plan ---------------------------------------------------------------------
@dataclass(frozen=True)
class RebuildEntry:
    """How one slot is rebuilt in this generation: the tier, the slots it takes state from, when
    the loss happened and was detected (wall clock, for the run record), the step training resumes
    at, and for a handoff the leaving worker, for a peer rebuild the donor and its transfer group."""
    tier: str
    sources: Tuple[Slot, ...] = ()
    detected_at: float = 0.0
    failed_at: float = 0.0
    step: int = 0
    leaver: Optional[str] = None
    donor: Optional[str] = None
    xfer: Optional[str] = None

    def to_json(self) -> dict:
        return {"tier": self.tier, "sources": [list(s) for s in self.sources], "detected_at": self.detected_at,
                "failed_at": self.failed_at, "step": self.step, "leaver": self.leaver, "donor": self.donor,
                "xfer": self.xfer}

    @classmethod
    def from_json(cls, d: Any, what: str = "rebuild entry") -> "RebuildEntry":
        d = _fields(d, what, ("tier", "sources", "detected_at", "failed_at", "step", "leaver", "donor", "xfer"))
        tier = _str(d["tier"], f"{what}.tier")
        if tier not in TIERS:
            raise PlanError(f"{what}.tier: {tier!r} is not one of {TIERS}")
        if not isinstance(d["sources"], list):
            raise PlanError(f"{what}.sources: expected a list of slots")
        return cls(tier, tuple(_slot(s, f"{what}.sources") for s in d["sources"]),
                   _num(d["detected_at"], f"{what}.detected_at"), _num(d["failed_at"], f"{what}.failed_at"),
                   _int(d["step"], f"{what}.step"), _opt(d["leaver"], _str, f"{what}.leaver"),
                   _opt(d["donor"], _str, f"{what}.donor"), _opt(d["xfer"], _str, f"{what}.xfer"))


@dataclass(frozen=True)
class Rollback:
    """Every slot of the cell restores its checkpoint of a step: one step everywhere for an in-run
    rollback, each replica its own step on a resume (a suspended job's replicas commit on their own)."""
    steps: Dict[int, int]

    def step_for(self, replica: int) -> int:
        return self.steps[replica]

    def to_json(self) -> dict:
        return {"steps": {str(r): k for r, k in sorted(self.steps.items())}}

    @classmethod
    def from_json(cls, d: Any, what: str = "rollback") -> "Rollback":
        d = _fields(d, what, ("steps",))
        return cls(_int_keys(d["steps"], _int, f"{what}.steps"))


@dataclass(frozen=True)
class Divergence:
    """The answer to train.max_nonfinite skipped steps in a row: a fresh inner optimizer, the
    learning rate times `lr_factor`, and under Streaming DiLoCo a restart from the outer global copy.
    `id` makes it apply once per worker however often the plan is re-read."""
    id: str
    lr_factor: float
    reset_to_global: bool = False

    def to_json(self) -> dict:
        return {"id": self.id, "lr_factor": self.lr_factor, "reset_to_global": self.reset_to_global}

    @classmethod
    def from_json(cls, d: Any, what: str = "divergence") -> "Divergence":
        d = _fields(d, what, ("id", "lr_factor", "reset_to_global"))
        if not isinstance(d["reset_to_global"], bool):
            raise PlanError(f"{what}.reset_to_global: expected true or false")
        return cls(_str(d["id"], f"{what}.id"), _num(d["lr_factor"], f"{what}.lr_factor"), d["reset_to_global"])


# --- the cell plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellPlan:
    cell: int
    gen: int
    replicas: Tuple[int, ...]
    slots: Dict[Slot, str]                 # slot -> the worker holding it in this generation
    ranks: Dict[str, int]                  # worker -> its rank in the cell's group (leavers included)
    rebuild: Dict[Slot, RebuildEntry] = field(default_factory=dict)
    leavers: Tuple[str, ...] = ()          # workers that join only to hand their state over
    rollback: Optional[Rollback] = None
    layout: Tuple[int, ...] = ()           # decoder layers per stage
    prev_layout: Optional[Tuple[int, ...]] = None  # set when this generation moves layers
    layout_version: int = 0
    committed: Dict[int, int] = field(default_factory=dict)  # replica -> the step the coordinator recorded
    published_at: float = 0.0
    diverged: Optional[Divergence] = None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def slot_of(self, wid: str) -> Optional[Slot]:
        return next((s for s, w in self.slots.items() if w == wid), None)

    def wid_of_rank(self, rank: int) -> Optional[str]:
        return next((w for w, r in self.ranks.items() if r == rank), None)

    def committed_floor(self) -> int:
        """The highest step the coordinator recorded for any replica of the cell (-1: none)."""
        return max((self.committed.get(r, -1) for r in self.replicas), default=-1)

    def to_json(self) -> dict:
        return {"cell": self.cell, "gen": self.gen, "replicas": list(self.replicas),
                "slots": {slot_key(s): w for s, w in sorted(self.slots.items())},
                "ranks": dict(sorted(self.ranks.items(), key=lambda kv: kv[1])),
                "rebuild": {slot_key(s): e.to_json() for s, e in sorted(self.rebuild.items())},
                "leavers": list(self.leavers), "rollback": self.rollback.to_json() if self.rollback else None,
                "layout": list(self.layout), "prev_layout": list(self.prev_layout) if self.prev_layout else None,
                "layout_version": self.layout_version,
                "committed": {str(r): k for r, k in sorted(self.committed.items())},
                "published_at": self.published_at,
                "diverged": self.diverged.to_json() if self.diverged else None}

    @classmethod
    def from_json(cls, d: Any) -> "CellPlan":
        what = "cell plan"
        d = _fields(d, what, ("cell", "gen", "replicas", "slots", "ranks", "rebuild", "leavers", "rollback", "layout",
                              "prev_layout", "layout_version", "committed", "published_at", "diverged"))
        if not isinstance(d["slots"], dict) or not isinstance(d["ranks"], dict) or not isinstance(d["rebuild"], dict):
            raise PlanError(f"{what}: slots, ranks and rebuild must be objects")
        plan = cls(cell=_int(d["cell"], "cell"), gen=_int(d["gen"], "gen"),
                   replicas=tuple(_ints(d["replicas"], "replicas")),
                   slots={_slot(k, "slots"): _str(w, "slots") for k, w in d["slots"].items()},
                   ranks={_str(w, "ranks"): _int(r, "ranks") for w, r in d["ranks"].items()},
                   rebuild={_slot(k, "rebuild"): RebuildEntry.from_json(e, f"rebuild[{k}]")
                            for k, e in d["rebuild"].items()},
                   leavers=tuple(_strs(d["leavers"], "leavers")),
                   rollback=None if d["rollback"] is None else Rollback.from_json(d["rollback"]),
                   layout=tuple(_ints(d["layout"], "layout")),
                   prev_layout=None if d["prev_layout"] is None else tuple(_ints(d["prev_layout"], "prev_layout")),
                   layout_version=_int(d["layout_version"], "layout_version"),
                   committed=_int_keys(d["committed"], _int, "committed"),
                   published_at=_num(d["published_at"], "published_at"),
                   diverged=None if d["diverged"] is None else Divergence.from_json(d["diverged"]))
        if sorted(plan.ranks.values()) != list(range(len(plan.ranks))):
            raise PlanError(f"{what}: ranks must be 0..{len(plan.ranks) - 1}, got {sorted(plan.ranks.values())}")
        return plan


# --- suspend and mail ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuspendPlan:
    """Every holder saves its last committed state and stops; `lost` slots are rebuilt on resume."""
    holders: Dict[Slot, str]
    lost: Tuple[Slot, ...] = ()

    def to_json(self) -> dict:
        return {"holders": {slot_key(s): w for s, w in sorted(self.holders.items())},
                "lost": [list(s) for s in self.lost]}

    @classmethod
    def from_json(cls, d: Any) -> "SuspendPlan":
        d = _fields(d, "suspend plan", ("holders", "lost"))
        if not isinstance(d["holders"], dict) or not isinstance(d["lost"], list):
            raise PlanError("suspend plan: holders must be an object and lost a list")
        return cls({_slot(k, "holders"): _str(w, "holders") for k, w in d["holders"].items()},
                   tuple(_slot(s, "lost") for s in d["lost"]))


@dataclass(frozen=True)
class DonateRequest:
    """Mail to a peer replica's holder of `source`: serve a snapshot of it over the two-rank group
    `xfer` to `target` (the worker rebuilding `slot`). `gen`: the target cell's generation, when the
    request belongs to one (test dumps are named after it)."""
    xfer: str
    target: str
    slot: Slot
    source: Slot
    gen: Optional[int] = None

    KIND = "donate"

    def to_json(self) -> dict:
        return {"kind": self.KIND, "xfer": self.xfer, "target": self.target, "slot": list(self.slot),
                "source": list(self.source), "gen": self.gen}

    @classmethod
    def from_json(cls, d: Any) -> "DonateRequest":
        d = _fields(d, "donate request", ("kind", "xfer", "target", "slot", "source", "gen"))
        return cls(_str(d["xfer"], "xfer"), _str(d["target"], "target"), _slot(d["slot"], "slot"),
                   _slot(d["source"], "source"), _opt(d["gen"], _int, "gen"))


def mail_kind(d: Any) -> Optional[str]:
    """The kind of a mail record (donate, poison, crash_in_commit), or None if it has none."""
    return d.get("kind") if isinstance(d, dict) and isinstance(d.get("kind"), str) else None
