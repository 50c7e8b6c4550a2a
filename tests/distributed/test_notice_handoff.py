"""A spot interruption notice from the (loopback) instance-metadata service turns into exact handoffs:
every active worker on the noticed machine streams its state to a spare on another machine."""
import glob
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from testkit import ROOT, commits

pytestmark = pytest.mark.distributed


class _Imds(BaseHTTPRequestHandler):
    """AWS IMDSv2 per simulated machine: /<machine>/latest/...; only machine m0 gets a notice, and
    only once `noticed` is set."""
    noticed = threading.Event()

    def log_message(self, *args):
        pass

    def do_PUT(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"token-123")

    def do_GET(self):
        machine, _, path = self.path.lstrip("/").partition("/")
        if self.headers.get("X-aws-ec2-metadata-token") != "token-123":
            self.send_response(401)
            self.end_headers()
            return
        if path == "latest/meta-data/spot/instance-action" and machine == "m0" and self.noticed.is_set():
            body = json.dumps({"action": "terminate", "time": "2026-11-22T20:00:00Z"}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(404)
        self.end_headers()


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_aws_notice_hands_off_every_slot_of_the_machine(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run_dir, dumps = tmp_path / "run", tmp_path / "dumps"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), KINTSUGI_DUMP_DIR=str(dumps))
    cmd = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", "experiment=quick",
           "train.max_steps=14", "train.eval_batches=1", "launcher.machines=2", "faults.spares=4",
           "recovery.notice=aws", "recovery.notice_interval_s=0.1",
           f"recovery.metadata_address='http://127.0.0.1:{server.server_port}/{{machine}}'"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            m = run_dir / "metrics.jsonl"
            if m.exists() and '"step": 4,' in m.read_text():
                break
            time.sleep(0.1)
        _Imds.noticed.set()
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.shutdown()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failures"] == 0
    handed = [rb for rb in summary["rebuilds"] if rb["tier"] == "handoff"]
    assert handed and len(handed) == len(summary["rebuilds"]), summary["rebuilds"]
    for rb in handed:  # the replacement holds exactly the leaver's state
        key = f"{rb['slot'][0]},{rb['slot'][1]}"
        leaver = torch.load(glob.glob(str(dumps / f"g*_leaver_{key}.pt"))[0], weights_only=False)
        target = torch.load(glob.glob(str(dumps / f"g*_target_{key}.pt"))[0], weights_only=False)
        for k, v in leaver["params"].items():
            assert torch.equal(v, target["params"][k]), k
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in commits(records)] == list(range(14))
