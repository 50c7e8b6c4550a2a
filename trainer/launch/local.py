"""The local launcher: starts the coordinator and the worker processes on this machine, injects
the configured faults into the real processes, starts replacements, and leaves nothing behind.

Two kinds of fault. A slot event (`{step, replica, stage, kind}`) signals the one worker holding that
slot; with `faults.respawn` a fresh spare is started for every slot a generation rebuilds. A machine
event (`{step, machine, kind}`, needs `launcher.machines`) signals every worker labelled with that
machine, spares included: the machine is gone, and `faults.rejoin_delay_s` later a replacement
machine with as many workers joins under a new id (m{K}, m{K+1}, ...). The replacement machine is
the only replacement for a machine loss: respawn-per-rebuild skips as many rebuilt slots as the
machine had active workers, so no worker is started twice. `term` is a preemption with notice: the
active workers hand their state off; whatever still runs `faults.notice_s` later is SIGKILLed (the
cloud reclaims the machine). Machine lifetimes go to `machines.json` in the run directory.

With `recovery.control=etcd` (trainer.launch.etcd_control) it starts the coordinator and
`recovery.standbys` standbys; a coordinator that dies is not restarted on its port: a standby takes
over through the election, and a fresh standby replaces the dead process. Workers find the leader
through etcd (their environment names the cluster and the run's prefix).

Children get PR_SET_PDEATHSIG (via KINTSUGI_PDEATHSIG=1), so even a SIGKILLed launcher leaves no
orphan; a normal exit, Ctrl-C or an error kills whatever is still running.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from kintsugi.recovery import control as C
from kintsugi.recovery import protocol as P
from kintsugi.recovery.auth import new_token
from kintsugi.parallel.device import lowest_free_index  # device binding

from kintsugi.trainer.config.faults import fault_events, held_at_boundary
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.config.environment import worker_env  # device binding
from kintsugi.recovery.runfiles import ALIVE, CONTROL_STATE, FAULTS, JOB, MACHINES
from kintsugi.recovery.records import write_strict_atomic

log = logging.getLogger("kintsugi.launch")
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}
MAX_COORDINATOR_RESTARTS = 5
HUNG_S = 20.0  # a coordinator whose liveness file is older than this is replaced


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KINTSUGI_PDEATHSIG": "1",
                "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"})
    env.update(extra or {})
    return env


class LocalLauncher:
    def __init__(self, job: JobConfig, run_dir: str, corpus: dict, progress: bool = True):
        from kintsugi.trainer.config.errors import ConfigError
        if job.faults.machine_schedule and job.launcher.machines < 1:
            raise ConfigError("faults.schedule names a machine but launcher.machines=0; set launcher.machines=K "
                              "(workers are labelled m0..m{K-1}) or use replica+stage events")
        self.job, self.run_dir, self.corpus, self.progress = job, run_dir, corpus, progress
        self.procs: Dict[str, subprocess.Popen] = {}
        self.machine_of: Dict[str, str] = {}       # wid -> machine label (launcher.machines > 0)
        self.machines: Dict[str, dict] = {}        # machine -> {start (wall), t0/t1 (monotonic), cause}
        self.machine_events = sorted((dict(e) for e in job.faults.machine_schedule), key=lambda e: e["step"])
        self.joins: List[Tuple[float, int]] = []   # (when, how many workers) of replacement machines to start
        self.reclaim: List[Tuple[float, str]] = []  # (when, machine): SIGKILL what a `term` left running
        self.prepaid = 0                           # rebuilt slots a replacement machine already covers
        self.coordinator: Optional[subprocess.Popen] = None
        self.control: Optional[C.Control] = None
        self.restarts = 0               # coordinator restarts after it was killed
        self._coordinator_cpu: Optional[Tuple[float, int]] = None  # (when, CPU ticks) once its file went stale
        self._slow_logged = False
        self.exited: set = set()        # workers whose exit was reported
        self.rebuilt_seen = 0
        self._lacking_since: Optional[float] = None
        self.n_workers = 0
        self.events = fault_events(job) + [dict(e) for e in job.faults.coordinator_schedule]
        self.injected: List[dict] = []
        self.fired: Dict[int, dict] = {}  # held events signalled: id -> {kind, wid}
        # A run always has a token: the one given, or a fresh one that only this launcher's children see.
        self.token = P.resolve_token(job.recovery.token) or new_token()
        # device binding: Triton's interpreter for compression.kernels=triton on CPU stages
        self.env = child_env({P.TOKEN_ENV: self.token, **worker_env(job)})
        self.gpu_index: Dict[str, int] = {}  # device binding: wid -> KINTSUGI_WORKER_INDEX
        # --- recovery.control=etcd: the coordinators and how workers find the leader ---
        self.etcd = None  # trainer.launch.etcd_control.Coordinators
        self._shutdown_seen = False
        for var in ("KINTSUGI_ETCD_ENDPOINTS", "KINTSUGI_ETCD_PREFIX"):
            self.env.pop(var, None)  # a shell's leftovers must not send a local run's workers to etcd
        if job.recovery.control == "etcd":
            from kintsugi.trainer.launch.etcd_control import worker_env as etcd_worker_env
            self.env.update(etcd_worker_env(job))

    def start_worker(self, machine: Optional[str] = None) -> str:
        wid = f"w{self.n_workers}"
        env = self.env
        K = self.job.launcher.machines
        if K > 0:  # simulated fleet: label workers with a machine id
            if machine is None:  # a respawned spare joins the live machine with the fewest workers
                live = [m for m, v in self.machines.items() if v["cause"] is None]
                machine = min(live, key=lambda m: len(self._workers_on(m))) if live else f"m{len(self.machines)}"
            self.machines.setdefault(machine, {"start": time.time(), "t0": time.monotonic(), "t1": None,
                                               "cause": None})
            self.machine_of[wid] = machine
            env = dict(env, KINTSUGI_MACHINE=machine)
            slow = self.job.launcher.slowdowns().get(machine)
            if slow:
                env["KINTSUGI_SLOWDOWN"] = str(slow)
        # device binding: the lowest index no live worker holds (GPU = index % visible GPUs)
        self.gpu_index[wid] = lowest_free_index(i for w, i in self.gpu_index.items() if self.procs[w].poll() is None)
        env = dict(env, KINTSUGI_WORKER_INDEX=str(self.gpu_index[wid]))
        self.n_workers += 1
        self.procs[wid] = subprocess.Popen(
            [sys.executable, "-m", "kintsugi.trainer.runtime.worker", "--coordinator", f"127.0.0.1:{self.port}", "--wid", wid],
            env=env)
        return wid

    def run(self) -> int:
        os.makedirs(self.run_dir, exist_ok=True)
        self.job_path = os.path.join(self.run_dir, JOB)
        self._write_job()
        self.port = P.free_port()
        # The coordinator reads the token from the same environment variable the workers present.
        if self.job.recovery.control == "etcd":
            from kintsugi.trainer.launch.etcd_control import Coordinators, locator
            self.etcd = Coordinators(lambda standby: self._start_coordinator(resume=False, standby=standby),
                                     self.job.recovery.standbys, locator(self.job))
            self.coordinator = self.etcd.start()
        else:
            self.coordinator = self._start_coordinator(resume=False)
        try:
            if self.etcd is not None:
                info = self.etcd.wait_for_leader(self.job.launcher.start_timeout_s)
                self.control = C.open_control(*P.parse_addr(info.address), self.token, role="launcher",
                                              timeout_s=self.job.launcher.start_timeout_s, locate=self.etcd.locate)
            else:
                try:
                    store = self._connect_fresh()
                except RuntimeError:
                    if self.coordinator.poll() is None:
                        raise
                    return self.coordinator.returncode  # it said why on stderr (a resume it cannot do)
                self.control = C.open_control("127.0.0.1", self.port, self.token, store=store, role="launcher")
            self.control.put_json("corpus", self.corpus)
            self.control.on_new_boot.append(self._on_coordinator_restart)
            # A preemption warning to the launcher (Slurm's `--signal=B:USR1@90`, a SIGTERM from a
            # scheduler) reaches every worker: with nobody left to hand off to, the job suspends
            # (each slot checkpoints its exact state; exit 75) and `train.resume` continues it.
            names = self.job.recovery.notice_signals
            self._notice_signal = getattr(signal, names[0]) if names else signal.SIGKILL
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, self._forward_notice)
            K = self.job.launcher.machines
            for i in range(self.job.parallel.replicas * self.job.parallel.stages + self.job.faults.spares):
                self.start_worker(machine=f"m{i % K}" if K > 0 else None)
            return self._supervise()
        except KeyboardInterrupt:
            print("kintsugi: interrupted; stopping all processes", file=sys.stderr)
            return 130
        finally:
            self.cleanup()

    def _write_job(self) -> None:
        write_strict_atomic(self.job_path, self.job.public_dict(), indent=1)

    def _start_coordinator(self, resume: bool, standby: bool = False) -> subprocess.Popen:
        if resume:  # whatever killed the coordinator may have damaged job.json too: this copy is whole
            self._write_job()
        port = P.free_port() if standby else self.port  # etcd: a standby serves its own store once it leads
        cmd = [sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", str(port), "--host", "127.0.0.1",
               "--run-dir", self.run_dir, "--job", self.job_path] + ([] if self.progress else ["--no-progress"])
        return subprocess.Popen(cmd + (["--resume"] if resume else []) + (["--standby"] if standby else []),
                                env=self.env)

    def _connect_fresh(self):
        return P.wait_for_store("127.0.0.1", self.port, self.job.launcher.start_timeout_s, process=self.coordinator,
                                poll_s=0.05)

    def _forward_notice(self, signum, _frame) -> None:
        log.warning("received %s: asking every worker to leave gracefully", signal.Signals(signum).name)
        self.job.faults.respawn = False  # no fresh spares: they would take the handoffs, not the suspend
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.kill(p.pid, self._notice_signal)
                except ProcessLookupError:
                    pass

    def _coordinator_exit(self) -> Optional[int]:
        """The coordinator's exit code once it ended for good; a coordinator killed by a signal (not a
        SIGTERM it handled), or hung (its liveness file unchanged for `HUNG_S`), is started again on
        the same port from the state it persisted. (etcd: see trainer.launch.etcd_control.)"""
        if self.etcd is not None:
            rc = self.etcd.poll(self.control.leader_epoch if self._shutdown_seen and self.control else None)
            self.coordinator = self.etcd.leader() or self.coordinator
            return rc
        rc = self.coordinator.poll()
        if rc is None:
            alive = os.path.join(self.run_dir, ALIVE)
            try:
                age = time.time() - os.path.getmtime(alive)
            except OSError:
                age = 0.0
            if age <= max(HUNG_S, 3 * self.job.recovery.heartbeat_timeout_s):
                self._coordinator_cpu = None
                return None
            if self._coordinator_stuck():
                log.warning("the coordinator has not moved for %.0fs (hung or stopped); killing it", age)
                self.coordinator.kill()
                self.coordinator.wait()
                os.utime(alive) if os.path.exists(alive) else None
                rc = self.coordinator.poll()
            else:
                return None
        if rc >= 0 or self.restarts >= MAX_COORDINATOR_RESTARTS or \
                not os.path.exists(os.path.join(self.run_dir, CONTROL_STATE)):
            return rc
        self.restarts += 1
        log.warning("the coordinator died (%s); restarting it on port %d (restart %d of %d)",
                    signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else rc, self.port,
                    self.restarts, MAX_COORDINATOR_RESTARTS)
        self.coordinator = self._start_coordinator(resume=True)
        return None

    def _coordinator_stuck(self) -> bool:
        """Slow is not dead: a coordinator whose liveness file is old is replaced only if it is
        stopped (SIGSTOP) or used no CPU since the last look (deadlocked); one that runs, only
        slowly on a loaded machine, is left alone."""
        try:
            with open(f"/proc/{self.coordinator.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return True  # no /proc: judge by the liveness file alone, as before
        state, cpu = fields[0], int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        if state == "T":
            return True
        now = time.monotonic()
        if self._coordinator_cpu is None:  # the file just went stale: watch its CPU for a few seconds
            self._coordinator_cpu = (now, cpu)
            return False
        since, ref = self._coordinator_cpu
        if now - since < 5.0:
            return False
        if cpu == ref:
            return True
        if not self._slow_logged:
            self._slow_logged = True
            log.warning("the coordinator is slow (its liveness file is old, but it runs); not replacing it")
        return False

    def _supervise(self) -> int:
        while True:
            rc = self._coordinator_exit()
            if rc is not None:
                return rc
            if self.control.away and not self.control.reconnect():
                time.sleep(0.05)
                continue
            try:
                if self.control.get_json_or("shutdown") is not None:
                    return self._await_coordinator()
                self._report_exits()
                self._inject_due()
                self._replace_spares()
            except C.CoordinatorAway:
                time.sleep(0.05)
                continue
            time.sleep(0.001 if self._armed() else 0.02)

    def _await_coordinator(self) -> int:
        self._shutdown_seen = True
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rc = self._coordinator_exit()
            if rc is not None:
                return rc
            time.sleep(0.05)
        return 1

    def _on_coordinator_restart(self) -> None:
        """A restarted coordinator may have missed exits reported to its predecessor, and its store
        does not know which fault events fired (a rebuilt slot's holder must not wait for one)."""
        for wid in sorted(self.exited):
            self.control.append("died", {"wid": wid, "rc": self.procs[wid].returncode})
        for i, rec in self.fired.items():
            self.control.put_json(f"fired/{i}", rec)

    def _report_exits(self) -> None:
        """A worker process that exited is reported at once (its heartbeat would take seconds)."""
        for wid, p in self.procs.items():
            if wid not in self.exited and p.poll() is not None:
                self.exited.add(wid)
                self.control.append("died", {"wid": wid, "rc": p.returncode})

    def _replace_spares(self) -> None:
        """With faults.respawn, a new spare for every spare a rebuild consumed (a replacement machine
        already covers its own slots), and whatever the waiting slots still lack."""
        counters = self.control.get_json_or("counters") or {}
        rebuilt = int(counters.get("rebuilt_slots", self.rebuilt_seen))
        if rebuilt < self.rebuilt_seen:  # a restarted coordinator counts from what it persisted
            self.rebuilt_seen = rebuilt
        fresh = rebuilt - self.rebuilt_seen
        self.rebuilt_seen = rebuilt
        if not self.job.faults.respawn:
            return
        covered = min(self.prepaid, fresh)
        self.prepaid -= covered
        for _ in range(fresh - covered):
            self.start_worker()
        # Sealed by the coordinator (a forged count must not start processes), and bounded anyway.
        needed = min(int(counters.get("spares_needed", 0)), self.job.parallel.replicas * self.job.parallel.stages)
        joining = [w for w, p in self.procs.items() if p.poll() is None and not self.control.check(f"ack/{w}")]
        lacking = max(0, needed - len(joining) - sum(n for _, n in self.joins))
        # Act on a shortfall that lasts (0.25 s): a worker that just joined is free to the
        # coordinator a loop later than its acknowledgement is visible here.
        now = time.monotonic()
        if lacking == 0:
            self._lacking_since = None
        elif self._lacking_since is None:
            self._lacking_since = now
        elif now - self._lacking_since > 0.25:
            self._lacking_since = None
            for _ in range(lacking):
                self.start_worker()

    def _slots(self) -> Dict[str, str]:
        return self.control.get_json_or("slots", {}) or {}

    def _inject_due(self) -> None:
        self._machine_due()
        if not self.events:
            return
        committed = {}

        def reached(e) -> bool:
            whole = e.get("target") in ("coordinator", "spare", "stopped")  # the fleet's step: the leader's
            rs = range(self.job.parallel.replicas) if whole else [e["replica"]]
            for r in rs:
                if r not in committed:
                    rec = self.control.get_json_or(f"committed/{r}")
                    committed[r] = rec["step"] if rec else -1
            return max(committed[r] for r in rs) + 1 >= e["step"]

        now = time.monotonic()
        slots = None
        for e in list(self.events):
            if held_at_boundary(e):
                # The holder of the slot waits at the start of step e["step"] (trainer.runtime.step_loop's
                # FaultHook) and says so in hold/<wid>: signal it there, then mark the event fired.
                if not reached(dict(e, step=e["step"] - 1)):
                    continue
                e["near"] = True  # poll fast: its holder is about to wait for the signal
                slots = self._slots() if slots is None else slots
                wid = slots.get(f"{e['replica']},{e['stage']}")
                proc = self.procs.get(wid)
                if proc is None or proc.poll() is not None:
                    continue
                hold = self.control.get_json_or(f"hold/{wid}")
                if not isinstance(hold, dict) or hold.get("event") != e["id"]:
                    continue
                self.events.remove(e)
                self._fire(e, wid, proc)
                continue
            if "armed" not in e and "due_at" not in e and not reached(e):
                continue
            if e.get("on") == "rebuild" and "due_at" not in e:
                count = int((self.control.get_json_or("counters") or {}).get("rebuild_plans", 0))
                if "armed" not in e:
                    e["armed"] = count  # fire at the next generation that rebuilds something
                    continue
                if count <= e["armed"]:
                    continue
            if "due_at" not in e:
                e["due_at"] = now + float(e.get("delay_s", 0.0))
            if now < e["due_at"]:
                continue
            self.events.remove(e)
            if e.get("target") == "coordinator":
                log.warning("injecting %s into the coordinator (pid %d) at step %d", e["kind"], self.coordinator.pid,
                            e["step"])
                os.kill(self.coordinator.pid, SIGNALS[e["kind"]])
                if self.etcd is not None:
                    self.etcd.hurry()
                self.injected.append(dict(e, wid="coordinator", t=time.time()))
                continue
            if e.get("target") == "stopped":  # kind cont: every worker stopped earlier wakes up
                woken = []
                for x in self.injected:
                    p = self.procs.get(x["wid"])
                    if x["kind"] == "stop" and p is not None and p.poll() is None:
                        log.warning("resuming %s (SIGCONT) at step %d", x["wid"], e["step"])
                        os.kill(p.pid, signal.SIGCONT)
                        woken.append(x["wid"])
                self.injected.append(dict(e, wid=",".join(woken), t=time.time()))
                continue
            if e.get("target") == "spare":
                held = set(self._slots().values())
                spares = [w for w, p in self.procs.items() if p.poll() is None and w not in held]
                if not spares:
                    continue
                wid = spares[0]
                log.warning("injecting %s into spare %s at step %d", e["kind"], wid, e["step"])
                os.kill(self.procs[wid].pid, SIGNALS[e["kind"]])
                self.injected.append(dict(e, wid=wid, t=time.time()))
                continue
            wid = self._slots().get(f"{e['replica']},{e['stage']}")
            proc = self.procs.get(wid)
            if proc is None or proc.poll() is not None:
                continue
            self._fire(e, wid, proc)

    def _fire(self, e: dict, wid: str, proc: subprocess.Popen) -> None:
        """Signal the slot's holder (kill / stop / term), or tell it to poison its weights or crash in
        its next commit; a held worker learns from fired/<id> that the event happened."""
        log.warning("injecting %s into %s (replica %d, stage %d) at step %d%s", e["kind"], wid, e["replica"],
                    e["stage"], e["step"], " right after a rebuild was published" if e.get("on") else "")
        if e["kind"] in ("poison", "crash_in_commit"):  # not a signal: the worker does it at its next step
            if not held_at_boundary(e):
                self.control.append(f"mail/{wid}", {"kind": e["kind"]})
        else:
            self.control.put_json(f"injected/{wid}", {"t": time.time(), "kind": e["kind"], "step": e["step"]})
            os.kill(proc.pid, SIGNALS[e["kind"]])
        if held_at_boundary(e):
            self.fired[e["id"]] = {"kind": e["kind"], "wid": wid}
            self.control.put_json(f"fired/{e['id']}", self.fired[e["id"]])
        self.injected.append(dict(e, wid=wid, t=time.time()))

    def _armed(self) -> bool:
        """An event waits for a publication: poll every millisecond so it lands while the
        generation forms, not after."""
        return any("armed" in e or "due_at" in e or "near" in e for e in self.events)

    def _machine_due(self) -> None:
        now = time.monotonic()
        for when, n in [j for j in self.joins if j[0] <= now]:
            self.joins.remove((when, n))
            new = f"m{len(self.machines)}"  # ids are never reused: m{K}, m{K+1}, ...
            log.warning("replacement machine %s joins with %d workers", new, n)
            for _ in range(n):
                self.start_worker(machine=new)
        for when, m in [r for r in self.reclaim if r[0] <= now]:
            self.reclaim.remove((when, m))
            for wid in self._workers_on(m):
                self.procs[wid].kill()
        for m, v in self.machines.items():  # a machine is billed until its last process is gone
            if v["t1"] is None and v["cause"] is not None and not self._workers_on(m):
                v["t1"] = now
        if not self.machine_events:
            return
        # The trace's step is the fleet's: the slowest replica's (replicas drift apart while one of
        # them is rebuilt, and a machine that replaced a lost one must have trained before it goes).
        top = min((self.control.get_json_or(f"committed/{r}") or {"step": -1})["step"]
                  for r in range(self.job.parallel.replicas))
        for e in [e for e in self.machine_events if top + 1 >= e["step"]]:
            if e["machine"] not in self.machines and self.joins:
                continue  # a replacement machine the trace names that has not started yet: when it has
            self.machine_events.remove(e)
            self._preempt(e)

    def _workers_on(self, machine: str) -> List[str]:
        return [w for w, m in self.machine_of.items() if m == machine and self.procs[w].poll() is None]

    def _preempt(self, e: dict) -> None:
        m, kind = e["machine"], e["kind"]
        wids = self._workers_on(m)
        info = self.machines.get(m)
        if not wids or info is None or info["cause"] is not None:
            log.warning("machine event %s ignored: no live workers on machine %s", e, m)
            return
        held = set(self._slots().values())
        active = [w for w in wids if w in held]
        log.warning("preempting machine %s (%s) at step %d: %d workers, %d holding slots",
                    m, kind, e["step"], len(wids), len(active))
        wall, now = time.time(), time.monotonic()
        for wid in wids:
            self.control.put_json(f"injected/{wid}", {"t": wall, "kind": kind, "step": e["step"], "machine": m})
            os.kill(self.procs[wid].pid, SIGNALS[kind])
            self.injected.append(dict(e, wid=wid, t=wall))
        info["cause"] = kind
        if kind == "stop":  # a hung machine is never coming back: bill it until now
            info["t1"] = now
        if kind == "term":
            self.reclaim.append((now + self.job.faults.notice_s, m))
        self.prepaid += len(active)
        self.joins.append((now + self.job.faults.rejoin_delay_s, len(wids)))

    def write_machines(self) -> None:
        """machines.json: each simulated machine's alive time, for goodput per machine-second."""
        if not self.machines:
            return
        now = time.monotonic()
        out = {}
        for m, v in self.machines.items():  # alive time on the monotonic clock; wall times for the record
            alive = (v["t1"] if v["t1"] is not None else now) - v["t0"]
            out[m] = {"start": v["start"], "end": v["start"] + alive, "cause": v["cause"], "alive_s": alive,
                      "workers": [w for w, mm in self.machine_of.items() if mm == m]}
        write_strict_atomic(os.path.join(self.run_dir, MACHINES), out, indent=1)

    def write_faults(self) -> None:
        """faults.json: every fault event this launcher was to inject, what it injected (with the
        worker it hit and when) and what never fired (its target never existed, or the run ended
        first), so a test or a benchmark checks the run against what really happened to it."""
        scheduled = fault_events(self.job) + [dict(e) for e in self.job.faults.coordinator_schedule] + \
            [dict(e) for e in self.job.faults.machine_schedule]
        write_strict_atomic(os.path.join(self.run_dir, FAULTS), {
            "scheduled": scheduled, "injected": self.injected,
            # `waited_for_rebuild`: an `on: rebuild` event that reached its step, after which no
            # generation rebuilt anything (nothing to fire on).
            "not_fired": [dict({k: v for k, v in e.items() if k not in ("armed", "due_at", "near")},
                               **({"waited_for_rebuild": True} if "armed" in e and "due_at" not in e else {}))
                          for e in self.events + self.machine_events]}, indent=1)

    def cleanup(self) -> None:
        for write in (self.write_machines, self.write_faults):
            try:
                write()
            except OSError as err:
                log.warning("could not write %s: %s", write.__name__, err)
        for e in self.injected:  # a SIGSTOPped worker would never exit by itself
            p = self.procs.get(e["wid"])
            if e["kind"] == "stop" and p is not None and p.poll() is None:
                p.kill()
        deadline = time.monotonic() + 10.0
        for p in self.procs.values():
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        coordinators = self.etcd.procs if self.etcd is not None else [self.coordinator] if self.coordinator else []
        for p in list(self.procs.values()) + coordinators:
            if p.poll() is None:
                try:
                    p.kill()  # SIGKILL also ends SIGSTOPped processes
                except ProcessLookupError:
                    pass
                p.wait()
