"""The local launcher: starts the coordinator and the worker processes on this machine, injects
the configured faults into the real processes, starts replacements, and leaves nothing behind.

Children get PR_SET_PDEATHSIG (via KINTSUGI_PDEATHSIG=1), so even a SIGKILLed launcher leaves no
orphan; a normal exit, Ctrl-C or an error kills whatever is still running.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from recovery import protocol as P

from .config import JobConfig

log = logging.getLogger("kintsugi.launch")
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KINTSUGI_PDEATHSIG": "1",
                "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def fault_events(job: JobConfig) -> List[dict]:
    """The explicit schedule plus the seeded Bernoulli failures of `faults.rate_per_hour`: every
    (step, replica, stage) draws from one seeded stream, so every strategy sees the same failures."""
    events = [dict(e) for e in job.faults.schedule]
    S, T = job.parallel.stages, job.train.max_steps
    if job.faults.demo and T >= 10:
        if S >= 3:  # a middle stage: CheckFree averages its neighbours
            events.append({"step": int(0.3 * T), "replica": 0, "stage": S // 2, "kind": "kill"})
        if S >= 2:  # the first stage: CheckFree+ copies its swap partner
            events.append({"step": int(0.65 * T), "replica": 0, "stage": 0, "kind": "kill"})
    p = job.faults.per_step_probability() if job.faults.rate_per_hour > 0 else 0.0
    if p > 0:
        rng = random.Random(job.faults.seed)
        for step in range(1, job.train.max_steps - 1):
            for r in range(job.parallel.replicas):
                for s in range(job.parallel.stages):
                    if rng.random() < p:
                        events.append({"step": step, "replica": r, "stage": s, "kind": "kill"})
    return sorted(events, key=lambda e: (e["step"], e["replica"], e["stage"]))


class LocalLauncher:
    def __init__(self, job: JobConfig, run_dir: str, corpus: dict, progress: bool = True):
        self.job, self.run_dir, self.corpus, self.progress = job, run_dir, corpus, progress
        self.procs: Dict[str, subprocess.Popen] = {}
        self.coordinator: Optional[subprocess.Popen] = None
        self.store = None
        self.n_workers = 0
        self.events = fault_events(job)
        self.injected: List[dict] = []
        self.env = child_env({P.TOKEN_ENV: P.resolve_token(job.recovery.token) or os.urandom(8).hex()})

    def start_worker(self) -> str:
        wid = f"w{self.n_workers}"
        env = self.env
        if self.job.launcher.machines > 0:  # simulated fleet: label workers with a machine id
            env = dict(env, KINTSUGI_MACHINE=f"m{self.n_workers % self.job.launcher.machines}")
        self.n_workers += 1
        self.procs[wid] = subprocess.Popen(
            [sys.executable, "-m", "trainer.worker", "--coordinator", f"127.0.0.1:{self.port}", "--wid", wid],
            env=env)
        return wid

    def run(self) -> int:
        os.makedirs(self.run_dir, exist_ok=True)
        job_path = os.path.join(self.run_dir, "job.json")
        with open(job_path, "w") as f:
            json.dump(self.job.to_dict(), f, indent=1)
        self.port = P.free_port()
        cmd = [sys.executable, "-m", "recovery.coordinator", "--port", str(self.port), "--host", "127.0.0.1",
               "--run-dir", self.run_dir, "--job", job_path] + ([] if self.progress else ["--no-progress"])
        # The coordinator reads the token from the same environment variable the workers present.
        self.coordinator = subprocess.Popen(cmd, env=self.env)
        try:
            self.store = P.connect("127.0.0.1", self.port, timeout_s=self.job.launcher.start_timeout_s)
            self._wait_for("job")
            P.put_json(self.store, "corpus", self.corpus)
            for _ in range(self.job.parallel.replicas * self.job.parallel.stages + self.job.faults.spares):
                self.start_worker()
            return self._supervise()
        except KeyboardInterrupt:
            print("kintsugi: interrupted; stopping all processes", file=sys.stderr)
            return 130
        finally:
            self.cleanup()

    def _wait_for(self, key: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while not self.store.check([key]):
            if time.time() > deadline or self.coordinator.poll() is not None:
                raise RuntimeError("the coordinator did not come up; see its log above")
            time.sleep(0.02)

    def _supervise(self) -> int:
        seen_gen = 0
        while True:
            rc = self.coordinator.poll()
            if rc is not None:
                return rc
            try:
                if self.store.check(["shutdown"]):
                    return self.coordinator.wait(timeout=30)
                self._inject_due()
                gen = int(self.store.get("gen"))
            except (RuntimeError, subprocess.TimeoutExpired):  # the coordinator closed the store
                try:
                    return self.coordinator.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    return 1
            if gen > seen_gen:
                for g in range(seen_gen + 1, gen + 1):
                    plan = P.get_json(self.store, f"gen/{g}")
                    if self.job.faults.respawn:
                        for _ in plan["rebuild"]:
                            self.start_worker()
                seen_gen = gen
            time.sleep(0.02)

    def _inject_due(self) -> None:
        if not self.events:
            return
        committed = {}
        for e in list(self.events):
            r = e["replica"]
            if r not in committed:
                rec = P.get_json_or(self.store, f"committed/{r}")
                committed[r] = rec["step"] if rec else -1
            if committed[r] + 1 < e["step"]:
                continue
            self.events.remove(e)
            g = int(self.store.get("gen"))
            plan = P.get_json(self.store, f"gen/{g}")
            wid = plan["slots"].get(f"{r},{e['stage']}")
            proc = self.procs.get(wid)
            if proc is None or proc.poll() is not None:
                continue
            log.warning("injecting %s into %s (replica %d, stage %d) at step %d", e["kind"], wid, r, e["stage"],
                        e["step"])
            P.put_json(self.store, f"injected/{wid}", {"t": time.time(), "kind": e["kind"], "step": e["step"]})
            os.kill(proc.pid, SIGNALS[e["kind"]])
            self.injected.append(dict(e, wid=wid, t=time.time()))

    def cleanup(self) -> None:
        for e in self.injected:  # a SIGSTOPped worker would never exit by itself
            p = self.procs.get(e["wid"])
            if e["kind"] == "stop" and p is not None and p.poll() is None:
                p.kill()
        deadline = time.time() + 10.0
        for p in self.procs.values():
            while p.poll() is None and time.time() < deadline:
                time.sleep(0.05)
        for p in list(self.procs.values()) + ([self.coordinator] if self.coordinator else []):
            if p.poll() is None:
                try:
                    p.kill()  # SIGKILL also ends SIGSTOPped processes
                except ProcessLookupError:
                    pass
                p.wait()
