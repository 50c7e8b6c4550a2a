"""One pipeline stage's training state: its slice of the model, its optimizer, its last gradient norm,
and that state as one dict (`state_dict` / `load_state_dict`) to which LISA and Streaming DiLoCo
register their own parts. Checkpoints, handoff and peer packages and test dumps all use it; an
approximate rebuild takes its neighbours' `source_package` (their layers by position).

Devices: the weights, the optimizer state and the DiLoCo / LISA state live on the stage's device
(`train.device`); what leaves the stage is made of CPU tensors (packages serialise CPU copies,
`source_package` and `end_params` are CPU copies, checkpoints and dumps copy to the CPU) and what
comes in is copied into the device tensors, so a stage moves between a GPU and a CPU worker freely.
The neighbours' end-parameter copies (CheckFree+) stay in host memory: they are only read when a
neighbour is rebuilt. Per step the stage waits for its device once (`local_grad_sq`)."""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

from kintsugi.parallel.topology import per_stage_layers
from kintsugi.recovery.rebuild import from_positional, neighbour_average, to_positional

from kintsugi.trainer.config.job import JobConfig, lr_at
from kintsugi.trainer.model.llama import Llama


SOURCES = ("checkpoint", "handoff", "peer")


class StageState:
    def __init__(self, job: JobConfig, stage: int, seed_offset: int = 0, device=None):
        self.job, self.stage = job, stage
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        S = job.parallel.stages
        self.layer_ids = per_stage_layers(job.model.n_layers, S, job.parallel.layers_per_stage)[stage]
        self.is_first, self.is_last = stage == 0, stage == S - 1
        self.model = Llama(job.model, self.layer_ids, has_embedding=self.is_first, has_head=self.is_last,
                           seed=job.train.seed + seed_offset)
        # Initialised on the CPU (the same values on every device), then moved before the optimizer
        # exists, so its state is created on the device. On the CPU `.to` is a no-op.
        self.model.to(self.device)
        self.model.activation_checkpointing = job.train.activation_checkpointing
        self.lr_scale = 1.0
        self.grad_norm = 1.0          # CheckFree weight before any gradient exists
        self.step_done = -1           # last step whose optimizer step ran on this stage
        self.last_total = None        # that step's pipeline-wide gradient sq-norm (its commit record)
        self.last_skipped = False     # that step was skipped (a non-finite loss or gradient norm)
        # Copies of the neighbouring end stage's embedding / head (CheckFree+), refreshed periodically.
        self.neighbour_copy: Dict[str, torch.Tensor] = {}
        self.lisa = None              # a LisaController when lisa.enabled: owns which layers train
        self.diloco = None            # the stage's StreamingDiLoCo when replicas sync through it
        self._parts: Dict[str, tuple] = {}  # name -> (get, load, before_optimizer): see register_part
        self.optimizer = self._build_optimizer()

    # --- optimisation -----------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.job.train
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim < 2 else decay).append(p)  # norm gains are not decayed
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if t.optimizer != "adamw":  # DeepSpeed's fused / CPU Adam (trainer/optim.py)
            from kintsugi.trainer.runtime.optim import build_deepspeed_adam
            return build_deepspeed_adam(t.optimizer, groups, t)
        # foreach=False: identical per-parameter math whatever the stage holds, so a stage reproduces
        # the single-process optimizer step bit for bit.
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=False)

    def fresh_optimizer(self) -> None:
        self.optimizer = self._build_optimizer()
        if self.lisa is not None:
            self.lisa.reapply()  # the fresh optimizer must again hold only the active layers

    def zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def local_grad_sq(self) -> float:
        """This stage's squared gradient norm in float64, with one host synchronisation (on a GPU
        every float() of a device tensor waits for it). Summed parameter by parameter in order:
        a cumulative sum is sequential, as the per-parameter loop it replaces was (torch's sum()
        reduces in another order and would move the last bits, the clip and the golden losses)."""
        parts = [p.grad.detach().double().pow(2).sum() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(parts).cumsum(0)[-1]) if parts else 0.0

    def params_finite(self) -> bool:
        """Whether every weight is finite, with one host synchronisation for the lot."""
        flags = [torch.isfinite(p).all() for p in self.model.parameters()]
        return bool(torch.stack(flags).all()) if flags else True

    def apply_step(self, step: int, total_sq: float, local_sq: float) -> float:
        """Clip by the pipeline-wide norm, record this stage's clipped norm, step. Returns the global
        (pre-clip) gradient norm."""
        t = self.job.train
        total_norm = math.sqrt(max(total_sq, 0.0))
        coef = 1.0
        if t.grad_clip > 0 and total_norm > t.grad_clip:
            coef = t.grad_clip / (total_norm + 1e-6)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        self.grad_norm = math.sqrt(local_sq) * coef
        lr = lr_at(step, t) * self.lr_scale
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.zero_grad()
        self.step_done, self.last_total, self.last_skipped = step, total_sq, False
        return total_norm

    def skip_step(self, step: int) -> None:
        """A step whose loss or gradient norm was not finite: no optimizer step, its batch is spent."""
        self.zero_grad()
        self.step_done, self.last_total, self.last_skipped = step, None, True

    # --- the state, as one dict --------------------------------------------------------------------
    def register_part(self, name: str, get: Callable[[], dict], load: Callable[[dict, str], None],
                      before_optimizer: bool = False) -> None:
        """A feature adds its own state (LISA, Streaming DiLoCo): `get()` returns it, `load(sd,
        source)` takes it back, `source` being where the state comes from (`SOURCES`). A part that
        rebuilds the optimizer's parameter lists (LISA) loads `before_optimizer`."""
        self._parts[name] = (get, load, before_optimizer)

    def attach_lisa(self, lisa) -> None:
        """LISA owns which layers train; its state loads before the optimizer's (it rebuilds the
        optimizer over the saved active layers, so the parameter lists line up)."""
        self.lisa = lisa
        self.register_part("lisa", lisa.state_dict, lambda sd, source: lisa.load_state_dict(sd), before_optimizer=True)

    def attach_diloco(self, diloco) -> None:
        """Streaming DiLoCo's outer state (global copies, momentum, sync counts). A peer's state is
        another replica's trajectory: the local parameters restart from its global copies; a
        handoff or a checkpoint is this slot's own, so they are kept."""
        self.diloco = diloco
        self.register_part("diloco", lambda: diloco.state_dict(as_if_abandoned=True),
                           lambda sd, source: diloco.load_state_dict(sd, reset_local=source == "peer"))

    def state_dict(self) -> dict:
        """Everything an exact copy of this stage needs (checkpoints, handoff and peer packages, test
        dumps), keyed by name: the tensors are the live ones (callers that keep it copy it; a
        package is serialised at once). The data cursor is the step itself."""
        sd = {"layer_ids": list(self.layer_ids), "params": dict(self.model.state_dict()),
              "optimizer": self.optimizer.state_dict(), "lr_scale": self.lr_scale, "grad_norm": self.grad_norm,
              "step_done": self.step_done, "neighbour_copy": dict(self.neighbour_copy), "rng": torch.get_rng_state()}
        for name, (get, _, _) in self._parts.items():
            sd[name] = get()
        return sd

    def load_state_dict(self, sd: dict, source: str) -> None:
        """Take an exact state: `source` is "checkpoint" (this slot's own, saved earlier), "handoff"
        (this slot's leaving holder) or "peer" (the same stage of another replica, whose own
        trajectory is not ours: Streaming DiLoCo restarts the local parameters from the global copies)."""
        assert source in SOURCES, source
        if list(sd.get("layer_ids", self.layer_ids)) != list(self.layer_ids):
            raise ValueError(f"stage {self.stage}: the state holds layers {sd['layer_ids']} but this stage "
                             f"holds {self.layer_ids}; restore it with the same parallel.stages and layout")
        own = self.model.state_dict()
        with torch.no_grad():
            for k, v in sd["params"].items():
                own[k].copy_(v)
        for name, (_, load, first) in self._parts.items():
            if first and sd.get(name) is not None:
                load(sd[name], source)
        self.optimizer.load_state_dict(sd["optimizer"])
        self.lr_scale, self.grad_norm, self.step_done = sd["lr_scale"], sd["grad_norm"], sd["step_done"]
        self.neighbour_copy = dict(sd["neighbour_copy"])
        for name, (_, load, first) in self._parts.items():
            if not first and sd.get(name) is not None:
                load(sd[name], source)
        if sd.get("rng") is not None:
            torch.set_rng_state(sd["rng"])

    def source_package(self) -> dict:
        """What a neighbour sends for an approximate rebuild (CheckFree, copy): its layers keyed by
        their position in the stage (so the j-th layers of two neighbours average into the lost
        stage's j-th), its last gradient norm (the CheckFree weight), and its end-parameter copies."""
        sd = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return {"params": to_positional(sd, self.layer_ids), "layer_count": len(self.layer_ids),
                "grad_norm": self.grad_norm, "neighbour_copy": {k: v.clone() for k, v in self.neighbour_copy.items()},
                "stage": self.stage}

    def _load_positional(self, positional: Dict[str, torch.Tensor], source_count: int) -> None:
        sd = from_positional(positional, self.layer_ids, source_count)
        own = self.model.state_dict()
        with torch.no_grad():
            for k, v in sd.items():
                if k in own:
                    own[k].copy_(v)

    def rebuild_from(self, tier: str, packages: list, lr_bump: float, step: int) -> None:
        """Approximate tiers: checkfree / average / copy / checkfree_plus / random. The optimizer is
        fresh and the learning rate permanently times `lr_bump` (not compounding)."""
        if tier in ("checkfree", "average"):
            n = len(self.layer_ids)
            try:
                self._load_positional(neighbour_average(tier, packages[0], packages[1], n), n)
            except ValueError as e:
                raise RuntimeError(f"stage {self.stage}: {e}") from None
            self._restore_ends(packages)
        elif tier in ("copy", "checkfree_plus"):
            (src,) = packages
            self._load_positional({k: v for k, v in src["params"].items() if k.startswith("layers.")},
                              src["layer_count"])
            self._restore_ends(packages)
        elif tier == "random":
            self.model.reset_parameters(self.job.train.seed + 7919 * (step + 1))
        else:
            raise ValueError(f"unknown approximate tier {tier}")
        self.fresh_optimizer()
        self.lr_scale = lr_bump
        self.step_done = step - 1

    def _restore_ends(self, packages: list) -> None:
        """Embedding / final norm / head of an end stage come from the copy a neighbour kept. A rebuilt
        middle stage also takes its neighbours' end parameters as its own copy again, exactly."""
        own = self.model.state_dict()
        for pkg in packages:
            self.neighbour_copy.update({k: v for k, v in pkg["params"].items() if not k.startswith("layers.")})
        with torch.no_grad():
            for pkg in packages:
                for k, v in pkg.get("neighbour_copy", {}).items():
                    if k in own and not k.startswith("layers."):
                        own[k].copy_(v)

    def end_params(self) -> Dict[str, torch.Tensor]:
        """The parameters a neighbour keeps a copy of: embedding on the first stage, norm+head on the last."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                if not k.startswith("layers.")}

    def adopt_optimizer_state(self, param: torch.nn.Parameter, state: dict) -> None:
        """Give `param` the AdamW state `state` (another stage's, or received: CPU tensors), copied
        onto `param`'s device. Scalars (AdamW's step count) stay where torch keeps them, on the CPU."""
        self.optimizer.state[param] = {k: (v.to(param.device, copy=True) if torch.is_tensor(v) and v.dim() > 0
                                           else v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
