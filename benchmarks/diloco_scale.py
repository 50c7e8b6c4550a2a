"""Claim under test: the loss gap of DiLoCo and Streaming DiLoCo to data-parallel shrinks with model size.

`benchmarks.diloco` (2 replica processes over gloo; data_parallel vs diloco vs streaming on equal
tokens) at three model sizes, each >= 10x the parameters of the one before, trained on the same
number of tokens per parameter. Everything `benchmarks.diloco` tuned is held fixed at its defaults
(inner AdamW lr 3e-3, 20 warmup steps, H = 25, outer SGD lr 1 / momentum 0, alpha 0; streaming:
P = 4, tau = 1, FP4): nothing is tuned here.

Why the batch grows with the model: equal tokens per parameter means ~14x more tokens per size step.
At a fixed batch the smallest model would get a handful of steps (not one outer sync at H = 25) or
the largest far more than this CPU box can train, so the per-replica batch grows ~sqrt(params)
(2, 8, 32 sequences) and so do the steps. The earlier sweep found a larger per-replica batch alone
narrows the gap (BENCHMARKS.md, "Where the loss gap comes from"); read the trend with that in mind.

Why a test split: the defaults of `benchmarks.diloco` were picked by a sweep on the validation split
of its corpus (the first 300 stdlib files, 2 % of them held out by hash). Losses here are measured on
files after those 300 in the same sorted listing, evenly spaced; no run has ever trained or been
tuned on them. Training data is the benchmark's default (the train split of the first 300 files).

    python -m benchmarks.diloco_scale [--tokens-per-param 4] [--out FILE]   # 56 min on 2 shared cores, load 7-13
    python -m benchmarks.diloco_scale --quick                             # smoke: few steps per size

Prints one JSON line: per size the parameter count, tokens, steps, each variant's test loss, the gap
of diloco and streaming to data_parallel and their bytes ratio; `gap_shrinks` compares the sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from kintsugi.benchmarks import diloco

SEQ_LEN = 64
TRAIN_FILES = 300  # benchmarks.diloco's --max-files: its train and validation splits come from these
TEST_FILES = 64
EVAL_SEQUENCES = 1024  # the same 1024 test sequences (66,560 tokens) for every size and variant


@dataclass(frozen=True)
class Size:
    name: str
    dim: int
    layers: int
    batch_size: int  # per replica


SIZES = (Size("small", 8, 4, 2), Size("medium", 32, 8, 8), Size("large", 128, 8, 32))
QUICK_STEPS, QUICK_SYNC_EVERY, QUICK_EVAL_SEQUENCES = 6, 2, 64


def held_out_files(num_files: int = TEST_FILES) -> list:
    """Stdlib files after the first TRAIN_FILES in the trainer's own sorted listing, evenly spaced."""
    from kintsugi.trainer.data.corpus import DataConfig, _list_files  # the listing `prepare_corpus` uses for stdlib
    _, files, _ = _list_files(DataConfig(source="stdlib"))
    rest = files[TRAIN_FILES:]
    if len(rest) < num_files:
        raise ValueError(f"only {len(rest)} stdlib files after the first {TRAIN_FILES}; lower the test file count")
    picked = [rest[i * len(rest) // num_files] for i in range(num_files)]
    assert not set(picked) & set(files[:TRAIN_FILES])
    return picked


def write_test_tokens(out_path: str) -> dict:
    """Byte-tokenize the test files as the trainer does (prepare_corpus, source=files) and write all
    their documents, whichever side of that corpus's own hash split they fall on, to one file."""
    from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
    from kintsugi.trainer.data.batches import load_tokens
    files = held_out_files()
    info = prepare_corpus(DataConfig(source="files", paths=files, seq_len=SEQ_LEN, val_fraction=0.5))
    tokens = np.concatenate([np.asarray(load_tokens(p, info.dtype)) for p in (info.train_path, info.val_path)])
    tokens.tofile(out_path)
    return {"files": info.num_files, "skipped_files": info.skipped_files, "tokens": int(len(tokens)),
            "first": os.path.basename(files[0]), "last": os.path.relpath(files[-1], os.path.dirname(files[0]))}


def _size_args(size: Size, args) -> argparse.Namespace:
    """benchmarks.diloco's own defaults, with only the model shape, batch, steps and evaluation set."""
    from kintsugi.trainer.model.llama import Llama, num_params
    base = diloco.build_parser().parse_args(["--dim", str(size.dim), "--layers", str(size.layers),
                                             "--batch-size", str(size.batch_size), "--seq-len", str(SEQ_LEN),
                                             "--max-files", str(TRAIN_FILES), "--seed", str(args.seed)])
    params = num_params(Llama(diloco._job(base).model))
    tokens_per_step = diloco.REPLICAS * size.batch_size * SEQ_LEN
    if args.quick:
        base.steps, base.sync_every = QUICK_STEPS, QUICK_SYNC_EVERY
        base.eval_batches = max(1, QUICK_EVAL_SEQUENCES // size.batch_size)
    else:
        base.steps = max(1, round(args.tokens_per_param * params / tokens_per_step))
        base.eval_batches = EVAL_SEQUENCES // size.batch_size
    base.params = params
    return base


def _gap_shrinks(sizes: list, variant: str) -> dict:
    gaps = [s["gap_vs_data_parallel"][variant] for s in sizes]
    names = [s["name"] for s in sizes]
    out = {f"{a}_to_{b}": gaps[i + 1] < gaps[i] for i, (a, b) in enumerate(zip(names, names[1:]))}
    out[f"{names[0]}_to_{names[-1]}"] = gaps[-1] < gaps[0]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens-per-param", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per size, H = {QUICK_SYNC_EVERY}")
    p.add_argument("--out", help="also write the JSON line to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

    t0, load0 = time.time(), os.getloadavg()
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        test_path = os.path.join(tmp, "test.bin")
        test = write_test_tokens(test_path)
        for size in SIZES:
            size_args = _size_args(size, args)
            r = diloco.run(size_args, eval_path=test_path)
            v = r["variants"]
            dp = v["data_parallel"]["val_loss"]
            sizes.append({
                "name": size.name, "dim": size.dim, "layers": size.layers, "params": r["params"],
                "batch_size_per_replica": size.batch_size, "steps": r["steps"],
                "tokens": r["tokens_per_variant"], "tokens_per_param": round(r["tokens_per_variant"] / r["params"], 3),
                "test_loss": {name: v[name]["val_loss"] for name in v},
                "gap_vs_data_parallel": {name: round(v[name]["val_loss"] / dp - 1, 4) for name in ("diloco", "streaming")},
                "bytes_ratio": {name: v[name]["bytes_ratio"] for name in ("diloco", "streaming")},
                "train_s": {name: v[name]["train_s"] for name in v}, "wall_s": r["wall_s"],
            })
            assert sizes[-1]["params"] == size_args.params
    summary = {
        "benchmark": "diloco_scale", "quick": args.quick, "replicas": diloco.REPLICAS, "seed": args.seed,
        "tokens_per_param": None if args.quick else args.tokens_per_param, "seq_len": SEQ_LEN,
        "held_fixed": {k: getattr(size_args, k) for k in ("lr", "warmup", "sync_every", "fragments", "overlap",
                                                          "alpha", "quant", "outer_lr", "outer_momentum")},
        "train_data": f"stdlib, first {TRAIN_FILES} files, train split (benchmarks.diloco's default)",
        "test_data": dict(test, evaluated_sequences=(QUICK_EVAL_SEQUENCES if args.quick else EVAL_SEQUENCES)),
        "sizes": sizes,
        "gap_shrinks": {name: _gap_shrinks(sizes, name) for name in ("diloco", "streaming")},
        "wall_s": round(time.time() - t0, 1),
        "load_average_1min": {"start": round(load0[0], 2), "end": round(os.getloadavg()[0], 2)},
    }
    line = json.dumps(summary)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return summary


if __name__ == "__main__":
    main()
