"""`train.resume` as an operator gets it wrong, and what a resume leaves in the record.

A 2-stage run with checkpoints is resumed with another parallel.stages (4: each worker would fail
loading layers it does not hold and be replaced without end; 1), another replica count, and, with
its job.json gone, with 4 stages again (the checkpoints' own slot folders and layer ids tell): one
line naming both values and the fix, exit 2, no process started, nothing in the run directory
changed. Then the right resume: the partial checkpoint folders a kill left are tidied (a moved-aside
copy that is the slot's only one is put back, garbage deleted), the earlier run's rows of the steps
trained again are marked discarded by a `resume` event, and summary.json counts every step once."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from testkit import ROOT, commits, run_trainer

pytestmark = pytest.mark.distributed
ARGS = ["experiment=quick", "parallel.stages=2", "train.eval_batches=1", "recovery.checkpoint_every=2"]


def _snapshot(run_dir):
    """Every file under the run directory and its content hash (what a refused resume must not touch)."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """5 steps (0..4), checkpoints after steps 1 and 3: step 4 trained after the last checkpoint."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    _, summary, records = run_trainer(run_dir, *ARGS, "train.max_steps=5")
    assert summary["steps"] == 5 and (run_dir / "checkpoints" / "step_3" / "r0s1" / "MANIFEST.json").is_file()
    return run_dir, records


def _refused(tmp_path, run_dir, *overrides):
    before = _snapshot(run_dir)
    proc, _, _ = run_trainer(tmp_path / "unused", *ARGS, "train.max_steps=7", f"train.resume={run_dir}", *overrides,
                             check=False)
    out = proc.stdout + proc.stderr
    lines = [l for l in out.splitlines() if l.startswith("kintsugi: config error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert _snapshot(run_dir) == before, "a refused resume changed the run directory"
    assert not (tmp_path / "unused" / "job.json").exists(), "a launcher started"
    return lines[0]


def test_a_resume_with_another_shape_is_refused_in_one_line(tmp_path, first_run):
    src, _ = first_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    line = _refused(tmp_path, run_dir, "parallel.stages=4")
    assert "written with parallel.stages=2 but this job has parallel.stages=4" in line
    assert "resume with parallel.stages=2" in line
    assert "parallel.stages=2 but this job has parallel.stages=1" in _refused(tmp_path, run_dir, "parallel.stages=1")
    line = _refused(tmp_path, run_dir, "parallel.replicas=2")
    assert "parallel.replicas=1 but this job has parallel.replicas=2" in line
    assert "model.dim=128 but this job has model.dim=64" in _refused(tmp_path, run_dir, "model.dim=64")
    # The same mistake given to a coordinator on a stable host (torchrun nodes, `kintsugi join`).
    before = _snapshot(run_dir)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), KINTSUGI_TOKEN="t0k")
    proc = subprocess.run([sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", "0", "--run-dir",
                           str(run_dir), "--no-progress", "--", *ARGS, "parallel.stages=4", f"train.resume={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: train.resume=" in proc.stderr and "parallel.stages=2 but this job has parallel.stages=4" \
        in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(run_dir) == before
    # A run without job.json (older, or lost): its checkpoints say what wrote them.
    (run_dir / "job.json").unlink()
    line = _refused(tmp_path, run_dir, "parallel.stages=4")
    assert "stage 0 of its checkpoints holds decoder layers [0, 1, 2, 3] but this job puts layers [0, 1]" in line
    line = _refused(tmp_path, run_dir, "parallel.stages=1")
    assert "slots of parallel.replicas=1 x parallel.stages=2 but this job has parallel.replicas=1 x " \
           "parallel.stages=1" in line


def test_a_resume_tidies_partial_checkpoints_and_marks_the_steps_it_trains_again(tmp_path, first_run):
    src, first_records = first_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    ckpt = run_dir / "checkpoints"
    # What kills mid-write leave: step 3's slot 0 moved aside (`.old-`) by a rewrite that never
    # renamed its new copy into place (the copy aside is the slot's only one), and an unfinished
    # write (`.tmp-`) beside a complete slot.
    (ckpt / "step_3" / "r0s0").rename(ckpt / "step_3" / "r0s0.old-0badf00d")
    garbage = ckpt / "step_1" / "r0s1.tmp-4242-deadbeef"
    garbage.mkdir()
    (garbage / "tensors.bin").write_bytes(b"\0" * 100)
    for p in (garbage, garbage / "tensors.bin"):  # left by a kill two minutes ago
        os.utime(p, (time.time() - 120, time.time() - 120))
    # A write going on right now (another job still writing this run) is left alone.
    writing = ckpt / "step_1" / "r0s0.tmp-4343-0ddba11"
    writing.mkdir()
    per_step = commits(first_records)[0]["tokens"]

    # hydra.run.dir is the run resumed, so that the helper reads its summary and metrics.
    proc, summary, records = run_trainer(run_dir, *ARGS, "train.max_steps=7", f"train.resume={run_dir}")
    assert proc.returncode == 0
    assert (ckpt / "step_3" / "r0s0" / "MANIFEST.json").is_file() and not garbage.exists()
    assert [p.name for p in ckpt.glob("step_*/*") if ".tmp-" in p.name or ".old-" in p.name] == [writing.name]
    resumes = [r["event"] for r in records if r.get("event", {}).get("kind") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == {"0": 3}, resumes
    assert resumes[0]["discarded"] == {"0": [4]} and "missing" not in resumes[0], resumes
    rows = [(r["step"], i) for i, r in enumerate(records) if "loss" in r and "val_loss" not in r and "event" not in r]
    event_at = next(i for i, r in enumerate(records) if r.get("event", {}).get("kind") == "resume")
    assert sorted(k for k, i in rows if i < event_at) == [0, 1, 2, 3, 4]  # the first run's, kept
    assert sorted(k for k, i in rows if i > event_at) == [4, 5, 6]        # trained again after step 3
    assert summary["steps"] == 7 and summary["discarded_steps"] == 1 and summary["missing_steps"] is None
    assert summary["tokens"] == 7 * per_step, "a step trained twice was counted twice"


def test_steps_missing_from_the_record_are_reported_not_claimed(tmp_path, first_run):
    # The rows of steps 1 and 2 never reached metrics.jsonl (lost with a coordinator that died
    # before writing them, its workers gone too). The checkpoint of step 3 proves they were trained,
    # so resuming is right, but the record must say they are missing and the run must not exit 0.
    src, _ = first_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    kept = [l for l in lines if json.loads(l).get("step") not in (1, 2) or "val_loss" in json.loads(l)]
    assert len(kept) == len(lines) - 2
    metrics.write_text("\n".join(kept) + "\n")

    proc, summary, records = run_trainer(run_dir, *ARGS, "train.max_steps=7", f"train.resume={run_dir}", check=False)
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert summary["missing_steps"] == {"0": [1, 2]} and summary["steps"] == 7
    resume = next(r["event"] for r in records if r.get("event", {}).get("kind") == "resume")
    assert resume["missing"] == {"0": [1, 2]}
    assert "lacks committed steps" in proc.stderr
