"""Smoke test of benchmarks/rendezvous.py --quick (real gloo processes on loopback, ~15 s) feeding
benchmarks/fleet_model.py --quick; both write into tmp_path, never over the recorded outputs."""
from __future__ import annotations

import json
import os

import pytest

from testkit import run_benchmark

pytestmark = pytest.mark.distributed


@pytest.mark.slow  # 30-75 s; kept out of the default run for its length
def test_rendezvous_quick_measures_formation_and_detection_then_feeds_the_fleet_model(tmp_path):
    rdv_path = tmp_path / "rendezvous.json"
    out = run_benchmark("benchmarks.rendezvous", "--quick", "--out", str(rdv_path), timeout=180)
    assert out["_elapsed_s"] < 90  # the brief: < 60 s on an idle box; slack for a shared one
    assert sorted(out["per_n"], key=int) == ["2", "4", "8"]
    for n, v in out["per_n"].items():
        assert len(v["samples_s"]) == v["rounds"] == 5
        assert 0 < v["min_s"] <= v["median_s"] <= v["max_s"] < 10, (n, v)
    det = out["detection_kill_n2"]
    # gloo makes a pending recv raise when its peer is SIGKILLed (DESIGN.md: ~10 ms); the group timeout is 30 s.
    assert det["max_s"] < 5 and "did not raise" not in det["raised"], det
    assert out["fit_wall"]["best"] in ("a+b*N", "a+b*N*log2(N)")
    assert json.loads(rdv_path.read_text()) == {k: v for k, v in out.items() if k != "_elapsed_s"}

    png, md = tmp_path / "fleet.png", tmp_path / "fleet.md"
    fleet = run_benchmark("benchmarks.fleet_model", "--quick", "--rendezvous", str(rdv_path), "--plot", str(png),
                          "--md", str(md), timeout=120)
    assert fleet["inputs"]["rdv_source"].endswith("(--quick run)")
    assert len(fleet["cells"]) == 4 * 4 * 2 * 6  # W x rates x bandwidths x (4 policies + catch-up + matched syncs)
    assert all(0.0 <= c["goodput_mean"] <= 1.0 for c in fleet["cells"])
    assert os.path.getsize(png) > 10_000 and "| per-replica isolation |" in md.read_text()
