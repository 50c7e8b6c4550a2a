"""`kintsugi status` on run directories written by hand as a coordinator leaves them (control_state.json,
metrics.jsonl, coordinator_state.json, summary.json), and the front door: `kintsugi --help`, `help`,
`--version`. Expected values are the numbers written into the files, not what status derives."""
import json
import os
import signal
import subprocess
import sys
import time
import tomllib

import pytest

from testkit import ROOT
from kintsugi.trainer.cli.main import main as cli_main
from kintsugi.trainer.reporting.status import HeartbeatClock, collect


def _worker(wid, slot, state="active", hb=10, machine="m0", step=4):
    return {"wid": wid, "pid": 100 + int(wid[1:]), "host": "vm", "machine": machine, "hb": hb, "hb_changed": None,
            "state": state, "slot": slot, "leaving": False,
            "status": {"n": hb, "phase": "training" if state == "active" else state, "step": step,
                       "stage": slot[1] if slot else None}}


def _write_run(path, *, running=True, hb=10):
    """A 1 x 4 run after w0 (slot 0,1) was SIGKILLed at step 3 and spare w3 rebuilt it by CheckFree;
    w5 waits as a spare. Running: the liveness file is fresh and there is no final state."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "job.json"), "w") as f:
        json.dump({"name": "quick", "parallel": {"replicas": 1, "stages": 4}, "train": {"max_steps": 12}}, f)
    workers = {"w1": _worker("w1", [0, 0], hb=hb, machine="m0"), "w0": _worker("w0", [0, 1], "dead", 7, "m1", 2),
               "w4": _worker("w4", [0, 2], hb=hb, machine="m2"), "w2": _worker("w2", [0, 3], hb=hb, machine="m3"),
               "w3": _worker("w3", [0, 1], hb=hb, machine="m1"), "w5": _worker("w5", None, "spare", 3, "m4", None)}
    rebuild = {"step": 3, "slot": [0, 1], "tier": "checkfree", "detect_s": 0.0216, "recover_s": 0.4785}
    control = {"incarnation": 1, "version": 3, "started": True, "workers": workers,
               "slots": {"0,0": "w1", "0,1": "w3", "0,2": "w4", "0,3": "w2"},
               "cells": {"0": {"gen": 1, "plan": {"cell": 0, "gen": 1, "replicas": [0], "layout": [2, 2, 2, 2]},
                               "kicks": 0, "waiting": False, "lost": {}, "rebuilding": {}}},
               "committed": {"0": 6}, "rebuilds": [rebuild], "failures": 1}
    tmp = os.path.join(path, "control_state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(control, f)
    os.replace(tmp, os.path.join(path, "control_state.json"))
    losses = [5.5868, 5.1337, 4.6168, 4.2030, 4.0117, 3.7153, 3.6021]
    lines = [{"event": {"kind": "placement", "summary": "...", "t": 3.2}}]
    for step, loss in enumerate(losses):
        lines.append({"replica": 0, "step": step, "loss": loss, "grad_norm": 1.0, "tokens": 2048,
                      "wall_s": 5.0 + step, "gen": int(step >= 3)})
        if step == 2:
            lines.append({"event": dict(rebuild, kind="rebuild", t=6.7)})
    lines.append({"step": 6, "val_loss": 3.7465, "wall_s": 11.5})
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(l) + "\n" for l in lines) + '{"replica": 0, "st')  # a line being written
    if running:
        open(os.path.join(path, ".coordinator_alive"), "w").close()
    else:
        with open(os.path.join(path, "coordinator_state.json"), "w") as f:
            json.dump({"final_val_loss": 3.7465, "committed": {"0": 11}, "rebuilds": [rebuild], "failures": 1,
                       "error": None, "suspended": None}, f)
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"final_val_loss": 3.7465, "steps": 12, "wall_s": 20.5, "tokens_per_s": 1461.0,
                       "failures": 1, "error": None}, f)
    return str(path)


def test_status_table_of_a_running_run(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    assert cli_main(["status", run]) == 0
    out = capsys.readouterr().out
    assert "state: running" in out
    rows = [l.split() for l in out.splitlines() if l.startswith("  0 ")]
    # replica, stage, worker, machine, state, phase, step, heartbeat (unknown at the first look)
    assert rows == [["0", "0", "w1", "m0", "active", "training", "4", "-"],
                    ["0", "1", "w3", "m1", "active", "training", "4", "-"],
                    ["0", "2", "w4", "m2", "active", "training", "4", "-"],
                    ["0", "3", "w2", "m3", "active", "training", "4", "-"]]
    assert "spares: w5 (m4); gone: w0 (dead, was slot 0,1)" in out
    assert "cell 0 (replicas [0]): generation 1" in out
    assert "replica 0: 7 of 12" in out  # committed step 6 is the 7th step
    assert "step 3  slot 0,1  checkfree  detected in 0.022s  training again after 0.48s" in out
    last = [l.split()[5] for l in out.splitlines() if l.strip().startswith("replica 0  step")]
    assert last == ["4.6168", "4.2030", "4.0117", "3.7153", "3.6021"]  # the last 5 written
    assert "validation loss 3.7465 at step 6" in out


def test_status_json_has_the_same_facts(tmp_path, capsys):
    run = _write_run(tmp_path / "run", running=False)
    assert cli_main(["status", run, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["state"] == "finished" and st["name"] == "quick"
    assert st["grid"] == {"replicas": 1, "stages": 4}
    assert [(s["replica"], s["stage"], s["worker"]) for s in st["slots"]] == [(0, 0, "w1"), (0, 1, "w3"),
                                                                               (0, 2, "w4"), (0, 3, "w2")]
    assert [(c["cell"], c["gen"]) for c in st["cells"]] == [(0, 1)]
    assert st["rebuilds"] == [{"step": 3, "slot": [0, 1], "tier": "checkfree", "detect_s": 0.0216,
                               "recover_s": 0.4785}]
    assert [l["loss"] for l in st["losses"]][-1] == 3.6021
    assert st["summary"]["steps"] == 12 and st["summary"]["final_val_loss"] == 3.7465


def test_rebuilds_come_from_metrics_when_the_control_file_is_damaged(tmp_path):
    run = _write_run(tmp_path / "run")
    with open(os.path.join(run, "control_state.json"), "w") as f:
        f.write('{"workers": {"w1"')  # torn
    st = collect(run)
    assert [(r["slot"], r["tier"]) for r in st["rebuilds"]] == [([0, 1], "checkfree")]
    assert [s["state"] for s in st["slots"]] == ["empty"] * 4  # the grid comes from job.json


def test_heartbeat_age_is_known_from_the_second_look(tmp_path):
    run = _write_run(tmp_path / "run", hb=10)
    clock = HeartbeatClock()
    first = collect(run, clock=clock)
    assert all(s["heartbeat_age_s"] is None for s in first["slots"])
    _write_run(tmp_path / "run", hb=11)  # the workers beat; the coordinator rewrote its state
    written = time.time() - 5.0
    os.utime(os.path.join(run, "control_state.json"), (written, written))
    second = collect(run, clock=clock)
    ages = [s["heartbeat_age_s"] for s in second["slots"]]
    assert all(a is not None and 4.5 <= a <= 7.0 for a in ages), ages


@pytest.mark.parametrize("make", ["missing", "not_a_run", "a_file"])
def test_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys, make):
    path = str(tmp_path / "x")
    if make == "not_a_run":
        os.makedirs(path)
        open(os.path.join(path, "notes.txt"), "w").close()
    elif make == "a_file":
        open(path, "w").close()
    assert cli_main(["status", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kintsugi status: {path}: ")
    assert "outputs/<name>/<time>" in lines[0]


def test_watch_refreshes_until_interrupted(tmp_path):
    run = _write_run(tmp_path / "run", hb=10)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # A shell that started pytest in the background passes SIGINT on as ignored, and Python then
    # installs no KeyboardInterrupt handler: give the child the default disposition, as a terminal does.
    p = subprocess.Popen([sys.executable, "-m", "trainer", "status", run, "--watch", "0.2", "--json"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = p.stdout.readline()
        _write_run(tmp_path / "run", hb=12)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
    frames = [json.loads(first)] + [json.loads(l) for l in out.splitlines()]
    assert p.returncode == 0, err
    assert len(frames) >= 3
    assert frames[0]["slots"][0]["heartbeat_age_s"] is None
    assert frames[-1]["slots"][0]["heartbeat_age_s"] is not None  # the count moved between looks


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"]])
def test_help_lists_every_subcommand(capsys, argv):
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    for name in ("train", "export", "report", "status", "join", "coordinator"):
        assert any(l.strip().startswith(name + " ") for l in out.splitlines()), name
    assert "--cfg job" in out and "python -m trainer" in out


def test_help_of_a_command(capsys):
    assert cli_main(["help", "status"]) == 0
    assert "usage: kintsugi status" in capsys.readouterr().out


def test_version_is_the_package_version(capsys):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        want = tomllib.load(f)["project"]["version"]
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kintsugi {want}"


def test_train_help_is_hydras_under_our_name():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "trainer", "train", "--help"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("kintsugi is powered by Hydra")
    assert "experiment: " in r.stdout  # the config groups and their options
