"""What `train.resume` finds in a run directory's `checkpoints/`: the step each replica continues
from, the shape of the job that wrote them, and the partial writes a kill left behind.

- `find_resume_points` / `resume_points`: per replica, the newest step whose every stage verifies.
- `grid_on_disk` and `saved_layer_ids`: how many replicas and stages wrote checkpoints, and which
  decoder layers a slot holds (its `layer_ids`, read from `tree.json` alone), so a resume with
  another `parallel.stages`, replica count or layout is refused before any worker tries to load a
  state that does not fit it.
- `clean_partial_writes`: a write is a private `<slot>.tmp-*` directory renamed into place; a
  replaced one is moved aside as `<slot>.old-*` and deleted after. A kill between those steps leaves
  them. At resume nothing writes, so each is either the only copy of its slot (it verifies and the
  slot itself is missing: it is put back in place) or garbage (deleted). `checkpoint.prune` deletes
  stale ones while a run trains.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Dict, List, Optional, Tuple

from . import packages
from .checkpoint import CheckpointCorrupt, TREE, checkpoint_path, read_tree, steps_on_disk, verify

log = logging.getLogger("kintsugi.checkpoint")
_ANY_STEP = re.compile(r"^step_(-?\d+)$")  # step_-1: the initial state, written before step 0
_SLOT = re.compile(r"^r(\d+)s(\d+)$")
_PARTIAL = re.compile(r"^(r\d+s\d+)\.(tmp|old)-")


def find_resume_points(run_dir: str, replicas: int, stages: int) -> Tuple[Optional[Dict[int, int]], List[Tuple[str, str]]]:
    """(per replica, the newest step whose checkpoint every stage of that replica wrote and that
    verifies -- None unless every replica has one; the checkpoints passed over, as (path, reason)).
    Newer steps a replica has no slot of at all are not candidates for it (replicas may differ
    after a suspend: each commits on its own), so they are not reported."""
    points: Dict[int, int] = {}
    rejected: List[Tuple[str, str]] = []
    steps = steps_on_disk(run_dir)
    for r in range(replicas):
        for step in sorted(steps, reverse=True):
            names = steps[step]
            if not any(n == f"r{r}s{s}" or n.startswith(f"r{r}s{s}.tmp-") for s in range(stages) for n in names):
                continue
            bad = []
            for s in range(stages):
                path = checkpoint_path(run_dir, step, (r, s))
                try:
                    verify(path)
                except CheckpointCorrupt as e:
                    bad.append((path, f"{e.file}: {e.reason}"))
            if not bad:
                points[r] = step
                break
            rejected += bad
    return (points if len(points) == replicas else None), rejected


def resume_points(run_dir: str, replicas: int, stages: int) -> Optional[Dict[int, int]]:
    """Per replica, the newest step whose checkpoint every stage of that replica completed and that
    verifies; None unless every replica has one. A newer checkpoint that fails verification is
    skipped with a warning naming it (`find_resume_points` returns them for a caller to report)."""
    points, rejected = find_resume_points(run_dir, replicas, stages)
    for path, reason in rejected:
        log.warning("checkpoint %s is not usable, resuming from an older step: %s", path, reason)
    return points


def _step_dirs(run_dir: str) -> Dict[int, str]:
    root = os.path.join(run_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return {int(m.group(1)): os.path.join(root, n) for n in names if (m := _ANY_STEP.match(n))}


def grid_on_disk(run_dir: str) -> Optional[Tuple[int, int]]:
    """(replicas, stages) of the job that wrote the checkpoints: the largest replica and stage
    index of any slot directory, plus one; None when there is no slot at all."""
    slots = [(int(m.group(1)), int(m.group(2))) for d in _step_dirs(run_dir).values()
             for n in os.listdir(d) if (m := _SLOT.match(n))]
    if not slots:
        return None
    return max(r for r, _ in slots) + 1, max(s for _, s in slots) + 1


def saved_layer_ids(path: str) -> Optional[List[int]]:
    """The decoder layers the slot checkpoint at `path` holds, from its verified `tree.json` only;
    None if the checkpoint is incomplete or predates `layer_ids`."""
    try:
        tree = read_tree(path).tree
    except CheckpointCorrupt:
        return None
    entries = tree.get("d") if isinstance(tree, dict) else None
    for pair in entries if isinstance(entries, list) else []:
        if isinstance(pair, list) and len(pair) == 2 and pair[0] == "layer_ids":
            try:  # a plain list of ints: no tensor to fill
                ids = packages.decode(packages.Header(pair[1], [], 0), lambda spec, dst: None)
            except packages.PackageError:
                return None
            return [int(i) for i in ids] if isinstance(ids, list) else None
    return None


def clean_partial_writes(run_dir: str, stale_s: float = 60.0) -> Tuple[List[str], List[str]]:
    """At resume: put back a partial slot directory that verifies where its slot is missing (the
    previous copy moved aside, or a finished write, that a kill left unrenamed); delete the other
    ones untouched for `stale_s` (a younger one may be a write still going on: a job resumed while
    the old one still runs must not lose its checkpoint). Returns (restored slot paths, deleted)."""
    restored, deleted = [], []
    for step_dir in _step_dirs(run_dir).values():
        partials = sorted(n for n in os.listdir(step_dir) if _PARTIAL.match(n))
        # A finished write (.tmp) is newer than the copy it was replacing (.old): try it first.
        for name in sorted(partials, key=lambda n: ".tmp-" not in n):
            slot = _PARTIAL.match(name).group(1)
            path, target = os.path.join(step_dir, name), os.path.join(step_dir, slot)
            if not os.path.exists(target) and os.path.exists(os.path.join(path, TREE)):
                try:
                    verify(path)
                    os.rename(path, target)
                    restored.append(target)
                    log.warning("checkpoint %s: put back from %s, which a killed write left", target, name)
                    continue
                except (CheckpointCorrupt, OSError):
                    pass
            if _age(path) > stale_s:
                shutil.rmtree(path, ignore_errors=True)
                deleted.append(path)
    if deleted:
        log.info("removed %d partial checkpoint directories left by killed writes", len(deleted))
    return restored, deleted


def _age(path: str) -> float:
    """Seconds since anything in the directory `path` last changed."""
    try:
        newest = max([os.path.getmtime(path)] + [os.path.getmtime(os.path.join(path, n)) for n in os.listdir(path)])
    except OSError:
        return 0.0
    return time.time() - newest
