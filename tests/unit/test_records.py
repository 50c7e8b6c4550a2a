"""Strict JSON records: json_safe (recovery/records.py) and summary.json built from a run whose
metrics hold NaN / infinite values (trainer/outputs.py)."""
import json
import math

import numpy as np
import pytest

from kintsugi.recovery.records import dumps_strict, json_safe
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.reporting.summary import write_outputs


def strict_loads(text):
    """A parser as strict as jq or JavaScript: NaN / Infinity / -Infinity are errors."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_json_safe_replaces_every_non_finite_number():
    rec = {"loss": float("nan"), "tokens": 10, "ok": True, "none": None, "name": "NaN",
           "stage_compute_s": (0.5, float("inf"), -float("inf")), 3: [{"x": np.float32("nan"), "y": np.float64(2.5)}],
           "z": -0.0, "i": np.int64(7)}
    want = {"loss": None, "tokens": 10, "ok": True, "none": None, "name": "NaN",
            "stage_compute_s": [0.5, None, None], 3: [{"x": None, "y": 2.5}], "z": -0.0, "i": 7}
    got = json_safe(rec)
    assert got == want and math.copysign(1, got["z"]) == -1
    assert type(got["i"]) is int and type(got[3][0]["y"]) is float
    assert strict_loads(dumps_strict(rec)) == {**{str(k): v for k, v in want.items()}}
    with pytest.raises(ValueError):  # what json.dumps does unguarded, checked strictly
        strict_loads(json.dumps(rec, default=float))


def test_summary_of_a_diverged_run_is_strict_json(tmp_path):
    metrics = [
        {"replica": 0, "step": 0, "loss": 3.2, "grad_norm": 1.0, "tokens": 64, "lr": 1e-3, "wall_s": 0.1,
         "stage_compute_s": [0.01, 0.02, 0.02, 0.03]},
        {"replica": 0, "step": 1, "loss": float("nan"), "grad_norm": float("inf"), "tokens": 64, "lr": 1e-3,
         "wall_s": 0.2, "stage_compute_s": [float("inf"), 0.02, 0.02, 0.03]},
        {"step": 2, "val_loss": float("nan"), "wall_s": 0.3},
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:  # as Python's json writes them: bare NaN / Infinity
        f.write("".join(json.dumps(m) + "\n" for m in metrics))
    state = {"final_val_loss": float("nan"), "wall_s": float("inf"), "failures": 0, "rebuilds": [],
             "bytes": {"p2p": 10}, "wandb_live": True}
    (tmp_path / "coordinator_state.json").write_text(json.dumps(state))
    assert "NaN" in (tmp_path / "metrics.jsonl").read_text()  # the input really is non-strict
    summary = write_outputs(str(tmp_path), JobConfig(), wall_s=float("nan"))
    assert summary is not None
    text = (tmp_path / "summary.json").read_text()
    got = strict_loads(text)
    assert got["final_val_loss"] is None and got["wall_s"] is None
    assert got["steps"] == 2 and got["tokens"] == 128
    assert got["tokens_per_s"] == 0.0  # 128 tokens over an infinite wall time
    assert got["slowest_stage"]["per_stage_compute_s"][0] is None and got["slowest_stage"]["compute_s"] is None


def test_a_truncated_coordinator_state_gives_no_summary_and_no_traceback(tmp_path, caplog):
    # A full disk cut the file short (the coordinator now writes it whole or not at all, but a copy
    # from an older run or another tool may still be truncated): no summary, one error line.
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 2.0, "tokens": 64, "replica": 0}\n')
    for text in ("", '{"final_val_loss": 1.5, "committed"'):
        (tmp_path / "coordinator_state.json").write_text(text)
        caplog.clear()
        assert write_outputs(str(tmp_path), JobConfig(), wall_s=1.0) is None
        assert not (tmp_path / "summary.json").exists()
        assert any("coordinator_state.json" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
