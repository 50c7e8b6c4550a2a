"""A run directory's file names, the job's exit codes, and the one reader of `metrics.jsonl`.

Named once here (the lowest layer that writes them) so the coordinator, the launchers, the reports
and the tests cannot disagree about a file name or what exit code 75 means.

  metrics.jsonl          one JSON object per line: commits, evaluations, {"event": ...} rows
  control_state.json     the coordinator's state, rewritten on every change (a restart reads it)
  coordinator_state.json the coordinator's final record (summary.json is built from it)
  summary.json, job.json, machines.json, .token, .coordinator_alive, checkpoints/, final/
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterator, List, NamedTuple

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CONTROL_STATE = "control_state.json"
FINAL_STATE = "coordinator_state.json"
SUMMARY = "summary.json"
JOB = "job.json"
MACHINES = "machines.json"
TOKEN = ".token"
ALIVE = ".coordinator_alive"

EX_OK = 0
EX_CANNOT_RECOVER = 3   # the run stopped: no tier could rebuild what was lost (or it stalled)
EX_RECORD = 74          # EX_IOERR: training finished, but its record could not be written whole
EX_SUSPENDED = 75       # EX_TEMPFAIL: the job saved its state and stopped; resume it (a batch script requeues)
EX_RESTART_STORE = 76   # internal: the coordinator saved its state and asks to start again with a fresh store
EX_DEPOSED = 77         # recovery.control=etcd: another coordinator leads now; this one acted no further


def read_jsonl(path: str) -> Iterator[dict]:
    """Every object of a JSON-lines file; a line cut short by a crash or a full disk is skipped. A
    path that is not a regular file (a device or FIFO in its place, whose reading may never end)
    yields nothing."""
    if not os.path.isfile(path):
        if os.path.exists(path):
            log.warning("%s is not a regular file; it is not read", path)
        return
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


class Metrics(NamedTuple):
    """metrics.jsonl split by kind, each in file order (the order the coordinator received them)."""
    commits: List[dict]
    evals: List[dict]
    events: List[dict]


def read_metrics(run_dir: str) -> Metrics:
    m = Metrics([], [], [])
    for rec in read_jsonl(os.path.join(run_dir, METRICS)):
        if "event" in rec:
            m.events.append(rec["event"])
        elif "val_loss" in rec:
            m.evals.append(rec)
        else:
            m.commits.append(rec)
    return m
