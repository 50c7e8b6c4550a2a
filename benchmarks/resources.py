"""Claim: a worker's threads, file descriptors and store keys do not grow with the number of
generations it lives through (issue: "bounded resources ... measure over 50 generations").

Three real processes build `--generations` successive groups over one TCPStore (its server lives in
this process, as the coordinator's does), each generation the way a worker uses it: a p2p exchange
along the chain, an all-reduce, then abandoned operations left behind by a generation that ended
mid-step (a receive nobody will answer, a send nobody will read); the generation's group is closed
once the next one formed. Every tenth generation ranks 0 and 1 also try to form a group rank 2 never
joins, and give up (a formation abandoned because the plan moved on).

Each rank counts its open descriptors (/proc/self/fd) and threads (/proc/self/task) after
generation `WARMUP` and at the end (after the reaper drained); this process counts the store's keys.
`--leak` keeps every group open instead of closing it (the behaviour before), to show that the
measurement sees a leak.

    python -m benchmarks.resources [--generations 50] [--leak]

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

WARMUP = 5
ABANDONED_TIMEOUT_S = 1.0  # the gloo rendezvous of an abandoned formation runs on until this
RANKS = 3


def _counts() -> dict:
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task"))}


def _rank_main(rank: int, port: int, generations: int, leak: bool) -> None:
    import torch
    import torch.distributed as dist

    from kintsugi.parallel.groups import Aborted, FormationError, form_group

    def connect():
        return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20),
                             wait_for_workers=False, use_libuv=True)

    prev, kept, marks = None, [], {}
    for g in range(generations):
        if g % 10 == 9 and rank < 2:  # a formation that rank 2 never joins: abandoned
            abort = threading.Event()
            threading.Timer(0.1, abort.set).start()
            try:
                form_group(connect, f"abandoned/{g}", rank, RANKS, ABANDONED_TIMEOUT_S, abort=abort)
                raise AssertionError("a group formed without rank 2")
            except (Aborted, FormationError):
                pass
        grp = form_group(connect, f"cell/0/{g}", rank, RANKS, 20.0)
        x = torch.full((1024,), float(rank + g))
        if rank > 0:
            grp.irecv(x, rank - 1, 1).wait()
        if rank < RANKS - 1:
            grp.isend(x, rank + 1, 1).wait()
        grp.all_reduce(x).wait()
        if x[0].item() != RANKS * g:  # rank 0's value travelled down the chain, then summed
            raise SystemExit(f"generation {g}: wrong data {x[0].item()} != {RANKS * g}")
        # What a generation that ended mid-step leaves: a receive nobody answers, a send nobody reads.
        grp.irecv(torch.zeros(8), (rank + 1) % RANKS, 2)
        grp.isend(torch.ones(8), (rank + 2) % RANKS, 3)
        if prev is not None:
            if leak:
                kept.append(prev)
            else:
                prev.close()
        prev = grp
        if g == WARMUP:
            marks["warm"] = _counts()
    if prev is not None and not leak:
        prev.close()
    # The reaper closes pairs with 1 ms timeouts, an abandoned rendezvous ends at its timeout: drain.
    time.sleep(ABANDONED_TIMEOUT_S + 1.0)
    marks["end"] = _counts()
    print(json.dumps(marks), flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--leak", action="store_true")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank is not None:
        _rank_main(args.rank, args.port, args.generations, args.leak)
        return {}
    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, use_libuv=True,
                          timeout=timedelta(seconds=30))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.resources", "--rank", str(r), "--port", str(port),
                               "--generations", str(args.generations)] + (["--leak"] if args.leak else []),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(RANKS)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"rank failed ({p.returncode}): {err[-2000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    keys = store.num_keys()
    span = args.generations - 1 - WARMUP
    result = {
        "benchmark": "resources", "generations": args.generations, "leak": args.leak, "ranks": RANKS,
        "fd_growth": max(o["end"]["fds"] - o["warm"]["fds"] for o in outs),
        "thread_growth": max(o["end"]["threads"] - o["warm"]["threads"] for o in outs),
        "fds_end": [o["end"]["fds"] for o in outs], "threads_end": [o["end"]["threads"] for o in outs],
        "store_keys_end": keys, "generations_measured": span,
        "wall_s": round(time.monotonic() - t0, 2),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
