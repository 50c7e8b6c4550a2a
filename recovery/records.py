"""Strict JSON for run records (summary.json, metrics.jsonl, state files).

Python's json writes NaN and Infinity as bare `NaN` / `Infinity`, which is not JSON: strict
parsers (jq, JavaScript, most dashboards) reject the whole file. A diverged loss must not make a
run's records unreadable, so non-finite numbers become null. Lower layer: no trainer imports.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import numbers


def json_safe(obj):
    """`obj` with every non-finite float (also numpy's) replaced by None, recursively through dicts,
    lists and tuples (tuples become lists, as JSON has no tuples). Other values are left as they
    are; dict keys are kept (json converts int / float / bool / None keys to strings)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_strict(obj, **kwargs) -> str:
    """json.dumps of `json_safe(obj)` that raises rather than ever writing NaN / Infinity."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_strict_atomic(path: str, obj, fsync: bool = False, **kwargs) -> None:
    """`dumps_strict(obj)` into `path`, whole or not at all: written beside it, then renamed. A failed
    write (a full disk) raises OSError and leaves neither a truncated file nor the temporary one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(dumps_strict(obj, **kwargs))
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
