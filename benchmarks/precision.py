"""Claim: bf16 autocast and activation checkpointing train like fp32 (validation loss within 2 %
after the same steps) and what they cost or save on this machine (issue: "Train on GPUs ...
precision and memory").

Four real runs of `python -m trainer` (tiny model, 4 stage processes over gloo, no faults, the same
seed and batches), one after the other: fp32, fp32 + activation checkpointing, bf16, bf16 +
activation checkpointing. Reported per run: final validation loss (and its relative difference to
fp32), steady tokens/s (commit times after the first 3 steps) as a ratio to fp32 from the same
invocation, and `memory.peak_bytes` per stage (peak RSS of each stage process on CPU; on CUDA the
allocator's peak). On CPU bf16 has no fast matrix units: its speed here says nothing about a GPU.

    python -m benchmarks.precision [--steps 60]

Prints one JSON line; runs are kept under outputs/benchmarks/precision/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from kintsugi.benchmarks._runs import REPORT_DIR, rnd, run_job, steady_tokens_per_s

VARIANTS = {
    "fp32": [],
    "fp32_ckpt": ["train.activation_checkpointing=true"],
    "bf16": ["train.precision=bf16"],
    "bf16_ckpt": ["train.precision=bf16", "train.activation_checkpointing=true"],
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    out = os.path.join(REPORT_DIR, "precision")
    shutil.rmtree(out, ignore_errors=True)
    common = [f"train.max_steps={args.steps}", "train.eval_every=0", "train.eval_batches=4", "data.max_files=300",
              "train.warmup_steps=5"]
    runs = {}
    for name, extra in VARIANTS.items():
        res = run_job(name, os.path.join(out, name), common + extra)
        if not res.ok:
            raise SystemExit(f"{name}: {res.error}")
        s = res.summary
        runs[name] = {"final_val_loss": s["final_val_loss"], "tokens_per_s": steady_tokens_per_s(res.commits, 3),
                      "peak_bytes": s["memory"]["peak_bytes"]}
    ref = runs["fp32"]
    for name, r in runs.items():
        r["val_loss_rel_diff_vs_fp32"] = rnd((r["final_val_loss"] - ref["final_val_loss"]) / ref["final_val_loss"])
        r["speed_vs_fp32"] = rnd(r["tokens_per_s"] / ref["tokens_per_s"]) if r["tokens_per_s"] else None
        r["peak_bytes_vs_fp32"] = {k: rnd(v / ref["peak_bytes"][k]) for k, v in r["peak_bytes"].items()}
        r["tokens_per_s"] = rnd(r["tokens_per_s"], 1)
    result = {"benchmark": "precision", "steps": args.steps, "model": "tiny", "stages": 4, "device": "cpu",
              "runs": runs}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
