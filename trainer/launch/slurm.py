"""`launcher=slurm`: run inside an sbatch allocation (scripts/slurm/kintsugi.sbatch).

The batch host (where the batch script runs) starts the coordinator on a free port and puts the corpus
into its store; ONE `srun` then starts `replicas x stages + faults.spares` tasks, each a Kintsugi
worker (`python -m trainer.launch.slurm worker`, one task per GPU when the allocation has GPUs). run_slurm
waits for the coordinator, stops srun and returns the coordinator's exit code.

Slurm's warning signal (`sbatch --signal=USR1@90`) reaches every task of the step: every worker is
leaving and no spare is free, so the workers write an exact checkpoint into `<run_dir>/checkpoints/`
and the coordinator exits with EX_TEMPFAIL (75, `suspended` in coordinator_state.json). The batch
script requeues the job on 75; the requeued job (SLURM_RESTART_COUNT > 0) resumes from that
checkpoint in the same run dir. SIGTERM / SIGUSR1 that reach this process (`scancel --batch` or
`--full`, `--signal=B:USR1@90`) are forwarded to the workers through srun, so they work too.

With `recovery.control=etcd` the workers find the leader through etcd, and `recovery.standbys=N`
starts N standby coordinators as a second srun step on nodes 1.. of the allocation (`standby_command`);
a coordinator that dies is replaced by a fresh standby here once another leads. The run ends with the
exit code of the coordinator that led when it shut down.

Worker ids are `slurm-<jobid>-r<restart>-<task>`: unique per task and per requeue. Extra srun
options: `KINTSUGI_SRUN_ARGS="--cpus-per-task=8 --mem-per-cpu=4G"`. The coordinator address the
workers dial is this host's name; set `KINTSUGI_COORDINATOR_HOST` when compute nodes reach the batch
host under another name (e.g. an InfiniBand hostname).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

from kintsugi.recovery import control as C
from kintsugi.recovery import protocol as P
from kintsugi.recovery.auth import new_token

from kintsugi.trainer.config.errors import ConfigError
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.launch.local import child_env
from kintsugi.recovery.runfiles import FINAL_STATE, JOB

log = logging.getLogger("kintsugi.slurm")
EX_TEMPFAIL = 75  # the coordinator's exit code when the run suspended into a checkpoint


def _int_env(name: str, default: int = 0, env: Optional[Dict[str, str]] = None) -> int:
    raw = (os.environ if env is None else env).get(name, "")
    try:
        return int(raw.split("(")[0]) if raw else default  # SLURM_NTASKS can read "4(x2)" on old versions
    except ValueError:
        return default


def tasks_needed(job: JobConfig) -> int:
    return job.parallel.replicas * job.parallel.stages + job.faults.spares


def check_allocation(job: JobConfig, env: Optional[Dict[str, str]] = None) -> None:
    """Fail with one line when this is not an sbatch/salloc allocation that can hold the job."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        raise ConfigError("launcher=slurm but SLURM_JOB_ID is not set; submit with `sbatch "
                          "scripts/slurm/kintsugi.sbatch ...` (or run inside salloc), or use launcher=local")
    if job.recovery.coordinator:
        raise ConfigError(f"recovery.coordinator={job.recovery.coordinator} is not used with launcher=slurm "
                          "(the coordinator runs on the batch host); drop it or use launcher=torchrun")
    need, have = tasks_needed(job), _int_env("SLURM_NTASKS", env=env)
    if have and have < need:
        raise ConfigError(f"the allocation has {have} tasks but parallel.replicas x parallel.stages + faults.spares "
                          f"= {need}; submit with `sbatch --ntasks={need} ...`")
    if shutil.which("srun", path=env.get("PATH")) is None:
        raise ConfigError("launcher=slurm but `srun` is not on PATH; run inside a Slurm allocation")


def allocation_has_gpus(env: Optional[Dict[str, str]] = None) -> bool:
    env = os.environ if env is None else env
    if _int_env("SLURM_GPUS_ON_NODE", env=env) > 0 or env.get("SLURM_JOB_GPUS") or env.get("SLURM_STEP_GPUS"):
        return True
    for k in ("SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK"):
        v = env.get(k, "")
        if v and any(ch.isdigit() and ch != "0" for ch in v) and ("gpu" in v or k != "SLURM_TRES_PER_TASK"):
            return True
    return False


def srun_command(job: JobConfig, coordinator: str, env: Optional[Dict[str, str]] = None) -> List[str]:
    """The one srun that starts every worker: a task per slot plus the spares."""
    env = os.environ if env is None else env
    # --no-kill: a node that fails takes its own tasks, not the step (its slots are rebuilt elsewhere)
    cmd = ["srun", f"--ntasks={tasks_needed(job)}", "--kill-on-bad-exit=0", "--no-kill", "--job-name=kintsugi-workers"]
    if allocation_has_gpus(env):
        cmd.append("--gpus-per-task=1")
    if env.get("SLURM_STEP_ID") not in (None, "", "batch", "4294967294"):
        # Already inside a job step (e.g. a submitit task started with srun): share its resources.
        cmd.append("--overlap")
    cmd += shlex.split(env.get("KINTSUGI_SRUN_ARGS", ""))
    cmd += [sys.executable, "-m", "kintsugi.trainer.launch.slurm", "worker", "--coordinator", coordinator]
    return cmd


STANDBY_TAG = "slurm-standby"  # the candidate tag of the standby step's coordinators (recovery.control=etcd)


def standby_command(job: JobConfig, run_dir: str, job_path: str, env: Optional[Dict[str, str]] = None) -> List[str]:
    """The srun step of the `recovery.standbys` standby coordinators (recovery.control=etcd): on
    nodes 1.. of the allocation, away from the batch host, sharing their CPUs with the workers
    (--overlap). A one-node allocation has no other node: they share the batch host, where they
    cover a coordinator process that dies alone (an out-of-memory kill), not the node's loss."""
    env = os.environ if env is None else env
    n = job.recovery.standbys
    nodes = _int_env("SLURM_JOB_NUM_NODES", env=env) or _int_env("SLURM_NNODES", 1, env=env)
    cmd = ["srun", "--overlap", f"--ntasks={n}", "--kill-on-bad-exit=0", "--no-kill", "--job-name=kintsugi-standby"]
    if nodes > 1:
        cmd += ["--relative=1", f"--nodes={min(n, nodes - 1)}"]
    else:
        cmd += ["--nodes=1"]
    cmd += [sys.executable, "-m", "kintsugi.trainer.launch.slurm", "standby", "--run-dir", os.path.abspath(run_dir),
            "--job", os.path.abspath(job_path)] + ([] if job.logger.progress else ["--no-progress"])
    return cmd


def _maybe_resume(job: JobConfig, run_dir: str) -> None:
    """A requeued job resumes from the checkpoint its previous run left in the same run dir."""
    restarts = _int_env("SLURM_RESTART_COUNT")
    if restarts > 0 and not job.train.resume and os.path.isdir(os.path.join(run_dir, "checkpoints")):
        log.warning("requeued run %d of job %s: resuming from %s", restarts, os.environ.get("SLURM_JOB_ID"),
                    run_dir)
        job.train.resume = run_dir


class SlurmRun:
    def __init__(self, job: JobConfig, run_dir: str, corpus: dict):
        self.job, self.run_dir, self.corpus = job, run_dir, corpus
        self.coordinator: Optional[subprocess.Popen] = None
        self.srun: Optional[subprocess.Popen] = None
        self.term_at: Optional[float] = None
        self.store = None
        self.workers_ready = False     # generation 0 published: every worker joined and holds a slot
        self.pending: List[int] = []   # signals for the workers that came before they were up
        self.forwarded: Dict[int, float] = {}
        self.term_grace_s = float(os.environ.get("KINTSUGI_SLURM_TERM_GRACE_S", "20"))
        # recovery.control=etcd: the coordinators (trainer.launch.etcd_control.Coordinators): the
        # leader-to-be here, a step of standbys on other nodes, fresh standbys here for any that die
        self.coordinators = None
        self.standby_step: Optional[subprocess.Popen] = None
        self.shutdown_epoch: Optional[int] = None

    # Signals that reach the batch host: hand them to the workers, keep the coordinator running so the
    # workers can still suspend into a checkpoint, and give up after term_grace_s (Slurm's KillWait
    # is 30 s by default).
    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.srun is None or not self.workers_ready:
            # Too early for srun to pass it on (the workers are not all up): forward it once they are.
            print(f"kintsugi: {name} on the batch host before the workers are up; forwarding it once they are",
                  file=sys.stderr, flush=True)
            self.pending.append(signum)
        elif self.srun.poll() is None and time.time() - self.forwarded.get(signum, 0.0) > 2.0:
            # (once: the same signal often arrives twice, from Slurm and forwarded by the batch shell)
            self.forwarded[signum] = time.time()
            print(f"kintsugi: {name} on the batch host; forwarding it to the workers", file=sys.stderr, flush=True)
            try:
                self.srun.send_signal(signum)
            except ProcessLookupError:
                pass
        if signum == signal.SIGTERM:
            # The same SIGTERM can arrive twice (from Slurm and forwarded by the batch shell); a
            # later one means "stop now".
            if self.term_at is not None and time.time() - self.term_at > 2.0:
                raise KeyboardInterrupt
            self.term_at = self.term_at or time.time()

    def run(self) -> int:
        job = self.job
        os.makedirs(self.run_dir, exist_ok=True)
        _maybe_resume(job, self.run_dir)
        job_path = os.path.join(self.run_dir, JOB)
        with open(job_path, "w") as f:
            json.dump(job.public_dict(), f, indent=1)  # the token travels in the environment only
        self.env = env = child_env({P.TOKEN_ENV: P.resolve_token(job.recovery.token) or new_token()})
        self.job_path = job_path
        port = P.free_port()
        host = os.environ.get("KINTSUGI_COORDINATOR_HOST") or socket.gethostname()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            if job.recovery.control == "etcd":  # workers (and the standbys) find the leader through etcd
                from kintsugi.trainer.launch.etcd_control import Coordinators, locator, worker_env
                env.update(worker_env(job))
                self.coordinators = Coordinators(lambda standby: self._start_coordinator(standby, port),
                                                 job.recovery.standbys, locator(job),
                                                 start_standbys=self._start_standby_step, owner=self._owner,
                                                 defer_s=job.recovery.etcd.lease_ttl_s + 2.0)
                self.coordinator = self.coordinators.start()
                try:
                    info = self.coordinators.wait_for_leader(job.launcher.start_timeout_s)
                except RuntimeError as e:  # it said why on stderr (a prefix taken, etcd unreachable)
                    print(f"kintsugi: {e}", file=sys.stderr, flush=True)
                    return self.coordinator.poll() or 1
                self.control = C.open_control(*P.parse_addr(info.address), env[P.TOKEN_ENV], role="launcher",
                                              timeout_s=job.launcher.start_timeout_s, locate=self.coordinators.locate)
            else:
                self.coordinator = self._start_coordinator(False, port)
                self.store = store = self._connect(port)
                self.control = C.open_control("127.0.0.1", port, env[P.TOKEN_ENV], store=store, role="launcher")
            self.control.put_json("corpus", self.corpus)
            cmd = srun_command(job, f"{host}:{port}")
            log.info("coordinator on %s:%d; starting %d workers: %s", host, port, tasks_needed(job), shlex.join(cmd))
            self.srun = subprocess.Popen(cmd, env=env)
            rc = self._wait()
            if rc == 0 and self.term_at is not None and not self._finished():
                rc = 143  # SIGTERM (time limit, scancel) stopped the coordinator before the run finished
            if rc == EX_TEMPFAIL:
                print(f"kintsugi: run suspended into {os.path.join(self.run_dir, 'checkpoints')} (exit 75); "
                      f"requeue, or rerun with train.resume={self.run_dir}", file=sys.stderr, flush=True)
            return rc
        except KeyboardInterrupt:
            print("kintsugi: interrupted; stopping the workers and the coordinator", file=sys.stderr, flush=True)
            return 130
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self._cleanup()

    def _start_coordinator(self, standby: bool, port: int) -> subprocess.Popen:
        """A coordinator on this host: the one the run starts with, or (etcd) a fresh standby on a port
        of its own. Its own session: a signal Slurm sends to the batch step's process group must not
        kill the store the workers still need (it dies with this process: KINTSUGI_PDEATHSIG). Every
        interface: the tasks on the allocation's other nodes connect to it (the seals, not the
        address, keep others out; see the README's threat model)."""
        return subprocess.Popen(
            [sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", str(P.free_port() if standby else port),
             "--host", "0.0.0.0", "--run-dir", self.run_dir, "--job", self.job_path] +
            ([] if self.job.logger.progress else ["--no-progress"]) + (["--standby"] if standby else []),
            env=self.env, start_new_session=True)

    def _start_standby_step(self, n: int) -> List[subprocess.Popen]:
        cmd = standby_command(self.job, self.run_dir, self.job_path)
        log.info("starting %d standby coordinator(s): %s", n, shlex.join(cmd))
        self.standby_step = subprocess.Popen(cmd, env=dict(self.env, KINTSUGI_CANDIDATE_TAG=self._standby_tag()),
                                             start_new_session=True)
        return [self.standby_step]

    @staticmethod
    def _standby_tag() -> str:
        return f"{STANDBY_TAG}{os.environ.get('SLURM_JOB_ID', '')}"

    def _owner(self, candidate: str) -> Optional[subprocess.Popen]:
        """The process a leader's candidate (host:pid:tag) belongs to: the standby step for a tag it
        gave, a coordinator started here for one of this host's pids, None for someone else's."""
        host, _, rest = candidate.partition(":")
        pid, _, tag = rest.partition(":")
        if tag.startswith(self._standby_tag() + "-"):
            return self.standby_step
        if host == socket.gethostname() and pid.isdigit() and self.coordinators is not None:
            return next((p for p in self.coordinators.procs if p.pid == int(pid)), None)
        return None

    def _coordinator_exit(self) -> Optional[int]:
        """The run's exit code once its coordinator ended. Under etcd a coordinator that dies is one
        of several: the run ends with the code of the one that led when it shut down."""
        if self.coordinators is None:
            return self.coordinator.poll()
        if self.shutdown_epoch is None and self._read("shutdown") is not None:
            self.shutdown_epoch = self.control.leader_epoch
        rc = self.coordinators.poll(self.shutdown_epoch)
        self.coordinator = self.coordinators.leader() or self.coordinator
        return rc

    def _read(self, key: str):
        """A value from the leader's store, or None while it is away (the connection follows the
        leader: etcd) or the value is not there."""
        try:
            if self.control.away and not self.control.reconnect():
                return None
            return self.control.get_json_or(key)
        except (RuntimeError, ValueError):  # CoordinatorAway is a RuntimeError
            return None

    def _check_workers_ready(self) -> None:
        if self._read("started") is not None:
            self.workers_ready = True
            while self.pending and self.srun.poll() is None:
                sig = self.pending.pop(0)
                print(f"kintsugi: forwarding the held {signal.Signals(sig).name} to the workers", file=sys.stderr,
                      flush=True)
                self.srun.send_signal(sig)

    def _finished(self) -> bool:
        try:
            with open(os.path.join(self.run_dir, FINAL_STATE)) as f:
                return json.load(f).get("final_val_loss") is not None
        except (OSError, ValueError):
            return False

    def _connect(self, port: int):
        return P.wait_for_store("127.0.0.1", port, self.job.launcher.start_timeout_s, process=self.coordinator)

    def _wait(self) -> int:
        """The coordinator's exit code. If every worker is gone but the coordinator is not, give it a
        grace period (it may be finishing a suspend), then stop it."""
        grace = max(30.0, 3 * self.job.recovery.heartbeat_timeout_s)
        srun_gone: Optional[float] = None
        while True:
            rc = self._coordinator_exit()
            if rc is not None:
                return rc
            now = time.time()
            if not self.workers_ready:
                self._check_workers_ready()
            if srun_gone is None and self.srun.poll() is not None:
                srun_gone, warned = now, False
            if srun_gone is not None and not warned and now - srun_gone > 5.0:  # not just the normal exit
                warned = True
                log.warning("srun exited with code %s but the coordinator still runs; waiting up to %.0fs for it",
                            self.srun.returncode, grace)
            if srun_gone is not None and now - srun_gone > grace:
                print(f"kintsugi: every worker exited (srun code {self.srun.returncode}) and the coordinator did "
                      "not finish; stopping it", file=sys.stderr, flush=True)
                return 1
            if self.term_at is not None and now - self.term_at > self.term_grace_s:
                print("kintsugi: SIGTERM and the run did not suspend in time; stopping", file=sys.stderr, flush=True)
                return 143
            time.sleep(0.1)

    def _cleanup(self) -> None:
        """srun first (the workers exit by themselves once the coordinator announces shutdown), then the
        coordinator; nothing is left behind."""
        if self.srun is not None:
            self._stop(self.srun, wait_s=15.0 if self.coordinator and self.coordinator.poll() is not None else 0.0)
        coordinators = self.coordinators.procs if self.coordinators is not None else [self.coordinator]
        if self.coordinators is not None:  # standbys that find the run ended exit by themselves
            deadline = time.monotonic() + 10.0
            while any(p.poll() is None for p in coordinators) and time.monotonic() < deadline:
                time.sleep(0.1)
        for p in coordinators:
            if p is not None and p.poll() is None:
                p.terminate()  # writes coordinator_state.json on its way out (srun passes it to its tasks)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    @staticmethod
    def _stop(proc: subprocess.Popen, wait_s: float) -> None:
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            pass
        # srun forwards SIGTERM to the tasks; a second signal soon after makes it give up on them.
        for sig, t in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                proc.send_signal(sig)
                proc.wait(timeout=t)
                return
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                return


def run_slurm(job: JobConfig, run_dir: str, corpus: dict) -> int:
    check_allocation(job)
    return SlurmRun(job, run_dir, corpus).run()


def worker_id(env: Optional[Dict[str, str]] = None) -> str:
    env = os.environ if env is None else env
    return (f"slurm-{env.get('SLURM_JOB_ID', 'nojob')}-r{_int_env('SLURM_RESTART_COUNT', env=env)}"
            f"-{env.get('SLURM_PROCID', '0')}")


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m trainer.launch.slurm worker --coordinator host:port`: one srun task = one Kintsugi worker;
    `... standby --run-dir D --job J`: one srun task = one standby coordinator (recovery.control=etcd)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m kintsugi.trainer.launch.slurm", description=main.__doc__)
    ap.add_argument("role", choices=["worker", "standby"])
    ap.add_argument("--coordinator", help="worker: host:port of the coordinator on the batch host")
    ap.add_argument("--run-dir", help="standby: the run directory (shared storage)")
    ap.add_argument("--job", help="standby: the job.json the batch host wrote")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.role == "standby":
        if not (args.run_dir and args.job):
            ap.error("standby needs --run-dir and --job")
        # This task becomes the coordinator (its pid is the one it campaigns under), listening on
        # every interface of this node on a free port; it publishes this node's name once it leads.
        os.execv(sys.executable, [sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--standby",
                                  "--port", str(P.free_port()), "--host", "0.0.0.0", "--run-dir", args.run_dir,
                                  "--job", args.job] + (["--no-progress"] if args.no_progress else []))
    if not args.coordinator:
        ap.error("worker needs --coordinator")
    _hold_early_notices()
    from kintsugi.trainer.runtime.worker import main as worker_main
    return worker_main(["--coordinator", args.coordinator, "--wid", worker_id()])


def _hold_early_notices(signals=(signal.SIGTERM, signal.SIGUSR1), wait_s: float = 180.0) -> None:
    """A notice (Slurm's USR1, a SIGTERM) that arrives while the worker is still importing torch would
    kill it, before it could leave gracefully. Hold it, and deliver it again once the worker has
    installed its own handler (or after wait_s, to the default action, for a signal the worker does
    not handle: recovery.notice_signals)."""
    import threading
    held, expired = [], []

    def hold(signum, _frame):
        if expired:  # the worker never took this signal over: its default action after all
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        else:
            held.append(signum)

    for s in signals:
        signal.signal(s, hold)

    def redeliver():
        deadline = time.time() + wait_s
        pending = set(signals)
        while pending and time.time() < deadline:
            for s in list(pending):
                if signal.getsignal(s) is not hold:  # the worker's handler is in place
                    pending.discard(s)
                    if s in held:
                        os.kill(os.getpid(), s)
            time.sleep(0.05)
        expired.append(True)
        for s in pending:
            if s in held and signal.getsignal(s) is hold:
                os.kill(os.getpid(), s)  # handled in the main thread, by `hold`

    threading.Thread(target=redeliver, name="kintsugi-early-notices", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
