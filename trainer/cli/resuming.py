"""`train.resume=RUN_DIR`, before any process starts and as the resumed run begins.

`check_resume` refuses, with one line naming both values and the fix, a job whose shape differs from
the one that wrote the checkpoints: another `parallel.stages` or `parallel.replicas`, another model
architecture, another layer layout. A checkpoint only loads into the slot layout that wrote it;
without this check the workers fail one by one loading layers they do not hold (and the launcher
replaces them without end). The run's `job.json` says what wrote it; the checkpoints themselves
(their slot folders and the `layer_ids` each slot saved) are checked too, so an older run without
`job.json` is judged the same way. It then tidies what a kill left in `checkpoints/`
(recovery.resume_points.clean_partial_writes): nothing else writes there at this point.

`resume_event` is the record of a resume in metrics.jsonl: the rows of steps after the resume
point that the earlier run recorded are `discarded` (they are trained again, as after an in-run
rollback), and steps up to the resume point that metrics.jsonl lacks are listed as `missing`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional

from kintsugi.parallel.topology import per_stage_layers
from kintsugi.recovery.checkpoint import checkpoint_path, is_complete
from kintsugi.recovery.resume_points import clean_partial_writes, grid_on_disk, saved_layer_ids
from kintsugi.recovery.runfiles import JOB, missing_steps, standing_commits

from kintsugi.trainer.config.errors import ConfigError
from kintsugi.trainer.config.job import JobConfig

log = logging.getLogger("kintsugi")
# What fixes the shape of every slot's state: parallel first (the usual mistake), then the model.
SHAPE_KEYS = ("parallel.stages", "parallel.replicas", "model.n_layers", "model.dim", "model.n_heads",
              "model.n_kv_heads", "model.vocab_size", "model.ffn_hidden", "model.multiple_of")


def _get(d: dict, key: str):
    group, name = key.split(".")
    return (d.get(group) or {}).get(name)


def _saved_job(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, JOB)) as f:
            saved = json.load(f)
    except (OSError, ValueError):  # an older run, or a damaged file: the checkpoints still tell
        return None
    return saved if isinstance(saved, dict) else None


def _layout(job: JobConfig, run_dir: str) -> List[int]:
    """Decoder layers per stage the resumed job will build (a rebalanced run's saved layout)."""
    try:
        with open(os.path.join(run_dir, "checkpoints", "layout.json")) as f:
            return list(json.load(f)["layers_per_stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return job.parallel.layers_per_stage


def check_resume(job: JobConfig, run_dir: str, tidy: bool = True) -> None:
    """Raise ConfigError (one line) when `job` cannot continue the checkpoints in `run_dir`; then
    (`tidy`: the one process of the job that does it) remove the partial writes a kill left there."""
    have = job.to_dict()
    saved = _saved_job(run_dir)
    if saved is not None:
        diff = [k for k in SHAPE_KEYS if _get(saved, k) is not None and _get(saved, k) != _get(have, k)]
        if diff:
            was = " ".join(f"{k}={_get(saved, k)}" for k in diff)
            now = " ".join(f"{k}={_get(have, k)}" for k in diff)
            raise ConfigError(f"train.resume={run_dir}: its checkpoints were written with {was} but this job has "
                              f"{now}; resume with {was} (a checkpoint only loads into the layout that wrote it), "
                              "or start a new run without train.resume")
    grid = grid_on_disk(run_dir)
    R, S = job.parallel.replicas, job.parallel.stages
    if grid is not None and (grid[0] > R or grid[1] > S):  # fewer can be a suspend that lost slots
        raise ConfigError(f"train.resume={run_dir}: its checkpoints hold slots of parallel.replicas={grid[0]} x "
                          f"parallel.stages={grid[1]} but this job has parallel.replicas={R} x parallel.stages={S}; "
                          f"resume with parallel.replicas={grid[0]} parallel.stages={grid[1]}")
    want = per_stage_layers(job.model.n_layers, S, _layout(job, run_dir))
    for s in range(S):
        ids = _newest_layer_ids(run_dir, s)
        if ids is not None and ids != list(want[s]):
            raise ConfigError(f"train.resume={run_dir}: stage {s} of its checkpoints holds decoder layers {ids} but "
                              f"this job puts layers {list(want[s])} there; resume with the model.n_layers, "
                              "parallel.stages and parallel.layers_per_stage that wrote them")
    if tidy:
        clean_partial_writes(run_dir)


def _newest_layer_ids(run_dir: str, stage: int) -> Optional[List[int]]:
    root = os.path.join(run_dir, "checkpoints")
    steps = sorted((int(n[5:]) for n in os.listdir(root) if n.startswith("step_") and n[5:].lstrip("-").isdigit()),
                   reverse=True) if os.path.isdir(root) else []
    for k in steps:
        path = checkpoint_path(run_dir, k, (0, stage))
        if is_complete(path):
            return saved_layer_ids(path)
    return None


def resume_event(run_dir: str, points: Dict[int, int]) -> dict:
    """The `resume` event for metrics.jsonl when replicas continue from `points` ({replica: step})."""
    standing, _ = standing_commits(run_dir)
    discarded = {str(r): sorted(row["step"] for row in standing if row["replica"] == r and row["step"] > k)
                 for r, k in sorted(points.items())}
    before = [row for row in standing if row["step"] <= points.get(row["replica"], -1)]
    gaps = {r: [k for k in steps if k <= points[r]] for r, steps in missing_steps(before).items() if r in points}
    gaps.update({r: list(range(k + 1)) for r, k in points.items()
                 if k >= 0 and not any(row["replica"] == r for row in before)})
    ev = {"kind": "resume", "step": {str(r): k for r, k in sorted(points.items())},
          "discarded": {r: ks for r, ks in discarded.items() if ks}}
    if any(gaps.values()):
        ev["missing"] = {str(r): ks for r, ks in sorted(gaps.items()) if ks}
        log.warning("metrics.jsonl lacks committed steps %s (recorded nowhere else); summary.json lists them as "
                    "missing", ev["missing"])
    return ev
