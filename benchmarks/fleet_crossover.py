"""Prediction, not measurement: which rebuild wins, per-replica CheckFree / CheckFree+ / peer, or
checkpoint-restart, against the failure rate and the model size, with the approximate tiers' loss of
quality priced in training steps.

First-order expected costs (failures rare against a recovery; `benchmarks/fleet_model.py` simulates
the higher-order effects), for a fleet of W = 1024 GPUs = R replicas x S = 8 stages, step 1 s, H = 100,
10 Gbit/s links (the fleet model's assumptions), hazard h per GPU-hour, so W x h failures an hour.
Per failure, in worker-seconds:

- peer (Kintsugi): the replica's outage D = detect + rdv(S) + exchange + its stage's state (16 B per
  parameter) over the link; with matched syncs the others wait as long (measured,
  `benchmarks/fleet_check.py`), so W x D; plus the rebuilt stage's progress since its last sync
  (H / 2 steps on average) and the step in flight of the others (S / 2 steps).
- checkfree / checkfree_plus: the same outage with the two neighbours' weights (4 B per parameter,
  in parallel) instead of the stage's whole state, no unsynced discard, and the loss of quality:
  `price` extra steps for the whole fleet, W x price x step. The price is measured here only on the
  tiny model (`benchmarks/checkfree_convergence.py`, BENCHMARKS.md, full run: the excess over the
  no-failure run 60 steps after one failure, median of 3 seeds, 0.188 for CheckFree and 0.128 for
  CheckFree+, which never got back on the curve) divided by the slope of the no-failure curve there
  (val loss 1.436 / 1.512 at step 1,200, falling 5.9 % / 6.6 % over the last 300 steps): 627 and
  360 steps. Whether a large model pays more or fewer steps is not known from here, so every cell
  also gives the break-even price: CheckFree wins where its real price is below it.
- checkpoint-restart (torchrun elastic): every worker restarts (detect + process start + rdv(W)),
  loads the checkpoint and redoes half an interval; saves block every interval (Young/Daly optimum
  sqrt(2 x save x fleet MTBF)). Save blocking scales with the parameters from PyTorch's published 7B
  figures (148.8 s synchronous, 6.3 s asynchronous: https://pytorch.org/blog/reducing-checkpointing-times);
  the load takes the synchronous save's time (the same bytes through the same storage; an assumption).
  Checkpoint bytes 14 per parameter (bf16 weights, fp32 master copy and two Adam moments).

Rates: 2e-5 per GPU-hour (datacenter: Llama 3's 419 unexpected interruptions in 54 days on 16,384
GPUs, https://arxiv.org/abs/2407.21783, section 3.3.4) up to 0.33 (the CheckFree paper's highest).
Measured here: detect_s, exchange_s (BENCHMARKS.md "Recovery"), rdv() and process start
(`benchmarks/rendezvous.py`, outputs/benchmarks/rendezvous.json).

    python -m benchmarks.fleet_crossover [--plot docs/fleet_crossover.png]

Prints one JSON line; the Markdown tables go to stderr and outputs/benchmarks/fleet_crossover.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List

from kintsugi.benchmarks import fleet_model as FM

WORKERS, STAGES, STEP_S, SYNC_EVERY, GBIT = 1024, 8, 1.0, 100, 10.0
SIZES = (0.5e9, 1e9, 7e9, 13e9, 70e9)
RATES = (2e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.10, 0.33)
STATE_BYTES, WEIGHT_BYTES, CKPT_BYTES = 16, 4, 14
# PyTorch blog (URL in the docstring): a 7B model blocked 148.8 s per synchronous save, 6.3 s async.
SAVE_SYNC_7B_S, SAVE_ASYNC_7B_S = 148.8, 6.3
# BENCHMARKS.md, "CheckFree convergence", full run: lasting excess after one failure, and the
# no-failure curve's slope over its last quarter (1.436 and 1.512 at step 1,200, -5.9 % and -6.6 %).
EXCESS = {"checkfree": 0.188, "checkfree_plus": 0.128}
SLOPE = {"checkfree": 1.436 * (1 / (1 - 0.059) - 1) / 300, "checkfree_plus": 1.512 * (1 / (1 - 0.066) - 1) / 300}
TIERS = ("peer", "checkfree", "checkfree_plus", "checkpoint")


def measured_price_steps() -> Dict[str, float]:
    return {t: EXCESS[t] / SLOPE[t] for t in EXCESS}


def per_failure(inp: FM.Inputs, params: float) -> Dict[str, float]:
    """Worker-seconds lost per failure by each rebuild, the approximate tiers without their price."""
    stage = params / STAGES
    base = inp.detect_s + inp.rdv_s(STAGES) + inp.exchange_s
    d_peer = base + stage * STATE_BYTES * 8 / (GBIT * 1e9)
    d_cf = base + stage * WEIGHT_BYTES * 8 / (GBIT * 1e9)
    peer = WORKERS * d_peer + (SYNC_EVERY / 2 + STAGES / 2) * STEP_S
    cf = WORKERS * d_cf + STAGES / 2 * STEP_S
    return {"peer": peer, "checkfree": cf, "checkfree_plus": cf, "d_peer_s": d_peer, "d_checkfree_s": d_cf}


def checkpoint_lost_fraction(inp: FM.Inputs, params: float, rate: float, save_s: float) -> float:
    haz = FM.hazard_per_s(rate)
    failures_per_s = WORKERS * haz
    if failures_per_s == 0:
        return 0.0
    mtbf = 1 / failures_per_s
    interval = max(STEP_S, math.sqrt(2 * save_s * mtbf))
    load = SAVE_SYNC_7B_S * params / 7e9
    restart = inp.detect_s + inp.process_start_s + inp.rdv_s(WORKERS) + load
    per_fail = restart + interval / 2                      # each worker, per failure
    return min(1.0, save_s / (interval + save_s) + failures_per_s * per_fail)


def cell(inp: FM.Inputs, params: float, rate: float, price: Dict[str, float]) -> dict:
    failures_per_s = WORKERS * FM.hazard_per_s(rate)
    pf = per_failure(inp, params)
    lost = {"peer": failures_per_s * pf["peer"] / WORKERS}
    for t in ("checkfree", "checkfree_plus"):
        lost[t] = failures_per_s * (pf[t] + WORKERS * price[t] * STEP_S) / WORKERS
    lost["checkpoint"] = checkpoint_lost_fraction(inp, params, rate, SAVE_ASYNC_7B_S * params / 7e9)
    lost["checkpoint_sync"] = checkpoint_lost_fraction(inp, params, rate, SAVE_SYNC_7B_S * params / 7e9)
    goodput = {t: max(0.0, 1.0 - v) for t, v in lost.items()}
    winner = max(TIERS, key=lambda t: goodput[t])
    # The CheckFree price (steps per failure) at which it ties with peer and with checkpoint-restart.
    be_peer = (pf["peer"] - pf["checkfree"]) / (WORKERS * STEP_S)
    be_ckpt = ((lost["checkpoint"] * WORKERS / failures_per_s - pf["checkfree"]) / (WORKERS * STEP_S)
               if failures_per_s else math.inf)
    return {"params": params, "rate_per_h": rate, "goodput": goodput, "winner": winner,
            "break_even_price_steps": {"vs_peer": be_peer, "vs_checkpoint": be_ckpt},
            "d_peer_s": pf["d_peer_s"], "d_checkfree_s": pf["d_checkfree_s"]}


def markdown(cells: List[dict]) -> str:
    head = "| rate per GPU-hour | " + " | ".join(f"{p / 1e9:g}B" for p in SIZES) + " |"
    sep = "|---|" + "---|" * len(SIZES)
    out = ["Winner (goodput: peer / CheckFree / CheckFree+ / checkpoint-restart async)", "", head, sep]
    for rate in RATES:
        row = []
        for p in SIZES:
            c = next(x for x in cells if (x["params"], x["rate_per_h"]) == (p, rate))
            g = c["goodput"]
            row.append(f"{c['winner']} ({g['peer']:.3f} / {g['checkfree']:.3f} / {g['checkfree_plus']:.3f} / "
                       f"{g['checkpoint']:.3f})")
        out.append(f"| {rate:g} | " + " | ".join(row) + " |")
    out += ["", "Break-even CheckFree price, steps per failure (below it CheckFree beats: peer / checkpoint-restart)",
            "", head, sep]
    for rate in RATES:
        row = []
        for p in SIZES:
            c = next(x for x in cells if (x["params"], x["rate_per_h"]) == (p, rate))
            b = c["break_even_price_steps"]
            row.append(f"{b['vs_peer']:.1f} / {b['vs_checkpoint']:.0f}")
        out.append(f"| {rate:g} | " + " | ".join(row) + " |")
    return "\n".join(out)


def plot(cells: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SIZES), figsize=(3.0 * len(SIZES), 3.0), sharey=True)
    for ax, p in zip(axes, SIZES):
        for t in (*TIERS, "checkpoint_sync"):
            ys = [next(c for c in cells if (c["params"], c["rate_per_h"]) == (p, r))["goodput"][t] for r in RATES]
            ax.plot(RATES, ys, marker="o", ms=3, label=t.replace("_", " "))
        ax.set_xscale("log")
        ax.set_title(f"{p / 1e9:g}B parameters", fontsize=9)
        ax.set_xlabel("failures per GPU-hour", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("goodput (predicted, first order)", fontsize=8)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"Rebuild crossover: W={WORKERS}, S={STAGES}, {GBIT:g} Gbit/s, CheckFree priced at the tiny "
                 "model's measured excess (benchmarks/fleet_crossover.py)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", default=None, help="write the figure here (e.g. docs/fleet_crossover.png)")
    ap.add_argument("--md", default=os.path.join(FM.REPORT_DIR, "fleet_crossover.md"))
    args = ap.parse_args(argv)
    rdv_data, source = FM.load_rendezvous()
    inp = FM.Inputs(rdv=rdv_data["fit_wall"], process_start_s=rdv_data["process_start_s"], stages=STAGES)
    price = measured_price_steps()
    cells = [cell(inp, p, r, price) for r in RATES for p in SIZES]
    md = markdown(cells)
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
        f.write(md + "\n")
    print(md, file=sys.stderr)
    if args.plot:
        plot(cells, args.plot)
    print(json.dumps({"benchmark": "fleet_crossover", "workers": WORKERS, "stages": STAGES, "gbit": GBIT,
                      "price_steps": price, "rdv_source": source, "process_start_s": inp.process_start_s,
                      "rdv_W_s": inp.rdv_s(WORKERS), "rdv_S_s": inp.rdv_s(STAGES), "cells": cells,
                      "plot": args.plot}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
