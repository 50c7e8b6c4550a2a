"""Claim (CheckFree, arXiv 2506.15461): once a network is trained and its stages specialised,
rebuilding a lost stage from its neighbours beats the alternatives a user has -- re-initialising
it (random), copying a neighbour (copy), a plain average, rolling back to a checkpoint -- and the
loss jump after a failure is ordered random >> copy > average >= checkfree; at a 10 %/hour failure
rate CheckFree+ needs ~1.45x and checkpointing ~2.45x the failure-free iterations to a target loss.

Every run is a real `python -m trainer` job (launcher, coordinator, one process per stage, spares),
failures are real SIGKILLs sent by the launcher, rebuilds are the strategies' own. On this machine:

1. **Pretraining** (no failures) until the loss has flattened: `pre_steps` steps of the tiny model
   (1.6M parameters, 4 stages) with constant learning rate after warm-up (`train.min_lr_ratio=1`, as
   in the paper), ending in a checkpoint. Twice: with the plain microbatch routes, and with
   CheckFree+'s swapped routes (CheckFree+ trains its end stages to stand in for each other from the
   start; its reference is its own). The validation curve of the pretraining is reported, with its
   relative drop over the last quarter (how flat it is).
2. **Single failures on the trained network** (`base`): each run resumes the pretrained checkpoint
   (`train.resume`, exact) and trains `post_steps` more steps; per seed one intermediate stage (1 or
   2, which every strategy rebuilds by its own rule) is killed at a seeded step in the first third.
   Every strategy sees the same failure per seed, and the no-failure continuation (same batches) is
   the reference. Per run:
   - `jump`: mean training loss of the first J=3 commits after the failure minus the reference's
     loss on the same steps (same batches, so only the weights differ);
   - `steps_to_recover`: commits received after the failure (a rollback's re-done steps count) before
     the run is back on the reference curve: at a step >= the failed one, with the mean excess over
     the reference on W=5 consecutive commits <= `TOL` (1 %) of the reference's loss;
   - `steps_to_half_jump`: commits until that mean excess over W commits is down to half the jump
     (how fast it heals where it does not get all the way back within the run);
   - `excess_last`: the mean excess over the reference on the last 10 commits (did it stay there);
   - `wall_to_recover_s`: seconds from the kill to that commit (detection, rebuild, restore, re-done
     steps);
   - `final_val_ratio`: final validation loss / the reference's.
   The checkpoint baseline checkpoints every `checkpoint_every` steps from the resumed step on (real
   asynchronous writes with manifests and fsync, as the periodic checkpoints always are) and rolls
   every stage back to the last complete one; its save and restore cost is in its wall-clock.
3. **Failure rates** (`rates`): the paper's 5 / 10 / 16 %/hour, on every stage, seeded (`faults.seed`)
   so every strategy sees the same failures. At the paper's 90 s steps they give 0.1-0.4 % per
   stage-step, too few for a short run, so the hourly rates are converted with
   `faults.step_time_s=343.3` instead: p per stage-step = 1 - (1 - rate)^(343.3/3600) =
   0.49 / 1.00 / 1.65 %. Target: the reference's final validation loss. Per run: iterations (commits,
   re-done ones included) and wall-clock seconds after the resume until an evaluation reaches it
   (interpolated between evaluations), as ratios to the reference's own; a run that does not reach
   it within `cap` x post_steps is censored (reported as `>cap`).

Each cell has several seeds; the tables give the median and the spread (min, max). One figure:
training loss against wall-clock per strategy with the failures marked (seed 0 of the base part),
and validation loss against wall-clock at 10 %/hour.

    python -m benchmarks.checkfree_convergence --quick   # pretrain 400 steps, base part only
    python -m benchmarks.checkfree_convergence           # pretrain 1200 steps, base + rates

Prints one JSON line (per strategy: median steps to recover and final loss ratio, first); the runs,
result.json and convergence.png go to outputs/benchmarks/checkfree_convergence[_quick]/.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from kintsugi.benchmarks._runs import (REPORT_DIR, RunResult, commits_of, coordinator_t0, final_eval_seen, rebuilds_of,
                              rnd, run_job_retrying, schedule_override)

log = logging.getLogger("benchmarks.checkfree_convergence")
STRATEGIES = ("random", "copy", "average", "checkfree", "checkfree_plus", "checkpoint")
STEP_TIME_S = 343.3   # converts 10 %/hour to p = 1.00 % per stage-step
JUMP = 3              # commits averaged for the loss jump
WINDOW = 5            # consecutive commits that must be back on the reference curve
TOL = 0.01            # ... within this fraction of the reference's loss
PAPER = {"fig2_perplexity_after_10k": {"random": 121, "copy": 29.2, "checkfree": 22.6},
         "table2_iterations_ratio": {"5%": {"checkfree_plus": 1.4, "checkfree": 1.45, "checkpoint": 2.2},
                                     "10%": {"checkfree_plus": 1.45, "checkfree": 1.6, "checkpoint": 2.45},
                                     "16%": {"checkfree_plus": 1.8, "checkfree": 2.2, "checkpoint": 2.5}}}


@dataclass
class Plan:
    pre_steps: int                   # pretraining, no failures
    post_steps: int                  # after the pretrained checkpoint (the reference's length)
    seeds: Tuple[int, ...]           # base part: one seeded failure each
    rates: Tuple[float, ...]         # per hour, the paper's
    rate_cells: Tuple[Tuple[float, str], ...]  # (rate, strategy) pairs run at every rate seed
    rate_seeds: Tuple[int, ...]
    cap: float                       # rate runs stop at cap x post_steps
    eval_every: int
    eval_batches: int
    checkpoint_every: int
    pre_eval_every: int = 50
    strategies: Tuple[str, ...] = STRATEGIES  # the base part's


def plan_for(quick: bool) -> Plan:
    if quick:
        return Plan(pre_steps=400, post_steps=30, seeds=(0, 1, 2), rates=(), rate_cells=(), rate_seeds=(),
                    cap=2.0, eval_every=10, eval_batches=8, checkpoint_every=10)
    paper_trio = ("checkfree_plus", "checkfree", "checkpoint")
    cells = tuple((rate, s) for rate in (0.05, 0.10, 0.16) for s in paper_trio)
    cells += tuple((0.10, s) for s in ("random", "copy", "average"))
    return Plan(pre_steps=1200, post_steps=60, seeds=(0, 1, 2), rates=(0.05, 0.10, 0.16), rate_cells=cells,
                rate_seeds=(0, 1, 2), cap=2.5, eval_every=10, eval_batches=8, checkpoint_every=10)


def common_overrides(plan: Plan, max_steps: int, eval_every: int) -> List[str]:
    return [f"train.max_steps={max_steps}", f"train.eval_every={eval_every}", f"train.eval_batches={plan.eval_batches}",
            "train.min_lr_ratio=1.0", "train.seed=0", "faults.spares=2"]


def strategy_overrides(plan: Plan, strategy: str) -> List[str]:
    extra = [f"recovery.checkpoint_every={plan.checkpoint_every}"] if strategy == "checkpoint" else []
    return [f"recovery.strategy={strategy}", *extra]


def routes_of(strategy: str) -> str:
    """Which pretrained network and reference a strategy uses: CheckFree+ trains with swapped routes."""
    return "plus" if strategy == "checkfree_plus" else "plain"


def base_failure(plan: Plan, seed: int) -> dict:
    """The seed's one failure: an intermediate stage, at a step in the first third after the resume."""
    rng = random.Random(1000 + seed)
    lo = max(JUMP + 2, plan.post_steps // 8)
    return {"step": plan.pre_steps + rng.randint(lo, max(lo, plan.post_steps // 3)), "replica": 0,
            "stage": rng.choice([1, 2]), "kind": "kill"}


# --- reading runs ------------------------------------------------------------------------------------
def first_loss_by_step(result: RunResult) -> Dict[int, float]:
    out: Dict[int, float] = {}
    for c in commits_of(result):
        out.setdefault(c["step"], c["loss"])
    return out


def failures_of(result: RunResult) -> List[dict]:
    """Each injected failure as (step, stage, t on the coordinator's clock), from the rebuild events
    (`failed_at` is when the launcher sent the signal). One per failed slot, first rebuild only. The
    failed step is the one after the newest commit before the signal (a rollback's rebuild event
    names the step after the checkpoint instead)."""
    t0 = coordinator_t0(result.events)
    out, seen = [], set()
    commits = commits_of(result)
    for ev in rebuilds_of(result):
        key = (ev["failed_at"], tuple(ev["slot"]))
        if key in seen or t0 is None:
            continue
        seen.add(key)
        t = ev["failed_at"] - t0
        done = [c["step"] for c in commits if c["wall_s"] < t]
        out.append({"step": max(done) + 1 if done else ev["step"], "stage": ev["slot"][1], "tier": ev["tier"],
                    "t": t})
    return sorted(out, key=lambda f: f["t"])


def start_wall(result: RunResult) -> Optional[float]:
    """The coordinator time of the first commit after the resume: wall-clock is counted from here,
    so start-up and restore of the pretrained checkpoint (the same for every strategy) drop out."""
    cs = commits_of(result)
    return cs[0]["wall_s"] if cs else None


def recovery_of(result: RunResult, ref: Dict[int, float], failure: dict) -> dict:
    """Loss jump, steps and seconds to get back on the reference curve after `failure`."""
    after = [c for c in commits_of(result) if c["wall_s"] >= failure["t"]]
    out = {"step": failure["step"], "stage": failure["stage"], "tier": failure["tier"]}
    if len(after) < JUMP or not all(c["step"] in ref for c in after[:JUMP]):
        return dict(out, error="too few commits after the failure")
    out["jump"] = rnd(sum(c["loss"] - ref[c["step"]] for c in after[:JUMP]) / JUMP)
    tail = [c for c in after if c["step"] in ref][-10:]
    out["excess_last"] = rnd(sum(c["loss"] - ref[c["step"]] for c in tail) / len(tail))
    for i in range(len(after) - WINDOW + 1):
        win = after[i:i + WINDOW]
        if win[0]["step"] < failure["step"] or not all(c["step"] in ref for c in win):
            continue
        excess = sum(c["loss"] - ref[c["step"]] for c in win) / WINDOW
        if "steps_to_half_jump" not in out and excess <= out["jump"] / 2:
            out["steps_to_half_jump"] = i
        if excess <= TOL * sum(ref[c["step"]] for c in win) / WINDOW:
            return dict(out, steps_to_recover=i, wall_to_recover_s=rnd(win[0]["wall_s"] - failure["t"], 2))
    return dict(out, steps_to_recover=None, censored_after=len(after))


def final_val(result: RunResult) -> Optional[float]:
    fin = [e["val_loss"] for e in result.evals if e.get("final")]
    return fin[-1] if fin else None


def to_target(result: RunResult, target: float) -> Tuple[Optional[float], Optional[float]]:
    """(iterations, wall seconds) after the resume when the validation loss first reaches `target`,
    interpolated between evaluations; iterations count commits received (re-done steps too)."""
    t_start = start_wall(result)
    commit_times = sorted(c["wall_s"] for c in commits_of(result))
    prev = None
    for e in sorted(result.evals, key=lambda e: e["wall_s"]):
        point = (sum(1 for t in commit_times if t <= e["wall_s"]), e["wall_s"] - t_start, e["val_loss"])
        if e["val_loss"] <= target:
            if prev is None or prev[2] <= e["val_loss"]:
                return float(point[0]), point[1]
            frac = (prev[2] - target) / (prev[2] - e["val_loss"])
            return prev[0] + frac * (point[0] - prev[0]), prev[1] + frac * (point[1] - prev[1])
        prev = point
    return None, None


def spread(xs: Sequence[Optional[float]], censored_as=None) -> dict:
    """Median and range over seeds; a censored value (None) counts as +infinity for the median."""
    have = sorted(x for x in xs if x is not None)
    n_cens = len(xs) - len(have)
    if not xs:
        return {}
    out = {"n": len(xs), "censored": n_cens} if n_cens else {"n": len(xs)}
    if len(have) * 2 > len(xs) or (len(have) * 2 == len(xs) and n_cens == 0):
        vals = have + [float("inf")] * n_cens
        med = statistics.median(vals)
        out["median"] = rnd(med, 3) if med != float("inf") else censored_as
    else:
        out["median"] = censored_as
    if have:
        out["min"], out["max"] = rnd(have[0], 3), rnd(have[-1], 3)
    return out


# --- the experiment ---------------------------------------------------------------------------------
def run_one(name: str, run_dir: str, overrides: List[str], **kw) -> RunResult:
    kw.setdefault("stop_when_evals", final_eval_seen)
    t0 = time.time()
    res = run_job_retrying(name, run_dir, overrides, stall_s=90.0, **kw)
    log.info("%s: %s in %.0fs (%d commits, %d rebuilds)", name, "ok" if res.ok else res.error,
             time.time() - t0, len(res.commits), len(rebuilds_of(res)))
    return res


def pretrain(plan: Plan, out_dir: str, routes: str, reuse: bool) -> Tuple[str, dict]:
    """The trained network: a no-failure run ending in a checkpoint of step pre_steps - 1."""
    strategy = "checkfree_plus" if routes == "plus" else "checkfree"
    run_dir = os.path.join(out_dir.rstrip("/") + "_pretrained", f"{routes}-{plan.pre_steps}")
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{plan.pre_steps - 1}")
    info_path = os.path.join(run_dir, "pretrain.json")
    if reuse and os.path.isdir(ckpt) and os.path.exists(info_path):
        with open(info_path) as f:
            return run_dir, dict(json.load(f), reused=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    res = run_one(f"pretrain-{routes}", run_dir, common_overrides(plan, plan.pre_steps, plan.pre_eval_every)
                  + [f"recovery.strategy={strategy}", f"recovery.checkpoint_every={plan.pre_steps}"],
                  stop_when_evals=None, timeout_s=3600.0)
    if not res.ok or not os.path.isdir(ckpt):
        raise SystemExit(f"benchmarks.checkfree_convergence: pretraining ({routes}) failed: {res.error} "
                         f"(see {run_dir}.stderr.log)")
    curve = [(e["step"], rnd(e["val_loss"])) for e in sorted(res.evals, key=lambda e: e["step"])]
    last_q = [v for s, v in curve if s >= 0.75 * plan.pre_steps]
    info = {"steps": plan.pre_steps, "wall_s": rnd(res.wall_s, 1), "val_curve": curve,
            "final_val_loss": curve[-1][1] if curve else None,
            "drop_over_last_quarter": rnd((last_q[0] - last_q[-1]) / last_q[0], 4) if len(last_q) > 1 else None}
    with open(info_path, "w") as f:
        json.dump(info, f)
    return run_dir, dict(info, reused=False)


# --rescore: read the runs already in the output folder instead of running them again (except those
# named in RERUN), and score them with this code.
RESCORE = False
RERUN: set = set()


def load_run(name: str, run_dir: str) -> RunResult:
    """A run already on disk, as `run_one` would have returned it (wall_s: its last commit's time)."""
    from kintsugi.benchmarks._runs import read_metrics
    c, e, ev = read_metrics(run_dir)
    return RunResult(name, run_dir, 0, c[-1]["wall_s"] if c else 0.0, None, None, c, e, ev)


def resumed(name: str, out_dir: str, pre_dir: str, plan: Plan, overrides: List[str], **kw) -> RunResult:
    """A run that continues the pretrained checkpoint in a run directory of its own."""
    run_dir = os.path.join(out_dir, name)
    if RESCORE and name not in RERUN:
        res = load_run(name, run_dir)
        if not res.commits:
            raise SystemExit(f"benchmarks.checkfree_convergence --rescore: {run_dir} holds no run; run the benchmark first")
        return res
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    src = os.path.join(pre_dir, "checkpoints", f"step_{plan.pre_steps - 1}")
    shutil.copytree(src, os.path.join(run_dir, "checkpoints", os.path.basename(src)))
    return run_one(name, run_dir, [*overrides, f"train.resume={run_dir}"], **kw)


def scheduled_failures(overrides: List[str], after: int) -> List[dict]:
    """The launcher's own seeded schedule for these overrides (what every strategy sees), from `after`."""
    from kintsugi.benchmarks._runs import BASE_OVERRIDES
    from kintsugi.trainer.cli.compose import compose_job
    from kintsugi.trainer.config.faults import fault_events
    job, _ = compose_job([*BASE_OVERRIDES, *overrides])
    return [e for e in fault_events(job) if e["step"] >= after]


def run(plan: Plan, out_dir: str, reuse: bool) -> Tuple[dict, Dict[str, RunResult]]:
    if not RESCORE:
        shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    runs: Dict[str, RunResult] = {}
    end = plan.pre_steps + plan.post_steps
    pre, pre_info, refs, ref_loss, ref_final, ref_to, ref_len = {}, {}, {}, {}, {}, {}, {}
    needed = {routes_of(s) for s in plan.strategies} | {routes_of(s) for _, s in plan.rate_cells}
    for routes in [r for r in ("plain", "plus") if r in needed]:
        pre[routes], pre_info[routes] = pretrain(plan, out_dir, routes, reuse)
        strategy = "checkfree_plus" if routes == "plus" else "checkfree"
        ref = runs[f"reference-{routes}"] = resumed(f"reference-{routes}", out_dir, pre[routes], plan,
                                                    common_overrides(plan, end, plan.eval_every)
                                                    + [f"recovery.strategy={strategy}"])
        if not ref.ok or final_val(ref) is None:
            raise SystemExit(f"benchmarks.checkfree_convergence: the no-failure reference ({routes}) failed: {ref.error}")
        refs[routes], ref_loss[routes], ref_final[routes] = ref, first_loss_by_step(ref), final_val(ref)
        ref_to[routes] = to_target(ref, ref_final[routes])
        ref_len[routes] = commits_of(ref)[-1]["wall_s"] - start_wall(ref)

    # Single failures on the trained network.
    base: Dict[str, List[dict]] = {s: [] for s in plan.strategies}
    for seed in plan.seeds:
        kill = base_failure(plan, seed)
        for strategy in plan.strategies:
            routes = routes_of(strategy)
            name = f"base-s{seed}-{strategy}"
            res = runs[name] = resumed(name, out_dir, pre[routes], plan,
                                       common_overrides(plan, end, plan.eval_every) + strategy_overrides(plan, strategy)
                                       + [schedule_override([kill])])
            row = {"seed": seed, "kill": [kill["step"], kill["stage"]], "wall_s": rnd(res.wall_s, 1)}
            fails = failures_of(res)
            if res.error:
                row["error"] = res.error
            if len(fails) != 1:
                row["failures_seen"] = [[f["step"], f["stage"]] for f in fails]
            if fails:
                row.update(recovery_of(res, ref_loss[routes], fails[0]))
            fv = final_val(res)
            row["final_val_ratio"] = rnd(fv / ref_final[routes], 4) if fv is not None else None
            base[strategy].append(row)

    base_summary = {}
    for strategy, rows in base.items():
        steps = [r.get("steps_to_recover") for r in rows]
        base_summary[strategy] = {
            "steps_to_recover": spread(steps, censored_as=f">{plan.post_steps}"),
            "wall_to_recover_s": spread([r.get("wall_to_recover_s") for r in rows], censored_as="censored"),
            "steps_to_half_jump": spread([r.get("steps_to_half_jump") for r in rows], censored_as="censored"),
            "jump": spread([r.get("jump") for r in rows]),
            "excess_last": spread([r.get("excess_last") for r in rows]),
            "final_val_ratio": spread([r.get("final_val_ratio") for r in rows]),
            "errors": [r["error"] for r in rows if r.get("error")] or None}

    # Failure rates: seeded failures on every stage; stop at the reference's final validation loss.
    rates_out: Dict[str, dict] = {}
    max_steps = plan.pre_steps + int(round(plan.cap * plan.post_steps))
    for rate, strategy in plan.rate_cells:
        routes = routes_of(strategy)
        target = ref_final[routes]
        ref_iters, ref_wall = ref_to[routes]
        rows = []
        for seed in plan.rate_seeds:
            fault_cfg = [f"faults.rate_per_hour={rate}", f"faults.step_time_s={STEP_TIME_S}", f"faults.seed={seed}"]
            cfg = common_overrides(plan, max_steps, plan.eval_every) + fault_cfg
            schedule = scheduled_failures(cfg, plan.pre_steps)
            name = f"rate{int(rate * 100)}-s{seed}-{strategy}"
            res = runs[name] = resumed(name, out_dir, pre[routes], plan, cfg + strategy_overrides(plan, strategy),
                                       stop_when_evals=lambda evals, tgt=target: final_eval_seen(evals) or any(
                                           e["val_loss"] <= tgt for e in evals))
            iters, wall = to_target(res, target)
            last = sorted(res.evals, key=lambda e: e["wall_s"])[-1]["val_loss"] if res.evals else None
            row = {"seed": seed, "failures_scheduled": [[e["step"], e["stage"]] for e in schedule
                                                        if e["step"] < max_steps],
                   "failures_seen": len(failures_of(res)), "wall_s": rnd(res.wall_s, 1),
                   "extra_iterations": rnd(iters - ref_iters, 1) if iters is not None else None,
                   "extra_wall_s": rnd(wall - ref_wall, 2) if wall is not None else None,
                   # the no-failure run's own cost is its whole length: post_steps, ref_len_s
                   "iterations_ratio": rnd(1 + (iters - ref_iters) / plan.post_steps, 3) if iters is not None else None,
                   "wall_ratio": rnd(1 + (wall - ref_wall) / ref_len[routes], 3) if wall is not None else None,
                   "last_val_ratio": rnd(last / target, 4) if last is not None else None}
            if res.error:
                row["error"] = res.error
            rows.append(row)
        rates_out.setdefault(f"{int(rate * 100)}%/h", {})[strategy] = {
            "iterations_ratio": spread([r["iterations_ratio"] for r in rows], censored_as=f">{plan.cap}"),
            "wall_ratio": spread([r["wall_ratio"] for r in rows], censored_as=f">{plan.cap}"),
            "last_val_ratio": spread([r["last_val_ratio"] for r in rows]),
            "runs": rows}

    result = {
        "benchmark": "checkfree_convergence",
        "per_strategy": {s: {"median_steps_to_recover": v["steps_to_recover"].get("median"),
                             "median_steps_to_half_jump": v["steps_to_half_jump"].get("median"),
                             "median_final_val_ratio": v["final_val_ratio"].get("median"),
                             "median_jump": v["jump"].get("median")} for s, v in base_summary.items()},
        "ordering_by_median_jump": ordering(base_summary, "jump"),
        "base": base_summary, "base_runs": base, "rates": rates_out,
        "pretrain": pre_info,
        "reference": {r: {"final_val_loss": rnd(ref_final[r]), "iterations_to_target": rnd(ref_to[r][0], 1),
                          "wall_to_target_s": rnd(ref_to[r][1], 2), "wall_s": rnd(refs[r].wall_s, 1),
                          "post_steps_wall_s": rnd(ref_len[r], 2)}
                      for r in refs},
        "paper": PAPER,
        "config": dict(asdict(plan), model="tiny (1.6M parameters, dim 128, 8 layers)", stages=4, batch_size=16,
                       microbatches=4, seq_len=128, lr="3e-3, constant after 20 warm-up steps", jump_commits=JUMP,
                       window=WINDOW, tol=TOL, **{"faults.step_time_s": STEP_TIME_S, "faults.spares": 2}),
        "runs_dir": os.path.relpath(out_dir),
    }
    return result, runs


def ordering(summary: Dict[str, dict], key: str) -> List[str]:
    """Strategies from the largest to the smallest median of `key` (those without one left out)."""
    have = [(v[key]["median"], k) for k, v in summary.items() if isinstance(v[key].get("median"), (int, float))]
    return [k for _, k in sorted(have, reverse=True)]


# --- the figure --------------------------------------------------------------------------------------
def plot(result: dict, runs: Dict[str, RunResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(("reference", *STRATEGIES), ("black", "tab:red", "tab:orange", "tab:olive", "tab:blue",
                                                    "tab:green", "tab:purple")))
    rate_names = [n for n in runs if n.startswith("rate10-s0-")]
    panels = 3 if rate_names else 2
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 5), squeeze=False)
    ax = axes[0][0]
    seed = result["config"]["seeds"][0]
    refs = {r: first_loss_by_step(runs[f"reference-{r}"]) for r in ("plain", "plus") if f"reference-{r}" in runs}
    for name, res in runs.items():  # the excess over the no-failure run on the same batches
        strategy = name.replace(f"base-s{seed}-", "")
        if not name.startswith(f"base-s{seed}-") or routes_of(strategy) not in refs or not res.commits:
            continue
        ref, t0 = refs[routes_of(strategy)], start_wall(res)
        cs = [c for c in commits_of(res) if c["step"] in ref]
        ex = [c["loss"] - ref[c["step"]] for c in cs]
        smooth = [sum(ex[max(0, i - 4):i + 1]) / len(ex[max(0, i - 4):i + 1]) for i in range(len(ex))]
        axes[0][1].plot([c["wall_s"] - t0 for c in cs], smooth, lw=1.2, color=colours.get(strategy, "grey"),
                        label=strategy)
        for f in failures_of(res):
            axes[0][1].axvline(f["t"] - t0, color=colours.get(strategy, "grey"), ls=":", lw=1)
    axes[0][1].axhline(0, color="black", lw=0.6)
    axes[0][1].set(title="excess over the no-failure run on the same batches (5-commit mean)",
                   xlabel="seconds since the first step after the pretrained checkpoint", ylabel="excess loss")
    axes[0][1].legend(fontsize=8)
    for name, res in runs.items():
        label = name.replace(f"base-s{seed}-", "")
        if not (name.startswith(f"base-s{seed}-") or name.startswith("reference-")) or not res.commits:
            continue
        t0 = start_wall(res)
        cs = commits_of(res)
        smooth = [sum(c["loss"] for c in cs[max(0, i - 4):i + 1]) / len(cs[max(0, i - 4):i + 1]) for i in range(len(cs))]
        colour = colours.get(label.split("-")[0], "grey")
        style = "--" if name == "reference-plus" else "-"
        label = "reference, CheckFree+ routes" if name == "reference-plus" else label
        ax.plot([c["wall_s"] - t0 for c in cs], smooth, lw=1.2, color=colour, ls=style, label=label)
        for f in failures_of(res):
            ax.axvline(f["t"] - t0, color=colour, ls=":", lw=1)
    ax.set(title=f"one failure on the trained network (seed {seed}): training loss, 5-commit mean",
           xlabel="seconds since the first step after the pretrained checkpoint", ylabel="training loss")
    ax.legend(fontsize=8)
    if rate_names:
        ax = axes[0][2]
        for name in ["reference-plain", *rate_names]:
            res = runs[name]
            if not res.evals:
                continue
            t0 = start_wall(res)
            label = name.replace("rate10-s0-", "")
            colour = colours.get(label.split("-")[0], "grey")
            ev = sorted(res.evals, key=lambda e: e["wall_s"])
            ax.plot([e["wall_s"] - t0 for e in ev], [e["val_loss"] for e in ev], marker=".", lw=1.2, color=colour,
                    label=label)
            for f in failures_of(res):
                ax.axvline(f["t"] - t0, color=colour, ls=":", lw=0.8)
        ax.axhline(result["reference"]["plain"]["final_val_loss"], color="black", lw=0.6)
        ax.set(title="10 %/hour on every stage (seed 0): validation loss; dotted = failures",
               xlabel="seconds since the first step after the pretrained checkpoint", ylabel="validation loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict) -> str:
    """The tables BENCHMARKS.md shows, from a result.json."""
    def cell(d, digits=3):
        if not d or d.get("median") is None:
            return "-"
        if d.get("censored") == d["n"]:
            return f"not within the run ({d['n']}/{d['n']})"
        med = d["median"]
        txt = f"{med:.{digits}f}" if isinstance(med, float) else str(med)
        if "min" in d and d["min"] != d["max"]:
            txt += f" ({d['min']:.{digits}f} .. {d['max']:.{digits}f})"
        if d.get("censored"):
            txt += f", {d['censored']}/{d['n']} censored"
        return txt

    lines = ["| strategy | loss jump | steps to half the jump | steps back on the curve (1 %) | "
             "seconds back on the curve | excess, last 10 commits | final val / no-failure |",
             "|---|---|---|---|---|---|---|"]
    for s, v in result["base"].items():
        lines.append(f"| {s} | {cell(v['jump'])} | {cell(v.get('steps_to_half_jump'), 0)} | "
                     f"{cell(v['steps_to_recover'], 0)} | {cell(v['wall_to_recover_s'], 2)} | "
                     f"{cell(v['excess_last'])} | {cell(v['final_val_ratio'])} |")
    if result.get("rates"):
        lines += ["", "| rate | strategy | iterations to target / no-failure | wall-clock to target / no-failure | "
                  "last val / target (at the cap) | failures seen per seed |", "|---|---|---|---|---|---|"]
        for rate, per in result["rates"].items():
            for s, v in per.items():
                seen = ", ".join(str(r["failures_seen"]) for r in v["runs"])
                lines.append(f"| {rate} | {s} | {cell(v['iterations_ratio'])} | {cell(v['wall_ratio'])} | "
                             f"{cell(v.get('last_val_ratio'))} | {seen} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pretrain 400 steps; single failures only (3 seeds)")
    p.add_argument("--reuse-pretrained", action="store_true",
                   help="reuse a finished pretraining of the same length from an earlier run")
    p.add_argument("--replot", action="store_true",
                   help="only redraw convergence.png from the runs and result.json already in the output folder")
    p.add_argument("--rescore", action="store_true",
                   help="score the runs already in the output folder again (nothing is re-run but --rerun)")
    p.add_argument("--rerun", default="", help="with --rescore: runs to do again, e.g. reference-plain,reference-plus")
    p.add_argument("--markdown", action="store_true", help="only print the tables of the result.json in the output folder")
    p.add_argument("--pre-steps", type=int, help="override the pretraining length (a smoke run)")
    p.add_argument("--post-steps", type=int, help="override the steps after the pretrained checkpoint")
    p.add_argument("--seeds", type=int, help="override the number of seeds of the base part")
    p.add_argument("--strategies", help="override the base part's strategies (comma-separated)")
    p.add_argument("--out", help="where the runs go (default outputs/benchmarks/checkfree_convergence[_quick])")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    t0 = time.time()
    plan = plan_for(a.quick)
    if a.pre_steps:
        plan.pre_steps, plan.pre_eval_every = a.pre_steps, max(1, a.pre_steps // 4)
    if a.post_steps:
        plan.post_steps = a.post_steps
    if a.seeds:
        plan.seeds = tuple(range(a.seeds))
    if a.strategies:
        unknown = set(a.strategies.split(",")) - set(STRATEGIES)
        if unknown:
            p.error(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
        plan.strategies = tuple(a.strategies.split(","))
    out_dir = a.out or os.path.join(REPORT_DIR, "checkfree_convergence" + ("_quick" if a.quick else ""))
    if a.markdown:
        with open(os.path.join(out_dir, "result.json")) as f:
            print(markdown(json.load(f)))
        return
    if a.replot:
        with open(os.path.join(out_dir, "result.json")) as f:
            result = json.load(f)
        runs = {name: load_run(name, os.path.join(out_dir, name)) for name in sorted(os.listdir(out_dir))
                if os.path.isdir(os.path.join(out_dir, name))}
        plot(result, runs, os.path.join(out_dir, "convergence.png"))
        return
    global RESCORE, RERUN
    RESCORE, RERUN = a.rescore, set(filter(None, a.rerun.split(",")))
    result, runs = run(plan, out_dir, a.reuse_pretrained or a.rescore)
    if a.rescore:
        result["rescored"] = {"at": time.strftime("%Y-%m-%d %H:%M"), "rerun": sorted(RERUN)}
    result["mode"] = "quick" if a.quick else "full"
    result["wall_s"] = round(time.time() - t0, 1)
    try:
        plot(result, runs, os.path.join(out_dir, "convergence.png"))
        result["plot"] = os.path.relpath(os.path.join(out_dir, "convergence.png"))
    except Exception as e:  # noqa: BLE001 - the figures matter more than the picture
        log.warning("could not draw the plot: %s", e)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
