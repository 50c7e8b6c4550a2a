"""The dashboard of a real run (`logger.dashboard_port`): a 1 x 4 job whose stage 1 is SIGKILLed at
step 3 and rebuilt by a spare. /status.json answers with the run's token (the slot grid, a generation,
and after the kill the rebuild) and refuses without it or with a wrong one; the page is served and
holds no run data."""
import json
import time
import urllib.error
import urllib.request

import pytest

from testkit import start_trainer
from kintsugi.recovery.protocol import free_port

pytestmark = pytest.mark.distributed

TOKEN = "dash-" + "7c1e" * 6


def _get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_dashboard_serves_status_to_token_holders_only(tmp_path):
    port = free_port()
    run_dir = tmp_path / "run"
    proc = start_trainer(run_dir, "experiment=quick", "train.max_steps=12", "train.eval_batches=1", "faults.spares=1",
                         "faults.schedule=[{step: 3, stage: 1, kind: kill}]", f"logger.dashboard_port={port}",
                         env={"KINTSUGI_TOKEN": TOKEN})
    base = f"http://127.0.0.1:{port}"
    seen_gen, rebuilt, refused, page = None, None, [], None
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and rebuilt is None:
            try:
                code, body = _get(f"{base}/status.json", TOKEN)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)  # not listening yet
                continue
            assert code == 200, body
            st = json.loads(body)
            assert st["grid"] == {"replicas": 1, "stages": 4}
            assert [(s["replica"], s["stage"]) for s in st["slots"]] == [(0, s) for s in range(4)]
            if st["cells"] and st["cells"][0]["gen"] is not None and st["cells"][0]["gen"] >= 0:
                seen_gen = seen_gen or st["cells"][0]["gen"]
            if st["rebuilds"]:
                rebuilt = st
                refused = [_get(f"{base}/status.json")[0], _get(f"{base}/status.json", "wrong-token")[0],
                           _get(f"{base}/status.json?token={TOKEN}")[0]]
                page = _get(f"{base}/")
            time.sleep(0.3)
        out = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert seen_gen is not None
    assert rebuilt is not None, "no rebuild seen on /status.json before the run ended"
    assert rebuilt["rebuilds"][0]["slot"] == [0, 1] and rebuilt["rebuilds"][0]["tier"] in ("checkfree", "checkfree_plus")
    assert rebuilt["cells"][0]["gen"] >= 1  # the rebuild published a new generation
    # The coordinator's own heartbeat ages: known at once for the live workers in slots.
    assert any(s["heartbeat_age_s"] is not None for s in rebuilt["slots"])
    assert refused == [401, 401, 401]  # no header, a wrong token, the token in the query string
    code, html = page
    assert code == 200 and b"status.json" in html and b"Authorization" in html
    assert TOKEN.encode() not in html and b"w1" not in html  # the page carries no data
    with open(run_dir / "metrics.jsonl") as f:
        rebuild_events = [json.loads(l)["event"] for l in f if '"rebuild"' in l]
    assert [e["slot"] for e in rebuild_events] == [[0, 1]]
