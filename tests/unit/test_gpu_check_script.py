"""scripts/gpu_check.sh on CPU: it parses (bash -n), refuses to run its CUDA parts without CUDA unless
asked for a dry run, and its dry run executes every part it can on CPU (the tests/gpu collection,
CPU codec throughput, the CPU fp32 reference run of the trainer, the pipeline benchmark) and reports
the CUDA parts as skipped, not failed, in one JSON line."""
import json
import os
import subprocess

import pytest
import torch

from testkit import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def test_the_script_parses():
    proc = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_bad_arguments_get_one_line(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--fast"], capture_output=True, text=True, env=dict(os.environ, OUT=str(tmp_path)))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--dry-run" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_asks_for_a_dry_run(tmp_path):
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OUT=str(tmp_path), GPU_CHECK_DRY_RUN="0"))
    assert proc.returncode == 1
    assert "--dry-run" in json.loads(proc.stdout.strip())["error"]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU form of the check")
def test_dry_run_runs_the_cpu_parts_and_skips_the_cuda_ones(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=380,
                          env=dict(os.environ, OUT=str(tmp_path)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    res = json.loads(lines[0])
    assert res["dry_run"] is True and res["failed_parts"] == []
    a = res["a_tests_gpu"]
    assert a["status"] == "skipped" and a["counts"].get("skipped", 0) >= 8 and not a["counts"].get("failed")
    b = res["b_codec_bandwidth"]
    assert b["status"] == "skipped" and all(v > 0 for v in b["cpu_encode_GBps"].values())
    c = res["c_pipeline_cuda_gloo"]
    assert c["status"] == "skipped" and c["cpu_fp32"]["status"] == "passed"
    losses = c["cpu_fp32"]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the reference run trained
    d = res["d_vs_torch_pipelining"]
    assert d["status"] == "skipped" and set(d["cpu_quick"]["ratio"]) == {"ours_over_torch/gpipe", "ours_over_torch/1f1b"}
    assert res["e_pipeline_nccl"]["status"] == "skipped"
    for log in ("a_tests_gpu.log", "b_codecs.json", "c_cpu_fp32/metrics.jsonl", "gpu_check.json"):
        assert (tmp_path / log).is_file(), log
