"""The dashboard page in a real browser: headless Chromium opens `http://127.0.0.1:PORT/#token=...` of a
live 1 x 4 job whose stage 1 was SIGKILLed at step 3 and rebuilt by the spare. The page's script must
run without errors (Content-Security-Policy included), take the token from the fragment, fetch
/status.json with it and draw the slot grid (the rebuilt slot held by the spare), the generation, the
rebuild row and the loss curve with the rebuild marked; the screenshot must be a real PNG.

Skipped when no Chromium is installed (Debian: `apt-get install chromium`).
`KINTSUGI_DASHBOARD_PNG=path` keeps a copy of the screenshot (docs/dashboard.png was made this way).
"""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from testkit import ROOT
from kintsugi.recovery.protocol import free_port

pytestmark = pytest.mark.distributed

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "chromium-headless-shell"))), None)
TOKEN = "dash-" + "5b2d" * 6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WIDTH, HEIGHT = 1280, 900


def _status(base):
    req = urllib.request.Request(f"{base}/status.json", headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None  # not listening yet


class _Dom(HTMLParser):
    """The parts of Chromium's --dump-dom the test reads: rows of the tables by id, text and style of
    elements by id, the svg's shapes."""

    def __init__(self):
        super().__init__()
        self.tables, self.text, self.style, self.shapes = {}, {}, {}, []
        self._table = self._row = self._cell = None
        self._open = []  # ids whose text is being collected

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.style[a["id"]] = a.get("style") or ""
            self.text.setdefault(a["id"], "")
            if tag not in ("input", "img", "br", "meta"):  # void elements: no end tag
                self._open.append((tag, a["id"]))
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = [tag, "", a.get("class") or ""]
            self._row.append(self._cell)
        elif tag in ("polyline", "line"):
            self.shapes.append((tag, a))

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        for _, i in self._open:
            self.text[i] += data


def _chromium(url, png, profile):
    """One headless Chromium load of `url`: (the DOM after the script ran, console lines)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}",
           "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", "--dump-dom", url]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, err[-3000:]
    return out, [line for line in err.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary on PATH (chromium, chromium-browser or "
                                             "chromium-headless-shell; Debian: apt-get install chromium)")
def test_dashboard_page_renders_in_headless_chromium(tmp_path):
    port = free_port()
    run_dir = tmp_path / "run"
    # The run is stopped once the page has been captured: 14 steps would end ~3 s after the rebuild,
    # too soon for Chromium on a busy machine, and the dashboard closes with the run.
    cmd = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", "experiment=quick",
           "train.max_steps=100", "train.eval_batches=1", "faults.spares=1",
           "faults.schedule=[{step: 3, stage: 1, kind: kill}]", f"logger.dashboard_port={port}"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), KINTSUGI_TOKEN=TOKEN)
    base = f"http://127.0.0.1:{port}"
    png = tmp_path / "dashboard.png"
    with open(tmp_path / "trainer.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)  # its own process group: the workers end with it
    try:
        st = None
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            st = _status(base)
            if st and st["rebuilds"] and all(s["worker"] for s in st["slots"]):
                break
            time.sleep(0.3)
        else:
            with open(tmp_path / "trainer.log") as f:
                pytest.fail(f"no rebuild on /status.json (trainer exit code {proc.returncode}):\n{f.read()[-3000:]}")
        dom, console = _chromium(f"{base}/#token={TOKEN}", png, tmp_path / "profile")
        assert proc.poll() is None, "the run ended while Chromium loaded the page"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    # The script ran without errors: no uncaught exception, no CSP refusal, no failed fetch.
    bad = [line for line in console
           if any(w in line for w in ("Uncaught", "Refused", "Failed", "Error", "ERROR:CONSOLE"))]
    assert not bad, "\n".join(bad)
    d = _Dom()
    d.feed(dom)
    # It took the token from the fragment and got an answer: main shown, login form and error not.
    assert "none" not in d.style["main"] and "block" in d.style["main"], d.style
    assert "block" not in d.style["login"] and not d.text["err"].strip(), (d.style, d.text["err"])
    assert TOKEN not in dom  # the token is not written into the page
    assert d.text["state"].startswith("state: ") and "replica 0:" in d.text["state"]
    # The 1 x 4 slot grid: a header row and one replica row of four slots, all active; stage 1 now held
    # by the spare that rebuilt it, its killed worker listed as dead.
    grid = d.tables["grid"]
    assert [c[1] for c in grid[0]] == ["replica", "stage 0", "stage 1", "stage 2", "stage 3"]
    assert len(grid) == 2 and grid[1][0][:2] == ["th", "replica 0"]
    slots = grid[1][1:]
    assert len(slots) == 4 and all(c[0] == "td" and c[2] == "active" for c in slots), slots
    workers = [c[1].split(" @")[0] for c in slots]
    assert workers == [s["worker"] for s in st["slots"]], (workers, st["slots"])
    killed = [w["worker"] for w in st["other_workers"] if w["state"] == "dead" and w["slot"] == [0, 1]]
    assert len(killed) == 1 and killed[0] not in workers, (killed, workers)
    assert f"{killed[0]} (dead)" in d.text["others"], d.text["others"]
    assert f"generation {st['cells'][0]['gen']}" in d.text["cells"] and st["cells"][0]["gen"] >= 1
    # The rebuild row: step, slot 0,1, a CheckFree tier and its timings.
    rebuilds = d.tables["rebuilds"]
    assert [c[1] for c in rebuilds[0]] == ["step", "slot", "tier", "detect s", "recover s"]
    assert len(rebuilds) == 2, rebuilds
    step, slot, tier, detect, recover = (c[1] for c in rebuilds[1])
    assert (int(step), slot) == (st["rebuilds"][0]["step"], "0,1") and tier in ("checkfree", "checkfree_plus")
    assert float(recover) > 0
    # The loss curve, with the rebuild marked when its step is in the plotted range (the page plots the
    # last 5 losses of its first answer on, so a slow Chromium start can begin the curve after it).
    assert any(t == "polyline" and len(a["points"].split()) >= 2 for t, a in d.shapes), d.shapes
    m = re.search(r"steps (\d+) \.\. (\d+)", d.text["plot"])
    assert m, d.text["plot"]
    if int(m[1]) <= int(step) <= int(m[2]):
        assert any(t == "line" and a.get("stroke-dasharray") for t, a in d.shapes), d.shapes

    # The screenshot: a PNG of the window's size with more in it than a blank page.
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (WIDTH, HEIGHT)
    assert len(data) > 20_000, len(data)
    keep = os.environ.get("KINTSUGI_DASHBOARD_PNG")
    if keep:
        shutil.copyfile(png, keep)
