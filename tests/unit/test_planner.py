"""The coordinator's planner and plans, without a store or a process: states built by hand, the
expected plans written out by hand."""
import json

import pytest

from kintsugi.recovery.control_state import Cell, CoordinatorState, Loss, Settings, WorkerInfo
from kintsugi.recovery.plan import (CellPlan, DonateRequest, Divergence, PlanError, RebuildEntry, Rollback,
                                    SuspendPlan)
from kintsugi.recovery.planner import (cell_plan, cells_waiting_on, choose_holders, everyone_leaving,
                                       handoffs_ready, plan_cell_rebuilds, rebalance_decision, stage_holders)
from kintsugi.recovery.tiers import Unrecoverable


def _settings(R=1, S=4, strategy="tiered", diloco=False, **kw):
    job = {"parallel": {"replicas": R, "stages": S}, "train": {"max_steps": 20},
           "recovery": {"strategy": strategy, "heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 3.0,
                        "init_timeout_s": 60.0},
           "diloco": {"enabled": diloco}, "faults": {"spares": 1}, "model": {"n_layers": 8}}
    job["recovery"].update(kw)
    return Settings.from_job(job)


def _state(settings, committed=4):
    st = CoordinatorState.fresh(settings, port=1234, layout=[2] * settings.stages)
    for r in range(settings.replicas):
        for s in range(settings.stages):
            wid = f"w{r}{s}"
            st.workers[wid] = WorkerInfo(wid, 100, "host", f"m{r}", state="active", slot=(r, s))
            st.slots[(r, s)] = wid
            st.ready[(r, s)] = True
        st.committed[r] = committed
    return st


def _lose(st, slot, by_wid, handed_off=False):
    """What membership does when a holder dies, then what maybe_publish does when a spare takes it."""
    cell = st.cell_of(slot[0])
    cell.rebuilding[slot] = Loss(detected_at=10.0, failed_at=9.5, handed_off=handed_off,
                                 leaver=st.slots[slot] if handed_off else None, why="test", step=5)
    st.slots[slot] = by_wid
    st.workers[by_wid] = WorkerInfo(by_wid, 200, "host", "m9", state="active", slot=slot)


def test_cell_plan_ranks_follow_replica_stage_order_and_leavers_come_last():
    s = _settings(R=2, S=2)  # plain data-parallel: one cell holding both replicas
    st = _state(s)
    (cell,) = st.cells.values()
    plan = cell_plan(st, s, cell, now=123.0, leavers=["old"])
    # ranks: (0,0) -> 0, (0,1) -> 1, (1,0) -> 2, (1,1) -> 3, then the leaver -> 4
    assert plan.ranks == {"w00": 0, "w01": 1, "w10": 2, "w11": 3, "old": 4}
    assert plan.world_size == 5 and plan.gen == 0 and plan.replicas == (0, 1)
    assert plan.committed == {0: 4, 1: 4} and plan.published_at == 123.0
    assert plan.slot_of("w11") == (1, 1) and plan.slot_of("old") is None and plan.wid_of_rank(4) == "old"


def test_a_lost_middle_stage_is_rebuilt_by_checkfree_from_both_neighbours():
    s = _settings(S=4)
    st = _state(s)
    _lose(st, (0, 2), "spare")
    out = plan_cell_rebuilds(st, s, st.cells[0], leavers=[], xfer_prefix="xfer/b/0/1")
    assert not out.rollback and out.donations == []
    (entry,) = out.entries.values()
    assert entry == RebuildEntry("checkfree", ((0, 1), (0, 3)), 10.0, 9.5, step=5)
    assert out.unsettled == {(0, 2): 5}  # approximate: no source for another rebuild until step 5 commits


def test_a_peer_rebuild_mails_the_donor_and_names_a_transfer_group():
    s = _settings(R=2, S=2, diloco=True)
    st = _state(s)
    _lose(st, (0, 1), "spare")
    out = plan_cell_rebuilds(st, s, st.cells[0], leavers=[], xfer_prefix="xfer/b/0/1")
    assert out.entries[(0, 1)].tier == "peer" and out.entries[(0, 1)].donor == "w11"
    assert out.entries[(0, 1)].xfer == "xfer/b/0/1/1"
    assert out.donations == [("w11", DonateRequest("xfer/b/0/1/1", "spare", (0, 1), (1, 1), gen=0))]
    assert out.unsettled == {}  # exact: usable as a source at once


def test_a_handoff_needs_its_leaver_in_the_generation():
    s = _settings(S=3)
    st = _state(s)
    _lose(st, (0, 1), "spare", handed_off=True)
    with_leaver = plan_cell_rebuilds(st, s, st.cells[0], leavers=["w01"], xfer_prefix="x")
    assert with_leaver.entries[(0, 1)].tier == "handoff" and with_leaver.entries[(0, 1)].leaver == "w01"
    # Without the leaver in the group (it died before handing off) the middle stage is averaged.
    assert plan_cell_rebuilds(st, s, st.cells[0], leavers=[], xfer_prefix="x").entries[(0, 1)].tier == "checkfree"


def test_adjacent_losses_are_refused_with_the_reason():
    s = _settings(S=4, strategy="checkfree")
    st = _state(s)
    _lose(st, (0, 1), "a")
    _lose(st, (0, 2), "b")
    with pytest.raises(Unrecoverable, match="adjacent"):
        plan_cell_rebuilds(st, s, st.cells[0], leavers=[], xfer_prefix="x")


def test_the_checkpoint_tier_asks_for_a_rollback_of_everything():
    s = _settings(S=4, strategy="tiered")
    st = _state(s)
    st.latest_checkpoint = 3
    _lose(st, (0, 1), "a")
    _lose(st, (0, 2), "b")  # adjacent: only the checkpoint is left
    assert plan_cell_rebuilds(st, s, st.cells[0], leavers=[], xfer_prefix="x").rollback


def test_stage_groups_leave_out_a_replica_that_is_down():
    s = _settings(R=3, S=2, diloco=True)
    st = _state(s)
    assert [r for r, _ in stage_holders(st, s, 1)] == [0, 1, 2]
    st.cells[1].rebuilding[(1, 0)] = Loss(1.0, 1.0, False, None, "x", 5)  # replica 1's stage 0 is down
    assert [r for r, _ in stage_holders(st, s, 1)] == [0, 2]  # its stage 1 cannot reach a sync either


def test_cells_waiting_on_a_dead_donor_are_planned_again():
    s = _settings(R=2, S=2, diloco=True)
    st = _state(s)
    _lose(st, (0, 1), "spare")
    out = plan_cell_rebuilds(st, s, st.cells[0], leavers=[], xfer_prefix="x")
    st.cells[0].plan = cell_plan(st, s, st.cells[0], 0.0, rebuild=out.entries)
    assert cells_waiting_on(st, "w11") == [st.cells[0]]
    assert cells_waiting_on(st, "w10") == []


def test_everyone_leaving_suspends_only_without_a_free_spare():
    s = _settings(S=2)
    st = _state(s)
    for w in st.workers.values():
        w.leaving = True
    assert everyone_leaving(st, s) == {(0, 0): "w00", (0, 1): "w01"}
    st.workers["spare"] = WorkerInfo("spare", 1, "h", "m")
    assert everyone_leaving(st, s) is None


def test_spares_are_chosen_so_one_machine_loss_destroys_least():
    _settings(S=2)
    spares = [WorkerInfo("a", 1, "h", "m0"), WorkerInfo("b", 2, "h", "m0"), WorkerInfo("c", 3, "h", "m1")]
    got = choose_holders([(0, 0), (0, 1)], spares, 2)
    # Two adjacent stages of one replica on one machine is avoided when another machine has room.
    assert {got[(0, 0)].machine, got[(0, 1)].machine} == {"m0", "m1"}


def test_rebalancing_moves_a_layer_off_a_three_times_slower_stage():
    # 2 layers each; stage 1 takes 3 s, the others 1 s. Moving one layer off stage 1 gives it
    # 1.5 s and its neighbour 0.5 s per layer x 3 = 1.5 s: the step drops from 3 s to 1.5 s.
    decision = rebalance_decision([2, 2, 2], [[1.0, 3.0, 1.0]] * 4, 3, min_gain=0.1)
    assert decision is not None
    counts, mean, gain = decision
    assert sum(counts) == 6 and counts[1] == 1 and mean == [1.0, 3.0, 1.0]
    assert gain == pytest.approx(1.0)
    assert rebalance_decision([2, 2, 2], [[1.0, 1.05, 1.0]] * 4, 3, min_gain=0.1) is None


# --- the plans' JSON -----------------------------------------------------------------------------------
def _plan():
    return CellPlan(cell=0, gen=3, replicas=(0,), slots={(0, 0): "a", (0, 1): "b"}, ranks={"a": 0, "b": 1, "c": 2},
                    rebuild={(0, 1): RebuildEntry("handoff", (), 1.5, 1.0, 7, leaver="c")}, leavers=("c",),
                    rollback=Rollback({0: 6}), layout=(4, 4), prev_layout=None, layout_version=1,
                    committed={0: 6}, published_at=99.5, diverged=Divergence("x/1", 0.5))


def test_a_cell_plan_survives_strict_json_exactly():
    plan = _plan()
    assert CellPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    sp = SuspendPlan({(0, 0): "a"}, ((0, 1),))
    assert SuspendPlan.from_json(json.loads(json.dumps(sp.to_json()))) == sp


@pytest.mark.parametrize("damage, field", [
    (lambda d: d.pop("gen"), "missing"),
    (lambda d: d.update(extra=1), "unknown"),
    (lambda d: d.update(gen="3"), "gen"),
    (lambda d: d["rebuild"]["0,1"].update(tier="magic"), "tier"),
    (lambda d: d["rebuild"]["0,1"].update(step=7.5), "step"),
    (lambda d: d.update(ranks={"a": 0, "b": 2}), "ranks"),
    (lambda d: d.update(published_at=float("nan")), "published_at"),
    (lambda d: d["slots"].update({"zero": "a"}), "slot"),
])
def test_a_malformed_plan_is_refused_naming_what_is_wrong(damage, field):
    d = _plan().to_json()
    damage(d)
    with pytest.raises(PlanError, match=field):
        CellPlan.from_json(d)


def test_the_coordinator_state_persists_as_one_object_and_reads_back():
    s = _settings(R=2, S=2, diloco=True)
    st = _state(s)
    _lose(st, (0, 1), "spare")
    st.cells[0].plan = _plan()
    st.unsettled[(0, 1)] = 5
    st.cells[1].lost[(1, 0)] = Loss(2.0, 1.0, False, None, "gone", 3)
    back = CoordinatorState.from_json(json.loads(json.dumps(st.to_json())))
    assert back.to_json() == st.to_json()
    assert back.cells[0].plan == _plan() and back.slots[(0, 1)] == "spare" and back.unsettled == {(0, 1): 5}
    assert isinstance(back.cells[1], Cell) and back.cells[1].lost[(1, 0)].why == "gone"


def test_handoffs_go_first_noticed_first_one_per_ready_unclaimed_spare():
    # 2 replicas x 2 stages under Streaming DiLoCo (a cell per replica). Holders w01 (noticed at
    # t=5) and w10 (t=2) are under notice; w11 is not.
    s = _settings(R=2, S=2, diloco=True)
    st = _state(s)
    st.workers["w01"].leaving, st.workers["w01"].leaving_since = True, 5.0
    st.workers["w10"].leaving, st.workers["w10"].leaving_since = True, 2.0
    assert handoffs_ready(st) == [], "no spare at all: everyone trains on"
    # A spare that joined but still warms up (its beat says "starting") reserves nothing yet.
    st.workers["a"] = WorkerInfo("a", 300, "host", "m7", state="spare", status={"n": 1, "phase": "starting"})
    assert handoffs_ready(st) == []
    st.workers["a"].status = {"n": 2, "phase": "spare"}
    assert handoffs_ready(st) == ["w10"], "the first notice gets the only ready spare"
    # A spare on a machine that is itself going away takes no slot.
    st.workers["b"] = WorkerInfo("b", 301, "host", "m8", state="spare", leaving=True, status={"phase": "spare"})
    assert handoffs_ready(st) == ["w10"]
    # w10 left; its cell is not re-planned yet, so its slot already claims spare a: w01 waits.
    st.workers["w10"].state = "left"
    st.cell_of(1).lost[(1, 0)] = Loss(detected_at=10.0, failed_at=10.0, handed_off=True, leaver="w10",
                                      why="notice", step=7)
    assert handoffs_ready(st) == []
    # A second ready spare: now w01 may go.
    st.workers["c"] = WorkerInfo("c", 302, "host", "m9", state="spare", status={"phase": "spare"})
    assert handoffs_ready(st) == ["w01"]
