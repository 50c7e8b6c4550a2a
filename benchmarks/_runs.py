"""Shared helpers of the recovery benchmarks: run `python -m trainer` for real and read what it wrote.

A run is the whole job (launcher, coordinator, one worker per stage, spares) in its own process
session, watched by a stall guard: a run that commits nothing for `stall_s` seconds (a hung rebuild,
a strategy that is not implemented yet) is interrupted and reported as an error instead of holding
the benchmark hostage. Times in `metrics.jsonl` are seconds since the coordinator started (`wall_s`,
event `t`); rebuild events also carry absolute `failed_at` / `resumed_at`, which `coordinator_t0`
turns into the same clock.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence
from kintsugi.recovery.runfiles import METRICS, SUMMARY, read_metrics  # noqa: F401 - benchmarks import it from here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Pinned so a change of the repository defaults (e.g. the default `faults` preset) cannot change
# what a benchmark measures. `faults=none` has no spare; each benchmark sets faults.spares itself.
BASE_OVERRIDES = ("model=tiny", "data=stdlib", "parallel=pipeline4", "launcher=local", "logger=quiet",
                  "faults=none", "faults.respawn=true")
REPORT_DIR = os.path.join(ROOT, "outputs", "benchmarks")  # outputs/ is gitignored
PYCACHE = os.path.join(REPORT_DIR, ".pycache")


@dataclass
class RunResult:
    name: str
    run_dir: str
    rc: Optional[int]
    wall_s: float
    error: Optional[str] = None
    summary: Optional[dict] = None
    commits: List[dict] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)
    events: List[dict] = field(default_factory=list)
    stderr_tail: str = ""
    cpu_samples: List[tuple] = field(default_factory=list)  # (seconds since start, metrics lines, job CPU s)
    startup_failures: List[str] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def schedule_override(events: Sequence[dict]) -> str:
    """`faults.schedule=[{step: 15, replica: 0, stage: 2, kind: kill}, ...]` for Hydra."""
    items = ", ".join(f"{{step: {e['step']}, replica: {e.get('replica', 0)}, stage: {e['stage']}, "
                      f"kind: {e.get('kind', 'kill')}}}" for e in events)
    return f"faults.schedule=[{items}]"


def session_cpu_s(sid: int, seen: Dict[int, float]) -> float:
    """CPU seconds (user + system) used so far by the processes of session `sid`: the job we started.
    `seen` keeps each pid's last reading, so a process that has exited still counts."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the ")" that ends the command name: state ppid pgrp session ... utime(12) stime(13).
        if int(fields[3]) == sid:
            seen[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    return sum(seen.values())


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def run_job(name: str, run_dir: str, overrides: Sequence[str], stall_s: float = 90.0,
            timeout_s: float = 1200.0, stop_when_evals: Optional[Callable[[List[dict]], bool]] = None) -> RunResult:
    """Run the trainer once; never raises for a failed run (the failure is in `error`).
    `stop_when_evals(evals)`: end the run early (not an error) once it returns True."""
    os.makedirs(os.path.dirname(run_dir) or ".", exist_ok=True)
    cmd = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", *BASE_OVERRIDES, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", TORCH_CPP_LOG_LEVEL="ERROR",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONPYCACHEPREFIX=PYCACHE)
    # Byte-code caching on (into a private directory), as in a normal Python install: with
    # PYTHONDONTWRITEBYTECODE every worker recompiles torch's lazily imported modules, seconds of CPU
    # per process that also starve its heartbeat thread (see BENCHMARKS_recovery.md).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    err_path = run_dir.rstrip("/") + ".stderr.log"
    t0 = time.time()
    error, stopped_early = None, False
    with open(err_path, "w") as err_f:
        # Own session: on a stall the whole job (launcher, coordinator, workers) is ended as a group.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err_f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        metrics = os.path.join(run_dir, METRICS)
        last_lines, last_progress = 0, time.time()
        cpu_seen: Dict[int, float] = {}
        samples = []
        while proc.poll() is None:
            time.sleep(0.25)
            n = _count_lines(metrics)
            samples.append((time.time() - t0, n, session_cpu_s(proc.pid, cpu_seen)))
            if n != last_lines:
                last_lines, last_progress = n, time.time()
                if stop_when_evals is not None and stop_when_evals(read_metrics(run_dir)[1]):
                    stopped_early = True
                    _stop(proc)
                    break
            now = time.time()
            # Start-up (imports, corpus, spawning) writes nothing for a while: allow for it.
            stalled = now - last_progress > stall_s + (60.0 if last_lines == 0 else 0.0)
            if stalled or now - t0 > timeout_s:
                error = (f"stalled: no new metrics for {now - last_progress:.0f}s" if stalled
                         else f"timed out after {timeout_s:.0f}s")
                _stop(proc)
                break
    rc = proc.returncode
    with open(err_path, errors="replace") as f:
        tail = f.read()[-3000:]
    if error is None and rc != 0 and not stopped_early:
        error = f"exit code {rc}: " + _last_error_line(tail)
    summary = None
    spath = os.path.join(run_dir, SUMMARY)
    if os.path.exists(spath):
        with open(spath) as f:
            summary = json.load(f)
        if error is None and summary.get("error"):
            error = f"run stopped: {summary['error']}"
    commits, evals, events = read_metrics(run_dir)
    return RunResult(name, run_dir, rc, time.time() - t0, error, summary, commits, evals, events, tail, samples,
                     stopped_early=stopped_early)


def final_eval_seen(evals: List[dict]) -> bool:
    """For `stop_when_evals`: the run's last evaluation is in, so its metrics are complete (ending
    it there skips the trainer's shutdown, summary and plot, which a benchmark does not need)."""
    return any(e.get("final") for e in evals)


def run_job_retrying(name: str, run_dir: str, overrides: Sequence[str], retries: int = 1, **kw) -> RunResult:
    """run_job, run again (up to `retries` times) when a run fails before its first commit: on a
    loaded machine a worker starved at start-up can miss its heartbeats and the job never starts
    (see BENCHMARKS_recovery.md). The earlier failures are kept in `result.startup_failures`."""
    failures = []
    for attempt in range(retries + 1):
        res = run_job(name, run_dir if attempt == 0 else f"{run_dir}-retry{attempt}", overrides, **kw)
        if res.ok or res.commits or attempt == retries:
            break
        failures.append(res.error)
    res.startup_failures = failures
    return res


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C first (the launcher cleans up its children), then SIGKILL to the job's process group."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the job we started: nothing else is in it
    except ProcessLookupError:
        pass
    proc.wait()


def _last_error_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for l in reversed(lines):
        if any(k in l for k in ("Error", "error", "kintsugi:", "cannot recover", "Unrecoverable")):
            return l[:300]
    return lines[-1][:300] if lines else ""


# --- reading a run ---------------------------------------------------------------------------------
def commits_of(result: RunResult, replica: int = 0) -> List[dict]:
    """Replica's commit records in arrival order (a rollback would show repeated step numbers)."""
    return [c for c in result.commits if c.get("replica", 0) == replica]


def rebuilds_of(result: RunResult) -> List[dict]:
    return [e for e in result.events if e.get("kind") == "rebuild"]


def coordinator_t0(events: Sequence[dict]) -> Optional[float]:
    """The coordinator's start on the absolute clock. An event is written at t0 + t, a little after
    the worker stamped resumed_at, so each rebuild event bounds t0 from below by resumed_at - t; the
    largest bound is the tightest (error: the coordinator's log-drain lag, ~10 ms)."""
    bounds = [e["resumed_at"] - e["t"] for e in events if "resumed_at" in e and "t" in e]
    return max(bounds) if bounds else None


def steady_tokens_per_s(commits: Sequence[dict], skip: int, eval_steps: Sequence[int] = ()) -> Optional[float]:
    """Tokens/s from the coordinator's commit times over steps after the first `skip` (start-up,
    first-use costs): sum of tokens / sum of inter-commit gaps, leaving out the gaps that contain
    an evaluation."""
    by_step: Dict[int, dict] = {}
    for c in commits:
        by_step.setdefault(c["step"], c)
    steps = sorted(s for s in by_step if s >= skip)
    evals = set(eval_steps)
    tokens, seconds = 0, 0.0
    for a, b in zip(steps, steps[1:]):
        if b != a + 1 or b in evals:  # eval after step a runs before step b (eval `step` = steps done)
            continue
        tokens += by_step[b].get("tokens", 0)
        seconds += by_step[b]["wall_s"] - by_step[a]["wall_s"]
    return tokens / seconds if seconds > 0 else None


def steady_cpu_s_per_step(result: RunResult, skip: int) -> Optional[float]:
    """Job CPU seconds (all its processes) per committed step between the poll that first saw
    commit `skip` and the last poll before the final commit; less sensitive to other jobs' load, unlike wall
    time. Assumes a failure-free run with no evaluation before the end (one line per commit)."""
    n_commits = len(result.commits)
    if n_commits <= skip + 1:
        return None
    # The last poll before the final commit arrived: the final evaluation is left out.
    first = next((s for s in result.cpu_samples if s[1] >= skip + 1), None)
    last = next((s for s in reversed(result.cpu_samples) if s[1] < n_commits), None)
    if first is None or last is None or last[1] <= first[1]:
        return None
    return (last[2] - first[2]) / (last[1] - first[1])


def median(xs: Sequence[float]) -> Optional[float]:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def rnd(x, n: int = 4):
    return None if x is None else round(float(x), n)
