"""The chaos suite: seeded random schedules of kill / stop / term / cont over slots, spares and the
coordinator, some fired while a rebuild generation forms, for one replica of 4 stages and 2 x 2
under Streaming DiLoCo (benchmarks/chaos.py builds and checks them). Each case asserts from the
run's own records: it completes (or stops with a clear message), every step of every replica is
committed exactly once on the batches stage 0 read, the final loss is within 5 % of the
failure-free run, no process outlives the job, and it ends in bounded time.

A few seeds run by default; `python -m pytest -m slow tests/chaos` runs the other 48, and
`python -m benchmarks.chaos --seeds 50` reports all of them."""

import pytest

from kintsugi.benchmarks import chaos

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(chaos.CASE_TIMEOUT_S + 120)]

# Covered by the defaults: a SIGSTOPped coordinator then a killed one and a killed spare (4: no
# worker is hit, so the losses must be bit-identical to the failure-free run's), and under DiLoCo a
# worker stopped while a rebuild forms, kills of both stage-0 holders and a stopped coordinator
# (9: the job suspends without a spare; a replica that had finished must still save).
DEFAULT_SEEDS = [4, 9]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    return chaos.baselines(str(tmp_path_factory.mktemp("chaos-baseline")))


def _case(seed, baseline, tmp_path):
    case = chaos.schedule(seed)
    res = chaos.run_case(case, str(tmp_path), baseline[case["grid"]])
    assert res["passed"], f"seed {seed} {case['events']}: {res['broken']}"


@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_chaos(seed, baseline, tmp_path):
    _case(seed, baseline, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [s for s in range(50) if s not in DEFAULT_SEEDS])
def test_chaos_more(seed, baseline, tmp_path):
    _case(seed, baseline, tmp_path)
