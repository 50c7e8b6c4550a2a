"""DeepSpeed's Adam kernels as the stage's inner optimizer (`train.optimizer`).

- `deepspeed_cpu_adam`: `deepspeed.ops.adam.DeepSpeedCPUAdam`, a vectorised (AVX) C++ AdamW that
  DeepSpeed JIT-compiles on first use (g++ and ninja; ~2.5 min on a 2-core machine, then cached under
  ~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR, and loaded in ~1 s).
- `deepspeed_adam`: `deepspeed.ops.adam.FusedAdam`, the multi-tensor fused kernel. Its parameters
  must live on DeepSpeed's accelerator: CUDA on a GPU machine. On a CPU-only machine DeepSpeed
  builds a CPU variant of the op, which works for CPU parameters too.

Both are built in AdamW mode (decoupled weight decay), with StageState's param groups (per-group
`weight_decay`) and TrainConfig's lr / beta1 / beta2, eps 1e-8 as torch.optim.AdamW. Both are
`torch.optim.Optimizer` subclasses that read `group["lr"]` (and betas / weight decay) at every
step, so the per-step learning-rate schedule and `state_dict()` / `load_state_dict()` round-trips
(handoff, peer copy, checkpoints) work as with torch's AdamW. Their per-parameter state is
`{"step": int, "exp_avg", "exp_avg_sq"}`; the C++ op recomputes its bias corrections from that step.
DeepSpeed's FusedAdam keeps one step count per param group, in the state of the group's last
parameter only (the others stay 0); live rebalancing (trainer/worker.py) moves per-parameter state
between stages, which would then restart the bias correction. `build_deepspeed_adam` therefore
returns a thin FusedAdam subclass that writes the group's count into every parameter's state after
each step and resumes from the largest one before it. FusedAdam.zero_grad() takes no `set_to_none`;
StageState clears gradients itself.

Every failure (deepspeed missing, no CUDA for FusedAdam, the op cannot compile) is one ConfigError
line that names the key and the fix. `check_optimizer(name)` is the cheap test for config
validation (no build); `prebuild_optimizer(name)` compiles / loads the op once, in the launching
process, so that workers do not each wait minutes for the compiler under their start-up timeout.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, List

import torch

from kintsugi.trainer.config.environment import _FALLBACK, ConfigError, _accelerator, check_optimizer

EPS = 1e-8  # torch.optim.AdamW's default, which the adamw path uses


def _builder(name: str):
    if name == "deepspeed_cpu_adam":
        from deepspeed.ops.op_builder import CPUAdamBuilder
        return CPUAdamBuilder()
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().create_op_builder("FusedAdamBuilder")


def prebuild_optimizer(name: str) -> float:
    """Compile (first time) or load (cached) the op behind `name` in this process; returns seconds.
    Raises ConfigError with the compiler's reason when it cannot build."""
    check_optimizer(name)
    if name == "adamw":
        return 0.0
    t0 = time.time()
    try:
        builder = _builder(name)
        if builder is None:
            raise RuntimeError(f"DeepSpeed's {_accelerator()} accelerator has no such op")
        builder.load(verbose=False)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - compiler / loader errors of every kind
        raise ConfigError(f"train.optimizer={name} needs DeepSpeed's {'cpu_adam' if name == 'deepspeed_cpu_adam' else 'fused_adam'} "
                          f"op, which failed to build here ({_first_line(e)}); {_FALLBACK}") from None
    return time.time() - t0


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
    return f"{type(cause).__name__}: {lines[0][:160]}" if lines else type(cause).__name__


_FUSED_CLS = None


def _fused_adam_cls():
    """FusedAdam with a per-parameter step count (see the module docstring)."""
    global _FUSED_CLS
    if _FUSED_CLS is None:
        from deepspeed.ops.adam import FusedAdam

        class FusedAdamW(FusedAdam):
            @torch.no_grad()
            def step(self, closure=None):
                live = []
                for g in self.param_groups:
                    ps = [p for p in g["params"] if p.grad is not None]
                    start = max([int(self.state[p]["step"]) for p in ps if self.state.get(p)] + [0])
                    g["step"] = start  # FusedAdam seeds a new parameter's count from the group's
                    for p in ps:
                        if self.state.get(p):
                            self.state[p]["step"] = start
                    live.append((g, ps, start))
                loss = super().step(closure)
                for g, ps, start in live:
                    if ps:
                        g["step"] = start + 1
                        for p in ps:
                            self.state[p]["step"] = start + 1
                return loss

        _FUSED_CLS = FusedAdamW
    return _FUSED_CLS


def _params(groups: Iterable[dict]) -> List[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def build_deepspeed_adam(name: str, groups: List[dict], t: Any) -> torch.optim.Optimizer:
    """DeepSpeed's AdamW over `groups` (dicts with "params" and a per-group "weight_decay") with
    `t`'s (a TrainConfig) lr, betas and weight decay. Raises ConfigError when it cannot be built."""
    check_optimizer(name)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=False)
    kw = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=EPS, weight_decay=t.weight_decay)
    try:
        if name == "deepspeed_cpu_adam":
            bad = [p.device for p in _params(groups) if p.device.type != "cpu"]
            if bad:
                raise ConfigError(f"train.optimizer={name} steps CPU parameters only, but this stage's are on "
                                  f"{bad[0]}; use train.optimizer=deepspeed_adam on a GPU or {_FALLBACK}")
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        accel = _accelerator()
        bad = [p.device for p in _params(groups) if p.device.type != accel]
        if bad:
            raise ConfigError(f"train.optimizer={name} (FusedAdam) needs the parameters on DeepSpeed's accelerator "
                              f"({accel}), but this stage's are on {bad[0]}; use train.optimizer=deepspeed_cpu_adam "
                              f"on CPU or {_FALLBACK}")
        return _fused_adam_cls()(groups, adam_w_mode=True, **kw)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the op's JIT build or load failed
        raise ConfigError(f"train.optimizer={name} could not build DeepSpeed's op ({_first_line(e)}); {_FALLBACK}") from None
