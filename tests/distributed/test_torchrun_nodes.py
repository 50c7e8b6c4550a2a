"""torchrun across nodes, on one machine: a standalone coordinator (`kintsugi coordinator ...
-- <overrides>`), two torchrun "nodes" of a static rendezvous (`--nnodes=2 --node-rank=i`), node 1
killed whole (its agent and every worker, SIGKILL), and a new node joining as spares: a fresh
`torchrun --standalone ... recovery.coordinator=host:port` (or `kintsugi join`). The run finishes every
step, rebuilds the two lost stages, the surviving node's torchrun exits 0 at once (not after
torchrun's 300 s exit barrier), and no process is left over."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from testkit import ROOT, Fleet, _alive, commits, node_env

TOKEN = "n0des-s3cret"
JOB = ["experiment=quick", "faults=none", "logger=quiet", "model.n_layers=4", "train.max_steps=10",
       "train.eval_batches=1", "recovery.heartbeat_timeout_s=2.0"]


def _torchrun(fleet, name, coordinator, node_rank=None, master_port=None):
    rdzv = (["--standalone"] if node_rank is None else
            ["--nnodes=2", f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={master_port}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=0", *rdzv,
           "-m", "trainer", "launcher=torchrun", f"recovery.coordinator={coordinator}",
           f"hydra.run.dir={fleet.tmp / name}", *JOB]
    return fleet.start(name, cmd, KINTSUGI_MACHINE=name)


def _commits_so_far(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line and "val_loss" not in line)


@pytest.mark.distributed
@pytest.mark.timeout(240)
@pytest.mark.parametrize("joiner", ["torchrun", pytest.param("join", marks=pytest.mark.slow)])
def test_two_torchrun_nodes_survive_a_killed_node_and_take_in_a_new_one(tmp_path, joiner):
    from kintsugi.recovery.protocol import free_port

    t0 = time.time()
    run_dir = tmp_path / "run"
    port, master_port = free_port(), free_port()
    addr = f"127.0.0.1:{port}"
    fleet = Fleet(tmp_path, KINTSUGI_TOKEN=TOKEN)
    try:
        fleet.start("coordinator", [sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", str(port), "--host",
                                    "127.0.0.1", "--run-dir", str(run_dir), "--", *JOB])
        for i in (0, 1):
            _torchrun(fleet, f"node{i}", addr, node_rank=i, master_port=master_port)
        deadline = time.time() + 120
        while _commits_so_far(run_dir) < 2:
            assert time.time() < deadline, "no commits: " + fleet.log("coordinator") + fleet.log("node0")
            assert fleet.procs["coordinator"].poll() is None, fleet.log("coordinator")
            fleet.watch()
            time.sleep(0.2)
        fleet.watch()
        killed = fleet.kill_node("node1")
        t_kill = time.time()
        if joiner == "torchrun":
            _torchrun(fleet, "node2", addr)
        else:
            fleet.start("node2", [sys.executable, "-m", "trainer", "join", "--coordinator", addr, "--workers", "2"],
                        KINTSUGI_MACHINE="node2")
        rc = fleet.wait("coordinator", timeout=150)
        assert rc == 0, fleet.log("coordinator")
        t_done = time.time()
        # The survivor's agent would wait 300 s in torchrun's exit barrier for node 1's agent.
        assert fleet.wait("node0", timeout=30) == 0, fleet.log("node0")
        assert fleet.wait("node2", timeout=30) == 0, fleet.log("node2")
        t_exit = time.time()
    finally:
        fleet.cleanup()
    print(f"\nstart -> kill {t_kill - t0:.1f}s, kill -> run done {t_done - t_kill:.1f}s, "
          f"nodes exited {t_exit - t_done:.1f}s later")

    state = json.loads((run_dir / "coordinator_state.json").read_text())
    assert state["error"] is None and state["committed"] == {"0": 9}
    assert state["failures"] == 2, "both workers of node 1"
    # Written by the standalone coordinator itself (no launcher beside it).
    summary = json.loads((run_dir / "summary.json").read_text())
    tiers = sorted(rb["tier"] for rb in summary["rebuilds"])
    # Placement spread the 4 stages over the 2 nodes so that losing either is recoverable: node 1
    # held stages 1 and 3, rebuilt from their neighbours (CheckFree) and swap partner (CheckFree+).
    assert tiers == ["checkfree", "checkfree_plus"], summary["rebuilds"]
    assert summary["steps"] == 10 and summary["failures"] == 2
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in commits(records)] == list(range(10))
    assert sorted(os.listdir(run_dir / "final")) == [f"stage{s}.safetensors" for s in range(4)]
    job = json.loads((run_dir / "job.json").read_text())
    assert job["recovery"]["token"] == "" and TOKEN not in (run_dir / "job.json").read_text()
    # Every worker id is distinct although all "nodes" share one host and node2 reuses node ranks.
    joined = [l for l in fleet.log("coordinator").splitlines() if " joined " in l]
    assert len(joined) == 6 and len({l.split()[3] for l in joined}) == 6, joined
    leftovers = [p for p in fleet.seen | set(killed) if _alive(p)]
    assert not leftovers, f"processes left over: {leftovers}"


@pytest.mark.distributed
def test_standalone_coordinator_reports_a_config_error_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", "1", "--run-dir", str(tmp_path),
                           "--", "parallel.stagez=4"], cwd=ROOT, env=node_env(KINTSUGI_TOKEN=TOKEN), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "config error" in proc.stderr and "stagez" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_worker_ids_differ_across_nodes_on_one_host_and_rejoins():
    from kintsugi.trainer.launch.torchrun import worker_id
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none", "GROUP_RANK": "0",
           "LOCAL_RANK": "0", "RANK": "0"}
    node1 = dict(env, GROUP_RANK="1", RANK="2")
    standalone = dict(env, MASTER_PORT="41234", TORCHELASTIC_RUN_ID="3f2a")
    ids = [worker_id(env), worker_id(env), worker_id(node1), worker_id(standalone)]
    assert len(set(ids)) == 4, ids
    assert "-n1r0-" in ids[2] and ids[0].split("-")[1] != ids[3].split("-")[1]
