"""Claim under test: Streaming DiLoCo nears data-parallel loss while sending >= 100x fewer bytes.

A real multi-process run: 2 replica processes (gloo, S = 1, the whole tiny model each) train three
variants one after the other on equal tokens, from the same initial weights and the same data shards:

- data_parallel: fp32 all-reduce of the gradients every step (`allreduce_gradients`);
- diloco: P = 1, no overlap, alpha = 0, fp32 outer gradients (the original DiLoCo);
- streaming: P fragments, tau >= 1, FP4 E3M0 outer gradients.

Defaults are the best measured at this scale (BENCHMARKS_diloco.md has the sweep): outer SGD lr 1,
momentum 0, alpha 0. The paper's Nesterov (0.7, 0.9) overshoots with the ~12 outer steps per
fragment a 300-step run allows; pass --outer-lr 0.7 --outer-momentum 0.9 --alpha 0.5 for it.

The inner optimizer is the trainer's own (`StageState`: AdamW, warmup + cosine, clipping). Each
variant's validation loss is measured on its global (outer) parameters. Prints one JSON line:

    python -m benchmarks.diloco [--steps 300 --sync-every 25 --fragments 4 --quant fp4 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPLICAS = 2


def _job(args, **diloco):
    from kintsugi.trainer.config.job import DilocoConfig, JobConfig, ParallelConfig, TrainConfig
    from kintsugi.trainer.data.corpus import DataConfig
    from kintsugi.trainer.model.llama import ModelConfig
    model = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2, vocab_size=256,
                        max_seq_len=args.seq_len)
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, microbatches=1, lr=args.lr,
                        warmup_steps=args.warmup, seed=args.seed)
    return JobConfig(model=model, train=train, parallel=ParallelConfig(stages=1, replicas=REPLICAS),
                     data=DataConfig(max_files=args.max_files, seq_len=args.seq_len),
                     diloco=DilocoConfig(enabled=bool(diloco), **diloco))


def _variants(args):
    outer = dict(outer_lr=args.outer_lr, outer_momentum=args.outer_momentum, sync_every=args.sync_every)
    return {
        "data_parallel": {},
        "diloco": dict(fragments=1, overlap=0, alpha=0.0, quant="none", **outer),
        "streaming": dict(fragments=args.fragments, overlap=args.overlap, alpha=args.alpha, quant=args.quant,
                          **outer),
    }


def _evaluate(model, batches) -> float:
    from kintsugi.trainer.model.llama import cross_entropy_loss
    with torch.no_grad():
        return sum(float(cross_entropy_loss(model(x), y)) for x, y in batches) / len(batches)


def _train(rank, args, name, diloco, corpus, group):
    from kintsugi.parallel.diloco import StreamingDiLoCo, allreduce_gradients
    from kintsugi.parallel.transport import ByteCounter
    from kintsugi.trainer.data.batches import ShardedBatches, load_tokens, val_batches
    from kintsugi.trainer.model.llama import cross_entropy_loss
    from kintsugi.trainer.runtime.stage import StageState

    job = _job(args, **diloco)
    st = StageState(job, 0)  # same seed on every replica: identical initial weights
    data = ShardedBatches(load_tokens(corpus.train_path, corpus.dtype), args.seq_len, args.batch_size,
                          rank, REPLICAS, args.seed)
    counter = ByteCounter()
    outer = StreamingDiLoCo(dict(st.model.named_parameters()), job.diloco, group, counter) if diloco else None
    dist.barrier(group)  # start the clock together (replica 0 was evaluating the previous variant)
    t0 = time.time()
    losses = []
    for step in range(args.steps):
        inputs, targets = data.batch_at(step)
        loss = cross_entropy_loss(st.model(inputs), targets)
        loss.backward()
        if outer is None:
            allreduce_gradients(st.model.parameters(), group, counter)
        sq = st.local_grad_sq()
        st.apply_step(step, sq, sq)
        if outer is not None:
            outer.after_inner_step(step + 1)
        if step % 50 == 0 or step == args.steps - 1:
            losses.append((step, round(loss.item(), 4)))
            if rank == 0:
                print(f"[{name}] step {step} loss {loss.item():.4f} {time.time() - t0:.1f}s", file=sys.stderr)
    if outer is not None:
        outer.finish_all()  # the syncs still in flight are part of the training time (every replica)
    train_s = time.time() - t0
    out = {"train_s": round(train_s, 4), "train_loss": losses}
    if rank != 0:
        return out
    val = val_batches(load_tokens(corpus.val_path, corpus.dtype), args.seq_len, args.batch_size, args.eval_batches)
    if outer is None:
        out["val_loss"] = _evaluate(st.model, val)
        out["bytes"] = counter.as_dict().get("data_parallel", 0)
        return out
    outer.finish_all()
    out["replica0_val_loss"] = _evaluate(st.model, val)
    with outer.use_global_params():
        out["val_loss"] = _evaluate(st.model, val)
    out.update(bytes=counter.as_dict().get("outer_sync", 0), peak_sync_bytes=outer.peak_sync_bytes,
               num_fragments=outer.num_fragments, num_syncs=outer.num_syncs)
    return out


def _proc(rank, args, corpus, store_path, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=REPLICAS,
                            timeout=timedelta(seconds=120))
    group = dist.new_group(list(range(REPLICAS)))  # the stage group (S = 1: every replica's only stage)
    results = {}
    for name, diloco in _variants(args).items():
        if name in args.only or not args.only:
            results[name] = _train(rank, args, name, diloco, corpus, group)
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    """The benchmark's options (shared with benchmarks/diloco_bandwidth.py, which adds its own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sync-every", type=int, default=25)
    p.add_argument("--fragments", type=int, default=4)
    p.add_argument("--overlap", type=int, default=1)
    p.add_argument("--alpha", type=float, default=0.0)
    p.add_argument("--quant", default="fp4")
    p.add_argument("--outer-lr", type=float, default=1.0)
    p.add_argument("--outer-momentum", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--max-files", type=int, default=300)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=[], help="run only these variants")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    summary = run(args)
    print(json.dumps(summary))
    return summary


def run(args, eval_path: str | None = None) -> dict:
    """Train the variants of `args` and return the summary `main` prints. `eval_path` (a token file
    of the corpus's dtype) replaces the validation split as the set every variant is evaluated on;
    the losses keep the name `val_loss` (benchmarks/diloco_scale.py passes a held-out test split)."""
    import dataclasses

    from kintsugi.parallel.diloco import data_parallel_bytes_per_step
    from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
    from kintsugi.trainer.model.llama import Llama, num_params
    corpus = prepare_corpus(DataConfig(max_files=args.max_files, seq_len=args.seq_len))  # once, before spawning
    if eval_path is not None:
        corpus = dataclasses.replace(corpus, val_path=eval_path)
    numel = num_params(Llama(_job(args).model))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "results.pt")
        mp.start_processes(_proc, args=(args, corpus, os.path.join(tmp, "store"), out_path), nprocs=REPLICAS,
                           start_method="spawn", join=True)
        results = torch.load(out_path, weights_only=False)
    dp_equiv = data_parallel_bytes_per_step(numel, REPLICAS) * args.steps
    dp_loss = results.get("data_parallel", {}).get("val_loss")
    for name, r in results.items():
        r["val_loss"] = round(r["val_loss"], 4)
        if name == "data_parallel":
            continue
        r["replica0_val_loss"] = round(r["replica0_val_loss"], 4)
        r["data_parallel_equivalent"] = dp_equiv
        r["bytes_ratio"] = round(dp_equiv / max(r["bytes"], 1), 1)
        # Peak bandwidth: one fragment's sync against a whole-stage sync with the same codec.
        from kintsugi.compression.api import get_codec
        from kintsugi.parallel.diloco import QUANT_CODECS
        codec = get_codec(QUANT_CODECS[_variants(args)[name]["quant"]])
        full = (REPLICAS - 1) * codec.encoded_nbytes(numel) if not codec.lossless else dp_equiv // args.steps
        r["peak_reduction_vs_whole_model_sync"] = round(full / r["peak_sync_bytes"], 2)
        if dp_loss is not None:
            r["loss_vs_data_parallel"] = round(r["val_loss"] / dp_loss - 1, 4)
    summary = {"benchmark": "diloco", "replicas": REPLICAS, "params": numel, "steps": args.steps,
               "tokens_per_variant": REPLICAS * args.batch_size * args.seq_len * args.steps,
               "sync_every": args.sync_every, "fragments": args.fragments, "overlap": args.overlap,
               "alpha": args.alpha, "quant": args.quant, "outer_lr": args.outer_lr,
               "outer_momentum": args.outer_momentum, "inner_lr": args.lr, "wall_s": round(time.time() - t0, 1),
               "variants": results}
    return summary


if __name__ == "__main__":
    main()
