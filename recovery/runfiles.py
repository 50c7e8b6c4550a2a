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
from typing import Dict, Iterator, List, NamedTuple, Set, Tuple

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CONTROL_STATE = "control_state.json"
FINAL_STATE = "coordinator_state.json"
SUMMARY = "summary.json"
JOB = "job.json"
MACHINES = "machines.json"
FAULTS = "faults.json"      # the local launcher: the fault events scheduled, injected, never fired
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


def standing_commits(run_dir: str) -> Tuple[List[dict], List[dict]]:
    """(the commit rows of metrics.jsonl that stand, the rows undone), each in file order. A rollback
    or resume event undoes the rows recorded before it of the steps it lists under `discarded`
    (`{replica: [steps]}`): those steps were trained again from a checkpoint. A row marked
    `duplicate` never stands."""
    rows: List[Tuple[dict, bool]] = []  # (row, undone)
    for rec in read_jsonl(os.path.join(run_dir, METRICS)):
        ev = rec.get("event")
        if isinstance(ev, dict) and isinstance(ev.get("discarded"), dict):
            gone: Set[Tuple[int, int]] = {(int(r), int(k)) for r, ks in ev["discarded"].items() for k in ks}
            rows = [(row, undone or (row["replica"], row["step"]) in gone) for row, undone in rows]
        elif ev is None and "val_loss" not in rec and "replica" in rec and "step" in rec and not rec.get("duplicate"):
            rows.append((rec, False))
    return [row for row, undone in rows if not undone], [row for row, undone in rows if undone]


def missing_steps(standing: List[dict]) -> Dict[int, List[int]]:
    """Per replica, the steps before its last recorded one that have no standing row: committed
    (a later step built on them) but absent from metrics.jsonl."""
    by_replica: Dict[int, Set[int]] = {}
    for row in standing:
        by_replica.setdefault(int(row["replica"]), set()).add(int(row["step"]))
    return {r: sorted(set(range(max(ks) + 1)) - ks) for r, ks in sorted(by_replica.items())
            if len(ks) != max(ks) + 1}
