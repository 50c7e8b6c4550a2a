"""`kintsugi report`: compare finished (or stopped) runs.

Reads each run directory's `summary.json` and `metrics.jsonl` (as written by trainer.reporting.summary and the
coordinator) and produces
- a plain-text table: steps, final validation loss, throughput, failures, rebuilds by tier, and the
  bytes each channel carried;
- `report.png`: loss against wall-clock for every run, each failure marked where it happened and
  labelled with the tier that rebuilt it, next to a bar chart of bytes per channel.

A run without summary.json (killed before the end) is reported from metrics.jsonl alone; whatever
neither file holds shows as "-".
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from kintsugi.recovery.runfiles import METRICS, SUMMARY, read_metrics

# summary.json's bytes keys in table order, with short column titles. "p2p" (the sum of the first
# two) is left out so that no byte is counted twice.
CHANNELS = (("p2p_activations", "p2p act"), ("p2p_gradients", "p2p grad"), ("outer_sync", "outer sync"),
            ("data_parallel", "data par"), ("rebuild", "rebuild"), ("data_parallel_equivalent", "DP equiv"))


@dataclass
class Run:
    path: str
    name: str = ""
    summary: dict = field(default_factory=dict)
    commits: List[dict] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)
    rebuilds: List[dict] = field(default_factory=list)  # rebuild events: slot, tier, step, recover_s, t

    @property
    def steps(self) -> Optional[int]:
        if "steps" in self.summary:
            return self.summary["steps"]
        return max((c["step"] for c in self.commits), default=-1) + 1 if self.commits else None

    @property
    def final_val_loss(self) -> Optional[float]:
        if self.summary.get("final_val_loss") is not None:
            return self.summary["final_val_loss"]
        finals = [e["val_loss"] for e in self.evals if e.get("final")]
        return finals[-1] if finals else None

    @property
    def tiers(self) -> Counter:
        return Counter(rb["tier"] for rb in (self.rebuilds or self.summary.get("rebuilds", [])))


def load_run(path: str) -> Run:
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such run directory; pass outputs/<name>/<time> directories")
    summary_path = os.path.join(path, SUMMARY)
    if not os.path.isfile(summary_path) and not os.path.isfile(os.path.join(path, METRICS)):
        raise ValueError(f"{path}: neither summary.json nor metrics.jsonl, so not a Kintsugi run directory")
    summary = {}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    commits, evals, events = read_metrics(path)
    rebuilds = [e for e in events if e.get("kind") == "rebuild"]
    return Run(path=path, summary=summary, commits=commits, evals=evals, rebuilds=rebuilds)


def short_names(paths: Sequence[str]) -> List[str]:
    """The shortest path suffix that tells the runs apart; a timestamp directory (outputs/<name>/
    <time>) keeps its parent so that the run's name shows."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    depth = [2 if p[-1][:1].isdigit() and len(p) > 1 else 1 for p in parts]
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        dupes = {n for n in names if names.count(n) > 1}
        if not dupes or all(d >= len(p) for p, d in zip(parts, depth)):
            return names
        depth = [d + 1 if n in dupes else d for n, d in zip(names, depth)]


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    # The first column (run names) is left-aligned, the numbers right-aligned.
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def format_table(runs: Sequence[Run]) -> str:
    rows = []
    for run in runs:
        s = run.summary
        loss = run.final_val_loss
        tiers = run.tiers
        rows.append([run.name, "-" if run.steps is None else str(run.steps),
                     "-" if loss is None else f"{loss:.4f}",
                     "-" if s.get("tokens_per_s") is None else f"{s['tokens_per_s']:.0f}",
                     "-" if s.get("wall_s") is None else f"{s['wall_s']:.1f}",
                     str(s.get("failures", "-")),
                     ", ".join(f"{t} x{n}" for t, n in sorted(tiers.items())) or "none"])
    runs_table = _table(["run", "steps", "final val loss", "tokens/s", "wall s", "failures", "rebuilds by tier"], rows)
    byte_rows = [[run.name] + [_fmt_bytes(run.summary.get("bytes", {}).get(k)) for k, _ in CHANNELS] for run in runs]
    bytes_table = _table(["bytes sent"] + [title for _, title in CHANNELS], byte_rows)
    errors = [f"{run.name}: stopped with error: {run.summary['error']}" for run in runs if run.summary.get("error")]
    return "\n\n".join([runs_table, bytes_table] + (["\n".join(errors)] if errors else []))


def failure_marks(run: Run) -> List[Tuple[float, float, str]]:
    """(failed at, training again at, label) in the run's wall-clock seconds (the clock of metrics.jsonl)
    for each rebuild. An event's `t` is when the coordinator logged it, just after the rebuilt stage
    resumed; `recover_s` is measured from the failure, so the failure happened at t - recover_s."""
    marks = []
    for rb in run.rebuilds:
        if "t" not in rb:
            continue
        resumed = float(rb["t"])
        failed = resumed - float(rb.get("recover_s", 0.0))
        slot = rb.get("slot")
        where = f" r{slot[0]}s{slot[1]}" if isinstance(slot, (list, tuple)) and len(slot) == 2 else ""
        marks.append((failed, resumed, f"{rb['tier']}{where}"))
    return marks


def plot_runs(runs: Sequence[Run], path: str) -> List[str]:
    """Draw report.png; returns the failure labels drawn (so callers and tests can check them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_loss, ax_bytes) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    labels = []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        replicas = sorted({c["replica"] for c in run.commits})
        for r in replicas:
            pts = sorted((c for c in run.commits if c["replica"] == r), key=lambda c: c["wall_s"])
            ax_loss.plot([c["wall_s"] for c in pts], [c["loss"] for c in pts], color=color, lw=1.0 if r == 0 else 0.6,
                         alpha=1.0 if r == 0 else 0.5, label=f"{run.name} (train)" if r == replicas[0] else None)
        if run.evals:
            ax_loss.plot([e["wall_s"] for e in run.evals], [e["val_loss"] for e in run.evals], "o--", color=color,
                         ms=4, lw=0.8, label=f"{run.name} (val)")
        first = sorted((c for c in run.commits if c["replica"] == (replicas[0] if replicas else 0)),
                       key=lambda c: c["wall_s"])
        for failed, resumed, label in failure_marks(run):
            y = float(np.interp(failed, [c["wall_s"] for c in first], [c["loss"] for c in first])) if first else 0.0
            ax_loss.axvspan(failed, resumed, color=color, alpha=0.15, lw=0)  # time without progress
            ax_loss.plot([failed], [y], "x", color="red", ms=8, mew=2)
            ax_loss.annotate(label, (failed, y), xytext=(4, 10), textcoords="offset points", fontsize=8,
                             color="red", rotation=30)
            labels.append(label)
    ax_loss.set_xlabel("wall-clock (s)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss; x = failure, shaded until the rebuilt stage trains again")
    if runs:
        ax_loss.legend(fontsize=8)

    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(CHANNELS))
    for i, run in enumerate(runs):
        values = [run.summary.get("bytes", {}).get(k, 0) or 0 for k, _ in CHANNELS]
        ax_bytes.bar(x + (i - (len(runs) - 1) / 2) * width, [v / 2**20 for v in values], width,
                     color=f"C{i % 10}", label=run.name)
    ax_bytes.set_xticks(x, [title for _, title in CHANNELS], rotation=30, ha="right")
    ax_bytes.set_yscale("symlog", linthresh=0.01)  # channels differ by orders of magnitude; 0 stays drawable
    ax_bytes.set_ylabel("MiB sent")
    ax_bytes.set_title("bytes per channel")
    ax_bytes.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return labels


def write_report(paths: Sequence[str], out_dir: str) -> Tuple[str, str]:
    """Load the runs, write out_dir/report.txt and out_dir/report.png; returns (table, png path)."""
    runs = [load_run(p) for p in paths]
    for run, name in zip(runs, short_names([r.path for r in runs])):
        run.name = name
    table = format_table(runs)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(table + "\n")
    png = os.path.join(out_dir, "report.png")
    plot_runs(runs, png)
    return table, png
