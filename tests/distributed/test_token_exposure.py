"""The run's token never lands in a file of the run or sweep directory, nor in what a failing run
prints. Hydra records every command-line override (its "Error executing job with overrides" line,
.hydra/overrides.yaml, and with -m multirun.yaml and the sweep's logs), so `recovery.token=` is
refused on the command line with one line that does not repeat it; the environment
(KINTSUGI_TOKEN) is the way to give it, and a failing sweep given the token that way leaves no copy."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from testkit import ROOT

pytestmark = pytest.mark.distributed
SECRET = "s3cret-" + "7c1e" * 6


def _cli(*args, env=None, timeout=180):
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.pop("KINTSUGI_TOKEN", None)  # only the token a test gives
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "trainer", *args, "logger=quiet"], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _files_holding(folder, secret):
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                if secret.encode() in f.read():
                    found.append(os.path.join(root, name))
    return found


@pytest.mark.parametrize("how", [["recovery.token=" + SECRET], ["+recovery.token=" + SECRET],
                                 ["recovery={token: " + SECRET + "}"]])
def test_a_token_on_the_command_line_is_refused_without_repeating_it(tmp_path, how):
    sweep = tmp_path / "multi"
    proc = _cli("-m", "experiment=quick", "train.lr=1e-3,2e-3", *how, f"hydra.sweep.dir={sweep}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.strip().splitlines() == [out.strip()] and "KINTSUGI_TOKEN" in out, out
    assert SECRET not in out
    assert not sweep.exists() and _files_holding(tmp_path, SECRET) == []
    single = _cli("experiment=quick", *how, f"hydra.run.dir={tmp_path / 'run'}")
    assert single.returncode == 2 and SECRET not in single.stdout + single.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_a_failing_sweep_given_the_token_in_the_environment_leaves_no_copy(tmp_path):
    # Both stages are killed at step 2 and recovery.strategy=copy has nothing to copy from: the first
    # point of the sweep stops (exit 3) and Hydra's sweep ends there.
    sweep = tmp_path / "multi"
    proc = _cli("-m", "experiment=quick", "parallel.stages=2", "train.max_steps=6", "train.eval_batches=1",
                "recovery.strategy=copy", "faults.schedule=[{step: 2, replica: 0, stage: 0, kind: kill}, "
                "{step: 2, replica: 0, stage: 1, kind: kill}]",
                "train.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}", env={"KINTSUGI_TOKEN": SECRET})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "kintsugi: run stopped" in out
    assert (sweep / "multirun.yaml").is_file() and (sweep / "0" / "metrics.jsonl").is_file()
    assert SECRET not in out
    assert _files_holding(tmp_path, SECRET) == []
