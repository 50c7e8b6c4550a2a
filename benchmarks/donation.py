"""Claim: a peer donation costs the donor replica one serialisation of its stage, not a full copy
on top of it (before: a test hook built a full copy of the stage, parameters and a deep copy of the
optimizer, before checking whether test dumps were on, on every donation).

What the donor's training thread pays to serve one peer snapshot, between two of its steps, on a
real stage (a middle stage of a 4-stage split, AdamW state populated by real steps, Streaming
DiLoCo's outer state attached), measured side by side in one process:

- `before`: the old path with dumps off: the eager snapshot (trainer.runtime.rebuild.snapshot: a
  copy of `state_dict()` plus the DiLoCo global copies), then the package (`pack(state_dict())`);
- `after`: the package only (what `Donor.serve` does now; the snapshot is built only when
  KINTSUGI_DUMP_DIR is set).

Each repetition times one training step of the stage (forward + backward + optimizer step), then
`before` and `after` in alternating order; the headline is the median per-repetition excess
(serve seconds / step seconds) and the median paired ratio before / after.

    python -m benchmarks.donation [--model tiny|small] [--reps 15]

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

from kintsugi.parallel.diloco import StreamingDiLoCo
from kintsugi.recovery.rebuild import pack
from kintsugi.trainer.config.job import DilocoConfig, JobConfig, ParallelConfig, TrainConfig
from kintsugi.trainer.model.llama import ModelConfig
from kintsugi.trainer.runtime.rebuild import snapshot
from kintsugi.trainer.runtime.stage import StageState

MODELS = {"tiny": dict(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=256),
          "small": dict(dim=512, n_layers=12, n_heads=8, n_kv_heads=8, vocab_size=256, max_seq_len=512)}


def _stage(model: str):
    job = JobConfig(model=ModelConfig(**MODELS[model]), parallel=ParallelConfig(stages=4),
                    train=TrainConfig(max_steps=100, warmup_steps=1))
    st = StageState(job, 1)
    st.attach_diloco(StreamingDiLoCo(dict(st.model.named_parameters()),
                                     DilocoConfig(enabled=True, sync_every=1000, fragments=2)))
    return job, st


def _step(job, st, step: int, seq: int = 128, batch: int = 4) -> float:
    """One step of the stage as a pipeline runs it: activations in, its layers forward, a gradient
    back through them (a stand-in for the next stage's), the optimizer step. Returns seconds."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(batch, seq, job.model.dim, generator=g)
    t0 = time.perf_counter()
    st.zero_grad()
    h = st.model.forward_layers(x)
    h.backward(torch.randn(h.shape, generator=g))
    sq = st.local_grad_sq()
    st.apply_step(step, sq, sq)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    job, st = _stage(args.model)
    host = SimpleNamespace(state=st, diloco=st.diloco)
    for k in range(2):  # AdamW moments exist from here on
        _step(job, st, k)
    steps, before, after = [], [], []
    for rep in range(args.reps):
        steps.append(_step(job, st, 2 + rep))
        for variant in (("before", "after") if rep % 2 == 0 else ("after", "before")):
            t0 = time.perf_counter()
            if variant == "before":
                snapshot(host)  # what `dump(name, snapshot(host))` built before checking KINTSUGI_DUMP_DIR
            payload = pack(st.state_dict())
            (before if variant == "before" else after).append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in st.model.parameters())
    res = {"benchmark": "donation", "model": args.model, "stage_params": n_params, "package_bytes": payload.numel(),
           "reps": args.reps, "step_s": statistics.median(steps),
           "serve_before_s": statistics.median(before), "serve_after_s": statistics.median(after),
           "excess_before": statistics.median(b / s for b, s in zip(before, steps)),
           "excess_after": statistics.median(a / s for a, s in zip(after, steps)),
           "ratio_before_over_after": statistics.median(b / a for b, a in zip(before, after))}
    res = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items()}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
