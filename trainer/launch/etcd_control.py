"""`recovery.control=etcd` on the launchers' side: the run's key prefix, the check before anything
starts, what workers get in their environment, and the local launcher's coordinator processes.

- `prepare(job, run_dir)`: with launcher=local or slurm an empty `recovery.etcd.prefix` becomes one
  derived from the run directory (`/kintsugi/<name>-<hash of the run dir>/`: a new directory is a new
  run, `train.resume` of the same directory finds its own; Slurm adds the requeue count to the name);
  then the cluster must answer with a quorum and the credentials in the environment, and a new run's
  prefix must hold no state. Any failure is one line, returned before a process is started.
- `Coordinators` (launchers local and slurm): the leader-to-be and `recovery.standbys` standbys, each
  a `kintsugi coordinator` process with its own port (Slurm: the standbys are one srun step on other
  nodes). A coordinator process that dies is replaced by a fresh standby on the launcher's host
  (never restarted on its port: whoever wins the election leads, from the state in etcd); the run
  ends with the exit code of the process that led when the run shut down.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from typing import Callable, Dict, List, Optional

from kintsugi.trainer.config.job import JobConfig

log = logging.getLogger("kintsugi.launch")
MAX_REPLACEMENTS = 5
FAST_S, SLOW_S = 0.25, 1.0   # how often the launcher reads who leads (see Coordinators.hurry)


def default_prefix(name: str, run_dir: str) -> str:
    digest = hashlib.sha1(os.path.realpath(run_dir).encode()).hexdigest()[:12]
    return f"/kintsugi/{name}-{digest}/"


def prepare(job: JobConfig, run_dir: str, refuse_taken_prefix: bool = True) -> Optional[str]:
    """Fill the prefix (launcher=local) and check the cluster; one line of error, or None. torchrun's
    ranks do not refuse a prefix that holds state: a node may join a run that leads there (the
    leader-to-be coordinator refuses a taken prefix itself)."""
    from kintsugi.recovery.etcd_client import EtcdClient, EtcdError
    from kintsugi.recovery.etcd_leader import PrefixTaken, refuse_taken
    from kintsugi.trainer.config.errors import ConfigError
    etcd = job.recovery.etcd
    if not etcd.prefix:
        # Slurm: a requeued job is a new run in the same run dir (it resumes from the checkpoints),
        # so each of its starts gets a prefix of its own.
        restart = os.environ.get("SLURM_RESTART_COUNT", "0") if job.launcher.name == "slurm" else None
        etcd.prefix = default_prefix(job.name if restart is None else f"{job.name}-r{restart}", run_dir)
    try:
        settings = etcd.settings()
        etcd.prefix = settings.prefix  # normalised: /a/b/
        client = EtcdClient.from_settings(settings)
        client.check(settings.prefix)
        if refuse_taken_prefix and not job.train.resume:
            refuse_taken(client, settings)
    except (ConfigError, ValueError, EtcdError, PrefixTaken) as e:
        return f"recovery.control=etcd: {e}"
    return None


def worker_env(job: JobConfig) -> Dict[str, str]:
    """The environment a worker (or `kintsugi join`) needs to find the leader through etcd."""
    from kintsugi.recovery.etcd_locate import worker_env as env
    return env(job.recovery.etcd.settings())


def locator(job: JobConfig):
    from kintsugi.recovery.etcd_locate import Locator
    return Locator(job.recovery.etcd.settings())


def run_in_progress(job: JobConfig) -> bool:
    """A leader leads under the run's prefix, or its state is there and has not ended (between two
    leaders): a torchrun node started now joins that run instead of starting one."""
    loc = locator(job)
    return loc.current() is not None or loc.run_state() == "running"


def _pid_of(candidate: str) -> Optional[int]:
    parts = candidate.split(":")  # recovery.etcd_election's default candidate: host:pid:tag
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


class Coordinators:
    """A launcher's coordinator processes under etcd. `start(standby)` starts one on this machine;
    `start_standbys(n)` the first n standbys (default: n x `start(True)`; Slurm: one srun step whose
    tasks run on other nodes). `owner(candidate)` is the process among `procs` that a leader's
    candidate name belongs to (default: the one with its pid), None for a coordinator not ours.
    `defer_s` > 0: a lost coordinator's replacement waits while other standbys run, until one of them
    leads or `defer_s` passes, so that a fresh process never races the standbys that campaigned all
    along (Slurm: the failover goes to the standby step on another node, as meant)."""

    def __init__(self, start: Callable[[bool], subprocess.Popen], standbys: int, locate,
                 start_standbys: Optional[Callable[[int], List[subprocess.Popen]]] = None,
                 owner: Optional[Callable[[str], Optional[subprocess.Popen]]] = None, defer_s: float = 0.0):
        self._start, self.standbys, self.locate = start, standbys, locate
        self.defer_s = defer_s
        self.deferred: List[tuple] = []  # (start by, newest epoch seen when it was lost) per replacement
        self.newest_epoch = 0
        self.steps: set = set()  # pids of the processes a given start_standbys returned (srun steps)
        if start_standbys is None:
            self._start_standbys = lambda n: [start(True) for _ in range(n)]
        else:
            self._start_standbys = lambda n: self._note_steps(start_standbys(n))
        self._owner = owner or (lambda candidate: self._proc(_pid_of(candidate)))
        self.procs: List[subprocess.Popen] = []
        self.done: set = set()
        self.led: Dict[int, int] = {}   # epoch -> pid of the process that led it
        self.replacements = 0
        self._seen_at, self._fast_until = float("-inf"), time.monotonic() + 30.0  # fast while it starts

    def start(self) -> subprocess.Popen:
        """The leader-to-be; the standbys follow once it leads (`wait_for_leader`): a standby that
        won first would make the leader-to-be find the run's prefix taken."""
        self.procs = [self._start(False)]
        return self.procs[0]

    def _note_steps(self, procs: List[subprocess.Popen]) -> List[subprocess.Popen]:
        self.steps.update(p.pid for p in procs)
        return procs

    def _killed(self, p: subprocess.Popen, rc: int) -> bool:
        """Killed by a signal, not an exit code the coordinator chose (srun reports a task's signal
        as 128 + signal)."""
        return rc < 0 or (p.pid in self.steps and rc > 128)

    def _proc(self, pid: Optional[int]) -> Optional[subprocess.Popen]:
        return next((p for p in self.procs if p.pid == pid), None) if pid is not None else None

    def hurry(self, for_s: float = 30.0) -> None:
        """Look for a new leader every FAST_S for a while (a coordinator process exited, or the
        launcher injected a fault into one); otherwise every SLOW_S, which costs the training
        machine less (each look is an etcd read)."""
        self._fast_until = time.monotonic() + for_s

    def observe(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._seen_at < (FAST_S if now < self._fast_until else SLOW_S):
            return
        self._seen_at = now
        info = self.locate.current()
        if info is not None and info.address:
            self.newest_epoch = max(self.newest_epoch, info.epoch)
        if info is not None and info.epoch not in self.led:
            proc = self._owner(info.candidate)
            if proc is not None:
                self.led[info.epoch] = proc.pid
                log.info("coordinator pid %s leads (epoch %d) at %s", _pid_of(info.candidate), info.epoch,
                         info.address)

    def leader(self) -> Optional[subprocess.Popen]:
        """The process that leads the newest epoch seen (the target of `target: coordinator` faults)."""
        self.observe()
        return self._proc(self.led[max(self.led)]) if self.led else None

    def wait_for_leader(self, timeout_s: float, poll_s: float = 0.1):
        """The first leader's LeaderInfo; RuntimeError when every coordinator process exited first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.locate.current()
            if info is not None:
                self.observe(force=True)
                self.procs += self._start_standbys(self.standbys) if self.standbys else []
                return info
            if all(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"the coordinator exited with code {self.procs[0].returncode} before it led; "
                                   "see its log above")
            time.sleep(poll_s)
        raise RuntimeError(f"no coordinator led the run within {timeout_s:.0f}s (launcher.start_timeout_s)")

    def poll(self, shutdown_epoch: Optional[int] = None) -> Optional[int]:
        """The run's exit code once it ended, else None. After the shutdown (`shutdown_epoch`: the
        epoch that announced it) that is the code of the process that led it; before, a leader's own
        exit (>= 0) also ends the run. Any other exit is replaced by a fresh standby."""
        exited = any(p.poll() is not None and p.pid not in self.done for p in self.procs)
        if exited:
            self.hurry()
        self.observe(force=exited)
        for p in self.procs:
            rc = p.poll()
            if rc is None or p.pid in self.done:
                continue
            self.done.add(p.pid)
            led = p.pid in self.led.values()
            if shutdown_epoch is not None and self.led.get(shutdown_epoch) == p.pid:
                return rc
            if shutdown_epoch is None and led and not self._killed(p, rc):
                return rc
            if shutdown_epoch is not None:
                continue  # a standby that found the run ended; the leader's code decides
            if self.replacements >= MAX_REPLACEMENTS:
                log.error("coordinator pid %d exited (%s); not replaced: %d replacements already", p.pid, rc,
                          self.replacements)
                continue
            self.replacements += 1
            defer = self.defer_s > 0 and any(q.poll() is None for q in self.procs)
            log.warning("coordinator pid %d %s (code %s); %s (%d of %d)", p.pid, "led and died" if led else "exited",
                        rc, "a fresh standby follows once another leads" if defer else "starting a fresh standby",
                        self.replacements, MAX_REPLACEMENTS)
            if defer:
                self.deferred.append((time.monotonic() + self.defer_s, self.newest_epoch))
            else:
                self.procs.append(self._start(True))
        for due in [d for d in self.deferred if shutdown_epoch is None and (
                self.newest_epoch > d[1] or time.monotonic() > d[0] or all(q.poll() is not None for q in self.procs))]:
            self.deferred.remove(due)
            self.procs.append(self._start(True))
        if all(p.poll() is not None for p in self.procs):
            return self.procs[-1].returncode if shutdown_epoch is None else 1
        return None
