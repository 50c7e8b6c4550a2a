"""launcher=slurm against a real single-node Slurm (slurm-wlm + munge started by
scripts/slurm/local_cluster.sh): submit scripts/slurm/kintsugi.sbatch for a 2-stage job, send the
warning signal with `scancel --signal=USR1` while it trains, and check that every worker suspended
into a checkpoint, the job requeued itself, resumed from that checkpoint and finished every step
exactly once with a final validation loss.

    python -m pytest -m slow tests/slow/test_slurm.py

Needs root (it starts munged, slurmctld and slurmd; apt-get installs slurm-wlm and munge if
missing); skipped with the reason when the cluster cannot start. Takes about 2-4 minutes.
"""
import json
import os
import re
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(ROOT, "scripts", "slurm", "local_cluster.sh")
SBATCH = os.path.join(ROOT, "scripts", "slurm", "kintsugi.sbatch")
STEPS = 30

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(*cmd, timeout=60, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm installed and no apt-get to install slurm-wlm")
    was_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    try:
        proc = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("the local Slurm cluster did not start within 15 minutes")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the local Slurm cluster did not start: {last}")
    yield
    if not was_up:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=60)


def _submit(tmp_path, run_dir, *overrides):
    """sbatch the template into `run_dir` with these overrides: (job id, path of its output)."""
    log = str(tmp_path / "slurm-%j.out")
    env = dict(os.environ, KINTSUGI_RUN_DIR=run_dir, WANDB_MODE="disabled")
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}", SBATCH, *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jid = proc.stdout.strip().split(";")[0]
    return jid, log.replace("%j", jid)


def _job(jid):
    """`scontrol show job` as a dict (finished jobs stay visible for MinJobAge=600 s)."""
    out = _run("scontrol", "show", "job", "-o", jid, check=False).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return out


def _commits(run_dir):
    return [r for r in _records(run_dir) if "loss" in r and "step" in r and "val_loss" not in r]


def _wait(what, cond, timeout, log_path, poll=1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    tail = open(log_path).read()[-4000:] if os.path.exists(log_path) else "(no job output)"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; job output:\n{tail}")


def test_usr1_suspends_requeues_and_resumes_exactly(cluster, tmp_path):
    run_dir = str(tmp_path / "run")
    jid, log = _submit(tmp_path, run_dir, "experiment=quick", "parallel.stages=2", f"train.max_steps={STEPS}",
                       "faults=none", "logger=quiet")
    try:
        # Training (a few committed steps), then Slurm's warning signal to the worker tasks: the same
        # delivery as `#SBATCH --signal=USR1@90` (every step, not the batch shell).
        _wait("3 committed steps", lambda: len(_commits(run_dir)) >= 3, 300, log)
        _run("scancel", "--signal=USR1", jid)
        t_signal = time.time()

        # Every worker leaves, no spare is free: they suspend into checkpoints, the run exits 75 and the
        # batch script requeues the job.
        _wait("the requeue", lambda: int(_job(jid).get("Restarts", 0)) >= 1, 180, log)
        suspended_at = max(r["step"] for r in _commits(run_dir))
        assert suspended_at < STEPS - 1, "the signal came after training had finished; raise STEPS"
        ckpts = os.path.join(run_dir, "checkpoints")
        assert os.path.isdir(ckpts) and os.listdir(ckpts), "the suspend wrote no checkpoint"
        # Slurm holds a requeued batch job for ~2 minutes before it is eligible again; as the admin of
        # this test cluster, let it start now.
        if _job(jid).get("JobState") == "PENDING":
            _run("scontrol", "update", f"JobId={jid}", "StartTime=now", check=False)

        _wait("the requeued job to finish",
              lambda: _job(jid).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                     "NODE_FAIL", "OUT_OF_MEMORY"), 420, log)
        info = _job(jid)
        text = open(log).read()
        assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}:\n{text[-4000:]}"
        assert int(info["Restarts"]) == 1
    finally:
        if _job(jid).get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", jid], capture_output=True)

    # The batch script saw exit 75 and requeued; the second run resumed in the same run dir.
    assert "requeueing job " + jid in text
    assert f"job {jid} (restart 1)" in text and f"train.resume={run_dir}" in text
    assert re.search(rf"worker slurm-{jid}-r0-\d joined", text) and re.search(rf"worker slurm-{jid}-r1-\d joined", text)

    events = [r["event"] for r in _records(run_dir) if "event" in r]
    suspend = [e for e in events if e.get("kind") == "suspend"]
    assert suspend, f"no suspend event in metrics.jsonl: {[e.get('kind') for e in events]}"

    # Every step committed exactly once across the two runs: nothing lost, nothing repeated.
    steps = [r["step"] for r in _commits(run_dir)]
    assert sorted(steps) == list(range(STEPS)), steps
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == STEPS and summary["final_val_loss"] is not None
    assert summary["failures"] == 0 and summary["rebuilds"] == []
    with open(os.path.join(run_dir, "coordinator_state.json")) as f:
        assert not json.load(f).get("suspended")
    print(f"suspended at step {suspended_at}; finished {time.time() - t_signal:.0f}s after the signal")


def _step_of(pid):
    """The Slurm step a process runs in: '<jobid>.<step>' from the slurmstepd above it, or None."""
    while pid > 1:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode()
            with open(f"/proc/{pid}/status") as f:
                ppid = int(next(line.split()[1] for line in f if line.startswith("PPid:")))
        except (OSError, StopIteration, ValueError):
            return None
        m = re.match(r"slurmstepd: \[(\d+\.\w+)\]", cmd)
        if m:
            return m.group(1)
        pid = ppid
    return None


ETCD_STEPS = 100


def test_etcd_standby_step_takes_over_from_the_batch_hosts_coordinator(cluster, tmp_path):
    """recovery.control=etcd recovery.standbys=1 under sbatch: the batch host's coordinator leads, a
    standby campaigns in an srun step of its own; SIGKILL the leader (its store dies with it) and the
    standby step's coordinator leads, the workers move to it and the job completes: every step once,
    the same losses as an uninterrupted run, exit 0."""
    pytest.importorskip("etcd3gw")
    from kintsugi.recovery.etcd_client import EtcdSettings
    from kintsugi.recovery.etcd_local import LocalEtcd, etcd_binary
    from kintsugi.recovery.etcd_locate import Locator
    from testkit import run_trainer
    if etcd_binary() is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    job = ["experiment=quick", "parallel.stages=2", f"train.max_steps={ETCD_STEPS}", "train.eval_batches=1",
           "faults=none", "logger=quiet"]
    etcd = LocalEtcd(3).start()
    try:
        run_dir = str(tmp_path / "run")
        jid, log = _submit(tmp_path, run_dir, *job, "recovery.control=etcd", "recovery.standbys=1",
                           f"recovery.etcd.endpoints=[{','.join(etcd.endpoints)}]")
        try:
            _wait("5 committed steps", lambda: len(_commits(run_dir)) >= 5, 300, log)
            with open(os.path.join(run_dir, "job.json")) as f:
                prefix = json.load(f)["recovery"]["etcd"]["prefix"]
            locate = Locator(EtcdSettings(endpoints=tuple(etcd.endpoints), prefix=prefix))
            first = locate.current()
            pid = int(first.candidate.split(":")[1])
            assert _step_of(pid) == f"{jid}.batch", f"the first leader {first.candidate} is not the batch host's"
            # (the launcher also starts a fresh standby here for the one it loses: the step's, campaigning
            # all along, is the one that should win)
            _wait("the standby step to campaign", lambda: "standby: campaigning for" in open(log).read(), 60, log)
            os.kill(pid, 9)
            t_kill = time.time()
            new = _wait("a new leader", lambda: (lambda i: i if i and i.epoch > first.epoch and i.address else None)(
                locate.current()), 60, log, poll=0.05)
            failover_s = time.time() - t_kill
            new_pid = int(new.candidate.split(":")[1])
            step = _step_of(new_pid)
            assert step is not None and step.startswith(jid + ".") and step != f"{jid}.batch", \
                f"the new leader {new.candidate} runs in step {step}, not the standby step"
            _wait("the job to finish",
                  lambda: _job(jid).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                         "NODE_FAIL", "OUT_OF_MEMORY"), 420, log)
            info, text = _job(jid), open(log).read()
            assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}:\n{text[-4000:]}"
        finally:
            if _job(jid).get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
                subprocess.run(["scancel", jid], capture_output=True)
    finally:
        etcd.close()

    steps = [r["step"] for r in _commits(run_dir)]
    assert sorted(steps) == list(range(ETCD_STEPS)), steps
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["final_val_loss"] is not None and summary["rebuilds"] == [] and summary["failures"] == 0
    # The replicas trained on through the failover: the same losses as a run without etcd or a kill.
    _, ref, ref_records = run_trainer(str(tmp_path / "ref"), *job[:-1])
    want = {r["step"]: r["loss"] for r in ref_records if "loss" in r and "step" in r and "val_loss" not in r}
    got = {r["step"]: r["loss"] for r in _commits(run_dir)}
    assert got == want
    assert summary["final_val_loss"] == ref["final_val_loss"]
    print(f"failover {failover_s:.2f}s: epoch {first.epoch} ({first.candidate}) -> {new.epoch} ({new.candidate}, "
          f"step {step})")
