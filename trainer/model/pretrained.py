"""Start a stage from a pretrained checkpoint (the fine-tuning path, e.g. with LISA).

Two on-disk formats, told apart by their tensor names:
- Kintsugi's own: a directory holding `model.safetensors` with the FULL model's state dict under our
  names (`layers.5.attention.wq.weight`) and `kintsugi_model.json` (the ModelConfig). `save_full_model`
  writes it.
- a local Hugging Face Llama directory: `config.json` plus one or more `*.safetensors` files (sharded
  ones too), under `LlamaForCausalLM` names.

A stage reads only its own slice: tensors are opened lazily with `safe_open`, so a stage of a large
model never holds the whole checkpoint in memory (`trainer.model.llama.load_hf_pretrained` reads every
tensor, which is fine for a whole model but not for one stage of it).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Dict, List, Tuple

import torch

from kintsugi.trainer.model.llama import Llama, ModelConfig, to_hf_state_dict

OURS_WEIGHTS = "model.safetensors"
OURS_CONFIG = "kintsugi_model.json"
# Architecture fields that must match between the checkpoint and model.*; the rest (init_std,
# max_seq_len, ...) do not change the shapes or the function the weights compute.
_ARCH_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "rope_theta", "norm_eps")


def save_full_model(model: Llama, directory: str) -> str:
    """Write a whole model in Kintsugi's format; returns the weights path."""
    from safetensors.torch import save_file

    if not (model.has_embedding and model.has_head and model.layer_ids == list(range(model.cfg.n_layers))):
        raise ValueError("save_full_model needs the whole model (every layer, embedding and head), not one stage")
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = os.path.join(directory, OURS_WEIGHTS)
    save_file(sd, path, metadata={"format": "kintsugi"})
    with open(os.path.join(directory, OURS_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(model.cfg), f, indent=1)
    return path


def checkpoint_model_config(directory: str, cfg: ModelConfig) -> ModelConfig:
    """`cfg` with its architecture fields replaced by the checkpoint's: what the entry point should
    build when model.init_from is set, so users need not repeat the architecture."""
    directory = os.path.expanduser(directory)
    if not os.path.isdir(directory):
        what = "is a file" if os.path.isfile(directory) else "does not exist"
        raise ValueError(f"model.init_from={directory} {what}; point it at a directory written by `kintsugi export` "
                         "(or trainer.model.pretrained.save_full_model) or a local Hugging Face Llama directory")
    ours = os.path.join(directory, OURS_CONFIG)
    if os.path.isfile(ours):
        saved = _read_json(ours, directory)
        keep = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "multiple_of",
                "rope_theta", "norm_eps")
        return dataclasses.replace(cfg, **{k: saved[k] for k in keep if k in saved})
    return dataclasses.replace(cfg, **_hf_architecture(directory, cfg))


def _read_json(path: str, directory: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:  # cut short, not text, unreadable
        raise ValueError(f"model.init_from={directory}: {path} cannot be read as JSON ({str(e).splitlines()[0]}); "
                         "restore the file from the original checkpoint") from None
    if not isinstance(obj, dict):
        raise ValueError(f"model.init_from={directory}: {path} is not a JSON object; restore it from the checkpoint")
    return obj


def _hf_architecture(directory: str, cfg: ModelConfig) -> dict:
    # Mirrors the checks of model.load_hf_pretrained without reading any tensor.
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model.init_from={directory}: neither {OURS_CONFIG} nor config.json there; point it "
                         "at a directory written by trainer.model.pretrained.save_full_model or a local Hugging Face Llama")
    hf = _read_json(path, directory)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if not isinstance(hf.get(k), int)]
    if missing:
        raise ValueError(f"model.init_from={directory}: {path} has no (integer) {', '.join(missing)}; it is not a "
                         "Llama config: use the config.json that came with the weights (model_type llama)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"model.init_from={directory}: only default RoPE is supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"model.init_from={directory}: checkpoint uses attention/MLP biases, which Kintsugi's Llama has none of")
    n_heads = hf["num_attention_heads"]
    if n_heads <= 0 or hf["hidden_size"] % n_heads:
        raise ValueError(f"model.init_from={directory}: {path}: num_attention_heads={n_heads} does not divide "
                         f"hidden_size={hf['hidden_size']}; the config does not match any Llama")
    if (hf.get("head_dim") or hf["hidden_size"] // n_heads) != hf["hidden_size"] // n_heads:
        raise ValueError(f"model.init_from={directory}: head_dim != hidden_size/num_attention_heads is not supported")
    return dict(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads, vocab_size=hf["vocab_size"],
                ffn_hidden=hf["intermediate_size"],
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", cfg.rope_theta))),
                norm_eps=hf.get("rms_norm_eps", cfg.norm_eps))


def _check_architecture(directory: str, want: ModelConfig) -> None:
    have = checkpoint_model_config(directory, want)
    diff = [f"model.{k}={getattr(want, k)} (checkpoint: {getattr(have, k)})" for k in _ARCH_KEYS
            if getattr(want, k) != getattr(have, k)]
    if diff:
        raise ValueError(f"model.init_from={directory}: the job's architecture differs from the checkpoint's: "
                         f"{', '.join(diff)}; set those keys to the checkpoint's values")


def _tensor_index(directory: str) -> Dict[str, str]:
    """Tensor name -> file holding it, over every safetensors file of the directory. Opening a file
    reads its header and checks that the data it announces is all there (a truncated copy fails)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ValueError(f"model.init_from={directory}: no *.safetensors files; save with safe_serialization=True")
    where: Dict[str, str] = {}
    for path in files:  # reading the headers only
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    where[name] = path
        except Exception as e:  # noqa: BLE001 - SafetensorError (no public type), OSError
            raise ValueError(f"model.init_from={directory}: {path} is not a readable safetensors file "
                             f"({str(e).splitlines()[0][:160]}); copy it again from the original checkpoint "
                             "(a truncated download looks like this)") from None
    return where


def _sources(own, cfg: ModelConfig, where: Dict[str, str]) -> Dict[str, Tuple[str, str]]:
    """Our tensor name -> (its name in the checkpoint, the file holding it, "" when absent), for the
    names in `own`, in our format or Hugging Face's (told apart by the names present)."""
    if any(name in where for name in own):
        return {k: (k, where.get(k, "")) for k in own}
    # Tied HF checkpoints store no lm_head: the head starts as a copy of the embedding.
    sources: Dict[str, Tuple[str, str]] = {}
    for theirs, ours in to_hf_state_dict({k: k for k in own}, cfg).items():  # HF name -> ours
        if theirs == "lm_head.weight" and theirs not in where:
            theirs = "model.embed_tokens.weight"
        sources[ours] = (theirs, where.get(theirs, ""))
    return sources


def check_init_from(directory: str, cfg: ModelConfig) -> None:
    """Before any worker starts: model.init_from is a model of this architecture whose every file
    reads and which holds every tensor the whole model needs. Raises ValueError (one line)."""
    directory = os.path.expanduser(directory)
    _check_architecture(directory, cfg)
    where = _tensor_index(directory)
    with torch.device("meta"):  # the names and shapes only: no memory, no initialisation
        own = Llama(cfg).state_dict()
    from safetensors import safe_open

    sources = _sources(own, cfg, where)
    missing = sorted(k for k, (_, path) in sources.items() if not path)
    if missing:
        raise ValueError(f"model.init_from={directory}: the checkpoint lacks {len(missing)} of the model's "
                         f"{len(own)} tensors, e.g. {missing[:3]}; is it a complete Llama checkpoint?")
    for path in sorted({path for _, path in sources.values()}):
        with safe_open(path, framework="pt") as f:  # shapes from the header: no tensor is read
            for ours, (theirs, p) in sources.items():
                if p == path and tuple(f.get_slice(theirs).get_shape()) != tuple(own[ours].shape):
                    raise ValueError(f"model.init_from={directory}: {theirs} in {path} has shape "
                                     f"{tuple(f.get_slice(theirs).get_shape())}, the model expects "
                                     f"{tuple(own[ours].shape)}; the checkpoint and its config disagree")


def load_into_stage(state, directory: str) -> List[str]:
    """Copy the slice of a pretrained checkpoint that `state` (a StageState) holds into its model, in
    place, so the optimizer's references stay valid. Returns the names (ours) it loaded. Every
    parameter of the stage must be found with the right shape; a mismatch raises ValueError."""
    from safetensors import safe_open

    directory = os.path.expanduser(directory)
    cfg = state.job.model
    _check_architecture(directory, cfg)
    where = _tensor_index(directory)
    own = state.model.state_dict()
    sources = _sources(own, cfg, where)
    missing = sorted(k for k, (_, path) in sources.items() if not path)
    if missing:
        raise ValueError(f"model.init_from={directory}: checkpoint lacks {len(missing)} tensors of stage "
                         f"{state.stage}, e.g. {missing[:3]}; is it a complete Llama checkpoint?")
    by_file: Dict[str, List[str]] = {}
    for ours, (_, path) in sources.items():
        by_file.setdefault(path, []).append(ours)
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for ours in names:
                    tensor = f.get_tensor(sources[ours][0])
                    if tuple(tensor.shape) != tuple(own[ours].shape):
                        raise ValueError(f"model.init_from={directory}: {sources[ours][0]} has shape "
                                         f"{tuple(tensor.shape)}, stage {state.stage} expects {tuple(own[ours].shape)}")
                    own[ours].copy_(tensor)  # casts to the parameter's dtype and device
    return sorted(own)
