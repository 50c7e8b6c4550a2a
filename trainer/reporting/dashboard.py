"""The run's dashboard: a small HTTP server in the coordinator's process (`logger.dashboard_port` > 0).

- `GET /` is one self-refreshing HTML page (no external scripts, styles or fonts: it must work on a
  cluster without internet). The page itself holds no data, so it is served to anyone.
- `GET /status.json` is what `kintsugi status --json` prints (trainer.reporting.status.collect over the run
  directory), with exact heartbeat ages from the coordinator. It needs the run's token as
  `Authorization: Bearer <token>`: never in the query string, which ends up in proxy and server logs
  and in browser history. The page takes the token from a login form or the URL fragment
  (`http://host:port/#token=...`; browsers never send the fragment), keeps it in sessionStorage and
  sends it as that header.

Read only: nothing here changes the run. It binds to the interface the store listens on, so it is
reachable exactly where the coordinator already is; the token is what keeps its contents private.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional

from kintsugi.trainer.reporting.status import StatusError, collect

log = logging.getLogger("kintsugi.dashboard")


class Dashboard:
    """`start()` serves on a daemon thread until `close()`; the port actually bound is `.port`."""

    def __init__(self, run_dir: str, token: str, host: str, port: int,
                 heartbeat_ages: Optional[Callable[[], Dict[str, float]]] = None):
        if not token:
            raise ValueError("the dashboard needs the run's token; without one anybody could read it")
        self.run_dir, self.heartbeat_ages = run_dir, heartbeat_ages
        self._token = token.encode()
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.host, self.port = host, self.server.server_address[1]
        self._thread: Optional[threading.Thread] = None

    def authorized(self, header: Optional[str]) -> bool:
        scheme, _, given = (header or "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    def status(self) -> dict:
        return collect(self.run_dir, heartbeat_ages=self.heartbeat_ages)

    def start(self) -> "Dashboard":
        self._thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(dash: Dashboard):
    class Handler(BaseHTTPRequestHandler):
        server_version = "kintsugi-dashboard"

        def do_GET(self):  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if path != "/status.json":
                return self._send(404, b'{"error": "not found"}\n', "application/json")
            if not dash.authorized(self.headers.get("Authorization")):
                return self._send(401, b'{"error": "send the run\'s token as Authorization: Bearer <token>"}\n',
                                  "application/json", {"WWW-Authenticate": 'Bearer realm="kintsugi"'})
            try:
                body = json.dumps(dash.status(), sort_keys=True).encode()
            except StatusError as e:
                return self._send(503, json.dumps({"error": str(e)}).encode(), "application/json")
            self._send(200, body, "application/json")

        def _send(self, code: int, body: bytes, ctype: str, headers: Optional[dict] = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Security-Policy",
                             "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                             "connect-src 'self'; img-src data:; form-action 'none'; frame-ancestors 'none'")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):  # the default writes every request to stderr
            log.debug("%s " + fmt, self.client_address[0], *args)

    return Handler


# The page: polls /status.json every 2 s, draws the slot grid, generations, rebuilds and a loss curve
# of the commits it has seen (inline SVG). Data is inserted with textContent only, never as HTML.
PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>kintsugi</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.active{background:#e3f6e3}.spare{background:#eef}.dead,.empty,.evicted{background:#fbe3e3}
#login{display:none}#err{color:#b00}svg{border:1px solid #ccc}
</style></head><body>
<h2>kintsugi <span id="name"></span></h2>
<form id="login"><label>run token <input id="tok" type="password" autocomplete="off" size="40"></label>
<button>show</button></form>
<div id="err"></div>
<div id="main" style="display:none">
<p id="state"></p>
<h3>slots</h3><table id="grid"></table><p id="others"></p>
<h3>generations</h3><ul id="cells"></ul>
<h3>loss</h3><svg id="plot" width="640" height="200" viewBox="0 0 640 200"></svg>
<h3>last rebuilds</h3><table id="rebuilds"></table>
</div>
<script>
"use strict";
const $ = id => document.getElementById(id);
const m = /[#&]token=([^&]+)/.exec(location.hash);
if (m) { sessionStorage.setItem("kintsugi_token", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
$("login").onsubmit = e => { e.preventDefault(); sessionStorage.setItem("kintsugi_token", $("tok").value); poll(); };
const losses = new Map();  // "replica,step" -> loss, accumulated across polls
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function row(table, cells, head) { const tr = el("tr"); for (const c of cells) tr.appendChild(el(head ? "th" : "td", c == null ? "-" : String(c))); table.appendChild(tr); return tr; }
function render(st) {
  $("name").textContent = st.name ? "- " + st.name : "";
  $("state").textContent = "state: " + st.state + (st.detail ? " (" + st.detail + ")" : "") + "; steps committed: " +
    Object.entries(st.committed).map(([r, k]) => "replica " + r + ": " + (k + 1) + (st.max_steps ? " of " + st.max_steps : "")).join(", ");
  const g = $("grid"); g.replaceChildren(); const S = st.grid.stages;
  row(g, ["replica"].concat([...Array(S).keys()].map(s => "stage " + s)), true);
  for (let r = 0; r < st.grid.replicas; r++) {
    const tr = el("tr"); tr.appendChild(el("th", "replica " + r));
    for (const s of st.slots.filter(x => x.replica === r)) {
      const age = s.heartbeat_age_s == null ? "" : " hb " + s.heartbeat_age_s.toFixed(1) + "s";
      tr.appendChild(el("td", (s.worker || "empty") + " @" + (s.machine || "-") + " " + s.state + " step " + (s.step ?? "-") + age, s.state));
    }
    g.appendChild(tr);
  }
  $("others").textContent = "other workers: " + (st.other_workers.map(w => w.worker + " (" + w.state + ")").join(", ") || "none");
  const c = $("cells"); c.replaceChildren();
  for (const x of st.cells) c.appendChild(el("li", "cell " + x.cell + " (replicas " + x.replicas + "): generation " + x.gen +
    (x.lost.length ? "; lost " + x.lost.join(" ") : "") + (x.rebuilding.length ? "; rebuilding " + x.rebuilding.join(" ") : "") + (x.waiting ? "; waiting for workers" : "")));
  const rb = $("rebuilds"); rb.replaceChildren(); row(rb, ["step", "slot", "tier", "detect s", "recover s"], true);
  for (const x of st.rebuilds) row(rb, [x.step, (x.slot || []).join(","), x.tier, x.detect_s == null ? null : x.detect_s.toFixed(3), x.recover_s == null ? null : x.recover_s.toFixed(2)]);
  for (const l of st.losses) if (l.loss != null) losses.set(l.replica + "," + l.step, l);
  plot([...losses.values()], st.rebuilds);
}
function plot(pts, rebuilds) {
  const svg = $("plot"); svg.replaceChildren(); if (pts.length < 2) return;
  const NS = "http://www.w3.org/2000/svg", W = 640, H = 200, P = 30;
  const xs = pts.map(p => p.step), ys = pts.map(p => p.loss);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
  const X = v => P + (W - 2 * P) * (v - x0) / Math.max(1, x1 - x0), Y = v => H - P - (H - 2 * P) * (v - y0) / Math.max(1e-9, y1 - y0);
  const mk = (tag, attrs, text) => { const e = document.createElementNS(NS, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); if (text) e.textContent = text; svg.appendChild(e); };
  for (const r of new Set(pts.map(p => p.replica))) {
    const line = pts.filter(p => p.replica === r).sort((a, b) => a.step - b.step).map(p => X(p.step) + "," + Y(p.loss)).join(" ");
    mk("polyline", {points: line, fill: "none", stroke: ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"][r % 4], "stroke-width": 2});
  }
  for (const b of rebuilds) if (b.step >= x0 && b.step <= x1) mk("line", {x1: X(b.step), x2: X(b.step), y1: P, y2: H - P, stroke: "#b00", "stroke-dasharray": "4 3"});
  mk("text", {x: P, y: 15}, "loss " + y1.toFixed(3) + " .. " + y0.toFixed(3) + ", steps " + x0 + " .. " + x1 + " (red: rebuilds)");
}
async function poll() {
  const token = sessionStorage.getItem("kintsugi_token");
  if (!token) { $("login").style.display = "block"; return; }
  try {
    const r = await fetch("status.json", {headers: {Authorization: "Bearer " + token}, cache: "no-store"});
    if (r.status === 401) { sessionStorage.removeItem("kintsugi_token"); $("err").textContent = "wrong token"; $("main").style.display = "none"; $("login").style.display = "block"; return; }
    const st = await r.json();
    if (!r.ok) throw new Error(st.error || r.status);
    $("err").textContent = ""; $("login").style.display = "none"; $("main").style.display = "block"; render(st);
  } catch (e) { $("err").textContent = "no answer from the coordinator (" + e.message + "); retrying"; }
  clearTimeout(poll.timer); poll.timer = setTimeout(poll, 2000);
}
poll();
</script></body></html>
"""
