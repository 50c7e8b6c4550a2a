"""Everything that leaves a worker holds CPU tensors: a state package of a CUDA stage is built from
CPU copies and unpacks to CPU tensors (a GPU stage can be rebuilt on a CPU spare and back)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_cuda_stage_package_is_cpu_only_and_exact():
    from kintsugi.recovery.packages import encode, pack, unpack
    state = {"w": torch.randn(64, 32, device="cuda"), "opt": {"exp_avg": torch.randn(64, device="cuda")},
             "step": 7, "bf": torch.randn(8, device="cuda", dtype=torch.bfloat16)}
    _, tensors = encode(state)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    payload = pack(state)
    assert payload.device.type == "cpu"
    back = unpack(payload)
    for key in ("w", "bf"):
        assert back[key].device.type == "cpu" and torch.equal(back[key], state[key].cpu())
    assert torch.equal(back["opt"]["exp_avg"], state["opt"]["exp_avg"].cpu()) and back["step"] == 7
