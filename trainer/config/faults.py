"""Injected faults: the `faults.*` config (what the local launcher does to real processes) and the
list of events a run injects, computed the same way by the launcher and by every worker.

A slot event (`{step, replica, stage, kind}`) hits the worker holding that slot at the start of
`step` (see `held_at_boundary`); a machine event (`{step, machine, kind}`) every worker labelled with
that machine; a coordinator event the coordinator process; `on: rebuild` fires as soon as a
generation that rebuilds something is published after `step` was reached.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, List

from kintsugi.trainer.config.errors import check as _check, choice as _choice, seconds as _seconds


@dataclass
class FaultsConfig:
    # [{step, replica, stage, kind}] or [{step, machine, kind}] or [{step, target: coordinator, kind}]:
    # a machine event hits every worker labelled with that machine (launcher.machines), spares
    # included; a coordinator event signals the coordinator process. Machine and coordinator events
    # are moved to their own lists at construction, so `schedule` keeps its per-slot meaning.
    # Failures during a recovery: `on: rebuild` fires the event as soon as a generation that rebuilds
    # something is published after `step` was reached (a slot event then hits whoever holds the slot
    # in that generation: the incoming spare for the slot being rebuilt), `delay_s` after it.
    schedule: List[Dict[str, Any]] = field(default_factory=list)
    machine_schedule: List[Dict[str, Any]] = field(default_factory=list)  # [{step, machine, kind}]
    coordinator_schedule: List[Dict[str, Any]] = field(default_factory=list)  # [{step, kind, on?, delay_s?}]
    rate_per_hour: float = 0.0
    step_time_s: float = 90.0       # the step time the hourly rate is converted with (paper: ~90 s)
    seed: int = 0
    spares: int = 1                 # workers started up front and waiting in the pool
    respawn: bool = True            # start a new spare whenever one is consumed (not for machine losses)
    demo: bool = False              # two kills placed relative to the run (the default job's show)
    rejoin_delay_s: float = 0.0     # a preempted machine's replacement joins this long after the event
    notice_s: float = 30.0          # machine `term`: processes still alive this long after it are SIGKILLed

    # poison: the slot's weights turn NaN (a memory fault, a bad update); crash_in_commit: a chain root
    # SIGKILLs itself inside its next commit, after publishing the step and before recording it.
    KINDS = ("kill", "stop", "term", "poison", "crash_in_commit")

    def __post_init__(self):
        slot_events = []
        machine_events = [(f"faults.machine_schedule[{i}]", dict(e)) for i, e in enumerate(self.machine_schedule)]
        coordinator_events = [dict(e, target="coordinator") for e in self.coordinator_schedule]
        for i, e in enumerate(dict(e) for e in self.schedule):
            _check(e.get("on") in (None, "rebuild"), f"faults.schedule[{i}].on={e.get('on')!r} is not valid; "
                                                     "use on: rebuild (or leave it out)")
            _seconds(f"faults.schedule[{i}].delay_s", e.get("delay_s", 0), allow_zero=True)
            if e.get("target") in ("spare", "stopped"):
                unknown = set(e) - {"step", "kind", "target"}
                _check(not unknown, f"faults.schedule[{i}] targets {e['target']} but has {sorted(unknown)}; use step, kind")
                e.setdefault("kind", "kill" if e["target"] == "spare" else "cont")
                _choice(f"faults.schedule[{i}].kind", e["kind"],
                        ("kill", "stop", "term") if e["target"] == "spare" else ("cont",))
                coordinator_events.append(e)
                continue
            if e.get("target") == "coordinator":
                unknown = set(e) - {"step", "kind", "on", "delay_s", "target"}
                _check(not unknown, f"faults.schedule[{i}] targets the coordinator but has {sorted(unknown)}; "
                                    "use step, kind, on, delay_s")
                _check(isinstance(e.get("step"), int) and e["step"] >= 0, f"faults.schedule[{i}] needs step >= 0")
                e.setdefault("kind", "kill")
                _choice(f"faults.schedule[{i}].kind", e["kind"], self.KINDS)
                coordinator_events.append(e)
                continue
            _check(e.get("target", "slot") == "slot", f"faults.schedule[{i}].target={e.get('target')!r} is not "
                                                      "valid; use coordinator, spare or stopped (or leave it out)")
            e.pop("target", None)
            if "machine" in e:
                both = sorted({"replica", "stage"} & set(e))
                _check(not both, f"faults.schedule[{i}] names machine and {'/'.join(both)}; give either "
                                 "machine (a whole machine) or replica+stage (one slot), not both")
                machine_events.append((f"faults.schedule[{i}]", e))
                continue
            unknown = set(e) - {"step", "replica", "stage", "kind", "on", "delay_s"}
            _check(not unknown, f"faults.schedule[{i}] has unknown keys {sorted(unknown)}; "
                                "use step, replica, stage, kind, on, delay_s (or step, machine, kind)")
            _check("step" in e and "stage" in e, f"faults.schedule[{i}] needs step and stage (or step and machine)")
            e.setdefault("replica", 0)
            e.setdefault("kind", "kill")
            _choice(f"faults.schedule[{i}].kind", e["kind"], self.KINDS)
            slot_events.append(e)
        for key, e in machine_events:
            unknown = set(e) - {"step", "machine", "kind"}
            _check(not unknown, f"{key} has unknown keys {sorted(unknown)}; use step, machine, kind")
            _check("step" in e and "machine" in e, f"{key} needs step and machine")
            _check(isinstance(e["step"], int) and e["step"] >= 0, f"{key}.step={e['step']!r} must be an int >= 0")
            _check(isinstance(e["machine"], str) and e["machine"][:1] == "m" and e["machine"][1:].isdigit(),
                   f"{key}.machine={e['machine']!r} is not a machine id; use m0, m1, ... (launcher.machines)")
            e.setdefault("kind", "kill")
            _choice(f"{key}.kind", e["kind"], self.KINDS)
        self.schedule, self.machine_schedule = slot_events, [e for _, e in machine_events]
        self.coordinator_schedule = coordinator_events
        _check(0.0 <= self.rate_per_hour < 1.0, f"faults.rate_per_hour={self.rate_per_hour} must be in [0, 1)")
        _seconds("faults.step_time_s", self.step_time_s)
        _check(self.spares >= 0, "faults.spares must be >= 0")
        _seconds("faults.rejoin_delay_s", self.rejoin_delay_s, allow_zero=True)
        _seconds("faults.notice_s", self.notice_s)

    def per_step_probability(self) -> float:
        """The paper's conversion of an hourly failure rate to a per-stage, per-step probability."""
        return 1.0 - (1.0 - self.rate_per_hour) ** (self.step_time_s / 3600.0)



def fault_events(job) -> List[dict]:
    """`job`: a JobConfig. The explicit schedule plus the seeded Bernoulli failures of `faults.rate_per_hour`: every
    (step, replica, stage) draws from one seeded stream, so every strategy sees the same failures.
    Each event gets an `id` (its index): the launcher and the workers compute the same list from the
    same job, so both name an event the same way (see `held_at_boundary`)."""
    events = [dict(e) for e in job.faults.schedule]
    S, T = job.parallel.stages, job.train.max_steps
    if job.faults.demo and T >= 10:
        if S >= 3:  # a middle stage: CheckFree averages its neighbours
            events.append({"step": int(0.3 * T), "replica": 0, "stage": S // 2, "kind": "kill"})
        if S >= 2:  # the first stage: CheckFree+ copies its swap partner
            events.append({"step": int(0.65 * T), "replica": 0, "stage": 0, "kind": "kill"})
    p = job.faults.per_step_probability() if job.faults.rate_per_hour > 0 else 0.0
    if p > 0:
        rng = random.Random(job.faults.seed)
        for step in range(1, job.train.max_steps - 1):
            for r in range(job.parallel.replicas):
                for s in range(job.parallel.stages):
                    if rng.random() < p:
                        events.append({"step": step, "replica": r, "stage": s, "kind": "kill"})
    events = sorted(events, key=lambda e: (e["step"], e["replica"], e["stage"]))
    return [dict(e, id=i) for i, e in enumerate(events)]


def held_at_boundary(event: dict) -> bool:
    """A slot event fired at an exact step: the worker holding the slot stops at the start of that
    step and the launcher signals it there, so the failure always interrupts the same step (every
    strategy, every run sees the same failure). Events tied to a rebuild (`on: rebuild`) fire on
    the launcher's clock instead."""
    return "replica" in event and "stage" in event and event.get("on") is None
