"""Real failures, real processes: SIGKILL / SIGSTOP / SIGTERM injected into workers of a running job,
checked by outcome (rebuilt state vs the formula, survivors untouched, every batch exactly once)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from testkit import _alive, _descendants, ROOT, commits, observed_batch_ids, run_trainer
from kintsugi.recovery.rebuild import checkfree_average, from_positional, to_positional
from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
from kintsugi.trainer.data.batches import ShardedBatches, load_tokens

pytestmark = pytest.mark.distributed

BASE = ["experiment=quick", "train.eval_batches=1", "faults.spares=1", "recovery.heartbeat_timeout_s=2.0"]


def _kill(step, stage, kind="kill"):
    return f"{{step: {step}, replica: 0, stage: {stage}, kind: {kind}}}"


def _check_every_batch_once(records, max_steps, batch_size=16, seq_len=128):
    steps = commits(records)
    assert [c["step"] for c in steps] == list(range(max_steps)), "a step was skipped or repeated"
    corpus = prepare_corpus(DataConfig(max_files=300))
    data = ShardedBatches(load_tokens(corpus.train_path, corpus.dtype), seq_len, batch_size)
    for c in steps:
        assert observed_batch_ids(c) == data.batch_ids(c["step"]), f"step {c['step']} trained on the wrong batch"


def _load(dump_dir, pattern):
    paths = sorted(glob.glob(os.path.join(dump_dir, pattern)))
    assert paths, f"no dump matching {pattern}"
    return torch.load(paths[0], weights_only=False)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]) if torch.is_tensor(v) else v == b["state"][i][k]


def test_sigkill_middle_stage_rebuilt_by_checkfree(tmp_path, monkeypatch):
    dumps = tmp_path / "dumps"
    monkeypatch.setenv("KINTSUGI_DUMP_DIR", str(dumps))
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=12", "recovery.strategy=checkfree",
                                      f"faults.schedule=[{_kill(5, 2)}]")
    assert summary["failures"] == 1
    (rb,) = summary["rebuilds"]
    assert rb["tier"] == "checkfree" and rb["slot"] == [0, 2]
    assert rb["detect_s"] < 1.0, "a SIGKILLed peer must be noticed in well under a second"
    _check_every_batch_once(records, 12)
    # The rebuilt weights equal the formula applied to what the neighbours held at that moment.
    target = _load(dumps, "g1_target_0,2.pt")
    prev, nxt = target["packages"]
    w_prev, w_next = prev["grad_norm"] + 1e-4, nxt["grad_norm"] + 1e-4
    expect = checkfree_average(prev["params"], nxt["params"], w_prev, w_next)
    layer_ids = sorted({int(k.split(".")[1]) for k in target["params"]})
    _assert_same(from_positional(expect, layer_ids), target["params"])
    assert target["lr_scale"] == pytest.approx(1.1)
    assert target["optimizer"]["state"] == {}, "the rebuilt stage starts with a fresh optimizer"
    # The neighbours' parameters and optimizer state are bitwise unchanged by serving the rebuild,
    # and what they sent is what they hold.
    for i, src in enumerate((prev, nxt)):
        before = _load(dumps, f"g1_source{i}_0,2_before.pt")
        after = _load(dumps, f"g1_source{i}_0,2_after.pt")
        _assert_same(before["params"], after["params"])
        _assert_same_optimizer(before["optimizer"], after["optimizer"])
        src_ids = sorted({int(k.split(".")[1]) for k in before["params"] if k.startswith("layers.")})
        sent = {k: v for k, v in src["params"].items()}
        _assert_same(to_positional(before["params"], src_ids), sent)


def test_sigstop_detected_by_heartbeat_and_replaced(tmp_path):
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=10",
                                      f"faults.schedule=[{_kill(4, 1, 'stop')}]")
    (rb,) = summary["rebuilds"]
    assert rb["tier"] == "checkfree" and rb["slot"] == [0, 1]
    assert 1.5 <= rb["detect_s"] <= 2.0 + 1.0, "a hung worker is declared dead after the heartbeat timeout"
    _check_every_batch_once(records, 10)


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_sigterm_hands_exact_state_to_the_replacement(tmp_path, monkeypatch):
    dumps = tmp_path / "dumps"
    monkeypatch.setenv("KINTSUGI_DUMP_DIR", str(dumps))
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=10",
                                      f"faults.schedule=[{_kill(4, 1, 'term')}]")
    (rb,) = summary["rebuilds"]
    assert rb["tier"] == "handoff"
    assert summary["failures"] == 0, "a graceful leave is not a failure"
    leaver = _load(dumps, "g1_leaver_0,1.pt")
    target = _load(dumps, "g1_target_0,1.pt")
    _assert_same(leaver["params"], target["params"])
    _assert_same_optimizer(leaver["optimizer"], target["optimizer"])
    assert leaver["lr_scale"] == target["lr_scale"] and leaver["grad_norm"] == target["grad_norm"]
    _check_every_batch_once(records, 10)


def test_first_and_last_stage_rebuilt_by_checkfree_plus(tmp_path, monkeypatch):
    dumps = tmp_path / "dumps"
    monkeypatch.setenv("KINTSUGI_DUMP_DIR", str(dumps))
    _, summary, records = run_trainer(tmp_path / "run", *BASE, "train.max_steps=14", "recovery.strategy=checkfree_plus",
                                      "recovery.embedding_copy_every=2", f"faults.schedule=[{_kill(5, 0)},{_kill(10, 3)}]")
    tiers = sorted((tuple(rb["slot"]), rb["tier"]) for rb in summary["rebuilds"])
    assert tiers == [((0, 0), "checkfree_plus"), ((0, 3), "checkfree_plus")]
    _check_every_batch_once(records, 14)
    # Stage 0's embedding came back from the copy stage 1 kept, its layers from stage 1 (swap partner).
    first = _load(dumps, "g1_target_0,0.pt")
    (src,) = first["packages"]
    assert torch.equal(first["params"]["tok_embeddings.weight"], src["neighbour_copy"]["tok_embeddings.weight"])
    last = _load(dumps, "g*_target_0,3.pt")
    (src,) = last["packages"]
    assert torch.equal(last["params"]["output.weight"], src["neighbour_copy"]["output.weight"])
    losses = [c["loss"] for c in commits(records)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_adjacent_double_kill_stops_with_a_clear_message(tmp_path):
    proc, summary, _ = run_trainer(tmp_path / "run", *BASE, "train.max_steps=10", "faults.spares=2",
                                   f"faults.schedule=[{_kill(4, 1)},{_kill(4, 2)}]", check=False)
    assert proc.returncode == 3
    assert "adjacent" in proc.stderr and "cannot be rebuilt" in proc.stderr
    assert summary is not None and "adjacent" in summary["error"]


def test_join_without_the_token_is_refused(tmp_path):
    # A worker with the wrong token cannot even verify the coordinator (its identity record is
    # sealed with the run's token): it stops with one line saying so. One with no token stops too.
    from kintsugi.recovery.protocol import free_port
    from kintsugi.trainer.config.job import JobConfig
    path = tmp_path / "job.json"
    path.write_text(json.dumps(JobConfig().to_dict()))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), KINTSUGI_TOKEN="s3cret")
    coord = subprocess.Popen([sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", str(port), "--host", "127.0.0.1",
                              "--run-dir", str(tmp_path), "--job", str(path), "--no-progress"], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        bad = subprocess.run([sys.executable, "-m", "kintsugi.trainer.runtime.worker", "--coordinator", f"127.0.0.1:{port}"],
                             env=dict(env, KINTSUGI_TOKEN="wrong"), capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "does not verify with this token" in bad.stderr, bad.stderr[-2000:]
        no_token = dict(env)
        no_token.pop("KINTSUGI_TOKEN")
        none = subprocess.run([sys.executable, "-m", "kintsugi.trainer.runtime.worker", "--coordinator", f"127.0.0.1:{port}"],
                              env=no_token, capture_output=True, text=True, timeout=60)
        assert none.returncode != 0 and "no token" in none.stderr, none.stderr[-2000:]
    finally:
        coord.kill()
        _, err = coord.communicate()
    assert " joined " not in err


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_no_orphan_processes_when_the_launcher_dies(tmp_path, sig):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launcher = subprocess.Popen([sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet",
                                 "experiment=quick", "train.max_steps=500", "faults.spares=1"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                # A shell that started pytest in the background passes SIGINT on as
                                # ignored; give the launcher the default (Ctrl-C raises) whatever ran us.
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline:
        m = run_dir / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    kids = _descendants(launcher.pid)
    assert len(kids) >= 6, "coordinator + 4 workers + 1 spare"
    os.kill(launcher.pid, sig)
    launcher.wait(timeout=60)
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in kids):
        time.sleep(0.1)
    assert not [p for p in kids if _alive(p)], "processes outlived the launcher"
