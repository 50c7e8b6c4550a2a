"""Failures that overlap and hit the control plane, with real processes and real signals: a worker
killed while a rebuild generation forms (and one step later), the incoming spare killed, more losses
than free spares, the coordinator SIGKILLed (alone and right after a worker), a wall-clock step.

Every case is checked by outcome from the run's own record: every step of every replica committed
exactly once (a duplicate commit record is kept and marked, so it would show), on the batches that
step should train on, and where the numerics must not change, the same losses as a run without the
failure."""
import json
import os
import subprocess
import sys
import time

import pytest

from testkit import ROOT, observed_batch_ids, run_trainer
from kintsugi.recovery.runfiles import standing_commits
from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
from kintsugi.trainer.data.batches import ShardedBatches, load_tokens

pytestmark = pytest.mark.distributed

BASE = ["experiment=quick", "train.eval_batches=1", "recovery.heartbeat_timeout_s=2.0",
        "recovery.progress_timeout_s=20"]


def _kill(step, stage, kind="kill", replica=0, **extra):
    more = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"{{step: {step}, replica: {replica}, stage: {stage}, kind: {kind}{more}}}"


def _commit_records(records):
    return [r for r in records if "loss" in r and "val_loss" not in r and "event" not in r]


def _exactly_once(records, replicas, steps, batch_size=16, seq_len=128):
    """Every step of every replica committed once (no duplicate, no gap) on the right batches."""
    recs = _commit_records(records)
    assert not [r for r in recs if r.get("duplicate")], "a step was committed twice"
    corpus = prepare_corpus(DataConfig(max_files=300))
    tokens = load_tokens(corpus.train_path, corpus.dtype)
    for q in range(replicas):
        mine = [r for r in recs if r["replica"] == q]
        assert sorted(r["step"] for r in mine) == list(range(steps)), f"replica {q}: steps skipped or repeated"
        data = ShardedBatches(tokens, seq_len, batch_size, q, replicas, 0)
        for r in mine:
            assert observed_batch_ids(r, replicas) == data.batch_ids(r["step"]), \
                f"replica {q} step {r['step']} trained on the wrong batch"


def _losses(records, replica=0):
    return {r["step"]: r["loss"] for r in _commit_records(records) if r["replica"] == replica}


def test_survivor_killed_while_the_rebuild_generation_forms(tmp_path):
    # Stage 1 dies at step 4; stage 3 (a survivor, not a source of stage 1's rebuild) is SIGKILLed
    # within milliseconds of the rebuild generation's publication, while its group forms.
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=12",
                                      f"faults.schedule=[{_kill(4, 1)},{_kill(4, 3, on='rebuild')}]")
    assert summary["failures"] == 2
    assert {tuple(rb["slot"]) for rb in summary["rebuilds"]} == {(0, 1), (0, 3)}, summary["rebuilds"]
    _exactly_once(records, 1, 12)


@pytest.mark.slow  # long; test_survivor_killed_while_the_rebuild_generation_forms keeps this window in the default run
def test_survivor_killed_one_step_after_the_rebuild_generation(tmp_path):
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=12",
                                      f"faults.schedule=[{_kill(4, 1)},{_kill(4, 3, on='rebuild', delay_s=0.6)}]")
    assert summary["failures"] == 2
    assert {tuple(rb["slot"]) for rb in summary["rebuilds"]} == {(0, 1), (0, 3)}, summary["rebuilds"]
    _exactly_once(records, 1, 12)


@pytest.mark.slow  # long, and recovery.strategy=copy is not the default; a regression test for one bug
def test_copy_rebuild_never_makes_a_healthy_worker_look_dead(tmp_path):
    # recovery.strategy=copy once cascaded false suspects (BENCHMARKS.md, issue 15): stage 1 is
    # copied from stage 0 while stage 2, its other neighbour, is SIGKILLed as the rebuild generation
    # is published. Only the two killed workers may be declared dead: the donor (stage 0) and the
    # incoming stage-1 worker stay, stage 2 is copied from stage 3, and no step is lost or doubled.
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=12", "recovery.strategy=copy",
                                      f"faults.schedule=[{_kill(4, 1)},{_kill(4, 2, on='rebuild')}]")
    assert summary["failures"] == 2, summary
    assert {tuple(rb["slot"]) for rb in summary["rebuilds"]} == {(0, 1), (0, 2)}, summary["rebuilds"]
    assert {rb["tier"] for rb in summary["rebuilds"]} == {"copy"}
    _exactly_once(records, 1, 12)


def test_incoming_spare_killed_right_after_publication(tmp_path):
    # The second event targets whoever holds slot (0, 2) in the rebuild generation: the spare that
    # was just given it. The slot is planned again with another spare, never left untrained.
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=12",
                                      f"faults.schedule=[{_kill(4, 2)},{_kill(4, 2, on='rebuild')}]")
    assert summary["failures"] == 2
    assert [tuple(rb["slot"]) for rb in summary["rebuilds"]] == [(0, 2)], summary["rebuilds"]
    _exactly_once(records, 1, 12)


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_more_losses_than_spares(tmp_path):
    # Two non-adjacent stages die together with one spare waiting: the launcher starts the missing
    # one (the coordinator publishes how many the waiting slots lack), nothing waits forever.
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=12", "faults.spares=1",
                                      f"faults.schedule=[{_kill(4, 0)},{_kill(4, 2)}]")
    assert summary["failures"] == 2
    assert sorted(rb["tier"] for rb in summary["rebuilds"]) == ["checkfree", "checkfree_plus"]
    _exactly_once(records, 1, 12)


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_no_spare_suspends_after_spare_wait_then_resume_rebuilds_the_lost_slot(tmp_path):
    run = tmp_path / "run"
    proc, summary, records = run_trainer(run, *BASE, "train.max_steps=12", "faults.spares=0", "faults.respawn=false",
                                         "recovery.spare_wait_s=3", f"faults.schedule=[{_kill(5, 1)}]", check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "wait for a worker" in proc.stderr and "kintsugi join" in proc.stderr
    assert "were lost and are rebuilt on resume" in proc.stderr
    saved = json.loads((run / "coordinator_state.json").read_text())
    assert saved["suspend_lost"] == [[0, 1]] and sorted(saved["suspended"]) == ["0,0", "0,2", "0,3"]
    before = _losses(records)
    first_rows = len(records)
    proc, summary, records = run_trainer(run, *BASE, "train.max_steps=12", f"train.resume={run}", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [rb["tier"] for rb in summary["rebuilds"] if rb["step"] > 0][-1] == "checkfree"
    step = saved["suspended"]["0,0"]
    # metrics.jsonl holds both runs: the resume event undoes the first run's rows after the saved
    # step, and every step then stands exactly once (first run's up to `step`, the resumed run's after).
    standing, undone = standing_commits(str(run))
    assert sorted(r["step"] for r in standing) == list(range(12)), "a step is missing or stands twice"
    assert sorted(r["step"] for r in undone) == sorted(k for k in before if k > step)
    resumed = {r["step"] for r in _commit_records(records[first_rows:])}
    assert resumed == set(range(step + 1, 12)), "the resumed run trained exactly the steps after the save"
    kept = {r["step"]: r["loss"] for r in standing if r["step"] <= step}
    assert kept == {k: before[k] for k in range(step + 1)}, "steps before the suspend are unchanged"
    assert summary["steps"] == 12 and summary["missing_steps"] is None


def test_a_replica_that_finished_still_saves_when_the_job_suspends(tmp_path):
    # Streaming DiLoCo, 2 x 2, no spare: replica 1 loses stage 0 at step 3 and waits for a worker;
    # replica 0 trains on alone, finishes its steps and waits for the end. The job then suspends:
    # the finished replica's slots save too (they sat in the end-of-run wait, which once ignored the
    # suspend, so the run stopped with "suspend incomplete" instead of exit 75).
    run = tmp_path / "run"
    proc, summary, records = run_trainer(
        run, *BASE, "train.max_steps=10", "train.eval_every=0", "faults.spares=0", "faults.respawn=false",
        "parallel.replicas=2", "parallel.stages=2", "model.n_layers=4", "diloco.enabled=true", "diloco.sync_every=4",
        "recovery.spare_wait_s=10", f"faults.schedule=[{_kill(3, 0, replica=1)}]", check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    saved = json.loads((run / "coordinator_state.json").read_text())
    assert saved["suspend_lost"] == [[1, 0]], saved.get("error")
    assert sorted(saved["suspended"]) == ["0,0", "0,1", "1,1"], saved.get("error")
    done = sorted(r["step"] for r in records if r.get("replica") == 0 and "loss" in r and "val_loss" not in r)
    assert done == list(range(10)), "replica 0 finished before the suspend (the case this test is about)"
    assert saved["suspended"]["0,0"] == saved["suspended"]["0,1"] == 9


def _plain_run(tmp_path, *extra):
    _, summary, records = run_trainer(tmp_path / "plain", *BASE, *extra)
    return summary, records


@pytest.mark.slow  # long; golden[coordinator] and chaos[4] kill the coordinator in the default run
@pytest.mark.parametrize("grid", [["parallel.replicas=2", "parallel.stages=2", "model.n_layers=4",
                                   "diloco.enabled=false"]], ids=["dp2x2"])
def test_coordinator_killed_mid_run_changes_nothing(tmp_path, grid):
    # The launcher restarts the coordinator on the same port from its persisted state; the workers
    # train on while it is away, re-register and replay the commits it missed. Same losses, every
    # step exactly once.
    plain, plain_records = _plain_run(tmp_path, "train.max_steps=14", "faults=none", *grid)
    proc, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=14", "faults=none", *grid,
                                         "faults.schedule=[{step: 5, target: coordinator, kind: kill}]")
    assert "coordinator reachable again (restarted)" in proc.stderr
    _exactly_once(records, 2, 14)
    for q in (0, 1):
        assert _losses(records, q) == _losses(plain_records, q), "the coordinator's death changed training"
    assert summary["final_val_loss"] == plain["final_val_loss"]
    assert summary["failures"] == 0
    state = json.loads((tmp_path / "run" / "coordinator_state.json").read_text())
    assert state["coordinator_incarnations"] == 2


def test_coordinator_killed_right_after_a_worker(tmp_path):
    # The coordinator dies 50 ms after a worker: before it could plan the rebuild. The restarted one
    # learns of the loss (the launcher reports the exit again, the heartbeat stays silent) and plans it.
    proc, summary, records = run_trainer(
        tmp_path / "run", *BASE, "train.max_steps=12",
        f"faults.schedule=[{_kill(5, 2)},{{step: 5, target: coordinator, kind: kill, delay_s: 0.05}}]")
    assert "coordinator reachable again (restarted)" in proc.stderr
    state = json.loads((tmp_path / "run" / "coordinator_state.json").read_text())
    assert state["coordinator_incarnations"] == 2
    assert summary["failures"] == 1 and [tuple(rb["slot"]) for rb in summary["rebuilds"]] == [(0, 2)]
    _exactly_once(records, 1, 12)


def test_a_wall_clock_step_declares_nobody_dead(tmp_path):
    offset = tmp_path / "clock_offset"
    offset.write_text("0")
    env = dict(os.environ, KINTSUGI_TEST_CLOCK_OFFSET=str(offset),
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests", "clockstep"), ROOT,
                                           os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", *BASE,
           "train.max_steps=24", "faults=none"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        for step_s, at_commits in ((+5.0, 4), (-9.0, 12)):  # forward like an NTP step, then back
            deadline = time.monotonic() + 120
            while not (metrics.exists() and metrics.read_text().count('"loss"') >= at_commits):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            offset.write_text(str(float(offset.read_text()) + step_s))
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failures"] == 0 and summary["rebuilds"] == [], "a clock step declared a worker dead"
    assert "declared dead" not in err
    records = [json.loads(l) for l in metrics.read_text().splitlines()]
    _exactly_once(records, 1, 24)


def test_root_killed_between_publishing_a_step_and_recording_it(tmp_path):
    # Stage 0 (the chain's root) SIGKILLs itself inside its commit of a step: after it published the
    # step's total in the store, before it appended the commit record and before any broadcast. The
    # survivors finish that step from the store's entry; its record must still reach metrics.jsonl
    # (sent by a survivor, as the root wrote it): no step missing, none twice.
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=12",
                                      f"faults.schedule=[{_kill(5, 0, kind='crash_in_commit')}]")
    assert summary["failures"] == 1 and len(summary["rebuilds"]) == 1
    _exactly_once(records, 1, 12)
