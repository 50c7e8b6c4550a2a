"""The coordinator's state as one object: what it knows (membership, slots, generations, pending
rebuilds, committed steps, counters), persisted whole after every change and read back whole by a
restarted coordinator.

`CoordinatorState` lists every persisted field once; `to_json` / `from_json` walk the dataclass's
fields, so a new field is persisted by being declared (fields whose JSON differs from the value,
slot-keyed maps and the records below, have one codec in `_CODECS`). What only lives while the
process lives (clocks on the monotonic time, logs being read) is marked `persist: False`.

`Settings` is the part of the job the coordinator acts on, read once from the job's JSON: nothing
below reads the job dict by string keys. Where the state rests is recovery.state_store (a file in the
local mode, one key in etcd).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from .plan import CellPlan, Slot, parse_slot_key, slot_key

# --- the job, as the coordinator reads it ------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    replicas: int
    stages: int
    max_steps: int
    strategy: str
    diloco: bool
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    progress_timeout_s: float
    spare_wait_s: float
    init_timeout_s: float
    global_generations: bool
    checkpoints: bool              # recovery.checkpoint_every > 0 or strategy=checkpoint
    spares: int                    # faults.spares: the starting fleet is R x S + this
    rebalance: bool
    rebalance_every: int
    rebalance_min_gain: float
    n_layers: int
    layers_per_stage: Optional[Tuple[int, ...]]
    coordinator_addr: Optional[str]  # recovery.coordinator, shown in "add a worker" hints

    @classmethod
    def from_job(cls, job: dict) -> "Settings":
        par, rec, train = job["parallel"], job["recovery"], job["train"]
        lps = par.get("layers_per_stage")
        return cls(replicas=int(par["replicas"]), stages=int(par["stages"]), max_steps=int(train["max_steps"]),
                   strategy=str(rec["strategy"]), diloco=bool(job["diloco"]["enabled"]),
                   heartbeat_interval_s=float(rec["heartbeat_interval_s"]),
                   heartbeat_timeout_s=float(rec["heartbeat_timeout_s"]),
                   progress_timeout_s=float(rec.get("progress_timeout_s", 300.0)),
                   spare_wait_s=float(rec.get("spare_wait_s", 600.0)),
                   init_timeout_s=float(rec["init_timeout_s"]),
                   global_generations=rec.get("generations", "per_group") == "global",
                   checkpoints=bool(rec.get("checkpoint_every")) or rec["strategy"] == "checkpoint",
                   spares=int(job["faults"].get("spares", 0)), rebalance=bool(par.get("rebalance")),
                   rebalance_every=int(par.get("rebalance_every", 10)),
                   rebalance_min_gain=float(par.get("rebalance_min_gain", 0.1)),
                   n_layers=int(job["model"]["n_layers"]), layers_per_stage=tuple(lps) if lps else None,
                   coordinator_addr=rec.get("coordinator"))

    @property
    def stage_groups(self) -> bool:
        """Streaming DiLoCo across replicas: each stage has a group of its own for the outer syncs."""
        return self.diloco and self.replicas > 1

    def cell_replicas(self) -> Dict[int, List[int]]:
        """Cells: the replicas trained as one unit. Plain data-parallel couples them every step."""
        if self.replicas > 1 and not self.diloco:
            return {0: list(range(self.replicas))}
        return {r: [r] for r in range(self.replicas)}


# --- records -----------------------------------------------------------------------------------------
def _persisted(cls, obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.metadata.get("persist", True)}


def _runtime(default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"persist": False})
    return field(default=default, metadata={"persist": False})


@dataclass
class WorkerInfo:
    wid: str
    pid: int
    host: str
    machine: str
    hb: int = -1
    state: str = "spare"          # spare | active | dead | left
    slot: Optional[Slot] = None
    leaving: bool = False         # announced a notice (SIGTERM / Slurm warning / spot notice)
    leaving_since: Optional[float] = _runtime()  # when its notice reached this coordinator (monotonic)
    status: dict = field(default_factory=dict)  # the worker's last heartbeat record
    hb_changed: float = _runtime(factory=time.monotonic)

    def to_json(self) -> dict:
        return dict(_persisted(WorkerInfo, self), slot=list(self.slot) if self.slot else None)

    @classmethod
    def from_json(cls, d: dict) -> "WorkerInfo":
        return cls(**dict(d, slot=tuple(d["slot"]) if d.get("slot") else None))


@dataclass
class Loss:
    """A slot without its state: lost (no holder yet) or being rebuilt (holder assigned)."""
    detected_at: float            # wall clock, for the run record
    failed_at: float
    handed_off: bool              # its holder left with notice and hands its state over
    leaver: Optional[str]
    why: str
    step: int                     # the step training resumes at
    detected_mono: float = _runtime(factory=time.monotonic)

    def to_json(self) -> dict:
        return _persisted(Loss, self)

    @classmethod
    def from_json(cls, d: dict) -> "Loss":
        return cls(**d)


@dataclass
class Cell:
    index: int
    replicas: List[int]
    gen: int = -1
    plan: Optional[CellPlan] = None
    lost: Dict[Slot, Loss] = field(default_factory=dict)        # slots without a holder
    rebuilding: Dict[Slot, Loss] = field(default_factory=dict)  # holder assigned, state not yet there
    kicks: int = 0
    needs_plan: bool = False                                    # a re-plan that had to wait (a rollback)
    since: float = _runtime(factory=time.monotonic)             # last commit or publication
    committed_at: Optional[float] = _runtime()                  # last commit (monotonic): every stage was alive
    waiting_since: Optional[float] = _runtime()                 # lost slots wait for spares since
    diverging: bool = _runtime(False)

    def to_json(self) -> dict:
        d = _persisted(Cell, self)
        d.update(plan=self.plan.to_json() if self.plan else None,
                 lost={slot_key(s): v.to_json() for s, v in self.lost.items()},
                 rebuilding={slot_key(s): v.to_json() for s, v in self.rebuilding.items()},
                 waiting=self.waiting_since is not None)  # a restarted coordinator waits afresh
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Cell":
        d = dict(d)
        waiting = d.pop("waiting")
        cell = cls(**dict(d, plan=CellPlan.from_json(d["plan"]) if d.get("plan") else None,
                          lost={parse_slot_key(s): Loss.from_json(v) for s, v in d["lost"].items()},
                          rebuilding={parse_slot_key(s): Loss.from_json(v) for s, v in d["rebuilding"].items()}))
        cell.waiting_since = time.monotonic() if waiting else None
        return cell


# --- the state ----------------------------------------------------------------------------------------
@dataclass
class CoordinatorState:
    incarnation: int = 0
    version: int = 0
    started: bool = False
    port: int = 0
    run_id: Optional[str] = None
    t0: float = field(default_factory=time.time)
    workers: Dict[str, WorkerInfo] = field(default_factory=dict)
    slots: Dict[Slot, str] = field(default_factory=dict)
    cells: Dict[int, Cell] = field(default_factory=dict)
    stage_gen: Dict[int, int] = field(default_factory=dict)
    stage_members: Dict[int, Dict[str, int]] = field(default_factory=dict)
    ready: Dict[Slot, bool] = field(default_factory=dict)       # the holder has its state
    # Approximately rebuilt slots -> the step they resume at: no source for another rebuild until
    # their replica commits it (averaging from a guess would compound the error).
    unsettled: Dict[Slot, int] = field(default_factory=dict)
    committed: Dict[int, int] = field(default_factory=dict)     # replica -> last committed step
    totals: Dict[int, list] = field(default_factory=dict)       # replica -> its last commit vector
    layout: List[int] = field(default_factory=list)             # decoder layers per stage
    layout_version: int = 0
    rebuilds: List[dict] = field(default_factory=list)
    failures: int = 0
    publications: int = 0
    tokens: int = 0
    final_val: Optional[float] = None
    ckpt_counts: Dict[int, int] = field(default_factory=dict)   # step -> slots that wrote it
    latest_checkpoint: Optional[int] = None
    spares_needed: int = 0
    rebuilt_slots: int = 0        # slots given to spares by rebuilds: a launcher replaces each consumed spare
    rebuild_plans: int = 0        # generations published with a rebuild in them (fault injection keys on it)
    corpus: Optional[dict] = None
    bytes: Dict[str, int] = field(default_factory=dict)         # per channel, as last seen
    ended: Optional[str] = None   # finished | suspended | stopped: <why>; set by the final save
    store_restarts: int = 0       # restarts with an empty store after a flood (recovery.coordinator)
    tampering: Dict[str, int] = field(default_factory=dict)     # records dropped or repaired, by kind, all incarnations

    @classmethod
    def fresh(cls, settings: Settings, port: int, layout: List[int]) -> "CoordinatorState":
        return cls(port=port, layout=list(layout),
                   cells={i: Cell(i, reps) for i, reps in settings.cell_replicas().items()},
                   stage_gen={s: -1 for s in range(settings.stages)},
                   stage_members={s: {} for s in range(settings.stages)},
                   committed={r: -1 for r in range(settings.replicas)})

    def cell_of(self, replica: int) -> Cell:
        return next(c for c in self.cells.values() if replica in c.replicas)

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            enc = _CODECS.get(f.name, (None, None))[0]
            v = getattr(self, f.name)
            out[f.name] = enc(v) if enc else v
        return out

    @classmethod
    def from_json(cls, d: dict) -> "CoordinatorState":
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                dec = _CODECS.get(f.name, (None, None))[1]
                kwargs[f.name] = dec(d[f.name]) if dec else d[f.name]
        return cls(**kwargs)


def _by_slot(enc_v: Callable = lambda v: v, dec_v: Callable = lambda v: v):
    return (lambda m: {slot_key(s): enc_v(v) for s, v in m.items()},
            lambda m: {parse_slot_key(s): dec_v(v) for s, v in m.items()})


def _by_int(dec_v: Callable = lambda v: v):
    return (lambda m: {str(k): v for k, v in m.items()}, lambda m: {int(k): dec_v(v) for k, v in m.items()})


_CODECS: Dict[str, Tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "workers": (lambda m: {w: i.to_json() for w, i in m.items()},
                lambda m: {w: WorkerInfo.from_json(i) for w, i in m.items()}),
    "cells": (lambda m: {str(i): c.to_json() for i, c in m.items()},
              lambda m: {int(i): Cell.from_json(c) for i, c in m.items()}),
    "slots": _by_slot(), "ready": _by_slot(), "unsettled": _by_slot(),
    "stage_gen": _by_int(), "stage_members": _by_int(dict), "committed": _by_int(), "totals": _by_int(),
    "ckpt_counts": _by_int(),
}
