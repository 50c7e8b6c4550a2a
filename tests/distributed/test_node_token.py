"""The token a torchrun node's ranks share when none is given (trainer.launch.node_token), against
another local user who prepares the place it will be written, with real torchrun and real files.

The other user (uid 65534, `nobody`) owns a world-writable directory at the run's token path (and at
the path older versions used), holding symlinks to a file it would like to receive the token. The
run must stop at once with one line naming the directory, write nothing through or into either, and
leave the symlink target untouched. Left alone (with a stale token directory of our own from a run
that was killed), the ranks share a fresh token, the run finishes, and the directory is removed."""
from __future__ import annotations

import hashlib
import json
import re
import os
import subprocess
import sys
import time

import pytest

from testkit import ROOT
from kintsugi.trainer.launch.node_token import token_dir

pytestmark = pytest.mark.distributed
NOBODY = 65534


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, tmpdir, port, timeout):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TMPDIR=str(tmpdir),
               OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR")
    env.pop("KINTSUGI_TOKEN", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1",
           f"--master-port={port}", "--nproc-per-node=2", "--max-restarts=0", "-m", "trainer", "launcher=torchrun",
           "experiment=quick", "parallel.stages=2", "train.max_steps=3", "train.eval_batches=1",
           f"hydra.run.dir={tmp_path / 'run'}", "logger=quiet"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _job_env(port):
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "none",
            "TORCHELASTIC_RESTART_COUNT": "0"}


def _listing(path):
    return sorted((n, os.lstat(os.path.join(path, n)).st_mode, os.lstat(os.path.join(path, n)).st_uid)
                  for n in os.listdir(path))


def _plant(folder, names, victim):
    """What the other user prepares: a folder of its own, writable by anyone, with symlinks."""
    os.makedirs(folder)
    for name in names:
        os.symlink(victim, os.path.join(folder, name))
        os.lchown(os.path.join(folder, name), NOBODY, NOBODY)
    os.chmod(folder, 0o777)
    os.chown(folder, NOBODY, NOBODY)


@pytest.mark.skipif(os.geteuid() != 0, reason="plants files owned by another user (needs root)")
def test_a_token_directory_prepared_by_another_user_is_refused(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    os.chmod(tmpdir, 0o1777)  # like /tmp: anyone may create entries
    victim = tmp_path / "victim"  # where the other user wants the token to land
    port = _free_port()
    planted = token_dir(_job_env(port), base=str(tmpdir))
    _plant(planted, ["token", ".token-1", "token.tmp"], victim)
    # The directory and file names versions before this one used (kintsugi-<uid>/<key>.token).
    old_key = hashlib.sha1(f"127.0.0.1:{port}/none".encode()).hexdigest()[:16]
    old = os.path.join(tmpdir, f"kintsugi-{os.geteuid()}")
    _plant(old, [f"{old_key}.token"], victim)
    before = {p: _listing(p) for p in (planted, old)}

    proc, took = _torchrun(tmp_path, tmpdir, port, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert not victim.exists(), "the token was written through the other user's symlink"
    assert {p: _listing(p) for p in (planted, old)} == before, "something was written into the other user's folder"
    lines = [l for l in out.splitlines() if l.startswith("kintsugi: config error: the node's token directory")]
    assert lines, out[-3000:]
    assert planted in lines[0] and "belongs to uid 65534" in lines[0] and "KINTSUGI_TOKEN" in lines[0]
    # torchrun reports the failed ranks in its own words; no rank shows a traceback through our code.
    assert not re.search(r'File ".*/(trainer|recovery)/', out), out[-3000:]
    assert took < 90, f"the ranks waited {took:.0f}s instead of stopping at once"


def test_ranks_share_a_fresh_token_and_the_directory_goes_away(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    port = _free_port()
    # A run with the same torchrun job was SIGKILLed: its directory (ours, 0700) still holds its token.
    stale = token_dir(_job_env(port), base=str(tmpdir))
    os.mkdir(stale, 0o700)
    fd = os.open(os.path.join(stale, "token"), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"agent": "1:0", "token": "a-stale-token"}, f)

    proc, _ = _torchrun(tmp_path, tmpdir, port, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["steps"] == 3  # both ranks joined with the same token, and trained
    assert not os.path.exists(stale), "the token directory outlived the run"
    assert not [n for n in os.listdir(tmpdir) if n.startswith("kintsugi-")], os.listdir(tmpdir)
