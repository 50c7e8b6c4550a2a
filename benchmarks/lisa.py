"""LISA vs full training on the same model and data: optimizer-state bytes, peak memory, step time
and loss after equal steps.

Each variant runs in a fresh subprocess, so peak memory (VmHWM from /proc/self/status, and
max_memory_allocated on a GPU) belongs to that variant alone. Every variant sees the same batches
(ShardedBatches over the stdlib corpus, same seed) and the same initial weights.

    python -m benchmarks.lisa [--steps 40] [--variants full,lisa_g1,lisa_g2]

prints ONE JSON line: {"benchmark": "lisa", "config": {...}, "variants": {name: figures}}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Variant -> LISA settings (None = full training). Reset policy: the one whose bound is the claim.
VARIANTS = {
    "full": None,
    "lisa_g1": dict(layers_per_stage=1, state_policy="reset"),
    "lisa_g2": dict(layers_per_stage=2, state_policy="reset"),
    "lisa_g1_keep": dict(layers_per_stage=1, state_policy="keep"),  # public implementations' memory
}
DEFAULT_VARIANTS = "full,lisa_g1,lisa_g2,lisa_g1_keep"
# Wide enough that optimizer state shows in RSS, small enough for ~1 s steps on one CPU thread.
MODEL = dict(dim=256, n_layers=8, n_heads=4, n_kv_heads=4, max_seq_len=128)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def run_variant(name: str, steps: int, interval: int, batch_size: int, seq_len: int) -> dict:
    """One variant in this process; returns its figures."""
    import torch

    from kintsugi.trainer.config.job import JobConfig, LisaConfig, ParallelConfig, TrainConfig
    from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
    from kintsugi.trainer.data.batches import ShardedBatches, load_tokens, val_batches
    from kintsugi.trainer.runtime.lisa import LisaController
    from kintsugi.trainer.model.llama import ModelConfig, cross_entropy_loss, num_params
    from kintsugi.trainer.runtime.stage import StageState

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_cfg = DataConfig(max_files=300, seq_len=seq_len)
    corpus = prepare_corpus(data_cfg)
    train_tokens = load_tokens(corpus.train_path, corpus.dtype)
    val_tokens = load_tokens(corpus.val_path, corpus.dtype)
    lisa_kw = VARIANTS[name]
    job = JobConfig(model=ModelConfig(vocab_size=corpus.vocab_size, **MODEL), data=data_cfg,
                    parallel=ParallelConfig(stages=1),
                    train=TrainConfig(max_steps=steps, batch_size=batch_size, microbatches=1, warmup_steps=4),
                    lisa=LisaConfig(enabled=lisa_kw is not None, interval=interval, **(lisa_kw or {})))
    batches = ShardedBatches(train_tokens, seq_len, batch_size, seed=job.train.seed)
    rss_before_kb = _proc_status_kb("VmRSS")  # interpreter + torch + data: the same for every variant
    st = StageState(job, 0)
    st.model.to(device)
    ctrl = LisaController(job.lisa, st, job.train.seed, replica=0) if job.lisa.enabled else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s, step_cpu_s, losses, state_bytes = [], [], [], 0
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        if ctrl is not None:
            ctrl.before_step(step)
        st.zero_grad()
        inputs, targets = (t.to(device) for t in batches.batch_at(step))
        loss = cross_entropy_loss(st.model(inputs), targets)
        loss.backward()
        sq = st.local_grad_sq()
        st.apply_step(step, sq, sq)
        losses.append(loss.item())  # a sync point: makes the step time honest on a GPU too
        step_s.append(time.perf_counter() - t0)
        # CPU time of this thread (torch runs single-threaded here): unlike wall time it does not
        # grow when other processes share the cores.
        step_cpu_s.append(time.thread_time() - c0)
        live = sum(v.numel() * v.element_size() for s in st.optimizer.state.values()
                   for v in s.values() if torch.is_tensor(v))
        state_bytes = max(state_bytes, ctrl.optimizer_state_bytes() if ctrl else live)
    with torch.no_grad():
        val = [cross_entropy_loss(st.model(x.to(device)), y.to(device)).item()
               for x, y in val_batches(val_tokens, seq_len, batch_size, 8)]
    out = {
        "params": num_params(st.model),
        "optimizer_state_bytes_peak": state_bytes,
        "peak_rss_mb": round(_proc_status_kb("VmHWM") / 1024, 1),
        "peak_rss_over_baseline_mb": round((_proc_status_kb("VmHWM") - rss_before_kb) / 1024, 1),
        "step_s_median": round(statistics.median(step_s[2:]), 4),  # the first steps warm up
        "step_cpu_s_median": round(statistics.median(step_cpu_s[2:]), 4),
        "train_loss_last5": round(statistics.fmean(losses[-5:]), 4),
        "val_loss": round(statistics.fmean(val), 4),
        "device": device.type,
    }
    if device.type == "cuda":
        out["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--interval", type=int, default=5, help="lisa.interval (K)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one variant, print its JSON
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, args.steps, args.interval, args.batch_size, args.seq_len)))
        return 0
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for name in names:  # sequentially: concurrent variants would share cores and skew step times
        cmd = [sys.executable, "-m", "benchmarks.lisa", "--child", name, "--steps", str(args.steps),
               "--interval", str(args.interval), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"variant {name} failed:\n{proc.stderr[-2000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({"benchmark": "lisa", "config": dict(MODEL, steps=args.steps, interval=args.interval,
                                                          batch_size=args.batch_size, seq_len=args.seq_len,
                                                          data="stdlib max_files=300, byte tokens"),
                      "variants": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
