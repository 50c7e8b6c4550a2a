"""Composing a job from Hydra overrides, and validating overrides before any process starts.

`compose_job` composes the real config (as the CLI does) and converts it to a typed JobConfig once;
`validate_overrides` returns one line naming the key and the fix, or None.
"""
from __future__ import annotations

from typing import List, Optional

from kintsugi import CONF_DIR
from kintsugi.trainer.config.errors import ConfigError


def compose_job(overrides: List[str]):
    """Compose the real Hydra config (as the CLI would) and convert it to a typed JobConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kintsugi.trainer.config.store import register, to_job_config
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return to_job_config(cfg), cfg


def _one_line(err: BaseException) -> str:
    msg = str(err).strip().splitlines()
    text = msg[0] if msg else type(err).__name__
    # OmegaConf/Hydra add "full_key:" context lines; keep the first line and the key when present.
    key = next((l.split(":", 1)[1].strip() for l in msg if l.strip().startswith("full_key:")), None)
    if key and key not in text:
        text = f"{key}: {text}"
    return text


def _first_sweep_point(override: str) -> str:
    """`k=a,b,c` (a Hydra multirun sweep) -> `k=a`, so one point of a sweep is validated up front."""
    key, sep, value = override.partition("=")
    if not sep or any(c in value for c in "[]{}()'\"") or "," not in value:
        return override
    return f"{key}={value.split(',')[0]}"


# The run's token is a secret: Hydra writes every override into its "Error executing job with
# overrides" line, .hydra/overrides.yaml and (with -m) multirun.yaml and the sweep's logs, readable
# by anyone who can read the output folder. It is refused from the command line and config files
# alike (without echoing it), in favour of the environment, which none of those record.
TOKEN_REFUSED = ("recovery.token must not be given on the command line or in a config file: Hydra would "
                 "write it into its logs, .hydra/ and multirun.yaml; export KINTSUGI_TOKEN=<token> instead "
                 "(e.g. KINTSUGI_TOKEN=$(cat ~/.kintsugi/token), a file only you can read)")


def _sets_token(override: str) -> bool:
    """`recovery.token=x`, `+recovery.token=x`, `recovery={token: x}` ... with a non-empty value."""
    key, sep, value = override.partition("=")
    key = key.lstrip("+~").strip()
    if key == "recovery.token":
        return bool(sep and value.strip().strip("'\""))
    return key == "recovery" and "token" in value


def validate_overrides(overrides: List[str]) -> Optional[str]:
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    if any(_sets_token(o) for o in overrides):
        return TOKEN_REFUSED
    try:
        points = [(_first_sweep_point(o) if multirun else o) for o in overrides if not o.startswith("-")]
        job, _ = compose_job(points)
        if job.recovery.token:  # from a config file (an experiment preset, a --config-dir)
            return TOKEN_REFUSED
        from kintsugi.trainer.data.corpus import validate_data_config
        validate_data_config(job.data)
        from kintsugi.trainer.config.environment import check_devices
        check_devices(job)  # train.device, parallel.backend=nccl, compression.kernels on this machine
        if job.launcher.name == "slurm" and not multirun:  # a sweep submits from outside any allocation
            from kintsugi.trainer.launch.slurm import check_allocation
            check_allocation(job)
    except (ConfigError, ValueError) as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf errors: unknown keys, bad types, bad groups
        text = _one_line(e)
        if "not in struct" in text or "Could not override" in text or "Key '" in text:
            text += " (unknown key; run `python -m trainer --cfg job` to list the valid keys)"
        return text
    return None
