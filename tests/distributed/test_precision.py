"""bf16 autocast and activation checkpointing in the real training path (4 stage processes over
gloo, CPU): the same steps reach a validation loss within 2 % of the fp32 run, and the run reports
each stage's peak memory."""
import pytest

from testkit import run_trainer

pytestmark = pytest.mark.distributed
JOB = ["experiment=quick", "train.max_steps=30", "train.eval_batches=2", "faults=none"]


# ~85 s: two 30-step runs; the golden and pipeline-equivalence tests keep fp32 training exact by default
@pytest.mark.slow
def test_bf16_with_activation_checkpointing_trains_like_fp32(tmp_path):
    _, fp32, _ = run_trainer(tmp_path / "fp32", *JOB)
    proc, bf16, records = run_trainer(tmp_path / "bf16", *JOB, "train.precision=bf16",
                                      "train.activation_checkpointing=true")
    assert bf16["steps"] == fp32["steps"] == 30
    # bf16 really ran: its losses are not fp32's bit for bit.
    assert bf16["final_val_loss"] != fp32["final_val_loss"]
    assert abs(bf16["final_val_loss"] - fp32["final_val_loss"]) <= 0.02 * fp32["final_val_loss"], \
        (bf16["final_val_loss"], fp32["final_val_loss"])
    peaks = bf16["memory"]["peak_bytes"]
    assert sorted(peaks) == ["0", "1", "2", "3"], peaks
    # A worker process holding torch and its stage: more than 50 MB, less than the machine.
    assert all(50e6 < v < 24e9 for v in peaks.values()), peaks
