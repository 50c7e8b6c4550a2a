"""`train.resume`: a job killed mid-run (as a Slurm preemption would) continues from its last
complete checkpoint and follows the uninterrupted run's loss curve bit for bit."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, commits, run_trainer

pytestmark = pytest.mark.distributed
ARGS = ["experiment=quick", "train.max_steps=12", "recovery.checkpoint_every=4"]


def test_resume_continues_the_same_loss_curve(tmp_path):
    _, _, full = run_trainer(tmp_path / "full", *ARGS)
    run_dir = tmp_path / "cut"
    env = dict(os.environ, PYTHONPATH=ROOT)
    job = subprocess.Popen([sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", *ARGS],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        m = run_dir / "metrics.jsonl"
        if m.exists() and '"step": 9,' in m.read_text():
            break
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job dies at once, as on a preempted node
    job.wait()
    assert (run_dir / "checkpoints" / "step_7").is_dir()
    # The resumed job works in the run dir it resumes (its hydra.run.dir is not used).
    _, _, _ = run_trainer(tmp_path / "unused", *ARGS, f"train.resume={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = {c["step"]: c["loss"] for c in commits(full)}
    got = {}
    for rec in resumed:  # the resumed run appends to the same metrics.jsonl
        if "loss" in rec and "val_loss" not in rec:
            got[rec["step"]] = rec["loss"]  # the last record of a step wins: the resumed one
    assert sorted(got) == list(range(12))
    for step in range(12):
        assert got[step] == want[step], (step, got[step], want[step])
    assert summary["steps"] == 12


def test_resume_of_a_run_without_checkpoints_is_a_one_line_error(tmp_path):
    from trainer.cli import validate_overrides
    msg = validate_overrides([f"train.resume={tmp_path}"])
    assert msg and "train.resume" in msg and "checkpoint_every" in msg and "\n" not in msg
