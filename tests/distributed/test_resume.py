"""`train.resume`: a job killed mid-run (as a Slurm preemption would) continues from its last
complete checkpoint and follows the uninterrupted run's loss curve bit for bit; a job warned of its
preemption (SIGUSR1 to the launcher, as Slurm's `--signal`) suspends with exact per-slot checkpoints
(exit 75) and resumes from them."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from testkit import ROOT, commits, run_trainer

pytestmark = pytest.mark.distributed
ARGS = ["experiment=quick", "train.max_steps=12", "recovery.checkpoint_every=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    _, _, full = run_trainer(tmp_path_factory.mktemp("full") / "run", *ARGS)
    return {c["step"]: c["loss"] for c in commits(full)}


def _start(run_dir, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", *ARGS,
                             *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, text=True)


def _wait_for_step(run_dir, step, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = run_dir / "metrics.jsonl"
        if m.exists() and f'"step": {step},' in m.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never committed in {run_dir}")


def _resumed_curve(run_dir):
    got = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():  # the resumed run appends here
        rec = json.loads(line)
        if "loss" in rec and "val_loss" not in rec:
            got[rec["step"]] = rec["loss"]  # the last record of a step wins: the resumed one
    return got


def test_resume_continues_the_same_loss_curve(tmp_path, uninterrupted):
    run_dir = tmp_path / "cut"
    job = _start(run_dir)
    _wait_for_step(run_dir, 9)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job dies at once, as on a preempted node
    job.wait()
    assert (run_dir / "checkpoints" / "step_7" / "r0s0" / "MANIFEST.json").is_file(), "a checkpoint per slot"
    # The resumed job works in the run dir it resumes (its hydra.run.dir is not used).
    _, _, _ = run_trainer(tmp_path / "unused", *ARGS, f"train.resume={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    got = _resumed_curve(run_dir)
    assert sorted(got) == list(range(12))
    for step in range(12):
        assert got[step] == uninterrupted[step], (step, got[step], uninterrupted[step])
    assert summary["steps"] == 12


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_preemption_warning_suspends_exactly_and_resume_continues(tmp_path, uninterrupted):
    # Slurm's `--signal=USR1@90` (or a scheduler's SIGTERM) to the launcher: every worker is leaving
    # and no spare is free, so each slot checkpoints its committed state and the job exits 75.
    run_dir = tmp_path / "warned"
    job = _start(run_dir, "faults.spares=1")
    _wait_for_step(run_dir, 5)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 75, err[-3000:]
    assert "train.resume=" in err
    state = json.loads((run_dir / "coordinator_state.json").read_text())
    saved = state["suspended"]
    assert sorted(saved) == ["0,0", "0,1", "0,2", "0,3"] and len(set(saved.values())) == 1, saved
    step = next(iter(saved.values()))
    assert step >= 5
    assert (run_dir / "checkpoints" / f"step_{step}" / "r0s3" / "MANIFEST.json").is_file()
    _, _, _ = run_trainer(tmp_path / "unused", *ARGS, f"train.resume={run_dir}")
    got = _resumed_curve(run_dir)
    assert sorted(got) == list(range(12))
    for k in range(12):
        assert got[k] == uninterrupted[k], (k, got[k], uninterrupted[k])


def test_resume_of_a_run_without_checkpoints_is_a_one_line_error(tmp_path):
    from kintsugi.trainer.cli.compose import validate_overrides
    msg = validate_overrides([f"train.resume={tmp_path}"])
    assert msg and "train.resume" in msg and "checkpoint_every" in msg and "\n" not in msg


# ~30-95 s; the fallback itself is unit-tested (test_checkpoint_files.py::test_resume_falls_back_past_a_bad_step_and_reports_it)
@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, uninterrupted):
    # The job dies after step 9 (checkpoints at steps 3 and 7); then one data file of step 7 is cut
    # short, as a crash mid-copy or a full disk leaves it. Resume must name the bad file, continue
    # from step 3 (every slot: an exact state that cannot be restored is never rebuilt
    # approximately) and follow the uninterrupted curve bit for bit.
    run_dir = tmp_path / "damaged"
    job = _start(run_dir)
    _wait_for_step(run_dir, 9)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    victim = run_dir / "checkpoints" / "step_7" / "r0s2"
    data = max((p for p in victim.iterdir() if p.name != "MANIFEST.json"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    proc, _, _ = run_trainer(tmp_path / "unused", *ARGS, f"train.resume={run_dir}")
    assert "step_7/r0s2" in proc.stderr and data.name in proc.stderr, proc.stderr[-3000:]
    assert "resuming from an older step" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rebuilds"] == [] and summary["failures"] == 0, "a slot was rebuilt approximately"
    got = _resumed_curve(run_dir)
    assert sorted(got) == list(range(12))
    for k in range(12):
        assert got[k] == uninterrupted[k], (k, got[k], uninterrupted[k])
    # Steps 4..7 were trained twice (once before the kill, once after resuming from step 3): the
    # record keeps both and the second is not marked a duplicate (the first was undone).
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line and "val_loss" not in line and '"event"' not in line]
    assert all(steps.count(k) >= 2 for k in range(4, 8)), steps
