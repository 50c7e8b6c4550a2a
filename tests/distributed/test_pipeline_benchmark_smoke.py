"""Smoke test of benchmarks/pipeline_throughput.py: the --quick run (2 stage processes, 2 timed steps)
prints one JSON line with a positive throughput for every variant, and every framework computes the
same first-step loss, i.e. the benchmark compares equal work. DeepSpeed's PipelineModule joins (under
1f1b, its only schedule) where deepspeed is installed; without it the line says it was skipped."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from testkit import run_benchmark

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
VARIANTS = ("ours/gpipe", "torch/gpipe", "ours/1f1b", "torch/1f1b") + (("deepspeed/1f1b",) if HAS_DEEPSPEED else ())
# ~25 s on an idle 2-core machine (process start-up and torch imports are most of it; DeepSpeed's
# import and engine set-up add ~10 s); the bound leaves room for a CPU shared with other jobs.
BUDGET_S = 150


@pytest.fixture(scope="module")
def result() -> dict:
    return run_benchmark("benchmarks.pipeline_throughput", "--quick", timeout=BUDGET_S)


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


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_deepspeed_pipeline_module_is_reported(result):
    ds = result["deepspeed"]
    assert "skipped" not in ds, ds
    assert ds["tokens_per_s"]["1f1b"] == result["tokens_per_s"]["deepspeed/1f1b"] > 0
    expected = result["tokens_per_s"]["ours/1f1b"] / result["tokens_per_s"]["deepspeed/1f1b"]
    assert result["ratio"]["ours_over_deepspeed/1f1b"] == pytest.approx(expected, rel=1e-2)
    assert ds["ratio"]["1f1b"] == result["ratio"]["ours_over_deepspeed/1f1b"]
    assert "deepspeed/gpipe" not in result["tokens_per_s"]  # DeepSpeed's engine has no GPipe schedule


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed (the skip path is covered below)")
def test_missing_deepspeed_is_a_field_not_a_crash(result):
    assert "skipped" in result["deepspeed"]
    assert not any(v.startswith("deepspeed/") for v in result["tokens_per_s"])


def test_unavailable_framework_is_skipped_with_a_reason(monkeypatch):
    # Without spawning anything: a missing package or no runnable schedule leaves the framework out.
    import kintsugi.benchmarks.pipeline_throughput as bench_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    skipped = bench_mod._unavailable(bench_mod.BenchConfig())
    assert set(skipped) == {"deepspeed"} and "not installed" in skipped["deepspeed"]
    monkeypatch.setattr(importlib.util, "find_spec", real)
    gpipe_only = bench_mod.BenchConfig(schedules=("gpipe",))
    if HAS_DEEPSPEED:
        assert "1f1b" in bench_mod._unavailable(gpipe_only)["deepspeed"]
    assert "deepspeed/gpipe" not in bench_mod._variants(gpipe_only)
