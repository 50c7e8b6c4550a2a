"""Bad numbers never pass silently: a non-finite loss or gradient norm is never committed (the step is
skipped on every stage, recorded as skipped), a run of them rolls the replica back or stops the run
with a clear message and a non-zero exit, and every record stays strict JSON."""
import json
import math

import pytest

from testkit import run_trainer

pytestmark = pytest.mark.distributed


def _strict(path):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name} in {path}")
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(l, parse_constant=refuse) for l in text.splitlines()]
    return json.loads(text, parse_constant=refuse)


def _commits(records):
    return [r for r in records if "step" in r and "val_loss" not in r and "event" not in r]


def test_divergence_without_a_checkpoint_stops_with_a_clear_message(tmp_path):
    run = tmp_path / "run"
    proc, _, _ = run_trainer(run, "experiment=quick", "train.max_steps=20", "train.lr=1e6", "train.grad_clip=0",
                             "train.warmup_steps=0", "faults=none", "train.eval_batches=1", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "training diverged" in proc.stderr and "train.lr" in proc.stderr
    records = _strict(run / "metrics.jsonl")
    summary = _strict(run / "summary.json")
    commits = _commits(records)
    bad = [c for c in commits if c.get("nonfinite")]
    assert len(bad) >= 3 and all(c["loss"] is None for c in bad), "non-finite steps are recorded as skipped"
    assert all(math.isfinite(c["loss"]) for c in commits if not c.get("nonfinite")), "nothing non-finite committed"
    assert summary["nonfinite_steps"] == len(bad) and summary["error"] and "diverged" in summary["error"]
    assert not (run / "final").exists(), "no final weights from a run that did not end"


def test_nan_weights_roll_a_diloco_replica_back_to_its_global_copy(tmp_path):
    # Replica 0's stage 1 turns NaN at step 10: three skipped steps, then the replica restarts from
    # its outer global copy with half the learning rate; replica 1 never notices.
    run = tmp_path / "run"
    _, summary, records = run_trainer(
        run, "experiment=quick", "parallel.replicas=2", "parallel.stages=2", "model.n_layers=4",
        "train.max_steps=24", "train.eval_batches=1", "diloco.enabled=true", "diloco.sync_every=4",
        "faults=none", "faults.schedule=[{step: 10, replica: 0, stage: 1, kind: poison}]")
    records = _strict(run / "metrics.jsonl")
    commits = _commits(records)
    skipped = sorted(c["step"] for c in commits if c.get("nonfinite"))
    assert skipped and skipped[0] >= 9 and all(c["replica"] == 0 for c in commits if c.get("nonfinite"))
    assert len(skipped) == 3, skipped
    for r in (0, 1):
        assert sorted(c["step"] for c in commits if c["replica"] == r) == list(range(24)), "every step once"
    after = [c for c in commits if c["replica"] == 0 and c["step"] > skipped[-1]]
    assert after and all(math.isfinite(c["loss"]) for c in after), "training resumed with finite losses"
    assert [e["event"]["kind"] for e in records if "event" in e].count("diverged") == 1
    assert summary["divergences"] == 1 and summary["final_val_loss"] is not None
    assert math.isfinite(summary["final_val_loss"])


def test_nan_weights_roll_back_to_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    _, summary, records = run_trainer(
        run, "experiment=quick", "train.max_steps=20", "train.eval_batches=1", "faults=none",
        "recovery.checkpoint_every=4", "faults.schedule=[{step: 9, replica: 0, stage: 2, kind: poison}]")
    records = _strict(run / "metrics.jsonl")
    commits = _commits(records)
    assert any(c.get("nonfinite") for c in commits)
    final = {c["step"]: c for c in commits}  # the record of each step after the rollback
    assert sorted(final) == list(range(20))
    assert all(math.isfinite(c["loss"]) for k, c in final.items() if k > 12)
    assert summary["divergences"] == 1 and math.isfinite(summary["final_val_loss"])
