"""Registers the typed JobConfig with Hydra's ConfigStore and converts composed configs back."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from kintsugi.trainer.config.errors import ConfigError
from kintsugi.trainer.config.job import JobConfig

_registered = False


def register() -> None:
    global _registered
    if not _registered:
        ConfigStore.instance().store(name="job_schema", node=JobConfig)
        _registered = True


def to_job_config(cfg: DictConfig) -> JobConfig:
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    try:
        job = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - OmegaConf wraps __post_init__ errors; unwrap ours
        cause = e.__cause__ or e.__context__
        while cause is not None:
            if isinstance(cause, ConfigError):
                raise cause
            cause = cause.__cause__ or cause.__context__
        raise
    assert isinstance(job, JobConfig)
    return job
