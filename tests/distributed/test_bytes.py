"""Byte counters count what was handed to send, and match the plan worked out by hand.

experiment=quick: 4 stages, batch 16 in 4 microbatches of 4 sequences x 128 tokens, dim 128, fp32
activations: one hop's message is 4 * 128 * 128 * 4 B = 262,144 B. Under the default recovery
strategy (tiered, CheckFree+ routes) even microbatches take the plain route (3 hops between stages)
and odd ones the swapped route E@0 L@1 L@0 L@3 L@2 H@3 (5 hops), so a training step moves
(2*3 + 2*5) = 16 messages forward and 16 gradients back. The final evaluation (plain routes, 2
batches of 4 microbatches) moves 2 * 4 * 3 = 24 messages forward and nothing back."""
import pytest

from testkit import run_trainer

pytestmark = pytest.mark.distributed

MSG = 4 * 128 * 128 * 4
STEPS = 6


def test_p2p_bytes_match_the_plan(tmp_path):
    _, summary, _ = run_trainer(tmp_path / "run", "experiment=quick", f"train.max_steps={STEPS}",
                                "train.eval_batches=2", "faults=none")
    b = summary["bytes"]
    assert b["p2p_activations"] == STEPS * 16 * MSG + 24 * MSG, b
    assert b["p2p_gradients"] == STEPS * 16 * MSG, b
    assert b["outer_sync"] == 0 and b["data_parallel"] == 0 and b["rebuild"] == 0, b


def test_a_rebuild_moves_what_the_plan_says(tmp_path):
    # A stage killed and rebuilt: the rebuild channel carries the packages (its size depends on
    # the state, so only its presence is checked here), and the pipeline's own traffic is at least
    # the plan up to the killed worker's unreported last messages (every step is committed once; a
    # step abandoned mid-way may have sent part of its messages, and those count).
    _, summary, records = run_trainer(tmp_path / "run", "experiment=quick", "train.max_steps=10",
                                      "train.eval_batches=2", "faults=none", "faults.spares=1",
                                      "faults.schedule=[{step: 4, stage: 2, kind: kill}]")
    b = summary["bytes"]
    assert summary["failures"] == 1 and len(summary["rebuilds"]) == 1
    # What the SIGKILLed worker sent after its last heartbeat died with it (a recorded gap of at
    # most a few of its messages); the rest is at least the plan.
    assert b["p2p_activations"] >= 0.9 * (10 * 16 * MSG + 24 * MSG), b
    assert b["p2p_gradients"] >= 0.9 * 10 * 16 * MSG, b
    # At most one step more than the plan: the step the kill cut short was sent in part, then again.
    assert b["p2p_activations"] <= (11 * 16 + 24) * MSG and b["p2p_gradients"] <= 11 * 16 * MSG, b
    # CheckFree from stages 1 and 3: each sends at least its two layers in fp32. A layer of the tiny
    # model: attention 128x128 + 2 x 128x64 + 128x128, SwiGLU 3 x 128x352 (8*128/3 rounded up to 32),
    # two norms of 128: 184,576 parameters, 738,304 B.
    assert b["rebuild"] >= 2 * 2 * 738_304, b
