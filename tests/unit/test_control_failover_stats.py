"""benchmarks.control_failover's side-by-side estimate of the etcd mode's own per-step cost, worked by
hand: the etcd members' CPU counts +m in rounds where they share the etcd run's core and about -m
where they share the local run's, so the mean of the two groups' means leaves the mode's own cost."""
import pytest

from benchmarks.control_failover import own_cost


def test_own_cost_cancels_the_members_share_and_bounds_it():
    # Own cost 0.5 %, the members' share 3 %: rounds read 3.5 % +- 1 and -2.5 % +- 1.
    g = [0.045, 0.025, 0.035, 0.035]
    h = [-0.015, -0.035, -0.025, -0.025]
    r = own_cost(g, h)
    assert r["side_by_side_members_on_etcd_mean_pct"] == 3.5
    assert r["side_by_side_members_on_local_mean_pct"] == -2.5
    assert r["side_by_side_own_cost_pct"] == 0.5
    # each group: sample variance (1^2 + 1^2 + 0 + 0) / 3 = 2/3 (%^2); s.e. = sqrt(2/3/4 * 2) / 2 = 0.2887 %
    assert r["side_by_side_own_cost_se_pct"] == pytest.approx(0.29, abs=0.005)
    assert r["side_by_side_own_cost_upper95_pct"] == pytest.approx(0.5 + 1.645 * 0.288675, abs=0.006)


def test_own_cost_needs_two_rounds_in_each_group():
    assert own_cost([0.01], [0.0, 0.01]) == {}
