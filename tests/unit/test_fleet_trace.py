"""benchmarks/fleet_trace.py: the fleet model on a given trace, expectations worked by hand.

Trace: R = 2, S = 2, step 1 s, H = 10 (syncs at 10, 20, ...), horizon 100 s, rdv(R) = 0.1 s, overlap 0.
Replica 0 fails at 15.5 for 5 s (down 15.5 -> 20.5); replica 1 at 17 for 4 s (17 -> 21).

    outage   2 x 5 + 2 x 4                                                          = 18
    discard  replica 0: unsynced 15.5 - 10 = 5.5, + (S-1) x phase 0.5 (15.5 mod 1)  = 6
             replica 1: unsynced 17 - 10 = 7, phase 0                               = 7
             model (missed_sync "discard"): both outages hold the sync at 20, so the
             survivors' kept progress goes too: + (5.5 - 0.5) + (7 - 0)             -> 25
             model_fixed ("catch_up": the replica keeps it)                          -> 13
    regroup  W x rdv(R) per failure = 4 x 0.1 x 2                                   = 0.8
    matched-sync waits (model_fixed): replica 1 waits for replica 0's 5 s less its own 3.5 s
             down inside it (17 -> 20.5): 2 x 1.5 = 3; replica 0 waits 2 x (4 - 3.5) = 1 -> 4
    goodput  model 1 - (18 + 25 + 0.8) / 400 = 0.8905; model_fixed 1 - (18 + 13 + 4.8) / 400 = 0.9105
    exact (a handoff) for replica 0: its discard is S x phase = 1, not 6 -> model_fixed discard 8
"""
import pytest

from kintsugi.benchmarks.fleet_trace import Failure, RunTrace, matched_sync_waits, predict


def trace(exact0=False):
    return RunTrace(replicas=2, stages=2, step_s=1.0, sync_every=10, overlap_steps=0, horizon_s=100.0,
                    failures=[Failure(15.5, 0, 1, 5.0, exact0), Failure(17.0, 1, 0, 4.0)])


def test_the_model_on_a_trace_matches_the_hand_worked_losses():
    p = predict(trace(), rdv_r_s=0.1)
    assert p["model"]["outage"] == pytest.approx(18.0)
    assert p["model"]["discard"] == pytest.approx(25.0)
    assert p["model"]["waits"] == pytest.approx(0.8)
    assert p["model"]["goodput"] == pytest.approx(0.8905)
    assert p["model_fixed"]["discard"] == pytest.approx(13.0)
    assert p["model_fixed"]["waits"] == pytest.approx(4.8)
    assert p["model_fixed"]["goodput"] == pytest.approx(0.9105)


def test_matched_sync_waits_leave_out_the_waiters_own_downtime():
    assert matched_sync_waits(trace()) == pytest.approx(4.0)


def test_an_exact_handoff_loses_only_the_step_in_flight():
    assert predict(trace(exact0=True), rdv_r_s=0.1)["model_fixed"]["discard"] == pytest.approx(8.0)


def test_laggard_waits_count_each_up_replica_once_when_outages_overlap():
    # R = 3, S = 2; replica 0 down 0 -> 4, replica 1 down 2 -> 6.
    # 0 -> 2: one down, 2 up: 2 x 2 x 2 = 8; 2 -> 4: two down, 1 up: 2 x 1 x 2 = 4; 4 -> 6: 8.  = 20
    from kintsugi.benchmarks.fleet_model import laggard_waits
    assert laggard_waits([(0.0, 4.0), (2.0, 6.0)], replicas=3, stages=2) == pytest.approx(20.0)
    assert laggard_waits([], replicas=3, stages=2) == 0.0
