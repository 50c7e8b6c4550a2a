"""Smoke test of benchmarks/diloco_bandwidth.py: the --quick run (2 replica processes in two network
namespaces joined by a tbf-shaped veth pair, plus a loopback pair; tiny model, 6 steps) prints one
JSON line with wall time, bytes and speedup per variant and link, and leaves no namespace behind.

Needs root with `ip netns` and `tc`; elsewhere (CI without root) the benchmark reports "skipped" and
so does this test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import run_benchmark

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
VARIANTS = {"data_parallel", "diloco", "streaming"}
# ~20 s on an idle 2-core machine (two pairs of processes starting torch are most of it); the
# bound leaves room for a CPU shared with other jobs.
BUDGET_S = 150


def _namespaces() -> set:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.split()[0] for line in out.splitlines() if line.split()}


@pytest.fixture(scope="module")
def result() -> dict:
    from kintsugi.benchmarks.diloco_bandwidth import netns_unavailable
    why = netns_unavailable()
    if why:
        pytest.skip(f"network namespaces with tc are not permitted here: {why}")
    return run_benchmark("benchmarks.diloco_bandwidth", "--quick", timeout=BUDGET_S)


def test_every_link_and_variant_is_reported(result):
    assert "skipped" not in result, result
    assert result["benchmark"] == "diloco_bandwidth" and result["quick"] is True
    conds = result["conditions"]
    assert set(conds) == {"loopback", "unlimited_veth", "50mbit"}
    assert conds["50mbit"]["rate_mbit"] == 50.0 and conds["loopback"]["rate_mbit"] is None
    assert conds["50mbit"]["data_parallel_link_floor_s_per_step"] > 0
    for label, cond in conds.items():
        assert set(cond["variants"]) == VARIANTS, label
        for name, v in cond["variants"].items():
            assert v["wall_s"] >= 0 and v["s_per_step"] >= 0 and v["blocked_s"] >= 0, (label, name, v)
            assert v["bytes"] > 0 and v["val_loss"] > 0, (label, name, v)
        assert set(cond["speedup_vs_data_parallel"]) == {"diloco", "streaming"}
        assert all(s > 0 for s in cond["speedup_vs_data_parallel"].values())


def test_bytes_match_between_links_and_wire(result):
    conds = result["conditions"]
    steps = result["steps"]
    for name in VARIANTS:
        counted = {c["variants"][name]["bytes"] for c in conds.values()}
        assert len(counted) == 1, (name, counted)  # same training, same payload on every link
    dp = conds["50mbit"]["variants"]["data_parallel"]
    assert dp["bytes"] == result["data_parallel_bytes_per_step"] * steps
    for label in ("unlimited_veth", "50mbit"):
        for name, v in conds[label]["variants"].items():
            # Both veth ends together carry both replicas' payload plus TCP/IP and gloo framing.
            assert 2 * v["bytes"] <= v["wire_bytes"] < 2 * v["bytes"] * 1.5 + 200_000, (label, name, v)
    assert all("link_s_per_step" in v for v in conds["50mbit"]["variants"].values())
    s = conds["50mbit"]["variants"]
    assert s["streaming"]["bytes"] < s["diloco"]["bytes"] < s["data_parallel"]["bytes"]


def test_namespaces_are_removed_and_run_is_short(result):
    assert not {n for n in _namespaces() if n.startswith("ksbw")} - _others_alive()
    assert result["_elapsed_s"] < BUDGET_S


def test_reports_skipped_where_netns_is_refused(monkeypatch, capsys):
    from kintsugi.benchmarks import diloco_bandwidth
    monkeypatch.setattr(diloco_bandwidth, "netns_unavailable", lambda: "not root (test)")
    out = diloco_bandwidth.main(["--quick"])
    assert out == {"benchmark": "diloco_bandwidth", "skipped": "not root (test)"}
    assert json.loads(capsys.readouterr().out.strip()) == out


def _others_alive() -> set:
    """Namespaces of other runs of the benchmark still going (their pid lives): not ours to judge."""
    alive = set()
    for n in _namespaces():
        tail = n.rsplit("-", 1)[-1]
        if n.startswith("ksbw") and tail.isdigit():
            try:
                os.kill(int(tail), 0)
                alive.add(n)
            except ProcessLookupError:
                pass
            except PermissionError:
                alive.add(n)
    return alive
