"""benchmarks/fleet_correlated.py: how correlated losses are laid out and priced (worked by hand)."""
import pytest

from kintsugi.benchmarks.fleet_correlated import _spread, delayed, events


def test_a_machine_takes_eight_distinct_slots_of_eight_replicas():
    # W = 64 (R = 8, S = 8), first slot 13 = replica 1, stage 5: slot j is replica 1 + j, stage 5 + j.
    slots = _spread(13, 8, 64, 8)
    assert slots == [13, 22, 31, 32, 41, 50, 59, 4]
    assert len({s // 8 for s in slots}) == 8


def test_a_zone_takes_a_quarter_of_the_fleet_without_repeating_a_slot():
    slots = _spread(5, 64, 256, 8)
    assert len(set(slots)) == 64


def test_a_rebuild_that_starts_while_the_coordinator_is_down_waits_for_its_successor():
    # Coordinator lost at 100, failover 3 s: a failure at 101 with a 0.5 s outage ends at 103 -> 2 s;
    # one at 90 or at 104 keeps its 0.5 s; one at 102.8 ends at 103 at the earliest -> max(0.5, 0.2).
    assert delayed([90.0, 101.0, 102.8, 104.0], 0.5, [100.0], 3.0) == pytest.approx([0.5, 2.0, 0.5, 0.5])


def test_machine_events_are_the_independent_ones_eight_slots_each():
    t_ind, s_ind, *_ = events("independent", 64, 8, 0.10, 7200.0, seed=3)
    t_m, s_m, *_ = events("machine", 64, 8, 0.10, 7200.0, seed=3)
    assert len(t_m) == 8 * len(t_ind) and len(s_m) == len(t_m)
    assert sorted(set(t_m)) == sorted(set(t_ind))


def test_replicas_lost_at_one_moment_share_one_regroup():
    # W = 4 (R = 2, S = 2), regroup 0.5 s: two replicas lost at t = 5 re-form the cross-replica
    # groups once, W x 0.5 = 2 worker-seconds; lost at 5 and 50, twice: 4.
    import math
    from kintsugi.benchmarks import fleet_model as FM
    c = FM.Costs(workers=4, stages=2, step_s=1.0, sync_s=10.0, transfer_s=0.0, d_global=0.0, d_replica=1.0,
                 regroup_s=0.5, missed_sync="catch_up", ft_ready_s=0.0, ft_heal_s=0.0, ckpt_restart_s=0.0,
                 ckpt_save_s=0.0, ckpt_interval_s=math.inf)
    assert FM.sim_isolated([5.0, 5.0], [0, 2], c, 100.0)["regroup"] == pytest.approx(2.0)
    assert FM.sim_isolated([5.0, 50.0], [0, 2], c, 100.0)["regroup"] == pytest.approx(4.0)


def test_the_etcd_row_prices_the_same_coordinator_losses():
    # coordinator and coordinator_etcd share one trace; only the stall and failover differ.
    a = events("coordinator", 64, 8, 0.10, 7200.0, seed=5)
    b = events("coordinator_etcd", 64, 8, 0.10, 7200.0, seed=5)
    assert a == b and a[2], "no coordinator loss in the trace: pick another seed"


def test_notices_come_on_the_independent_events():
    t_ind, s_ind, _, n_ind = events("independent", 1024, 8, 0.10, 24 * 3600.0, seed=2)
    t_n, s_n, coord, noticed = events("notice", 1024, 8, 0.10, 24 * 3600.0, seed=2)
    assert (t_n, s_n, coord) == (t_ind, s_ind, []) and not any(n_ind)
    assert len(t_n) > 1000 and 0.65 < sum(noticed) / len(noticed) < 0.75  # NOTICE_SHARE = 0.7


def _costs(**kw):
    import math
    from kintsugi.benchmarks import fleet_model as FM
    base = dict(workers=4, stages=2, step_s=1.0, sync_s=10.0, transfer_s=0.0, d_global=2.0, d_replica=1.0,
                regroup_s=0.0, missed_sync="catch_up", ft_ready_s=0.0, ft_heal_s=0.0, ckpt_restart_s=2.0,
                ckpt_save_s=1.0, ckpt_interval_s=10.0)
    return FM.Costs(**{**base, **kw})


def test_a_handoff_under_global_generations_throws_nothing_away():
    # W = 4, step 1 s, H = 10 s, a loss at 25.5 with a 2 s outage: all 4 stop, outage 4 x 2 = 8. Without
    # notice the 3 others retry their step (3 x 0.5) and the lost stage restarts from the sync at 20
    # (5.5): discard 7.0; handed off: 0.
    from kintsugi.benchmarks import fleet_model as FM
    c = _costs()
    kill = FM.sim_global([25.5], c, 100.0)
    notice = FM.sim_global([25.5], c, 100.0, exact=[True])
    assert kill == {"outage": pytest.approx(8.0), "discard": pytest.approx(7.0)}
    assert notice == {"outage": pytest.approx(8.0), "discard": pytest.approx(0.0)}


def test_checkpoint_restart_saves_on_a_notice_and_rolls_nothing_back():
    # W = 4, train 10 s then save 1 s, restart 2 s, a loss at 25.5, horizon 100: before it, 2 saves and
    # 3.5 s since the last one (25.5 - 22); after the restart (27.5 -> 100, 72.5 s) 6 more saves.
    #   kill:   saves 4 x (2 + 6) = 32, rollback 4 x 3.5 = 14, outage 4 x 2 = 8
    #   notice: saves 4 x (2 + 1 + 6) = 36 (one more, on the notice), rollback 0, outage 8
    from kintsugi.benchmarks import fleet_model as FM
    c = _costs()
    kill = FM.sim_checkpoint([25.5], c, 100.0)
    notice = FM.sim_checkpoint([25.5], c, 100.0, noticed=[True])
    assert kill == {"outage": pytest.approx(8.0), "discard": pytest.approx(14.0), "checkpoint": pytest.approx(32.0)}
    assert notice == {"outage": pytest.approx(8.0), "discard": pytest.approx(0.0), "checkpoint": pytest.approx(36.0)}


def test_a_noticed_loss_is_priced_as_a_handoff_under_isolation():
    # One loss at 25.5 in replica 0 of W = 16 (R = 2, S = 8): its outage is the handoff's, rdv(8) +
    # transfer + HANDOFF_S, instead of detection + rdv(8) + exchange + transfer; and it is exact.
    from kintsugi.benchmarks import fleet_model as FM
    from kintsugi.benchmarks.fleet_correlated import HANDOFF_S, run_policy
    rdv = {"best": "a+b*N", "models": {"a+b*N": {"a": 0.01, "b": 0.001}}}  # rdv(8) = 0.018 s
    inp = FM.Inputs(rdv=rdv)
    c = FM.costs(inp, 16, 10.0, 0.10)
    d_kill = inp.detect_s + 0.018 + inp.exchange_s + c.transfer_s
    d_handoff = 0.018 + c.transfer_s + HANDOFF_S
    assert c.d_replica == pytest.approx(d_kill)
    kill = run_policy("isolated", inp, 16, 10.0, 0.10, 3600.0, [25.5], [3], [], [False], 3.0, 0.0)
    notice = run_policy("isolated", inp, 16, 10.0, 0.10, 3600.0, [25.5], [3], [], [True], 3.0, 0.0)
    assert kill["outage"] == pytest.approx(8 * d_kill)
    assert notice["outage"] == pytest.approx(8 * d_handoff)
    assert notice["discard"] < kill["discard"]
