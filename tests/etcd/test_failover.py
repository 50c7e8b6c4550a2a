"""The control plane on etcd, end to end: a real run (`python -m trainer`, coordinator, standby and
worker processes) whose leading coordinator is SIGKILLed mid-training. Its TCPStore dies with it; the
standby must lead within the lease TTL + 1 s, the workers must find it through etcd and replay what
it missed, and every step of every replica must be recorded exactly once.

Everything is read from what the run left: its exit code, metrics.jsonl, its log, and the history of
the state document in etcd (every version still there, with the epoch of the leader that wrote it)."""
import re
import time

import pytest

from etcd_helpers import TTL_S, commits, etcd_run, exactly_once, logged, new_prefix
from testkit import run_trainer
from kintsugi.recovery.etcd_client import EtcdClient
from kintsugi.recovery.etcd_state import EtcdStateStore

pytestmark = pytest.mark.distributed

STEPS = 12


def _etcd_run(cluster, run_dir, *extra, timeout=150):
    return etcd_run(cluster, run_dir, STEPS, *extra, prefix=new_prefix("failover"), timeout=timeout)


def test_leader_killed_mid_run_a_standby_takes_over(shared_etcd, tmp_path):
    t0 = time.monotonic()
    proc, summary, records, prefix = _etcd_run(
        shared_etcd, tmp_path / "run", "faults.schedule=[{step: 5, target: coordinator, kind: kill}]")
    err, log = proc.stderr, (tmp_path / "run" / "entry.log").read_text()

    # The standby led, the workers found it through etcd, and the run completed with nothing lost.
    # The launcher sees the new leader's address once it is published (the standby won, then filled
    # its store from the state in etcd) and reads etcd every 0.25 s: TTL + 1 s for the election, 1 s
    # more for these two.
    # (On a host loaded far past its cores a leader can also lose its lease unkilled: then a later
    # epoch leads at the kill, and the one after it must follow as fast.)
    kills = logged(log, r"injecting kill into the coordinator \(pid \d+\) at step 5")
    assert kills, f"the launcher never killed the coordinator:\n{log[-3000:]}"
    killed = kills[0][0]
    leads = [(t, int(m.group(2))) for t, m in logged(log, r"coordinator pid \d+ leads \(epoch (\d+)\)")]
    at_kill = max([e for t, e in leads if t < killed], default=0)
    after = [(t, e) for t, e in leads if t >= killed and e > at_kill]
    assert at_kill >= 1 and after, f"no new leader after the kill:\n{log[-3000:]}"
    led, successor = after[0]
    assert led - killed <= TTL_S + 2, f"the standby led {led - killed:.2f} s after the kill (lease TTL {TTL_S} s)"
    assert f"coordinator reachable again (a new leader, epoch {successor}" in err
    exactly_once(records, 1, STEPS)
    assert summary["failures"] == 0 and summary["steps"] == STEPS and summary["error"] is None
    # Nothing was rolled back: every worker re-registered with the new leader at the kill's step or
    # later (how many steps they trained while no one led depends on this machine's load; the
    # benchmark, benchmarks.control_failover, reports it).
    rereg = [int(s) for s in re.findall(r"worker w\d+ re-registered \(slot \[\d+, \d+\], step (\d+)\)", err)]
    assert len(rereg) >= 4 and min(rereg) >= 5, rereg

    # etcd holds the run's history: one leader at a time (epochs never go down along it), the
    # killed leader's writes first, its successor's after, and the end written by the successor.
    history = list(EtcdStateStore(EtcdClient(shared_etcd.endpoints), prefix).history())
    epochs = [doc["epoch"] for _, doc in reversed(history)]
    assert epochs == sorted(epochs) and epochs[0] == 1 and {at_kill, successor} <= set(epochs), epochs
    assert history[0][1]["epoch"] >= successor and history[0][1]["state"]["ended"] == "finished"
    assert time.monotonic() - t0 < 120


def test_etcd_unreachable_at_start_one_line_nothing_started(etcd_available, tmp_path):
    # Nothing listens on these ports: the run must stop before any process starts, saying so in one line.
    from kintsugi.recovery.etcd_local import free_ports
    dead = ",".join(f"http://127.0.0.1:{p}" for p in free_ports(2))
    run = tmp_path / "run"
    proc, summary, records = run_trainer(run, "experiment=quick", "recovery.control=etcd",
                                         f"recovery.etcd.endpoints=[{dead}]", "recovery.etcd.request_timeout_s=0.5",
                                         timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "recovery.control=etcd" in line]
    assert len(lines) == 1 and "no etcd endpoint answered" in lines[0], proc.stderr[-2000:]
    assert "recovery.etcd.endpoints" in lines[0]
    assert summary is None and not records
    assert not (run / "coordinator_state.json").exists() and not (run / "job.json").exists()


@pytest.mark.slow
def test_leader_killed_changes_no_loss_against_the_local_control_plane(shared_etcd, tmp_path):
    # Two replicas: the same losses, step by step, as the same job on the file-backed control plane
    # with no failure; the coordinator's death and the change of leader change nothing in training.
    grid = ["parallel.replicas=2", "parallel.stages=2", "model.n_layers=4", "diloco.enabled=false"]
    _, plain, plain_records = run_trainer(tmp_path / "plain", "experiment=quick", "train.eval_batches=1",
                                          f"train.max_steps={STEPS}", *grid)
    proc, summary, records, _ = _etcd_run(shared_etcd, tmp_path / "run", *grid,
                                          "faults.schedule=[{step: 5, target: coordinator, kind: kill}]")
    assert "coordinator reachable again (a new leader, epoch" in proc.stderr
    exactly_once(records, 2, STEPS)
    for q in (0, 1):
        mine = {r["step"]: r["loss"] for r in commits(records) if r["replica"] == q}
        theirs = {r["step"]: r["loss"] for r in commits(plain_records) if r["replica"] == q}
        assert mine == theirs, f"replica {q}: the change of leader changed training"
    assert summary["final_val_loss"] == plain["final_val_loss"] and summary["failures"] == 0


@pytest.mark.slow
def test_leader_killed_right_after_a_worker(shared_etcd, tmp_path):
    # The leader dies 50 ms after a worker, before it could plan the rebuild: the standby learns of
    # the loss (the launcher reports the exit again to the new leader) and plans it, once.
    proc, summary, records, _ = _etcd_run(
        shared_etcd, tmp_path / "run", "recovery.heartbeat_timeout_s=2.0",
        "recovery.progress_timeout_s=20",
        "faults.schedule=[{step: 5, replica: 0, stage: 2, kind: kill},"
        "{step: 5, target: coordinator, kind: kill, delay_s: 0.05}]")
    assert "coordinator reachable again (a new leader, epoch" in proc.stderr
    assert summary["failures"] == 1 and [tuple(rb["slot"]) for rb in summary["rebuilds"]] == [(0, 2)]
    exactly_once(records, 1, STEPS)


def test_a_resume_beside_a_live_leader_is_refused_in_one_line(shared_etcd, tmp_path):
    # train.resume starts a run again from its checkpoints and replaces the control state under its
    # prefix; while another coordinator leads that prefix it must not campaign (it would wait, then
    # wipe a live run's state) but stop at once, saying what to do instead.
    import json
    import subprocess
    import sys
    from etcd_helpers import subprocess_env
    from kintsugi.recovery.etcd_election import Election
    from kintsugi.trainer.cli.compose import compose_job
    prefix = new_prefix("resume-live")
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)  # what compose checks; the refusal comes first
    live = Election(EtcdClient(shared_etcd.endpoints), prefix, ttl_s=TTL_S, candidate="elsewhere:1:live")
    assert live.campaign(timeout_s=30)
    live.publish("10.0.0.9:29400")
    try:
        job, _ = compose_job(["experiment=quick", "recovery.control=etcd", f"recovery.etcd.prefix={prefix}",
                              f"recovery.etcd.endpoints=[{','.join(shared_etcd.endpoints)}]",
                              f"train.resume={tmp_path / 'old'}"])
        job_path = tmp_path / "job.json"
        job_path.write_text(json.dumps(job.public_dict()))
        proc = subprocess.run([sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", "0",
                               "--run-dir", str(tmp_path / "run"), "--job", str(job_path), "--no-progress"],
                              env=dict(subprocess_env(), KINTSUGI_TOKEN="t" * 32), capture_output=True, text=True,
                              timeout=60)
        assert live.is_leader, "the refused coordinator took the lead"
    finally:
        live.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "recovery.control=etcd" in line]
    assert len(lines) == 1 and "elsewhere:1:live" in lines[0] and "--standby" in lines[0], proc.stderr[-2000:]
