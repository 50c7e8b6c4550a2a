"""`launcher=torchrun`: every process torchrun starts is a Kintsugi worker.

torchrun gives RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Global rank 0 starts the coordinator
beside itself on MASTER_PORT+1 unless `recovery.coordinator=host:port` names one already running on
a stable host (`python -m recovery.coordinator`), which is what a job that must survive the loss of
node 0 should do. Ranks beyond replicas x stages wait as spares. torchrun itself cannot replace one
worker (it restarts all), so replacements join through the coordinator, not through torchrun.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from recovery import protocol as P

from .config import ConfigError, JobConfig
from .launch import child_env


def run_torchrun(job: JobConfig, run_dir: str, corpus: dict) -> int:
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        master = os.environ["MASTER_ADDR"]
        master_port = int(os.environ["MASTER_PORT"])
    except KeyError as e:
        raise ConfigError(f"launcher=torchrun but {e.args[0]} is not set; start with `torchrun ... -m trainer "
                          "launcher=torchrun` or use launcher=local") from None
    need = job.parallel.replicas * job.parallel.stages
    if world < need:
        raise ConfigError(f"torchrun started {world} processes but parallel.replicas x parallel.stages = {need}; "
                          f"start at least {need} (extra ones wait as spares)")
    if job.recovery.coordinator:
        host, port = P.parse_addr(job.recovery.coordinator)
    else:
        host, port = master, master_port + 1
    coordinator = None
    if rank == 0 and not job.recovery.coordinator:
        os.makedirs(run_dir, exist_ok=True)
        job_path = os.path.join(run_dir, "job.json")
        with open(job_path, "w") as f:
            json.dump(job.to_dict(), f, indent=1)
        cmd = [sys.executable, "-m", "recovery.coordinator", "--port", str(port), "--run-dir", run_dir,
               "--job", job_path] + ([] if job.logger.progress else ["--no-progress"])
        coordinator = subprocess.Popen(cmd, env=child_env())
    store = _connect(host, port, job.launcher.start_timeout_s)
    if rank == 0:
        P.put_json(store, "corpus", corpus)
    import logging
    from .worker import Worker
    logging.getLogger("kintsugi.worker").setLevel(os.environ.get("KINTSUGI_LOG", "WARNING"))
    os.environ.setdefault("KINTSUGI_MACHINE", socket.gethostname())
    wid = f"{socket.gethostname()}-rank{rank}"
    rc = Worker(store, wid, os.environ.get(P.TOKEN_ENV), hb_store=_connect(host, port, 60)).run()
    if coordinator is not None:
        try:
            return coordinator.wait(timeout=60) or rc
        except subprocess.TimeoutExpired:
            coordinator.kill()
            return 1
    return rc


def _connect(host: str, port: int, timeout_s: float):
    deadline = time.time() + timeout_s
    while True:
        try:
            store = P.connect(host, port, timeout_s=timeout_s)
            if store.check(["job"]):
                return store
        except RuntimeError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"no coordinator answered at {host}:{port} within {timeout_s:.0f}s")
        time.sleep(0.2)
