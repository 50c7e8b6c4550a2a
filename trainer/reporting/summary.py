"""Run outputs: `summary.json` (keys in DESIGN.md; strict JSON, non-finite numbers as null),
`loss.png`, and the wandb run.

Built after the run from `metrics.jsonl` (written live by the coordinator) and the coordinator's
final state, so a worker dying mid-run cannot lose them.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional

from kintsugi.recovery.records import write_strict_atomic

from kintsugi.trainer.config.job import JobConfig
from kintsugi.recovery.runfiles import FINAL_STATE, SUMMARY, missing_steps, read_metrics, standing_commits

log = logging.getLogger("kintsugi.outputs")


def param_count(job: JobConfig) -> int:
    m = job.model
    hd = m.dim // m.n_heads
    ffn = m.ffn_hidden or (m.multiple_of * ((int(2 * 4 * m.dim / 3) + m.multiple_of - 1) // m.multiple_of))
    per_layer = m.dim * m.dim * 2 + 2 * m.dim * m.n_kv_heads * hd + 3 * m.dim * ffn + 2 * m.dim
    return m.n_layers * per_layer + 2 * m.vocab_size * m.dim + m.dim


def write_outputs(run_dir: str, job: JobConfig, wall_s: float) -> Optional[dict]:
    state_path = os.path.join(run_dir, FINAL_STATE)
    if not os.path.exists(state_path):
        return None
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:  # cut short by a full disk: no summary, the exit code says why
        log.error("cannot read %s (%s); no summary.json", state_path, e)
        return None
    commits, evals, events = read_metrics(run_dir)
    # Rows a rollback or a resume undid (their steps were trained again) are kept in metrics.jsonl
    # as the record of lost work, but counted once: the standing rows say what the run trained.
    standing, undone = standing_commits(run_dir)
    by_channel: Dict[str, int] = state.get("bytes", {})
    # Each (replica, step) once: a duplicate is marked as such, a step trained again after a
    # rollback or a resume counts once (its standing row). Steps are how far every replica trained,
    # tokens what metrics.jsonl holds; a committed step it lacks is named (missing_steps), never counted.
    last = {(int(c["replica"]), int(c["step"])): c for c in standing}
    per_replica: Dict[int, List[int]] = {r: [] for r in range(job.parallel.replicas)}
    for r, k in last:
        per_replica.setdefault(r, []).append(k)
    steps = min((max(v) + 1 if v else 0 for v in per_replica.values()), default=0)  # trained; holes: missing
    if state.get("write_error"):  # metrics.jsonl has a gap: the coordinator's own count stands
        steps = max([steps] + [int(k) + 1 for k in (state.get("committed") or {}).values()])
    # What per-step data-parallel all-reduce of fp32 gradients would have sent (ring: 2(R-1)/R x size
    # per replica per step), for comparison with the outer syncs.
    R = job.parallel.replicas
    dp_equiv = int(2 * (R - 1) / R * param_count(job) * 4 * steps * R) if R > 1 else 0
    tokens = sum(c.get("tokens", 0) for c in last.values())
    missing = {str(r): ks for r, ks in missing_steps(standing).items()}
    for r, v in (state.get("missing_steps") or {}).items():
        missing[r] = sorted(set(missing.get(r, [])) | set(v))
    if state.get("write_error"):  # metrics.jsonl has a gap: the coordinator counted every commit
        tokens = max(tokens, int(state.get("tokens") or 0))
    summary = {
        "final_val_loss": state.get("final_val_loss"),
        "steps": steps,
        "tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / max(state.get("wall_s", wall_s), 1e-9),
        "failures": state.get("failures", 0),
        "rebuilds": state.get("rebuilds", []),
        "bytes": {"p2p": sum(v for k, v in by_channel.items() if k.startswith("p2p")),
                  "p2p_activations": by_channel.get("p2p", 0), "p2p_gradients": by_channel.get("p2p_grad", 0),
                  "outer_sync": by_channel.get("outer_sync", 0),
                  "data_parallel": by_channel.get("data_parallel", 0),
                  "rebuild": by_channel.get("rebuild", 0),
                  "data_parallel_equivalent": dp_equiv},
        "slowest_stage": _slowest_stage([c for c in commits
                                        if c.get("layout_version", 0) == state.get("layout_version", 0)], job,
                                        state.get("layout")),
        "generations": state.get("generations"),
        "discarded_steps": len(undone),
        # Committed steps metrics.jsonl does not hold (a record lost with a coordinator): the exit
        # code is then 74, never 0.
        "missing_steps": missing or None,
        "nonfinite_steps": state.get("nonfinite_steps", 0),
        "divergences": state.get("divergences", 0),
        "forged_records_dropped": state.get("forged_records_dropped", 0),
        "checkpoint_errors": state.get("checkpoint_errors"),
        "memory": state.get("memory"),
        "write_error": state.get("write_error"),
        "persist_error": state.get("persist_error"),
        "final_errors": state.get("final_errors"),
        "error": state.get("error"),
        "config": dict(job.public_dict(), **_where_it_ran(events)),
    }
    try:
        # Whole or not at all (a full disk once left a summary cut at 4 KiB); a NaN loss becomes null.
        write_strict_atomic(os.path.join(run_dir, SUMMARY), summary, indent=1)
    except OSError as e:  # disk full: the caller still reports the run (and its exit code shows it)
        log.error("cannot write summary.json (%s)", e)
        summary["write_error"] = summary["write_error"] or f"summary.json: {e}"
    try:
        plot_loss(os.path.join(run_dir, "loss.png"), commits, evals, summary["rebuilds"])
    except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
        log.warning("could not draw loss.png: %s", e)
    if not state.get("wandb_live"):  # the coordinator did not track the run live: log it now
        log_wandb(job, run_dir, commits, evals, summary)
    return summary


def _where_it_ran(events: List[dict]) -> dict:
    """`device` ("cuda:0 NVIDIA H100 80GB HBM3", "cpu") and `kernels` ({"cpu": ..., "cuda": ...}) the
    slots ran with, from the workers' `device` events: the value when every slot agrees, else the
    distinct values (a GPU stage rebuilt on a CPU spare); None when no worker said."""
    def agreed(values):
        distinct = {json.dumps(v, sort_keys=True): v for v in values}
        if not distinct:
            return None
        return next(iter(distinct.values())) if len(distinct) == 1 else [distinct[k] for k in sorted(distinct)]
    placed = [e for e in events if isinstance(e, dict) and e.get("kind") == "device"]
    return {"device": agreed(e.get("device") for e in placed), "kernels": agreed(e.get("kernels") for e in placed)}


def _slowest_stage(commits: List[dict], job: JobConfig, layout: Optional[List[int]] = None) -> Optional[dict]:
    """Mean compute time per stage (excluding time blocked on receives) and the stage that sets the
    pipeline's pace, with a rebalancing suggestion for parallel.layers_per_stage."""
    rows = [c["stage_compute_s"] for c in commits if c.get("stage_compute_s")]
    if not rows:
        return None
    mean = [sum(r[s] for r in rows) / len(rows) for s in range(len(rows[0]))]
    slowest = max(range(len(mean)), key=mean.__getitem__)
    from kintsugi.parallel.topology import per_stage_layers
    from kintsugi.recovery.placement import rebalance
    counts = layout or [len(x) for x in per_stage_layers(job.model.n_layers, job.parallel.stages,
                                                         job.parallel.layers_per_stage)]
    return {"stage": slowest, "compute_s": mean[slowest], "per_stage_compute_s": mean, "layers_per_stage": counts,
            "suggested_layers_per_stage": rebalance(counts, mean)}


def plot_loss(path: str, commits: List[dict], evals: List[dict], rebuilds: List[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, xkey, xlabel in ((axes[0], "step", "step"), (axes[1], "wall_s", "wall-clock (s)")):
        for r in sorted({c["replica"] for c in commits}):
            pts = [c for c in commits if c["replica"] == r]
            ax.plot([c[xkey] for c in pts], [c["loss"] for c in pts], lw=0.8, label=f"train (replica {r})")
        if evals:
            ax.plot([e[xkey] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
        if xkey == "step":
            for rb in rebuilds:
                ax.axvline(rb["step"], color="red", ls=":", lw=0.8)
                ax.text(rb["step"], ax.get_ylim()[1], rb["tier"], rotation=90, va="top", fontsize=7, color="red")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_wandb(job: JobConfig, run_dir: str, commits, evals, summary) -> None:
    mode = job.logger.wandb.mode
    if mode == "disabled":
        return
    try:
        import wandb
    except ImportError:
        log.warning("logger.wandb.mode=%s but wandb is not installed; skipping", mode)
        return
    run = wandb.init(project=job.logger.wandb.project, mode=mode, dir=run_dir, config=job.public_dict(),
                     tags=list(job.logger.wandb.tags), name=os.path.basename(os.path.normpath(run_dir)),
                     reinit=True)
    ev = {e["step"]: e for e in evals}
    for c in sorted((c for c in commits if c["replica"] == 0), key=lambda c: c["step"]):
        row = {"train/loss": c["loss"], "train/grad_norm": c["grad_norm"], "train/lr": c["lr"]}
        if c["step"] + 1 in ev:
            row["val/loss"] = ev[c["step"] + 1]["val_loss"]
        run.log(row, step=c["step"])
    for rb in summary["rebuilds"]:
        run.log({"rebuild/tier": rb["tier"], "rebuild/recover_s": rb["recover_s"]}, step=rb["step"])
    run.summary.update({k: v for k, v in summary.items() if k not in ("config", "rebuilds")})
    run.finish()
