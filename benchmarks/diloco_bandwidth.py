"""Claim under test: on a slow link Streaming DiLoCo's fewer bytes become shorter wall-clock time.

benchmarks/diloco.py counts bytes on loopback, where sending is almost free. This benchmark runs the
same training code (`benchmarks.diloco._train`, the same three variants on equal tokens:
data_parallel, diloco, streaming) with the two replicas in two network namespaces joined by a veth
pair whose both ends are shaped by `tc ... tbf rate <R>mbit` (plus `netem delay` with --delay-ms),
and reports per variant and link: wall seconds of the training loop (syncs still in flight
included), seconds per step, bytes sent (the all-reduce's own count, and what left each veth), and
the speedup over data_parallel. The same variants over plain loopback (both replicas in the root
namespace) are measured in the same run for reference.

Replica 0 runs in namespace 0 and hosts the rendezvous (TCPStore) on its veth address; replica 1
runs in namespace 1; both via `ip netns exec`. The namespaces are deleted on exit, Ctrl-C or
failure. Needs root (CAP_NET_ADMIN and the right to mount /sys in a namespace); where `ip netns` or
`tc` is refused, prints `{"benchmark": "diloco_bandwidth", "skipped": "<why>"}` and exits 0.

    sudo python -m benchmarks.diloco_bandwidth [--rates 100 20 --delay-ms 0 --steps 75 ...]
    python -m benchmarks.diloco_bandwidth --quick      # tiny model, 6 steps, one link: a smoke run

Every option of benchmarks/diloco.py applies (defaults: 75 steps instead of 300, 4 evaluation
batches). Prints one JSON line; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from typing import Dict, List, Optional

import torch

from kintsugi.benchmarks import diloco as base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "ksbw"            # namespace / veth names: ksbw0-<pid>, ksbw1-<pid>
SUBNET = "10.203.77"       # .1 = replica 0, .2 = replica 1 (private to the two namespaces)
NS_PORT = 29517            # TCPStore port inside namespace 0 (a fresh namespace has no listeners)
REPLICAS = base.REPLICAS


# --- the link -----------------------------------------------------------------------------------------
def _run(cmd: List[str], timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Link:
    """Two network namespaces joined by a veth pair; `shape(rate_mbit, delay_ms)` sets tbf (and netem)
    on both ends, so each direction carries at most `rate_mbit`. `close()` deletes everything (the
    veth pair goes with its namespaces) and is safe to call twice."""

    def __init__(self):
        pid = os.getpid()
        self.ns = [f"{PREFIX}{r}-{pid}" for r in range(REPLICAS)]
        self.dev = [f"{PREFIX}v{r}-{pid}" for r in range(REPLICAS)]  # <= 15 characters (IFNAMSIZ)
        self.ip = [f"{SUBNET}.{r + 1}" for r in range(REPLICAS)]
        self.made: List[str] = []

    @staticmethod
    def remove_stale() -> None:
        """Delete namespaces left by a run that was SIGKILLed (its pid is gone); others' stay."""
        try:
            names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return
        for line in names.splitlines():
            name = line.split()[0] if line.split() else ""
            tail = name.rsplit("-", 1)[-1]
            if name.startswith(PREFIX) and "-" in name and tail.isdigit() and not _pid_alive(int(tail)):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)

    def open(self) -> "Link":
        for ns in self.ns:
            _run(["ip", "netns", "add", ns])
            self.made.append(ns)
        _run(["ip", "link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1]])
        self.made.append(self.dev[0])  # until moved into namespace 0: deleting it removes the pair
        for r in range(REPLICAS):
            _run(["ip", "link", "set", self.dev[r], "netns", self.ns[r]])
        self.made.remove(self.dev[0])
        for r in range(REPLICAS):
            _run(["ip", "-n", self.ns[r], "addr", "add", f"{self.ip[r]}/24", "dev", self.dev[r]])
            _run(["ip", "-n", self.ns[r], "link", "set", self.dev[r], "up"])
            _run(["ip", "-n", self.ns[r], "link", "set", "lo", "up"])
            _run(["ip", "netns", "exec", self.ns[r], sys.executable, "-c", "pass"])  # may exec (mounts /sys)
        return self

    def shape(self, rate_mbit: Optional[float], delay_ms: float = 0.0) -> None:
        for r in range(REPLICAS):
            shape_dev(self.dev[r], rate_mbit, delay_ms, self.ns[r])

    def qdisc(self) -> str:
        return _run(["tc", "-n", self.ns[0], "qdisc", "show", "dev", self.dev[0]]).stdout.strip()

    def close(self) -> None:
        while self.made:
            name = self.made.pop()
            cmd = ["ip", "link", "del", name] if name in self.dev else ["ip", "netns", "del", name]
            try:
                subprocess.run(cmd, capture_output=True, timeout=10)
            except (OSError, subprocess.SubprocessError):
                pass


def shape_dev(dev: str, rate_mbit: Optional[float], delay_ms: float = 0.0, ns: Optional[str] = None) -> None:
    """Shape the egress of `dev` (in namespace `ns`, or in this process's own): tbf at `rate_mbit`
    with a bucket of 5 ms at the rate (>= 16 kB) and a queue of 100 ms, under netem when `delay_ms`;
    `rate_mbit=None` removes the shaping (the veth is then as fast as loopback)."""
    tc = ["tc"] + (["-n", ns] if ns else []) + ["qdisc"]
    subprocess.run(tc + ["del", "dev", dev, "root"], capture_output=True, timeout=10)  # none yet: fine
    if rate_mbit is None:
        return
    burst = max(16_000, int(rate_mbit * 1e6 / 8 * 0.005))
    tbf = ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "100ms"]
    if delay_ms > 0:
        _run(tc + ["add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{delay_ms:g}ms"])
        _run(tc + ["add", "dev", dev, "parent", "1:1", "handle", "10:"] + tbf)
    else:
        _run(tc + ["add", "dev", dev, "root"] + tbf)


def netns_unavailable() -> Optional[str]:
    """Why namespaces with a shaped veth cannot be made here (None: they can): builds a probe link."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2)"
    if os.geteuid() != 0:
        return "not root: `ip netns add` and `tc` need CAP_NET_ADMIN"
    probe = Link()
    probe.ns = [f"{PREFIX}p{r}-{os.getpid()}" for r in range(REPLICAS)]
    probe.dev = [f"{PREFIX}q{r}-{os.getpid()}" for r in range(REPLICAS)]
    try:
        probe.open()
        probe.shape(10.0)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return str(e)[:300]
    finally:
        probe.close()
    return None


# --- one replica: `python -m benchmarks.diloco_bandwidth --replica RANK ...` ---------------------------
def _tx_bytes(dev: str) -> Optional[int]:
    """Bytes sent so far by interface `dev` of this process's network namespace."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == dev and rest:
                return int(rest.split()[8])
    return None


class _BlockedClock:
    """Seconds the training thread spends blocked in `wait_abortable`: the whole fp32 all-reduce for
    data_parallel, the unfinished rest of an outer sync for diloco/streaming. It is measured around
    `parallel.diloco`'s own calls (patched in this replica process only), and is less sensitive than
    the wall time to other jobs on a shared CPU."""

    def __init__(self):
        import kintsugi.parallel.diloco as pd
        self.seconds, inner = 0.0, pd.wait_abortable

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t
        pd.wait_abortable = timed


def replica_main(argv: List[str]) -> None:
    """One replica: for each link condition (shaping its own veth end), train every variant."""
    p = argparse.ArgumentParser()
    p.add_argument("--replica", type=int, required=True)
    p.add_argument("--master", required=True, help="HOST:PORT of the TCPStore on replica 0")
    p.add_argument("--job", required=True, help="torch.save'd {'args', 'corpus', 'conditions'}")
    p.add_argument("--out", required=True)
    p.add_argument("--dev", default="", help="this replica's veth end: shaped per condition, its bytes counted")
    a = p.parse_args(argv)
    import torch.distributed as dist
    torch.set_num_threads(1)
    job = torch.load(a.job, weights_only=False)
    args, corpus = job["args"], job["corpus"]
    conditions = job["conditions"] if a.dev else [("loopback", None)]
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.replica, world_size=REPLICAS,
                            timeout=timedelta(seconds=args.collective_timeout))
    group = dist.new_group(list(range(REPLICAS)))  # the stage group, as in benchmarks/diloco.py
    clock = _BlockedClock()
    # Warm up outside the clock: the modules `_train` imports, and gloo's connection with a payload
    # of the model's size.
    from kintsugi.compression import api as compression
    importlib.import_module("kintsugi.trainer.runtime.stage")
    from kintsugi.trainer.model.llama import Llama, num_params
    compression.all_reduce([torch.zeros(num_params(Llama(base._job(args).model)))], "none", group=group)
    results: Dict[str, Dict] = {}
    for label, rate in conditions:
        dist.barrier()  # the link is idle: replica 0 has evaluated the last variant
        if a.dev:
            shape_dev(a.dev, rate, args.delay_ms)
        dist.barrier()
        results[label] = {}
        for name, cfg in base._variants(args).items():
            if args.only and name not in args.only:
                continue
            dist.barrier()
            tx0 = _tx_bytes(a.dev) if a.dev else None
            clock.seconds = 0.0
            r = base._train(a.replica, args, name, cfg, corpus, group)
            r["blocked_s"] = round(clock.seconds, 2)
            if tx0 is not None:
                r["wire_tx_bytes"] = _tx_bytes(a.dev) - tx0
            results[label][name] = r
        torch.save(results, a.out)  # what is done so far survives a later failure
    dist.barrier()
    dist.destroy_process_group()


# --- the driver ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(name: str, tmp: str, job_path: str, timeout_s: float, link: Optional[Link] = None) -> Dict:
    """Run both replicas, in the link's namespaces (every condition of the job) or in this namespace
    over loopback (condition "loopback"), and return {condition: {variant: result}}: replica 0's
    results with `wire_tx_bytes` summed over both replicas."""
    procs, logs = [], []
    master = f"{link.ip[0]}:{NS_PORT}" if link else f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        for r in range(REPLICAS):
            cmd = [sys.executable, "-m", "benchmarks.diloco_bandwidth", "--replica", str(r), "--master", master,
                   "--job", job_path, "--out", os.path.join(tmp, f"{name}-{r}.pt")]
            if link:
                cmd = ["ip", "netns", "exec", link.ns[r]] + cmd + ["--dev", link.dev[r]]
            # gloo would look its address up from the hostname; name the interface instead.
            env_r = dict(env, GLOO_SOCKET_IFNAME=link.dev[r] if link else "lo")
            logs.append(open(os.path.join(tmp, f"{name}-{r}.log"), "w+"))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env_r, stdin=subprocess.DEVNULL, stdout=logs[-1],
                                          stderr=logs[-1]))
        deadline = time.time() + timeout_s
        while any(pr.poll() is None for pr in procs) or any(pr.returncode for pr in procs):
            failed = [r for r, pr in enumerate(procs) if pr.returncode]
            if failed or time.time() > deadline:
                why = f"replica {failed[0]} exited {procs[failed[0]].returncode}" if failed \
                    else f"timed out after {timeout_s:.0f}s (--pair-timeout)"
                raise RuntimeError(f"{name}: {why}\n" + _tails(logs))
            time.sleep(0.2)
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
        for log in logs:
            log.close()
    res = [torch.load(os.path.join(tmp, f"{name}-{r}.pt"), weights_only=False) for r in range(REPLICAS)]
    for label, variants in res[0].items():
        for v, r0 in variants.items():
            if "wire_tx_bytes" in r0:
                r0["wire_tx_bytes"] = sum(res[r][label][v]["wire_tx_bytes"] for r in range(REPLICAS))
    return res[0]


def _tails(logs) -> str:
    out = []
    for r, log in enumerate(logs):
        log.flush()
        log.seek(0)
        out.append(f"--- replica {r} ---\n" + log.read()[-1500:])
    return "\n".join(out)


def _condition(results: Dict, steps: int, reference: Optional[Dict] = None) -> Dict:
    variants = {}
    for name, r in results.items():
        v = {"wall_s": r["train_s"], "s_per_step": round(r["train_s"] / steps, 4), "blocked_s": r["blocked_s"],
             "bytes": r["bytes"], "val_loss": round(r["val_loss"], 4)}
        if "wire_tx_bytes" in r:
            v["wire_bytes"] = r["wire_tx_bytes"]  # what left both veth ends: payload + TCP/IP + gloo
        if reference and name in reference["variants"]:  # what the link adds to a step
            ref = reference["variants"][name]
            v["link_s_per_step"] = round(v["s_per_step"] - ref["s_per_step"], 4)
            v["link_blocked_s_per_step"] = round((v["blocked_s"] - ref["blocked_s"]) / steps, 4)
        variants[name] = v
    out = {"variants": variants}
    dp = variants.get("data_parallel")
    if dp:
        out["speedup_vs_data_parallel"] = {n: round(dp["wall_s"] / max(v["wall_s"], 0.05), 2)
                                           for n, v in variants.items() if n != "data_parallel"}
    return out


def add_idle_estimate(conditions: Dict, steps: int) -> None:
    """On a CPU shared with other jobs the wall times carry their noise; the blocked times much less.
    All variants do the same compute per step, so take the least compute time seen (wall - blocked,
    any link, any variant: the least disturbed) and add each variant's blocked time: the speedup
    an idle machine would show. Adds `compute_s_per_step` and `speedup_vs_data_parallel_idle_cpu`."""
    comp = [(v["wall_s"] - v["blocked_s"]) / steps for c in conditions.values() for v in c["variants"].values()]
    if not comp:
        return
    c = max(min(comp), 1e-3)
    for cond in conditions.values():
        vs = cond["variants"]
        cond["compute_s_per_step"] = round(c, 4)
        if "data_parallel" in vs:
            dp = c + vs["data_parallel"]["blocked_s"] / steps
            cond["speedup_vs_data_parallel_idle_cpu"] = {
                n: round(dp / (c + v["blocked_s"] / steps), 2) for n, v in vs.items() if n != "data_parallel"}


def build_parser() -> argparse.ArgumentParser:
    p = base.build_parser(__doc__.splitlines()[0])
    p.set_defaults(steps=75, eval_batches=4)
    p.add_argument("--rates", type=float, nargs="+", default=[100.0, 20.0], help="link rates, Mbit/s each way")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way netem delay on each end (0: none)")
    p.add_argument("--no-loopback", action="store_true", help="skip the loopback reference (a separate pair)")
    p.add_argument("--collective-timeout", type=float, default=300.0)
    p.add_argument("--pair-timeout", type=float, default=1200.0, help="seconds allowed to one pair of replicas")
    p.add_argument("--quick", action="store_true", help="tiny model, 6 steps, one 50 Mbit/s link: a smoke run")
    return p


QUICK = dict(dim=32, layers=2, steps=6, sync_every=3, fragments=2, overlap=1, batch_size=4, seq_len=32, warmup=1,
             eval_batches=1, rates=[50.0], pair_timeout=120.0, collective_timeout=60.0)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    skipped = netns_unavailable()
    if skipped:
        out = {"benchmark": "diloco_bandwidth", "skipped": skipped}
        print(json.dumps(out))
        return out

    from kintsugi.parallel.diloco import data_parallel_bytes_per_step
    from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
    from kintsugi.trainer.model.llama import Llama, num_params
    corpus = prepare_corpus(DataConfig(max_files=args.max_files, seq_len=args.seq_len))
    numel = num_params(Llama(base._job(args).model))
    dp_step = data_parallel_bytes_per_step(numel, REPLICAS)
    # The unshaped veth first (the in-run reference), then the rates; one pair of processes for all.
    conditions = [("unlimited_veth", None)] + [(f"{r:g}mbit", r) for r in args.rates]
    load0 = os.getloadavg()
    t0 = time.time()
    link = Link()
    atexit.register(link.close)
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    raw: Dict[str, Dict] = {}
    try:
        Link.remove_stale()
        with tempfile.TemporaryDirectory() as tmp:
            job_path = os.path.join(tmp, "job.pt")
            torch.save({"args": args, "corpus": corpus, "conditions": conditions}, job_path)
            if not args.no_loopback:
                print("[diloco_bandwidth] loopback (both replicas in this namespace)", file=sys.stderr)
                raw.update(run_pair("loopback", tmp, job_path, args.pair_timeout))
            link.open()
            if args.delay_ms > 0:  # netem is a kernel module (sch_netem) that may be missing
                try:
                    link.shape(args.rates[0] if args.rates else None, args.delay_ms)
                except RuntimeError as e:
                    raise SystemExit(f"diloco_bandwidth: --delay-ms needs netem here: {e}") from None
            print(f"[diloco_bandwidth] veth {link.dev} in {link.ns}: {[c for c, _ in conditions]}", file=sys.stderr)
            raw.update(run_pair("netns", tmp, job_path, args.pair_timeout, link))
    finally:
        link.close()
        signal.signal(signal.SIGTERM, old_term)
    out = {}
    for label, rate in [("loopback", None)] + conditions:
        if label not in raw:
            continue
        ref = out.get("unlimited_veth") if rate is not None else None
        out[label] = dict(rate_mbit=rate, **_condition(raw[label], args.steps, ref))
        if rate is not None:
            # The least time data_parallel's bytes take on this link, per step.
            out[label].update(delay_ms=args.delay_ms,
                              data_parallel_link_floor_s_per_step=round(dp_step * 8 / (rate * 1e6), 4))
    add_idle_estimate(out, args.steps)
    summary = {"benchmark": "diloco_bandwidth", "replicas": REPLICAS, "params": numel, "steps": args.steps,
               "tokens_per_variant": REPLICAS * args.batch_size * args.seq_len * args.steps,
               "sync_every": args.sync_every, "fragments": args.fragments, "overlap": args.overlap,
               "quant": args.quant, "data_parallel_bytes_per_step": dp_step,
               "link": "veth between 2 network namespaces; tbf on both ends (rate_mbit each way)",
               "conditions": out, "quick": args.quick,
               "load_avg_1m": [round(load0[0], 2), round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
               "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--replica":
        replica_main(sys.argv[1:])
    else:
        main()
