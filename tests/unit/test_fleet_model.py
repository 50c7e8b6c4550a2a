"""benchmarks/fleet_model.py and the fit of benchmarks/rendezvous.py, checked against expectations
worked by hand (the arithmetic is written out next to each number)."""
import math

import pytest

from kintsugi.benchmarks import fleet_model as fm
from kintsugi.benchmarks import rendezvous

# rdv(n) = 0.1 + 0.1 n: rdv(2) = 0.3, rdv(4) = 0.5.
LINEAR_RDV = {"models": {"a+b*N": {"a": 0.1, "b": 0.1}}, "best": "a+b*N"}


def small_inputs(**kw):
    """S = 2; one stage = 31.25e6 params x 16 B / 2 = 250 MB -> 2.0 s at 1 Gbit/s (transfer, save, load)."""
    base = dict(rdv=LINEAR_RDV, stages=2, params=31.25e6, detect_s=0.5, exchange_s=1.0, process_start_s=0.7,
                step_s=1.0, sync_every=10, overlap_steps=1, ckpt_interval_s=5.0)
    base.update(kw)
    return fm.Inputs(**base)


W, HORIZON = 4, 40.0  # R = 2 replicas x S = 2 stages; 160 worker-seconds in all


def run(policy, t_fail, machine=1, inp=None):
    c = fm.costs(inp or small_inputs(), W, gbit=1.0, rate_per_h=0.1)
    return fm.simulate(policy, [t_fail], [machine], c, HORIZON)


def total_lost(res):
    return sum(v for k, v in res.items() if k != "goodput")


def test_costs_match_hand_arithmetic():
    c = fm.costs(small_inputs(), W, gbit=1.0, rate_per_h=0.1)
    assert c.transfer_s == pytest.approx(2.0)                    # 250e6 B * 8 / 1e9
    assert c.d_global == pytest.approx(0.5 + 0.5 + 1.0 + 2.0)    # detect + rdv(4) + exchange + transfer
    assert c.d_replica == pytest.approx(0.5 + 0.3 + 1.0 + 2.0)   # detect + rdv(2) + ...
    assert c.ckpt_restart_s == pytest.approx(0.5 + 0.7 + 0.5 + 2.0)  # detect + start + rdv(4) + load
    assert fm.hazard_per_s(0.10) * 3600 == pytest.approx(0.1053605, rel=1e-6)  # -ln(0.9)


def test_one_failure_global_by_hand():
    # t = 23.5: all 4 stop for 4.0 s = 16; 3 other stages lose the half step in flight = 1.5;
    # the dead stage loses 23.5 mod 10 = 3.5 s since the last sync.
    res = run("global", 23.5)
    assert res["outage"] == pytest.approx(16.0)
    assert res["discard"] == pytest.approx(1.5 + 3.5)
    assert res["goodput"] == pytest.approx(1 - 21.0 / 160)


def test_one_failure_isolated_by_hand():
    # Replica 0 (2 workers) stops for 3.8 s = 7.6; dead stage 3.5 + survivor's half step 0.5;
    # outage (23.5, 27.3] holds no sync (20, 30); rdv(2) = 0.3 < overlap 1 s: no regroup stall.
    res = run("isolated", 23.5)
    assert res["outage"] == pytest.approx(7.6)
    assert res["discard"] == pytest.approx(4.0)
    assert total_lost(res) == pytest.approx(11.6)


def test_isolated_replica_that_misses_a_sync_discards_its_survivors_progress():
    # t = 28.25: dead stage 8.25, survivor's step in flight 0.25; outage (28.25, 32.05] holds the
    # sync at 30, so the survivor also drops its 8.25 - 0.25 = 8.0 s of unsynced progress.
    res = run("isolated", 28.25)
    assert res["outage"] == pytest.approx(7.6)
    assert res["discard"] == pytest.approx(8.25 + 0.25 + 8.0)


def test_one_failure_drop_replica_by_hand():
    # Restart ready at 23.5 + 0.5 + 0.7 + 0.3 = 25.0, joins at the sync at 30, healed at 30 + 1 + 2 = 33:
    # 2 workers x 9.5 s = 19; the heal overwrites both stages' 3.5 s of local progress = 7.
    res = run("drop_replica", 23.5)
    assert res["outage"] == pytest.approx(19.0)
    assert res["discard"] == pytest.approx(7.0)
    assert total_lost(res) == pytest.approx(26.0)


def test_one_failure_checkpoint_by_hand():
    # Cycles of 5 s training + 2 s save. t = 23.5: 3 cycles (21 s), 2.5 s into the 4th: rollback 4 x 2.5 = 10,
    # saves 4 x 3 x 2 = 24; restart 3.7 s: 4 x 3.7 = 14.8; resume at 27.2, 12.8 s left: one cycle (7 s) and
    # 5.8 s, of which 0.8 s inside a save: saves 4 x (2 + 0.8) = 11.2.
    res = run("checkpoint", 23.5)
    assert res["discard"] == pytest.approx(10.0)
    assert res["outage"] == pytest.approx(14.8)
    assert res["checkpoint"] == pytest.approx(24.0 + 11.2)
    assert res["goodput"] == pytest.approx(1 - 60.0 / 160)


def test_failure_during_an_outage_restarts_it():
    # Global, failures at 10.0 and 12.0: down from 10.0 to 12.0 + 4.0 = 16.0 (4 x 6 = 24); only the first
    # discards: 3 x (10.0 mod 1 = 0) + (10.0 mod 10 = 0) = 0.
    c = fm.costs(small_inputs(), W, gbit=1.0, rate_per_h=0.1)
    res = fm.simulate("global", [10.0, 12.0], [0, 3], c, HORIZON)
    assert res["outage"] == pytest.approx(24.0)
    assert res["discard"] == pytest.approx(0.0)


def test_no_failures_means_full_goodput_for_every_policy():
    inp = fm.Inputs(rdv=LINEAR_RDV)
    times, machines = fm.failure_trace(64, 0.0, 24 * 3600, seed=0)
    assert len(times) == 0
    for gbit in (1.0, 10.0):
        c = fm.costs(inp, 64, gbit, 0.0)
        for policy in fm.POLICIES:
            assert fm.simulate(policy, times, machines, c, 24 * 3600)["goodput"] == 1.0


def test_goodput_falls_as_the_failure_rate_rises():
    inp = fm.Inputs(rdv=LINEAR_RDV)
    rates = (0.0, 0.05, 0.16, 0.33)
    cells = fm.sweep(inp, [64], rates, [1.0], horizon_s=12 * 3600, seeds=[0, 1, 2])
    for policy in fm.POLICIES:
        g = [next(c["goodput_mean"] for c in cells if c["policy"] == policy and c["rate_per_h"] == r) for r in rates]
        assert g[0] == 1.0
        assert all(a > b for a, b in zip(g, g[1:])), (policy, g)


@pytest.mark.parametrize("missed_sync,workers", [("catch_up", 16), ("catch_up", 64), ("catch_up", 256),
                                                 ("discard", 64), ("discard", 256)])
def test_isolation_never_loses_to_global_generations(missed_sync, workers):
    # Not with ("discard", 16): with R = 2, 1 Gbit/s and 33 %/h the replica that misses a sync throws away
    # about as much as global generations stall (0.957 vs 0.960 for seed 0), the reason catch-up exists.
    inp = fm.Inputs(rdv=LINEAR_RDV, missed_sync=missed_sync)
    for rate in (0.05, 0.33):
        for gbit in (1.0, 10.0):
            c = fm.costs(inp, workers, gbit, rate)
            for seed in range(3):
                t, m = fm.failure_trace(workers, rate, 6 * 3600, seed)
                iso = fm.simulate("isolated", t, m, c, 6 * 3600)["goodput"]
                glob = fm.simulate("global", t, m, c, 6 * 3600)["goodput"]
                assert iso >= glob, (workers, rate, gbit, seed, iso, glob)


def test_catch_up_keeps_what_discard_throws_away():
    # The t = 28.25 case above without the survivor's 8.0 s discard.
    res = run("isolated", 28.25, inp=small_inputs(missed_sync="catch_up"))
    assert res["discard"] == pytest.approx(8.25 + 0.25)
    with pytest.raises(ValueError, match="missed_sync"):
        small_inputs(missed_sync="wait")


def test_failure_count_matches_the_hazard():
    # 256 machines at 10 %/h for 24 h: 256 x 0.10536 x 24 = 647.3 expected; Poisson sd ~25.
    counts = [len(fm.failure_trace(256, 0.10, 24 * 3600, seed)[0]) for seed in range(10)]
    assert abs(sum(counts) / 10 - 647.3) < 30


def test_rendezvous_fit_recovers_known_coefficients():
    ns = [2, 4, 8, 16, 32]
    nlogn = [0.004 + 0.0003 * n * math.log2(n) for n in ns]  # 2: 0.0052, 32: 0.052
    fit = rendezvous.fit_models(ns, nlogn)
    m = fit["models"]["a+b*N*log2(N)"]
    assert (m["a"], m["b"]) == (pytest.approx(0.004), pytest.approx(0.0003))
    assert m["rms_residual"] < 1e-12 and fit["best"] == "a+b*N*log2(N)"
    assert rendezvous.predict(fit, 4096) == pytest.approx(0.004 + 0.0003 * 4096 * 12)

    linear = [0.01 + 0.002 * n + (1e-4 if n == 8 else 0.0) for n in ns]  # one point off by 0.1 ms
    fit = rendezvous.fit_models(ns, linear)
    m = fit["models"]["a+b*N"]
    assert m["a"] == pytest.approx(0.01, abs=1e-4) and m["b"] == pytest.approx(0.002, rel=1e-2)
    assert fit["best"] == "a+b*N"
