"""Smoke test of benchmarks/pipeline_throughput.py: the --quick run (2 stage processes, 2 timed steps)
prints one JSON line with a positive throughput for every variant, and both frameworks compute the
same first-step loss, i.e. the benchmark compares equal work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("ours/gpipe", "torch/gpipe", "ours/1f1b", "torch/1f1b")
# ~25 s on an idle 2-core machine (process start-up and torch imports are most of it); the bound
# leaves room for a CPU shared with other jobs.
BUDGET_S = 150


@pytest.fixture(scope="module")
def result() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline_throughput", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=BUDGET_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {lines!r}"
    out = json.loads(lines[0])
    out["_elapsed_s"] = time.time() - t0
    return out


def test_every_variant_has_positive_throughput(result):
    assert set(result["tokens_per_s"]) == set(VARIANTS)
    for v in VARIANTS:
        assert result["tokens_per_s"][v] > 0, v
        assert result["cpu_s_per_step"][v] > 0, v
        assert len(result["tokens_per_s_reps"][v]) == 1  # --quick: one repetition


def test_ratios_per_schedule(result):
    for sched in ("gpipe", "1f1b"):
        key = f"ours_over_torch/{sched}"
        expected = result["tokens_per_s"][f"ours/{sched}"] / result["tokens_per_s"][f"torch/{sched}"]
        assert result["ratio"][key] == pytest.approx(expected, rel=1e-2)


def test_config_and_version(result):
    cfg = result["config"]
    assert (cfg["stages"], cfg["steps"], cfg["repetitions"], cfg["microbatches"]) == (2, 2, 1, 4)
    assert cfg["threads_per_process"] == 1
    assert result["torch"]
    assert result["_elapsed_s"] < BUDGET_S


def test_frameworks_compute_the_same_loss(result):
    # Same seeded stage weights and the same first batch: a mismatch means the runners do different work.
    losses = result["first_step_loss"]
    ref = losses["ours/gpipe"]
    assert 0 < ref < 10
    for v in VARIANTS:
        assert losses[v] == pytest.approx(ref, rel=1e-5), v
