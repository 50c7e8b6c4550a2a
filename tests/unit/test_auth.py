"""Sealed control records (recovery.auth) and the log reader that drops forged ones and survives a
counter bumped far ahead. Expectations are independent: HMAC-SHA256 recomputed here with hashlib."""
import hashlib
import hmac
import json
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from kintsugi.recovery import protocol as P
from kintsugi.recovery.auth import Auth, Forged, derive_key


def test_seal_is_hmac_sha256_over_place_and_body():
    a = Auth("tok", "run1", boot="b1")
    env = json.loads(a.seal("cell/0", {"gen": 3}))
    key = hmac.new(b"tok", b"kintsugi-control\x00run1", hashlib.sha256).digest()
    assert derive_key("tok", "run1") == key
    want = hmac.new(key, b"b1/cell/0\x00" + env["b"].encode(), hashlib.sha256).hexdigest()
    assert env["m"] == want and json.loads(env["b"]) == {"gen": 3}
    assert a.open("cell/0", json.dumps(env)) == {"gen": 3}


@pytest.mark.parametrize("how", ["wrong token", "other run", "other place", "other incarnation", "tampered",
                                 "unsealed", "garbage"])
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
    elif how == "unsealed":
        raw = json.dumps({"step": 5, "loss": 0.001})
    else:
        raw = b"\xff\x00not json"
    with pytest.raises(Forged):
        good.open("commit#7", raw)


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


def test_a_client_with_the_wrong_token_cannot_verify_the_coordinator(store):
    coordinator = Auth("right", "runX", boot="b7")
    store.set("run_id", "runX")
    store.set("boot", coordinator.seal("boot", {"boot": "b7"}, with_boot=False))
    store.set("job", "{}")
    port = store.port
    ok = P.open_control("127.0.0.1", port, "right", timeout_s=5)
    assert ok.boot == "b7" and ok.auth.boot == "b7"
    with pytest.raises(Forged):
        P.open_control("127.0.0.1", port, "wrong", timeout_s=5)
