"""Interruption-notice watchers against local stand-ins of the three metadata services (loopback
only): no notice at first, a notice after N requests; the watcher must report it exactly once,
send the headers the real services insist on, and survive a service that is down."""
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kintsugi.recovery.notices import AwsWatcher, AzureWatcher, GcpWatcher, make_watcher

FAST = 0.05  # poll interval for the tests


class FakeMetadata:
    """A metadata service on 127.0.0.1:<ephemeral>. `respond(handler, method)` returns
    (status, body) and sees every request; `requests` records (method, path, headers), header
    names lower-cased (HTTP header names are case-insensitive)."""

    def __init__(self, respond):
        self.respond, self.requests, self.lock = respond, [], threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method):
                with fake.lock:
                    fake.requests.append((method, self.path, {k.lower(): v for k, v in self.headers.items()}))
                    status, body = fake.respond(self, method)
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_PUT(self):
                self._serve("PUT")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def count(self, path_part, method="GET"):
        return sum(1 for m, p, _ in self.requests if m == method and path_part in p)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _watch(cls, url, **kw):
    calls = []
    w = cls(calls.append, address=url, interval_s=FAST, **kw)
    t0 = time.time()
    w.start()
    return w, calls, t0


def _assert_single_notice(w, calls, t0):
    assert w.noticed.wait(5.0), "no notice delivered"
    elapsed = time.time() - t0
    w.join(2.0)
    assert not w.is_alive(), "the watcher keeps polling after its notice"
    time.sleep(3 * FAST)
    assert len(calls) == 1
    assert elapsed < 3.0
    return calls[0]


# --- AWS -------------------------------------------------------------------------------------------
def aws_service(notice_after, revoke_after=None):
    state = {"tokens": set(), "gets": 0}

    def respond(h, method):
        if h.path == "/latest/api/token":
            if method != "PUT" or "X-aws-ec2-metadata-token-ttl-seconds" not in h.headers:
                return 400, "missing ttl"
            tok = f"tok-{len(state['tokens'])}"
            state["tokens"].add(tok)
            return 200, tok
        if h.path == "/latest/meta-data/spot/instance-action":
            if h.headers.get("X-aws-ec2-metadata-token") not in state["tokens"]:
                return 401, "Unauthorized"
            state["gets"] += 1
            if revoke_after is not None and state["gets"] == revoke_after:
                state["tokens"].clear()  # the token expired / the service restarted
                return 401, "Unauthorized"
            if state["gets"] > notice_after:
                return 200, json.dumps({"action": "terminate", "time": "2026-05-09T07:40:00Z"})
            return 404, "Not Found"
        return 404, "Not Found"
    return respond, state


def test_aws_notice_once_with_token():
    respond, state = aws_service(notice_after=4)
    with FakeMetadata(respond) as svc:
        w, calls, t0 = _watch(AwsWatcher, svc.url)
        notice = _assert_single_notice(w, calls, t0)
    assert notice["action"] == "terminate" and notice["time"] == "2026-05-09T07:40:00Z"
    assert notice["provider"] == "aws"
    assert svc.count("instance-action") == 5
    # IMDSv2: one token PUT, reused; every read carried it (the service answers 401 without one).
    assert svc.count("/latest/api/token", "PUT") == 1
    assert all(hdr.get("x-aws-ec2-metadata-token") == "tok-0" for m, p, hdr in svc.requests if "instance-action" in p)


def test_aws_token_refreshed_after_401():
    respond, state = aws_service(notice_after=5, revoke_after=2)
    with FakeMetadata(respond) as svc:
        w, calls, t0 = _watch(AwsWatcher, svc.url)
        notice = _assert_single_notice(w, calls, t0)
    assert notice["action"] == "terminate"
    assert svc.count("/latest/api/token", "PUT") == 2


def test_aws_without_token_gets_401():
    """The fake really enforces IMDSv2, so the test above proves the watcher sends the token."""
    respond, _ = aws_service(notice_after=0)
    with FakeMetadata(respond) as svc:
        import urllib.error
        import urllib.request
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                svc.url + "/latest/meta-data/spot/instance-action", timeout=2)
        assert e.value.code == 401


# --- GCP -------------------------------------------------------------------------------------------
def test_gcp_notice_once():
    n = {"gets": 0}

    def respond(h, method):
        if h.headers.get("Metadata-Flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header."
        if h.path != "/computeMetadata/v1/instance/preempted":
            return 404, ""
        n["gets"] += 1
        return 200, "TRUE" if n["gets"] > 3 else "FALSE"

    with FakeMetadata(respond) as svc:
        w, calls, t0 = _watch(GcpWatcher, svc.url)
        notice = _assert_single_notice(w, calls, t0)
    assert notice["action"] == "preempt" and notice["provider"] == "gcp"
    assert n["gets"] == 4


# --- Azure -----------------------------------------------------------------------------------------
def azure_service(notice_after, vm_name="vm-7"):
    n = {"gets": 0}

    def respond(h, method):
        if h.headers.get("Metadata") != "true":
            return 400, json.dumps({"error": "Bad request. Required metadata header not specified"})
        if h.path.startswith("/metadata/instance/compute/name"):
            return (200, vm_name) if vm_name else (404, "")
        if h.path != "/metadata/scheduledevents?api-version=2020-07-01":
            return 404, ""
        n["gets"] += 1
        events = [{"EventId": "f0", "EventType": "Freeze", "ResourceType": "VirtualMachine",
                   "Resources": ["vm-7"], "EventStatus": "Scheduled", "NotBefore": "Sat, 09 May 2026 07:40:00 GMT"},
                  # Another VM of the scale set: not ours.
                  {"EventId": "p1", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                   "Resources": ["vm-3"], "EventStatus": "Scheduled", "NotBefore": "Sat, 09 May 2026 07:40:30 GMT"}]
        if n["gets"] > notice_after:
            events.append({"EventId": "p2", "EventType": "Preempt", "ResourceType": "VirtualMachine",
                           "Resources": ["vm-7"], "EventStatus": "Scheduled",
                           "NotBefore": "Sat, 09 May 2026 07:41:00 GMT"})
        return 200, json.dumps({"DocumentIncarnation": n["gets"], "Events": events})
    return respond, n


def test_azure_notice_once_for_this_vm():
    respond, n = azure_service(notice_after=3)
    with FakeMetadata(respond) as svc:
        w, calls, t0 = _watch(AzureWatcher, svc.url)
        notice = _assert_single_notice(w, calls, t0)
    assert notice["event_id"] == "p2" and notice["action"] == "preempt"
    assert notice["time"] == "Sat, 09 May 2026 07:41:00 GMT"
    assert w.vm_name == "vm-7" and n["gets"] == 4


def test_azure_without_vm_name_any_preempt_counts():
    respond, n = azure_service(notice_after=10 ** 6, vm_name=None)  # only vm-3's Preempt
    with FakeMetadata(respond) as svc:
        w, calls, t0 = _watch(AzureWatcher, svc.url)
        notice = _assert_single_notice(w, calls, t0)
    assert notice["event_id"] == "p1"


# --- failures and the factory ----------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("cls", [AwsWatcher, GcpWatcher, AzureWatcher])
def test_service_down_no_crash_no_notice(cls, caplog):
    caplog.set_level(logging.DEBUG, logger="kintsugi.recovery.notices")
    w, calls, _ = _watch(cls, f"http://127.0.0.1:{_free_port()}")
    time.sleep(0.5)
    assert w.is_alive() and w.polls >= 3
    assert calls == [] and not w.noticed.is_set()
    warnings = [r for r in caplog.records if r.name == "kintsugi.recovery.notices" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "retrying" in warnings[0].getMessage()
    w.stop()
    w.join(3.0)
    assert not w.is_alive()


def test_service_comes_back_then_notice():
    """Errors (HTTP 500) for a while, then a normal service: the notice still arrives, once."""
    n = {"gets": 0}

    def respond(h, method):
        n["gets"] += 1
        if n["gets"] <= 3:
            return 500, "internal error"
        return 200, "TRUE" if n["gets"] > 5 else "FALSE"

    with FakeMetadata(respond) as svc:
        w, calls, t0 = _watch(GcpWatcher, svc.url)
        _assert_single_notice(w, calls, t0)
    assert n["gets"] == 6


def test_callback_error_does_not_repeat_the_notice():
    respond, _ = aws_service(notice_after=0)
    calls = []

    def boom(d):
        calls.append(d)
        raise RuntimeError("bug in the callback")

    with FakeMetadata(respond) as svc:
        w = AwsWatcher(boom, address=svc.url, interval_s=FAST)
        w.start()
        assert w.noticed.wait(5.0)
        w.join(2.0)
    assert len(calls) == 1 and not w.is_alive()


def test_make_watcher():
    assert make_watcher("none", print) is None
    assert isinstance(make_watcher("aws", print), AwsWatcher)
    gcp = make_watcher("gcp", print, interval_s=1.0)
    assert isinstance(gcp, GcpWatcher) and gcp.base_url == "http://metadata.google.internal"
    az = make_watcher("azure", print, address="127.0.0.1:9")
    assert isinstance(az, AzureWatcher) and az.base_url == "http://127.0.0.1:9"
    assert make_watcher("aws", print).base_url == "http://169.254.169.254"
    with pytest.raises(ValueError, match="recovery.notice"):
        make_watcher("oracle", print)
    with pytest.raises(ValueError, match="interval_s"):
        make_watcher("gcp", print, interval_s=0)


def test_worker_integration_sets_leaving():
    """What the worker does: a notice sets its `leaving` event (the graceful-handoff trigger)."""
    leaving = threading.Event()

    def respond(h, method):
        return 200, "TRUE"

    with FakeMetadata(respond) as svc:
        w = make_watcher("gcp", lambda notice: leaving.set(), address=svc.url, interval_s=FAST)
        w.start()
        assert leaving.wait(5.0)
