"""Checks of configuration values against this machine, cheap enough for config validation (no
compiling, no process started): DeepSpeed's optimizers (installed, ninja, a C++ compiler) and CUDA.
Each failure is one ConfigError line that names the key and the fix."""
from __future__ import annotations

import importlib.util
import os
import shutil

from kintsugi.trainer.config.errors import ConfigError

__all__ = ["ConfigError", "DEEPSPEED_OPTIMIZERS", "check_optimizer", "cuda_available"]


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
