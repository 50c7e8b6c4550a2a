"""Command line: `kintsugi [train] [hydra overrides]` trains; the other subcommands (export, report,
join, coordinator, status) and `--help` / `--version` dispatch here too. Configuration errors are
caught before Hydra starts a run, so a typo gives one line naming the key and the fix instead of a
traceback, and no process is started."""
from __future__ import annotations

import sys
from typing import List, Optional

from kintsugi.trainer.cli.compose import validate_overrides


# One line per subcommand; `kintsugi COMMAND --help` has the details.
COMMANDS = (
    ("train [KEY=VALUE ...]", "train a job; the default command (`kintsugi KEY=VALUE`, `python -m trainer`)"),
    ("export RUN_DIR OUT_DIR", "write a finished run's model as a Hugging Face Llama directory"),
    ("report RUN_DIR ...", "compare runs: a table and loss-vs-wall-clock figures with rebuilds marked"),
    ("status RUN_DIR", "slots, generations, rebuilds and last losses of a run (--watch, --json)"),
    ("join --coordinator H:P", "offer this machine's devices to a running job as spares"),
    ("coordinator --port P ...", "run the coordinator on a stable host (torchrun nodes, kintsugi join)"),
    ("help [COMMAND]", "this text, or a command's own help"),
)
SUBCOMMANDS = ("export", "report", "join", "coordinator", "status")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version
    try:
        return dist_version("kintsugi-train")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed; pip install -e .)"


def usage() -> str:
    width = max(len(c) for c, _ in COMMANDS)
    lines = ["usage: kintsugi [COMMAND] [ARGS ...]", "",
             "Kintsugi: fault-tolerant pipeline training of LLaMA-style models.", "", "commands:"]
    lines += [f"  {c.ljust(width)}  {text}" for c, text in COMMANDS]
    lines += ["", "options:", f"  {'-h, --help'.ljust(width)}  this text",
              f"  {'--version'.ljust(width)}  print the version", "",
              "Training is configured with Hydra overrides (KEY=VALUE, group=option):",
              "  kintsugi --cfg job           every config key and its value",
              "  kintsugi train --help        the config groups and their options (experiment=, parallel=, ...)",
              "  kintsugi experiment=quick    a 6-step smoke run",
              "`kintsugi COMMAND --help` describes a command's arguments."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Appended by the deepspeed launcher (without --no_local_rank) and torch.distributed.launch.
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if argv and argv[0] in ("--version", "-V"):
        print(f"kintsugi {version()}")
        return 0
    if argv and argv[0] in ("--help", "-h", "help"):
        if argv[0] == "help" and argv[1:] and argv[1] in SUBCOMMANDS + ("train",):
            return main([argv[1], "--help"])
        print(usage())
        return 0
    if argv and argv[0] in SUBCOMMANDS:
        try:
            if argv[0] == "status":
                from kintsugi.trainer.cli.status import main as status_main
                return status_main(argv[1:])
            from kintsugi.trainer.cli import commands
            return commands.dispatch(argv)
        except SystemExit as e:  # argparse's --help
            return int(e.code or 0)
    if argv and argv[0] == "train":
        argv = argv[1:]
    if any(a in ("--help", "-h") for a in argv):
        argv = argv + ["hydra.help.app_name=kintsugi"]  # Hydra would call us "entry"
    if not any(a in ("--help", "-h", "--cfg", "-c", "--info") or a.startswith("--cfg") for a in argv):
        err = validate_overrides(argv)
        if err:
            print(f"kintsugi: config error: {err}", file=sys.stderr)
            return 2
    from kintsugi.trainer.cli.entry import hydra_entry
    sys.argv = [sys.argv[0]] + argv
    try:
        hydra_entry()
    except SystemExit as e:
        return int(e.code or 0)
    return 0
