"""A worker that is joining when its coordinator dies joins the coordinator that replaces it.

Found in a run under recovery.control=etcd whose three etcd members were starved of CPU while the
workers joined: the leader's lease ran out, it restarted as a standby and led again under a new
epoch, and the two workers that were waiting for the answer to their join died of the lost
connection (CoordinatorAway out of `joining.join`). The new incarnation had never heard of them, so
the run waited for ever for the workers it lacked. The same window exists for the local control
plane's restart in place, which this test uses: a real coordinator is SIGKILLed between a worker's
connection and its join, and restarted on its port from its saved state, as the local launcher
restarts it."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from testkit import ROOT

pytestmark = pytest.mark.distributed


def _coordinator(run, port, resume):
    from kintsugi.trainer.launch.local import child_env
    return subprocess.Popen([sys.executable, "-m", "kintsugi.trainer.cli.coordinator", "--port", str(port), "--host",
                             "127.0.0.1", "--run-dir", str(run), "--job", str(run / "job.json"), "--no-progress"]
                            + (["--resume"] if resume else []), env=child_env(), cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)


def _write_job(run, *overrides, vocab_size=256):
    from kintsugi.trainer.cli.compose import compose_job
    job, _ = compose_job(["experiment=quick", "faults=none", "parallel.stages=2", "train.max_steps=2", *overrides])
    job.model.vocab_size, job.recovery.token = vocab_size, "s3cret"
    (run / "job.json").write_text(json.dumps(job.to_dict()))
    return job


def _stop(*procs):
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_a_worker_joining_as_its_coordinator_dies_joins_the_restarted_one(tmp_path):
    from kintsugi.recovery import control as C
    from kintsugi.recovery import protocol as P
    from kintsugi.trainer.runtime import joining

    _write_job(tmp_path)
    port = P.free_port()
    first = _coordinator(tmp_path, port, resume=False)
    second = None
    try:
        control = C.open_control("127.0.0.1", port, "s3cret", role="worker", timeout_s=60)
        first_boot = control.boot
        while not (tmp_path / "control_state.json").exists():   # what a restart resumes from
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        outcome = {}

        def worker_joins():
            try:
                joining.join(control, "w7", "m0", timeout_s=60)
                outcome["joined"] = True
            except BaseException as e:  # noqa: BLE001 - what the worker process would die of
                outcome["error"] = repr(e)
        t = threading.Thread(target=worker_joins, daemon=True)
        t.start()
        time.sleep(1.0)   # the worker finds its coordinator gone before a new one listens
        second = _coordinator(tmp_path, port, resume=True)
        t.join(timeout=90)
        assert not t.is_alive(), "the worker never finished joining"
        assert outcome.get("joined"), f"the worker died while joining: {outcome.get('error')}"
        assert control.boot != first_boot, "the worker joined the dead incarnation"
        # The restarted coordinator counts it: it answered the join and lists the worker.
        assert control.get_json_or("ack/w7") == "ok"
        state = {}
        deadline = time.monotonic() + 20
        while "w7" not in state.get("workers", {}) and time.monotonic() < deadline:
            state = json.loads((tmp_path / "control_state.json").read_text())
            time.sleep(0.1)
        assert state["workers"]["w7"]["state"] == "spare"
        assert state["incarnation"] == 2
    finally:
        _stop(first, second)


def test_a_worker_connecting_as_its_coordinator_dies_connects_to_the_restarted_one(tmp_path):
    """One step earlier: the coordinator dies between a worker's connection and its challenge (the
    connection is reset as the worker asks who it is). The worker waits for the successor."""
    from kintsugi.recovery import control as C
    from kintsugi.recovery import protocol as P

    _write_job(tmp_path)
    port = P.free_port()
    first = _coordinator(tmp_path, port, resume=False)
    second = None
    try:
        connected = P.connect("127.0.0.1", port, timeout_s=60)   # the worker's connection, made
        while not (tmp_path / "control_state.json").exists():
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)                       # and its coordinator gone
        first.wait(timeout=10)
        outcome = {}

        def worker_connects():
            try:
                outcome["control"] = C.open_control("127.0.0.1", port, "s3cret", role="worker", timeout_s=60,
                                                    store=connected)
            except BaseException as e:  # noqa: BLE001 - what the worker process would die of
                outcome["error"] = repr(e)
        t = threading.Thread(target=worker_connects, daemon=True)
        t.start()
        time.sleep(1.0)
        second = _coordinator(tmp_path, port, resume=True)
        t.join(timeout=90)
        assert not t.is_alive(), "the worker never finished connecting"
        assert "control" in outcome, f"the worker died while connecting: {outcome.get('error')}"
        assert outcome["control"].incarnation == 2, "the worker did not reach the restarted coordinator"
    finally:
        _stop(first, second)


def test_a_start_short_of_workers_ends_with_one_line_after_spare_wait_s(tmp_path):
    """The other half of that run's hang: whatever the cause (a worker that died before it joined,
    a launcher that started too few), a start that lacks workers ends after recovery.spare_wait_s
    with a line saying how many joined, instead of waiting for ever."""
    from kintsugi.recovery import control as C
    from kintsugi.recovery import protocol as P
    from kintsugi.trainer.runtime import joining

    _write_job(tmp_path, "recovery.spare_wait_s=3")
    port = P.free_port()
    coordinator = _coordinator(tmp_path, port, resume=False)
    try:
        control = C.open_control("127.0.0.1", port, "s3cret", role="worker", timeout_s=60)
        joining.join(control, "w0", "m0", timeout_s=30)     # one of the two the run needs
        started = time.monotonic()
        _, err = coordinator.communicate(timeout=60)
    finally:
        _stop(coordinator)
    assert coordinator.returncode not in (0, None)
    assert time.monotonic() - started < 30
    assert "only 1 of the 2 workers the run needs" in err and "recovery.spare_wait_s=3s" in err, err[-2000:]


@pytest.mark.slow  # ~25 s; the default run stays near 20 minutes on 2 cores
def test_a_worker_reading_its_start_as_its_coordinator_dies_starts_with_the_restarted_one(tmp_path):
    """The last window: joined, then the coordinator dies while the worker reads what it starts
    from (the corpus, the run dir). Here the corpus is not in the first coordinator's store yet, so
    the worker waits on that read when the coordinator is SIGKILLed; the restarted one gets it. The
    worker re-registers with the restarted coordinator and waits as a spare instead of dying."""
    from kintsugi.recovery import control as C
    from kintsugi.recovery import protocol as P
    from kintsugi.trainer.data.corpus import prepare_corpus
    from kintsugi.trainer.launch.local import child_env

    corpus = prepare_corpus(_write_job(tmp_path).data)
    _write_job(tmp_path, vocab_size=corpus.vocab_size)
    port = P.free_port()
    first = _coordinator(tmp_path, port, resume=False)
    second = worker = None
    try:
        launcher = C.open_control("127.0.0.1", port, "s3cret", role="launcher", timeout_s=60)
        worker = subprocess.Popen([sys.executable, "-m", "kintsugi.trainer.runtime.worker", "--coordinator",
                                   f"127.0.0.1:{port}", "--wid", "w0"], env=child_env({"KINTSUGI_TOKEN": "s3cret"}),
                                  cwd=ROOT, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:      # joined: it now waits on the corpus
            state = json.loads((tmp_path / "control_state.json").read_text())
            if "w0" in state["workers"]:
                break
            time.sleep(0.1)
        assert "w0" in state["workers"], "the worker never joined"
        time.sleep(1.0)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        second = _coordinator(tmp_path, port, resume=True)
        launcher = C.open_control("127.0.0.1", port, "s3cret", role="launcher", timeout_s=60)
        launcher.put_json("corpus", {"train_path": corpus.train_path, "val_path": corpus.val_path,
                                     "dtype": str(corpus.dtype), "vocab_size": corpus.vocab_size})
        deadline = time.monotonic() + 20        # long enough to re-register and warm up
        while time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.2)
        assert worker.poll() is None, f"the worker died: {worker.stderr.read()[-3000:]}"
        second.terminate()                      # its log: whom it counted
        _, said = second.communicate(timeout=30)
        assert "worker w0 re-registered" in said, said[-3000:]
    finally:
        _stop(worker, first, second)
