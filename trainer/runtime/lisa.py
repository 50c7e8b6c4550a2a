"""LISA: layerwise sampling of the trainable decoder layers of one pipeline stage.

Owns three things:
- `sample_layers`: which `gamma` of a stage's layers train during interval k. A pure function of
  (seed, k, stage[, replica], scores), so every process of a job agrees without talking and a resumed
  run samples the same sets. Uniform without replacement by default; `importance` uses systematic
  (Madow) sampling, whose inclusion probabilities are exactly k*p_i (after capping at 1).
- `LisaController`: applies the active set to a `StageState` at each interval switch. Frozen layers
  get requires_grad=False (activation gradients still flow through them, weight gradients are never
  computed) and are left out of the optimizer entirely, so weight decay and stale momentum cannot
  move them. The optimizer is rebuilt per switch with optimizer state only for what trains, so its
  memory stays at the active-set size however long the run (`state_policy` reset / offload), unlike
  public implementations whose single optimizer accumulates state for every layer ever sampled.
- the controller's `state_dict`, enough to resume the same active sets, scores and parked moments.

The learning rate is not touched here: `StageState.apply_step` sets it from `lr_at(step)` on every
step, so the schedule runs on across optimizer rebuilds.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from kintsugi.trainer.config.job import LisaConfig

log = logging.getLogger(__name__)

# Mixed into every sampler seed so LISA's stream never coincides with another user of train.seed.
_DOMAIN = 0x4C495341  # "LISA"
# Share of the importance distribution spread uniformly: a layer whose last interval moved little
# must still be revisited now and then, or its score could never recover.
_EXPLORE = 0.1

Scores = Union[Mapping[int, float], Sequence[float]]


# ---- sampling ------------------------------------------------------------------------------------

def inclusion_probabilities(weights: Sequence[float], k: int) -> np.ndarray:
    """pi_i = min(1, c * w_i) with c chosen so that sum(pi) == k: units whose share exceeds 1/k are
    taken surely and the rest of the budget is spread over the others in proportion to w."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("importance weights must be a 1-D array of finite, non-negative numbers")
    if not 0 <= k <= int(np.count_nonzero(w)):
        raise ValueError(f"cannot sample {k} units: only {int(np.count_nonzero(w))} have positive weight")
    pi = np.zeros_like(w)
    sure = np.zeros(w.shape, dtype=bool)
    while True:  # at most k rounds: each round caps at least one more unit or stops
        free = ~sure & (w > 0)
        budget = k - int(sure.sum())
        pi[free] = budget * w[free] / w[free].sum() if budget else 0.0
        newly = free & (pi >= 1.0)
        if not newly.any():
            break
        sure |= newly
        pi[sure] = 1.0
    return pi


def systematic_sample(probs: Sequence[float], k: int, rng: np.random.Generator) -> List[int]:
    """k distinct indices, index i included with probability exactly pi_i = min(1, c*p_i) (see
    `inclusion_probabilities`). Madow's systematic sampling over a random order: lay the pi_i end to
    end on [0, k), drop the points u, u+1, ..., u+k-1 with u ~ U[0, 1); each interval (length <= 1)
    catches at most one point, and catches one with probability equal to its length. The random
    order makes joint inclusions depend on nothing but the draw. (np.random.choice(p=...,
    replace=False) draws sequentially and gives inclusion probabilities that are NOT k*p_i.)"""
    pi = inclusion_probabilities(probs, k)
    if k == 0:
        return []
    order = rng.permutation(len(pi))
    cum = np.cumsum(pi[order])
    cum *= k / cum[-1]  # absorb rounding so the last interval ends exactly at k
    points = rng.random() + np.arange(k)
    picks = np.minimum(np.searchsorted(cum, points, side="right"), len(pi) - 1)
    chosen = sorted(int(i) for i in order[picks])
    assert len(set(chosen)) == k, "systematic sampling picked a unit twice"
    return chosen


def _rng(seed: int, interval: int, stage: int, replica: int, per_replica: bool) -> np.random.Generator:
    words = [_DOMAIN, seed, interval, stage, int(per_replica), replica if per_replica else 0]
    return np.random.default_rng([w & 0xFFFFFFFFFFFFFFFF for w in words])  # SeedSequence wants >= 0


def sample_layers(layer_ids: Sequence[int], gamma: int, seed: int, interval: int, stage: int,
                  replica: int = 0, per_replica: bool = False,
                  scores: Optional[Scores] = None) -> List[int]:
    """The sorted global layer ids that train during `interval`. Pure: no global RNG, no state.

    `scores` (a mapping layer id -> weight, or a sequence aligned with sorted `layer_ids`) switches
    to importance sampling with inclusion probabilities proportional to the weights (capped at 1)."""
    ids = sorted(int(i) for i in layer_ids)
    if gamma < 1:
        raise ValueError(f"lisa.layers_per_stage={gamma} must be >= 1")
    if gamma >= len(ids):
        return ids
    rng = _rng(seed, interval, stage, replica, per_replica)
    if scores is None:
        picks = rng.choice(len(ids), size=gamma, replace=False)
    else:
        weights = [scores[i] for i in ids] if isinstance(scores, Mapping) else list(scores)
        if len(weights) != len(ids):
            raise ValueError(f"got {len(weights)} importance scores for {len(ids)} layers")
        picks = systematic_sample(weights, gamma, rng)
    return sorted(ids[int(j)] for j in picks)


# ---- the controller ------------------------------------------------------------------------------

def _move_state(st: dict, device: torch.device) -> dict:
    # Only the moment tensors move; AdamW keeps its scalar `step` on the CPU unless capturable, and
    # must find it where it left it. Synchronous copies: a switch happens once per K steps.
    return {k: (v.to(device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}


def _state_bytes(st: dict) -> int:
    return sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))


class LisaController:
    """Applies LISA to one `StageState`: call `before_step(step)` before each step's forward."""

    def __init__(self, cfg: LisaConfig, state, seed: int, replica: int):
        self.cfg, self.state, self.seed, self.replica = cfg, state, seed, replica
        self.layer_ids: List[int] = sorted(state.layer_ids)
        self.gamma = min(cfg.layers_per_stage, len(self.layer_ids))
        if cfg.layers_per_stage > len(self.layer_ids):
            log.warning("lisa.layers_per_stage=%d exceeds stage %d's %d layers; all of them train",
                        cfg.layers_per_stage, state.stage, len(self.layer_ids))
        model = state.model
        self._layer_params: Dict[int, List[torch.nn.Parameter]] = {
            i: list(model.layers[str(i)].parameters()) for i in self.layer_ids}
        # Embedding / final norm / head: always trainable unless lisa.freeze_embeddings.
        self._end_params = [p for n, p in model.named_parameters() if not n.startswith("layers.")]
        self._interval: Optional[int] = None  # interval whose active set is applied; None = none yet
        self._active: List[int] = []
        # Moments of frozen layers: `offload` parks them on the CPU, `keep` on the parameter device.
        self._stash: Dict[int, List[Optional[dict]]] = {}
        # Importance sampling: each layer's distance travelled per active step, and the CPU copy of
        # an active layer's weights at activation that the distance is measured from.
        self._scores: Dict[int, float] = {}
        self._anchors: Dict[int, dict] = {}

    # --- public API -------------------------------------------------------------------------------
    @property
    def active_layers(self) -> List[int]:
        return list(self._active)

    def before_step(self, step: int) -> bool:
        """Apply interval step // K's active set if it is not applied yet (switches at step % K == 0,
        and on the first step after a start or a resume mid-interval). Returns True on a switch."""
        k = step // self.cfg.interval
        if k == self._interval:
            return False
        scores = self._importance_weights(step) if self.cfg.sampling == "importance" else None
        new = sample_layers(self.layer_ids, self.gamma, self.seed, k, self.state.stage, self.replica,
                            self.cfg.per_replica, scores)
        self._switch(new, step)
        self._interval = k
        log.debug("stage %d interval %d: layers %s train", self.state.stage, k, new)
        return True

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state on the parameters' device: the live optimizer plus, with the
        `keep` policy, moments kept for frozen layers. Offloaded moments are in `offloaded_bytes`."""
        live = sum(_state_bytes(st) for st in self.state.optimizer.state.values())
        if self.cfg.state_policy != "keep":
            return live
        return live + sum(_state_bytes(st) for sts in self._stash.values() for st in sts if st)

    def offloaded_bytes(self) -> int:
        if self.cfg.state_policy != "offload":
            return 0
        return sum(_state_bytes(st) for sts in self._stash.values() for st in sts if st)

    def reapply(self) -> None:
        """After something replaced `state.optimizer` (a CheckFree rebuild's fresh optimizer): put
        the active set back, with fresh moments. Parked moments belonged to the old weights and are
        dropped; importance anchors restart from the rebuilt weights."""
        self._stash.clear()
        self.state.optimizer = self._build_optimizer()
        if self.cfg.sampling == "importance":
            step = self.state.step_done + 1
            self._anchors = {i: self._anchor(i, step) for i in self._active}

    def state_dict(self) -> dict:
        """Everything LISA adds to a stage's state. The live optimizer's state is the stage's own
        (`StageState.optimizer.state_dict()`); restore it AFTER `load_state_dict`, which rebuilds
        the optimizer over the saved active set so that the parameter lists line up."""
        return {"layer_ids": list(self.layer_ids), "state_policy": self.cfg.state_policy,
                "interval": self._interval, "active": list(self._active),
                "scores": dict(self._scores),
                "anchors": {i: {"step": a["step"], "params": [t.clone() for t in a["params"]]}
                            for i, a in self._anchors.items()},
                # Copies: on a CPU-only stage a parked tensor IS the one a re-sampled layer's
                # optimizer later updates in place, and a saved state must not change after saving.
                "stash": {i: [{k: (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v)
                               for k, v in st.items()} if st else None for st in sts]
                          for i, sts in self._stash.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["layer_ids"]) != self.layer_ids:
            raise ValueError(f"LISA state was saved for layers {sd['layer_ids']} but this stage holds "
                             f"{self.layer_ids}; restore it with the same model.n_layers and parallel.stages")
        if sd["state_policy"] != self.cfg.state_policy:
            log.warning("LISA state saved with lisa.state_policy=%s, resuming with %s; parked moments "
                        "are dropped", sd["state_policy"], self.cfg.state_policy)
        self._interval, self._scores = sd["interval"], {int(i): float(s) for i, s in sd["scores"].items()}
        self._anchors = {int(i): {"step": a["step"], "params": [t.clone() for t in a["params"]]}
                         for i, a in sd["anchors"].items()}
        self._stash = {}
        if sd["state_policy"] == self.cfg.state_policy and self.cfg.state_policy != "reset":
            for i, sts in sd["stash"].items():
                dev = self._layer_params[int(i)][0].device if self.cfg.state_policy == "keep" else torch.device("cpu")
                self._stash[int(i)] = [_move_state(st, dev) if st else None for st in sts]
        self._active = [int(i) for i in sd["active"]]
        self._set_trainable(set(self._active))
        self.state.optimizer = self._build_optimizer()

    # --- internals --------------------------------------------------------------------------------
    def _set_trainable(self, active: set) -> None:
        for i, params in self._layer_params.items():
            for p in params:
                p.requires_grad_(i in active)
                if i not in active:
                    p.grad = None
        for p in self._end_params:
            p.requires_grad_(not self.cfg.freeze_embeddings)
            if self.cfg.freeze_embeddings:
                p.grad = None

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The stage's AdamW over what trains, with StageState's two groups (decay / no_decay) and
        the same hyperparameters, so with every layer active the math is bitwise the stage's own."""
        t = self.state.job.train
        decay, no_decay = [], []
        for p in self.state.model.parameters():  # module order, as StageState builds its groups
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if t.optimizer != "adamw":
            from kintsugi.trainer.runtime.optim import build_deepspeed_adam
            return build_deepspeed_adam(t.optimizer, groups, t)
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=False)

    def _switch(self, new: List[int], step: int) -> None:
        if self.cfg.sampling == "importance":  # measure each active layer from its interval's start
            self._anchors = {i: self._anchor(i, step) for i in new}
        if self._interval is not None and new == self._active:
            return  # same set (e.g. gamma = all layers): nothing to change, keep the optimizer
        old_opt, new_set, policy = self.state.optimizer, set(new), self.cfg.state_policy
        for i in self.layer_ids:
            if i in new_set:
                continue
            moments = [old_opt.state.pop(p, None) for p in self._layer_params[i]]
            if any(moments) and policy != "reset":
                dev = torch.device("cpu") if policy == "offload" else self._layer_params[i][0].device
                self._stash[i] = [_move_state(m, dev) if m else None for m in moments]
        self._set_trainable(new_set)
        opt = self._build_optimizer()
        for i in new:
            parked = self._stash.pop(i, None)
            for j, p in enumerate(self._layer_params[i]):
                if p in old_opt.state:  # stayed active: its moments carry on
                    opt.state[p] = old_opt.state[p]
                elif parked is not None and parked[j]:
                    opt.state[p] = _move_state(parked[j], p.device)
        for p in self._end_params:
            if p.requires_grad and p in old_opt.state:
                opt.state[p] = old_opt.state[p]
        self.state.optimizer = opt
        self._active = list(new)

    # importance scores: distance travelled per active step -----------------------------------------
    def _anchor(self, i: int, step: int) -> dict:
        return {"step": step, "params": [p.detach().to("cpu", copy=True) for p in self._layer_params[i]]}

    def _record_distance(self, i: int, step: int) -> None:
        anchor = self._anchors.pop(i)
        sq = sum(float((p.detach().cpu().double() - a.double()).pow(2).sum())
                 for p, a in zip(self._layer_params[i], anchor["params"]))
        self._scores[i] = sq ** 0.5 / max(1, step - anchor["step"])

    def _importance_weights(self, step: int) -> Dict[int, float]:
        """Score-proportional weights mixed with a uniform floor. Layers not measured yet (never
        active, or active right now) get the best score seen: unseen layers are explored first."""
        for i in list(self._anchors):  # close the running interval's measurements first
            self._record_distance(i, step)
        known = [s for s in self._scores.values() if s > 0]
        best = max(known) if known else 1.0
        raw = {i: (self._scores.get(i) or best) for i in self.layer_ids}
        total, n = sum(raw.values()), len(self.layer_ids)
        return {i: (1 - _EXPLORE) * raw[i] / total + _EXPLORE / n for i in self.layer_ids}
