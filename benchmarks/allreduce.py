"""Quantized all-reduce: bytes on the wire, accuracy, codec throughput and time, per codec.

    python -m benchmarks.allreduce            # full run (CPU: sizes capped, a few minutes)
    python -m benchmarks.allreduce --quick    # < 60 s
    python -m benchmarks.allreduce --codecs-only   # codec throughput only (GPU check: vs HBM peak)

Prints ONE JSON line. Per codec: bits per element and bytes on the wire relative to fp32 (scales
and chunk padding included, from a real all-reduce); relative L2 error of the all-reduced mean of
Gaussian and Student-t(3) data across 4 gloo processes against the fp32 all-reduce; encode and
decode(-accumulate) throughput against `torch.clone` of the same tensor measured in the same run
(on CUDA also as a fraction of the GPU's peak memory bandwidth); all-reduce time against the fp32
all-reduce for each buffer size. Every process uses one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (label, codec name, block size)
CONFIGS = [
    ("none", "none", 256),
    ("bf16", "bf16", 256),
    ("fp16", "fp16", 256),
    ("int8-256", "int8", 256),
    ("fp8_e4m3-256", "fp8_e4m3", 256),
    ("fp8_e4m3-128", "fp8_e4m3", 128),
    ("int4-256", "int4", 256),
    ("int4-32", "int4", 32),
    ("fp4_e3m0-256", "fp4_e3m0", 256),
    ("fp4_e3m0-32", "fp4_e3m0", 32),
]
WORLD = 4
LINKS_GBITPS = (1.0, 10.0)  # for the modelled time on a real network link
# HBM, vendor figures; the longest name contained in torch's device name wins (H100 PCIe vs SXM).
PEAK_GBPS = {"H100": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H200": 4800.0, "A100": 2039.0,
             "A100-SXM4-80GB": 2039.0, "A100-PCIE-40GB": 1555.0}


def peak_gbps(device_name: str):
    """The HBM peak of the named GPU, or None when it is not in PEAK_GBPS."""
    names = [k for k in PEAK_GBPS if k in device_name]
    return PEAK_GBPS[max(names, key=len)] if names else None


def _codec(name: str, bs: int):
    from kintsugi.compression.api import get_codec

    return get_codec(name, bs)


def _timeit(fn, iters: int, sync=lambda: None) -> float:
    """Median seconds of `iters` calls after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def codec_throughput(numel: int, device: str, iters: int) -> dict:
    """Encode / decode-accumulate traffic (bytes read + written per second) vs torch.clone."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(1, numel, device=device)
    clone_s = _timeit(lambda: x.clone(), iters, sync)
    dst = torch.empty_like(x)
    copy_s = _timeit(lambda: dst.copy_(x), iters, sync)  # no fresh pages: the memory's own speed
    out = {"numel": numel, "clone_GBps": 8 * numel / clone_s / 1e9,
           "copy_into_GBps": 8 * numel / copy_s / 1e9, "codecs": {}}
    peak = peak_gbps(torch.cuda.get_device_name()) if device == "cuda" else None
    acc = torch.zeros(numel, device=device)
    for label, name, bs in CONFIGS:
        if name == "none":
            continue
        codec = _codec(name, bs)
        payload = codec.encode_rows(x)
        enc_s = _timeit(lambda: codec.encode_rows(x), iters, sync)
        dec_s = _timeit(lambda: codec.decode_rows(payload, numel, out=acc, accumulate=True),
                        iters, sync)
        enc_gbps = (4 * numel + payload.numel()) / enc_s / 1e9
        dec_gbps = (8 * numel + payload.numel()) / dec_s / 1e9
        row = {"encode_GBps": enc_gbps, "encode_vs_clone": enc_gbps / out["clone_GBps"],
               "encode_vs_copy_into": enc_gbps / out["copy_into_GBps"],
               "decode_acc_GBps": dec_gbps, "decode_acc_vs_clone": dec_gbps / out["clone_GBps"],
               "decode_acc_vs_copy_into": dec_gbps / out["copy_into_GBps"],
               "encode_Melem_per_s": numel / enc_s / 1e6}
        if peak:
            row.update(encode_vs_peak=enc_gbps / peak, decode_acc_vs_peak=dec_gbps / peak)
        out["codecs"][label] = row
    if peak:
        out["peak_GBps"] = peak
    return out


def _data(kind: str, numel: int, rank: int) -> torch.Tensor:
    torch.manual_seed(1234 + rank)
    if kind == "gauss":
        return torch.randn(numel)
    return torch.distributions.StudentT(3.0).sample((numel,))


def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _worker(rank: int, args: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=600))
    from kintsugi.compression.api import all_reduce

    res: dict = {"errors": {}, "times_ms": {}, "bytes_sent": {}}
    # Accuracy: every codec on the same per-rank data, against the fp32 mean.
    for kind in ("gauss", "student_t"):
        x = _data(kind, args["error_numel"], rank)
        exact = x.clone()
        dist.all_reduce(exact)
        exact /= WORLD
        for label, name, bs in CONFIGS:
            for alg in ("two_shot", "gather"):
                y = x.clone()
                all_reduce([y], _codec(name, bs), algorithm=alg)
                err = float((y - exact).norm() / exact.norm())
                res["errors"][f"{label}/{kind}/{alg}"] = err
    # Time: sync all-reduce of one buffer per size; the slowest rank's time counts.
    for size_mb in args["sizes_mb"]:
        numel = size_mb * (1 << 20) // 4
        buf = torch.randn(numel)
        iters = args["iters"] if size_mb <= 16 else max(1, args["iters"] - 1)
        for label, name, bs in CONFIGS:
            codec = _codec(name, bs)
            times = []
            for i in range(iters + 1):  # first call warms up (allocations, worker thread)
                y = buf.clone()
                dist.barrier()
                t0 = time.perf_counter()
                handle = all_reduce([y], codec, algorithm="auto")
                elapsed = _max_over_ranks(time.perf_counter() - t0)
                if i:
                    times.append(elapsed)
            res["times_ms"][f"{label}/{size_mb}"] = 1e3 * statistics.median(times)
            res["bytes_sent"][f"{label}/{size_mb}"] = handle.bytes_sent
            res["algorithm"] = res.get("algorithm", {})
            res["algorithm"][f"{label}/{size_mb}"] = handle.plan.algorithm if handle.plan else ""
    dist.barrier()
    if rank == 0:
        with open(os.path.join(out_dir, "rank0.json"), "w") as f:
            json.dump(res, f)
    os._exit(0)  # skip interpreter teardown of 4 processes; results are on disk


def run(quick: bool) -> dict:
    t_start = time.time()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    cpu_cap_mb = 4 if quick else 64
    sizes = [1, 4] if quick else [1, 4, 16, 64]
    args = {"error_numel": (1 << 18) if quick else (1 << 21), "sizes_mb": sizes,
            "iters": 2 if quick else 3}
    result = {"benchmark": "allreduce", "quick": quick, "world_size": WORLD, "backend": "gloo",
              "threads_per_process": 1, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    result["cpu_codec_throughput"] = codec_throughput((1 << 20) if quick else (1 << 24), "cpu",
                                                      2 if quick else 3)
    if torch.cuda.is_available():
        result["gpu_codec_throughput"] = codec_throughput(1 << 26, "cuda", 10)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, tmp), nprocs=WORLD, join=True)
        with open(os.path.join(tmp, "rank0.json")) as f:
            dist_res = json.load(f)
    result["sizes_mb"] = sizes
    result["size_note"] = (f"all-reduce sizes capped at {cpu_cap_mb} MB per rank (target 1-256 MB): "
                           f"{WORLD} gloo processes share {os.cpu_count()} CPU cores and the codecs "
                           "run as the torch reference on CPU")
    codecs = {}
    largest = sizes[-1]
    for label, name, bs in CONFIGS:
        codec = _codec(name, bs)
        fp32_bytes = dist_res["bytes_sent"][f"none/{largest}"]
        row = {"codec": name, "block_size": bs,
               "bits_per_element": codec.bits_per_element(1 << 24),
               "payload_ratio_vs_fp32": 32.0 / codec.bits_per_element(1 << 24),
               "wire_ratio_vs_fp32": fp32_bytes / dist_res["bytes_sent"][f"{label}/{largest}"]}
        for kind in ("gauss", "student_t"):
            for alg in ("two_shot", "gather"):
                row[f"rel_err_{kind}_{alg}"] = dist_res["errors"][f"{label}/{kind}/{alg}"]
        row["allreduce_ms"] = {str(s): dist_res["times_ms"][f"{label}/{s}"] for s in sizes}
        row["speedup_vs_fp32"] = {str(s): dist_res["times_ms"][f"none/{s}"] /
                                  dist_res["times_ms"][f"{label}/{s}"] for s in sizes}
        row["algorithm"] = {str(s): dist_res["algorithm"][f"{label}/{s}"] for s in sizes}
        # Model, not a measurement: loopback time (codec compute + local transfer) plus this
        # rank's bytes over a link of the given speed, for the largest size.
        sent = dist_res["bytes_sent"][f"{label}/{largest}"]
        row["modelled_ms_largest_size"] = {
            f"{g:g}Gbps": row["allreduce_ms"][str(largest)] + 1e3 * sent * 8 / (g * 1e9)
            for g in LINKS_GBITPS}
        for dev in ("cpu", "gpu"):  # per-codec figures move next to the codec's other figures
            per_codec = result.get(f"{dev}_codec_throughput", {}).get("codecs", {})
            if label in per_codec:
                row[f"{dev}_throughput"] = per_codec[label]
        codecs[label] = row
    for dev in ("cpu", "gpu"):
        result.get(f"{dev}_codec_throughput", {}).pop("codecs", None)
    result["codecs"] = codecs
    result["timing_note"] = ("allreduce_ms: median over iterations of the slowest rank's time for a "
                             "synchronous all-reduce over loopback; modelled_ms_largest_size adds "
                             "bytes_sent over a link of that speed (a model, not measured)")
    result["throughput_note"] = ("GBps = (bytes read + written) / s on one CPU thread; clone_GBps "
                                 "is torch.clone of the same tensor (includes first-touch page "
                                 "faults of the new buffer), copy_into_GBps copies into an existing "
                                 "one")
    result["error_numel_per_rank"] = args["error_numel"]
    result["wall_s"] = time.time() - t_start
    return result


def codecs_only() -> dict:
    """Codec throughput alone: the CPU at 1M elements and, with CUDA, the GPU at 64M (256 MB fp32)
    against torch.clone and the HBM peak."""
    t0 = time.time()
    torch.set_num_threads(1)
    result = {"benchmark": "allreduce", "codecs_only": True, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "cpu_codec_throughput": codec_throughput(1 << 20, "cpu", 2)}
    if torch.cuda.is_available():
        result["gpu_codec_throughput"] = codec_throughput(1 << 26, "cuda", 10)
    result["wall_s"] = time.time() - t0
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 60 s")
    parser.add_argument("--codecs-only", action="store_true",
                        help="only encode/decode throughput (CPU, and the GPU vs its HBM peak); no all-reduce")
    parser.add_argument("--out", help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    line = json.dumps(codecs_only() if args.codecs_only else run(args.quick))
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
