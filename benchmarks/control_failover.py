"""Claim: with `recovery.control=etcd`, a standby coordinator leads within lease TTL + 1 s of the
leader's death, and persisting the control state costs little next to the local file.

Method (phase 1: the election and the state store, without the coordinator's step loop).
A real three-member etcd cluster (`recovery.etcd_local`, Debian's etcd-server) on loopback ports,
its data on disk (not tmpfs: etcd fsyncs its log, as the local store fsyncs its file).

- Failover, `--runs` times (5): two `python -m kintsugi.recovery.etcd_tool campaign` processes on a
  fresh key prefix, the leader saving the state every 50 ms and the standby campaigning (polling the
  leader key every 100 ms). Once the standby is campaigning, the leader is SIGKILLed; failover is the
  standby's `leader` event minus the kill time, both on the system-wide monotonic clock. What it is
  made of: the lease runs out TTL after the dead leader's last renewal (renewals every TTL/4, so
  0.75..1 TTL after the kill), etcd revokes expired leases on a 500 ms tick, the standby polls.
- Save latency: `--saves` (300) writes of a control state shaped like `control_state.json` (R=2
  replicas x S=4 stages, one spare, a plan per cell, 20 rebuild records; its byte size is reported)
  through `EtcdStateStore` (one fenced transaction each) and through `FileStateStore` (strict JSON,
  fsync, rename) on the same disk; median and 99th percentile, one after the other in one process.

Not measured yet: the failure-free per-step overhead of a training run with etcd against local (it
needs the coordinator wired to the store, phase 2); `per_step_overhead_pct` is null until then.

    python -m benchmarks.control_failover [--runs 5] [--ttl 3] [--saves 300] [--out PATH]

Prints one JSON line and writes it to outputs/benchmarks/control_failover.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(ROOT, "outputs", "benchmarks", "control_failover.json")  # outputs/ is gitignored


class _Campaigner:
    """One etcd_tool campaign process and the events it printed."""

    def __init__(self, endpoints: List[str], prefix: str, name: str, ttl: int):
        import kintsugi
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(kintsugi.__file__))))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kintsugi.recovery.etcd_tool", "campaign", "--endpoints", ",".join(endpoints),
             "--prefix", prefix, "--name", name, "--ttl", str(ttl), "--save-every", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.events: List[dict] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()

    def wait(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e["event"] == kind]
                if found:
                    return found[0]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {kind!r} event within {timeout} s: {self.events}")
                self._cond.wait(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def measure_failover(endpoints: List[str], run: int, ttl: int) -> float:
    prefix = f"/bench/failover-{os.getpid()}-{run}/"
    leader = _Campaigner(endpoints, prefix, "leader", ttl)
    standby = None
    try:
        leader.wait("leader", timeout=30)
        standby = _Campaigner(endpoints, prefix, "standby", ttl)
        standby.wait("candidate", timeout=30)
        time.sleep(0.5 + (run % 4) * ttl / 16)   # campaigning; vary the kill's phase against the renewals
        t_kill = time.monotonic()
        os.kill(leader.proc.pid, signal.SIGKILL)
        return standby.wait("leader", timeout=ttl + 30)["t"] - t_kill
    finally:
        leader.stop()
        if standby is not None:
            standby.stop()


def synthetic_state(replicas: int = 2, stages: int = 4, rebuilds: int = 20) -> dict:
    """A control state with the shape and field names of control_state.json for R x S slots."""
    slots = [(r, s) for r in range(replicas) for s in range(stages)]
    workers = {f"w{i:03d}": {"wid": f"w{i:03d}", "pid": 40000 + i, "host": "10.0.0.12", "machine": f"node{i % 4}",
                             "state": "active" if i < len(slots) else "spare", "leaving": False, "hb_changed": None,
                             "slot": list(slots[i]) if i < len(slots) else None} for i in range(len(slots) + 1)}
    plan = {"gen": 7, "slots": {f"{r},{s}": f"w{r * stages + s:03d}" for r, s in slots},
            "rebuild": [{"slot": [0, 1], "tier": "peer", "donor": "w005", "xfer": "xfer/ab12cd34-3/0/7/1"}]}
    return {
        "incarnation": 3, "version": 41, "started": True, "port": 29400, "run_id": "9f" * 16, "t0": time.time(),
        "workers": workers, "slots": {f"{r},{s}": f"w{r * stages + s:03d}" for r, s in slots},
        "cells": {str(r): {"gen": 7, "plan": plan, "kicks": 0, "waiting": False, "lost": {}, "rebuilding": {}}
                  for r in range(replicas)},
        "stage_gen": {str(s): 3 for s in range(stages)},
        "stage_members": {str(s): {str(r): 7 for r in range(replicas)} for s in range(stages)},
        "ready": {f"{r},{s}": True for r, s in slots}, "unsettled": {},
        "committed": {str(r): 1234 for r in range(replicas)}, "totals": {str(r): [0.81, 2.93] for r in range(replicas)},
        "layout": [2] * stages, "layout_version": 0,
        "rebuilds": [{"step": 100 + 10 * i, "slot": [i % replicas, i % stages], "tier": "peer", "detect_s": 0.012,
                      "recover_s": 1.9} for i in range(rebuilds)],
        "failures": rebuilds, "publications": 2 * rebuilds, "tokens": 5_000_000, "final_val": None,
        "ckpt_counts": {}, "latest_checkpoint": None, "spares_needed": 0, "rebuilt_slots": rebuilds,
        "rebuild_plans": rebuilds, "bytes": {"p2p": 123456789, "outer_sync": 2345678},
        "corpus": {"name": "tinystories", "tokens": 1000000, "sha256": "ab" * 32},
    }


def _percentiles(xs: List[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs) * 1e3, 3), "p99": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3, 3)}


def measure_saves(endpoints: List[str], workdir: str, n: int) -> dict:
    from kintsugi.recovery.etcd_client import EtcdClient
    from kintsugi.recovery.etcd_election import Election
    from kintsugi.recovery.etcd_state import EtcdStateStore
    from kintsugi.recovery.state_store import FileStateStore
    state = synthetic_state()
    prefix = f"/bench/saves-{os.getpid()}/"
    election = Election(EtcdClient(endpoints), prefix, ttl_s=10, candidate="bench")
    assert election.campaign(timeout_s=30)
    stores = {"etcd": EtcdStateStore(election.client, prefix, election),
              "local_file": FileStateStore(os.path.join(workdir, "control_state.json"))}
    out = {"state_bytes": len(json.dumps(state, separators=(",", ":")))}
    for name, store in stores.items():
        times = []
        for i in range(n):
            state["version"] = i
            started = time.perf_counter()
            store.save(state)
            times.append(time.perf_counter() - started)
        assert store.load()["version"] == n - 1
        out[name] = _percentiles(times)
    election.close()
    return out


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ttl", type=int, default=3)
    p.add_argument("--saves", type=int, default=300)
    p.add_argument("--out", default=OUT_PATH)
    args = p.parse_args(argv)
    from kintsugi.recovery.etcd_local import LocalEtcd
    version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    with tempfile.TemporaryDirectory(prefix="control-failover-", dir=tempfile.gettempdir()) as workdir, \
            LocalEtcd(3, base_dir=workdir) as cluster:
        failover = [measure_failover(cluster.endpoints, k, args.ttl) for k in range(args.runs)]
        saves = measure_saves(cluster.endpoints, workdir, args.saves)
    result = {
        "benchmark": "control_failover", "date": date.today().isoformat(), "etcd": version, "members": 3,
        "lease_ttl_s": args.ttl, "runs": args.runs,
        "failover_s": [round(x, 3) for x in failover], "failover_mean_s": round(statistics.mean(failover), 3),
        "failover_max_s": round(max(failover), 3), "failover_bound_s": args.ttl + 1,
        "within_bound": all(x <= args.ttl + 1 for x in failover),
        "save_ms": {"etcd": saves["etcd"], "local_file": saves["local_file"]}, "state_bytes": saves["state_bytes"],
        "saves": args.saves, "per_step_overhead_pct": None,
        "per_step_overhead_note": "needs the coordinator on the etcd store (phase 2)",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
