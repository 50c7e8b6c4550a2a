"""Claim under test: the fleet model (`benchmarks/fleet_model.py`) predicts the goodput, and the losses
by cause, of a run it is given the exact failure trace of.

Real runs of `python -m trainer` (tiny model, Streaming DiLoCo H=10 overlap 0, one worker per machine
unless said, no idle spares: a lost machine's slots wait for its replacement `faults.rejoin_delay_s`
= 2 s later), each with a fixed preemption trace on machines (kill = no notice, term = notice ->
handoff). Each run's goodput and losses come from its own records (`benchmarks/_goodput.py`); the
model is then run on that run's trace (`benchmarks/fleet_trace.py`: failure times and slots, each
outage's measured length, R, S, H, the step time) and both are printed per cause, as fractions of
the machine time (measured: of the paid machine-seconds; model: of W x the training window).

Traces (the largest this 2-core machine holds: 8 workers):
  2x2-q5     2 x 2, 4 machines, 40 steps: kill m0 @9, term m4 @19 (spot_fleet --quick's seed 5)
  2x2-s10    2 x 2, 4 machines, 60 steps: kill m0 @12, term m4 @31, term m2 @45 (spot_fleet trace, seed 10)
  4x2-kills  4 x 2, 8 machines, 40 steps: kill m1 @10, kill m6 @24
  2x4-mixed  2 x 4, 8 machines, 40 steps: kill m2 @10, term m5 @24
  2x2-whole  2 x 2, 2 machines of 2 workers each, 40 steps: kill m0 @12 (a whole machine: two slots)
  2x2-coord  2 x 2, 4 machines, 40 steps: the coordinator SIGKILLed @12 (the launcher restarts it), kill m1 @25

    python -m benchmarks.fleet_check [--only NAME ...] [--reuse]

Prints one JSON line; the table goes to stderr and outputs/benchmarks/fleet_check.md; runs are kept
under outputs/benchmarks/fleet_check/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import List

from kintsugi.benchmarks import fleet_model as FM
from kintsugi.benchmarks import fleet_trace as FT
from kintsugi.benchmarks import rendezvous
from kintsugi.benchmarks._runs import REPORT_DIR, SUMMARY, RunResult, rnd, run_job_retrying
from kintsugi.benchmarks.spot_fleet import overrides


@dataclass(frozen=True)
class Trace:
    name: str
    replicas: int
    stages: int
    machines: int
    steps: int
    schedule: tuple
    extra: tuple = ()   # further overrides

    def events(self) -> List[dict]:
        return [{"step": s, "machine": m, "kind": k} for s, m, k in self.schedule]


TRACES = (
    Trace("2x2-q5", 2, 2, 4, 40, ((9, "m0", "kill"), (19, "m4", "term"))),
    Trace("2x2-s10", 2, 2, 4, 60, ((12, "m0", "kill"), (31, "m4", "term"), (45, "m2", "term"))),
    Trace("4x2-kills", 4, 2, 8, 40, ((10, "m1", "kill"), (24, "m6", "kill"))),
    Trace("2x4-mixed", 2, 4, 8, 40, ((10, "m2", "kill"), (24, "m5", "term"))),
    Trace("2x2-whole", 2, 2, 2, 40, ((12, "m0", "kill"),)),
    Trace("2x2-coord", 2, 2, 4, 40, ((25, "m1", "kill"),), ("faults.coordinator_schedule=[{step: 12, kind: kill}]",)),
)
CAUSES = ("outage", "discard", "waits")


def markdown(rows: List[dict]) -> str:
    lines = ["| trace | failures (tiers) | measured goodput (billed as the model) | model | model_fixed | "
             + " | ".join(f"{c}: measured / model / fixed" for c in CAUSES) + " | idle, unpaid, stall, pace (measured only) |",
             "|---|---|---|---|---|" + "---|" * len(CAUSES) + "---|"]
    for row in rows:
        if "error" in row and "measured" not in row:
            lines.append(f"| {row['name']} | run failed: {row['error']} |" + " |" * (5 + len(CAUSES)))
            continue
        m, p, f = row["measured"], row["model"], row["model_fixed"]
        cells = [f"{m[c + '_fraction']:.3f} / {p[c + '_fraction']:.3f} / {f[c + '_fraction']:.3f}" for c in CAUSES]
        lines.append(f"| {row['name']} | {row['failures']} ({row['tiers']}) | {m['goodput']:.3f} "
                     f"({m['goodput_billed_as_model']:.3f}) | {p['goodput']:.3f} | "
                     f"{f['goodput']:.3f} | " + " | ".join(cells)
                     + f" | {m['idle_fraction']:.3f}, {m['unpaid_fraction']:.3f}, {m['stall_fraction']:.3f}, "
                       f"{m['pace_fraction']:.3f} |")
    return "\n".join(lines)


def _summary(run_dir: str):
    path = os.path.join(run_dir, SUMMARY)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def rounded(d: dict) -> dict:
    return {k: rnd(v) if isinstance(v, float) else v for k, v in d.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="trace names to run (default: all)")
    ap.add_argument("--out", default=os.path.join(REPORT_DIR, "fleet_check"))
    ap.add_argument("--md", default=os.path.join(REPORT_DIR, "fleet_check.md"))
    ap.add_argument("--reuse", action="store_true",
                    help="read the runs already under --out instead of running them again (model changes)")
    args = ap.parse_args(argv)
    traces = [t for t in TRACES if args.only is None or t.name in args.only]
    rdv_data, rdv_source = FM.load_rendezvous()
    fit = rdv_data["fit_wall"]
    rows = []
    for t in traces:
        run_dir = os.path.join(args.out, t.name)
        if args.reuse:
            res = RunResult(t.name, run_dir, 0, 0.0, summary=_summary(run_dir))
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            res = run_job_retrying(t.name, run_dir, [*overrides(t.steps, t.events(), t.replicas, t.stages, t.machines),
                                                     *t.extra], stall_s=90.0)
        row = {"name": t.name, "grid": f"{t.replicas}x{t.stages}", "machines": t.machines, "steps": t.steps,
               "schedule": t.events(), "wall_s": None if args.reuse else rnd(res.wall_s, 1)}
        rebuilds = (res.summary or {}).get("rebuilds") or []
        row["failures"] = len(rebuilds)
        row["tiers"] = ", ".join(sorted({r["tier"] for r in rebuilds}))
        if res.error:
            row["error"] = res.error
        try:
            cmp = FT.compare(res.run_dir, rendezvous.predict(fit, t.replicas))
        except (OSError, ValueError, KeyError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            continue
        row["stall_s"] = {r: rnd(v) for r, v in cmp["stall_s"].items()}
        row.update(trace=cmp["trace"], measured=rounded(cmp["measured"]), model=rounded(cmp["model"]),
                   model_fixed=rounded(cmp["model_fixed"]),
                   error_points={k: rounded(v) for k, v in cmp["error"].items()})
        rows.append(row)
        print(f"{t.name}: measured {row['measured']['goodput']}, model {row['model']['goodput']}, "
              f"model_fixed {row['model_fixed']['goodput']}", file=sys.stderr)
    table = markdown(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
        f.write(table + "\n")
    print(table, file=sys.stderr)
    ok = [r for r in rows if "measured" in r]
    mean_abs = {name: {k: rnd(sum(abs(r["error_points"][name][k]) for r in ok) / len(ok)) for k in (*CAUSES, "goodput", "goodput_billed")}
                for name in ("model", "model_fixed")} if ok else None
    coord = [r for r in ok if r["name"] == "2x2-coord"]
    line = json.dumps({"benchmark": "fleet_check", "rdv_source": rdv_source, "traces": rows,
                       "mean_abs_error_points": mean_abs,
                       "coordinator_stall_s": coord[0]["stall_s"] if coord else None})
    if len(traces) == len(TRACES):  # a full run: what benchmarks/fleet_correlated.py reads
        with open(os.path.join(REPORT_DIR, "fleet_check.json"), "w") as f:
            f.write(line + "\n")
    print(line)
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
