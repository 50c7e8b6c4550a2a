"""The coordinator dies and its persisted state (`control_state.json`, and job.json with it) is found
cut short when the launcher restarts it, as a crash on a full or failing disk leaves it. Before, the restarted
coordinator died on the JSON error and the launcher exited 1 while every worker still held its
exact state. Now (recovery.salvage) the restarted coordinator takes the re-registering workers at
their word, records the commits they replay, and suspends the job: each slot saves its committed
state, the launcher exits 75 with a line saying why and how to continue, and `train.resume`
finishes the run with every step recorded once."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from testkit import run_trainer, start_trainer
from kintsugi.recovery.runfiles import missing_steps, standing_commits
from testkit import _descendants

pytestmark = pytest.mark.distributed
ARGS = ["experiment=quick", "parallel.stages=2", "train.max_steps=60", "train.eval_batches=1",
        "recovery.heartbeat_timeout_s=2.0"]


def _coordinator_pid(launcher_pid):
    for pid in _descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"kintsugi.trainer.cli.coordinator" in f.read():
                    return pid
        except OSError:
            continue
    raise AssertionError("no coordinator process under the launcher")


def _wait_commits(run_dir, n, proc, timeout=180):
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().count('"loss"') >= n):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)


def test_a_damaged_state_file_suspends_the_job_and_resume_loses_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_trainer(run_dir, *ARGS)
    try:
        _wait_commits(run_dir, 4, proc)
        pid = _coordinator_pid(proc.pid)
        os.kill(pid, signal.SIGSTOP)  # no write of its own can repair the file from here on
        state = run_dir / "control_state.json"
        text = state.read_text()
        state.write_text(text[: len(text) // 2])  # cut short mid-record
        (run_dir / "job.json").write_text('{"model": {"di')  # the same failing disk
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-4000:]
    assert "control_state.json" in err and "cannot be read back" in err, err[-4000:]
    assert f"continue with train.resume={run_dir}" in err, err[-4000:]
    assert (run_dir / "control_state.json.damaged").read_text() == text[: len(text) // 2]
    final = json.loads((run_dir / "coordinator_state.json").read_text())
    saved = final["suspended"]
    assert sorted(saved) == ["0,0", "0,1"] and len(set(saved.values())) == 1, final
    step = next(iter(saved.values()))
    for s in (0, 1):
        assert (run_dir / "checkpoints" / f"step_{step}" / f"r0s{s}" / "MANIFEST.json").is_file()
    # What the workers still held is in the record: every step up to the one they saved, once.
    standing, _ = standing_commits(str(run_dir))
    kept = sorted(r["step"] for r in standing)
    assert kept[: step + 1] == list(range(step + 1)), kept
    assert missing_steps(standing) == {}

    proc2, summary, _ = run_trainer(run_dir, *ARGS, f"train.resume={run_dir}")
    assert proc2.returncode == 0
    standing, _ = standing_commits(str(run_dir))
    assert sorted(r["step"] for r in standing) == list(range(60)), "a step is missing or counted twice"
    assert summary["steps"] == 60 and summary["missing_steps"] is None
