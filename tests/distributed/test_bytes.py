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


# The tiny model's parameters by hand (dim 128, byte vocabulary of 256, fp32). A layer: attention
# 128x128 + 2 x 128x64 + 128x128, SwiGLU 3 x 128x352 (8*128/3 rounded up to 32), two norms of 128:
# 184,576 parameters, 738,304 B; a stage of the quick model holds two. The embedding 256x128 and the
# head (norm 128 + 256x128) are what stage 0 and stage 3 add and what CheckFree+ copies.
LAYER = 738_304
EMBEDDING = 256 * 128 * 4
HEAD = (128 + 256 * 128) * 4
HEADER = 8 << 10  # a package's own header (names, shapes, dtypes) stays under 8 KiB
LENGTH = 8        # every package is preceded by its length, one int64


def test_a_rebuild_moves_what_the_plan_says(tmp_path):
    # Stage 2 killed at step 4 and rebuilt by CheckFree from stages 1 and 3; CheckFree+'s copies of the
    # end stages refreshed after step 9 (stage 0 -> 1, stage 3 -> 2). Every package that arrived is a
    # `package` event row with its size as it arrived; the senders' rebuild byte counters must equal
    # their sum plus the lengths, and each size must be what its tensors weigh, worked out above.
    _, summary, records = run_trainer(tmp_path / "run", "experiment=quick", "train.max_steps=10",
                                      "train.eval_batches=2", "faults=none", "faults.spares=1",
                                      "faults.schedule=[{step: 4, stage: 2, kind: kill}]")
    b = summary["bytes"]
    assert summary["failures"] == 1 and len(summary["rebuilds"]) == 1
    packages = [r["event"] for r in records if r.get("event", {}).get("kind") == "package"]
    rebuild = sorted((p["src"], p["bytes"]) for p in packages if p["what"] not in ("copy",))
    copies = sorted((p["src"], p["slot"], p["bytes"]) for p in packages if p["what"] == "copy")
    assert [src for src, _ in rebuild] == [[0, 1], [0, 3]], packages
    (_, from1), (_, from3) = rebuild
    # Stage 1 sends its two layers (and the copy of the embedding it keeps, once it has one).
    assert 2 * LAYER <= from1 <= 2 * LAYER + EMBEDDING + HEADER, from1
    assert 2 * LAYER + HEAD <= from3 <= 2 * LAYER + HEAD + HEADER, from3
    assert [c[:2] for c in copies] == [([0, 0], [0, 1]), ([0, 3], [0, 2])], copies
    assert EMBEDDING <= copies[0][2] <= EMBEDDING + HEADER and HEAD <= copies[1][2] <= HEAD + HEADER, copies
    # The byte counters (senders' transports) hold exactly what arrived: nothing skipped, nothing twice.
    assert b["rebuild"] == sum(p["bytes"] + LENGTH for p in packages), (b, packages)
    # The pipeline's own traffic: the plan (10 steps + the evaluation), less what the SIGKILLed stage 2
    # sent after its last report of its counters (it beats every few hundred ms, a step takes about
    # as long: at most two of its steps, 4 activations and 4 gradients each: stage 2 sends one hop of
    # each of the 2 plain and 2 swapped microbatches), plus at most the one step the kill cut short.
    assert (10 * 16 + 24 - 2 * 4) * MSG <= b["p2p_activations"] <= (11 * 16 + 24) * MSG, b
    assert (10 * 16 - 2 * 4) * MSG <= b["p2p_gradients"] <= 11 * 16 * MSG, b
