"""benchmarks/_goodput.py against a small run directory whose goodput is worked out by hand below.

The run: 2 replicas x 2 stages on 4 machines (one worker each), coordinator t0 = 1000 (times below are
seconds after it). Machine m0 (a worker of replica 0) is killed at 13.4, its process is gone at 13.45;
replica 0's rebuild event says failed 13.4, resumed 16.4, detected in 0.2 s. The replacement m4 starts
at 15.4. Everything still alive exits at 21.

    replica 0: steps 0, 1, 2 at 11, 12, 13 (generation 0); 3, 4, 5 at 17.4, 18.4, 19.4 (generation 1)
    replica 1: steps 0..5 at 11, 12, 13, 14.5, 15.5, 16.5; step 3 waited on the outer sync
               0.5 s (stage 0) and 0.25 s (stage 1)

Pace: replica 0's gaps in one generation are 1, 1, 1, 1 -> 1.0; replica 1's are 1, 1, 1.5 - 0.5
(longest stage wait), 1, 1 -> 1.0. Window: from 11 - 1.0 = 10 (both replicas) to the last commit,
19.4: T = 9.4, slot time 4 x 9.4 = 37.6.

    useful  = 12 steps x 1.0 s x 2 stages - 3 (unsynced, below)    = 21
    outage  = 2 x (16.4 - 13.4) = 6, of which detection 2 x 0.2 = 0.4, waiting for the replacement
              2 x (15.4 - 13.4 - 0.2) = 3.6, restart+regroup+transfer 6 - 0.4 - 3.6 = 2.0
    discard = 2 x (13.4 - 13) (the step in flight)                  = 0.8
              + the peer-rebuilt stage's 3 steps since its last sync (step 3 mod H=10) x 1.0 = 3
              (committed, so they left useful above)                -> 3.8
    waits   = sync 0.5 + 0.25 = 0.75; end: replica 1 idles 2 x (19.4 - 16.5) = 5.8   -> 6.55
    pace    = 37.6 - 21 - 6 - 3.8 - 6.55                            = 0.25  (stage 1's share of
              replica 1's 0.5 s sync delay that it did not spend waiting)
    paid    = m0 10 -> 13.45 (3.45) + m1..m3 3 x 9.4 (28.2) + m4 15.4 -> 19.4 (4.0) = 35.65
    unpaid  = one slot without a machine 13.45 -> 15.4 = 1.95, taken off the outage: 6 - 1.95 = 4.05
              (off the replacement wait: 3.6 - 1.95 = 1.65)
    goodput = 21 / 35.65 = 0.589060; lifetimes 8.45 + 3 x 16 + 5.6 = 62.05 -> 21 / 62.05 = 0.338437
"""
import json

import pytest

from kintsugi.benchmarks._goodput import RunRecord, account, goodput_of

T0 = 1000.0


def _commit(replica, step, t, gen=0, wait=(0.0, 0.0)):
    return {"replica": replica, "step": step, "loss": 1.0, "tokens": 10, "wall_s": t, "gen": gen,
            "outer_wait_s": list(wait)}


def write_run(path, extra_machines=(), scale=1.0, tier="peer"):
    """The run above, every time multiplied by `scale` (a uniformly slower machine)."""
    s = scale
    (path / "job.json").write_text(json.dumps({"parallel": {"replicas": 2, "stages": 2},
                                               "diloco": {"enabled": True, "sync_every": 10}}))
    (path / "control_state.json").write_text(json.dumps({"t0": T0}))
    machines = {"m0": (5, 13.45, "kill"), "m1": (5, 21, None), "m2": (5, 21, None), "m3": (5, 21, None),
                "m4": (15.4, 21, None), **dict(extra_machines)}
    (path / "machines.json").write_text(json.dumps({
        m: {"start": T0 + a * s, "end": T0 + b * s, "cause": c, "alive_s": (b - a) * s, "workers": [f"w{m}"]}
        for m, (a, b, c) in machines.items()}))
    recs = [_commit(0, k, t * s) for k, t in enumerate((11, 12, 13))]
    recs += [_commit(0, k, t * s, gen=1) for k, t in zip((3, 4, 5), (17.4, 18.4, 19.4))]
    recs += [_commit(1, k, t * s, wait=(0.5 * s, 0.25 * s) if k == 3 else (0.0, 0.0))
             for k, t in enumerate((11, 12, 13, 14.5, 15.5, 16.5))]
    recs.append({"event": {"kind": "rebuild", "slot": [0, 0], "tier": tier, "step": 3, "detect_s": 0.2 * s,
                           "recover_s": 3.0 * s, "failed_at": T0 + 13.4 * s, "resumed_at": T0 + 16.4 * s,
                           "t": 16.45 * s}})
    recs.append({"step": 6, "val_loss": 2.0, "final": True, "wall_s": 20.0 * s})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_goodput_and_losses_match_the_hand_worked_run(tmp_path):
    g = goodput_of(write_run(tmp_path))
    assert g.pace_s == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    assert g.steps == {0: 6, 1: 6}
    assert g.window_s == (pytest.approx(10.0), pytest.approx(19.4))
    assert g.useful_machine_s == pytest.approx(21.0)
    assert g.paid_machine_s == pytest.approx(35.65)
    assert g.unpaid_machine_s == pytest.approx(1.95)
    assert g.lost_machine_s == {"outage": pytest.approx(4.05), "discard": pytest.approx(3.8),
                                "waits": pytest.approx(6.55), "idle": pytest.approx(0.0), "stall": pytest.approx(0.0),
                                "pace": pytest.approx(0.25)}
    assert g.outage_parts_machine_s == {"detect": pytest.approx(0.4), "replacement": pytest.approx(1.65),
                                        "restart_regroup_transfer": pytest.approx(2.0)}
    assert g.wait_parts_machine_s == {"sync": pytest.approx(0.75), "start": pytest.approx(0.0),
                                      "end": pytest.approx(5.8)}
    assert g.discard_parts_machine_s == {"in_flight": pytest.approx(0.8), "repeated": pytest.approx(0.0),
                                         "unsynced": pytest.approx(3.0)}
    assert g.goodput == pytest.approx(0.589060, abs=1e-6)
    assert g.goodput_lifetime == pytest.approx(0.338437, abs=1e-6)
    assert g.startup_teardown_machine_s == pytest.approx(26.4)


def test_a_machine_with_no_slot_is_idle_and_no_slot_goes_unpaid(tmp_path):
    # A fifth machine alive through the window (useful 21, as above): n(t) = 5 except 13.45 -> 15.4 (4, m0 gone), so idle =
    # (13.45 - 10) + (19.4 - 15.4) = 7.45, nothing unpaid, the whole outage 6 is paid; paid 35.65 + 9.4.
    g = goodput_of(write_run(tmp_path, extra_machines={"m9": (5, 21, None)}))
    assert g.paid_machine_s == pytest.approx(45.05)
    assert g.lost_machine_s["idle"] == pytest.approx(7.45)
    assert g.lost_machine_s["outage"] == pytest.approx(6.0)
    assert g.unpaid_machine_s == pytest.approx(0.0)
    assert g.goodput == pytest.approx(21 / 45.05)


def test_a_uniformly_slower_machine_leaves_goodput_unchanged(tmp_path):
    (tmp_path / "fast").mkdir()
    (tmp_path / "slow").mkdir()
    fast = goodput_of(write_run(tmp_path / "fast"))
    slow = goodput_of(write_run(tmp_path / "slow", scale=1.7))
    assert slow.pace_s[0] == pytest.approx(1.7)
    assert slow.goodput == pytest.approx(fast.goodput)
    assert slow.fractions() == pytest.approx(fast.fractions())


def test_a_run_without_two_consecutive_commits_is_refused(tmp_path):
    rec = RunRecord.from_run_dir(write_run(tmp_path))
    rec.commits = [c for c in rec.commits if c.replica == 0 or c.step == 0]
    with pytest.raises(ValueError, match="replica 1"):
        account(rec)


def test_a_handoff_keeps_the_stages_progress_since_the_last_sync(tmp_path):
    # The leaving worker streamed its own state: nothing is reset to the last sync, useful stays 24.
    g = goodput_of(write_run(tmp_path, tier="handoff"))
    assert g.discard_parts_machine_s["unsynced"] == pytest.approx(0.0)
    assert g.useful_machine_s == pytest.approx(24.0)
    assert g.goodput == pytest.approx(24 / 35.65)


def _synced_run(path, outage=False, lag=False):
    """2 replicas x 2 stages on 4 machines alive 5 -> 21, H = 2, no failure unless `outage`.

    replica 0: steps 0..5 at 11..16, no waits. replica 1: steps 0..5 at 11, 12.5, 13.5, 15, 16, 18.5,
    waiting on the outer sync (0.5, 0.5) at steps 1 and 3 and (1.5, 1.5) at step 5 (stage 0, stage 1).
    Paces 1.0 (replica 1: 1.5 - 0.5, 1, 1.5 - 0.5, 1, 2.5 - 1.5). Window 10 -> 18.5: slot time and paid
    4 x 8.5 = 34. `outage`: replica 0 hands slot 0,0 off from 15.2 to 15.3 (its step 5 in generation 1).
    `lag`: replica 1 waits (5, 5) at step 5, at 22 (machines alive to 25).
    """
    (path / "job.json").write_text(json.dumps({"parallel": {"replicas": 2, "stages": 2},
                                               "diloco": {"enabled": True, "sync_every": 2}}))
    (path / "control_state.json").write_text(json.dumps({"t0": T0}))
    (path / "machines.json").write_text(json.dumps({
        m: {"start": T0 + 5, "end": T0 + 25, "cause": None, "alive_s": 20, "workers": [f"w{m}"]}
        for m in ("m0", "m1", "m2", "m3")}))
    recs = [_commit(0, k, 11 + k, gen=1 if outage and k == 5 else 0) for k in range(6)]
    waits = {1: (0.5, 0.5), 3: (0.5, 0.5), 5: (5.0, 5.0) if lag else (1.5, 1.5)}
    recs += [_commit(1, k, t, wait=waits.get(k, (0.0, 0.0)))
             for k, t in enumerate((11, 12.5, 13.5, 15, 16, 22 if lag else 18.5))]
    if outage:
        recs.append({"event": {"kind": "rebuild", "slot": [0, 0], "tier": "handoff", "step": 5, "detect_s": 0.0,
                               "recover_s": 0.1, "failed_at": T0 + 15.2, "resumed_at": T0 + 15.3, "t": 15.3}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_waits_at_syncs_no_failure_touched_are_part_of_the_pace(tmp_path):
    # Replica 1's rounds (steps 0-1, 2-3, 4-5) waited 1, 1 and 3 machine-s with nothing failed: what
    # a failure-free run of these replicas on this machine waits too, 5/3 a round, 5/6 a step.
    #   useful = 6 x 1.0 x 2 (replica 0) + 6 x 1.0 x 2 + 6 x 5/6 (replica 1) = 29
    #   waits  = sync 5 - 5 = 0; end: replica 0 idles 2 x (18.5 - 16) = 5
    #   goodput = 29 / 34
    g = goodput_of(_synced_run(tmp_path))
    assert g.pace_s == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    assert g.paid_machine_s == pytest.approx(34.0)
    assert g.useful_machine_s == pytest.approx(29.0)
    assert g.wait_parts_machine_s == {"sync": pytest.approx(0.0), "start": pytest.approx(0.0),
                                      "end": pytest.approx(5.0)}
    assert g.lost_machine_s["pace"] == pytest.approx(0.0)
    assert g.goodput == pytest.approx(29 / 34)


def test_waits_in_a_round_a_failure_touched_stay_a_loss(tmp_path):
    # The handoff (15.2 -> 15.3) overlaps replica 1's last round (and its window from the round before,
    # 13.5 -> 18.5), not round 1 (11 -> 15) or round 0: the failure-free wait is (1 + 1) / 2 a round,
    # 0.5 a step.
    #   useful  = 12 + 12 + 6 x 0.5 = 27
    #   outage  = 2 x 0.1 = 0.2; discard: the step in flight 2 x (15.2 - 15) = 0.4
    #   waits   = sync 5 - 3 = 2; end 5 -> 7
    #   pace    = 34 - 27 - 0.2 - 0.4 - 7 = -0.6 (replica 0's step 5 gap held the outage)
    #   goodput = 27 / 34
    g = goodput_of(_synced_run(tmp_path, outage=True))
    assert g.useful_machine_s == pytest.approx(27.0)
    assert g.lost_machine_s["outage"] == pytest.approx(0.2)
    assert g.discard_parts_machine_s["in_flight"] == pytest.approx(0.4)
    assert g.wait_parts_machine_s["sync"] == pytest.approx(2.0)
    assert g.lost_machine_s["waits"] == pytest.approx(7.0)
    assert g.lost_machine_s["pace"] == pytest.approx(-0.6)
    assert g.goodput == pytest.approx(27 / 34)


def test_a_wait_of_several_steps_at_a_sync_stays_a_loss_without_a_recorded_failure(tmp_path):
    # Replica 1 waits 5 s per stage at step 5 (median step 1.0 s: beyond 4 medians, a lag, not noise):
    # that round is not failure-free, the others (1 and 1) are: 0.5 a step. Window 10 -> 22: 48.
    #   useful = 12 + 12 + 6 x 0.5 = 27; waits: sync 1 + 1 + 10 - 3 = 9, end 2 x (22 - 16) = 12 -> 21
    #   goodput = 27 / 48
    g = goodput_of(_synced_run(tmp_path, lag=True))
    assert g.paid_machine_s == pytest.approx(48.0)
    assert g.useful_machine_s == pytest.approx(27.0)
    assert g.wait_parts_machine_s == {"sync": pytest.approx(9.0), "start": pytest.approx(0.0),
                                      "end": pytest.approx(12.0)}
    assert g.lost_machine_s["pace"] == pytest.approx(0.0)
    assert g.goodput == pytest.approx(27 / 48)
