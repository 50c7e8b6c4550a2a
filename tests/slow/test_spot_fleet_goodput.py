"""`python -m benchmarks.spot_fleet` (100 steps) with one seed, run until two runs' traces played out
alike: their goodputs, each read from the run's own records, agree within 0.03 (the ratio of two
runs' tokens per machine-second it replaced moved by 0.4-1.2 with the load), and the losses account
for every paid machine-second.

Why "played out alike": seed 5's last notice (m4 at step 81) is handed off only when its replacement
is ready before the run's end (3 handoffs), which depends on the pace; otherwise the holder trains to
the end (2 handoffs). Its kill of m5 at step 36 now always finds m5 a spare still starting, as a
holder under notice waits for a ready spare. The outcomes cost differently (BENCHMARKS.md, "Spot
fleet"). With two outcomes, three runs hold two alike. Goodput >= 0.8 is the issue's target.

    python -m pytest -m slow tests/slow/test_spot_fleet_goodput.py     # 6-10 min on 2 cores
"""
import pytest

from testkit import run_benchmark

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def test_two_runs_of_one_seed_give_the_same_goodput(tmp_path):
    runs = []
    for name in ("a", "b", "c"):
        runs.append(run_benchmark("benchmarks.spot_fleet", "--out", str(tmp_path / name), timeout=600))
        outcomes = [sorted(r["rebuilds_by_tier"].items()) for r in runs]
        alike = [r for r, o in zip(runs, outcomes) if outcomes.count(o) >= 2]
        if len(alike) >= 2:
            break
    assert len(alike) >= 2, outcomes
    goodputs = [r["goodput"] for r in alike[:2]]
    assert all(g is not None and 0.0 < g < 1.0 for g in goodputs), alike
    assert abs(goodputs[0] - goodputs[1]) <= 0.03, (goodputs, outcomes)
    assert min(goodputs) >= 0.8, goodputs
    for r in runs:
        assert r["rebuilds_by_tier"], "the trace caused no rebuild: nothing was measured"
        spot = r["spot"]
        # useful + every loss = paid (the accounting leaves nothing out)
        assert spot["goodput"] + sum(spot["lost_fraction"].values()) == pytest.approx(1.0, abs=2e-3)
