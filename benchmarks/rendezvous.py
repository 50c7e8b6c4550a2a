"""Claim: what it costs to form a gloo process group of N ranks, and to notice a killed peer, measured
with real processes on loopback — the inputs `benchmarks/fleet_model.py` extrapolates to large fleets.

Method. The parent hosts a `TCPStore` (the coordinator's role) and starts N worker processes once per
N (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`, `GLOO_SOCKET_IFNAME=lo`). Each round has a fresh
prefix: every rank says it is ready (a store counter) and blocks on a start key; the parent sets that
key (the common start barrier, its monotonic time `t_go`), and every rank then builds
`ProcessGroupGloo(PrefixStore(prefix, store), rank, N, timeout)` — exactly what `parallel/groups.py`
does — and runs an all-reduce of one element. The round's cost is `max over ranks(t_usable) - t_go`:
the group is formed and has moved data. CLOCK_MONOTONIC is system-wide on Linux, so the parent's and
the workers' clocks agree. One untimed warm-up round per N comes first. Also recorded per round: the
median CPU seconds a rank spent forming (process time, gloo's threads included: the work a rank with
a machine of its own would do), and per N the time from spawning a worker to it being ready
(`import torch` + store connect: the floor of any process restart).

Detection (N = 2): a survivor blocks in a pending `recv` from a fresh victim; the parent SIGKILLs the
victim and the survivor records when the recv raises. Reported: raise time - kill time.

Fit: least squares of the per-N medians against `a + b*N`, `a + b*N*log2(N)` and `a + b*N^2`, with
residuals; `best` is the lowest RMS residual among the first two (the shapes gloo's full mesh and a
central store suggest for a fleet whose ranks each have a machine). On this box, N ranks share 2
cores, so above N = 2 the wall time also measures oversubscription; the N^2 fit is there to show it.

    python -m benchmarks.rendezvous [--quick] [--out PATH]   # --quick: N in {2, 4, 8}, fewer rounds, < 60 s

Prints one JSON line and writes it to outputs/benchmarks/rendezvous.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from typing import Callable, Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_PATH = os.path.join(ROOT, "outputs", "benchmarks", "rendezvous.json")  # outputs/ is gitignored
GROUP_TIMEOUT_S = 120.0
log = logging.getLogger("benchmarks.rendezvous")

# name -> feature of N; a model is `a + b * feature(N)`.
FIT_FORMS: Dict[str, Callable[[float], float]] = {
    "a+b*N": lambda n: float(n),
    "a+b*N*log2(N)": lambda n: n * math.log2(n),
    "a+b*N^2": lambda n: float(n) ** 2,
}
FLEET_FORMS = ("a+b*N", "a+b*N*log2(N)")


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple:
    """Ordinary least squares y = a + b*x; returns (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def fit_models(ns: Sequence[int], ys: Sequence[float]) -> dict:
    """Every form of FIT_FORMS fitted to (N, y), with residuals, and the best of FLEET_FORMS."""
    out = {}
    for name, feat in FIT_FORMS.items():
        a, b = fit_line([feat(n) for n in ns], ys)
        res = [y - (a + b * feat(n)) for n, y in zip(ns, ys)]
        out[name] = {"a": a, "b": b, "residuals": dict(zip([str(n) for n in ns], res)),
                     "rms_residual": math.sqrt(sum(r * r for r in res) / len(res))}
    best = min(FLEET_FORMS, key=lambda k: out[k]["rms_residual"])
    return {"models": out, "best": best}


def predict(fit: dict, n: float, form: str = None) -> float:
    """Rendezvous seconds for n ranks from a `fit_models` result (never below 0)."""
    m = fit["models"][form or fit["best"]]
    return max(0.0, m["a"] + m["b"] * FIT_FORMS[form or fit["best"]](n))


# ----------------------------------------------------------------------------- worker side

def _worker(port: int, rank: int, size: int, rounds: int, tag: str, mode: str) -> None:
    t_start = time.monotonic()
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=300))
    store.set(f"{tag}/up/{rank}", json.dumps({"t": time.monotonic(), "import_s": time.monotonic() - t_start}))
    one = torch.ones(1)
    if mode == "form":
        for k in range(rounds):
            store.add(f"{tag}/ready/{k}", 1)
            store.wait([f"{tag}/go/{k}"])
            t_seen, cpu0 = time.monotonic(), time.process_time()
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{tag}/r{k}/", store), rank, size,
                                       timedelta(seconds=GROUP_TIMEOUT_S))
            t_formed = time.monotonic()
            pg.allreduce([one]).wait()
            t_usable = time.monotonic()
            store.set(f"{tag}/done/{k}/{rank}", json.dumps({"seen": t_seen, "formed": t_formed, "usable": t_usable,
                                                           "cpu_s": time.process_time() - cpu0}))
            del pg
        store.wait([f"{tag}/exit"])
    elif mode == "survivor":  # rank 1 of a 2-rank group, one group per trial, a fresh victim each time
        for k in range(rounds):
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{tag}/d{k}/", store), 1, 2, timedelta(seconds=30))
            pg.allreduce([one]).wait()
            work = pg.recv([torch.empty(1)], 0, 0)
            store.set(f"{tag}/armed/{k}", "1")
            try:
                work.wait()
                raised = None
            except Exception as e:  # noqa: BLE001 - the point of the measurement
                raised = str(e).splitlines()[0][:120]
            store.set(f"{tag}/raised/{k}", json.dumps({"t": time.monotonic(), "error": raised}))
            pg = None  # a broken group; the next trial builds a new one
    elif mode == "victim":
        k = rounds  # the trial number travels in `rounds`
        pg = dist.ProcessGroupGloo(dist.PrefixStore(f"{tag}/d{k}/", store), 0, 2, timedelta(seconds=30))
        pg.allreduce([one]).wait()
        time.sleep(3600)  # until SIGKILLed


# ----------------------------------------------------------------------------- parent side

def _spawn(port: int, rank: int, size: int, rounds: int, tag: str, mode: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", TORCH_CPP_LOG_LEVEL="ERROR",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.rendezvous", "--worker", str(port), str(rank), str(size),
           str(rounds), tag, mode]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def _poll(cond: Callable[[], bool], timeout_s: float, what: str, procs: List[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError(f"a worker exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def measure_formation(store, n: int, rounds: int) -> dict:
    """Start n workers once, run 1 warm-up + `rounds` timed formations; per-round seconds."""
    tag = f"n{n}"
    t_spawn = time.monotonic()
    procs = [_spawn(store.port, r, n, rounds + 1, tag, "form") for r in range(n)]
    try:
        _poll(lambda: all(store.check([f"{tag}/up/{r}"]) for r in range(n)), 600, f"{n} workers to start", procs)
        ups = [json.loads(store.get(f"{tag}/up/{r}")) for r in range(n)]
        walls, cpus, wakes = [], [], []
        for k in range(rounds + 1):
            _poll(lambda: store.add(f"{tag}/ready/{k}", 0) >= n, 300, f"ready {tag}/{k}", procs)
            time.sleep(0.05)  # let every rank enter its wait on the start key
            t_go = time.monotonic()
            store.set(f"{tag}/go/{k}", "1")
            keys = [f"{tag}/done/{k}/{r}" for r in range(n)]
            _poll(lambda: store.check(keys), GROUP_TIMEOUT_S + 30, f"round {tag}/{k}", procs)
            done = [json.loads(store.get(key)) for key in keys]
            if k == 0:
                continue  # warm-up
            walls.append(max(d["usable"] for d in done) - t_go)
            cpus.append(statistics.median(d["cpu_s"] for d in done))
            wakes.append(statistics.median(d["seen"] - t_go for d in done))
            log.info("N=%d round %d: %.3f s (median rank CPU %.3f s)", n, k, walls[-1], cpus[-1])
        store.set(f"{tag}/exit", "1")
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return {"rounds": rounds, "samples_s": [round(w, 4) for w in walls],
            "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "rank_cpu_median_s": statistics.median(cpus), "start_wake_median_s": statistics.median(wakes),
            "spawn_to_ready_median_s": statistics.median(u["t"] - t_spawn for u in ups),
            "import_median_s": statistics.median(u["import_s"] for u in ups)}


def measure_detection(store, trials: int) -> dict:
    """SIGKILL a peer while the survivor waits in recv; seconds until the recv raises."""
    tag = "det"
    survivor = _spawn(store.port, 1, 2, trials, tag, "survivor")
    out, errors = [], []
    try:
        for k in range(trials):
            victim = _spawn(store.port, 0, 2, k, tag, "victim")
            _poll(lambda: store.check([f"{tag}/armed/{k}"]), 300, f"detection trial {k}", [survivor, victim])
            time.sleep(0.3)  # the recv is posted (armed is set after it); let it settle in the wait
            t_kill = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            _poll(lambda: store.check([f"{tag}/raised/{k}"]), 60, f"detection {k} raise", [survivor])
            rec = json.loads(store.get(f"{tag}/raised/{k}"))
            out.append(rec["t"] - t_kill)
            errors.append(rec["error"])
            log.info("detection trial %d: %.4f s (%s)", k, out[-1], rec["error"])
        survivor.wait(timeout=60)
    finally:
        if survivor.poll() is None:
            survivor.kill()
    return {"trials": trials, "samples_s": [round(x, 4) for x in out], "median_s": statistics.median(out),
            "min_s": min(out), "max_s": max(out), "raised": sorted(set(e or "did not raise" for e in errors))}


def run(quick: bool) -> dict:
    import torch
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300))
    sizes = (2, 4, 8) if quick else (2, 4, 8, 16, 32)
    rounds = 5 if quick else 15
    t0, load_start = time.monotonic(), os.getloadavg()[0]
    per_n = {}
    for n in sizes:
        per_n[n] = measure_formation(store, n, rounds)
        log.info("N=%d: median %.3f s", n, per_n[n]["median_s"])
    detection = measure_detection(store, 2 if quick else 5)
    ns = list(per_n)
    fit_wall = fit_models(ns, [per_n[n]["median_s"] for n in ns])
    fit_cpu = fit_models(ns, [per_n[n]["rank_cpu_median_s"] for n in ns])
    load = os.getloadavg()
    return {"benchmark": "rendezvous", "quick": quick, "torch": torch.__version__, "cores": os.cpu_count(),
            "loadavg_1m_start": round(load_start, 2), "loadavg_1m": round(load[0], 2), "per_n": {str(n): v for n, v in per_n.items()},
            "fit_wall": fit_wall, "fit_rank_cpu": fit_cpu, "detection_kill_n2": detection,
            "process_start_s": per_n[2]["spawn_to_ready_median_s"], "elapsed_s": round(time.monotonic() - t0, 1)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        port, rank, size, rounds, tag, mode = argv[1:7]
        _worker(int(port), int(rank), int(size), int(rounds), tag, mode)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {2, 4, 8}, 5 rounds, 2 detection trials")
    ap.add_argument("--out", default=OUT_PATH, help="where to write the JSON line as well")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    out = run(args.quick)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    line = json.dumps(out)
    with open(args.out, "w") as f:
        f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
