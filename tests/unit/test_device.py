"""parallel.device on CPU: which GPU a worker binds to under each launcher (worked by hand), the
one-line errors, the CPU side of host staging (pool reuse, distinct tensors), the NCCL refusal on
CPU, and the kernels switch of `kernels.dispatch.configure`."""
import io
import os

import pytest
import torch

from kintsugi.parallel import device
from kintsugi.parallel.groups import form_group


def test_auto_picks_cuda_only_when_a_gpu_is_visible():
    assert device.resolve("auto", num_gpus=0) == "cpu"
    assert device.resolve("auto", num_gpus=2) == "cuda"
    assert device.resolve("cpu", num_gpus=2) == "cpu"
    assert device.resolve("cuda", num_gpus=1) == "cuda"
    # This machine: whatever torch sees decides "auto".
    assert device.resolve("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_cuda_without_a_gpu_and_unknown_devices_fail_with_one_line():
    with pytest.raises(ValueError) as e:
        device.resolve("cuda", num_gpus=0)
    msg = str(e.value)
    assert "\n" not in msg and "train.device=cuda" in msg and "train.device=cpu" in msg
    with pytest.raises(ValueError, match=r"train.device='tpu' is unknown; use one of auto, cpu, cuda"):
        device.resolve("tpu", num_gpus=0)


@pytest.mark.parametrize("launcher,env,worker,gpus,expect", [
    # local launcher: round robin over the visible GPUs, by the order it started workers
    ("local", {}, 0, 4, 0), ("local", {}, 3, 4, 3), ("local", {}, 5, 4, 1), ("local", {}, 6, 2, 0),
    # torchrun / deepspeed: LOCAL_RANK, whatever the worker index
    ("torchrun", {"LOCAL_RANK": "2"}, 9, 4, 2), ("deepspeed", {"LOCAL_RANK": "1"}, 0, 8, 1),
    # Slurm, one GPU per task: the task sees only its GPU (1 visible) -> index 0 whatever SLURM_LOCALID
    ("slurm", {"SLURM_LOCALID": "3"}, 0, 1, 0),
    # Slurm with every GPU of the node visible to each task: the task's local id picks its GPU
    ("slurm", {"SLURM_LOCALID": "3"}, 0, 4, 3),
    # kintsugi join: each worker sees its own device only
    ("join", {}, 5, 1, 0),
])
def test_local_index_per_launcher(launcher, env, worker, gpus, expect):
    assert device.local_index(launcher, env, worker, gpus) == expect


def test_local_index_errors_name_the_variable_and_the_fix():
    with pytest.raises(ValueError) as e:
        device.local_index("torchrun", {}, 0, 4)
    assert "LOCAL_RANK is missing" in str(e.value) and "torchrun launcher" in str(e.value)
    with pytest.raises(ValueError, match="SLURM_LOCALID is 'x'"):
        device.local_index("slurm", {"SLURM_LOCALID": "x"}, 0, 4)
    with pytest.raises(ValueError, match="local rank 5 but this task sees 4 GPUs"):
        device.local_index("torchrun", {"LOCAL_RANK": "5"}, 0, 4)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        device.local_index("local", {}, 0, 0)
    with pytest.raises(ValueError, match="launcher='mpi' is unknown"):
        device.local_index("mpi", {}, 0, 1)


def test_join_gives_each_worker_one_device():
    assert device.join_devices(2, ["0", "1"]) == ["0", "1"]
    assert device.join_devices(3, ["4", "7"]) == ["4", "7", "4"]  # more workers than GPUs: shared
    assert device.join_devices(2, []) == [None, None]                # no CUDA: variable left alone
    with pytest.raises(ValueError, match="--workers=0 must be >= 1"):
        device.join_devices(0, ["0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU binding")
def test_bind_worker_on_cpu():
    assert device.bind_worker("auto", "local", {}, 0) == torch.device("cpu")
    assert device.bind_worker("cpu", "torchrun", {}) == torch.device("cpu")  # LOCAL_RANK unused on CPU


def test_shared_gpus_names_the_ranks_on_one_gpu():
    assert device.shared_gpus(["a@", "b@", "c@"]) == {}
    assert device.shared_gpus(["a@", "b@", "a@", "b@", "c@"]) == {"a@": [0, 2], "b@": [1, 3]}
    assert device.shared_gpus(["a@h0", "a@h1"]) == {}  # distinct NCCL_HOSTID: NCCL accepts them


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_nccl_group_on_cpu_fails_with_one_line_before_anything_starts():
    with pytest.raises(ValueError) as e:
        device.require_nccl(torch.device("cpu"))
    assert "\n" not in str(e.value) and "parallel.backend=gloo" in str(e.value)

    def connect():  # never called: the refusal comes first
        raise AssertionError("formation started")
    with pytest.raises(ValueError, match="parallel.backend=nccl needs a CUDA device"):
        form_group(connect, "gen0", 0, 2, timeout_s=5.0, backend="nccl", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="backend='mpi' is unknown"):
        form_group(connect, "gen0", 0, 2, timeout_s=5.0, backend="mpi")


def test_cpu_stager_copies_and_reuses_its_buffers():
    st = device.HostStager(torch.device("cpu"))
    x = torch.randn(4, 8)
    host, event = st.to_host(x)
    assert event.query() and torch.equal(host, x) and host.data_ptr() != x.data_ptr()
    x.add_(1.0)  # the staged copy does not follow its source
    assert not torch.equal(host, x)
    st.release(host)
    again, _ = st.to_host(x)
    assert again.data_ptr() == host.data_ptr() and st.allocated == 1  # pooled
    back = st.to_device(again)
    assert torch.equal(back, x) and back.data_ptr() != again.data_ptr()  # distinct: the buffer is reused
    other, _ = st.to_host(torch.zeros(4, 8))
    assert torch.equal(back, x)  # reusing the buffer did not touch what to_device returned
    assert other.data_ptr() == again.data_ptr() and st.allocated == 1


def test_load_cpu_maps_every_tensor_to_the_cpu():
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0).view(2, 3), "step": 3}, buf)
    buf.seek(0)
    back = device.load_cpu(buf)
    assert back["step"] == 3 and back["w"].device.type == "cpu" and torch.equal(back["w"], torch.arange(6.0).view(2, 3))


def test_nccl_env_keeps_survivors_alive(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # torch's "tear the process down"
    device.nccl_env()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"  # CleanUpOnly: abort the comm, live on
    assert os.environ["TORCH_NCCL_ENABLE_MONITORING"] == "0"


def test_kernels_switch(monkeypatch):
    from kintsugi.kernels import dispatch
    monkeypatch.setattr(dispatch, "_backend", "auto")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError) as e:
        dispatch.configure("triton", "cpu")
    assert "TRITON_INTERPRET=1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="compression.kernels='fast' is unknown"):
        dispatch.configure("fast")
    assert dispatch.configure("reference", "cuda") == "reference"
    assert dispatch.active_backend() == {"cpu": "reference", "cuda": "reference"}
    dispatch.configure("auto", "cpu")
    assert dispatch.active_backend()["cpu"] == "reference"
