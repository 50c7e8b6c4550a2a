"""Helpers of the etcd tests: whether etcd can run here, the environment of a child process, and
campaigner processes (`python -m kintsugi.recovery.etcd_tool campaign`) whose JSON events a test reads."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from kintsugi.recovery.etcd_local import etcd_binary

_install_tried = []


def etcd_missing():
    """Why etcd cannot run here (None: it can). Installs etcd-server once when root with apt-get."""
    if etcd_binary() is None and not _install_tried and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_tried.append(True)
        subprocess.run(["apt-get", "install", "-y", "-q", "etcd-server"], capture_output=True, timeout=900,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if etcd_binary() is None:
        return "etcd is not installed and could not be (as root: apt-get install etcd-server)"
    try:
        import etcd3gw  # noqa: F401
    except ImportError:
        return 'the etcd client is not installed: pip install -e ".[etcd]"'
    return None


def subprocess_env():
    """The environment for a child process: this `kintsugi` (tests may run from a worktree that
    PYTHONPATH points at), one thread, no etcd credentials unless a test adds them."""
    import kintsugi
    parent = os.path.dirname(os.path.dirname(os.path.abspath(kintsugi.__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINTSUGI_ETCD_")}
    env["PYTHONPATH"] = parent + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


class Campaigner:
    """One `etcd_tool campaign` process; its stdout events are collected as they come."""

    def __init__(self, endpoints, prefix, name, workdir, ttl=2, args=(), netns=None, env=None):
        cmd = [sys.executable, "-m", "kintsugi.recovery.etcd_tool", "campaign", "--endpoints", ",".join(endpoints),
               "--prefix", prefix, "--name", name, "--ttl", str(ttl), *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        self.name = name
        self.err_path = os.path.join(workdir, f"{name}.stderr")
        self._err = open(self.err_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, text=True, cwd=workdir,
                                     env=dict(subprocess_env(), **(env or {})))
        self.events = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def of(self, kind):
        with self._cond:
            return [e for e in self.events if e["event"] == kind]

    def wait(self, kind, timeout, count=1):
        """The count-th event of `kind` (waits for it), or an AssertionError with this process's stderr."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len([e for e in self.events if e["event"] == kind]) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._more_coming()):
                    raise AssertionError(f"{self.name}: no {kind!r} #{count} within {timeout} s; events "
                                         f"{self.events}; stderr: {self.stderr()[-2000:]}")
                self._cond.wait(min(left, 0.1))
            return [e for e in self.events if e["event"] == kind][count - 1]

    def _more_coming(self):
        return not self.proc.stdout.closed and self.proc.returncode is None

    def stderr(self):
        self._err.flush()
        with open(self.err_path) as f:
            return f.read()

    def signal(self, sig):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()
