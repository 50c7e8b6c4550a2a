"""`launcher=torchrun`: every process torchrun starts is a Kintsugi worker.

One node: global rank 0 starts the coordinator beside itself on MASTER_PORT+1; ranks beyond
replicas x stages wait as spares.

Several nodes: run the coordinator on a stable host (`kintsugi coordinator --port P
--run-dir D -- <overrides>`) and give every node `recovery.coordinator=host:P`. Then a torchrun group
of any size is a set of workers for that coordinator: its ranks fill slots or wait as spares, and the
coordinator waits until it has replicas x stages of them. torchrun itself cannot replace one worker
(its agent restarts all local workers, and a node arriving at a c10d rendezvous restarts everyone), so
after start-up membership goes through the coordinator only:

- start the nodes with a static rendezvous (`--nnodes=N --node-rank=i --master-addr --master-port`,
  `--max-restarts=0`) or as N independent `torchrun --standalone` groups. A static agent only watches
  its own workers, so a dead node leaves the other nodes' workers alone. (A c10d rendezvous is worse:
  every agent polls the rendezvous store, and the node hosting it takes all agents down with it.)
- a node that joins later is a separate group: `torchrun --standalone ... recovery.coordinator=host:P`
  (all its ranks become spares) or `kintsugi join --coordinator host:P --workers K`.

With `recovery.control=etcd` (and `recovery.etcd.prefix`, the same on every node) the coordinator's
node is no single point of failure: global rank 0 starts the leader-to-be beside itself, local rank 0
of nodes 1..`recovery.standbys` each start a standby coordinator (`--standby`) once a leader leads,
and every worker finds the leader through etcd, so when node 0 dies whole a standby leads within the
lease TTL, the workers move to it and the lost slots are rebuilt from spares. A node started while the
run is in progress (a later `torchrun --standalone` group) joins that run: its rank 0 starts a
standby, its ranks wait as spares. Give every node the same run directory on a shared filesystem
(`hydra.run.dir=...`): whichever coordinator leads at the end writes the run's records and outputs
there. A standby listens on KINTSUGI_COORDINATOR_HOST, else on the address this node reaches
MASTER_ADDR from. Every node needs KINTSUGI_TOKEN (the same value). A standby is a child of its
worker process and dies with it; with `--max-restarts=0` any worker's failure makes the node's agent
stop all of that node's workers anyway, so a standby lives and dies with its node.

Worker ids are unique across nodes, re-joins and several "nodes" on one host (host, torchrun job,
node rank, local rank, pid). Set KINTSUGI_MACHINE per node when several nodes share one host, so
placement treats them as different machines.
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta

from kintsugi.recovery import control as C
from kintsugi.recovery import protocol as P

from kintsugi.trainer.config.errors import ConfigError
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.launch.local import child_env
from kintsugi.recovery.records import write_strict_atomic
from kintsugi.recovery.runfiles import JOB

log = logging.getLogger("kintsugi.torchrun")


def run_torchrun(job: JobConfig, run_dir: str, corpus: dict) -> int:
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as e:
        raise ConfigError(f"launcher=torchrun but {e.args[0]} is not set; start with `torchrun ... -m trainer "
                          "launcher=torchrun` or use launcher=local") from None
    external = bool(job.recovery.coordinator)
    etcd = job.recovery.control == "etcd"
    joining = False
    if etcd:  # every worker finds the leader through etcd; a node started while the run goes on joins it
        from kintsugi.trainer.launch.etcd_control import locator, run_in_progress, worker_env
        os.environ.update(worker_env(job))
        joining = run_in_progress(job)
    need = job.parallel.replicas * job.parallel.stages
    if not external and not joining and world < need:
        raise ConfigError(f"torchrun started {world} processes but parallel.replicas x parallel.stages = {need}; "
                          f"start at least {need} (extra ones wait as spares), or run a coordinator on a stable host "
                          "and pass recovery.coordinator=host:port so several torchrun groups add up to the job")
    coordinator = cmd = None
    if external:
        try:
            host, port = P.parse_addr(job.recovery.coordinator)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]) + 1
        except KeyError as e:
            raise ConfigError(f"launcher=torchrun but {e.args[0]} is not set; start with `torchrun ... -m trainer "
                              "launcher=torchrun` or use launcher=local") from None
        if rank == 0 or (etcd and _hosts_standby(job)):
            cmd = _coordinator_cmd(job, run_dir, host, port, standby=joining or rank != 0)
    token = P.resolve_token(job.recovery.token)
    if token is None:
        if external:
            raise ConfigError(f"recovery.coordinator={job.recovery.coordinator} needs the run's token: set "
                              f"{P.TOKEN_ENV} on every node (the coordinator shows it once when it starts)")
        if etcd and (joining or world > int(os.environ.get("LOCAL_WORLD_SIZE", world))):
            raise ConfigError(f"recovery.control=etcd across torchrun nodes needs the run's token on every node: set "
                              f"{P.TOKEN_ENV} to the same value everywhere (the coordinators on other nodes check it)")
        token = _local_token(rank)  # one node: its ranks share a fresh token through a 0600 file
    if cmd is not None and "--standby" in cmd:
        locator(job).wait(job.launcher.start_timeout_s)  # a standby that won first would find the prefix taken
    if cmd is not None:
        coordinator = subprocess.Popen(cmd, env=child_env({P.TOKEN_ENV: token}))
        if etcd and "--standby" not in cmd:  # its one-line refusal (a taken prefix) ends this rank too
            rc = _wait_to_lead(job, coordinator)
            if rc is not None:
                return rc
    if etcd:  # the address is the leader's, from etcd (open_control reads it)
        control = C.open_control(host, port, token, timeout_s=job.launcher.start_timeout_s)
        bg = C.open_control(host, port, token, timeout_s=60)
    else:
        control = C.open_control(host, port, token, store=_connect(host, port, job.launcher.start_timeout_s))
        bg = C.open_control(host, port, token, store=_connect(host, port, 60))
    if external:
        _shared_corpus(control, corpus)
    elif rank == 0 and not joining:
        control.put_json("corpus", corpus)
    from kintsugi.trainer.runtime.worker import Worker
    logging.getLogger("kintsugi.worker").setLevel(os.environ.get("KINTSUGI_LOG", "WARNING"))
    os.environ.setdefault("KINTSUGI_MACHINE", socket.gethostname())
    wid = worker_id()
    worker = Worker(control, wid, token, bg=bg)
    rc = worker.run()
    if coordinator is not None:
        try:
            crc = coordinator.wait(timeout=60)
        except subprocess.TimeoutExpired:
            coordinator.kill()
            crc = 1
        # Under etcd a coordinator killed by a signal was replaced by a standby elsewhere; an exit
        # code it chose (a run that stopped) still counts.
        rc = (rc or (crc if crc > 0 else 0)) if etcd else (crc or rc)
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and worker is not None and worker.watcher.rebuilt_slots > 0:
        release_exit_barrier()
    if rank == 0 and not external and not etcd:
        return rc  # global rank 0 beside its own coordinator writes the run's outputs (trainer.cli.entry)
    # Every other worker process ends here, as `python -m trainer.runtime.worker` does: waits abandoned in
    # helper threads (a dead peer's recv) must not hold up or crash the exit, which torchrun's agent
    # would count as a failed worker. With an external coordinator, or under etcd, the coordinator
    # writes the outputs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _wait_to_lead(job: JobConfig, coordinator: subprocess.Popen):
    """None once a leader published its address; the coordinator's exit code if it exited first."""
    from kintsugi.trainer.launch.etcd_control import locator
    loc, deadline = locator(job), time.monotonic() + job.launcher.start_timeout_s
    while loc.current() is None and time.monotonic() < deadline:
        if coordinator.poll() is not None:
            return coordinator.returncode or 1
        time.sleep(0.1)
    return None


def _hosts_standby(job: JobConfig) -> bool:
    """recovery.standbys under etcd: local rank 0 of nodes 1..standbys runs a standby coordinator."""
    env = os.environ
    return env.get("LOCAL_RANK", "0") == "0" and 1 <= int(env.get("GROUP_RANK", "0")) <= job.recovery.standbys


def _coordinator_cmd(job: JobConfig, run_dir: str, host: str, port: int, standby: bool) -> list:
    """`kintsugi coordinator` beside this rank: the leader-to-be (global rank 0), or a standby that
    listens on this node's own address once it leads (under etcd it writes the outputs itself)."""
    os.makedirs(run_dir, exist_ok=True)
    job_path = os.path.join(run_dir, JOB)
    if standby:  # several nodes may share the run dir: each writes its copy whole, under its own name
        job_path = os.path.join(run_dir, f"job.standby-{socket.gethostname()}-{os.getpid()}.json")
        host = os.environ.get("KINTSUGI_COORDINATOR_HOST") or _address_towards(host)
    write_strict_atomic(job_path, job.public_dict(), indent=1)
    return [sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", str(port), "--host", host,
            "--run-dir", run_dir, "--job", job_path] + ([] if job.logger.progress else ["--no-progress"]) + \
        (["--outputs"] if job.recovery.control == "etcd" else []) + (["--standby"] if standby else [])


def _address_towards(host: str) -> str:
    """The address of this node's interface that routes to `host` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def _local_token(rank: int) -> str:
    """One node, no token given: rank 0 makes one and the other local ranks read it from a private
    per-run directory (trainer.launch.node_token); the token never goes through the store."""
    from kintsugi.recovery.auth import new_token
    from kintsugi.trainer.launch.node_token import read_node_token, write_node_token
    if rank == 0:
        token = new_token()
        write_node_token(token)
        return token
    return read_node_token()


def _shared_corpus(control: C.Control, corpus: dict) -> None:
    """A coordinator started from overrides serves its corpus entry (put right after `job`); one
    started with --job takes the first node's. Either way the token files must exist on this node:
    if they do not, they are prepared here from the job's own data settings (same cache key)."""
    deadline = time.time() + 2.0
    while control.get_json_or("corpus") is None and time.time() < deadline:
        time.sleep(0.05)
    if control.get_json_or("corpus") is None:
        control.put_json("corpus", corpus)
    shared = control.get_json("corpus")
    if all(os.path.exists(shared[k]) for k in ("train_path", "val_path")):
        return
    from kintsugi.trainer.data.corpus import prepare_corpus
    data = JobConfig.from_dict(control.get_json("job")).data
    info = prepare_corpus(data)
    if info.train_path != shared["train_path"]:
        raise ConfigError(f"the job's corpus {shared['train_path']} is not on this node and preparing it here gave "
                          f"{info.train_path}; use the same data.cache_dir on every node (or a shared one)")


def worker_id(env=None) -> str:
    """`<host>-<torchrun job>-n<node rank>r<local rank>-<pid>-<random>`: unique for two nodes on one host,
    for a node that re-joins with the same ranks, and for separate torchrun jobs on one coordinator."""
    env = os.environ if env is None else env
    job_key = f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}/{env.get('TORCHELASTIC_RUN_ID', '')}"
    tag = hashlib.sha1(job_key.encode()).hexdigest()[:6]
    node, local = env.get("GROUP_RANK", "0"), env.get("LOCAL_RANK", env.get("RANK", "0"))
    return f"{socket.gethostname()}-{tag}-n{node}r{local}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def release_exit_barrier() -> bool:
    """Let the surviving torchrun agents of a multi-node static rendezvous exit now.

    When its workers succeed, a torchrun agent waits in an exit barrier for every agent of the
    rendezvous, up to 300 s (not configurable from the torchrun command line). An agent whose node
    died, or whose worker died (with --max-restarts=0 it stops and never reaches the barrier), never
    arrives. A generation after the first means this run lost or replaced a worker, so the run being
    over, release the barrier instead of waiting out the 300 s. Only the static rendezvous shares its
    store with the workers (TORCHELASTIC_USE_AGENT_STORE); a c10d one is left alone. Best effort: an
    agent that reaches the barrier after the store's host agent has already exited logs an error
    and still exits 0."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() not in ("true", "1"):
        return False
    try:
        import torch.distributed as dist
        from torch.distributed.elastic.agent.server.api import _TERMINAL_STATE_SYNC_ID
        from torch.distributed.elastic.utils.store import _LAST_MEMBER_CHECKIN
        agent_store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                    timeout=timedelta(seconds=2), wait_for_workers=False)
        store = dist.PrefixStore(env.get("TORCHELASTIC_RUN_ID", "none"), agent_store)
        store.set(_TERMINAL_STATE_SYNC_ID + _LAST_MEMBER_CHECKIN, "<released by kintsugi>")
        return True
    except Exception as e:  # noqa: BLE001 - the agent then simply waits out its exit barrier
        log.warning("could not release torchrun's exit barrier (%s); the agent may wait up to 300 s", e)
        return False


def _connect(host: str, port: int, timeout_s: float):
    return P.wait_for_store(host, port, timeout_s, poll_s=0.2)
