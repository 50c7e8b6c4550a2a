"""Chaos: seeded random fault schedules against real jobs, checked against invariants read from what
the run recorded, never from the code's own view.

Each case is a real `python -m trainer` run in its own process session. Its schedule mixes, at random
steps: SIGKILL / SIGSTOP / SIGTERM of slot holders, SIGCONT of whoever was stopped (a hung worker
that wakes up after it was replaced), kills of waiting spares, faults fired right after a rebuild
generation is published (while it forms), and SIGKILL / SIGSTOP of the coordinator. Grids: one
replica of 4 stages, and 2 x 2 under Streaming DiLoCo. From seed 10 on, most schedules also mix in
attacks from a client that reaches the coordinator's store without the token: the commit log's
counter wound back (by 5 or by 1000), the run id overwritten, a worker's own earlier heartbeats
written back, and a flood of 512 MB of values nobody asked for.

Invariants (each case), read from what the run recorded (metrics.jsonl, coordinator_state.json, and
the launcher's faults.json: every event scheduled, injected, never fired):
- the run completes (exit 0), or stops because a loss is unrecoverable (exit 3 with the coordinator's
  error naming it: every copy lost at once), or suspends because the spares ran out (exit 75, every
  held slot saved, no error), never for another reason: never a hang (bounded wall
  time), never exit 0 after a failure it did not mend;
- every scheduled fault fired (a completed run; an event due at or after a coordinator fault may be
  overtaken, since the workers train on while it is away and the launcher sees steps through it:
  such events are listed as `overtaken`; a flood that restarts the coordinator's store counts as a
  coordinator fault here), and at least one failure was counted per worker
  killed or stopped;
- every step of every replica is committed exactly once (a duplicate commit record is kept and
  marked, so it would show), on the batches of that replica's shard for that step;
- a run in which no worker was hit (only the coordinator or spares) trains bit for bit as the
  failure-free run; a completed run's final validation loss is at most 5 % above the failure-free
  run's (same config) when every rebuild was exact (handoff, peer, checkpoint). When a schedule destroyed every exact copy of
  a stage (e.g. both replicas' holders of stage 1), the stage is rebuilt approximately (CheckFree /
  CheckFree+ from its neighbours, logged as such; with one replica every rebuild is of this kind):
  such a case is counted as `approximate`, its loss difference is reported, and it is held only to
  a sanity bound of 25 % (no divergence). An approximate stage 7 steps into a 16-step run of a tiny
  model can cost more than 5 %; that is the price of having lost every copy, not a bug;
- no process of the job outlives it;
- an attack that reached the store is counted in the run's `tampering` (a rewind as `rewound`, a
  run id as `overwritten`, a flood as `flood`; a replayed beat only when the coordinator read it
  before the worker's next beat, so it is not required) and changes nothing above.

    python -m benchmarks.chaos --seeds 50 [--first 0]

Prints one JSON line: cases run, passed, and every broken invariant with its seed and schedule.
`tests/chaos/` runs a few seeds in the default test run; the rest under `-m slow`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Dict, List, Optional

from kintsugi.benchmarks._runs import REPORT_DIR, ROOT, read_metrics
from kintsugi.recovery.runfiles import EX_SUSPENDED, FAULTS, FINAL_STATE

GRIDS = {
    "r1": ["parallel.replicas=1", "parallel.stages=4"],
    "r2": ["parallel.replicas=2", "parallel.stages=2", "model.n_layers=4", "diloco.enabled=true",
           "diloco.sync_every=4", "diloco.fragments=2", "diloco.quant=fp4"],
}
COMMON = ["experiment=quick", "train.eval_batches=1", "train.eval_every=0", "faults=none", "faults.spares=1",
          "logger=quiet", "recovery.heartbeat_timeout_s=2.0", "recovery.progress_timeout_s=20",
          "recovery.spare_wait_s=60", "recovery.embedding_copy_every=2"]
STEPS = 16
ATTACKS = ("rewind", "run_id", "replay", "flood")
ATTACKS_FROM_SEED = 10   # seeds 0-9 keep their schedules (and the defaults their meaning)
COUNTED_AS = {"rewind": "rewound", "run_id": "overwritten", "flood": "flood"}
FLOOD_CHECK_S = 5.0      # the flood guard looks every 2 s; a run that ends sooner after a flood may not see it
UNRECOVERABLE = ("cannot be rebuilt", "lost together")  # tiers.Unrecoverable: every copy gone at once
LOSS_TOL = 0.05          # exact rebuilds only
APPROX_LOSS_TOL = 0.25   # a stage rebuilt from its neighbours: a sanity bound (no divergence), reported
EXACT_TIERS = ("handoff", "peer", "checkpoint")
CASE_TIMEOUT_S = 300.0


def schedule(seed: int) -> Dict:
    """A seeded case: grid and fault list."""
    rng = random.Random(seed)
    grid = "r1" if seed % 2 == 0 else "r2"
    R, S = (1, 4) if grid == "r1" else (2, 2)
    events: List[dict] = []
    stopped = False
    for _ in range(rng.choice((2, 3, 3, 4))):
        step = rng.randint(2, STEPS - 4)
        roll = rng.random()
        if roll < 0.12:
            events.append({"step": step, "target": "coordinator", "kind": rng.choice(("kill", "kill", "stop"))})
            continue
        if roll < 0.2:
            events.append({"step": step, "target": "spare", "kind": "kill"})
            continue
        if roll < 0.28 and stopped:
            events.append({"step": step, "kind": "cont", "target": "stopped"})
            continue
        kind = rng.choice(("kill", "kill", "kill", "stop", "term"))
        stopped = stopped or kind == "stop"
        ev = {"step": step, "replica": rng.randrange(R), "stage": rng.randrange(S), "kind": kind}
        if rng.random() < 0.3:
            ev["on"] = "rebuild"
            if rng.random() < 0.5:
                ev["delay_s"] = round(rng.uniform(0.0, 0.8), 2)
        events.append(ev)
    attacks: List[dict] = []
    if seed >= ATTACKS_FROM_SEED and rng.random() < 0.75:
        for _ in range(rng.choice((1, 2, 2, 3))):
            attacks.append({"step": rng.randint(2, STEPS - 3), "attack": rng.choice(ATTACKS)})
    return {"seed": seed, "grid": grid, "replicas": R, "stages": S, "events": sorted(events, key=lambda e: e["step"]),
            "attacks": sorted(attacks, key=lambda a: a["step"])}


# The run's token, known here only to name the keys an eavesdropper on the store's (unencrypted)
# traffic would see (a replayed beat needs its key); the attacks never seal anything with it.
TOKEN = "ch40s-" + "5eed" * 6


class Attacker(threading.Thread):
    """A store client without the token, firing a case's attacks as the run's committed steps reach
    them. The coordinator may be stopped, dead or restarting at that moment: an attack that cannot
    reach a store within a few seconds is listed as not delivered, never retried into a later state."""

    def __init__(self, run_dir: str, attacks: List[dict], proc: subprocess.Popen):
        super().__init__(daemon=True, name="chaos-attacker")
        self.run_dir, self.attacks, self.proc = run_dir, attacks, proc
        self.delivered: List[dict] = []  # each attack as fired (a flood: how much it wrote, cut short or not)
        self.undelivered: List[dict] = []

    def _steps(self) -> int:
        try:
            with open(os.path.join(self.run_dir, "metrics.jsonl")) as f:
                return f.read().count('"loss"')
        except OSError:
            return 0

    def _store(self):
        import torch.distributed as dist
        port = (_json(os.path.join(self.run_dir, "control_state.json")) or {}).get("port")
        if port is None:
            raise RuntimeError("no port yet")
        return dist.TCPStore("127.0.0.1", int(port), is_master=False, timeout=timedelta(seconds=5),
                             wait_for_workers=False, use_libuv=True)

    def run(self) -> None:
        for i, a in enumerate(self.attacks):
            while self._steps() < a["step"]:
                if self.proc.poll() is not None:
                    self.undelivered += [dict(x, why="the run ended first") for x in self.attacks[i:]]
                    return
                time.sleep(0.05)
            try:
                self.delivered.append(dict(a, **(self._fire(a) or {})))
            except Exception as e:  # noqa: BLE001 - the store away (a coordinator fault): recorded
                self.undelivered.append(dict(a, why=str(e).splitlines()[0][:120] if str(e) else type(e).__name__))

    def _fire(self, a: dict) -> Optional[dict]:
        store = self._store()
        kind = a["attack"]
        if kind == "rewind":
            store.add("commit/n", -5 if a["step"] % 2 else -1000)
        elif kind == "run_id":
            store.set("run_id", "forged")
        elif kind == "replay":  # a live worker's own earlier beats written back while it beats on
            from kintsugi.recovery import protocol as P
            from kintsugi.recovery.auth import Auth
            run_id = json.loads(store.get("run_id"))["run_id"]   # readable by anyone
            sniffed = Auth(TOKEN, run_id)   # for the key names only, as seen on the wire
            workers = [k for k in (P.beat_key(sniffed, f"w{i}") for i in range(8)) if store.check([k])]
            if not workers:
                raise RuntimeError("no heartbeat to replay")
            key = workers[a["step"] % len(workers)]
            beats = []
            t_end = time.monotonic() + 1.5
            while time.monotonic() < t_end:
                v = store.get(key)
                if not beats or v != beats[-1]:
                    beats.append(v)
                time.sleep(0.02)
            for _ in range(3):
                for v in beats[:-1]:
                    store.set(key, v)
                    time.sleep(0.02)
        elif kind == "flood":
            chunk = b"\x00" * (8 << 20)
            for i in range(64):
                try:
                    store.set(f"junk/{a['step']}/{i}", chunk)
                except RuntimeError:  # the flood guard restarted the store under us (the aim), or the run ended
                    return {"written_mb": 8 * i, "cut": True}
            return {"written_mb": 512, "cut": False, "done_at": time.monotonic()}
        return None


def _override(events: List[dict]) -> str:
    items = []
    for e in events:
        items.append("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}")
    return "faults.schedule=[" + ", ".join(items) + "]"


def _session_alive(sid: int) -> List[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(pid))
    return out


def run_case(case: Dict, out_dir: str, baseline: Optional[float] = None) -> Dict:
    run_dir = os.path.join(out_dir, f"seed{case['seed']}")
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", *COMMON, *GRIDS[case["grid"]],
           f"train.max_steps={STEPS}"]
    if case["events"]:
        cmd.append(_override(case["events"]))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KINTSUGI_TOKEN=TOKEN)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    attacker = Attacker(run_dir, case.get("attacks") or [], proc)
    if attacker.attacks:
        attacker.start()
    try:
        _, err = proc.communicate(timeout=CASE_TIMEOUT_S)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        hung = True
    ended_at = time.monotonic()
    wall = ended_at - t0
    with open(run_dir.rstrip("/") + ".stderr.log", "w") as f:
        f.write(err)
    time.sleep(1.0)
    leftover = _session_alive(proc.pid)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    broken: List[str] = []
    rc = proc.returncode
    last = [l for l in err.splitlines() if l.strip()][-1:] or [""]
    state = _json(os.path.join(run_dir, FINAL_STATE)) or {}
    if hung:
        broken.append(f"hung: no end within {CASE_TIMEOUT_S:.0f}s")
    elif rc == 3:
        # The one legitimate stop: every copy of what a rebuild needs was lost at once.
        if not any(why in str(state.get("error")) for why in UNRECOVERABLE):
            broken.append(f"stopped (exit 3) for a reason that is not an unrecoverable loss: {state.get('error')!r}"
                          f" / {last[0][:200]}")
    elif rc == EX_SUSPENDED:
        # The schedule used up the spares: the job suspends, every held slot saved (a resume continues).
        if state.get("error") or not state.get("suspended"):
            broken.append(f"suspended (exit 75) without every slot saved: {state.get('error')!r}")
    elif rc != 0:
        broken.append(f"exit code {rc}: {last[0][:200]}")
    if leftover:
        broken.append(f"{len(leftover)} process(es) outlived the job")
    completed = rc == 0 and not hung
    faults = _json(os.path.join(run_dir, FAULTS))
    hit, overtaken = [], []
    if attacker.attacks:
        attacker.join(timeout=30)
    commits, evals, events = read_metrics(run_dir)
    rebuilds = [ev for ev in events if ev.get("kind") == "rebuild"]
    if faults is None:
        broken.append(f"no {FAULTS}: what was injected is unknown")
    else:
        # The workers train on while the coordinator is stopped or dead, and the launcher sees steps
        # through it: an event due at or after a coordinator fault can be overtaken by the run's end.
        # Any other event that never fired means the schedule was not what the run went through.
        # A flood that reached the store restarts the coordinator the same way (its flood guard).
        down = min([e["step"] for e in faults["injected"] if e.get("target") == "coordinator"] +
                   [a["step"] for a in attacker.delivered if a["attack"] == "flood"], default=None)
        # An `on: rebuild` event that reached its step when no later generation rebuilt anything
        # had nothing to fire on (the launcher marks it; the run's own rebuild records must agree).
        overtaken = [e for e in faults["not_fired"]
                     if (down is not None and e["step"] >= down) or
                     (e.get("waited_for_rebuild") and not any(r.get("step", -1) > e["step"] for r in rebuilds))]
        missed = [e for e in faults["not_fired"] if e not in overtaken]
        if completed and missed:
            broken.append(f"scheduled faults never fired: {missed}")
        hit = [e for e in faults["injected"] if e.get("kind") in ("kill", "stop", "term")
               and e.get("target") not in ("coordinator", "spare", "stopped")]
        failed = [e for e in hit if e["kind"] != "term"]
        if completed and state.get("failures", 0) < len(failed):
            broken.append(f"{len(failed)} workers killed or stopped, {state.get('failures')} failures counted")
    tampering = state.get("tampering") or {}
    for a in attacker.delivered:
        kind = COUNTED_AS.get(a["attack"])
        if a.get("cut"):  # cut short by the guard's restart or by the run's end: either may be
            continue
        if ended_at - a.get("done_at", ended_at) < FLOOD_CHECK_S:  # the run ended before the guard looked
            continue
        if completed and kind is not None and not tampering.get(kind):
            broken.append(f"attack {a} reached the store but no '{kind}' tampering was counted ({tampering})")
    approximate = any(r.get("tier") not in EXACT_TIERS for r in rebuilds)
    broken += check_records(commits, case["replicas"], completed=completed)
    final = next((e["val_loss"] for e in evals if e.get("final")), None)
    if completed:
        if final is None:
            broken.append("completed without a final validation loss")
        elif baseline is not None and not hit and faults is not None:
            # No worker was touched (only the coordinator or spares): training is bit for bit the same.
            if _losses(commits) != baseline["losses"] or final != baseline["final"]:
                broken.append("no worker was hit, yet the losses differ from the failure-free run's")
        elif baseline is not None:
            tol = APPROX_LOSS_TOL if approximate else LOSS_TOL
            # No worse than the failure-free run by more than `tol`. A lower loss is reported, not
            # failed: one validation batch of a 16-step run moves by several percent when a peer
            # rebuild hands a replica another replica's state (seed 37: -6.4 %).
            if final - baseline["final"] > tol * baseline["final"]:
                broken.append(f"final val loss {final:.4f} is more than {tol:.0%} above the failure-free "
                              f"{baseline['final']:.4f}" + (" (approximate rebuild)" if approximate else ""))
    rel = (round((final - baseline["final"]) / baseline["final"], 4) if final is not None and baseline else None)
    return {"seed": case["seed"], "grid": case["grid"], "events": case["events"], "rc": rc, "wall_s": round(wall, 1),
            "final_val_loss": final, "rebuilds": [(r["tier"], r["slot"]) for r in rebuilds],
            "approximate": approximate, "loss_rel_diff": rel, "workers_hit": len(hit),
            "overtaken": overtaken, "attacks": attacker.delivered, "attacks_undelivered": attacker.undelivered,
            "tampering": tampering,
            "broken": broken, "passed": not broken, "losses": _losses(commits)}


def _json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _losses(commits: List[dict]) -> Dict[str, float]:
    """The committed loss of every (replica, step), as the failure-free run is compared with."""
    return {f"{c['replica']},{c['step']}": c.get("loss") for c in commits if not c.get("duplicate")}


def check_records(commits: List[dict], replicas: int, completed: bool) -> List[str]:
    """Exactly once, on the right batches (observed: stage 0 reports the ids it consumed)."""
    from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
    from kintsugi.trainer.data.batches import ShardedBatches, load_tokens
    broken = []
    dup = [c for c in commits if c.get("duplicate")]
    if dup:
        broken.append(f"steps committed twice: {sorted({(c['replica'], c['step']) for c in dup})}")
    corpus = prepare_corpus(DataConfig(max_files=300))
    tokens = load_tokens(corpus.train_path, corpus.dtype)
    for r in range(replicas):
        steps = sorted(c["step"] for c in commits if c.get("replica") == r and not c.get("duplicate"))
        if len(steps) != len(set(steps)):
            broken.append(f"replica {r}: a step recorded twice")
        top = max(steps) + 1 if steps else 0
        want = STEPS if completed else top
        if steps != list(range(want)):
            missing = sorted(set(range(want)) - set(steps))
            broken.append(f"replica {r}: steps missing {missing[:10]}")
        data = ShardedBatches(tokens, 128, 16, r, replicas, 0)
        # Every record carries the ids the replica's stage 0 read (stated in the commit's sum, so a
        # record relayed by another stage or written by a data-parallel root has them too).
        wrong = [c["step"] for c in commits if c.get("replica") == r and c.get("batch_ids") != data.batch_ids(c["step"])]
        if wrong:
            broken.append(f"replica {r}: steps {wrong[:10]} trained on the wrong batches")
    return broken


def baselines(out_dir: str, grids=GRIDS) -> Dict[str, dict]:
    """The failure-free run of each grid in `grids`: its final validation loss and every committed
    loss. A baseline that does not pass is an error, never a silently skipped comparison."""
    out = {}
    for grid in grids:
        res = run_case({"seed": f"baseline-{grid}", "grid": grid, "replicas": 1 if grid == "r1" else 2, "events": []},
                       out_dir)
        if not res["passed"] or res["final_val_loss"] is None:
            raise RuntimeError(f"the failure-free {grid} run failed: {res['broken']}")
        out[grid] = {"final": res["final_val_loss"], "losses": res["losses"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--only", type=int, nargs="*", help="run these seeds only")
    args = ap.parse_args(argv)
    out_dir = os.path.join(REPORT_DIR, "chaos")
    os.makedirs(out_dir, exist_ok=True)
    base = baselines(out_dir)
    cases = []
    for seed in (args.only or range(args.first, args.first + args.seeds)):
        case = schedule(seed)
        res = run_case(case, out_dir, base[case["grid"]])
        cases.append(res)
        print(f"[chaos] seed {seed} {case['grid']} {'ok' if res['passed'] else 'BROKEN'} {res['wall_s']}s "
              f"{res['broken']}", file=sys.stderr, flush=True)
    failed = [c for c in cases if not c["passed"]]
    approx = [c for c in cases if c["approximate"]]
    print(json.dumps({"benchmark": "chaos", "cases": len(cases), "passed": len(cases) - len(failed),
                      "approximate_cases": len(approx),
                      "loss_rel_diff_exact": sorted(c["loss_rel_diff"] for c in cases
                                                    if not c["approximate"] and c["loss_rel_diff"] is not None),
                      "loss_rel_diff_approximate": sorted(c["loss_rel_diff"] for c in approx
                                                          if c["loss_rel_diff"] is not None),
                      "baseline_val_loss": {g: b["final"] for g, b in base.items()}, "broken": [{k: c[k] for k in ("seed", "grid", "events", "rc", "broken")}
                                                           for c in failed],
                      "wall_s": round(sum(c["wall_s"] for c in cases), 1)}))
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
