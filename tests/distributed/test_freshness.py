"""Records that cannot be replayed, rewound or lost. Each attack comes from a client that reaches the
store but has no token, against a running job, and the run is checked by outcome: it completes, every
step is committed exactly once in metrics.jsonl, the losses are the undisturbed run's (where nothing
was rebuilt), summary.json tells the truth, and the tampering is counted by kind.

- A: the commit log's counter wound back by 5 and by 1000, the run id overwritten, the store flooded
  with 512 MB (the coordinator restarts with an empty store).
- B: the coordinator SIGKILLed, and everything a client could read from its first incarnation
  written back into the restarted one's store, over and over (the old identity, plans, beats).
- C: a worker SIGSTOPped while its own genuine, earlier heartbeats and beats forged without its key
  (an ever-growing counter) are written back in rotation, at its beat key as an eavesdropper sees it (it must still be found within
  recovery.heartbeat_timeout_s + 1 s), and the run id overwritten while the replacement spare joins.
"""
import json
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from testkit import ATTACK_JOB, beat_key_on_the_wire, start_trainer

pytestmark = pytest.mark.distributed

TOKEN = "fr3sh-" + "c0de" * 6
TIMEOUT_S = 2.0
JOB = ATTACK_JOB
assert f"recovery.heartbeat_timeout_s={TIMEOUT_S}" in JOB


class Attacker:
    """A store client without the token."""

    def __init__(self, port):
        self.s = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30),
                               wait_for_workers=False, use_libuv=True)

    def get(self, key):
        return self.s.get(key) if self.s.check([key]) else None


def _run(run_dir, *extra, attack=None, timeout=300):
    proc = start_trainer(run_dir, *JOB, *extra, env={"KINTSUGI_TOKEN": TOKEN})
    try:
        if attack is not None:
            attack(run_dir, proc)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    state = json.loads((run_dir / "coordinator_state.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return proc.returncode, err, summary, state, records


def _commits(records):
    return [r for r in records if "replica" in r and "step" in r and "val_loss" not in r and "event" not in r]


def _exactly_once(records, steps=24):
    rows = _commits(records)
    assert not [r for r in rows if r.get("duplicate")], "a step was recorded twice"
    assert sorted(r["step"] for r in rows) == list(range(steps)), "a step is missing or repeated"


def _losses(records):
    return {r["step"]: r["loss"] for r in _commits(records)}


def _wait_steps(run_dir, n, proc, timeout=180):
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and path.read_text().count('"loss"') >= n):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
        time.sleep(0.05)


def _port(run_dir):
    return json.loads((run_dir / "control_state.json").read_text())["port"]


@pytest.fixture
def plain(undisturbed_attack_run):
    return undisturbed_attack_run


def test_a_rewound_log_a_forged_run_id_and_a_flood_lose_nothing(tmp_path, plain):
    plain_summary, plain_records = plain

    def attack(run_dir, proc):
        # Early enough that the flood (~512 MB through the store, then the guard's check) is over
        # well before step 24 on a loaded machine.
        _wait_steps(run_dir, 2, proc)
        a = Attacker(_port(run_dir))
        a.s.add("commit/n", -5)
        _wait_steps(run_dir, 4, proc)
        a.s.add("commit/n", -1000)
        a.s.set("run_id", "forged")
        _wait_steps(run_dir, 6, proc)
        chunk = b"\x00" * (8 << 20)
        for i in range(64):  # 512 MB of values nobody asked for
            try:
                a.s.set(f"junk/{i}", chunk)
            except RuntimeError:  # the flood guard restarted the store under the attacker (the aim)
                break

    rc, err, summary, state, records = _run(tmp_path / "run", attack=attack)
    assert rc == 0, err[-3000:]
    _exactly_once(records)
    assert _losses(records) == _losses(plain_records)
    assert summary["steps"] == 24 and summary["tokens"] == plain_summary["tokens"] and not summary["missing_steps"]
    assert summary["final_val_loss"] == plain_summary["final_val_loss"]
    kinds = state["tampering"]
    assert kinds.get("rewound", 0) >= 1 and kinds.get("overwritten", 0) >= 1 and kinds.get("flood", 0) == 1, kinds
    assert state["coordinator_incarnations"] == 2, "the flood should have restarted the store once"


# Failed about one run in five before two fixes (2026-12-06): a re-registered worker's beating
# connection finds the new incarnation after the one that re-registered (the coordinator now allows
# it 3 x heartbeat_timeout_s until its first beat), and an old ack written back over the new one
# made it stop (it now asks again). 0 failures in 14 runs since; under -m slow until it has more.
@pytest.mark.slow
def test_an_old_incarnation_written_back_after_a_coordinator_restart_changes_nothing(tmp_path, plain):
    _, plain_records = plain
    keys = ["run_id", "job", "corpus", "run_dir", "cell/0", "slots", "counters", "committed/0", "recorded/0",
            "started"] + [f"{k}/w{i}" for k in ("hb", "ack", "role", "bytes") for i in range(5)]

    def attack(run_dir, proc):
        _wait_steps(run_dir, 3, proc)
        a = Attacker(_port(run_dir))
        beat_keys = [beat_key_on_the_wire(a.s, TOKEN, f"w{i}") for i in range(5)]
        old = {k: v for k in keys + beat_keys if (v := a.get(k)) is not None}
        _wait_steps(run_dir, 6, proc)  # the coordinator is killed at step 6; its successor opens the port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and '"coordinator_incarnations"' not in _final_marker(run_dir):
            try:
                b = Attacker(_port(run_dir))
                for _ in range(30):  # three seconds of writing the first incarnation back
                    for k, v in old.items():
                        b.s.set(k, v)
                    time.sleep(0.1)
                return
            except Exception:  # noqa: BLE001 - the port is between incarnations: try again
                time.sleep(0.05)

    rc, err, summary, state, records = _run(
        tmp_path / "run", "faults.schedule=[{step: 6, target: coordinator, kind: kill}]", attack=attack)
    assert rc == 0, err[-3000:]
    assert state["coordinator_incarnations"] == 2
    _exactly_once(records)
    assert _losses(records) == _losses(plain_records)
    assert summary["failures"] == 0 and summary["rebuilds"] == []


def _final_marker(run_dir):
    p = run_dir / "coordinator_state.json"
    return p.read_text() if p.exists() else ""


def test_a_hung_worker_is_found_though_its_old_beats_are_written_back(tmp_path):
    stop_step = 8

    def attack(run_dir, proc):
        _wait_steps(run_dir, 2, proc)
        a = Attacker(_port(run_dir))
        victim = json.loads(json.loads(a.get("slots"))["b"])["0,1"]
        beat = beat_key_on_the_wire(a.s, TOKEN, victim)
        beats, metrics = [], run_dir / "metrics.jsonl"
        while metrics.read_text().count('"loss"') < stop_step - 1:  # its own genuine beats, sealed by its key
            v = a.get(beat)
            if v is not None and (not beats or v != beats[-1]):
                beats.append(v)
            time.sleep(0.02)
        assert len(beats) >= 2, "too few beats seen to replay"
        _wait_steps(run_dir, stop_step, proc)
        done, i = time.monotonic() + 20, 0
        a.s.set("run_id", "forged")  # ... while the replacement spare joins
        while time.monotonic() < done and '"rebuild"' not in (run_dir / "metrics.jsonl").read_text():
            try:  # its own old beats, then beats forged without its key (a counter that only grows)
                a.s.set(beat, beats[i % len(beats)] if i % 2 == 0 else
                        json.dumps({"b": json.dumps({"n": 10 ** 6 + i, "wid": victim}), "m": "0" * 64}))
            except RuntimeError:  # the run is over (the assertions below say how it went)
                return
            i += 1
            time.sleep(0.05)

    rc, err, summary, state, records = _run(
        tmp_path / "run", f"faults.schedule=[{{step: {stop_step}, replica: 0, stage: 1, kind: stop}}]",
        attack=attack)
    assert rc == 0, err[-3000:]
    (rb,) = summary["rebuilds"]
    assert rb["slot"] == [0, 1] and rb["detect_s"] <= TIMEOUT_S + 1.0, rb
    assert summary["failures"] == 1
    assert state["tampering"].get("stale", 0) >= 1, "the replayed beats were not seen as replays"
    assert state["tampering"].get("forged", 0) >= 1, "the forged beats were not seen as forged"
    assert "does not verify with this token" not in err, "a joiner blamed its token for a forged run id"
    _exactly_once(records)
