#!/usr/bin/env bash
# The GPU check: everything CUDA-specific, in one run, on a machine with 1+ NVIDIA GPUs, torch and
# triton but no package index. Under 8 minutes on one H100 / H200 (each part has its own timeout).
#
#   OUT=/some/dir scripts/gpu_check.sh            # on the GPU machine
#   OUT=/some/dir scripts/gpu_check.sh --dry-run  # on CPU (or GPU_CHECK_DRY_RUN=1): runs every part
#                                                 # it can, reports the CUDA parts as skipped
#
# Prints ONE JSON line (also $OUT/gpu_check.json); each part's log goes to $OUT (default
# outputs/gpu_check). Exit status 1 when a part failed; "skipped" (no CUDA, a dry run, too few GPUs)
# is not a failure. The trainer runs CUDA stages: a trainer run that refuses them is a failure.
#   (a) tests/gpu: the Triton kernels bitwise equal to the torch reference at 16M elements, every
#       codec; device placement, pinned staging, NCCL refusal / abort, CUDA packages loaded on CPU
#   (b) codec encode / decode bandwidth as a fraction of the GPU's HBM peak
#   (c) the trainer on CUDA: a 4-stage pipeline whose stage processes share the GPU over the
#       gloo-staged transport (train.device=cuda), model=124m: tokens/s in fp32 and bf16, loss within
#       2% of the CPU fp32 run after the same steps, and a SIGKILL of stage 2 rebuilt by CheckFree
#       (from its neighbours' CPU packages) with its detect and recover times
#   (d) ours vs torch.distributed.pipelining on CUDA (benchmarks.pipeline_throughput --device cuda,
#       ours host-staged over gloo and over NCCL)
#   (e) with 2+ GPUs: the trainer over NCCL (parallel.backend=nccl), one GPU per stage process (as
#       many stages as GPUs, at most 4, no spare): tokens/s and losses
# Python packages the trainer needs and torch does not bring (hydra-core, omegaconf, antlr4, matplotlib)
# are installed offline from wheels/ (git-ignored), built where an index is reachable with:
#   pip wheel -w wheels hydra-core omegaconf antlr4-python3-runtime matplotlib
set -u
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'; use --dry-run (or none)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-outputs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
# `kintsugi` imports from this tree whether or not it is installed: the repository root is the package.
mkdir -p "$OUT/shim" && ln -sfn "$PWD" "$OUT/shim/kintsugi"
export PYTHONPATH="$OUT/shim${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 TORCH_CPP_LOG_LEVEL=ERROR
T0=$(date +%s)
if ! $PY -c "import hydra, omegaconf, matplotlib" 2>/dev/null && [ -d wheels ]; then
  $PY -m pip install --no-index --find-links wheels hydra-core omegaconf antlr4-python3-runtime matplotlib \
    >"$OUT/pip.log" 2>&1
fi
$PY - >"$OUT/device.json" 2>"$OUT/device.log" <<'PYEOF'
import json, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = None
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(json.dumps({"torch": torch.__version__, "triton": tv, "gpus": n,
                  "gpu": torch.cuda.get_device_name() if n else None}))
PYEOF
NGPU=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['gpus'])" "$OUT/device.json" 2>/dev/null || echo 0)
if [ "$DRY" != 1 ] && [ "$NGPU" = 0 ]; then
  echo '{"check": "gpu", "error": "no CUDA device is visible; run scripts/gpu_check.sh --dry-run on CPU"}'
  exit 1
fi
skip() { echo "$2" >"$OUT/$1.skipped"; }

# The pipeline of (c): model=124m, 4 stages, the same batches everywhere; CPU fp32 is the reference.
STEPS=12
COMMON=(experiment=quick model=124m parallel.stages=4 train.batch_size=8 train.microbatches=4 data.seq_len=128
        logger=quiet recovery.strategy=checkfree)
if [ "$DRY" = 1 ]; then  # the plumbing, at CPU size
  STEPS=3
  COMMON=(experiment=quick model=tiny parallel.stages=4 train.batch_size=4 train.microbatches=2 data.seq_len=32
          logger=quiet recovery.strategy=checkfree)
fi
trainer() {  # trainer <name> <timeout> <overrides...>: one run, its log and outputs under $OUT/<name>
  local name=$1 limit=$2; shift 2
  timeout "$limit" $PY -m kintsugi.trainer "${COMMON[@]}" "hydra.run.dir=$OUT/$name" "$@" >"$OUT/$name.log" 2>&1
  echo $? >"$OUT/$name.rc"
}
# The CPU reference runs in the background while the GPU parts run (it needs only CPU cores).
trainer c_cpu_fp32 420 train.device=cpu train.max_steps=$STEPS &
CPU_REF=$!

# (a) tests/gpu (the bandwidth tests are left to (b), which measures the same thing once)
timeout 300 $PY -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/gpu -k "not bandwidth" \
  >"$OUT/a_tests_gpu.log" 2>&1
echo $? >"$OUT/a_tests_gpu.rc"

# (b) codec bandwidth; on CPU only the CPU figures
timeout 90 $PY -m kintsugi.benchmarks.allreduce --codecs-only --out "$OUT/b_codecs.json" >"$OUT/b_codecs.log" 2>&1
echo $? >"$OUT/b_codecs.rc"

# (c) on the GPU: fp32 with the kill after the compared steps, then bf16
KILL_AT=$((STEPS + 1))
if [ "$DRY" = 1 ]; then
  skip c_cuda "dry run: needs CUDA"
else
  trainer c_cuda_fp32 150 train.device=cuda train.precision=fp32 train.max_steps=$((STEPS + 5)) faults.spares=1 \
    "faults.schedule=[{step: $KILL_AT, replica: 0, stage: 2, kind: kill}]"
  trainer c_cuda_bf16 100 train.device=cuda train.precision=bf16 train.max_steps=$STEPS
fi

# (d) ours vs torch.distributed.pipelining
if [ "$DRY" = 1 ]; then
  timeout 120 $PY -m kintsugi.benchmarks.pipeline_throughput --quick --frameworks ours,torch \
    >"$OUT/d_pipeline_cpu.json" 2>"$OUT/d_pipeline_cpu.log"
  echo $? >"$OUT/d_pipeline_cpu.rc"
  skip d_pipeline_cuda "dry run: needs CUDA"
else
  for backend in gloo nccl; do
    timeout 75 $PY -m kintsugi.benchmarks.pipeline_throughput --device cuda --backend $backend --frameworks ours,torch \
      --repetitions 9 >"$OUT/d_pipeline_cuda_$backend.json" 2>"$OUT/d_pipeline_cuda_$backend.log"
    echo $? >"$OUT/d_pipeline_cuda_$backend.rc"
  done
fi

# (e) over NCCL, one GPU per stage
if [ "$DRY" = 1 ] || [ "$NGPU" -lt 2 ]; then
  skip e_nccl "needs 2+ GPUs (this machine: $NGPU)"
else
  NST=$(( NGPU < 4 ? NGPU : 4 ))
  trainer e_nccl 120 train.device=cuda parallel.backend=nccl parallel.stages=$NST faults.spares=0 train.max_steps=$STEPS
fi
wait $CPU_REF

$PY - "$OUT" "$DRY" "$STEPS" "$KILL_AT" "$(( $(date +%s) - T0 ))" >"$OUT/gpu_check.json" <<'PYEOF'
import json, os, re, sys
out, dry, steps, kill_at, wall = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def read(name, default=""):
    try:
        with open(os.path.join(out, name)) as f:
            return f.read()
    except OSError:
        return default
def last_json(name):
    lines = [l for l in read(name).splitlines() if l.strip().startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
def rc(name):
    text = read(name + ".rc").strip()
    return int(text) if text.lstrip("-").isdigit() else None
def skipped(name):
    why = read(name + ".skipped").strip()
    return {"status": "skipped", "reason": why} if why else None
def tail_line(name):
    lines = [l.strip() for l in read(name).splitlines() if l.strip()]
    return lines[-1][:400] if lines else ""
def commits(run):
    rows = [json.loads(l) for l in read(f"{run}/metrics.jsonl").splitlines() if l.strip()]
    by_step = {r["step"]: r for r in rows if "loss" in r and r.get("replica") == 0 and "val_loss" not in r}
    return [by_step[s] for s in sorted(by_step)]
def run_result(run):
    """A trainer run: passed with its commits and summary, or failed with its last log line (a
    config refusal of train.device=cuda or parallel.backend=nccl is a failure now: both run)."""
    code = rc(run)
    if code == 0:
        return {"status": "passed", "commits": commits(run), "summary": json.loads(read(f"{run}/summary.json", "{}"))}
    return {"status": "failed", "rc": code, "reason": tail_line(f"{run}.log")}
def tokens_per_s(rows, first, last):
    rows = [r for r in rows if first <= r["step"] < last and r.get("step_s")]
    return round(sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows), 1) if rows else None

dev = last_json("device.json") or {}
res = {"check": "gpu", "dry_run": dry, "device": dev}
# (a)
a_log, a_rc = read("a_tests_gpu.log"), rc("a_tests_gpu")
counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", a_log))
status = "failed" if a_rc not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors") else (
    "passed" if counts.get("passed") else "skipped")
res["a_tests_gpu"] = {"status": status, "rc": a_rc, "counts": counts}
# (b)
b = last_json("b_codecs.json")
if b is None:
    res["b_codec_bandwidth"] = {"status": "failed", "rc": rc("b_codecs"), "reason": tail_line("b_codecs.log")}
elif "gpu_codec_throughput" in b:
    g = b["gpu_codec_throughput"]
    res["b_codec_bandwidth"] = {"status": "passed", "peak_GBps": g.get("peak_GBps"), "clone_GBps": round(g["clone_GBps"], 1),
                                "codecs": {k: {m: round(v[m], 3) for m in ("encode_vs_peak", "decode_acc_vs_peak",
                                                                          "encode_vs_clone", "decode_acc_vs_clone") if m in v}
                                           for k, v in g["codecs"].items()}}
else:
    res["b_codec_bandwidth"] = {"status": "skipped", "reason": "no CUDA: CPU codec throughput only",
                                "cpu_encode_GBps": {k: round(v["encode_GBps"], 2) for k, v in b["cpu_codec_throughput"]["codecs"].items()}}
# (c)
cpu = run_result("c_cpu_fp32")
c = {"cpu_fp32": {"status": cpu["status"], **({"losses": [r["loss"] for r in cpu["commits"]]} if cpu["status"] == "passed"
                                              else {"reason": cpu.get("reason")})}}
if skipped("c_cuda"):
    c.update(skipped("c_cuda"))
else:
    fp32, bf16 = run_result("c_cuda_fp32"), run_result("c_cuda_bf16")
    if fp32["status"] == "passed" and bf16["status"] == "passed" and cpu["status"] == "passed":
        g = {r["step"]: r["loss"] for r in fp32["commits"]}
        diffs = [abs(g[r["step"]] - r["loss"]) / abs(r["loss"]) for r in cpu["commits"] if r["step"] in g]
        rebuilds = fp32["summary"].get("rebuilds", [])
        stage2 = [rb for rb in rebuilds if list(rb.get("slot", [])) == [0, 2]]
        c.update(status="passed" if diffs and max(diffs) < 0.02 and stage2 and stage2[0].get("tier") == "checkfree" else "failed",
                 device=fp32["summary"].get("config", {}).get("device"), kernels=fp32["summary"].get("config", {}).get("kernels"),
                 tokens_per_s={"fp32": tokens_per_s(fp32["commits"], 2, kill_at), "bf16": tokens_per_s(bf16["commits"], 2, steps)},
                 loss_rel_diff_vs_cpu={"max": max(diffs) if diffs else None, "last": diffs[-1] if diffs else None,
                                       "steps_compared": len(diffs)},
                 rebuild=stage2[0] if stage2 else {"error": f"no rebuild of slot [0, 2] in {rebuilds}"})
    else:
        worst = next(r for r in (fp32, bf16, cpu) if r["status"] != "passed")
        c.update(status=worst["status"], reason=worst.get("reason"))
res["c_pipeline_cuda_gloo"] = c
# (d)
def pipe(name):
    r = last_json(f"{name}.json")
    if r is None:
        return {"status": "failed", "rc": rc(name), "reason": tail_line(f"{name}.log")}
    return {"status": "passed", "ratio": r["ratio"], "tokens_per_s": r["tokens_per_s"], "config": r["config"]}
if skipped("d_pipeline_cuda"):
    res["d_vs_torch_pipelining"] = {**skipped("d_pipeline_cuda"), "cpu_quick": pipe("d_pipeline_cpu")}
else:
    d = {b: pipe(f"d_pipeline_cuda_{b}") for b in ("gloo", "nccl")}
    res["d_vs_torch_pipelining"] = {"status": "failed" if any(v["status"] == "failed" for v in d.values()) else "passed", **d}
# (e)
if skipped("e_nccl"):
    res["e_pipeline_nccl"] = skipped("e_nccl")
else:
    e = run_result("e_nccl")
    if e["status"] == "passed":
        e = {"status": "passed", "device": e["summary"].get("config", {}).get("device"),
             "tokens_per_s": tokens_per_s(e["commits"], 2, steps), "losses": [r["loss"] for r in e["commits"]]}
    res["e_pipeline_nccl"] = e
res["failed_parts"] = [k for k, v in res.items() if k[:2] in ("a_", "b_", "c_", "d_", "e_") and v.get("status") == "failed"]
if c.get("cpu_fp32", {}).get("status") == "failed":
    res["failed_parts"].append("c_pipeline_cuda_gloo.cpu_fp32")
res["wall_s"] = wall
print(json.dumps(res))
sys.exit(1 if res["failed_parts"] else 0)
PYEOF
status=$?
cat "$OUT/gpu_check.json"
exit $status
