"""A leading coordinator partitioned from etcd and from its workers while they train, for longer than
the lease TTL, then healed (network namespaces; needs root).

The leader-to-be runs in a network namespace of its own (its store and etcd client go through a veth
pair); a standby, five workers (four slots and a spare, `kintsugi join`) and the three etcd members
run here. Taking the veth down cuts the leader off from etcd and from every worker at once: packets
are lost, nothing is refused. While it is cut off a worker is SIGKILLed, so that a generation must be
planned by whoever leads then. The run must complete with every step recorded once; the state
history in etcd must show one leader at a time (epochs never interleave); the rebuild must be planned
once, by the standby's epoch; the partitioned leader must publish nothing after the cut and come back
as a standby after the heal."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from etcd_helpers import TTL_S, etcd_args, exactly_once, new_prefix
from test_election import _assert_never_interleaved, _epochs_in_history
from testkit import ROOT, _descendants, kill_tree, node_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOKEN = "p4rtition-s3cret"
STEPS = 40


def _records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    out = []
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _steps(run_dir):
    return sum(1 for r in _records(run_dir) if "loss" in r and "val_loss" not in r and "event" not in r)


@pytest.mark.timeout(420)
def test_partitioned_leader_is_replaced_and_rejoins_as_a_standby(etcd_available, namespace, tmp_path):
    from kintsugi.recovery.etcd_client import EtcdClient
    from kintsugi.recovery.etcd_election import find_leader
    from kintsugi.recovery.etcd_local import LocalEtcd
    from kintsugi.recovery.etcd_state import EtcdStateStore
    from kintsugi.recovery.protocol import free_port

    run_dir, prefix = str(tmp_path / "run"), new_prefix("partition")
    procs, logs = {}, {}

    def start(name, cmd, netns=None):
        logs[name] = str(tmp_path / f"{name}.log")
        full = (["ip", "netns", "exec", netns] if netns else []) + cmd
        procs[name] = subprocess.Popen(full, cwd=ROOT, env=node_env(KINTSUGI_TOKEN=TOKEN, **env_extra),
                                       stdout=open(logs[name], "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def log(name):
        return open(logs[name]).read()

    with LocalEtcd(3, extra_host=namespace.host_ip) as cluster:
        remote = [e.replace("127.0.0.1", namespace.host_ip) for e in cluster.endpoints]
        env_extra = {}
        job = ["experiment=quick", "faults=none", "logger=quiet", "parallel.stages=2", "parallel.replicas=2",
               f"train.max_steps={STEPS}", "train.eval_batches=1", "recovery.heartbeat_timeout_s=2.0",
               *etcd_args(remote, prefix, ttl_s=TTL_S, standbys=0)]
        coordinator = [sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--run-dir", run_dir]
        try:
            start("a", coordinator + ["--host", namespace.ns_ip, "--port", str(free_port()), "--", *job],
                  netns=namespace.ns)
            client = EtcdClient(cluster.endpoints)
            deadline = time.time() + 120
            while (first := find_leader(client, prefix)) is None or not first.address:  # elected, then published
                assert time.time() < deadline and procs["a"].poll() is None, log("a")
                time.sleep(0.2)
            start("b", coordinator + ["--host", "127.0.0.1", "--port", str(free_port()), "--job",
                                      os.path.join(run_dir, "job.json"), "--outputs", "--standby"])
            env_extra = {"KINTSUGI_ETCD_ENDPOINTS": ",".join(cluster.endpoints), "KINTSUGI_ETCD_PREFIX": prefix}
            start("workers", [sys.executable, "-m", "trainer", "join", "--coordinator", first.address,
                              "--workers", "5"])
            while _steps(run_dir) < 6:
                assert time.time() < deadline, log("a") + log("workers")
                time.sleep(0.2)

            # A slot holder (from the state in etcd) dies as the new leader takes over: the steps its
            # cell committed that the cut-off leader could not record reach the new leader as the
            # workers' replays, and its plan must resume after them, not after the older ones it loaded.
            state = EtcdStateStore(client, prefix).load()
            victim = next(w["pid"] for w in state["workers"].values() if w["state"] == "active")
            assert victim in _descendants(procs["workers"].pid)
            namespace.partition()
            t_cut, a_at_cut = time.time(), log("a")
            while (now := find_leader(client, prefix)) is None or now.epoch == first.epoch or not now.address:
                assert time.time() - t_cut < TTL_S + 10, "no new leader after the partition:\n" + log("b")
                time.sleep(0.1)
            failover_s = time.time() - t_cut
            os.kill(victim, signal.SIGKILL)   # as the workers find the new leader, before their replays
            time.sleep(max(0.0, 2 * TTL_S - (time.time() - t_cut)))   # cut off for twice the TTL
            namespace.heal()
            rc_b = procs["b"].wait(timeout=300)
            rc_w = procs["workers"].wait(timeout=60)
            time.sleep(TTL_S + 1)   # the healed old leader reconnects and campaigns as a standby
            a_after = log("a")
        finally:
            for p in procs.values():
                if p.poll() is None:
                    kill_tree(p.pid)
        history = _epochs_in_history(client, prefix)
    print(f"\nfailover after the partition {failover_s:.2f} s; epochs {first.epoch} -> {now.epoch}")

    assert rc_b == 0, log("b")[-3000:]
    assert rc_w == 256 - signal.SIGKILL, log("workers")[-2000:]  # `join` passes on its killed worker's -9
    assert failover_s <= TTL_S + 2, f"the standby led {failover_s:.2f} s after the partition (lease TTL {TTL_S} s)"
    records = _records(run_dir)
    exactly_once(records, 2, STEPS)
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert summary["error"] is None and summary["failures"] == 1, summary
    assert len(summary["rebuilds"]) == 1, summary["rebuilds"]
    # One leader at a time, in etcd's own record of every control write.
    _assert_never_interleaved(history)
    assert {e for e, _ in history} >= {first.epoch, now.epoch}
    # The rebuild's generation was published once, by the new leader; the cut-off leader published
    # nothing after the cut (what it logged then is what it logged before the heal).
    published = lambda text: re.findall(r"cell (\d+) generation (\d+) published", text)  # noqa: E731
    after_cut_a = published(a_after)[len(published(a_at_cut)):]
    assert not after_cut_a, f"the partitioned leader published {after_cut_a} after the heal"
    gens_b = published(log("b"))
    assert len(gens_b) == len(set(gens_b)), f"a generation published twice: {gens_b}"
    # The old leader came back as a standby and did not lead the run again: it may win the election
    # once the run is over, and then only finds it ended.
    assert "restarting as a standby" in a_after and "campaigning" in a_after.split("restarting as a standby")[1], \
        a_after[-3000:]
    leads = [int(e) for e in re.findall(r"leading /test/partition\S* \(epoch (\d+)\)", a_after)]
    assert leads[0] == first.epoch and all(e > now.epoch for e in leads[1:]), leads
    if leads[1:]:
        assert "already ended (finished); nothing to take over" in a_after, a_after[-3000:]
