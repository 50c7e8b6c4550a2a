"""`launcher=deepspeed`: DeepSpeed's own launcher (`deepspeed --hostfile ...`) starts the Kintsugi
workers on this machine (CPU accelerator, gloo), global rank 0 starts the coordinator and writes the
outputs, and a tiny 2-stage job trains to the end."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import importlib.util

import pytest

from testkit import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(150)]

if importlib.util.find_spec("deepspeed") is None:  # find_spec, not import: importing deepspeed takes seconds
    pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')", allow_module_level=True)


def _free_port_pair() -> int:
    """A port P with P+1 also free: the launcher's rendezvous (MASTER_PORT) and our coordinator (P+1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _deepspeed_cmd() -> list:
    exe = shutil.which("deepspeed")
    # The console script, or the same entry through this interpreter (a venv without PATH set up).
    return [exe] if exe else [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()"]


def test_deepspeed_launcher_runs_a_two_stage_job(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = tmp_path / "run"
    cmd = _deepspeed_cmd() + [
        "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port_pair()), "--no_local_rank", "--module", "trainer",
        "launcher=deepspeed", "experiment=quick", "parallel.stages=2", "faults=none", "logger=quiet",
        f"hydra.run.dir={run_dir}", "train.max_steps=4"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, log
    # Both ranks are started by the deepspeed launcher (not by our local launcher).
    assert "dist_world_size=2" in proc.stdout + proc.stderr, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["failures"] == 0 and summary["rebuilds"] == []
    assert summary["config"]["launcher"]["name"] == "deepspeed"
    loss = summary["final_val_loss"]
    assert math.isfinite(loss) and 0 < loss < math.log(256) + 0.5, loss  # byte vocab: ln 256 = 5.55 at init
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if "loss" in r and "val_loss" not in r} >= {0, 1, 2, 3}
