"""The coordinator: a process that is not a worker, so no worker's death takes the store down.

It hosts the TCPStore and owns membership: which worker holds which (replica, stage) slot, the spare
pool, heartbeats, the generation number and each generation's rebuild plan. It also collects the
committed steps into `metrics.jsonl` and shows progress. Run it standalone on a stable host with
`python -m recovery.coordinator --port 29400 --run-dir outputs/run --job job.json`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import protocol as P
from .placement import place, rebalance_layout, recoverability_report
from .tiers import Unrecoverable, plan_rebuilds

log = logging.getLogger(__name__)
Slot = Tuple[int, int]
EX_SUSPENDED = 75  # EX_TEMPFAIL: the job saved its state and stopped; resume it (a batch script requeues)
TERM_GRACE_S = 5.0  # after a SIGTERM, how long to wait for the workers' leave notices


@dataclass
class WorkerInfo:
    wid: str
    pid: int
    host: str
    machine: str
    hb: int = -1
    hb_changed: float = field(default_factory=time.time)
    state: str = "spare"          # spare | active | dead | left
    slot: Optional[Slot] = None
    leaving: bool = False         # announced a notice (SIGTERM / Slurm warning / spot notice)


class Coordinator:
    def __init__(self, job: dict, run_dir: str, port: int, host: str = "0.0.0.0", token: Optional[str] = None,
                 progress: bool = True):
        self.job, self.run_dir = job, run_dir
        par = job["parallel"]
        self.R, self.S = par["replicas"], par["stages"]
        self.max_steps = job["train"]["max_steps"]
        rec = job["recovery"]
        self.hb_timeout = rec["heartbeat_timeout_s"]
        self.strategy = rec["strategy"]
        self.diloco = job["diloco"]["enabled"]
        self.token = token
        self.store = P.connect(host, port, is_master=True, timeout_s=rec["init_timeout_s"])
        P.put_json(self.store, "job", job)
        self.store.set("gen", "-1")
        self.workers: Dict[str, WorkerInfo] = {}
        self.slots: Dict[Slot, str] = {}
        self.gen = -1
        self._full_since: Optional[float] = None
        self.pending_lost: Dict[Slot, dict] = {}   # slot -> {detected_at, handed_off, leaver}
        # Approximately rebuilt slots -> the step they resume at; they are no source for another
        # rebuild until their replica commits that step.
        self.unsettled: Dict[Slot, int] = {}
        # Failures that happen together (one machine, one SIGKILL of a group) are reported within
        # milliseconds of each other; wait this long after the first so they are planned together.
        self.settle_s = max(0.25, 2 * rec["heartbeat_interval_s"])
        self.committed = {r: -1 for r in range(self.R)}
        # Live rebalancing (parallel.rebalance): the layer counts every plan carries, and the stage
        # compute times measured under them (the first steps after a change are warm-up, skipped).
        from parallel.topology import per_stage_layers
        self.layout = [len(x) for x in per_stage_layers(job["model"]["n_layers"], self.S, par.get("layers_per_stage"))]
        self.config_layout = list(self.layout)
        self.rebalance = bool(par.get("rebalance"))
        self.rebalance_every = int(par.get("rebalance_every", 10))
        self.rebalance_min_gain = float(par.get("rebalance_min_gain", 0.1))
        self.stage_times: List[List[float]] = []
        self.layout_gen = 0
        self.rebuilds: List[dict] = []
        self.failures = 0
        self.final_val: Optional[float] = None
        self.error: Optional[str] = None
        self.exit_code = 3  # with an error: 3 = cannot recover, 143 = terminated
        self.readers = {name: P.LogReader(self.store, name) for name in
                        ("join", "suspect", "leave", "commit", "eval", "event", "ckpt", "intent", "suspended")}
        self.store.set("run_dir", os.path.abspath(run_dir))
        self.ckpt_counts: Dict[int, int] = {}
        self.latest_checkpoint: Optional[int] = None
        # Suspend (whole job preempted, nobody to hand off to): the generation that asked every
        # holder to save, and the slots saved so far.
        self.suspend_gen: Optional[int] = None
        self.suspended: Dict[Slot, int] = {}
        self.suspend_deadline = 0.0
        self.terminating: Optional[float] = None  # when a SIGTERM arrived
        # train.resume: each replica continues from the newest step all its stages checkpointed.
        self.resume_from: Optional[Dict[int, int]] = None
        if job["train"].get("resume"):
            from trainer.checkpoint import resume_points
            self.resume_from = resume_points(run_dir, self.R, self.S)
            if self.resume_from is None:
                self.error = f"train.resume={run_dir} holds no checkpoint complete for every replica"
            else:
                layout_path = os.path.join(run_dir, "checkpoints", "layout.json")
                if os.path.exists(layout_path):  # a rebalanced job suspended: rebuild its stages as they were
                    with open(layout_path) as f:
                        self.layout = json.load(f)["layers_per_stage"]
                steps = set(self.resume_from.values())
                self.latest_checkpoint = steps.pop() if len(steps) == 1 else None
                log.info("resuming in %s from step(s) %s", run_dir,
                         ", ".join(f"replica {r}: {k}" for r, k in sorted(self.resume_from.items())))
        os.makedirs(run_dir, exist_ok=True)
        self.metrics_f = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        from trainer.tracking import LiveWandb  # wandb run fed live (logger.wandb.mode != disabled)
        self.tracker = LiveWandb.start(job, run_dir)
        self.t0 = time.time()
        self.tokens = 0
        self.bar = None
        if progress:
            from tqdm import tqdm
            # In a log file (not a terminal) a redraw per step would flood it: every 10 s is enough.
            self.bar = tqdm(total=self.max_steps * self.R, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 10.0)

    # --- membership -------------------------------------------------------------------------------
    def _on_join(self, req: dict) -> None:
        wid = req["wid"]
        if self.token and req.get("token") != self.token:
            log.warning("refused join from %s (pid %s on %s): wrong or missing token", wid, req.get("pid"),
                        req.get("host"))
            self.store.set(f"ack/{wid}", "refused")
            self._event({"kind": "join_refused", "wid": wid, "host": req.get("host")})
            return
        self.workers[wid] = WorkerInfo(wid, req["pid"], req["host"], req.get("machine", req["host"]))
        self.store.set(f"ack/{wid}", "ok")
        log.info("worker %s joined (pid %s on %s)", wid, req["pid"], req["host"])

    def _declare_dead(self, wid: str, why: str, handed_off: bool = False) -> None:
        w = self.workers.get(wid)
        if w is None or w.state in ("dead", "left"):
            return
        was_active = w.state == "active"
        w.state = "left" if handed_off else "dead"
        log.warning("worker %s %s (%s)", wid, "left" if handed_off else "declared dead", why)
        if was_active and w.slot is not None:
            if not handed_off:
                self.failures += 1
            # When did it fail? The injector records its kills; otherwise the last sign of life.
            injected = P.get_json_or(self.store, f"injected/{wid}")
            failed_at = injected["t"] if injected else (time.time() if handed_off else w.hb_changed)
            self.pending_lost[w.slot] = {"detected_at": time.time(), "failed_at": failed_at, "handed_off": handed_off,
                                         "leaver": wid if handed_off else None, "why": why,
                                         "step": self.committed[w.slot[0]] + 1}
            del self.slots[w.slot]

    def _check_heartbeats(self) -> None:
        now = time.time()
        for w in list(self.workers.values()):
            if w.state not in ("active", "spare"):
                continue
            hb = int(self.store.add(f"hb/{w.wid}", 0))
            if hb != w.hb:
                w.hb, w.hb_changed = hb, now
            elif now - w.hb_changed > self.hb_timeout:
                self._declare_dead(w.wid, f"no heartbeat for {now - w.hb_changed:.1f}s")

    # --- generations ------------------------------------------------------------------------------
    def _maybe_publish(self) -> None:
        if self.suspend_gen is not None or (self.gen >= 0 and not self.pending_lost):
            return
        spares = [w for w in self.workers.values() if w.state == "spare"]
        if self.gen < 0:
            if len(spares) < self.R * self.S:
                return
            # Place over the whole starting fleet: wait for the expected spares too (briefly), or the
            # first R x S joiners, whatever machines they happen to be on, would decide the layout.
            expected = self.R * self.S + int(self.job["faults"].get("spares", 0))
            if self._full_since is None:
                self._full_since = time.time()
            if len(spares) < expected and time.time() - self._full_since < 3.0:
                return
            slots = [(r, s) for r in range(self.R) for s in range(self.S)]
            where = place(slots, self._pool_sizes(spares), self.S)
            pool = self._pool(spares)
            for slot in slots:
                self._assign(slot, pool[where[slot]].pop(0))
            report = recoverability_report(where, self.R, self.S, self.diloco, self.strategy,
                                           have_checkpoint=bool(self.job["recovery"].get("checkpoint_every"))
                                           or self.strategy == "checkpoint")
            log.info("placement: %s", report.summary)
            for entry in report.machines:
                log.info("  %s", entry["line"])
            self._event({"kind": "placement", "summary": report.summary,
                         "machines": {str(e["machine"]): e["verdict"] for e in report.machines}})
            rollback = None
            if self.resume_from is not None:
                rollback = {str(r): k for r, k in self.resume_from.items()}
                for r, k in self.resume_from.items():
                    self.committed[r] = k
                    P.put_json(self.store, f"committed/{r}", {"step": k, "total": None})
            self._publish({}, leavers=[], rollback=rollback)
            return
        if len(spares) < len(self.pending_lost):
            return  # wait for replacements (the launcher respawns spares; `kintsugi join` adds more)
        if time.time() - min(v["detected_at"] for v in self.pending_lost.values()) < self.settle_s:
            return
        lost = sorted(self.pending_lost)
        handed = {s for s, v in self.pending_lost.items() if v["handed_off"]}
        unsettled = {slot for slot, step in self.unsettled.items() if self.committed[slot[0]] < step}
        try:
            plans = plan_rebuilds(lost, self.R, self.S, self.strategy, handed_off=handed, diloco=self.diloco,
                                  have_checkpoint=self._have_checkpoint(), unsettled=unsettled)
        except Unrecoverable as e:
            self.error = str(e)
            log.error("cannot recover: %s", e)
            return
        # Replacements go where losing one machine still leaves the pipeline recoverable.
        alive = {slot: self.workers[wid].machine for slot, wid in self.slots.items()}
        where = place(lost, self._pool_sizes(spares), self.S, fixed=alive)
        pool = self._pool(spares)
        for slot in lost:
            self._assign(slot, pool[where[slot]].pop(0))
        leavers = [v["leaver"] for v in self.pending_lost.values() if v["leaver"]]
        rollback = None
        if any(p.tier == "checkpoint" for p in plans.values()):
            # Every slot restores the last complete checkpoint; the replicas resume after it.
            rollback = self.latest_checkpoint
            for r in range(self.R):
                self.committed[r] = rollback
                P.put_json(self.store, f"committed/{r}", {"step": rollback, "total": None})
        rebuild = {}
        for slot, plan in plans.items():
            info = self.pending_lost[slot]
            if plan.tier not in ("handoff", "peer"):
                self.unsettled[slot] = self.committed[slot[0]] + 1
            rebuild[f"{slot[0]},{slot[1]}"] = dict(plan.to_json(), detected_at=info["detected_at"],
                                                   failed_at=info["failed_at"],
                                                   step=info["step"], leaver=info["leaver"])
        self._publish(rebuild, leavers, rollback)
        self.pending_lost.clear()

    def _maybe_suspend(self) -> None:
        """Every slot's holder is leaving (Slurm's warning reaches every task; a whole fleet gets its
        notice) and no spare is free: no handoff can happen, so ask each holder to save its exact
        state as a checkpoint and stop. The job exits with EX_TEMPFAIL (75) and `train.resume`
        continues it; a batch script requeues on that code."""
        if self.gen < 0 or self.suspend_gen is not None:
            return
        holders: Dict[Slot, str] = dict(self.slots)
        for slot, v in self.pending_lost.items():
            if not v["handed_off"]:
                return  # a dead slot: the ordinary rebuild path decides
            holders[slot] = v["leaver"]
        if len(holders) < self.R * self.S or not all(self.workers[w].leaving for w in holders.values()):
            return
        if any(w.state == "spare" and not w.leaving for w in self.workers.values()):
            return  # someone can still take a handoff
        if self.layout != self.config_layout:
            os.makedirs(os.path.join(self.run_dir, "checkpoints"), exist_ok=True)
            with open(os.path.join(self.run_dir, "checkpoints", "layout.json"), "w") as f:
                json.dump({"layers_per_stage": self.layout}, f)
        self._put_plan(suspend=True, ranks={}, world_size=0, rebuild={}, leavers=[],
                       holders={f"{r},{s}": wid for (r, s), wid in holders.items()})
        self.suspend_gen = self.gen
        self.suspend_deadline = time.time() + max(60.0, 4 * self.hb_timeout)
        log.warning("generation %d: every worker is leaving and no spare is free; suspending the job "
                    "(each slot saves its committed state; continue with train.resume=%s)", self.gen,
                    os.path.abspath(self.run_dir))
        self._event({"kind": "suspend", "committed": dict(self.committed)})

    def _maybe_rebalance(self) -> None:
        """Every `rebalance_every` measured steps: if moving layers off the slowest stage predicts a
        step at least `rebalance_min_gain` shorter, publish a generation with the new layout (no
        rebuild in it; the stages hand layers to each other exactly, see Worker._relayout)."""
        if not self.rebalance or self.gen < 0 or self.pending_lost or self.suspend_gen is not None:
            return
        warm = 2 * self.R  # the first steps under a new layout build caches; skip them
        if len(self.stage_times) < warm + self.rebalance_every:
            return
        if max(self.committed.values()) >= self.max_steps - 2:
            return
        rows = self.stage_times[warm:]
        mean = [sum(r[s] for r in rows) / len(rows) for s in range(self.S)]
        self.stage_times = []
        counts, predicted = rebalance_layout(self.layout, mean)
        gain = max(mean) / max(predicted, 1e-12) - 1.0
        if counts == self.layout or gain < self.rebalance_min_gain:
            return
        prev, self.layout = self.layout, counts
        self.layout_gen = self.gen + 1
        log.warning("rebalancing: stage compute %s s -> layers per stage %s -> %s (predicted step %.0f%% faster)",
                    [round(t, 4) for t in mean], prev, counts, 100 * gain)
        self._event({"kind": "rebalance", "from": prev, "to": counts, "stage_compute_s": mean,
                     "predicted_gain": gain})
        self._publish({}, leavers=[], prev_layout=prev)

    def _suspend_done(self) -> bool:
        if self.suspend_gen is None:
            return False
        if len(self.suspended) == self.R * self.S:
            return True
        if time.time() > self.suspend_deadline:
            missing = sorted(set((r, s) for r in range(self.R) for s in range(self.S)) - set(self.suspended))
            self.error = f"suspend incomplete: slots {missing} did not save; resume falls back to an older checkpoint"
            return True
        return False

    @staticmethod
    def _pool(spares: List[WorkerInfo]) -> Dict[str, List[WorkerInfo]]:
        pool: Dict[str, List[WorkerInfo]] = {}
        for w in spares:
            pool.setdefault(w.machine, []).append(w)
        return pool

    def _pool_sizes(self, spares: List[WorkerInfo]) -> Dict[str, int]:
        return {m: len(ws) for m, ws in self._pool(spares).items()}

    def _assign(self, slot: Slot, w: WorkerInfo) -> None:
        w.state, w.slot = "active", slot
        self.slots[slot] = w.wid

    def _put_plan(self, **plan) -> None:
        """Publish the next generation: its plan first, then the number workers poll for."""
        self.gen += 1
        plan.update(gen=self.gen, committed={str(r): k for r, k in self.committed.items()},
                    published_at=time.time())
        P.put_json(self.store, f"gen/{self.gen}", plan)
        self.store.set("gen", str(self.gen))

    def _publish(self, rebuild: dict, leavers: List[str], rollback=None, prev_layout=None) -> None:
        ranks = {self.slots[(r, s)]: r * self.S + s for r in range(self.R) for s in range(self.S)}
        for j, wid in enumerate(leavers):  # leavers join the new group only to hand their state over
            ranks[wid] = self.R * self.S + j
        self._put_plan(slots={f"{r},{s}": wid for (r, s), wid in self.slots.items()}, ranks=ranks,
                       world_size=len(ranks), rebuild=rebuild, leavers=leavers, rollback=rollback,
                       layout=list(self.layout), prev_layout=prev_layout)
        if rebuild:
            log.warning("generation %d: rebuilding %s", self.gen,
                        ", ".join(f"slot {k} via {v['tier']}" for k, v in rebuild.items()))
        else:
            log.info("generation %d published (%d workers)", self.gen, len(ranks))

    def _have_checkpoint(self) -> bool:
        return self.latest_checkpoint is not None

    # --- metrics ----------------------------------------------------------------------------------
    def _event(self, ev: dict) -> None:
        ev = dict(ev, t=time.time() - self.t0)
        self.metrics_f.write(json.dumps({"event": ev}) + "\n")
        if self.tracker is not None:
            self.tracker.event(ev)

    def _drain_logs(self) -> None:
        for req in self.readers["join"].poll():
            self._on_join(req)
        for rep in self.readers["suspect"].poll():
            if rep["gen"] == self.gen and rep["peer_wid"] in self.workers:
                self._declare_dead(rep["peer_wid"], f"reported by {rep['reporter']}: {rep['why'][:80]}")
        for it in self.readers["intent"].poll():
            if it["wid"] in self.workers:
                self.workers[it["wid"]].leaving = True
        for sv in self.readers["suspended"].poll():
            self.suspended[tuple(sv["slot"])] = sv["step"]
        for lv in self.readers["leave"].poll():
            self._declare_dead(lv["wid"], lv.get("why", "leaving"), handed_off=True)
            if lv.get("machine"):
                # That machine is going away: its waiting spares get no slot (they leave too).
                for w in self.workers.values():
                    if w.machine == lv["machine"] and w.state == "spare":
                        w.state = "left"
        for c in self.readers["commit"].poll():
            r, k = c["replica"], c["step"]
            if k <= self.committed[r]:
                continue  # a retried step that had already committed
            self.committed[r] = k
            self.tokens += c.get("tokens", 0)
            if self.rebalance and c.get("stage_compute_s") and self.gen >= self.layout_gen:
                self.stage_times.append(c["stage_compute_s"])
            rec = dict(c, wall_s=time.time() - self.t0, gen=self.gen)
            self.metrics_f.write(json.dumps(rec) + "\n")
            if self.tracker is not None:
                self.tracker.commit(c)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{c['loss']:.3f}", tok_s=f"{self.tokens / (time.time() - self.t0):.0f}",
                                     gen=self.gen, refresh=False)
        for e in self.readers["eval"].poll():
            rec = dict(e, wall_s=time.time() - self.t0)
            self.metrics_f.write(json.dumps(rec) + "\n")
            if e.get("final"):
                self.final_val = e["val_loss"]
            if self.tracker is not None:
                self.tracker.evaluation(e)
            if self.bar is not None:
                self.bar.write(f"step {e['step']}: val_loss {e['val_loss']:.4f}")
        for c in self.readers["ckpt"].poll():
            self.ckpt_counts[c["step"]] = self.ckpt_counts.get(c["step"], 0) + 1
            if self.ckpt_counts[c["step"]] == self.R * self.S:
                self.latest_checkpoint = max(self.latest_checkpoint or -1, c["step"])
        for ev in self.readers["event"].poll():
            if ev.get("kind") == "rebuild":
                self.rebuilds.append({k: ev[k] for k in ("step", "slot", "tier", "detect_s", "recover_s")})
                if self.bar is not None:
                    self.bar.write(f"rebuilt slot {ev['slot']} via {ev['tier']} at step {ev['step']}: detected in "
                                   f"{ev['detect_s']:.3f}s, training again {ev['recover_s']:.2f}s after the failure")
            self._event(ev)

    def _bytes(self) -> Dict[str, int]:
        total: Dict[str, int] = {}
        for wid in self.workers:
            for ch, n in (P.get_json_or(self.store, f"bytes/{wid}", {}) or {}).items():
                total[ch] = total.get(ch, 0) + n
        return total

    def on_sigterm(self, *_):
        """A scheduler's SIGTERM (a time limit, scancel) usually reaches the workers too: keep serving
        a few seconds so they can announce leaving and the job suspends (exit 75); otherwise 143."""
        if self.terminating is None:
            self.terminating = time.time()
            log.warning("SIGTERM: waiting up to %.0fs for the workers to suspend", TERM_GRACE_S)

    def finished(self) -> bool:
        return all(k >= self.max_steps - 1 for k in self.committed.values()) and self.final_val is not None

    # --- main loop --------------------------------------------------------------------------------
    def serve(self, poll_s: float = 0.01) -> int:
        try:
            while True:
                self._drain_logs()
                if self.gen >= 0 and self.suspend_gen is None:
                    self._check_heartbeats()
                self._maybe_suspend()
                self._maybe_publish()
                self._maybe_rebalance()
                if self.error or self.finished() or self._suspend_done():
                    break
                if self.terminating and self.suspend_gen is None and time.time() - self.terminating > TERM_GRACE_S:
                    self.error = "terminated by SIGTERM"
                    self.exit_code = 128 + signal.SIGTERM
                    break
                time.sleep(poll_s)
        finally:
            self.store.set("shutdown", self.error or "ok")
            state = {"final_val_loss": self.final_val, "committed": self.committed, "rebuilds": self.rebuilds,
                     "failures": self.failures, "bytes": self._bytes(), "tokens": self.tokens,
                     "wall_s": time.time() - self.t0, "generations": self.gen + 1, "error": self.error,
                     "layout": self.layout, "layout_gen": self.layout_gen,
                     "suspended": ({f"{r},{s}": k for (r, s), k in sorted(self.suspended.items())}
                                   if self.suspend_gen is not None else None)}
            if self.tracker is not None:
                self.tracker.finish(state)
                state["wandb_live"] = True
            with open(os.path.join(self.run_dir, "coordinator_state.json"), "w") as f:
                json.dump(state, f, indent=1)
            if self.bar is not None:
                self.bar.close()
            self.metrics_f.close()
            time.sleep(1.0)  # let workers read `shutdown` before the store goes away
        if self.error:
            print(f"kintsugi: run stopped: {self.error}", file=sys.stderr)
            return self.exit_code
        if self.suspend_gen is not None:
            print(f"kintsugi: job suspended at step(s) {sorted(set(self.suspended.values()))}; continue with "
                  f"train.resume={os.path.abspath(self.run_dir)}", file=sys.stderr)
            return EX_SUSPENDED
        return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Kintsugi coordinator (hosts the store, owns membership). Launchers start it with --job; "
        "on a stable host for torchrun nodes and `kintsugi join`, start it with the job's Hydra overrides: "
        "python -m recovery.coordinator --port 29400 --run-dir outputs/run1 -- experiment=quick parallel.stages=4")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--job", default=None, help="job config JSON written by a launcher (or a run's job.json); "
                    "without it the job is composed from the overrides and the corpus prepared here")
    ap.add_argument("--outputs", action="store_true",
                    help="write summary.json and loss.png when the run ends (implied without --job)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for `kintsugi` (only without --job)")
    args = ap.parse_args(argv)
    if args.job and args.overrides:
        ap.error(f"pass either --job or overrides, not both (got {args.overrides[0]!r} with --job)")
    P.die_with_parent()
    logging.basicConfig(level=os.environ.get("KINTSUGI_LOG", "INFO"),
                        format="[coordinator] %(levelname)s %(message)s")
    corpus = None
    if args.job:
        with open(args.job) as f:
            job = json.load(f)
        progress = not args.no_progress
    else:
        # Standalone: this process is the only one that knows the whole job, so it prepares the
        # corpus (the token cache) and serves it; nodes and `kintsugi join` workers need nothing else.
        from trainer.config import ConfigError
        from trainer.torchrun import prepare_job
        try:
            job, corpus = prepare_job(args.overrides)
        except ConfigError as e:
            print(f"kintsugi coordinator: config error: {e}", file=sys.stderr)
            return 2
        progress = not args.no_progress and job["logger"]["progress"]
    token = P.resolve_token(job["recovery"].get("token", ""))
    # Anyone who reaches the store can read `job`: the token stays out of it (and out of job.json).
    job = dict(job, recovery=dict(job["recovery"], token=""))
    if not args.job:
        os.makedirs(args.run_dir, exist_ok=True)
        with open(os.path.join(args.run_dir, "job.json"), "w") as f:
            json.dump(job, f, indent=1)
    # Before the coordinator exists a SIGTERM just ends the process (143, not a success).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    t0 = time.time()
    coordinator = Coordinator(job, args.run_dir, args.port, args.host, token, progress=progress)
    signal.signal(signal.SIGTERM, coordinator.on_sigterm)
    if corpus is not None:  # before serve(): a worker reads it only after its join is acknowledged
        P.put_json(coordinator.store, "corpus", corpus)
        import socket
        log.info("job %r: %d x %d slots, waiting for workers at %s:%d (%s); run dir %s", job["name"],
                 job["parallel"]["replicas"], job["parallel"]["stages"], socket.gethostname(), args.port,
                 f"they need {P.TOKEN_ENV}" if token else "no token: any worker that reaches this port may join",
                 os.path.abspath(args.run_dir))
    rc = coordinator.serve()
    if args.outputs or not args.job:
        from trainer.config import JobConfig
        from trainer.outputs import write_outputs
        try:
            summary = write_outputs(args.run_dir, JobConfig.from_dict(job), time.time() - t0)
        except Exception as e:  # noqa: BLE001 - the run itself is over and recorded in metrics.jsonl
            log.warning("could not write the run's outputs: %s", e)
        else:
            if summary is not None:
                log.info("done: final val loss %s, %d steps, %d failures, %d rebuilds -> %s",
                         summary["final_val_loss"], summary["steps"], summary["failures"],
                         len(summary["rebuilds"]), args.run_dir)
    return rc


if __name__ == "__main__":
    sys.exit(main())
