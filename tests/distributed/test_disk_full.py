"""A full disk never passes silently and never stops training that can go on: the kernel's own
ENOSPC, from /dev/full (no privileges needed) and from a real filesystem that fills up (a small
tmpfs; skipped where mounting is not permitted)."""
import json
import os
import subprocess
import uuid

import pytest

from testkit import run_trainer

pytestmark = pytest.mark.distributed
JOB = ["experiment=quick", "train.max_steps=8", "train.eval_batches=1", "faults=none"]


def test_metrics_on_a_full_disk_training_finishes_and_says_the_record_is_incomplete(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink("/dev/full", run / "metrics.jsonl")  # every write: [Errno 28] No space left on device
    proc, summary, _ = run_trainer(run, *JOB, check=False)
    assert proc.returncode == 74, proc.stderr[-3000:]  # EX_IOERR, never 0
    assert "cannot write metrics.jsonl" in proc.stderr and "No space left on device" in proc.stderr
    assert "training finished, but its record is incomplete" in proc.stderr
    assert "No space left on device" in summary["write_error"]
    assert summary["steps"] == 8 and summary["error"] is None  # training itself went on to the end
    assert summary["final_val_loss"] is not None
    assert (run / "final").is_dir() and any((run / "final").iterdir())


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:120]})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_checkpoints_filling_the_disk_are_reported_and_training_goes_on(small_fs):
    # Each checkpoint of the quick model's 4 slots takes ~MBs: the 3 MB filesystem fills at the first
    # or second one. Failed writes are reported (log and summary), leave nothing that looks complete,
    # and training continues to the last step.
    run = small_fs / "run"
    proc, summary, _ = run_trainer(run, *JOB, "train.max_steps=10", "recovery.checkpoint_every=3", check=False)
    assert proc.returncode == 74, "a run whose outputs did not fit on the disk must not exit 0"
    assert "could not write its checkpoint of step 2" in proc.stderr and "No space left on device" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "training finished, but its record is incomplete" in proc.stderr
    assert not list(run.glob("checkpoints/step_*/*.tmp-*")), "half-written checkpoints left behind"
    for manifest in run.glob("checkpoints/step_*/*/MANIFEST.json"):
        json.loads(manifest.read_text())  # whatever claims to be complete is
    if summary is not None:  # it may not fit either; the exit code and the log carry the news then
        assert summary["checkpoint_errors"], summary
        assert summary["steps"] == 10 and summary["error"] is None  # training itself went on
