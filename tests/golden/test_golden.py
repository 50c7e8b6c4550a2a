"""Every golden scenario, run for real, reproduces its committed losses bit for bit."""
import pytest

import golden

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", sorted(golden.SCENARIOS))
def test_losses_are_bit_identical_to_the_golden_file(tmp_path, name):
    want = golden.load(name)
    _, overrides = golden.SCENARIOS[name]
    assert want["overrides"] == overrides, f"{name}: the scenario changed; regenerate its file with a reason"
    got = golden.run(name, str(tmp_path / "run"))
    assert got["steps"] == want["steps"], f"{name}: committed steps differ"
    assert got["rebuilds"] == want["rebuilds"], f"{name}: rebuilds (step, slot, tier) differ"
    assert got["losses"] == want["losses"], f"{name}: per-step losses differ from tests/golden/{name}.json"
    assert got["final_val_loss"] == want["final_val_loss"], f"{name}: final validation loss differs"
