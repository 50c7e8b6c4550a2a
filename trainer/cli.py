"""Command line: `kintsugi [hydra overrides]` trains; later subcommands (export, report, join)
dispatch here too. Configuration errors are caught before Hydra starts a run, so a typo gives one
line naming the key and the fix instead of a traceback, and no process is started."""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from .config import ConfigError

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose_job(overrides: List[str]):
    """Compose the real Hydra config (as the CLI would) and convert it to a typed JobConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config_store import register, to_job_config
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


def validate_overrides(overrides: List[str]) -> Optional[str]:
    multirun = any(o in ("-m", "--multirun") for o in overrides)
    try:
        points = [(_first_sweep_point(o) if multirun else o) for o in overrides if not o.startswith("-")]
        job, _ = compose_job(points)
        from .data import validate_data_config
        validate_data_config(job.data)
        if job.launcher.name == "slurm" and not multirun:  # a sweep submits from outside any allocation
            from .slurm import check_allocation
            check_allocation(job)
    except (ConfigError, ValueError) as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf errors: unknown keys, bad types, bad groups
        text = _one_line(e)
        if "not in struct" in text or "Could not override" in text or "Key '" in text:
            text += " (unknown key; run `python -m trainer --cfg job` to list the valid keys)"
        return text
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Appended by the deepspeed launcher (without --no_local_rank) and torch.distributed.launch.
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if argv and argv[0] in ("export", "report", "join", "coordinator"):
        from . import commands
        return commands.dispatch(argv)
    if not any(a in ("--help", "-h", "--cfg", "-c", "--info") or a.startswith("--cfg") for a in argv):
        err = validate_overrides(argv)
        if err:
            print(f"kintsugi: config error: {err}", file=sys.stderr)
            return 2
    from .entry import hydra_entry
    sys.argv = [sys.argv[0]] + argv
    try:
        hydra_entry()
    except SystemExit as e:
        return int(e.code or 0)
    return 0
