"""`python -m benchmarks.spot_fleet` (100 steps) twice with one seed: the goodput read from each
run's own records agrees within 0.03 (the ratio of two runs' tokens per machine-second it replaced
moved by 0.4-1.2 with the load), and its losses account for every paid machine-second.

    python -m pytest -m slow tests/slow/test_spot_fleet_goodput.py     # ~7 min on 2 cores
"""
import pytest

from testkit import run_benchmark

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_two_runs_of_one_seed_give_the_same_goodput(tmp_path):
    runs = [run_benchmark("benchmarks.spot_fleet", "--out", str(tmp_path / name), timeout=600)
            for name in ("a", "b")]
    goodputs = [r["goodput"] for r in runs]
    assert all(g is not None and 0.0 < g < 1.0 for g in goodputs), runs
    assert abs(goodputs[0] - goodputs[1]) <= 0.03, goodputs
    for r in runs:
        assert r["rebuilds_by_tier"], "the trace caused no rebuild: nothing was measured"
        spot = r["spot"]
        # useful + every loss = paid (the accounting leaves nothing out)
        assert spot["goodput"] + sum(spot["lost_fraction"].values()) == pytest.approx(1.0, abs=2e-3)
