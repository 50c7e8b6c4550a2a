"""Smoke tests of the recovery benchmarks (benchmarks/recovery.py, benchmarks/checkfree_convergence.py).

Default run: one fast test of the shared helpers on a real 8-step trainer run with one SIGKILL
(the rebuild event is read back, the coordinator clock is recovered, the failure's timings are
consistent). The --quick benchmarks themselves take minutes, so they are marked slow.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from testkit import run_benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kintsugi.benchmarks import _runs  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.slow  # 30-75 s; kept out of the default run for its length
def test_run_helpers_measure_one_kill(tmp_path):
    schedule = [{"step": 4, "replica": 0, "stage": 1, "kind": "kill"}]
    res = _runs.run_job("smoke", str(tmp_path / "run"),
                        ["train.max_steps=8", "train.eval_every=0", "train.eval_batches=1", "faults.spares=1",
                         "recovery.strategy=checkfree", _runs.schedule_override(schedule)],
                        stall_s=60, timeout_s=150, stop_when_evals=_runs.final_eval_seen)
    assert res.ok, res.error + "\n" + res.stderr_tail
    assert res.stopped_early  # ended at the final evaluation, not left to shut down by itself
    steps = [c["step"] for c in _runs.commits_of(res)]
    assert steps == list(range(8))  # the failed step was retried, nothing lost or repeated
    (ev,) = _runs.rebuilds_of(res)
    assert ev["slot"] == [0, 1] and ev["tier"] == "checkfree" and ev["step"] == 4
    assert 0 < ev["detect_s"] < ev["recover_s"]
    t0 = _runs.coordinator_t0(res.events)
    failed_rel = ev["failed_at"] - t0
    # The failure lies between the commits of steps 3 and 4 on the coordinator's clock.
    by_step = {c["step"]: c["wall_s"] for c in _runs.commits_of(res)}
    assert by_step[3] - 0.2 <= failed_rel < by_step[4]  # slack: the coordinator drains its logs every 10 ms
    assert _runs.steady_tokens_per_s(_runs.commits_of(res), skip=5) > 0
    # CPU of the job's own processes was sampled and grows.
    assert res.cpu_samples and res.cpu_samples[-1][2] > res.cpu_samples[0][2]


def _run_module(module: str, timeout: int) -> dict:
    return run_benchmark(module, "--quick", timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_recovery_quick():
    out = _run_module("benchmarks.recovery", 590)
    assert out["fault_run"]["error"] is None
    kill, stop = out["kill"], out["stop"]
    assert kill["detect_s"]["n"] == 1 and stop["detect_s"]["n"] == 1
    # A SIGKILL is reported by the peers (milliseconds); a SIGSTOP only by the heartbeat timeout (3 s).
    assert kill["detect_s"]["max"] < 1.0
    assert stop["detect_s"]["min"] > 1.0
    assert kill["detect_s"]["max"] <= kill["recover_s"]["max"] <= kill["commit_s"]["max"]
    ov = out["overhead"]
    assert ov["ratio_default_over_disabled"] > 0 and ov["cpu_ratio_default_over_disabled"] > 0


@pytest.mark.slow  # ~50 s: four trainer jobs; kept out of the default run's 20-minute budget
@pytest.mark.timeout(600)
def test_checkfree_convergence_small(tmp_path):
    """The redesigned benchmark end to end at a size the default suite affords: a 16-step
    pretraining, a resumed reference, and one seeded failure under two strategies."""
    out = run_benchmark("benchmarks.checkfree_convergence", "--quick", "--pre-steps", "16", "--post-steps", "14",
                        "--seeds", "1", "--strategies", "checkfree,checkpoint", "--out",
                        str(tmp_path / "cfc"), timeout=400)
    rows = {s: out["base_runs"][s][0] for s in ("checkfree", "checkpoint")}
    for s, row in rows.items():
        assert "error" not in row and "failures_seen" not in row, row
        # The seed's kill lands on the stage and step the run planned, for every strategy.
        assert row["stage"] == row["kill"][1] and row["step"] == row["kill"][0], row
    assert rows["checkfree"]["tier"] == "checkfree"
    # A rollback restores the exact state and re-trains the same batches: the final validation
    # loss is the no-failure run's, bit for bit, and the re-done steps show no jump at all.
    assert rows["checkpoint"]["tier"] == "checkpoint"
    assert rows["checkpoint"]["final_val_ratio"] == 1.0 and rows["checkpoint"]["jump"] == 0.0
    assert rows["checkpoint"]["steps_to_recover"] >= 1  # the steps after the checkpoint, re-done
    # An approximate rebuild moves the loss off the no-failure curve (the record shows the damage).
    assert rows["checkfree"]["jump"] > 0 and rows["checkfree"]["final_val_ratio"] != 1.0
    assert set(out["per_strategy"]) == {"checkfree", "checkpoint"}
    assert (tmp_path / "cfc" / "convergence.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_checkfree_convergence_quick():
    out = _run_module("benchmarks.checkfree_convergence", 1190)
    for strategy in ("random", "copy", "average", "checkfree", "checkfree_plus", "checkpoint"):
        assert len(out["base_runs"][strategy]) == 3
        for row in out["base_runs"][strategy]:
            assert "error" not in row, row
        assert out["per_strategy"][strategy]["median_final_val_ratio"] is not None
    assert os.path.exists(ROOT / out["plot"])
