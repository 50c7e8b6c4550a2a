"""Every config group composes, every experiment preset is valid, and bad settings fail before any
process starts with one line that names the key and the fix."""
import os
import subprocess
import sys

import pytest

from testkit import ROOT
from kintsugi import CONF_DIR
from kintsugi.trainer.cli.compose import compose_job, validate_overrides
from kintsugi.trainer.config.faults import FaultsConfig
from kintsugi.trainer.config.job import JobConfig, lr_at, TrainConfig


def _options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


@pytest.mark.parametrize("group", ["model", "data", "parallel", "launcher", "logger", "faults", "experiment"])
def test_every_group_option_composes(group):
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option == "text":
            overrides.append(f"data.paths=[{ROOT}/README.md]")
        job, _ = compose_job(overrides)
        assert isinstance(job, JobConfig)


def test_default_job_is_the_documented_one():
    job, cfg = compose_job([])
    assert job.parallel.stages == 4 and job.launcher.name == "local" and job.model.n_layers == 8
    assert job.faults.demo and job.faults.spares >= 1, "the default job shows failures being survived"
    assert cfg.hydra.run.dir.startswith("outputs/")


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.stages=20"], "parallel.stages=20 exceeds model.n_layers=8"),
    (["train.batch_size=10", "train.microbatches=4"], "train.batch_size=10 is not divisible"),
    (["parallel.schedule=zigzag"], "parallel.schedule='zigzag' is not valid"),
    (["recovery.strategy=magic"], "recovery.strategy='magic' is not valid"),
    (["data=text", "data.paths=[/no/such/corpus]"], "data.paths"),
    (["data.seq_len=1024"], "data.seq_len=1024 exceeds model.max_seq_len"),
    (["no_such_group.key=1"], "no_such_group"),
    (["train.no_such_key=1"], "no_such_key"),
    (["parallel.layers_per_stage=[1,2]"], "parallel.layers_per_stage has 2 entries"),
    (["faults.schedule=[{step: 5, stage: 9}]"], "faults.schedule[0].stage=9"),
    (["model.n_heads=3"], "model.n_heads"),
    (["train.precision=fp16"], "train.precision='fp16' is not valid"),
    (["train.device=tpu"], "train.device='tpu' is not valid"),
])
def test_bad_config_is_one_line_naming_the_key(overrides, needle):
    msg = validate_overrides(overrides)
    assert msg is not None and needle in msg, msg
    assert "\n" not in msg


def test_empty_corpus_is_rejected(tmp_path):
    empty = tmp_path / "corpus"
    empty.mkdir()
    msg = validate_overrides(["data=text", f"data.paths=[{empty}]"])
    assert msg is not None and "data.paths" in msg and "\n" not in msg


def test_bad_config_fails_before_any_process_starts(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer", "parallel.stages=20", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == ["kintsugi: config error: parallel.stages=20 exceeds model.n_layers=8; use at most 8 stages "
                     "or a deeper model"]
    assert not run_dir.exists(), "nothing ran, nothing was written"


def test_failure_rate_conversion_matches_the_paper():
    # 500M model, ~90 s iterations: 5/10/16% per hour -> p = 0.0013 / 0.0026 / 0.0044 per step
    for rate, p in ((0.05, 0.00128), (0.10, 0.00263), (0.16, 0.00435)):
        assert FaultsConfig(rate_per_hour=rate, step_time_s=90).per_step_probability() == pytest.approx(p, rel=0.01)


def test_lr_schedule_warms_up_then_decays():
    t = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1) and lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0) and lr_at(110, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 110))


def test_job_config_round_trips_through_json():
    job, _ = compose_job(["parallel=grid2x4", "faults=demo"])
    again = JobConfig.from_dict(job.to_dict())
    assert again == job


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("override,needle", [
    ("train.device=cuda", "train.device=cuda: no CUDA device is visible here"),
    ("parallel.backend=nccl", "parallel.backend=nccl needs CUDA stages"),
])
def test_cuda_or_nccl_without_cuda_is_one_line(override, needle):
    msg = validate_overrides([override])
    assert msg is not None and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("extra,words", [
    (["launcher=torchrun", "recovery.coordinator=10.0.0.1:29400"], ["recovery.coordinator", "through etcd"]),
    (["launcher=deepspeed", "recovery.standbys=1"], ["recovery.standbys=1", "launcher=local, torchrun or slurm"]),
])
def test_etcd_settings_a_launcher_cannot_honour_are_refused_in_one_line(extra, words):
    from kintsugi.trainer.config.errors import ConfigError
    base = ["recovery.control=etcd", "recovery.etcd.prefix=/kintsugi/run1/",
            "recovery.etcd.endpoints=[http://127.0.0.1:2379]"]
    with pytest.raises(ConfigError) as e:
        compose_job(base + extra)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("grace,ok", [("null", True), ("7.5", True), ("0", True), ("-1", False), ("500", False)])
def test_the_lease_grace_is_bounded_in_one_line(grace, ok):
    from kintsugi.trainer.config.errors import ConfigError
    overrides = ["recovery.control=etcd", "recovery.etcd.prefix=/kintsugi/run1/",
                 "recovery.etcd.endpoints=[http://127.0.0.1:2379]", f"recovery.etcd.lease_grace_s={grace}"]
    if ok:
        job, _ = compose_job(overrides)
        settings = job.recovery.etcd.settings()
        assert settings.lease_grace_s == (None if grace == "null" else float(grace))
        return
    with pytest.raises(ConfigError) as e:
        compose_job(overrides)
    msg = str(e.value)
    assert "\n" not in msg and "recovery.etcd.lease_grace_s" in msg and "0 to 120 seconds" in msg, msg


def test_torchrun_takes_standbys_under_etcd():
    job, _ = compose_job(["launcher=torchrun", "recovery.control=etcd", "recovery.etcd.prefix=/kintsugi/run1/",
                          "recovery.etcd.endpoints=[http://127.0.0.1:2379]", "recovery.standbys=2"])
    assert job.recovery.standbys == 2
