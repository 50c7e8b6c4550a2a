"""`kintsugi status RUN_DIR [--watch [S]] [--json]`: what a run is doing, read from its run directory
(trainer.reporting.status collects and renders it). A path that is not a run directory is one line
and exit code 2."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List, Optional

from kintsugi.trainer.cli.commands import CommandError, _Parser
from kintsugi.trainer.reporting.status import HeartbeatClock, StatusError, collect, render


def status_command(argv: List[str]) -> int:
    ap = _Parser(prog="kintsugi status", description="Slots, generations, rebuilds and losses of a run, read "
                 "from its run directory (during the run or after).")
    ap.add_argument("run_dir", help="a run directory: outputs/<name>/<time>")
    ap.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until interrupted")
    ap.add_argument("--json", action="store_true", help="print the same facts as one JSON object")
    args = ap.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        raise CommandError(f"--watch {args.watch} must be a positive number of seconds")
    clock = HeartbeatClock()
    try:
        while True:
            try:
                st = collect(args.run_dir, clock=clock)
            except StatusError as e:
                raise CommandError(str(e)) from None
            if args.json:
                print(json.dumps(st, sort_keys=True), flush=True)
            else:
                if args.watch is not None and sys.stdout.isatty():
                    print("\033[H\033[2J", end="")  # clear the screen between frames
                print(render(st), flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return status_command(list(sys.argv[1:] if argv is None else argv))
    except CommandError as e:
        print(f"kintsugi status: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `kintsugi status RUN | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush is quiet
        return 0



if __name__ == "__main__":
    sys.exit(main())
