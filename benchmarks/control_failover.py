"""Claim: with `recovery.control=etcd`, a standby coordinator leads within lease TTL + 1 s of the
leader's death, training goes on meanwhile with no step lost or repeated, and a failure-free run
costs under 1 % per step against the local (file) control plane.

Method. A real three-member etcd cluster (`recovery.etcd_local`, Debian's etcd-server) on loopback ports,
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

- Failover in training, `--train-runs` times (5): `python -m trainer experiment=quick` with
  `recovery.control=etcd recovery.standbys=1` and `faults.schedule=[{step: 5, target: coordinator,
  kind: kill}]` (`--train-steps` steps, 40: the replicas train on past the failover, so their stall is
  the failover's, not the end of a short run waiting for a leader). Failover is the launcher's log line saying it saw the
  new leader's published address minus its line saying it SIGKILLed the leader (entry.log, one
  process's wall clock; the launcher reads etcd every 0.25 s, so this is an upper bound that also
  counts the new leader filling its store), taking the first leader seen after the kill;
  `leader_epoch_at_kill` is the epoch that led when the kill came (1 unless a leader lost its lease
  on its own before, e.g. starved of CPU past the TTL). `steps_lost` counts (replica, step) pairs missing from
  or repeated in metrics.jsonl (target 0); `reregistered_at` lists, per run, the step each worker
  had reached when it re-registered with the new leader (the kill is at step 5: how far the workers
  trained while none led; stages further down the pipeline are a step or so behind the first).
- Per-step overhead, `--pairs` pairs (3) of failure-free runs of the same job (`--overhead-steps`,
  30), one with `recovery.control=local` and one with `recovery.control=etcd` (the leader saving
  to etcd; no standby: on a real fleet a standby polls from another machine, here it would take the
  workers' CPU), back to back, the order alternating per pair. Each run's figure is its median `step_s` (the root
  stage's step time in metrics.jsonl) over steps 2 and later; the overhead is the median over pairs
  of etcd / local - 1, in percent, with every run's median beside it. On a shared machine step
  times swing with the other jobs; beside them, the CPU seconds of each run's whole process tree
  (launcher, coordinator, workers; `getrusage(RUSAGE_CHILDREN)`, not the etcd members) and the
  median over pairs of their ratio, which contention moves much less.
- Side by side, `--side-by-side` rounds (0: off) of `--side-steps` steps (60): both modes run at
  once, each pinned to a core of its own (`taskset`), the cores swapped every round, and the three
  etcd members pinned to the etcd run's core so that run pays for them. Back-to-back runs scatter
  by +-10 % on a shared machine (other tenants, clock speed); two runs at the same moment see the
  same machine. The overhead is the median over rounds of etcd / local - 1 of the runs' median
  step times (steps 2 and later). Needs two cores. `--etcd-on local` pins the etcd members to the
  local run's core instead: the etcd run then pays only for its own processes (as with etcd on
  machines of its own) and the local run for the idle cluster. Each round reports the members'
  CPU as a share of one core. `--etcd-on both` alternates the two every two rounds (each pair
  swaps the cores) and reports the etcd mode's own cost per step, the members' CPU cancelled: the
  mean of the two groups' mean overheads, with its standard error and one-sided 95 % upper bound.

    python -m benchmarks.control_failover [--runs 5] [--ttl 3] [--saves 300] [--train-runs 5]
        [--train-steps 40] [--pairs 3] [--overhead-steps 30] [--side-by-side 0] [--side-steps 60] [--etcd-on etcd|local|both]
        [--out PATH]

Prints one JSON line and writes it to outputs/benchmarks/control_failover.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, datetime
from typing import List, Optional, Tuple

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


def _trainer_env() -> dict:
    import kintsugi
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.dirname(os.path.dirname(os.path.abspath(kintsugi.__file__))), os.environ.get("PYTHONPATH", "")]))


def _trainer_cmd(run_dir: str, *overrides: str) -> List[str]:
    return [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", "experiment=quick",
            "train.eval_batches=1", *overrides]


def _trainer(run_dir: str, *overrides: str, timeout: float = 600) -> Tuple[int, str, dict, List[dict], float]:
    """`python -m trainer` for real: (exit code, stderr, summary, metrics records, CPU seconds of
    the whole process tree: launcher, coordinators, workers; not the etcd members)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(_trainer_cmd(run_dir, *overrides), cwd=ROOT, env=_trainer_env(), capture_output=True,
                          text=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary, records = {}, []
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    return proc.returncode, proc.stderr, summary, records, cpu_s


def _commits(records: List[dict]) -> List[dict]:
    return [r for r in records if "loss" in r and "val_loss" not in r and "event" not in r]


def _etcd_overrides(endpoints: List[str], prefix: str, ttl: int, standbys: int = 1) -> List[str]:
    return ["recovery.control=etcd", f"recovery.etcd.endpoints=[{','.join(endpoints)}]",
            f"recovery.etcd.prefix={prefix}", f"recovery.etcd.lease_ttl_s={ttl}", f"recovery.standbys={standbys}"]


def _launcher_lines(log: str, pattern: str) -> List[Tuple[float, "re.Match"]]:
    """(wall time, match) of every launcher line of entry.log matching `pattern`, in order."""
    stamp = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[kintsugi\.launch\]\[\w+\] - "
    return [(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m)
            for m in re.finditer(stamp + pattern, log)]


def measure_training_failover(endpoints: List[str], workdir: str, run: int, ttl: int, steps: int) -> dict:
    run_dir = os.path.join(workdir, f"failover-{run}")
    kill_step = 5
    rc, err, summary, records, _ = _trainer(
        run_dir, f"train.max_steps={steps}", *_etcd_overrides(endpoints, f"/bench/train-{os.getpid()}-{run}/", ttl),
        f"faults.schedule=[{{step: {kill_step}, target: coordinator, kind: kill}}]",
        "launcher.machines=2")  # machines.json: the machine-seconds benchmarks._goodput accounts
    if rc != 0:
        raise RuntimeError(f"failover run {run} exited {rc}: {err[-2000:]}")
    with open(os.path.join(run_dir, "entry.log")) as f:
        log = f.read()
    kills = _launcher_lines(log, r"injecting kill into the coordinator \(pid \d+\) at step")
    if not kills:
        raise RuntimeError(f"failover run {run}: the launcher never killed the coordinator")
    killed = kills[0][0]
    leads = _launcher_lines(log, r"coordinator pid \d+ leads \(epoch (\d+)\)")
    after = [(t, int(m.group(2))) for t, m in leads if t >= killed]
    if not after:
        raise RuntimeError(f"failover run {run}: no new leader seen after the kill")
    led, epoch = after[0]
    seen = [(r["replica"], r["step"]) for r in _commits(records)]
    with open(os.path.join(run_dir, "job.json")) as f:
        replicas = json.load(f)["parallel"]["replicas"]
    expected = {(q, k) for q in range(replicas) for k in range(steps)}
    rereg = [int(x) for x in re.findall(r"worker w\d+ re-registered \(slot \[\d+, \d+\], step (\d+)\)", err)]
    from kintsugi.benchmarks._goodput import goodput_of
    try:  # how long the replicas stopped with no failure of their own (the fleet model's coordinator row)
        stalls = goodput_of(run_dir).stall_s
        stall = statistics.mean(stalls.values()) if stalls else 0.0
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"failover run {run}: cannot account its records ({e})") from None
    return {"failover_s": led - killed, "epoch_after_kill": epoch, "stall_s": stall,
            "epochs_before_kill": max([int(m.group(2)) for t, m in leads if t < killed], default=0), "steps_lost": len(expected - set(seen)) + (len(seen) - len(set(seen))),
            "reregistered_at": sorted(rereg),
            "final_val_loss": summary.get("final_val_loss")}


def _proc_cpu_s(pids: List[int]) -> float:
    """CPU seconds (user + system) the processes `pids` used so far, from /proc (the etcd members)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick   # utime, stime (fields 14, 15 of stat)
    return total


def _pin(pid: int, cpus: set) -> None:
    """Every thread of process `pid` onto `cpus` (sched_setaffinity on a pid moves one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def measure_side_by_side(cluster, workdir: str, rounds: int, steps: int, ttl: int, etcd_on: str = "etcd") -> dict:
    """Both modes at once, each run pinned to one core of its own, the cores swapped every round;
    the three etcd members are pinned to the core of the run named by `etcd_on` ("etcd": the etcd
    run pays for them, as when etcd shares the training machines; "local": the local run pays for
    the idle cluster and the etcd run only for its own processes, as when etcd runs elsewhere).
    What moves every run on a shared machine (other tenants, clock speed, the page cache) moves
    both alike, which back-to-back runs cannot give. Each run's figure is its median step time over
    steps 2 and later; the overhead is the median over rounds of etcd / local - 1. Beside it, the
    etcd members' CPU seconds per second of the round (a share of one core, from /proc)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("the side-by-side overhead needs two cores")
    env = _trainer_env()
    members = [p.pid for p in cluster.procs if p is not None]
    meds: dict = {"local": [], "etcd": []}
    ratios, etcd_share, members_on = [], [], []
    try:
        for k in range(rounds):
            core = {"local": cpus[k % 2], "etcd": cpus[1 - k % 2]}
            on = etcd_on if etcd_on != "both" else ("etcd", "local")[(k // 2) % 2]  # both: each pair of rounds
            members_on.append(on)
            for pid in members:
                _pin(pid, {core[on]})
            etcd_before, t0 = _proc_cpu_s(members), time.monotonic()
            procs = {}
            for mode in ("local", "etcd") if k % 2 == 0 else ("etcd", "local"):
                extra = ["recovery.control=local"] if mode == "local" else \
                    _etcd_overrides(cluster.endpoints, f"/bench/side-{os.getpid()}-{k}/", ttl, standbys=0)
                run_dir = os.path.join(workdir, f"side-{k}-{mode}")
                # stderr to a file: a pipe left unread while the other run is awaited could fill and stall it
                with open(os.path.join(workdir, f"side-{k}-{mode}.err"), "w") as err:
                    procs[mode] = (run_dir, subprocess.Popen(
                        ["taskset", "-c", str(core[mode]), *_trainer_cmd(run_dir, f"train.max_steps={steps}", *extra)],
                        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
            med = {}
            for mode, (run_dir, proc) in procs.items():
                if proc.wait(timeout=900) != 0:
                    with open(os.path.join(workdir, f"side-{k}-{mode}.err")) as f:
                        raise RuntimeError(f"side-by-side run {k} ({mode}) exited {proc.returncode}: {f.read()[-2000:]}")
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    med[mode] = _median_step_s([json.loads(line) for line in f])
                meds[mode].append(round(med[mode], 4))
            ratios.append(med["etcd"] / med["local"] - 1)
            etcd_share.append((_proc_cpu_s(members) - etcd_before) / (time.monotonic() - t0))
    finally:
        for pid in members:
            _pin(pid, set(cpus))
    out = {"side_by_side_rounds": rounds, "side_by_side_steps": steps, "side_by_side_etcd_on": etcd_on,
           "side_by_side_etcd_core_share_pct": [round(100 * x, 2) for x in etcd_share],
           "side_by_side_overhead_pct": round(100 * statistics.median(ratios), 2),
           "side_by_side_mean_overhead_pct": round(100 * statistics.mean(ratios), 2),
           "side_by_side_per_round_pct": [round(100 * x, 2) for x in ratios],
           "side_by_side_members_on": members_on,
           "side_by_side_median_step_s": meds}
    if etcd_on == "both":
        out.update(own_cost([r for r, on in zip(ratios, members_on) if on == "etcd"],
                            [r for r, on in zip(ratios, members_on) if on == "local"]))
    return out


def own_cost(members_on_etcd: list, members_on_local: list) -> dict:
    """What the etcd mode's own processes cost per step, the etcd members' CPU taken out: with the
    members on the etcd run's core a round charges their share to the etcd run (+m), with them on
    the local run's core to the local run (-m, nearly), so the mean of the two groups' means leaves
    the mode's own cost. Its standard error from the two groups' spreads, and the one-sided 95 %
    upper bound (mean + 1.645 s.e., normal approximation)."""
    g, h = members_on_etcd, members_on_local
    if len(g) < 2 or len(h) < 2:
        return {}
    est = (statistics.mean(g) + statistics.mean(h)) / 2
    se = math.sqrt(statistics.variance(g) / len(g) + statistics.variance(h) / len(h)) / 2
    return {"side_by_side_members_on_etcd_mean_pct": round(100 * statistics.mean(g), 2),
            "side_by_side_members_on_local_mean_pct": round(100 * statistics.mean(h), 2),
            "side_by_side_own_cost_pct": round(100 * est, 2), "side_by_side_own_cost_se_pct": round(100 * se, 2),
            "side_by_side_own_cost_upper95_pct": round(100 * (est + 1.645 * se), 2)}


def _median_step_s(records: List[dict]) -> float:
    return statistics.median(r["step_s"] for r in _commits(records) if r["step"] >= 2)


def measure_overhead(endpoints: List[str], workdir: str, pairs: int, steps: int, ttl: int,
                     variant: Optional[List[str]] = None) -> dict:
    """Failure-free runs of each mode back to back, `pairs` rounds, the order rotating: local, etcd
    and, when `variant` is given, etcd with those overrides too (to locate the overhead). Per run the
    median step time over steps 2.., and the CPU seconds of its process tree."""
    if pairs == 0:
        return {"per_step_overhead_pct": None, "cpu_overhead_pct": None}
    modes = ["local", "etcd"] + (["variant"] if variant else [])
    runs: dict = {m: [] for m in modes}
    cpu: dict = {m: [] for m in modes}
    ratios: dict = {m: [] for m in modes[1:]}
    cpu_ratios: dict = {m: [] for m in modes[1:]}
    for k in range(pairs):
        order = modes[k % len(modes):] + modes[:k % len(modes)]
        med, used = {}, {}
        for mode in order:
            extra = ["recovery.control=local"] if mode == "local" else \
                _etcd_overrides(endpoints, f"/bench/overhead-{os.getpid()}-{k}-{mode}/", ttl, standbys=0) + \
                (list(variant) if mode == "variant" else [])
            rc, err, summary, records, used[mode] = _trainer(os.path.join(workdir, f"overhead-{k}-{mode}"),
                                                             f"train.max_steps={steps}", *extra)
            if rc != 0:
                raise RuntimeError(f"overhead run {k} ({mode}) exited {rc}: {err[-2000:]}")
            med[mode] = _median_step_s(records)
            runs[mode].append(round(med[mode], 4))
            cpu[mode].append(round(used[mode], 2))
        for mode in modes[1:]:
            ratios[mode].append(med[mode] / med["local"] - 1)
            cpu_ratios[mode].append(used[mode] / used["local"] - 1)
    out = {"per_step_overhead_pct": round(100 * statistics.median(ratios["etcd"]), 2),
           "per_pair_overhead_pct": [round(100 * x, 2) for x in ratios["etcd"]], "median_step_s": runs,
           "cpu_overhead_pct": round(100 * statistics.median(cpu_ratios["etcd"]), 2),
           "per_pair_cpu_overhead_pct": [round(100 * x, 2) for x in cpu_ratios["etcd"]], "run_cpu_s": cpu}
    if variant:
        out.update({"variant": list(variant),
                    "variant_per_step_overhead_pct": round(100 * statistics.median(ratios["variant"]), 2),
                    "variant_per_pair_overhead_pct": [round(100 * x, 2) for x in ratios["variant"]],
                    "variant_cpu_overhead_pct": round(100 * statistics.median(cpu_ratios["variant"]), 2)})
    return out


def main(argv: Optional[List[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ttl", type=int, default=3)
    p.add_argument("--saves", type=int, default=300)
    p.add_argument("--train-runs", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--overhead-steps", type=int, default=30)
    p.add_argument("--variant", nargs="*", default=None, metavar="OVERRIDE",
                   help="also run the etcd mode with these overrides in every round of the overhead "
                        "(e.g. recovery.etcd.flush_s=60), to locate where its cost comes from")
    p.add_argument("--side-by-side", type=int, default=0, metavar="ROUNDS",
                   help="also run both modes at once, one core each, swapped every round (see "
                        "measure_side_by_side), ROUNDS rounds of --side-steps steps")
    p.add_argument("--side-steps", type=int, default=60)
    p.add_argument("--etcd-on", choices=("etcd", "local", "both"), default="etcd",
                   help="side by side: whose core the etcd members share (etcd: the etcd run pays for "
                        "them; local: the local run does, and the etcd run pays only for its own processes; "
                        "both: alternately, every two rounds, and the mode's own cost with the members' "
                        "taken out, its standard error and 95 %% upper bound)")
    p.add_argument("--out", default=OUT_PATH)
    args = p.parse_args(argv)
    from kintsugi.recovery.etcd_local import LocalEtcd
    version = subprocess.run(["etcd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    with tempfile.TemporaryDirectory(prefix="control-failover-", dir=tempfile.gettempdir()) as workdir, \
            LocalEtcd(3, base_dir=workdir) as cluster:
        failover = [measure_failover(cluster.endpoints, k, args.ttl) for k in range(args.runs)]
        saves = measure_saves(cluster.endpoints, workdir, args.saves)
        trained = [measure_training_failover(cluster.endpoints, workdir, k, args.ttl, args.train_steps)
                   for k in range(args.train_runs)]
        overhead = measure_overhead(cluster.endpoints, workdir, args.pairs, args.overhead_steps, args.ttl,
                                    args.variant)
        if args.side_by_side:
            overhead.update(measure_side_by_side(cluster, workdir, args.side_by_side, args.side_steps, args.ttl,
                                                 args.etcd_on))
    in_training = [t["failover_s"] for t in trained]
    result = {
        "benchmark": "control_failover", "date": date.today().isoformat(), "etcd": version, "members": 3,
        "lease_ttl_s": args.ttl, "runs": args.runs,
        "failover_s": [round(x, 3) for x in failover], "failover_mean_s": round(statistics.mean(failover), 3),
        "failover_max_s": round(max(failover), 3), "failover_bound_s": args.ttl + 1,
        "within_bound": all(x <= args.ttl + 1 for x in failover),
        "save_ms": {"etcd": saves["etcd"], "local_file": saves["local_file"]}, "state_bytes": saves["state_bytes"],
        "saves": args.saves,
        "training_failover_runs": args.train_runs, "training_steps": args.train_steps,
        "training_failover_s": [round(x, 3) for x in in_training],
        "training_failover_mean_s": round(statistics.mean(in_training), 3) if in_training else None,
        "training_failover_max_s": round(max(in_training), 3) if in_training else None,
        "steps_lost": [t["steps_lost"] for t in trained],
        "replica_stall_s": [round(t["stall_s"], 3) for t in trained],
        "replica_stall_mean_s": round(statistics.mean(t["stall_s"] for t in trained), 3) if trained else None,
        "leader_epoch_at_kill": [t["epochs_before_kill"] for t in trained],
        "kill_step": 5, "reregistered_at": [t["reregistered_at"] for t in trained],
        "final_val_loss": sorted({t["final_val_loss"] for t in trained}, key=str),
        "overhead_pairs": args.pairs, "overhead_steps": args.overhead_steps, **overhead,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
