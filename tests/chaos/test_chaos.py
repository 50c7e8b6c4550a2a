"""The chaos suite: seeded random schedules of kill / stop / term / cont over slots, spares and the
coordinator, some fired while a rebuild generation forms, for one replica of 4 stages and 2 x 2
under Streaming DiLoCo (benchmarks/chaos.py builds and checks them). Each case asserts from the
run's own records: it completes (or stops with a clear message), every step of every replica is
committed exactly once on the batches stage 0 read, the final loss is at most 5 % above the
failure-free run, no process outlives the job, and it ends in bounded time.

From seed 10 on, most schedules also mix in attacks from a client without the token (the commit
log's counter wound back, the run id overwritten, a worker's earlier beats written back, a 512 MB
flood): each that reached the store must be counted in the run's `tampering` and change nothing
else. Every seed runs under `-m slow` (`python -m pytest -m slow tests/chaos`; about 60 s each with
its baseline, which the default run's 20 minutes on 2 cores no longer hold), and
`python -m benchmarks.chaos --seeds 50` reports all of them."""

import pytest

from kintsugi.benchmarks import chaos

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(chaos.CASE_TIMEOUT_S + 120)]

# The first to run (test_chaos): a SIGSTOPped coordinator then a killed one and a killed spare (4: no
# worker is hit, so the losses must be bit-identical to the failure-free run's). Seed 9 (under
# DiLoCo a worker stopped while a rebuild forms, kills of both stage-0 holders and a stopped
# coordinator: the job suspends without a spare) runs with the slow seeds; its regression test is
# tests/distributed/test_control_plane.py::test_a_replica_that_finished_still_saves_when_the_job_suspends.
DEFAULT_SEEDS = [4]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Each grid's failure-free run, made the first time a case of that grid needs it."""
    out_dir, made = str(tmp_path_factory.mktemp("chaos-baseline")), {}

    def of(grid):
        if grid not in made:
            made.update(chaos.baselines(out_dir, grids=[grid]))
        return made[grid]
    return of


def _case(seed, baseline, tmp_path):
    case = chaos.schedule(seed)
    res = chaos.run_case(case, str(tmp_path), baseline(case["grid"]))
    assert res["passed"], f"seed {seed} {case['events']}: {res['broken']}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", DEFAULT_SEEDS)
def test_chaos(seed, baseline, tmp_path):
    _case(seed, baseline, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [s for s in range(50) if s not in DEFAULT_SEEDS])
def test_chaos_more(seed, baseline, tmp_path):
    _case(seed, baseline, tmp_path)
