"""LLaMA-style decoder that can be built whole or as one pipeline stage.

A stage is the same `Llama` class holding a subset of the layers (plus, optionally, the embedding
and the head). Layers are keyed by their GLOBAL index, so a parameter has the same name in the full
model and in any stage (`layers.5.attention.wq.weight`), and every parameter is initialised from
its own generator seeded by (seed, name): a stage is bitwise a slice of the full model. That is
what lets recovery copy, average and compare stage states by name across processes.

The layout follows Hugging Face's `LlamaForCausalLM` (rotate_half RoPE, untied head, SwiGLU), so
weights map 1:1 by renaming only; see `to_hf_state_dict` / `from_hf_state_dict`.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    dim: int = 128
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads / n_kv_heads query heads share a kv head
    vocab_size: int = 0  # 0 = filled from the tokenizer before the model is built
    ffn_hidden: int = 0  # 0 = LLaMA rule, see `ffn_dim`
    multiple_of: int = 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    init_from: Optional[str] = None  # local HF Llama directory

    def __post_init__(self):
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be positive; set model.{key} to an integer >= 1")
        for key in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be positive; set model.{key} to a number > 0")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size={self.vocab_size}: must be >= 0; use 0 to take it from the tokenizer")
        if self.ffn_hidden < 0:
            raise ValueError(f"model.ffn_hidden={self.ffn_hidden}: must be >= 0; use 0 for the LLaMA rule (8*dim/3 rounded up to model.multiple_of)")
        if self.dim % self.n_heads:
            raise ValueError(f"model.n_heads={self.n_heads}: model.dim={self.dim} is not divisible by it; pick n_heads dividing dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads}: model.n_heads={self.n_heads} is not divisible by it; pick n_kv_heads dividing n_heads")
        if self.head_dim % 2:
            raise ValueError(f"model.n_heads={self.n_heads}: head dim {self.head_dim} (dim/n_heads) is odd but rotary embeddings need it even; change model.dim or model.n_heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the SwiGLU block: explicit `ffn_hidden`, else LLaMA's 2/3 * 4 * dim rule."""
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics: bf16 mean-of-squares loses too much precision for large dims.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_seq_len, head_dim), frequencies repeated as [f, f] (rotate_half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.int64).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_bhtd: torch.Tensor, cos_td: torch.Tensor, sin_td: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_td.to(x_bhtd.dtype), sin_td.to(x_bhtd.dtype)
    return x_bhtd * cos + _rotate_half(x_bhtd) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_btd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_btd.shape
        q = self.wq(x_btd).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x_btd).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x_btd).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            # Explicit repeat instead of sdpa(enable_gqa=True): that flag needs torch>=2.5 and not
            # every backend honours it; the copy is small next to the attention matrix.
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


def _param_seed(seed: int, name: str) -> int:
    # Seed from (seed, name) only, so a parameter's initial value is independent of which other
    # parameters this process happens to hold. Mixed into 32 bits because torch's CPU generator
    # (mt19937) ignores the upper half of a 64-bit seed.
    return zlib.crc32(name.encode(), zlib.crc32(f"{seed}:".encode()))


class Llama(nn.Module):
    """The full model (defaults) or one pipeline stage (a subset of global layer indices)."""

    def __init__(self, cfg: ModelConfig, layer_ids: Optional[Sequence[int]] = None,
                 has_embedding: bool = True, has_head: bool = True, seed: int = 0):
        super().__init__()
        if (has_embedding or has_head) and cfg.vocab_size <= 0:
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: not filled in; set it from the tokenizer (CorpusInfo.vocab_size) before building the model")
        ids = list(range(cfg.n_layers)) if layer_ids is None else sorted(int(i) for i in layer_ids)
        if len(set(ids)) != len(ids) or any(not 0 <= i < cfg.n_layers for i in ids):
            raise ValueError(f"layer_ids={list(layer_ids)}: must be distinct indices in [0, model.n_layers={cfg.n_layers})")
        self.cfg, self.layer_ids = cfg, ids
        self.activation_checkpointing = False  # train.activation_checkpointing sets it per stage
        self.has_embedding, self.has_head = has_embedding, has_head
        if has_embedding:
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in ids})
        if has_head:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Non-persistent: derived from the config, so they stay out of state dicts and syncs.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Linear/Embedding weights ~ N(0, init_std), norm gains = 1, each from its own generator."""
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            gen = torch.Generator(device="cpu").manual_seed(_param_seed(seed, name))
            # Drawn on CPU in fp32 whatever the parameter's device/dtype, so values never depend
            # on where the stage lives.
            value = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, self.cfg.init_std, generator=gen)
            param.copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) if this holds the embedding, else hidden (B, T, dim); logits or hidden out."""
        t = x.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}; raise model.max_seq_len or lower data.seq_len")
        h = self.tok_embeddings(x) if self.has_embedding else x
        h = self._blocks(h, t)
        if self.has_head:
            return self.output(self.norm(h))
        return h


    # --- the three parts a pipeline hop may run (CheckFree+ runs them on separate hops) ---------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ids)

    def forward_layers(self, h: torch.Tensor) -> torch.Tensor:
        return self._blocks(h, h.shape[1])

    def _blocks(self, h: torch.Tensor, t: int) -> torch.Tensor:
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for i in self.layer_ids:
            block = self.layers[str(i)]
            if recompute:  # keep only the block's input; its activations are recomputed in the backward
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, use_reentrant=False)
            else:
                h = block(h, cos, sin)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over all B*T tokens, computed in fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- Hugging Face interop -------------------------------------------------------------------

_LAYER_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_TO_HF = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_FROM_HF = {v: k for k, v in _LAYER_TO_HF.items()}
_TOP_FROM_HF = {v: k for k, v in _TOP_TO_HF.items()}


def _rename(name: str, top: Dict[str, str], layer: Dict[str, str], src_prefix: str, dst_prefix: str) -> Optional[str]:
    if name in top:
        return top[name]
    if name.startswith(src_prefix):
        idx, _, rest = name[len(src_prefix):].partition(".")
        if idx.isdigit() and rest in layer:
            return f"{dst_prefix}{idx}.{layer[rest]}"
    return None


def to_hf_state_dict(sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our names -> LlamaForCausalLM names. Works on a stage's partial state dict too."""
    out = {}
    for name, tensor in sd.items():
        hf_name = _rename(name, _TOP_TO_HF, _LAYER_TO_HF, "layers.", "model.layers.")
        if hf_name is None:
            raise KeyError(f"no Hugging Face name for parameter {name!r}")
        out[hf_name] = tensor
    return out


def from_hf_state_dict(hf_sd: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """LlamaForCausalLM names -> ours. A missing lm_head means tied embeddings: the head gets a copy."""
    out = {}
    for name, tensor in hf_sd.items():
        if name.endswith("rotary_emb.inv_freq"):  # older HF checkpoints saved this derived buffer
            continue
        ours = _rename(name, _TOP_FROM_HF, _LAYER_FROM_HF, "model.layers.", "layers.")
        if ours is None:
            raise KeyError(f"Hugging Face parameter {name!r} has no counterpart in Kintsugi's Llama")
        out[ours] = tensor
    if "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return out


def hf_config(cfg: ModelConfig):
    """The `transformers.LlamaConfig` describing the same architecture (transformers is optional)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
    )


def load_hf_pretrained(directory: str, cfg: ModelConfig) -> Tuple[ModelConfig, Dict[str, torch.Tensor]]:
    """Read config.json + *.safetensors from a LOCAL Hugging Face Llama directory.

    Returns `cfg` with the architecture fields replaced by the checkpoint's, and our state dict.
    """
    from safetensors.torch import load_file

    config_path = os.path.join(os.path.expanduser(directory), "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"model.init_from={directory}: no config.json there; point it at a local Hugging Face Llama directory")
    with open(config_path) as f:
        hf = json.load(f)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"model.init_from={directory}: rope type {rope_type!r} is not supported; use a checkpoint with default RoPE")
    theta = rope.get("rope_theta", hf.get("rope_theta", cfg.rope_theta))
    new_cfg = replace(
        cfg, dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], vocab_size=hf["vocab_size"],
        ffn_hidden=hf["intermediate_size"], rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", cfg.norm_eps),
    )
    head_dim = hf.get("head_dim") or new_cfg.head_dim
    if head_dim != new_cfg.head_dim:
        raise ValueError(f"model.init_from={directory}: head_dim {head_dim} != hidden_size/num_attention_heads; such checkpoints are not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"model.init_from={directory}: checkpoint uses attention/MLP biases, which Kintsugi's Llama has none of")
    files = sorted(glob.glob(os.path.join(os.path.dirname(config_path), "*.safetensors")))
    if not files:
        raise ValueError(f"model.init_from={directory}: no *.safetensors files; save the model with safe_serialization=True")
    hf_sd: Dict[str, torch.Tensor] = {}
    for path in files:
        hf_sd.update(load_file(path))
    return new_cfg, from_hf_state_dict(hf_sd, new_cfg)
