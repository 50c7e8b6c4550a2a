"""Pipeline training throughput: Kintsugi's StageExecutor + Transport against torch.distributed.pipelining
and DeepSpeed's PipelineModule.

Every variant trains the same tiny LLaMA split into the same stages (parallel.topology.per_stage_layers),
on the same fixed batches, with the same microbatch count, one thread per process and AdamW. A step is
forward + backward of every microbatch + one optimizer step; tokens/s = steps * batch * seq / wall time.

The S stage processes are spawned once and build every variant side by side (each from the same
seeded weights), then time them in interleaved repetitions whose order flips every repetition
(ours, theirs, ..., then theirs, ours, ...), with a barrier around each timed block. The CPU is shared
with other jobs, so the headline ratio is the median of the per-repetition paired ratios, which
cancels load drift that a ratio of medians would not; `cpu_ratio` pairs the CPU seconds per step the
same way (theirs / ours: above 1 means ours costs less work).

On CUDA (`--device cuda`) each stage process binds a GPU round-robin (parallel.device.local_index, as
the local launcher does; with more stages than GPUs they share one, each with its own NCCL_HOSTID so
NCCL accepts two ranks on one card). The default group is "cpu:gloo,cuda:nccl": torch.distributed.
pipelining sends CUDA tensors over NCCL; ours either stages them through pinned host buffers over
gloo (`--backend gloo`, what the trainer runs with parallel.backend=gloo) or sends them over NCCL
(`--backend nccl`). Each timed block ends with a CUDA synchronisation before its closing barrier.

A framework is a runner class in `RUNNERS`: built per (stage, schedule) inside an initialised gloo
group whose rank equals the stage, it owns its stage module and optimizer and exposes
`step(inputs, targets) -> loss or None`. Adding a baseline is one more class and one more entry; its
ratio against ours is reported automatically. A runner class may name the schedules it runs
(`SCHEDULES`): DeepSpeed's pipeline engine has only its 1F1B TrainSchedule, so it is timed (and
compared with ours) under "1f1b" only. A framework whose package is not installed (deepspeed) is
left out and reported as `"deepspeed": {"skipped": "..."}` instead of failing the run.

    python -m benchmarks.pipeline_throughput [--stages 2] [--microbatches 4] [--steps N] [--quick]
        [--frameworks ours,torch,deepspeed] [--schedules gpipe,1f1b] [--device cpu|cuda]
        [--backend gloo|nccl]

prints one JSON line on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kintsugi.parallel.schedules import StageExecutor, actions_for, routes_for
from kintsugi.parallel.topology import per_stage_layers
from kintsugi.parallel.transport import Transport
from kintsugi.trainer.model.llama import Llama, ModelConfig, cross_entropy_loss

log = logging.getLogger("benchmarks.pipeline_throughput")  # not __name__: spawned children see __mp_main__

SCHEDULES = ("gpipe", "1f1b")
REFERENCE = "ours"  # every other framework's ratio is ours / theirs


def _tiny_llama() -> ModelConfig:
    return ModelConfig(dim=128, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=256)


@dataclass
class BenchConfig:
    stages: int = 2
    microbatches: int = 4
    # Short blocks, many repetitions: on a shared CPU the load drifts over seconds and only what runs
    # close together compares fairly (loaded 2-core box: 3-step blocks x 7 spread the paired ratios
    # over 0.75-2.3, 1-step blocks x 21 over 0.57-1.6).
    steps: int = 1             # timed steps per variant per repetition
    warmup: int = 2            # untimed steps per variant, once, before the first repetition
    repetitions: int = 21
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    seed: int = 0
    frameworks: Tuple[str, ...] = ("ours", "torch", "deepspeed")
    schedules: Tuple[str, ...] = SCHEDULES
    # The trainer always hands Transport its heartbeat's abort event, which makes every wait run in
    # a helper thread; "none" measures the plain blocking waits instead.
    ours_abort: str = "event"
    device: str = "cpu"        # cpu | cuda
    backend: str = "gloo"      # ours on CUDA: gloo (staged through host memory) | nccl
    timeout_s: float = 120.0
    model: ModelConfig = field(default_factory=_tiny_llama)

    def __post_init__(self):
        for key in ("stages", "microbatches", "steps", "repetitions", "batch_size", "seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.warmup < 1:
            raise ValueError(f"warmup={self.warmup}: must be >= 1 (the first step also infers shapes in torch.distributed.pipelining)")
        if self.stages > self.model.n_layers:
            raise ValueError(f"stages={self.stages}: more than model.n_layers={self.model.n_layers}; use fewer stages")
        if self.batch_size % self.microbatches:
            raise ValueError(f"microbatches={self.microbatches}: does not divide batch_size={self.batch_size}; pick a divisor")
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len}: exceeds model.max_seq_len={self.model.max_seq_len}")
        unknown = [f for f in self.frameworks if f not in RUNNERS]
        if unknown or not self.frameworks:
            raise ValueError(f"frameworks={list(self.frameworks)}: pick from {sorted(RUNNERS)}")
        if not self.schedules or any(s not in SCHEDULES for s in self.schedules):
            raise ValueError(f"schedules={list(self.schedules)}: pick from {list(SCHEDULES)}")
        if "1f1b" in self.schedules and "torch" in self.frameworks and self.microbatches < self.stages:
            raise ValueError(f"microbatches={self.microbatches}: Schedule1F1B needs at least stages={self.stages}; raise microbatches")
        if self.ours_abort not in ("event", "none"):
            raise ValueError(f"ours_abort={self.ours_abort!r}: use 'event' (as the trainer runs) or 'none'")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device=cuda: no CUDA device is visible here; use --device cpu")
        if self.backend not in ("gloo", "nccl") or (self.backend == "nccl" and self.device != "cuda"):
            raise ValueError(f"backend={self.backend!r}: use gloo, or nccl with --device cuda")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def stage_device(bench: BenchConfig, stage: int) -> torch.device:
    """The stage process's device: the CPU, or a GPU picked round-robin as the local launcher does."""
    if bench.device == "cpu":
        return torch.device("cpu")
    from kintsugi.parallel.device import cuda_count, local_index
    return torch.device("cuda", local_index("local", os.environ, stage, cuda_count()))


def build_stage(bench: BenchConfig, stage: int) -> Llama:
    """The stage's slice of the model; Llama.forward maps that stage's input to its output (ids or
    hidden in; hidden or logits out), which is what PipelineStage needs."""
    layer_ids = per_stage_layers(bench.model.n_layers, bench.stages)[stage]
    return Llama(bench.model, layer_ids, has_embedding=stage == 0, has_head=stage == bench.stages - 1,
                 seed=bench.seed).to(stage_device(bench, stage))


def _optimizer(model: torch.nn.Module, bench: BenchConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=bench.lr)


# --- runners: one per framework ----------------------------------------------------------------------
class StageRunner(Protocol):
    """One stage of one framework, built as RUNNERS[name](bench, stage, schedule) after the gloo
    group is up (rank == stage). It owns its module (build_stage, so weights match the others) and
    its optimizer; `step` trains on the whole batch and returns the batch-mean loss on the last stage."""

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> Optional[float]: ...


class OursRunner:
    """Kintsugi's StageExecutor over its own Transport, as trainer/worker.py drives it (no clipping
    or commit all-reduce: those are trainer features the baseline does not have)."""

    def __init__(self, bench: BenchConfig, stage: int, schedule: str):
        self.model = build_stage(bench, stage)
        self.optimizer = _optimizer(self.model, bench)
        self.routes = routes_for(bench.stages, bench.microbatches, alternate=False)
        self.actions = actions_for(schedule, stage, bench.stages, self.routes)
        abort = threading.Event() if bench.ours_abort == "event" else None
        if bench.device == "cpu":
            transport = Transport(None, abort=abort)
        else:
            device, data_group = stage_device(bench, stage), None
            if bench.backend == "nccl":
                from kintsugi.parallel.groups import NcclGroup
                # The default group's CUDA back-end is NCCL: wrapped so that the transport polls its works.
                data_group = NcclGroup(dist.distributed_c10d._get_default_group(), stage, bench.stages,
                                       "default-nccl", device=device)
            transport = Transport(None, abort=abort, device=device, data_group=data_group)
        self.executor = StageExecutor(self.model, stage, bench.stages, transport, lambda s: s,
                                      bench.model.dim, cross_entropy_loss)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> Optional[float]:
        loss = self.executor.run(inputs, targets, self.routes, self.actions)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


class TorchPipeliningRunner:
    """torch.distributed.pipelining's PipelineStage with ScheduleGPipe / Schedule1F1B."""

    def __init__(self, bench: BenchConfig, stage: int, schedule: str):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.model = build_stage(bench, stage)
        self.optimizer = _optimizer(self.model, bench)
        self.is_first, self.is_last = stage == 0, stage == bench.stages - 1
        pipe_stage = PipelineStage(self.model, stage, bench.stages, stage_device(bench, stage))
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        # scale_grads (default) divides by the microbatch count, as ours does with loss / num_mb.
        self.schedule = cls(pipe_stage, bench.microbatches, loss_fn=cross_entropy_loss)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> Optional[float]:
        args = (inputs,) if self.is_first else ()
        losses: List[torch.Tensor] = []
        if self.is_last:
            # return_outputs=False: ours does not gather the logits either.
            self.schedule.step(*args, target=targets, losses=losses, return_outputs=False)
        else:
            self.schedule.step(*args, return_outputs=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(torch.stack(losses).detach().mean()) if losses else None


class _DeepSpeedStage(torch.nn.Module):
    """One whole stage as one PipelineModule layer: LayerSpec builds it only on its own rank, from
    build_stage, so its weights are those of the other frameworks' stage."""

    def __init__(self, bench: BenchConfig, stage: int):
        super().__init__()
        self.stage = build_stage(bench, stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)


class DeepSpeedPipelineRunner:
    """DeepSpeed's PipelineModule (one LayerSpec per stage, partition_method="uniform" so stage s holds
    exactly our stage s) trained by `deepspeed.initialize(...)` and `engine.train_batch()` on CPU over
    the benchmark's gloo group. DeepSpeed's pipeline engine has one schedule, TrainSchedule (1F1B
    with gradient accumulation over the microbatches), so it runs under "1f1b" only. The optimizer
    is the same torch AdamW, handed to deepspeed.initialize; no ZeRO, no clipping, fp32."""

    SCHEDULES = ("1f1b",)

    def __init__(self, bench: BenchConfig, stage: int, schedule: str):
        import deepspeed
        from deepspeed.pipe import LayerSpec, PipelineModule

        if schedule not in self.SCHEDULES:
            raise ValueError(f"deepspeed runs schedule 1f1b only, not {schedule!r}")
        import deepspeed.ops
        # On CPU, deepspeed.comm's TorchBackend JIT-compiles a shared-memory all-reduce op (minutes on a
        # fresh machine, in every stage process at once). The pipeline moves activations point to
        # point (torch.distributed send/recv over gloo) and has no data-parallel all-reduce here, so
        # the op would not be used: mark it unavailable and keep deepspeed.comm on plain gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # What DeepSpeed's launcher would set; PipelineModule and the engine read them.
        os.environ.update(LOCAL_RANK=str(stage), RANK=str(stage), WORLD_SIZE=str(bench.stages))
        deepspeed.init_distributed(dist_backend="gloo")  # wraps the group that is already up
        self.is_last = stage == bench.stages - 1
        module = PipelineModule(layers=[LayerSpec(_DeepSpeedStage, bench, s) for s in range(bench.stages)],
                                num_stages=bench.stages, loss_fn=cross_entropy_loss, partition_method="uniform",
                                activation_checkpoint_interval=0)
        self.model = module
        micro = bench.batch_size // bench.microbatches
        config = {
            "train_batch_size": bench.batch_size, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": bench.microbatches,  # the engine averages the loss over them
            "steps_per_print": 10**9, "wall_clock_breakdown": False, "zero_optimization": {"stage": 0},
            "gradient_clipping": 0.0, "dump_state": False,
        }
        self.optimizer = _optimizer(module, bench)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=config,
                                                    dist_init_required=False)
        self.microbatches = bench.microbatches

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> Optional[float]:
        # train_batch pulls one (inputs, labels) microbatch per gradient-accumulation step: the first
        # stage reads inputs, the last reads labels. It runs forward, backward and the optimizer step.
        micro = zip(inputs.chunk(self.microbatches), targets.chunk(self.microbatches))
        loss = self.engine.train_batch(data_iter=iter(list(micro)))
        return float(loss) if self.is_last else None


RUNNERS: Dict[str, Callable[[BenchConfig, int, str], StageRunner]] = {
    "ours": OursRunner, "torch": TorchPipeliningRunner, "deepspeed": DeepSpeedPipelineRunner}


# --- one stage process ----------------------------------------------------------------------------
def _batches(bench: BenchConfig, count: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Fixed random batches, identical on every rank (the executor reads shapes off the end stages)."""
    gen = torch.Generator().manual_seed(bench.seed + 1)
    out = []
    for _ in range(count):
        ids = torch.randint(0, bench.model.vocab_size, (bench.batch_size, bench.seq_len + 1), generator=gen)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def _runs_schedule(fw: str, sched: str) -> bool:
    return sched in getattr(RUNNERS[fw], "SCHEDULES", SCHEDULES)


def _variants(bench: BenchConfig) -> List[str]:
    # Schedule-major, so each framework's block sits next to its counterpart on the same schedule.
    return [f"{fw}/{sched}" for sched in bench.schedules for fw in bench.frameworks if _runs_schedule(fw, sched)]


OPTIONAL_PACKAGES = {"deepspeed": "deepspeed"}  # framework -> the package its runner imports


def _unavailable(bench: BenchConfig) -> Dict[str, str]:
    """Frameworks that cannot run here, with the reason (checked in the parent, without importing)."""
    import importlib.util

    out = {}
    for fw in bench.frameworks:
        pkg = OPTIONAL_PACKAGES.get(fw)
        if pkg and importlib.util.find_spec(pkg) is None:
            out[fw] = f"{pkg} is not installed (pip install -e '.[{pkg}]')"
        elif fw == "deepspeed" and bench.device != "cpu":
            out[fw] = "the DeepSpeed runner is timed on CPU only"
        elif not any(_runs_schedule(fw, s) for s in bench.schedules):
            out[fw] = (f"runs schedules {list(getattr(RUNNERS[fw], 'SCHEDULES', SCHEDULES))} only, "
                       f"none of {list(bench.schedules)}")
    return out


def _build_and_warm(bench: BenchConfig, rank: int, batches) -> Tuple[Dict[str, StageRunner], Dict[str, Optional[float]]]:
    runners: Dict[str, StageRunner] = {}
    first_loss: Dict[str, Optional[float]] = {}
    for name in _variants(bench):
        fw, sched = name.split("/")
        runners[name] = RUNNERS[fw](bench, rank, sched)
        for i in range(bench.warmup):
            loss = runners[name].step(*batches[i % len(batches)])
            if i == 0:
                first_loss[name] = loss  # same weights + same batch: must agree across frameworks
    return runners, first_loss


def _sync(bench: BenchConfig) -> None:
    if bench.device == "cuda":
        torch.cuda.synchronize()  # a block is done when its kernels are, not when they were launched


def _time_blocks(bench: BenchConfig, rank: int, runners: Dict[str, StageRunner], batches) -> Dict[str, Dict[str, List[float]]]:
    """Wall and CPU seconds of each variant's block of `steps` steps, per repetition; the order flips
    every repetition so neither framework always runs first after the other."""
    times: Dict[str, Dict[str, List[float]]] = {"elapsed": {n: [] for n in runners}, "cpu": {n: [] for n in runners}}
    for rep in range(bench.repetitions):
        for name in (list(runners) if rep % 2 == 0 else list(reversed(runners))):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(bench.steps):
                runners[name].step(*batches[i % len(batches)])
            _sync(bench)
            c1 = time.process_time()  # all threads of this process, gloo's and the wait helpers' included
            dist.barrier()  # the step is done only when the slowest stage is
            times["elapsed"][name].append(time.perf_counter() - t0)
            times["cpu"][name].append(c1 - c0)
        if rank == 0:
            log.info("repetition %d/%d done", rep + 1, bench.repetitions)
    return times


def _worker(rank: int, bench: BenchConfig, init_file: str, out_dir: str) -> None:
    # stdout belongs to the parent's one JSON line; DeepSpeed's logger writes to stdout.
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(name)s: %(message)s", stream=sys.stderr)
    backend = "gloo"
    if bench.device == "cuda":
        from kintsugi.parallel.device import bind, cuda_count
        device = stage_device(bench, rank)
        bind("cuda", device.index)
        if bench.stages > cuda_count():  # stages share a GPU: NCCL accepts that only across host ids
            os.environ["NCCL_HOSTID"] = f"kintsugi-pipebench-{rank}"
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=bench.stages,
                            timeout=timedelta(seconds=bench.timeout_s))
    try:
        t_start = time.perf_counter()
        dev = stage_device(bench, rank)
        batches = [(i.to(dev), t.to(dev)) for i, t in _batches(bench, 4)]
        runners, first_loss = _build_and_warm(bench, rank, batches)
        if rank == 0:
            log.info("built and warmed up %d variants in %.1f s", len(runners), time.perf_counter() - t_start)
        times = _time_blocks(bench, rank, runners, batches)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({**times, "first_loss": first_loss}, f)


# --- driver ---------------------------------------------------------------------------------------
def run(bench: BenchConfig) -> dict:
    """Spawn the stages, time every variant, and summarise as one JSON-able dict."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned stages
    if "deepspeed" in bench.frameworks:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # its runner is timed on CPU only
    skipped = _unavailable(bench)
    if skipped:
        bench = replace(bench, frameworks=tuple(f for f in bench.frameworks if f not in skipped))
    with tempfile.TemporaryDirectory(prefix="kintsugi-pipebench-") as tmp:
        mp.start_processes(_worker, args=(bench, os.path.join(tmp, "init"), tmp), nprocs=bench.stages,
                           join=True, start_method="spawn")
        per_rank = []
        for r in range(bench.stages):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    variants = _variants(bench)
    # Barriers bracket each block, so ranks agree to within a barrier; take the slowest anyway.
    tps_reps = {v: [bench.steps * bench.tokens_per_step / max(pr["elapsed"][v][i] for pr in per_rank)
                    for i in range(bench.repetitions)] for v in variants}
    # CPU seconds per step summed over the stages: what the work costs, whatever the other load on
    # the machine (wall time is what counts, but on a shared CPU it is the noisier of the two).
    cpu_reps = {v: [sum(pr["cpu"][v][i] for pr in per_rank) / bench.steps for i in range(bench.repetitions)]
                for v in variants}
    first_loss = {v: next(pr["first_loss"][v] for pr in per_rank if pr["first_loss"][v] is not None)
                  for v in variants}
    ratios, ratio_spread, cpu_ratios = {}, {}, {}
    for fw in bench.frameworks:
        if fw == REFERENCE or REFERENCE not in bench.frameworks:
            continue
        for sched in bench.schedules:
            if f"{fw}/{sched}" not in tps_reps or f"{REFERENCE}/{sched}" not in tps_reps:
                continue
            ours, theirs = tps_reps[f"{REFERENCE}/{sched}"], tps_reps[f"{fw}/{sched}"]
            paired = sorted(a / b for a, b in zip(ours, theirs))
            key = f"{REFERENCE}_over_{fw}/{sched}"
            ratios[key] = round(statistics.median(paired), 4)
            ratio_spread[key] = [round(paired[0], 3), round(paired[-1], 3)]
            # Their CPU seconds per step over ours, paired per repetition: what each framework's own
            # work costs, much less sensitive than wall time to other jobs on a shared machine.
            cpu_ratios[key] = round(statistics.median(
                t / o for o, t in zip(cpu_reps[f"{REFERENCE}/{sched}"], cpu_reps[f"{fw}/{sched}"])), 4)
    cfg = asdict(bench)
    frameworks = {fw: {"skipped": why} for fw, why in skipped.items()}
    if "deepspeed" in bench.frameworks:
        import importlib.metadata
        frameworks["deepspeed"] = {
            "version": importlib.metadata.version("deepspeed"),
            "tokens_per_s": {v.split("/")[1]: round(statistics.median(tps_reps[v]), 1)
                             for v in variants if v.startswith("deepspeed/")},
            "ratio": {k.split("/")[1]: r for k, r in ratios.items() if k.startswith(f"{REFERENCE}_over_deepspeed/")},
            "runs": "PipelineModule (one LayerSpec per stage) + deepspeed.initialize + engine.train_batch, "
                    "TrainSchedule (1F1B), torch AdamW, ZeRO off, fp32, gloo on CPU"}
    return {
        "benchmark": "pipeline_throughput",
        "tokens_per_s": {v: round(statistics.median(t), 1) for v, t in tps_reps.items()},
        "ratio": ratios,
        "ratio_min_max": ratio_spread,
        "cpu_ratio": cpu_ratios,
        "cpu_s_per_step": {v: round(statistics.median(c), 4) for v, c in cpu_reps.items()},
        "tokens_per_s_reps": {v: [round(x, 1) for x in t] for v, t in tps_reps.items()},
        "first_step_loss": first_loss,
        "config": {k: cfg[k] for k in ("stages", "microbatches", "steps", "warmup", "repetitions",
                                       "batch_size", "seq_len", "ours_abort", "device", "backend")}
        | {"model": cfg["model"], "threads_per_process": 1},
        **frameworks,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if bench.device == "cuda" else None,
    }


def parse_args(argv: Optional[List[str]] = None) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--steps", type=int, default=BenchConfig.steps, help="timed steps per variant per repetition")
    p.add_argument("--warmup", type=int, default=BenchConfig.warmup)
    p.add_argument("--repetitions", type=int, default=BenchConfig.repetitions)
    p.add_argument("--frameworks", default=",".join(BenchConfig.frameworks),
                   help=f"comma-separated, from {sorted(RUNNERS)}")
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--ours-abort", choices=("event", "none"), default="event")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="ours on CUDA: gloo (host-staged) or nccl")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 stages, 2 steps, 1 warmup, 1 repetition")
    a = p.parse_args(argv)
    if a.quick:
        a.stages, a.steps, a.warmup, a.repetitions = 2, 2, 1, 1
    return BenchConfig(stages=a.stages, microbatches=a.microbatches, steps=a.steps, warmup=a.warmup,
                       repetitions=a.repetitions, frameworks=tuple(a.frameworks.split(",")),
                       schedules=tuple(a.schedules.split(",")), ours_abort=a.ours_abort, device=a.device,
                       backend=a.backend)


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        bench = parse_args(argv)
    except ValueError as e:  # bad input: one line, no traceback
        print(f"pipeline_throughput: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    t0 = time.time()
    result = run(bench)
    result["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
