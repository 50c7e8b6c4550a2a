"""wandb, fed live by the coordinator: an offline run holds the job's config (no token), the tags,
one row per committed step and the rebuild as an event row."""
import glob

import pytest

from testkit import run_trainer
from kintsugi.trainer.reporting.tracking import read_offline_run

pytestmark = pytest.mark.distributed


def test_offline_wandb_run_has_config_tags_steps_and_rebuild_events(tmp_path):
    run_dir = tmp_path / "run"
    _, summary, _ = run_trainer(run_dir, "experiment=quick", "parallel.stages=2", "train.max_steps=8",
                                "train.eval_batches=1", "faults.spares=1",
                                "faults.schedule=[{step: 4, replica: 0, stage: 1, kind: kill}]",
                                "logger.wandb.mode=offline", "logger.wandb.tags=[ci,kill]",
                                env={"KINTSUGI_TOKEN": "sekrit"})
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    config, tags, rows = read_offline_run(files[0])
    assert config["model"]["dim"] == summary["config"]["model"]["dim"]
    assert "token" not in config["recovery"] and "sekrit" not in str(config)
    assert sorted(tags) == ["ci", "kill"]
    steps = sorted({r["trainer/step"] for r in rows if "train/loss" in r})
    assert steps == list(range(8))
    rebuilds = [r for r in rows if r.get("event/kind") == "rebuild"]
    assert len(rebuilds) == 1 and rebuilds[0]["event/slot"] == "r0s1"
    assert rebuilds[0]["event/tier"] == summary["rebuilds"][0]["tier"]
    assert any("val/loss" in r for r in rows)
