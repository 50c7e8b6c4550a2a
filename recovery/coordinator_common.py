"""What the coordinator's parts share: constants, the records of workers and cells."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


log = logging.getLogger(__name__)
Slot = Tuple[int, int]
EX_SUSPENDED = 75  # EX_TEMPFAIL: the job saved its state and stopped; resume it (a batch script requeues)
EX_RECORD = 74  # EX_IOERR: training finished, but its record could not be written whole (disk full)
TERM_GRACE_S = 5.0  # after a SIGTERM, how long to wait for the workers' leave notices
END_GRACE_S = 3.0  # after the last step and the final evaluation, wait at most this for end markers
HOLD_RELAYED_S = 1.0  # how long a relayed replay waits for its root's own copy
STATE_FILE = "control_state.json"
LOGS = ("join", "rejoin", "suspect", "leave", "intent", "commit", "eval", "event", "ckpt", "suspended", "ready",
        "fault", "died")


@dataclass
class WorkerInfo:
    wid: str
    pid: int
    host: str
    machine: str
    hb: int = -1
    hb_changed: float = field(default_factory=time.monotonic)
    state: str = "spare"          # spare | active | dead | left
    slot: Optional[Slot] = None
    leaving: bool = False         # announced a notice (SIGTERM / Slurm warning / spot notice)
    status: dict = field(default_factory=dict)  # the worker's last heartbeat record


@dataclass
class Cell:
    index: int
    replicas: List[int]
    gen: int = -1
    plan: Optional[dict] = None
    lost: Dict[Slot, dict] = field(default_factory=dict)   # slots without a holder
    rebuilding: Dict[Slot, dict] = field(default_factory=dict)  # holder assigned, state not yet there
    since: float = field(default_factory=time.monotonic)   # last commit or publication
    waiting_since: Optional[float] = None                  # lost slots waiting for spares
    kicks: int = 0
    diverging: bool = False
    needs_plan: bool = False                               # a re-plan that had to wait (a rollback)


def _read_jsonl(path: str):
    if not os.path.isfile(path):  # absent, or a device / FIFO whose reading may never end
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
