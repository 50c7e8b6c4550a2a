"""The etcd v3 client of the control plane: settings, credentials, endpoint failover.

`recovery.control=etcd` keeps the coordinator's state in an etcd v3 cluster so that a standby
coordinator on another machine can take over. This module owns the connection to that cluster and
nothing about what is stored: `recovery.etcd_election` (who leads) and `recovery.etcd_state` (what
the leader persists) build on it.

- Transport: etcd's gRPC gateway (JSON over HTTP, keys and values base64) through `etcd3gw`, an
  optional extra (`pip install -e ".[etcd]"`). It is imported when an `EtcdClient` is built, never
  by the local mode.
- Failover: several endpoints (members of one cluster). A request goes to the member that answered
  last; a member that refuses the connection, times out or has no quorum is skipped for the next one.
  Only when none answers does a request fail, with `EtcdUnavailable` naming every member and why.
  A write whose answer was lost may have been applied: every write the control plane makes is a
  transaction whose compares make a retry harmless (see etcd_election and etcd_state).
- Credentials come from the environment or from files, never from the config: user and password
  (`KINTSUGI_ETCD_USER`, `KINTSUGI_ETCD_PASSWORD` or `KINTSUGI_ETCD_PASSWORD_FILE`) and/or TLS
  client certificates (`recovery.etcd.ca_file` / `cert_file` / `key_file`, or `KINTSUGI_ETCD_CA` /
  `_CERT` / `_KEY`). The password lives only in `Credentials.password` (kept out of its repr) and in
  the body of the one authenticate request; the gateway's token it buys is sent as a header.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Dict, List, Mapping, Optional, Tuple

log = logging.getLogger(__name__)

ENV_USER, ENV_PASSWORD, ENV_PASSWORD_FILE = "KINTSUGI_ETCD_USER", "KINTSUGI_ETCD_PASSWORD", "KINTSUGI_ETCD_PASSWORD_FILE"
ENV_CA, ENV_CERT, ENV_KEY = "KINTSUGI_ETCD_CA", "KINTSUGI_ETCD_CERT", "KINTSUGI_ETCD_KEY"


class EtcdError(RuntimeError):
    """etcd answered, and refused (permission, bad request, a lease that is gone)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered: all down, unreachable, or without quorum. The message is one line."""


class EtcdAuthError(EtcdError):
    """The cluster wants credentials that were not given, or refused the ones given."""


class LeaseNotFound(EtcdError):
    """A request named a lease etcd no longer has (it expired or was revoked)."""


@dataclasses.dataclass
class EtcdSettings:
    """`recovery.etcd.*`: where the cluster is and how this run uses it. Nothing secret lives here
    (it is dumped with the job's config); see `Credentials`."""
    endpoints: Tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/kintsugi/run/"        # every key of the run lives under it
    lease_ttl_s: int = 3                  # a leader unheard of this long is replaced
    lease_grace_s: Optional[float] = None  # a leader etcd does not answer stays suspended this long past its
                                           # lease deadline, then gives the run up (None: the TTL)
    request_timeout_s: float = 2.0        # per request and endpoint, before the next endpoint
    user: Optional[str] = None            # or KINTSUGI_ETCD_USER; the password only from env / file
    password_file: Optional[str] = None
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None

    def __post_init__(self):
        if isinstance(self.endpoints, str):
            self.endpoints = tuple(e.strip() for e in self.endpoints.split(",") if e.strip())
        self.endpoints = tuple(self.endpoints)
        if not self.endpoints:
            raise ValueError("recovery.etcd.endpoints is empty: list the cluster's client URLs, "
                             "e.g. [http://10.0.0.1:2379,http://10.0.0.2:2379,http://10.0.0.3:2379]")
        for e in self.endpoints:
            scheme, _, rest = e.partition("://")
            host, _, port = rest.rstrip("/").rpartition(":")
            if scheme not in ("http", "https") or not host or not port.isdigit():
                raise ValueError(f"recovery.etcd.endpoints: {e!r} is not a client URL; write it as "
                                 f"http://HOST:PORT (https://HOST:PORT with TLS)")
        if not self.prefix or not self.prefix.isascii() or not self.prefix.isprintable() or " " in self.prefix:
            raise ValueError(f"recovery.etcd.prefix={self.prefix!r}: give a printable ASCII key prefix without "
                             f"spaces, one per run, e.g. /kintsugi/run1/")
        self.prefix = "/" + self.prefix.strip("/") + "/"
        if not (isinstance(self.lease_ttl_s, int) and 2 <= self.lease_ttl_s <= 60):
            raise ValueError(f"recovery.etcd.lease_ttl_s={self.lease_ttl_s!r}: give whole seconds from 2 (etcd's "
                             f"least lease with its default election timeout) to 60")
        if self.lease_grace_s is not None and not (isinstance(self.lease_grace_s, (int, float))
                                                   and 0 <= float(self.lease_grace_s) <= 120):
            raise ValueError(f"recovery.etcd.lease_grace_s={self.lease_grace_s!r}: give 0 to 120 seconds (at least "
                             f"etcd's election timeout x 2), or null for the lease TTL")
        if not 0.1 <= float(self.request_timeout_s) <= 60:
            raise ValueError(f"recovery.etcd.request_timeout_s={self.request_timeout_s!r}: give 0.1 to 60 seconds")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("recovery.etcd.cert_file and recovery.etcd.key_file go together: give both "
                             "(the client certificate and its key) or neither")


@dataclasses.dataclass(frozen=True)
class Credentials:
    user: Optional[str] = None
    password: Optional[str] = dataclasses.field(default=None, repr=False)
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None

    @classmethod
    def resolve(cls, settings: EtcdSettings, environ: Optional[Mapping[str, str]] = None) -> "Credentials":
        """The credentials `settings` point at: the environment wins over the config's file paths.
        Raises ValueError (one line, naming the variable or key) when they are incomplete."""
        env = os.environ if environ is None else environ
        user = env.get(ENV_USER) or settings.user
        password = env.get(ENV_PASSWORD)
        pw_file = env.get(ENV_PASSWORD_FILE) or settings.password_file
        if password is None and pw_file:
            try:
                with open(pw_file) as f:
                    password = f.read().rstrip("\r\n")
            except OSError as e:
                raise ValueError(f"cannot read the etcd password file {pw_file} ({e.strerror}): fix "
                                 f"{ENV_PASSWORD_FILE} or recovery.etcd.password_file") from None
        if password is not None and not user:
            raise ValueError(f"an etcd password is given but no user: set {ENV_USER} (or recovery.etcd.user)")
        if user and password is None:
            raise ValueError(f"etcd user {user!r} has no password: set {ENV_PASSWORD} or {ENV_PASSWORD_FILE}")
        ca = env.get(ENV_CA) or settings.ca_file
        cert = env.get(ENV_CERT) or settings.cert_file
        key = env.get(ENV_KEY) or settings.key_file
        if bool(cert) != bool(key):
            raise ValueError(f"a TLS client certificate needs its key and the key its certificate: set both "
                             f"{ENV_CERT} and {ENV_KEY} (or recovery.etcd.cert_file and key_file)")
        for what, path in (("CA", ca), ("certificate", cert), ("key", key)):
            if path and not os.path.isfile(path):
                raise ValueError(f"the etcd TLS {what} file {path} does not exist: fix its path")
        return cls(user=user or None, password=password, ca_file=ca, cert_file=cert, key_file=key)


_NO_CLIENT_CERT = ("TLS: it refused this client's certificate (none given, or not signed by its CA: "
                   "set KINTSUGI_ETCD_CERT and KINTSUGI_ETCD_KEY)")


def _reason(exc: Exception) -> str:
    """A short reason for one endpoint's failure, for the one-line error."""
    text = f"{getattr(exc, 'detail_text', '') or ''} {exc}"
    for needle, short in (("no leader", "no quorum"), ("etcdserver: request timed out", "no quorum"),
                          ("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"), ("No route to host", "no route to host"),
                          ("BAD_CERTIFICATE", _NO_CLIENT_CERT), ("CERTIFICATE_REQUIRED", _NO_CLIENT_CERT),
                          # TLS 1.3: the server's alert may lose the race with its closing the socket
                          ("EOF occurred in violation of protocol", _NO_CLIENT_CERT),
                          ("CERTIFICATE_VERIFY_FAILED", "TLS: its certificate does not verify (set KINTSUGI_ETCD_CA "
                                                        "to the cluster's CA)"),
                          ("WRONG_VERSION_NUMBER", "TLS: it speaks plain http, not https"),
                          ("RemoteDisconnected", "closed the connection: does it want https://?"),
                          ("SSL", "TLS handshake failed")):
        if needle in text:
            return short
    return type(exc).__name__


class EtcdClient:
    """A failover client over the cluster's gRPC gateway. One per thread that talks to etcd (each
    holds HTTP sessions); `clone()` makes another with the same endpoints and credentials. Calls are
    serialised by a lock, so sharing one between threads is safe, only slower."""

    def __init__(self, endpoints, credentials: Optional[Credentials] = None, timeout_s: float = 2.0):
        try:
            import etcd3gw  # noqa: F401  (optional extra; never imported by the local control plane)
        except ImportError:
            raise EtcdError('recovery.control=etcd needs the etcd client: pip install -e ".[etcd]" '
                            '(or pip install etcd3gw)') from None
        self.endpoints: List[str] = [e.rstrip("/") for e in endpoints]
        self.credentials = credentials or Credentials()
        self.timeout_s = float(timeout_s)
        self._clients: Dict[str, object] = {}
        self._token: Optional[str] = None
        self._current = 0
        self._lock = threading.RLock()

    @classmethod
    def from_settings(cls, settings: EtcdSettings, environ: Optional[Mapping[str, str]] = None) -> "EtcdClient":
        return cls(settings.endpoints, Credentials.resolve(settings, environ), settings.request_timeout_s)

    def clone(self, timeout_s: Optional[float] = None) -> "EtcdClient":
        other = EtcdClient(self.endpoints, self.credentials, self.timeout_s if timeout_s is None else timeout_s)
        other._token, other._current = self._token, self._current
        return other

    @property
    def endpoint(self) -> str:
        """The member that answered last (or will be tried first)."""
        return self.endpoints[self._current]

    def _client(self, endpoint: str):
        c = self._clients.get(endpoint)
        if c is None:
            import etcd3gw
            import requests
            scheme, _, rest = endpoint.partition("://")
            host, _, port = rest.rpartition(":")
            cred = self.credentials
            session = requests.Session()
            # The environment must not redirect the control plane: REQUESTS_CA_BUNDLE would replace
            # the configured CA (requests lets it win over the session's), a proxy variable would
            # send etcd traffic through a proxy.
            session.trust_env = False
            session.verify = cred.ca_file or True
            if cred.cert_file:
                session.cert = (cred.cert_file, cred.key_file)
            # Debian's etcd is 3.4: the gateway lives at /v3/; naming it saves a /version round trip
            # per endpoint (an older cluster can be pointed at with ETCD3GW_API_PATH).
            c = etcd3gw.client(host=host.strip("[]"), port=int(port), protocol=scheme, timeout=self.timeout_s,
                               api_path=os.environ.get("ETCD3GW_API_PATH", "/v3/"), session=session)
            self._clients[endpoint] = c
        return c

    # --- requests ---------------------------------------------------------------------------------
    def post(self, path: str, body: dict) -> dict:
        """POST `body` to the gateway's `path` (e.g. "kv/range") on the first member that answers;
        EtcdUnavailable (one line) when none does, EtcdError when etcd refused the request."""
        from etcd3gw import exceptions as E
        with self._lock:
            failures: List[Tuple[str, str]] = []
            n = len(self.endpoints)
            for i in range(n):
                idx = (self._current + i) % n
                endpoint = self.endpoints[idx]
                try:
                    result = self._post_authenticated(endpoint, path, body)
                except (E.ConnectionFailedError, E.ConnectionTimeoutError, E.InternalServerError) as e:
                    # Down, unreachable, partitioned away or without quorum: the next member may answer.
                    failures.append((endpoint, _reason(e)))
                    continue
                except _NotEtcd as e:
                    failures.append((endpoint, f"answers, but is not etcd's gateway: {e}"))
                    continue
                if idx != self._current:
                    log.warning("etcd: %s did not answer; using %s", self.endpoints[self._current], endpoint)
                    self._current = idx
                return result
            by_reason: Dict[str, List[str]] = {}
            for endpoint, why in failures:
                by_reason.setdefault(why, []).append(endpoint)
            raise EtcdUnavailable("no etcd endpoint answered: " +
                                  "; ".join(f"{', '.join(eps)} ({why})" for why, eps in by_reason.items()) +
                                  "; start or heal the cluster, or fix recovery.etcd.endpoints")

    def _post_authenticated(self, endpoint: str, path: str, body: dict) -> dict:
        from etcd3gw import exceptions as E
        client = self._client(endpoint)
        for attempt in (0, 1):
            if self.credentials.user and self._token is None:
                self._authenticate(client)
            try:
                return client.post(client.get_url(path), json=body,
                                   headers={"Authorization": self._token} if self._token else None)
            except E.Etcd3Exception as e:
                detail = _etcd_detail(e)
                # Simple tokens expire (--auth-token-ttl) and die with a restarted member: get another.
                if "invalid auth token" in detail and self.credentials.user and attempt == 0:
                    self._token = None
                    continue
                raise self._refusal(path, detail) from None
        raise AssertionError("unreachable")

    def _authenticate(self, client) -> None:
        from etcd3gw import exceptions as E
        cred = self.credentials
        try:
            result = client.post(client.get_url("auth/authenticate"), json={"name": cred.user, "password": cred.password})
        except E.Etcd3Exception as e:
            detail = _etcd_detail(e)
            if "authentication is not enabled" in detail:
                # A cluster without auth: the user is not needed; TLS (if any) still applies.
                self._token = ""
                return
            raise EtcdAuthError(f"etcd refused user {cred.user!r} ({_etcd_message(detail)}): check {ENV_USER} "
                                f"and {ENV_PASSWORD} / {ENV_PASSWORD_FILE}") from None
        self._token = result.get("token", "")

    def _refusal(self, path: str, detail: str) -> EtcdError:
        msg = _etcd_message(detail)
        if "user name is empty" in msg:
            return EtcdAuthError(f"etcd requires credentials ({msg}): set {ENV_USER} and {ENV_PASSWORD} "
                                 f"(or {ENV_PASSWORD_FILE}), or use TLS client certificates ({ENV_CERT}, {ENV_KEY})")
        if "permission denied" in msg:
            return EtcdAuthError(f"etcd denied {path} ({msg}): grant the user's role readwrite on the run's "
                                 f"key prefix (recovery.etcd.prefix)")
        if "lease not found" in msg:
            return LeaseNotFound(msg)
        return EtcdError(f"etcd refused {path}: {msg}")

    # --- the calls the control plane makes -----------------------------------------------------------
    def range(self, key: str, *, prefix: bool = False, revision: Optional[int] = None,
              serializable: bool = False, limit: Optional[int] = None) -> Tuple[List[dict], int]:
        """(kvs, revision of the answer): each kv with `key`/`value` decoded to bytes and the int
        fields (`create_revision`, `mod_revision`, `version`, `lease`) as ints."""
        body: dict = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        if revision is not None:
            body["revision"] = revision
        if serializable:
            body["serializable"] = True
        if limit is not None:
            body["limit"] = limit
        result = self.post("kv/range", body)
        return [decode_kv(kv) for kv in result.get("kvs", [])], int(result["header"]["revision"])

    def get(self, key: str) -> Optional[dict]:
        kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def txn(self, compare: List[dict], success: List[dict], failure: Optional[List[dict]] = None) -> dict:
        """One transaction. The answer's `succeeded` is made explicit (the gateway omits false)."""
        result = self.post("kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        result["succeeded"] = bool(result.get("succeeded", False))
        return result

    def grant(self, ttl_s: int) -> Tuple[int, int]:
        """A new lease: (id, granted TTL); etcd may raise a short TTL to its minimum."""
        result = self.post("lease/grant", {"TTL": int(ttl_s), "ID": 0})
        return int(result["ID"]), int(result["TTL"])

    def keepalive(self, lease_id: int) -> int:
        """Renew a lease: its TTL again, or 0 when etcd no longer has it."""
        result = self.post("lease/keepalive", {"ID": lease_id}).get("result", {})
        return int(result.get("TTL", 0))

    def revoke(self, lease_id: int) -> None:
        try:
            self.post("kv/lease/revoke", {"ID": lease_id})
        except LeaseNotFound:
            pass

    def check(self, key: str) -> None:
        """At start: the cluster answers, has quorum, and lets these credentials read `key` (the
        run's prefix). Raises EtcdUnavailable / EtcdAuthError with one line; warns once per member
        that does not answer, so a degraded cluster is visible before it matters."""
        started = time.monotonic()
        self.range(key, prefix=True, limit=1)  # linearizable: needs a quorum and read permission
        for endpoint in self.endpoints:
            try:
                self._client(endpoint).post(self._client(endpoint).get_url("maintenance/status"), json={})
            except Exception as e:  # noqa: BLE001 - any failure of a member is what we report here
                log.warning("etcd member %s does not answer (%s); the cluster works without it", endpoint,
                            _reason(e))
        log.debug("etcd check done in %.3f s via %s", time.monotonic() - started, self.endpoint)


# --- encoding helpers -------------------------------------------------------------------------------
def b64(data) -> str:
    import base64
    return base64.b64encode(data.encode() if isinstance(data, str) else bytes(data)).decode()


def prefix_end(key: str) -> bytes:
    """The range end that covers every key starting with `key` (etcd's convention)."""
    raw = bytearray(key.encode())
    raw[-1] += 1
    return bytes(raw)


def decode_kv(kv: dict) -> dict:
    import base64
    out = dict(kv)
    out["key"] = base64.b64decode(kv["key"])
    out["value"] = base64.b64decode(kv.get("value", ""))
    for field in ("create_revision", "mod_revision", "version", "lease"):
        out[field] = int(kv.get(field, 0))
    return out


class _NotEtcd(Exception):
    """Something answered HTTP at an endpoint, but not with etcd's JSON errors (a wrong port, a proxy)."""


def _etcd_detail(e) -> str:
    """The refusal text of an etcd3gw error that etcd itself answered. A transport failure is
    re-raised as is (the caller tries another endpoint); an answer that is not etcd's is _NotEtcd."""
    from etcd3gw import exceptions as E
    if isinstance(e, (E.ConnectionFailedError, E.ConnectionTimeoutError, E.InternalServerError)):
        raise e
    if not _is_etcd_error(e.detail_text):
        raise _NotEtcd(f"HTTP {e}") from None
    return str(e.detail_text or e)


def _is_etcd_error(detail) -> bool:
    import json
    try:
        body = json.loads(detail or "")
    except ValueError:
        return False
    return isinstance(body, dict) and "error" in body


def _etcd_message(detail: str) -> str:
    """The gateway's error text ("etcdserver: permission denied") out of its JSON body."""
    import json
    try:
        return str(json.loads(detail).get("error", detail))
    except (ValueError, AttributeError):
        return detail.strip().splitlines()[0] if detail.strip() else "no detail"
