"""Checks of configuration values against this machine, cheap enough for config validation (no
compiling, no process started): DeepSpeed's optimizers (installed, ninja, a C++ compiler), CUDA
stages, NCCL and the kernels switch. Each failure is one ConfigError line that names the key and the fix.

`check_devices(job)` runs where a job starts (the CLI's validation, `train()`), not in the configs'
`__post_init__`: every worker deserialises the job, and a worker sees its own machine (a `kintsugi
join` worker sees one GPU), not the one whose processes the local launcher counts."""
from __future__ import annotations

import importlib.util
import os
import shutil

from kintsugi.trainer.config.errors import ConfigError

__all__ = ["ConfigError", "DEEPSPEED_OPTIMIZERS", "check_optimizer", "cuda_available", "check_device",
           "check_devices", "worker_env"]


def cuda_available() -> bool:
    import torch
    return bool(torch.cuda.is_available())


DEEPSPEED_OPTIMIZERS = ("deepspeed_adam", "deepspeed_cpu_adam")
_FALLBACK = "use train.optimizer=adamw"


def _deepspeed_needed(name: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"train.optimizer={name} needs DeepSpeed, which is not installed; "
                          f"pip install -e '.[deepspeed]' (or pip install deepspeed) or {_FALLBACK}")


def _accelerator() -> str:
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def check_optimizer(name: str) -> None:
    """Fail fast, without compiling anything: raises ConfigError when `name` cannot work here."""
    if name == "adamw":
        return
    if name not in DEEPSPEED_OPTIMIZERS:
        raise ConfigError(f"train.optimizer={name!r} is not valid; choose one of adamw, {', '.join(DEEPSPEED_OPTIMIZERS)}")
    _deepspeed_needed(name)
    if name == "deepspeed_cpu_adam" and not (shutil.which("ninja") or importlib.util.find_spec("ninja")):
        raise ConfigError(f"train.optimizer={name} needs ninja to compile DeepSpeed's cpu_adam op; "
                          f"pip install ninja or {_FALLBACK}")
    if name == "deepspeed_cpu_adam" and not shutil.which(os.environ.get("CXX", "c++")):
        raise ConfigError(f"train.optimizer={name} needs a C++ compiler ({os.environ.get('CXX', 'c++')}) to "
                          f"compile DeepSpeed's cpu_adam op; install g++ or {_FALLBACK}")


# --- CUDA stages, NCCL, kernels ------------------------------------------------------------------
def check_device(requested: str, num_gpus=None) -> str:
    """`train.device` resolved on this machine ("cpu" | "cuda"); ConfigError where it cannot run."""
    from kintsugi.parallel import device
    try:
        return device.resolve(requested, num_gpus)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def stage_processes(job) -> int:
    """Worker processes the local launcher starts on this machine: every slot plus the spares."""
    return job.parallel.stages * job.parallel.replicas + job.faults.spares


def check_devices(job, num_gpus=None, env=None) -> None:
    """The job's device settings against this machine (`num_gpus`: the visible GPUs, default what
    torch sees; `env`: default os.environ)."""
    from kintsugi.parallel import device
    n = device.cuda_count() if num_gpus is None else num_gpus
    env = os.environ if env is None else env
    dev = check_device(job.train.device, n)
    if job.parallel.backend == "nccl":
        if n == 0:
            raise ConfigError("parallel.backend=nccl needs CUDA stages, and no CUDA device is visible here; "
                              "use parallel.backend=auto (gloo)")
        procs = stage_processes(job)
        # Only the local launcher puts every process on this machine; the others bind per node (a
        # torchrun / Slurm task beyond the node's GPUs fails at start, naming its local rank).
        if job.launcher.name == "local" and procs > n:
            raise ConfigError(
                f"parallel.backend=nccl needs one GPU per stage process: this machine has {n} GPUs for {procs} "
                "processes (stages x replicas + faults.spares); lower them, or use parallel.backend=gloo "
                "(GPUs may be shared)")
    if job.compression.kernels == "triton":
        from kintsugi.kernels import dispatch
        interpreted = env.get("TRITON_INTERPRET", "0") in ("1", "true", "True")
        # The local launcher starts CPU workers under Triton's interpreter itself (child_env).
        if dev == "cpu" and not interpreted and job.launcher.name != "local":
            raise ConfigError("compression.kernels=triton on CPU stages runs Triton's interpreter: start the "
                              "workers with TRITON_INTERPRET=1 in their environment, or use compression.kernels=auto")
        if not dispatch.triton_available():
            raise ConfigError("compression.kernels=triton: triton cannot be imported in this environment; "
                              "install it (pip install triton) or use compression.kernels=auto")


def worker_env(job, num_gpus=None) -> dict:
    """What the local launcher adds to its workers' environment for their device settings: Triton's
    interpreter for `compression.kernels=triton` on CPU stages (triton reads TRITON_INTERPRET when
    the kernels are defined, before any job code runs in the worker)."""
    if job.compression.kernels == "triton" and check_device(job.train.device, num_gpus) == "cpu":
        return {"TRITON_INTERPRET": "1"}
    return {}
