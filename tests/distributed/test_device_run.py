"""The trainer's device settings through the real launcher on CPU: `train.device=auto` trains on
the CPU here and every slot's worker says where it ran (summary.json's config: device, kernels);
`compression.kernels=triton` (Triton's interpreter, which the local launcher starts CPU workers
under) trains a compressed pipeline bit-identically to the torch reference kernels."""
import pytest
import torch

from testkit import run_trainer

pytestmark = pytest.mark.distributed
COMMON = ("experiment=quick", "parallel.stages=2", "faults=none", "train.max_steps=3")


def _placed(records):
    return [r["event"] for r in records if isinstance(r.get("event"), dict) and r["event"].get("kind") == "device"]


def _losses(records):
    return [(r["step"], r["loss"]) for r in records if "loss" in r and "event" not in r and "val_loss" not in r]


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is the CPU only where no GPU is visible")
def test_auto_trains_on_the_cpu_here_and_every_slot_says_so(tmp_path):
    _, summary, records = run_trainer(tmp_path / "run", *COMMON, "train.device=auto")
    placed = _placed(records)
    assert sorted(tuple(e["slot"]) for e in placed) == [(0, 0), (0, 1)]
    assert all(e["device"] == "cpu" and e["kernels"]["cpu"] == "reference" for e in placed)
    assert summary["config"]["device"] == "cpu" and summary["config"]["kernels"]["cpu"] == "reference"
    assert summary["config"]["train"]["device"] == "auto"  # the setting as given, resolved per worker
    assert [s for s, _ in _losses(records)] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_triton_kernels_train_bit_identically_to_the_reference(tmp_path):
    codecs = ("compression.activations=int8", "compression.gradients=fp8_e4m3", "train.device=cpu")
    _, ref_summary, ref = run_trainer(tmp_path / "ref", *COMMON, *codecs, "compression.kernels=reference", timeout=400)
    _, tri_summary, tri = run_trainer(tmp_path / "tri", *COMMON, *codecs, "compression.kernels=triton", timeout=400)
    assert all(e["kernels"]["cpu"] == "triton" for e in _placed(tri)) and len(_placed(tri)) == 2
    assert all(e["kernels"]["cpu"] == "reference" for e in _placed(ref))
    assert _losses(tri) == _losses(ref) and len(_losses(ref)) == 3  # bit for bit: same bytes on the wire
    assert tri_summary["final_val_loss"] == ref_summary["final_val_loss"]
    assert tri_summary["bytes"]["p2p"] == ref_summary["bytes"]["p2p"] > 0
