"""A worker's descriptors, threads and store keys stay flat however many generations it lives
through: 50 real generations of a 3-process group with abandoned operations and abandoned
formations (benchmarks/resources.py). The same run with groups left open shows the leak the
measurement is there to catch (~7 descriptors per generation, as reported against the old code)."""
import pytest

from testkit import run_benchmark

pytestmark = pytest.mark.distributed


# ~75 s: fifty generations of real groups; run under -m slow
@pytest.mark.slow
def test_fifty_generations_leave_nothing_behind():
    closed = run_benchmark("benchmarks.resources", "--generations", "50", timeout=240)
    assert closed["fd_growth"] <= 2, closed
    assert closed["thread_growth"] <= 1, closed
    # What remains: at most the last generation's formation keys (two per rank) -- not ~2 per rank
    # per generation.
    assert closed["store_keys_end"] <= 2 * closed["ranks"], closed
    leaked = run_benchmark("benchmarks.resources", "--generations", "50", "--leak", timeout=240)
    assert leaked["fd_growth"] >= leaked["generations_measured"], leaked  # the measure sees a leak
    assert leaked["store_keys_end"] >= 2 * leaked["generations"], leaked
