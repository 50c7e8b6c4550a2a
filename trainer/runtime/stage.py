"""One pipeline stage's training state: its slice of the model, its optimizer, its last gradient norm,
and the export / import of that state that rebuilds and handoffs use."""
from __future__ import annotations

import math
from typing import Dict

import torch

from kintsugi.parallel.topology import per_stage_layers
from kintsugi.recovery.rebuild import checkfree_average, from_positional, to_positional

from kintsugi.trainer.config.job import JobConfig, lr_at
from kintsugi.trainer.model.llama import Llama


def _finite_params(params: Dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values() if torch.is_tensor(v) and v.is_floating_point())


def _finite_norm(x) -> float:
    """A gradient norm as a CheckFree weight: a non-finite one counts as zero (the 1e-4 floor stays)."""
    return float(x) if math.isfinite(float(x)) else 0.0


class StageState:
    def __init__(self, job: JobConfig, stage: int, seed_offset: int = 0):
        self.job, self.stage = job, stage
        S = job.parallel.stages
        self.layer_ids = per_stage_layers(job.model.n_layers, S, job.parallel.layers_per_stage)[stage]
        self.is_first, self.is_last = stage == 0, stage == S - 1
        self.model = Llama(job.model, self.layer_ids, has_embedding=self.is_first, has_head=self.is_last,
                           seed=job.train.seed + seed_offset)
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
        sq = 0.0
        for p in self.model.parameters():
            if p.grad is not None:
                sq += float(p.grad.detach().double().pow(2).sum())
        return sq

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

    # --- state for rebuilds ---------------------------------------------------------------------------
    def positional_params(self) -> Dict[str, torch.Tensor]:
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return to_positional(sd, self.layer_ids)

    def export(self, exact: bool, in_flight_ok: bool = False) -> dict:
        """The stage's state for a rebuild. `in_flight_ok`: a peer snapshot taken while outer syncs
        are in flight (they have not touched the global copies; the receiver redoes them)."""
        pkg = {"params": self.positional_params(), "layer_count": len(self.layer_ids), "grad_norm": self.grad_norm,
               "neighbour_copy": {k: v.clone() for k, v in self.neighbour_copy.items()}, "stage": self.stage}
        if exact:
            pkg.update(optimizer=self.optimizer.state_dict(), lr_scale=self.lr_scale, step_done=self.step_done)
            if self.lisa is not None:
                pkg["lisa"] = self.lisa.state_dict()
            if self.diloco is not None:
                pkg["diloco"] = self.diloco.state_dict(as_if_abandoned=in_flight_ok)
        return pkg

    def import_exact(self, pkg: dict) -> None:
        self._load_params(pkg["params"], pkg["layer_count"])
        if self.lisa is not None and "lisa" in pkg:
            self.lisa.load_state_dict(pkg["lisa"])  # first: it rebuilds the optimizer's param lists
        self.optimizer.load_state_dict(pkg["optimizer"])
        self.lr_scale, self.step_done, self.grad_norm = pkg["lr_scale"], pkg["step_done"], pkg["grad_norm"]
        if self.diloco is not None and "diloco" in pkg:
            # Peer tier: the global parameters and outer momentum of a live replica; the local
            # parameters start from the global ones (exact up to the peer's last sync).
            self.diloco.load_state_dict(pkg["diloco"], reset_local=True)
        self.neighbour_copy = dict(pkg["neighbour_copy"])

    def _load_params(self, positional: Dict[str, torch.Tensor], source_count: int, strict_extra: bool = False):
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
            prev, nxt = packages
            # A neighbour holding non-finite weights is never averaged in: the other one is copied
            # (weight 0), and with both bad there is nothing sound to rebuild from.
            ok = [_finite_params(p["params"]) for p in packages]
            if not any(ok):
                raise RuntimeError(f"stage {self.stage}: both neighbours hold non-finite weights; no rebuild from them")
            w_prev = (_finite_norm(prev["grad_norm"]) + 1e-4 if tier == "checkfree" else 1.0) if ok[0] else 0.0
            w_next = (_finite_norm(nxt["grad_norm"]) + 1e-4 if tier == "checkfree" else 1.0) if ok[1] else 0.0
            n = len(self.layer_ids)
            a = to_positional(from_positional(prev["params"], range(n), prev["layer_count"]), range(n))
            b = to_positional(from_positional(nxt["params"], range(n), nxt["layer_count"]), range(n))
            if not ok[0]:   # 0 x NaN is NaN: a left-out side is not averaged at all
                a = {k: v for k, v in b.items()}
            elif not ok[1]:
                b = {k: v for k, v in a.items()}
            self._load_params(checkfree_average(a, b, w_prev if ok[0] else 1.0, w_next if ok[1] else 1.0), n)
            self._restore_ends(packages)
        elif tier in ("copy", "checkfree_plus"):
            (src,) = packages
            self._load_params({k: v for k, v in src["params"].items() if k.startswith("layers.")},
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
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.startswith("layers.")}
