"""The Hydra entry point and `train(job, run_dir)`, a plain importable function."""
from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kintsugi import CONF_DIR
from kintsugi.trainer.config.errors import ConfigError
from kintsugi.trainer.config.job import JobConfig
from kintsugi.trainer.config.store import register, to_job_config

log = logging.getLogger("kintsugi")


def prepare_corpus_and_model(job: JobConfig) -> dict:
    """Prepare (or reuse) the token cache, take the architecture from model.init_from and the vocab
    size from the tokenizer when unset (job.model is updated); returns the store's `corpus` entry.
    A corpus that cannot be read or a model.init_from that is not a usable checkpoint raises
    ConfigError (one line naming the file and the fix), before any worker starts."""
    try:
        return _prepare_corpus_and_model(job)
    except ConfigError:
        raise
    except ValueError as e:  # the data and model readers' errors: one line naming the file and the fix
        raise ConfigError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None


def _prepare_corpus_and_model(job: JobConfig) -> dict:
    from kintsugi.trainer.data.corpus import prepare_corpus, validate_data_config

    validate_data_config(job.data)
    corpus = prepare_corpus(job.data)
    log.info("corpus: %d train / %d val tokens from %d files (%d skipped: not UTF-8 or not regular), vocab %d",
             corpus.num_train_tokens, corpus.num_val_tokens, corpus.num_files, corpus.skipped_files,
             corpus.vocab_size)
    if job.model.init_from:
        from kintsugi.trainer.model.pretrained import check_init_from, checkpoint_model_config
        job.model = checkpoint_model_config(job.model.init_from, job.model)
        check_init_from(job.model.init_from, job.model)
    if job.model.vocab_size <= 0:
        job.model.vocab_size = corpus.vocab_size
    return {"train_path": corpus.train_path, "val_path": corpus.val_path, "dtype": str(corpus.dtype),
            "vocab_size": corpus.vocab_size}


def train(job: JobConfig, run_dir: str) -> int:
    """Prepare the corpus, run the job with the configured launcher, write the outputs."""
    from kintsugi.recovery.runfiles import EX_RECORD, EX_SUSPENDED, FINAL_STATE

    from kintsugi.trainer.reporting.summary import write_outputs

    from kintsugi.trainer.config.environment import check_devices

    t0 = time.time()
    check_devices(job)  # the CLI checked already; direct callers of train() get the same line
    if job.recovery.control == "etcd":  # the cluster must answer before anything starts
        from kintsugi.trainer.launch.etcd_control import prepare
        err = prepare(job, run_dir, refuse_taken_prefix=job.launcher.name in ("local", "slurm"))
        if err:
            print(f"kintsugi: {err}", file=sys.stderr)
            return 2
    corpus_d = prepare_corpus_and_model(job)
    if job.train.resume:  # the checkpoints must fit this job's slots, before any process starts
        from kintsugi.trainer.cli.resuming import check_resume
        check_resume(job, run_dir, tidy=os.environ.get("RANK", "0") == "0")
    if job.train.optimizer != "adamw":  # compile DeepSpeed's op once here, not inside every worker
        from kintsugi.trainer.runtime.optim import prebuild_optimizer
        log.info("train.optimizer=%s: DeepSpeed op ready in %.1f s", job.train.optimizer,
                 prebuild_optimizer(job.train.optimizer))
    if job.launcher.name == "local":
        from kintsugi.trainer.launch.local import LocalLauncher
        rc = LocalLauncher(job, run_dir, corpus_d, progress=job.logger.progress).run()
    elif job.launcher.name == "slurm":  # inside an sbatch allocation: coordinator here, workers via srun
        from kintsugi.trainer.launch.slurm import run_slurm
        rc = run_slurm(job, run_dir, corpus_d)
    else:  # torchrun and the deepspeed launcher both start every worker process with RANK / WORLD_SIZE
        from kintsugi.trainer.launch.torchrun import run_torchrun
        rc = run_torchrun(job, run_dir, corpus_d)
    if job.launcher.name in ("torchrun", "deepspeed") and os.environ.get("RANK", "0") != "0":
        return rc  # outputs are written once, by global rank 0 beside the coordinator
    if rc == 0 or os.path.exists(os.path.join(run_dir, FINAL_STATE)):
        summary = write_outputs(run_dir, job, time.time() - t0)
        if summary is not None and rc == EX_SUSPENDED:
            log.warning("suspended after %d committed steps (exact per-slot checkpoints saved); continue with "
                        "train.resume=%s", summary["steps"], run_dir)
        elif summary is not None:
            log.info("done: final val loss %s, %d steps, %.0f tokens/s, %d failures, %d rebuilds -> %s",
                     summary["final_val_loss"], summary["steps"], summary["tokens_per_s"], summary["failures"],
                     len(summary["rebuilds"]), run_dir)
            if rc == 0 and (summary.get("write_error") or summary.get("missing_steps")):
                rc = EX_RECORD  # trained, but the record on disk is not whole: never a silent 0
                if summary.get("missing_steps"):
                    log.error("metrics.jsonl lacks committed steps %s; summary.json lists them as missing_steps",
                              summary["missing_steps"])
    return rc


register()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> None:
    job = to_job_config(cfg)
    run_dir = HydraConfig.get().runtime.output_dir
    if job.train.resume:  # a requeued job continues in the run dir it is resuming
        run_dir = os.path.abspath(os.path.expanduser(job.train.resume))
    try:
        rc = train(job, run_dir)
    except ConfigError as e:  # found once the corpus, the model files or the run dir were read
        print(f"kintsugi: config error: {e}", file=sys.stderr)
        sys.exit(2)
    if rc:
        sys.exit(rc)
