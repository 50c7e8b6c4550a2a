"""Spot / preemptible interruption notices: threads that poll a cloud's instance-metadata service and
call back once when the machine is about to be taken away.

A notice turns a crash into a graceful leave: the worker sets `Worker.leaving` (the same as SIGTERM)
and hands its exact state to a spare at the next step boundary (rebuild tier "handoff", DESIGN.md).
The providers give between 30 s (GCP, Azure) and 2 minutes (AWS) of warning.

  aws    IMDSv2: PUT /latest/api/token (header X-aws-ec2-metadata-token-ttl-seconds), then
         GET /latest/meta-data/spot/instance-action with X-aws-ec2-metadata-token.
         404 = no notice; 200 {"action": "terminate"|"stop"|"hibernate", "time": "...Z"} = notice.
  gcp    GET /computeMetadata/v1/instance/preempted with Metadata-Flavor: Google; "TRUE" = notice.
  azure  GET /metadata/scheduledevents?api-version=2020-07-01 with Metadata: true; an event in
         "Events" with EventType "Preempt" whose Resources name this VM (or name none) = notice.

Only the standard library is used, and proxies are bypassed: the metadata service is link-local
and an `http_proxy` set for downloads must not swallow these requests. A network error is logged
once (then at debug level until the service answers again) and retried; it never ends the thread.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, Optional

log = logging.getLogger(__name__)

Notice = Dict[str, object]
KINDS = ("none", "aws", "gcp", "azure")


def _base_url(address: str) -> str:
    """'169.254.169.254', '127.0.0.1:8080' or 'http://127.0.0.1:8080/' -> 'http://host[:port]'."""
    address = address.strip().rstrip("/")
    return address if "://" in address else "http://" + address


class NoticeWatcher(threading.Thread):
    """Polls `check()` every `interval_s` until it returns a notice, then calls `on_notice(notice)`
    once and exits. Subclasses implement `check()`: one poll, returning the notice's details or
    None, and raising (URLError, OSError, ValueError, ...) when the service cannot be read."""

    provider = "none"
    default_address = ""

    def __init__(self, on_notice: Callable[[Notice], None], address: Optional[str] = None,
                 interval_s: float = 5.0, timeout_s: float = 2.0):
        super().__init__(daemon=True, name=f"kintsugi-notice-{self.provider}")
        if interval_s <= 0:
            raise ValueError(f"notice poll interval_s={interval_s} must be > 0")
        self.on_notice = on_notice
        self.base_url = _base_url(address or self.default_address)
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.notice: Optional[Notice] = None
        self.noticed = threading.Event()   # set once the notice has been delivered
        self.polls = 0
        self._halt = threading.Event()
        self._failing = False
        # An empty ProxyHandler disables the environment's proxies for this opener only.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        while not self._halt.is_set():
            self.polls += 1
            try:
                notice = self.check()
            except Exception as e:  # noqa: BLE001 - any failure to read the service is retried
                self._note_failure(e)
            else:
                if self._failing:
                    log.info("%s metadata service at %s answers again", self.provider, self.base_url)
                    self._failing = False
                if notice is not None:
                    self._deliver(dict(notice, provider=self.provider, noticed_at=time.time()))
                    return
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        """Ask the thread to end after its current poll (a poll blocks at most `timeout_s`)."""
        self._halt.set()

    def _deliver(self, notice: Notice) -> None:
        self.notice = notice
        log.warning("%s interruption notice: %s", self.provider, notice)
        try:
            self.on_notice(notice)
        except Exception:  # noqa: BLE001 - the callback's bug must not look like a lost notice
            log.exception("notice callback failed")
        finally:
            self.noticed.set()

    def _note_failure(self, err: Exception) -> None:
        if not self._failing:
            log.warning("cannot read the %s metadata service at %s (%s); retrying every %.1fs quietly",
                        self.provider, self.base_url, err, self.interval_s)
            self._failing = True
        else:
            log.debug("%s metadata poll failed: %s", self.provider, err)

    # --- HTTP -----------------------------------------------------------------------------------
    def _request(self, path: str, headers: Dict[str, str], method: str = "GET", timeout_s: Optional[float] = None):
        """(status, body) of one request. 4xx/5xx statuses come back as values (the callers decide
        what 404 or 401 mean); connection errors and timeouts raise."""
        req = urllib.request.Request(self.base_url + path, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout_s or self.timeout_s) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read().decode("utf-8", "replace")

    def check(self) -> Optional[Notice]:
        raise NotImplementedError


class AwsWatcher(NoticeWatcher):
    """EC2 spot instance-action via IMDSv2 (a session token is required; it is fetched with a PUT
    and reused until shortly before its TTL runs out, or until the service rejects it)."""

    provider = "aws"
    default_address = "169.254.169.254"
    TOKEN_TTL_S = 21600  # the maximum IMDSv2 allows

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._token: Optional[str] = None
        self._token_expires = 0.0

    def _get_token(self) -> str:
        if self._token is None or time.time() > self._token_expires:
            status, body = self._request("/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.TOKEN_TTL_S)})
            if status != 200 or not body.strip():
                raise OSError(f"IMDSv2 token request answered {status}")
            self._token = body.strip()
            self._token_expires = time.time() + self.TOKEN_TTL_S - 60
        return self._token

    def check(self) -> Optional[Notice]:
        status, body = self._request("/latest/meta-data/spot/instance-action",
                                     headers={"X-aws-ec2-metadata-token": self._get_token()})
        if status == 404:
            return None
        if status == 401:  # expired or revoked token: fetch a new one on the next poll
            self._token = None
            raise OSError("IMDSv2 rejected the session token (401)")
        if status != 200:
            raise OSError(f"spot/instance-action answered {status}")
        doc = json.loads(body)
        if not isinstance(doc, dict) or "action" not in doc:
            raise ValueError(f"unexpected spot/instance-action document: {body[:200]!r}")
        return {"action": doc["action"], "time": doc.get("time")}


class GcpWatcher(NoticeWatcher):
    """GCE `instance/preempted`: "TRUE" once the VM is being preempted. Polled; the service's
    `?wait_for_change=true` long poll would answer sooner but holds a connection open."""

    provider = "gcp"
    default_address = "metadata.google.internal"

    def check(self) -> Optional[Notice]:
        status, body = self._request("/computeMetadata/v1/instance/preempted",
                                     headers={"Metadata-Flavor": "Google"})
        if status != 200:
            raise OSError(f"instance/preempted answered {status}")
        return {"action": "preempt"} if body.strip().upper() == "TRUE" else None


class AzureWatcher(NoticeWatcher):
    """Azure Scheduled Events. Events are delivered to every VM of an availability set or scale-set
    placement group, so a Preempt counts only if its Resources name this VM (or are empty). The VM's
    name is read once from the instance metadata; if that endpoint is missing, every Preempt counts.
    The service is enabled by the first request, which Azure says may take up to two minutes."""

    provider = "azure"
    default_address = "169.254.169.254"
    EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
    NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
    FIRST_TIMEOUT_S = 120.0

    def __init__(self, *args, vm_name: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.vm_name = vm_name
        self._name_known = vm_name is not None
        self._first = True

    def _resolve_name(self) -> None:
        status, body = self._request(self.NAME_PATH, headers={"Metadata": "true"})
        if status == 200 and body.strip():
            self.vm_name = body.strip()
        elif status != 404:
            raise OSError(f"instance/compute/name answered {status}")
        self._name_known = True  # 404: no name to filter by; any Preempt applies

    def check(self) -> Optional[Notice]:
        if not self._name_known:
            self._resolve_name()
        status, body = self._request(self.EVENTS_PATH, headers={"Metadata": "true"},
                                     timeout_s=self.FIRST_TIMEOUT_S if self._first else None)
        if status != 200:
            raise OSError(f"scheduledevents answered {status}")
        self._first = False
        doc = json.loads(body)
        for ev in doc.get("Events") or []:
            if ev.get("EventType") != "Preempt":
                continue
            resources = ev.get("Resources") or []
            if self.vm_name and resources and self.vm_name not in resources:
                continue  # another VM of the scale set is being preempted
            return {"action": "preempt", "time": ev.get("NotBefore"), "event_id": ev.get("EventId"),
                    "resources": resources}
        return None


WATCHERS = {"aws": AwsWatcher, "gcp": GcpWatcher, "azure": AzureWatcher}


def make_watcher(kind: str, on_notice: Callable[[Notice], None], address: Optional[str] = None,
                 interval_s: float = 5.0) -> Optional[NoticeWatcher]:
    """The (not yet started) watcher for `recovery.notice`; None for "none". `address` overrides the
    provider's metadata host (`recovery.metadata_address`, e.g. "http://127.0.0.1:8080" in tests)."""
    if kind == "none":
        return None
    if kind not in WATCHERS:
        raise ValueError(f"recovery.notice={kind!r} is not one of {KINDS}")
    return WATCHERS[kind](on_notice, address=address, interval_s=interval_s)
