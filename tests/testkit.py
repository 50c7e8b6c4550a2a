"""Helpers the tests share: the repository root, the real CLI run in the foreground or background, a
benchmark's one JSON line, and readers of metrics.jsonl. (A module of its own, not conftest.py: two
conftest modules exist under tests/, and `from testkit import` would take whichever came first.)"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_trainer(run_dir, *overrides, timeout=240, check=True, env=None):
    """Run `python -m trainer` for real (coordinator + worker processes) and return
    (completed process, summary dict or None, metrics records). `env`: extra environment variables."""
    cmd = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", *overrides]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = None
    path = os.path.join(run_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    records = []
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(mpath):  # not a device standing in for it (tests/distributed/test_disk_full.py)
        with open(mpath) as f:
            records = [json.loads(l) for l in f]
    return proc, summary, records


def start_trainer(run_dir, *overrides, env=None):
    """Start `python -m trainer` (coordinator + workers) in the background, stderr piped, for a test
    that acts on the run while it trains. `env`: extra environment variables."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", *overrides],
                            cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_benchmark(module: str, *args: str, timeout: float) -> dict:
    """Run `python -m <module> <args>` (a benchmark) for real and return its one JSON line, plus
    `_elapsed_s` (wall seconds of the whole process)."""
    import time
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {lines!r}"
    return dict(json.loads(lines[0]), _elapsed_s=time.time() - t0)


def observed_batch_ids(rec, replicas=1):
    """The batch a commit record says its step trained on: the ids the replica's stage 0 read and
    stated in the commit's sum, whichever stage (or data-parallel root) wrote the record."""
    ids = rec["batch_ids"]
    assert isinstance(ids, list), f"replica {rec.get('replica')} step {rec['step']}: batch ids not observed ({ids!r})"
    return ids


def commits(records, replica=0):
    out = {}
    for r in records:
        if "loss" in r and r.get("replica") == replica and "val_loss" not in r:
            out[r["step"]] = r
    return [out[k] for k in sorted(out)]
