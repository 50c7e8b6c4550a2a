"""`kintsugi status RUN_DIR`: what a run is doing, read from the files its coordinator writes.

Nothing here talks to the coordinator: a run directory is enough, on the coordinator's machine or a
copy of it, during the run or after. The sources:

- `control_state.json`: rewritten (atomically) by the coordinator on every change, at least once per
  committed step: workers, slots, cells with their generation, rebuilds, committed steps.
- `metrics.jsonl`: one JSON record per line; commits ({"replica", "step", "loss", "wall_s"}),
  validation losses ({"val_loss"}) and events ({"event": {...}}). Only its tail is read.
- `coordinator_state.json` (written when the run ends) and `summary.json` (trainer.reporting.summary).
- `.coordinator_alive`: touched about once a second by a live coordinator.

`collect()` turns them into one JSON-able dict; `kintsugi status --json` prints it and the dashboard
(trainer.reporting.dashboard) serves it; `render()` is the table a person reads.

Heartbeat ages: the coordinator keeps heartbeat times in memory only (a monotonic clock), and writes
each worker's heartbeat *count*. A reader that looks more than once (`--watch`) tracks when each count
last moved, measured by the control file's modification time, so an age is known from the second
look on; the dashboard, which lives in the coordinator's process, is handed the exact ages instead.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional, Tuple
from kintsugi.recovery.runfiles import ALIVE, CONTROL_STATE, FINAL_STATE, JOB, METRICS, SUMMARY

ALIVE_WITHIN_S = 10.0  # the coordinator touches its liveness file every second
TAIL_BYTES = 256 * 1024  # enough metrics.jsonl for the last losses of any reasonable run
NUM_LAST = 5


class StatusError(ValueError):
    """RUN_DIR is not something status can read; the message is one line saying what to pass."""


def _read_json(path: str) -> Optional[dict]:
    # isfile: a FIFO or device planted under a known name would block or feed us garbage.
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # mid-replace on a filesystem without atomic rename, or damaged: skip this look
    return data if isinstance(data, dict) else None


def _mtime(path: str) -> Optional[float]:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def tail_records(path: str, max_bytes: int = TAIL_BYTES) -> List[dict]:
    """The JSON records of the last `max_bytes` of a JSON-lines file (a partial first line skipped)."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - max_bytes))
        data = f.read()
    lines = data.split(b"\n")
    if size > max_bytes:
        lines = lines[1:]
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # empty, or the line being written right now
        if isinstance(rec, dict):
            out.append(rec)
    return out


class HeartbeatClock:
    """Heartbeat ages for a reader that looks repeatedly: the time since a worker's heartbeat count
    was first seen at its present value, taking the control file's mtime as when it was seen."""

    def __init__(self):
        self._seen: Dict[str, Tuple[int, Optional[float]]] = {}

    def ages(self, workers: dict, written_at: Optional[float], now: float) -> Dict[str, Optional[float]]:
        out: Dict[str, Optional[float]] = {}
        for wid, w in workers.items():
            hb = w.get("hb")
            before = self._seen.get(wid)
            if before is None:
                since = None  # first look: the count alone says nothing about when it last moved
            elif before[0] != hb:
                since = written_at
            else:
                since = before[1]
            self._seen[wid] = (hb, since)
            out[wid] = None if since is None else max(0.0, now - since)
        return out


def run_state(run_dir: str) -> Tuple[str, str]:
    """(state, detail): starting / running / unresponsive / finished / stopped / suspended."""
    control_t = _mtime(os.path.join(run_dir, CONTROL_STATE))
    final_t = _mtime(os.path.join(run_dir, FINAL_STATE))
    # A resumed run keeps the previous coordinator's final file; it is the end of *this* run only if
    # it was written after the last control-state write (both come from the same final persist).
    if final_t is not None and (control_t is None or final_t >= control_t - 1.0):
        final = _read_json(os.path.join(run_dir, FINAL_STATE)) or {}
        if final.get("suspended"):
            return "suspended", f"checkpointed; continue with train.resume={os.path.abspath(run_dir)}"
        if final.get("error"):
            return "stopped", str(final["error"])
        return "finished", ""
    if control_t is None:
        return "starting", "no coordinator state yet"
    alive_t = _mtime(os.path.join(run_dir, ALIVE))
    age = time.time() - (alive_t if alive_t is not None else control_t)
    if age <= ALIVE_WITHIN_S:
        return "running", ""
    return "unresponsive", f"the coordinator has not shown life for {age:.0f}s (died, stopped or on another machine)"


def _check_run_dir(run_dir: str) -> None:
    if not os.path.isdir(run_dir):
        raise StatusError(f"{run_dir}: no such run directory; pass a run's outputs/<name>/<time> directory")
    if not any(os.path.isfile(os.path.join(run_dir, n)) for n in (JOB, CONTROL_STATE, FINAL_STATE)):
        raise StatusError(f"{run_dir}: no job.json or {CONTROL_STATE}, so not a Kintsugi run directory; "
                          "pass outputs/<name>/<time>")


def collect(run_dir: str, clock: Optional[HeartbeatClock] = None,
            heartbeat_ages: Optional[Callable[[], Dict[str, float]]] = None) -> dict:
    """Everything `kintsugi status` shows, as one JSON-able dict. `heartbeat_ages` (wid -> seconds)
    is the coordinator's own view; without it `clock` estimates them across calls."""
    _check_run_dir(run_dir)
    now = time.time()
    job = _read_json(os.path.join(run_dir, JOB)) or {}
    control_path = os.path.join(run_dir, CONTROL_STATE)
    control = _read_json(control_path) or {}
    final = _read_json(os.path.join(run_dir, FINAL_STATE)) or {}
    summary = _read_json(os.path.join(run_dir, SUMMARY))
    written_at = _mtime(control_path)
    parallel = job.get("parallel", {})
    R, S = int(parallel.get("replicas", 1)), int(parallel.get("stages", 0))
    workers = control.get("workers") or {}
    slot_map = control.get("slots") or {}
    if not S and slot_map:  # job.json missing: size the grid from the slots themselves
        keys = [tuple(int(x) for x in k.split(",")) for k in slot_map]
        R, S = max(r for r, _ in keys) + 1, max(s for _, s in keys) + 1

    ages: Dict[str, Optional[float]] = {}
    if heartbeat_ages is not None:
        ages = dict(heartbeat_ages())
    elif clock is not None:
        ages = clock.ages(workers, written_at, now)

    def worker_row(wid: Optional[str]) -> dict:
        w = workers.get(wid) or {}
        st = w.get("status") or {}
        age = ages.get(wid) if wid and w.get("state") in ("active", "spare") else None
        return {"worker": wid, "machine": w.get("machine") or w.get("host"), "state": w.get("state", "empty"),
                "phase": st.get("phase"), "step": st.get("step"), "pid": w.get("pid"),
                "heartbeat_age_s": None if age is None else round(age, 2)}

    slots = []
    for r in range(R):
        for s in range(S):
            wid = slot_map.get(f"{r},{s}")
            row = worker_row(wid) if wid else {"worker": None, "machine": None, "state": "empty", "phase": None,
                                               "step": None, "pid": None, "heartbeat_age_s": None}
            slots.append(dict(replica=r, stage=s, **row))
    in_slots = set(slot_map.values())
    others = [dict(worker_row(wid), slot=w.get("slot")) for wid, w in sorted(workers.items()) if wid not in in_slots]

    cells = []
    for key, c in sorted((control.get("cells") or {}).items(), key=lambda kv: int(kv[0])):
        plan = c.get("plan") or {}
        cells.append({"cell": int(key), "gen": c.get("gen"), "replicas": plan.get("replicas"),
                      "waiting": bool(c.get("waiting")), "lost": sorted(c.get("lost") or {}),
                      "rebuilding": sorted(c.get("rebuilding") or {}), "layout": plan.get("layout")})

    records = tail_records(os.path.join(run_dir, METRICS))
    commits = [r for r in records if "loss" in r and "step" in r and "replica" in r and "event" not in r]
    vals = [r for r in records if "val_loss" in r]
    rebuilds = control.get("rebuilds") or final.get("rebuilds") or []
    if not rebuilds:  # control file missing or damaged: the events in metrics.jsonl say the same
        rebuilds = [{k: e.get(k) for k in ("step", "slot", "tier", "detect_s", "recover_s")}
                    for e in (r["event"] for r in records if isinstance(r.get("event"), dict))
                    if e.get("kind") == "rebuild"]
    state, detail = run_state(run_dir)
    out = {
        "run_dir": os.path.abspath(run_dir), "name": job.get("name"), "state": state, "detail": detail,
        "now": now, "control_age_s": None if written_at is None else round(now - written_at, 2),
        "grid": {"replicas": R, "stages": S}, "slots": slots, "other_workers": others, "cells": cells,
        "committed": {str(k): v for k, v in (control.get("committed") or final.get("committed") or {}).items()},
        "max_steps": (job.get("train") or {}).get("max_steps"),
        "failures": control.get("failures", final.get("failures")),
        "num_rebuilds": len(rebuilds), "rebuilds": rebuilds[-NUM_LAST:],
        "losses": [{k: c.get(k) for k in ("replica", "step", "loss", "wall_s")} for c in commits[-NUM_LAST:]],
        "val_loss": ({k: vals[-1].get(k) for k in ("step", "val_loss", "wall_s")} if vals else None),
        "summary": None,
    }
    if summary is not None and state in ("finished", "stopped", "suspended"):
        out["summary"] = {k: summary.get(k) for k in ("final_val_loss", "steps", "wall_s", "tokens_per_s",
                                                       "failures", "error")}
    return out


def _fmt(v, spec: str = "", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def render(st: dict) -> str:
    """The human table of `collect()`'s dict."""
    head = f"run {st['run_dir']}" + (f"  job {st['name']!r}" if st.get("name") else "")
    state = st["state"] + (f": {st['detail']}" if st.get("detail") else "")
    lines = [head, f"state: {state}" + (f"  (control state written {st['control_age_s']:.1f}s ago)"
                                        if st.get("control_age_s") is not None and st["state"] == "running" else "")]
    g = st["grid"]
    lines.append(f"\nslots ({g['replicas']} replica(s) x {g['stages']} stage(s)):")
    rows = [("replica", "stage", "worker", "machine", "state", "phase", "step", "heartbeat")]
    for s in st["slots"]:
        age = s["heartbeat_age_s"]
        rows.append((str(s["replica"]), str(s["stage"]), _fmt(s["worker"]), _fmt(s["machine"]), s["state"],
                     _fmt(s["phase"]), _fmt(s["step"]), "-" if age is None else f"{age:.1f}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    spares = [w for w in st["other_workers"] if w["state"] == "spare"]
    gone = [w for w in st["other_workers"] if w["state"] != "spare"]
    if spares or gone:
        lines.append("  spares: " + (", ".join(f"{w['worker']} ({w['machine']})" for w in spares) or "none")
                     + "; gone: " + (", ".join(f"{w['worker']} ({w['state']}, was slot "
                                               f"{','.join(map(str, w['slot'])) if w.get('slot') else '-'})"
                                               for w in gone) or "none"))
    lines.append("\ngenerations:")
    for c in st["cells"]:
        extra = [f"lost {c['lost']}"] if c["lost"] else []
        extra += [f"rebuilding {c['rebuilding']}"] if c["rebuilding"] else []
        extra += ["waiting for workers"] if c["waiting"] else []
        lines.append(f"  cell {c['cell']} (replicas {c['replicas']}): generation {c['gen']}"
                     + (f"; {'; '.join(extra)}" if extra else ""))
    if not st["cells"]:
        lines.append("  none published yet")
    total = f" of {st['max_steps']}" if st.get("max_steps") else ""
    done = ", ".join(f"replica {r}: {k + 1}{total}" for r, k in sorted(st["committed"].items()))
    lines.append(f"  steps committed: {done or '-'}")
    lines.append(f"\nrebuilds ({st['num_rebuilds']} in all, {st['failures'] or 0} failure(s)):")
    for rb in st["rebuilds"]:
        slot = ",".join(map(str, rb.get("slot") or []))
        lines.append(f"  step {_fmt(rb.get('step'))}  slot {slot}  {rb.get('tier')}  detected in "
                     f"{_fmt(rb.get('detect_s'), '.3f')}s  training again after {_fmt(rb.get('recover_s'), '.2f')}s")
    lines.append("\nlast losses:")
    for c in st["losses"]:
        lines.append(f"  replica {c['replica']}  step {c['step']}  loss {_fmt(c['loss'], '.4f')}  "
                     f"at {_fmt(c['wall_s'], '.1f')}s")
    if not st["losses"]:
        lines.append("  none committed yet")
    if st.get("val_loss"):
        v = st["val_loss"]
        lines.append(f"  validation loss {_fmt(v['val_loss'], '.4f')} at step {v['step']}")
    if st.get("summary"):
        s = st["summary"]
        lines.append(f"\nsummary: {s.get('steps')} steps in {_fmt(s.get('wall_s'), '.1f')}s, final validation "
                     f"loss {_fmt(s.get('final_val_loss'), '.4f')}, {_fmt(s.get('tokens_per_s'), '.0f')} tokens/s")
    return "\n".join(lines)

