"""The device settings of a job on this machine: `train.device=auto` is the CPU here, CUDA and NCCL
where they cannot run fail before any process starts with one line naming the key and the fix, the
local launcher spreads its workers over the GPUs and hands CPU workers Triton's interpreter, and a
worker binds its device (or says in one line why it cannot)."""
import os
import subprocess
import sys

import pytest
import torch

from testkit import ROOT
from kintsugi.parallel.device import lowest_free_index
from kintsugi.trainer.cli.compose import compose_job, validate_overrides
from kintsugi.trainer.config.environment import ConfigError, check_device, check_devices, worker_env
from kintsugi.trainer.runtime import devices

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


@NO_CUDA
def test_auto_resolves_to_the_cpu_here_and_binds_it():
    assert check_device("auto") == "cpu"
    job, _ = compose_job([])
    assert job.train.device == "auto"  # left unresolved in the config: each worker resolves it
    assert devices.bind(job, env={}) == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("overrides,needle", [
    (["train.device=cuda"], "train.device=cuda: no CUDA device is visible here"),
    (["parallel.backend=nccl"], "parallel.backend=nccl needs CUDA stages, and no CUDA device is visible here"),
])
def test_cuda_and_nccl_without_a_gpu_are_one_line(overrides, needle):
    msg = validate_overrides(overrides)
    assert msg is not None and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.backend=nccl", "train.device=cpu"], "parallel.backend=nccl carries CUDA tensors but train.device=cpu"),
    (["compression.kernels=fast"], "compression.kernels='fast' is not valid"),
    (["recovery.p2p_deadline_s=0"], "recovery.p2p_deadline_s=0"),
])
def test_device_keys_fail_with_one_line(overrides, needle):
    msg = validate_overrides(overrides)
    assert msg is not None and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("overrides,gpus,processes", [
    # 4 stages x 1 replica + 1 spare (faults=demo) = 5 processes on 2 GPUs
    ([], 2, 5),
    # parallel=grid2x4: 4 stages x 2 replicas + 1 spare = 9 processes on 8 GPUs
    (["parallel=grid2x4"], 8, 9),
    # 2 stages, no spares: 2 processes on 1 GPU
    (["parallel.stages=2", "faults=none"], 1, 2),
])
def test_nccl_needs_one_gpu_per_stage_process_of_the_local_launcher(overrides, gpus, processes):
    job, _ = compose_job(overrides + ["parallel.backend=nccl"])
    with pytest.raises(ConfigError) as e:
        check_devices(job, num_gpus=gpus)
    msg = str(e.value)
    assert f"this machine has {gpus} GPUs for {processes} processes" in msg and "\n" not in msg
    assert "parallel.backend=gloo" in msg
    check_devices(job, num_gpus=processes)  # one GPU each: accepted
    job.launcher.name = "torchrun"  # other launchers bind per node, at start
    check_devices(job, num_gpus=gpus)


def test_triton_kernels_on_cpu_stages_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    job, _ = compose_job(["compression.kernels=triton", "train.device=cpu"])
    assert worker_env(job) == {"TRITON_INTERPRET": "1"}  # the local launcher starts its workers under it
    check_devices(job, num_gpus=0)
    job.launcher.name = "torchrun"  # nobody sets it for torchrun's workers: the user must
    with pytest.raises(ConfigError, match="start the workers with TRITON_INTERPRET=1"):
        check_devices(job, num_gpus=0)
    check_devices(job, num_gpus=0, env={"TRITON_INTERPRET": "1"})
    plain, _ = compose_job(["train.device=cpu"])
    assert worker_env(plain) == {}


def test_a_worker_that_cannot_bind_says_so_in_one_line(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    job, _ = compose_job(["compression.kernels=triton", "train.device=cpu"])
    with pytest.raises(devices.DeviceError) as e:  # this process did not start under the interpreter
        devices.bind(job, env={})
    assert "TRITON_INTERPRET=1" in str(e.value) and "\n" not in str(e.value)
    job, _ = compose_job(["train.device=cpu"])
    with pytest.raises(devices.DeviceError, match="KINTSUGI_WORKER_INDEX='x' is not a worker index"):
        devices.bind(job, env={"KINTSUGI_WORKER_INDEX": "x"})


def test_the_local_launcher_gives_a_replacement_its_predecessors_gpu():
    assert lowest_free_index([]) == 0
    assert lowest_free_index([0, 1, 2, 3, 4]) == 5
    # 4 GPUs, workers 0..4 (GPU = index % 4): worker 1 died, its replacement takes index 1 = GPU 1,
    # not index 5 = GPU 1 by luck, nor GPU 0 beside worker 0.
    assert lowest_free_index([0, 2, 3, 4]) == 1
    assert lowest_free_index(i for i in [3, 1, 0]) == 2


@NO_CUDA
def test_nccl_without_a_gpu_fails_before_any_process_starts(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer", "parallel.backend=nccl", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["kintsugi: config error: parallel.backend=nccl needs CUDA stages, and no CUDA device is "
                     "visible here; use parallel.backend=auto (gloo)"]
    assert not run_dir.exists()
