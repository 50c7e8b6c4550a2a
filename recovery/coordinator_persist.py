"""The coordinator's persisted state (control_state.json): written on every change, read back by a
restarted coordinator (`--resume`)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Dict

from . import protocol as P
from .coordinator_common import STATE_FILE, WorkerInfo, _read_jsonl, log
from .records import write_strict_atomic


class PersistMixin:
    """Part of `Coordinator` (recovery/coordinator.py); state lives there."""

    # --- persistence ------------------------------------------------------------------------------
    def _persist(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        state = {
            "incarnation": self.incarnation, "version": self.version, "started": self.started, "port": self.port,
            "run_id": self.run_id,
            "t0": self.t0, "workers": {w.wid: dict(asdict(w), hb_changed=None, slot=list(w.slot) if w.slot else None)
                                       for w in self.workers.values()},
            "slots": {P.slot_key(k): v for k, v in self.slots.items()},
            "cells": {str(c.index): {"gen": c.gen, "plan": c.plan, "kicks": c.kicks,
                                     "waiting": c.waiting_since is not None,
                                     "lost": {P.slot_key(s): {k: v for k, v in info.items() if k != "detected_mono"}
                                              for s, info in c.lost.items()},
                                     "rebuilding": {P.slot_key(s): {k: v for k, v in info.items()
                                                                    if k != "detected_mono"}
                                                    for s, info in c.rebuilding.items()}}
                      for c in self.cells.values()},
            "stage_gen": self.stage_gen, "stage_members": self.stage_members,
            "ready": {P.slot_key(k): v for k, v in self.ready.items()},
            "unsettled": {P.slot_key(k): v for k, v in self.unsettled.items()},
            "committed": self.committed, "totals": self.totals,
            "layout": self.layout, "layout_version": self.layout_version,
            "rebuilds": self.rebuilds, "failures": self.failures, "publications": self.publications,
            "tokens": self.tokens, "final_val": self.final_val, "ckpt_counts": self.ckpt_counts,
            "latest_checkpoint": self.latest_checkpoint, "spares_needed": self.spares_needed,
            "rebuilt_slots": self.rebuilt_slots, "rebuild_plans": self.rebuild_plans,
            "bytes": self._bytes_cache(), "corpus": self.corpus,
        }
        try:
            write_strict_atomic(os.path.join(self.run_dir, STATE_FILE), state, fsync=True)
        except OSError as e:
            self._dirty = True
            if not getattr(self, "_persist_error", None):
                self._persist_error = str(e)
                log.error("cannot persist the coordinator state (%s); a restart would lose recent changes", e)

    def _bytes_cache(self) -> Dict[str, int]:
        now = time.monotonic()
        if now - getattr(self, "_bytes_at", 0.0) > 2.0:
            self._bytes_at, self._bytes_val = now, self._bytes()
        return self._bytes_val

    def _load_state(self) -> None:
        path = os.path.join(self.run_dir, STATE_FILE)
        with open(path) as f:
            st = json.load(f)
        self.incarnation, self.version, self.started = st["incarnation"], st["version"], st["started"]
        self.run_id = st.get("run_id")
        self.t0 = st["t0"]
        for wid, w in st["workers"].items():
            info = WorkerInfo(wid, w["pid"], w["host"], w["machine"], state=w["state"],
                              slot=tuple(w["slot"]) if w["slot"] else None, leaving=w["leaving"])
            self.workers[wid] = info
        self.slots = {P.parse_slot_key(k): v for k, v in st["slots"].items()}
        now = time.monotonic()
        for k, c in st["cells"].items():
            cell = self.cells[int(k)]
            cell.gen, cell.plan, cell.kicks = c["gen"], c["plan"], c["kicks"]
            cell.lost = {P.parse_slot_key(s): dict(info, detected_mono=now) for s, info in c["lost"].items()}
            cell.rebuilding = {P.parse_slot_key(s): dict(info, detected_mono=now)
                               for s, info in c.get("rebuilding", {}).items()}
            cell.waiting_since = now if c["waiting"] else None
        self.stage_gen = {int(k): v for k, v in st["stage_gen"].items()}
        self.stage_members = {int(k): v for k, v in st["stage_members"].items()}
        self.ready = {P.parse_slot_key(k): v for k, v in st["ready"].items()}
        self.unsettled = {P.parse_slot_key(k): v for k, v in st["unsettled"].items()}
        self.totals = {int(k): v for k, v in st["totals"].items()}
        self.layout, self.layout_version = st["layout"], st["layout_version"]
        self.rebuilds, self.failures, self.publications = st["rebuilds"], st["failures"], st["publications"]
        self.final_val, self.latest_checkpoint = st["final_val"], st["latest_checkpoint"]
        self.ckpt_counts = {int(k): v for k, v in st["ckpt_counts"].items()}
        self.bytes_before = st.get("bytes", {})
        self.rebuilt_slots, self.spares_needed = st.get("rebuilt_slots", 0), st.get("spares_needed", 0)
        self.rebuild_plans = st.get("rebuild_plans", 0)
        self.corpus = self.corpus or st.get("corpus")
        # What was committed is what metrics.jsonl recorded (written before the state file).
        self.tokens = 0
        for rec in _read_jsonl(os.path.join(self.run_dir, "metrics.jsonl")):
            if "replica" in rec and "step" in rec and "val_loss" not in rec and not rec.get("duplicate"):
                r, k = int(rec["replica"]), int(rec["step"])
                if r in self.recorded and k not in self.recorded[r]:
                    self.recorded[r].add(k)
                    self.tokens += int(rec.get("tokens", 0))
                    if k > self.committed[r]:
                        self.committed[r] = k
                        if rec.get("grad_sq") is not None:
                            self.totals[r] = [rec["grad_sq"], rec.get("loss")]
            elif rec.get("final") and "val_loss" in rec:
                self.final_val = rec["val_loss"]
