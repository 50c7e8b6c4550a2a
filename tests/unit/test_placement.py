"""Placement of (replica, stage) slots on machines, checked by brute force over every single-machine
loss; the recoverability report against the coordinator's own planner; and the stage balancer."""
import itertools
import logging
import random

import pytest

from kintsugi.recovery.placement import (constraint_violations, place, rebalance, recoverability_report,
                                slowest_stage)
from kintsugi.recovery.tiers import Unrecoverable, plan_rebuilds


def grid(R, S):
    return [(r, s) for r in range(R) for s in range(S)]


def losses(assignment, R, S):
    """Independent brute force: for each machine, (both neighbours lost, all replicas lost,
    adjacent pair lost) counts if that machine goes."""
    out = {}
    for m in set(assignment.values()):
        lost = {slot for slot, mm in assignment.items() if mm == m}
        nbrs = sum((r, s - 1) in lost and (r, s + 1) in lost for r in range(R) for s in range(1, S - 1))
        stage = sum(R >= 2 and all((r, s) in lost for r in range(R)) for s in range(S))
        adj = sum((r, s) in lost and (r, s + 1) in lost for r in range(R) for s in range(S - 1))
        out[m] = (stage, adj, nbrs)
    return out


def check_capacity(assignment, slots, machines):
    assert sorted(assignment) == sorted(slots)
    for m, cap in machines.items():
        assert sum(1 for mm in assignment.values() if mm == m) <= cap


def test_2x4_on_4_machines_survives_any_machine():
    machines = {f"node{i}": 2 for i in range(4)}
    a = place(grid(2, 4), machines, 4)
    check_capacity(a, grid(2, 4), machines)
    for m, (stage, adj, nbrs) in losses(a, 2, 4).items():
        assert (stage, adj, nbrs) == (0, 0, 0), f"losing {m} breaks a constraint: {a}"
    assert all(not v for v in constraint_violations(a, 4).values())
    # With DiLoCo every lost slot has a peer on another machine: exact.
    rep = recoverability_report(a, 2, 4, diloco=True)
    assert len(rep.machines) == 4
    for e in rep.machines:
        assert e["verdict"] == "exact"
        assert {o["tier"] for o in e["outcomes"].values()} == {"peer"}
    assert "recoverable exactly" in rep.summary and "Not met" not in rep.summary
    # Without DiLoCo the same losses are rebuilt by CheckFree / CheckFree+ from other machines.
    rep = recoverability_report(a, 2, 4, diloco=False)
    assert {e["verdict"] for e in rep.machines} == {"approximate"}
    tiers = {slot: o["tier"] for e in rep.machines for slot, o in e["outcomes"].items()}
    assert tiers[(0, 0)] == tiers[(1, 3)] == "checkfree_plus" and tiers[(0, 1)] == "checkfree"
    assert "diloco.enabled=true" in rep.summary


def test_1x4_on_2_machines_best_effort(caplog):
    caplog.set_level(logging.WARNING, logger="kintsugi.recovery.placement")
    machines = {"a": 2, "b": 2}
    a = place(grid(1, 4), machines, 4)
    check_capacity(a, grid(1, 4), machines)
    # Two machines cannot keep both neighbours of stage 1 and of stage 2 apart while keeping
    # adjacent stages apart; adjacency (what CheckFree needs) wins.
    assert all(adj == 0 for _, adj, _ in losses(a, 1, 4).values())
    v = constraint_violations(a, 4)
    assert not v["adjacent"] and len(v["neighbours"]) == 2
    assert any("could not meet neighbours" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    rep = recoverability_report(a, 1, 4, diloco=True)
    assert {e["verdict"] for e in rep.machines} == {"approximate"}
    assert "approximately" in rep.summary and "Not met: neighbours" in rep.summary
    assert "one replica" in rep.summary


def test_1x4_on_1_machine_not_recoverable():
    a = place(grid(1, 4), {"solo": 4}, 4)
    assert set(a.values()) == {"solo"}
    rep = recoverability_report(a, 1, 4, diloco=True)
    (entry,) = rep.machines
    assert entry["verdict"] == "none" and all(o["outcome"] == "none" for o in entry["outcomes"].values())
    assert "not recoverable" in rep.summary and "adjacent" in rep.summary
    # A checkpoint turns the same loss into a rollback.
    rep = recoverability_report(a, 1, 4, diloco=True, have_checkpoint=True)
    assert rep.machines[0]["verdict"] == "rollback"


def test_design_examples_whole_replica_vs_whole_stage():
    """DESIGN.md: a node holding a whole replica loses one pipeline (exact from the other replica
    with DiLoCo, nothing without); a node holding one stage of every replica is CheckFree's case."""
    by_replica = {(r, s): f"m{r}" for r, s in grid(2, 4)}
    assert {e["verdict"] for e in recoverability_report(by_replica, 2, 4, True).machines} == {"exact"}
    assert {e["verdict"] for e in recoverability_report(by_replica, 2, 4, False).machines} == {"none"}
    by_stage = {(r, s): f"m{s}" for r, s in grid(2, 4)}
    assert {e["verdict"] for e in recoverability_report(by_stage, 2, 4, True).machines} == {"approximate"}
    assert len(constraint_violations(by_stage, 4)["stage"]) == 4


@pytest.mark.parametrize("R,S,caps", [(1, 4, (2, 2)), (1, 5, (3, 2)), (2, 3, (3, 3)), (2, 3, (2, 2, 2)),
                                      (1, 6, (2, 2, 2)), (3, 2, (2, 2, 2)), (2, 4, (4, 2, 2)), (1, 4, (3, 1))])
def test_placement_is_optimal_on_small_fleets(R, S, caps):
    """Exhaustive search over every assignment: no placement has fewer violations (compared in
    priority order: every replica of a stage, adjacent stages, both neighbours)."""
    slots = grid(R, S)
    machines = dict(enumerate(caps))

    def score(assign):
        per = losses(assign, R, S).values()
        return tuple(sum(x[i] for x in per) for i in range(3))

    best = min(score(dict(zip(slots, combo))) for combo in itertools.product(range(len(caps)), repeat=len(slots))
               if all(combo.count(m) <= c for m, c in machines.items()))
    a = place(slots, machines, S)
    check_capacity(a, slots, machines)
    assert score(a) == best


def test_unequal_capacity_and_too_small_fleet():
    machines = {"big": 5, "small1": 1, "small2": 1, "small3": 1}
    a = place(grid(2, 4), machines, 4)
    check_capacity(a, grid(2, 4), machines)
    with pytest.raises(ValueError, match="hold 3 workers but 8 slots need one"):
        place(grid(2, 4), {"a": 2, "b": 1}, 4)


def test_replacements_are_placed_around_the_survivors():
    """node1 of the 2x4 stripe dies; its slots go where the constraints still hold, not to the
    first spares that happen to be free."""
    a = place(grid(2, 4), {f"node{i}": 2 for i in range(4)}, 4)
    lost = sorted(slot for slot, m in a.items() if m == "node1")
    survivors = {slot: m for slot, m in a.items() if m != "node1"}
    spares = {"node0": 1, "node2": 1, "node4": 2}
    new = place(lost, spares, 4, fixed=survivors)
    assert sorted(new) == lost
    full = {**survivors, **new}
    assert all(v == (0, 0, 0) for v in losses(full, 2, 4).values()), new
    assert set(new.values()) == {"node4"}
    assert place([], {}, 4, fixed=survivors) == {}


def test_big_grid_is_fast_and_clean():
    a = place(grid(8, 16), {i: 4 for i in range(32)}, 16)
    assert all(not v for v in constraint_violations(a, 16).values())
    assert max(list(a.values()).count(m) for m in range(32)) == 4


def test_report_agrees_with_joint_planning():
    """Per-slot classification must match planning the whole machine's loss at once."""
    rng = random.Random(0)
    for _ in range(40):
        R, S, M = rng.choice([1, 2, 3]), rng.choice([2, 3, 4, 5]), rng.choice([1, 2, 3, 4])
        a = {slot: rng.randrange(M) for slot in grid(R, S)}
        for diloco in (False, True):
            for e in recoverability_report(a, R, S, diloco).machines:
                try:
                    plans = plan_rebuilds(e["slots"], R, S, "tiered", diloco=diloco)
                    assert e["verdict"] != "none"
                    assert {s: p.tier for s, p in plans.items()} == {s: o["tier"] for s, o in e["outcomes"].items()}
                except Unrecoverable:
                    assert e["verdict"] == "none"


def test_slowest_stage():
    times = {(0, 0): 1.0, (0, 1): 1.7, (1, 0): 1.1, (1, 1): 1.2}
    assert slowest_stage(times) == ((0, 1), 1.7)
    assert slowest_stage({(0, 0): 2.0, (1, 0): 2.0}) == ((0, 0), 2.0)
    with pytest.raises(ValueError):
        slowest_stage({})


def test_rebalance_moves_a_layer_off_the_slowest_stage():
    # Stage 1 is slowest; stage 2 is the faster neighbour.
    assert rebalance([2, 3, 2, 1], [1.0, 3.0, 0.8, 0.9]) == [2, 2, 3, 1]
    # The last stage can only give to its one neighbour.
    assert rebalance([2, 2, 2], [1.0, 1.0, 2.4]) == [2, 3, 1]
    # No move when it would make the neighbour the new, slower bottleneck (1.0 -> 2.0 > 1.2) ...
    assert rebalance([2, 1], [1.2, 1.0]) == [2, 1]
    # ... nor from a stage with a single layer.
    assert rebalance([1, 4], [3.0, 1.0]) == [1, 4]
    assert sum(rebalance([4, 4, 4, 4], [1, 1, 5, 1])) == 16
    with pytest.raises(ValueError):
        rebalance([2, 2], [1.0])


def test_rebalance_layout_moves_layers_off_a_slow_stage_until_no_move_helps():
    from kintsugi.recovery.placement import rebalance_layout
    counts, predicted = rebalance_layout([2, 2, 2, 2], [1.0, 3.0, 1.0, 1.0])
    assert sum(counts) == 8 and counts[1] == 1 and predicted == pytest.approx(1.5)
    assert rebalance_layout([2, 2], [1.0, 1.0]) == ([2, 2], 1.0)  # balanced: nothing to move


def test_rebalance_config_errors_are_one_line():
    from kintsugi.trainer.config.errors import ConfigError
    from kintsugi.trainer.config.job import JobConfig, LauncherConfig, LisaConfig, ParallelConfig
    with pytest.raises(ConfigError, match="parallel.rebalance=true does not yet work with lisa.enabled"):
        JobConfig(parallel=ParallelConfig(rebalance=True), lisa=LisaConfig(enabled=True))
    with pytest.raises(ConfigError, match="label:factor"):
        LauncherConfig(machines=4, slow_machines="m1")
    assert LauncherConfig(machines=4, slow_machines="m1:3, m2:1.5").slowdowns() == {"m1": 3.0, "m2": 1.5}
