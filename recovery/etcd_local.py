"""A three-member etcd cluster on this machine's loopback: for trying `recovery.control=etcd`, for
the tests and for `benchmarks.control_failover`.

    python -m kintsugi.recovery.etcd_local [--members 3] [--dir DIR]

starts the members (Debian: `apt-get install etcd-server`), prints their client URLs as the value
for `recovery.etcd.endpoints` and runs until Ctrl-C, then removes their data. Each member is a real
`etcd` process with its own data directory (under /dev/shm when there is one: startup and fsync
stay fast), on free loopback ports; `kill(i)` SIGKILLs one, `restart(i)` brings it back with its
data. `enable_auth()` turns on etcd's authentication over the gateway, the way an operator would
with etcdctl: a root user, and a user whose role may read and write one key prefix only.

This is a harness, not a production deployment: one machine is one failure domain.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import List, Optional, Tuple


def etcd_binary() -> Optional[str]:
    return shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd") or None


def free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalEtcd:
    """`members` etcd processes forming one cluster on 127.0.0.1 (and on `extra_host` too, e.g. the
    host end of a veth pair, for clients in another network namespace)."""

    def __init__(self, members: int = 3, base_dir: Optional[str] = None, extra_host: Optional[str] = None,
                 tls: Optional[Tuple[str, str, str]] = None):
        """`tls`: (CA, server certificate, server key) files; clients then speak https and must
        present a certificate that CA signed (etcd's --client-cert-auth)."""
        binary = etcd_binary()
        if binary is None:
            raise FileNotFoundError("etcd is not installed: apt-get install etcd-server (Debian/Ubuntu)")
        self.binary, self.n, self.extra_host = binary, members, extra_host
        root = base_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.dir = tempfile.mkdtemp(prefix="kintsugi-etcd-", dir=root)
        ports = free_ports(2 * members)
        self.client_ports, self.peer_ports = ports[:members], ports[members:]
        self.procs: List[Optional[subprocess.Popen]] = [None] * members
        self.tls = tls
        scheme = "https" if tls else "http"
        self.endpoints = [f"{scheme}://127.0.0.1:{p}" for p in self.client_ports]
        self.token = f"kintsugi-{os.getpid()}-{int(time.time() * 1000)}"

    def _cmd(self, i: int) -> List[str]:
        cluster = ",".join(f"m{j}=http://127.0.0.1:{p}" for j, p in enumerate(self.peer_ports))
        listen = self.endpoints[i]
        if self.extra_host:
            listen += "," + self.endpoints[i].replace("127.0.0.1", self.extra_host)
        tls = []
        if self.tls:
            ca, cert, key = self.tls
            tls = ["--trusted-ca-file", ca, "--cert-file", cert, "--key-file", key, "--client-cert-auth"]
        return [self.binary, "--name", f"m{i}", "--data-dir", os.path.join(self.dir, f"m{i}"),
                "--listen-client-urls", listen, "--advertise-client-urls", self.endpoints[i],
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-cluster", cluster, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "error"] + tls

    def start(self, timeout_s: float = 20.0) -> "LocalEtcd":
        try:
            for i in range(self.n):
                self._spawn(i)
            self.wait_healthy(timeout_s)
        except BaseException:
            self.close()   # no member and no data directory outlives a failed start
            raise
        return self

    def _spawn(self, i: int) -> None:
        log = open(os.path.join(self.dir, f"m{i}.log"), "ab")
        self.procs[i] = subprocess.Popen(self._cmd(i), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.close()

    def alive(self) -> List[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def healthy(self, i: int) -> bool:
        """Member i answers and the cluster has a leader (etcd's /health needs a quorum)."""
        context = None
        if self.tls:
            import ssl
            ca, cert, key = self.tls   # the server's own pair is signed by the same CA: good enough here
            context = ssl.create_default_context(cafile=ca)
            context.load_cert_chain(cert, key)
        try:
            with urllib.request.urlopen(self.endpoints[i] + "/health", timeout=1.0, context=context) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def wait_healthy(self, timeout_s: float = 20.0, members: Optional[List[int]] = None) -> None:
        deadline = time.monotonic() + timeout_s
        for i in (self.alive() if members is None else members):
            while not self.healthy(i):
                if self.procs[i] is None or self.procs[i].poll() is not None:
                    raise RuntimeError(f"etcd member m{i} exited: {self.log_tail(i)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd member m{i} not healthy after {timeout_s:.0f} s: {self.log_tail(i)}")
                time.sleep(0.05)

    def log_tail(self, i: int, n: int = 600) -> str:
        try:
            with open(os.path.join(self.dir, f"m{i}.log"), "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def kill(self, i: int) -> None:
        """SIGKILL member i (its data stays, for `restart`)."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def signal(self, i: int, sig: int) -> None:
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(sig)

    def restart(self, i: int) -> None:
        self.kill(i)
        self._spawn(i)

    def enable_auth(self, root_password: str, user: str, password: str, prefix: str) -> None:
        """A root user (etcd wants one before auth is on) and `user`, whose role may read and write
        keys under `prefix` only; then authentication on. Through the gateway, as etcdctl would."""
        from .etcd_client import EtcdClient, b64, prefix_end
        c = EtcdClient(self.endpoints, timeout_s=5.0)
        c.post("auth/role/add", {"name": "root"})
        c.post("auth/user/add", {"name": "root", "password": root_password})
        c.post("auth/user/grant", {"user": "root", "role": "root"})
        role = f"{user}-role"
        c.post("auth/role/add", {"name": role})
        c.post("auth/role/grant", {"name": role, "perm": {"permType": "READWRITE", "key": b64(prefix),
                                                          "range_end": b64(prefix_end(prefix))}})
        c.post("auth/user/add", {"name": user, "password": password})
        c.post("auth/user/grant", {"user": user, "role": role})
        c.post("auth/enable", {})

    def close(self) -> None:
        for i in range(self.n):
            self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalEtcd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def make_test_certificates(directory: str, client_name: str = "kintsugi") -> dict:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (CN
    `client_name`), with the openssl command-line tool: paths by role. For tests and trying TLS."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kintsugi-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name, cn, ext in (("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
                          ("client", client_name, "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        with open(os.path.join(directory, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return {k: os.path.join(directory, v) for k, v in (("ca", "ca.pem"), ("server_cert", "server.pem"),
                                                       ("server_key", "server.key"), ("client_cert", "client.pem"),
                                                       ("client_key", "client.key"))}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kintsugi.recovery.etcd_local", description=__doc__.split("\n\n")[0])
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the members' data directories go (default /dev/shm or /tmp)")
    args = p.parse_args(argv)
    try:
        cluster = LocalEtcd(args.members, args.dir).start()
    except (FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"etcd_local: {e}", file=sys.stderr)
        return 2
    def stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)   # the members run in sessions of their own: stop them too
    print("recovery.control=etcd recovery.etcd.endpoints=[" + ",".join(cluster.endpoints) + "]", flush=True)
    print(f"# {cluster.n} members, data in {cluster.dir}; Ctrl-C stops them and removes it", file=sys.stderr)
    try:
        while cluster.alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
