"""The etcd client's edges: settings that are wrong say so in one line, an unreachable cluster at
start is one line and a non-zero exit, credentials are required by the cluster and never leak."""
import logging
import subprocess
import sys

import pytest

from kintsugi.recovery.etcd_client import (Credentials, EtcdAuthError, EtcdClient, EtcdSettings, b64)
from kintsugi.recovery.etcd_election import Election
from kintsugi.recovery.etcd_local import free_ports
from kintsugi.recovery.etcd_state import EtcdStateStore

from etcd_helpers import subprocess_env


def _tool(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kintsugi.recovery.etcd_tool", *args], capture_output=True,
                          text=True, timeout=60, env=dict(subprocess_env(), **(env or {})))


@pytest.mark.parametrize("kwargs, names", [
    (dict(endpoints=[]), "recovery.etcd.endpoints is empty"),
    (dict(endpoints=["10.0.0.1:2379"]), "recovery.etcd.endpoints: '10.0.0.1:2379' is not a client URL"),
    (dict(prefix="my run"), "recovery.etcd.prefix='my run'"),
    (dict(lease_ttl_s=1), "recovery.etcd.lease_ttl_s=1"),
    (dict(cert_file="/c.pem"), "recovery.etcd.cert_file and recovery.etcd.key_file go together"),
])
def test_bad_settings_name_the_key(kwargs, names):
    with pytest.raises(ValueError) as err:
        EtcdSettings(**kwargs)
    assert str(err.value).startswith(names) and "\n" not in str(err.value)


def test_credentials_from_env_and_files(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("hunter2-from-file\n")
    s = EtcdSettings(prefix="r1")
    assert s.prefix == "/r1/"
    c = Credentials.resolve(s, {"KINTSUGI_ETCD_USER": "kt", "KINTSUGI_ETCD_PASSWORD_FILE": str(pw)})
    assert (c.user, c.password) == ("kt", "hunter2-from-file")
    assert "hunter2" not in repr(c) and "hunter2" not in repr(s)
    with pytest.raises(ValueError, match="etcd user 'kt' has no password: set KINTSUGI_ETCD_PASSWORD"):
        Credentials.resolve(s, {"KINTSUGI_ETCD_USER": "kt"})
    with pytest.raises(ValueError, match="cannot read the etcd password file"):
        Credentials.resolve(s, {"KINTSUGI_ETCD_USER": "kt", "KINTSUGI_ETCD_PASSWORD_FILE": str(tmp_path / "nope")})


def test_unreachable_at_start_is_one_line_and_exit_2():
    ports = free_ports(3)   # nobody listens there
    endpoints = [f"http://127.0.0.1:{p}" for p in ports]
    proc = _tool("check", "--endpoints", ",".join(endpoints), "--prefix", "/r1/")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kintsugi etcd: no etcd endpoint answered: " + ", ".join(endpoints) +
                               " (connection refused)"), lines[0]
    assert "recovery.etcd.endpoints" in lines[0]
    # The same run's campaign (what a standby does first) starts nothing either.
    proc = _tool("campaign", "--endpoints", ",".join(endpoints), "--prefix", "/r1/")
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1


def test_local_mode_never_imports_the_etcd_client():
    code = ("import sys, kintsugi.recovery.state_store, kintsugi.recovery.coordinator, kintsugi.recovery.etcd_client; "
            "print('etcd3gw' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_nothing_reaches_etcd_without_its_credentials(etcd_cluster, tmp_path, caplog):
    import requests
    prefix, password = "/test/auth/", "pw-Zq81-secret"
    etcd_cluster.enable_auth("root-pw-Zq81", "kt", password, prefix)
    caplog.set_level(logging.DEBUG)

    # The server itself refuses a request that carries no token (asked without our client).
    raw = requests.post(etcd_cluster.endpoints[0] + "/v3/kv/put",
                        json={"key": b64(prefix + "state"), "value": b64("forged")}, timeout=5)
    assert raw.status_code == 400 and "user name is empty" in raw.text

    anonymous = EtcdClient(etcd_cluster.endpoints)
    with pytest.raises(EtcdAuthError, match="etcd requires credentials .* set KINTSUGI_ETCD_USER"):
        anonymous.range(prefix, prefix=True)
    with pytest.raises(EtcdAuthError, match="etcd requires credentials"):
        Election(anonymous, prefix, ttl_s=3).campaign(timeout_s=3)
    wrong = EtcdClient(etcd_cluster.endpoints, Credentials(user="kt", password="not-it"))
    with pytest.raises(EtcdAuthError, match="etcd refused user 'kt'"):
        wrong.range(prefix, prefix=True)

    pw_file = tmp_path / "etcd-password"
    pw_file.write_text(password)
    env = {"KINTSUGI_ETCD_USER": "kt", "KINTSUGI_ETCD_PASSWORD_FILE": str(pw_file)}
    settings = EtcdSettings(endpoints=etcd_cluster.endpoints, prefix=prefix)
    client = EtcdClient.from_settings(settings, env)
    election = Election(client, prefix, ttl_s=3, candidate="a")
    assert election.campaign(timeout_s=10)
    election.publish("10.0.0.1:29400")
    store = EtcdStateStore(client, prefix, election)
    store.save({"gen": 3})
    assert EtcdStateStore(EtcdClient.from_settings(settings, env), prefix).load() == {"gen": 3}
    with pytest.raises(EtcdAuthError, match="etcd denied kv/range .* grant the user's role readwrite"):
        client.range("/another-run/", prefix=True)
    # The anonymous writes above changed nothing (read back with credentials).
    assert [kv["key"] for kv in client.range(prefix, prefix=True)[0]] == [
        (prefix + k).encode() for k in ("election/epoch", "election/leader", "state")]
    election.close()

    # The probe: refused without credentials (one line), fine with them from the environment.
    proc = _tool("check", "--endpoints", ",".join(etcd_cluster.endpoints), "--prefix", prefix)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "etcd requires credentials" in proc.stderr
    ok = _tool("check", "--endpoints", ",".join(etcd_cluster.endpoints), "--prefix", prefix,
               env={"KINTSUGI_ETCD_USER": "kt", "KINTSUGI_ETCD_PASSWORD": password})
    assert ok.returncode == 0, ok.stderr
    for text in [caplog.text, proc.stderr, ok.stdout, ok.stderr, repr(client.credentials), repr(settings)]:
        assert password not in text


def test_tls_client_certificates(etcd_available, tmp_path):
    """A cluster that wants TLS client certificates (etcd --client-cert-auth): nothing gets through
    without one signed by its CA; with the files named in the environment, the control plane works."""
    import shutil
    from kintsugi.recovery.etcd_client import EtcdUnavailable
    from kintsugi.recovery.etcd_local import LocalEtcd, make_test_certificates
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours, theirs = make_test_certificates(str(tmp_path / "ours")), make_test_certificates(str(tmp_path / "theirs"))
    with LocalEtcd(3, tls=(ours["ca"], ours["server_cert"], ours["server_key"])) as cluster:
        prefix = "/test/tls/"
        settings = EtcdSettings(endpoints=cluster.endpoints, prefix=prefix)
        for env in ({"KINTSUGI_ETCD_CA": ours["ca"]},
                    {"KINTSUGI_ETCD_CA": ours["ca"], "KINTSUGI_ETCD_CERT": theirs["client_cert"],
                     "KINTSUGI_ETCD_KEY": theirs["client_key"]}):
            with pytest.raises(EtcdUnavailable, match="refused this client's certificate"):
                EtcdClient.from_settings(settings, env).range(prefix, prefix=True)
        env = {"KINTSUGI_ETCD_CA": ours["ca"], "KINTSUGI_ETCD_CERT": ours["client_cert"],
               "KINTSUGI_ETCD_KEY": ours["client_key"]}
        client = EtcdClient.from_settings(settings, env)
        election = Election(client, prefix, ttl_s=3, candidate="a")
        assert election.campaign(timeout_s=10)
        EtcdStateStore(client, prefix, election).save({"gen": 1})
        assert EtcdStateStore(EtcdClient.from_settings(settings, env), prefix).load() == {"gen": 1}
        election.close()
