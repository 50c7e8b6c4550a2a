"""Sealed control records (recovery.auth) and the log reader that drops forged ones and survives a
counter bumped far ahead. Expectations are independent: HMAC-SHA256 recomputed here with hashlib."""
import hashlib
import hmac
import json
import threading
import time

import pytest

from kintsugi.recovery import control as C
from kintsugi.recovery import protocol as P
from kintsugi.recovery.auth import Auth, Forged, Stale, derive_key, seal_run_id


def test_seal_is_hmac_sha256_over_place_writer_sequence_and_body():
    a = Auth("tok", "run1", boot="b1", writer="w7")
    env = json.loads(a.seal("cell/0", {"gen": 3}))
    key = hmac.new(b"tok", b"kintsugi-control\x00run1", hashlib.sha256).digest()
    assert derive_key("tok", "run1") == key
    assert env["w"] == "w7" and env["s"] == 1  # the writer's first record
    want = hmac.new(key, b"b1/cell/0\x00w7\x001\x00" + env["b"].encode(), hashlib.sha256).hexdigest()
    assert env["m"] == want and json.loads(env["b"]) == {"gen": 3}
    assert a.open("cell/0", json.dumps(env)) == {"gen": 3}
    assert json.loads(a.seal("cell/0", {"gen": 4}))["s"] == 2


@pytest.mark.parametrize("how", ["wrong token", "other run", "other place", "other incarnation", "tampered",
                                 "other writer", "other sequence", "unsealed", "garbage"])
def test_anything_else_is_forged(how):
    good = Auth("tok", "run1", boot="b1")
    raw = good.seal("commit#7", {"step": 5, "loss": 1.0})
    if how == "wrong token":
        raw = Auth("tok2", "run1", boot="b1").seal("commit#7", {"step": 5, "loss": 1.0})
    elif how == "other run":
        raw = Auth("tok", "run2", boot="b1").seal("commit#7", {"step": 5, "loss": 1.0})
    elif how == "other place":  # a genuine record replayed at another index
        raw = good.seal("commit#8", {"step": 5, "loss": 1.0})
    elif how == "other incarnation":  # ... or into a restarted coordinator's store
        raw = Auth("tok", "run1", boot="b0").seal("commit#7", {"step": 5, "loss": 1.0})
    elif how == "tampered":
        env = json.loads(raw)
        env["b"] = env["b"].replace("1.0", "0.001")
        raw = json.dumps(env)
    elif how in ("other writer", "other sequence"):  # the seal covers who wrote it and its number
        env = json.loads(raw)
        env["w" if how == "other writer" else "s"] = "someone" if how == "other writer" else env["s"] + 100
        raw = json.dumps(env)
    elif how == "unsealed":
        raw = json.dumps({"step": 5, "loss": 0.001})
    else:
        raw = b"\xff\x00not json"
    with pytest.raises(Forged):
        good.open("commit#7", raw)


def test_an_older_record_of_the_same_writer_is_a_replay():
    coordinator = Auth("tok", "run1", boot="b1", writer="c")
    reader = Auth("tok", "run1", boot="b1")
    old, new = coordinator.seal("counters", {"rebuilt": 1}), coordinator.seal("counters", {"rebuilt": 2})
    assert reader.open("counters", new) == {"rebuilt": 2}
    assert reader.open("counters", new) == {"rebuilt": 2}  # the same record, read again
    with pytest.raises(Stale):
        reader.open("counters", old)  # an old genuine value written back under its key
    # In a log every entry is read once: the same entry again is a replay too.
    e1 = coordinator.seal("mail#1", {"kind": "donate"})
    reader.open("mail#1", e1, fresh="log")
    with pytest.raises(Stale):
        reader.open("mail#1", e1, fresh="log")


def test_a_token_is_required():
    with pytest.raises(ValueError):
        Auth("", "run1")


@pytest.fixture
def store():
    s = P.connect("127.0.0.1", P.free_port(), is_master=True, timeout_s=10)
    yield s


def test_log_reader_drops_forged_entries_and_survives_a_counter_bump(store):
    auth = Auth("tok", "run1", boot="b1")
    for i in range(3):
        P.append(store, "commit", {"step": i}, auth=auth)
    store.set("commit/4", json.dumps({"step": 99}))  # an unsealed entry at the next index...
    store.add("commit/n", 1)
    store.add("commit/n", 10 ** 9)                    # ... and the counter bumped a billion ahead
    for i in range(3, 5):
        P.append(store, "commit", {"step": i}, auth=auth)
    forged = []
    reader = P.LogReader(store, "commit", hole_timeout_s=0.2, auth=auth, on_forged=forged.append)
    got, t0 = [], time.monotonic()
    while len(got) < 5 and time.monotonic() - t0 < 10:
        got += reader.poll()
        time.sleep(0.05)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4], "every genuine entry, nothing forged"
    assert len(forged) == 1 and auth.dropped_count == 1
    assert time.monotonic() - t0 < 5, "the bumped counter must not blind the reader"
    assert not store.check(["commit/1"]), "entries are deleted once read"


def test_get_json_or_drops_a_forged_value(store):
    auth = Auth("tok", "run1", boot="b1")
    P.put_json(store, "cell/0", {"gen": 1}, auth=auth)
    assert P.get_json_or(store, "cell/0", auth=auth) == {"gen": 1}
    store.set("cell/0", json.dumps({"gen": 9}))
    assert P.get_json_or(store, "cell/0", "missing", auth=auth) == "missing"


def test_log_reader_survives_a_counter_wound_back(store):
    auth = Auth("tok", "run1", boot="b1")
    for i in range(5):
        P.append(store, "commit", {"step": i}, auth=auth)
    reader = P.LogReader(store, "commit", hole_timeout_s=0.2, auth=auth)
    got = reader.poll()
    P.append(store, "commit", {"step": 5}, auth=auth)   # written, not yet read ...
    store.add("commit/n", -4)                           # ... when someone winds the counter back
    for i in range(6, 9):
        P.append(store, "commit", {"step": i}, auth=auth)  # writers take free slots, never overwrite
    t0 = time.monotonic()
    while len(got) < 9 and time.monotonic() - t0 < 10:
        got += reader.poll()
        time.sleep(0.05)
    assert sorted(r["step"] for r in got) == list(range(9)), "nothing written after the rewind is lost"
    # The writer saw it first (its index came back below its own last one) and counted it.
    assert auth.dropped_by_kind.get("rewound") == 1
    # A rewind nobody writes after is seen by the reader: its counter went below the last one read.
    store.add("commit/n", -3)
    assert reader.poll() == [] and reader.rewinds == 1 and auth.dropped_by_kind.get("rewound") == 2


def test_a_client_with_the_wrong_token_cannot_verify_the_coordinator(store):
    """The identity challenge: the coordinator answers each fresh nonce with its incarnation; a
    client with the right token adopts it, one with a wrong token is told so."""
    coordinator = Auth("right", "runX", boot="b7", writer="c")
    store.set("run_id", seal_run_id("right", "runX"))
    store.set("job", "{}")
    hello = P.LogReader(store, "hello")
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            for rec in hello.poll():
                key = f"hello/{rec['nonce']}"
                store.set(key, coordinator.seal(key, {"boot": "b7", "incarnation": 3}, with_boot=False))
            time.sleep(0.01)
    threading.Thread(target=answer, daemon=True).start()
    try:
        ok = C.open_control("127.0.0.1", store.port, "right", timeout_s=5)
        assert ok.boot == "b7" and ok.auth.boot == "b7" and ok.incarnation == 3
        with pytest.raises(Forged, match="KINTSUGI_TOKEN"):
            C.open_control("127.0.0.1", store.port, "wrong", timeout_s=5)
    finally:
        stop.set()


def test_a_replayed_old_identity_cannot_answer_a_new_challenge(store):
    """A copy of incarnation 1's answer (for another nonce) written back cannot pass for the
    coordinator now: a client's challenge carries a nonce nobody has answered."""
    old = Auth("tok", "runX", boot="b1", writer="c1")
    store.set("run_id", seal_run_id("tok", "runX"))
    store.set("hello/aaaaaaaaaaaaaaaaaaaaaaaa", old.seal("hello/aaaaaaaaaaaaaaaaaaaaaaaa",
                                                         {"boot": "b1", "incarnation": 1}, with_boot=False))
    c = C.Control("127.0.0.1", store.port, 5, token="tok")
    assert c.identify(wait_s=0.5) is None, "an old answer was taken for the coordinator's"
