"""Typed job configuration.

Hydra composes YAML from `conf/`; `to_job_config` turns the result into these dataclasses once, at
the entry point. Nothing below `trainer/` sees a DictConfig. Each field check lives in the
`__post_init__` of the dataclass that owns it, cross-field checks in `JobConfig.__post_init__`; every
failure is a `ConfigError` whose message is one line naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from kintsugi.trainer.config.environment import check_device as _check_device, check_optimizer
from kintsugi.trainer.config.errors import ConfigError, check as _check, choice as _choice, seconds as _seconds
from kintsugi.trainer.config.faults import FaultsConfig
from kintsugi.trainer.data.corpus import DataConfig
from kintsugi.trainer.model.llama import ModelConfig


@dataclass
class TrainConfig:
    max_steps: int = 200
    seed: int = 0
    batch_size: int = 16          # sequences per replica per step
    microbatches: int = 4
    lr: float = 3e-3
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # global norm over the whole pipeline; 0 disables
    optimizer: str = "adamw"
    eval_every: int = 50          # 0 = only at the end
    eval_batches: int = 8
    log_every: int = 1
    resume: Optional[str] = None
    # A step whose loss or gradient norm is not finite is skipped on every stage of the replica; this
    # many in a row and the replica rolls back (to its outer global copy under Streaming DiLoCo, else
    # the last checkpoint) with half the learning rate, or the run stops saying so.
    max_nonfinite: int = 3
    # Where each stage trains: auto = a CUDA device when one is visible, else the CPU.
    device: str = "auto"          # auto | cpu | cuda
    # bf16 autocast of the forward (fp32 master weights, optimizer state, loss and gradient norm;
    # CheckFree averages and DiLoCo outer steps stay fp32). Activations cross the network as fp32.
    precision: str = "fp32"       # fp32 | bf16
    activation_checkpointing: bool = False  # recompute each decoder block in the backward

    def __post_init__(self):
        _check(self.max_steps >= 1, f"train.max_steps={self.max_steps} must be >= 1")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _check(self.microbatches >= 1, f"train.microbatches={self.microbatches} must be >= 1")
        _check(self.batch_size % self.microbatches == 0,
               f"train.batch_size={self.batch_size} is not divisible into train.microbatches="
               f"{self.microbatches}; pick a batch size that is a multiple of the microbatch count")
        _check(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.eval_batches >= 1, f"train.eval_batches={self.eval_batches} must be >= 1")
        _check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        _check(self.max_nonfinite >= 1, f"train.max_nonfinite={self.max_nonfinite} must be >= 1")
        _choice("train.optimizer", self.optimizer, ("adamw", "deepspeed_adam", "deepspeed_cpu_adam"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.precision", self.precision, ("fp32", "bf16"))
        if self.device == "cuda":  # `auto` stays unresolved: each worker resolves it where it runs
            _check_device(self.device)
        if self.optimizer != "adamw":
            check_optimizer(self.optimizer)  # deepspeed installed, ninja + a C++ compiler present
        if self.resume:
            import os
            ckpts = os.path.join(os.path.expanduser(self.resume), "checkpoints")
            _check(os.path.isdir(ckpts), f"train.resume={self.resume} has no checkpoints/ folder; resume a run "
                                         "that ran with recovery.checkpoint_every > 0")


@dataclass
class ParallelConfig:
    stages: int = 4
    replicas: int = 1
    schedule: str = "gpipe"                       # gpipe | 1f1b
    layers_per_stage: Optional[List[int]] = None  # None = balanced
    # The data plane (activations, gradients, data-parallel all-reduce): auto = gloo (CUDA tensors
    # staged through pinned host memory; stages may share a GPU); nccl = one GPU per stage process.
    backend: str = "auto"                         # auto | gloo | nccl
    # Live rebalancing: the coordinator measures each stage's compute time and, when moving layers
    # off the slowest stage would shorten the step by rebalance_min_gain, publishes a generation
    # in which the stages hand those layers (weights + optimizer state, exactly) to their neighbours.
    rebalance: bool = False
    rebalance_every: int = 10                     # committed steps measured per layout before deciding
    rebalance_min_gain: float = 0.1               # predicted step-time gain needed to move layers

    def __post_init__(self):
        _check(self.stages >= 1, f"parallel.stages={self.stages} must be >= 1")
        _check(self.replicas >= 1, f"parallel.replicas={self.replicas} must be >= 1")
        _choice("parallel.schedule", self.schedule, ("gpipe", "1f1b"))
        _choice("parallel.backend", self.backend, ("auto", "gloo", "nccl"))
        # nccl needs a GPU per stage process: checked against the machine where the job starts
        # (environment.check_devices), not here, where every worker that deserialises the job runs.
        if self.layers_per_stage is not None:
            self.layers_per_stage = list(self.layers_per_stage)
            _check(len(self.layers_per_stage) == self.stages,
                   f"parallel.layers_per_stage has {len(self.layers_per_stage)} entries but parallel.stages="
                   f"{self.stages}; give one layer count per stage or null to balance")
            _check(all(n >= 1 for n in self.layers_per_stage),
                   "parallel.layers_per_stage entries must all be >= 1")
        _check(self.rebalance_every >= 2, f"parallel.rebalance_every={self.rebalance_every} must be >= 2 steps")
        _check(self.rebalance_min_gain >= 0, f"parallel.rebalance_min_gain={self.rebalance_min_gain} must be >= 0")


@dataclass
class DilocoConfig:
    enabled: bool = False
    sync_every: int = 100       # H
    fragments: int = 1          # P, per stage
    assignment: str = "strided"  # strided | sequential
    overlap: int = 1            # tau
    alpha: float = 0.5
    quant: str = "none"         # none | bf16 | int8 | fp4
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    offload: bool = False

    def __post_init__(self):
        _check(self.sync_every >= 1, f"diloco.sync_every={self.sync_every} must be >= 1")
        _check(self.fragments >= 1, f"diloco.fragments={self.fragments} must be >= 1")
        _choice("diloco.assignment", self.assignment, ("strided", "sequential"))
        _check(self.overlap >= 0, f"diloco.overlap={self.overlap} must be >= 0")
        _check(0.0 <= self.alpha <= 1.0, f"diloco.alpha={self.alpha} must be in [0, 1]")
        _choice("diloco.quant", self.quant, ("none", "bf16", "int8", "fp4"))


# --- recovery.control=etcd (the control plane on etcd; see docs/etcd_integration.md) -------------------
@dataclass
class RecoveryEtcdConfig:
    """`recovery.etcd.*`, mirrored into recovery.etcd_client.EtcdSettings (which checks it) at the
    entry point. Nothing secret: the password comes only from KINTSUGI_ETCD_PASSWORD or a file."""
    endpoints: List[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])
    prefix: str = ""              # one per run; "" = derived from the run dir (launcher=local, slurm)
    lease_ttl_s: int = 3          # a leader unheard of this long is replaced
    lease_grace_s: Optional[float] = None  # past its lease deadline, how long a leader waits for etcd (null: the TTL)
    request_timeout_s: float = 2.0
    flush_s: float = 1.0          # watermark-only changes reach etcd at most this late
    user: Optional[str] = None    # or KINTSUGI_ETCD_USER
    password_file: Optional[str] = None  # or KINTSUGI_ETCD_PASSWORD / KINTSUGI_ETCD_PASSWORD_FILE
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None

    def settings(self, prefix: Optional[str] = None):
        """The recovery layer's EtcdSettings (imports the etcd client module, not its library)."""
        from kintsugi.recovery.etcd_client import EtcdSettings
        try:
            return EtcdSettings(endpoints=tuple(self.endpoints), prefix=prefix or self.prefix or "/kintsugi/check/",
                                lease_ttl_s=self.lease_ttl_s, lease_grace_s=self.lease_grace_s,
                                request_timeout_s=self.request_timeout_s,
                                user=self.user, password_file=self.password_file, ca_file=self.ca_file,
                                cert_file=self.cert_file, key_file=self.key_file)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def check(self) -> None:
        _check(0.05 <= self.flush_s <= 60, f"recovery.etcd.flush_s={self.flush_s} must be 0.05 to 60 seconds")
        self.settings()


@dataclass
class RecoveryConfig:
    strategy: str = "tiered"
    # Shared secret, set in code only: the CLI refuses it (Hydra would record it); use KINTSUGI_TOKEN.
    token: str = ""                 # empty = KINTSUGI_TOKEN or a random one per run
    coordinator: Optional[str] = None  # host:port of an external coordinator
    heartbeat_interval_s: float = 0.2
    heartbeat_timeout_s: float = 3.0
    lr_bump: float = 1.1
    embedding_copy_every: int = 10
    checkpoint_every: int = 0       # 0 = no checkpoints unless strategy=checkpoint
    keep_checkpoints: int = 0       # newest complete steps kept on disk; 0 = keep all
    init_timeout_s: float = 120.0
    # No commit and no plan change in a cell for this long: the coordinator re-plans it (and
    # replaces a worker that never reached the cell's newest generation). Above the slowest step.
    progress_timeout_s: float = 300.0
    spare_wait_s: float = 600.0     # lost slots without a spare this long: suspend the job (exit 75)
    coordinator_wait_s: float = 600.0  # a worker whose coordinator is away this long saves and exits 75
    # per_group: a failure re-plans its own cell (replica) and the lost stage's group only.
    # global: every failure starts a new generation of every group (the design before per-group
    # generations; kept to measure what isolation buys, benchmarks.isolation).
    generations: str = "per_group"
    notice_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    notice: str = "none"            # aws | gcp | azure | none: poll the instance-metadata service
    metadata_address: Optional[str] = None  # instance-metadata host (tests: http://127.0.0.1:PORT)
    notice_interval_s: float = 5.0
    # A slot holder under notice trains on until a ready spare is reserved for it, for this long at
    # most; then it hands off (or waits for a replacement) as with no time to spare. Keep it well
    # below the notice the platform gives (AWS 120 s, GCP / Azure 30 s, Slurm --signal's lead)
    # minus the time to send one stage's state. 0: leave at the next step, spare or not.
    train_under_notice_s: float = 10.0
    # Each NCCL point-to-point work's and collective's deadline (parallel.backend=nccl): a killed
    # NCCL peer never makes a receive raise, so heartbeats or this deadline find it (gloo: ms).
    p2p_deadline_s: float = 300.0
    control: str = "local"          # local | etcd: where the coordinator's state lives, who may lead
    standbys: int = 0               # control=etcd: standby coordinators (local: beside the leader; torchrun:
                                    # on nodes 1..standbys; slurm: one srun step on nodes 1.. of the allocation)
    etcd: RecoveryEtcdConfig = field(default_factory=RecoveryEtcdConfig)

    STRATEGIES = ("tiered", "checkfree", "checkfree_plus", "copy", "average", "random", "checkpoint", "none")

    def __post_init__(self):
        _choice("recovery.strategy", self.strategy, self.STRATEGIES)
        for key in ("heartbeat_interval_s", "heartbeat_timeout_s", "init_timeout_s", "progress_timeout_s",
                    "spare_wait_s", "coordinator_wait_s", "notice_interval_s"):
            _seconds(f"recovery.{key}", getattr(self, key))
        _check(self.heartbeat_timeout_s > 2 * self.heartbeat_interval_s,
               f"recovery.heartbeat_timeout_s={self.heartbeat_timeout_s} must exceed twice "
               f"recovery.heartbeat_interval_s={self.heartbeat_interval_s}")
        _check(self.lr_bump > 0, f"recovery.lr_bump={self.lr_bump} must be > 0")
        _check(0 <= self.train_under_notice_s <= 3600,
               f"recovery.train_under_notice_s={self.train_under_notice_s} must be 0 to 3600 seconds "
               "(0 = leave at the next step)")
        _check(self.embedding_copy_every >= 1, "recovery.embedding_copy_every must be >= 1")
        _check(self.checkpoint_every >= 0, f"recovery.checkpoint_every={self.checkpoint_every} must be >= 0 "
                                           "(0 = no periodic checkpoints)")
        _check(self.keep_checkpoints >= 0, f"recovery.keep_checkpoints={self.keep_checkpoints} must be >= 0 "
                                           "(0 keeps every checkpoint)")
        _choice("recovery.notice", self.notice, ("none", "aws", "gcp", "azure"))
        _choice("recovery.generations", self.generations, ("per_group", "global"))
        _seconds("recovery.p2p_deadline_s", self.p2p_deadline_s)
        _check(self.progress_timeout_s > 2 * self.heartbeat_timeout_s,
               f"recovery.progress_timeout_s={self.progress_timeout_s} must exceed twice "
               f"recovery.heartbeat_timeout_s={self.heartbeat_timeout_s} (a hung worker is caught by its heartbeat)")
        _choice("recovery.control", self.control, ("local", "etcd"))
        _check(self.standbys >= 0, f"recovery.standbys={self.standbys} must be >= 0")
        if self.control == "etcd":
            self.etcd.check()
        else:
            _check(self.standbys == 0, f"recovery.standbys={self.standbys} needs recovery.control=etcd (standbys "
                                       "campaign for the lead in etcd); set it, or recovery.standbys=0")


@dataclass
class LisaConfig:
    enabled: bool = False
    layers_per_stage: int = 1     # gamma per stage
    interval: int = 20            # K
    sampling: str = "uniform"     # uniform | importance
    per_replica: bool = False
    freeze_embeddings: bool = False
    state_policy: str = "reset"   # reset | offload | keep

    def __post_init__(self):
        _check(self.layers_per_stage >= 1, "lisa.layers_per_stage must be >= 1")
        _check(self.interval >= 1, "lisa.interval must be >= 1")
        _choice("lisa.sampling", self.sampling, ("uniform", "importance"))
        _choice("lisa.state_policy", self.state_policy, ("reset", "offload", "keep"))


CODECS = ("none", "bf16", "fp16", "int8", "fp8_e4m3", "int4", "fp4_e3m0")


@dataclass
class CompressionConfig:
    activations: str = "none"
    gradients: str = "none"
    block_size: int = 256
    # Which quantize / dequantize kernels run the codecs: auto = Triton for CUDA tensors, the torch
    # reference on CPU; reference; triton (on CPU stages: Triton's interpreter, TRITON_INTERPRET=1).
    kernels: str = "auto"

    def __post_init__(self):
        _choice("compression.activations", self.activations, CODECS)
        _choice("compression.gradients", self.gradients, CODECS)
        _choice("compression.kernels", self.kernels, ("auto", "reference", "triton"))
        _check(self.block_size >= 8 and self.block_size % 8 == 0,
               f"compression.block_size={self.block_size} must be a multiple of 8")


@dataclass
class LauncherConfig:
    name: str = "local"           # local | torchrun | slurm | deepspeed
    start_timeout_s: float = 120.0
    machines: int = 0             # local only: pretend workers sit on this many machines (placement demo)
    # local only: simulated machines of unequal speed, "m1:3,m2:1.5" (label:factor); a worker there
    # takes factor x its compute time (m1:3 = three times slower). Needs launcher.machines.
    slow_machines: str = ""

    def __post_init__(self):
        _choice("launcher.name", self.name, ("local", "torchrun", "slurm", "deepspeed"))
        _seconds("launcher.start_timeout_s", self.start_timeout_s)
        _check(self.machines >= 0, f"launcher.machines={self.machines} must be >= 0 (0 = no machine labels)")
        for m, f in self.slowdowns().items():
            _check(f >= 1.0, f"launcher.slow_machines: {m}:{f} must be >= 1 (a slowdown factor)")
            _check(self.machines > 0, "launcher.slow_machines needs launcher.machines > 0 (workers are labelled m0..)")

    def slowdowns(self) -> Dict[str, float]:
        out = {}
        for part in filter(None, (x.strip() for x in str(self.slow_machines or "").split(","))):
            m, sep, f = part.partition(":")
            try:
                out[m.strip()] = float(f)
            except ValueError:
                _check(False, f"launcher.slow_machines={self.slow_machines!r}: {part!r} is not label:factor; "
                              "write e.g. launcher.slow_machines='m1:3,m2:1.5'")
        return out


@dataclass
class WandbConfig:
    mode: str = "offline"         # offline | online | disabled
    project: str = "kintsugi"
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        _choice("logger.wandb.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class LoggerConfig:
    progress: bool = True
    level: str = "INFO"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # > 0: the coordinator serves a status page and /status.json (token required) on this port,
    # on the interface its store listens on; 0 = off.
    dashboard_port: int = 0

    def __post_init__(self):
        _check(0 <= self.dashboard_port <= 65535,
               f"logger.dashboard_port={self.dashboard_port} is not a TCP port; use 1..65535, or 0 for no dashboard")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "default"

    def __post_init__(self):
        p, m, t = self.parallel, self.model, self.train
        _check(p.stages <= m.n_layers,
               f"parallel.stages={p.stages} exceeds model.n_layers={m.n_layers}; use at most "
               f"{m.n_layers} stages or a deeper model")
        if p.layers_per_stage is not None:
            _check(sum(p.layers_per_stage) == m.n_layers,
                   f"parallel.layers_per_stage sums to {sum(p.layers_per_stage)} but model.n_layers="
                   f"{m.n_layers}; make the counts add up")
        _check(self.data.seq_len <= m.max_seq_len,
               f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
               "raise model.max_seq_len or shorten data.seq_len")
        if self.lisa.enabled:
            _check(self.lisa.layers_per_stage <= m.n_layers // p.stages,
                   f"lisa.layers_per_stage={self.lisa.layers_per_stage} exceeds the smallest stage "
                   f"({m.n_layers // p.stages} layers); lower it or use fewer stages")
        if p.rebalance:
            for on, what in ((self.lisa.enabled, "lisa.enabled=true"),
                             (self.recovery.checkpoint_every > 0 or self.recovery.strategy == "checkpoint",
                              "checkpoints (recovery.checkpoint_every / strategy=checkpoint)")):
                _check(not on, f"parallel.rebalance=true does not yet work with {what}; turn one of them off")
        if p.backend == "nccl":
            _check(t.device != "cpu", "parallel.backend=nccl carries CUDA tensors but train.device=cpu; use "
                                      "train.device=cuda (or auto) with it, or parallel.backend=gloo")
        if self.diloco.enabled:
            _check(self.diloco.overlap < self.diloco.sync_every,
                   f"diloco.overlap={self.diloco.overlap} must be smaller than diloco.sync_every="
                   f"{self.diloco.sync_every}")
        if self.recovery.control == "etcd" and self.launcher.name not in ("local", "slurm"):
            # (local and slurm: one launcher starts the run, and derives a prefix from its run directory)
            _check(bool(self.recovery.etcd.prefix), f"recovery.control=etcd with launcher={self.launcher.name} needs "
                   "recovery.etcd.prefix: give every node and coordinator the same one, e.g. "
                   "recovery.etcd.prefix=/kintsugi/run1/")
            _check(self.recovery.standbys == 0 or self.launcher.name == "torchrun",
                   f"recovery.standbys={self.recovery.standbys} starts standbys with launcher=local, torchrun or "
                   f"slurm only; with launcher={self.launcher.name} start `kintsugi coordinator --standby` on another "
                   "machine")
            _check(not self.recovery.coordinator, f"recovery.coordinator={self.recovery.coordinator} with "
                   "recovery.control=etcd: workers find the leading coordinator through etcd; drop "
                   "recovery.coordinator")
        for i, e in enumerate(self.faults.machine_schedule):
            _check(self.launcher.machines > 0, f"faults.schedule names machine {e['machine']!r} but launcher.machines=0; "
                                               "set launcher.machines to the number of simulated machines")
            _check(0 <= e["step"] < t.max_steps, f"faults.schedule machine event at step {e['step']} is outside "
                                                 f"0..{t.max_steps - 1} (train.max_steps={t.max_steps})")
        for i, e in enumerate(self.faults.schedule):
            _check(0 <= e["stage"] < p.stages, f"faults.schedule[{i}].stage={e['stage']} is outside "
                                               f"0..{p.stages - 1} (parallel.stages={p.stages})")
            _check(0 <= e["replica"] < p.replicas, f"faults.schedule[{i}].replica={e['replica']} is "
                                                   f"outside 0..{p.replicas - 1}")
            _check(0 <= e["step"] < t.max_steps, f"faults.schedule[{i}].step={e['step']} is outside "
                                                 f"0..{t.max_steps - 1} (train.max_steps={t.max_steps})")

    # --- serialisation: the coordinator hands this to every worker that joins -------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> Dict[str, Any]:
        """to_dict without the join token: what files (job.json, summary.json) and trackers get.
        Launchers hand the token to the coordinator in the environment (KINTSUGI_TOKEN)."""
        d = self.to_dict()
        d["recovery"]["token"] = ""
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "JobConfig":
        def build(tp, value):
            if dataclasses.is_dataclass(tp) and isinstance(value, dict):
                kwargs = {}
                for f in dataclasses.fields(tp):
                    if f.name in value:
                        sub = _nested_type(tp, f.name)
                        kwargs[f.name] = build(sub, value[f.name]) if sub else value[f.name]
                return tp(**kwargs)
            return value
        return build(cls, d)


def _nested_type(tp, name):
    default = {f.name: f for f in dataclasses.fields(tp)}[name]
    if default.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        probe = default.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(probe):
            return type(probe)
    return None


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup then cosine to lr*min_lr_ratio: a pure function of the step, so a rebuilt stage
    or a resumed run lands on the same schedule."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
