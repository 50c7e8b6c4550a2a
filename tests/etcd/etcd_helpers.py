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
        if not self._err.closed:
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


# --- whole runs under recovery.control=etcd (python -m trainer) -----------------------------------
TTL_S = 3


def new_prefix(name):
    import uuid
    return f"/test/{name}-{uuid.uuid4().hex[:8]}/"


def etcd_args(endpoints, prefix, ttl_s=TTL_S, standbys=1):
    """The overrides that put a run's control plane on the cluster at `endpoints`, under `prefix`."""
    return ["recovery.control=etcd", f"recovery.etcd.endpoints=[{','.join(endpoints)}]",
            f"recovery.etcd.prefix={prefix}", f"recovery.etcd.lease_ttl_s={ttl_s}", f"recovery.standbys={standbys}"]


def quick_job(steps):
    return ["experiment=quick", "train.eval_batches=1", f"train.max_steps={steps}"]


def etcd_run(cluster, run_dir, steps, *extra, prefix=None, timeout=150):
    """A whole run in the foreground: (completed process, summary, metrics records, prefix)."""
    from testkit import run_trainer
    prefix = prefix or new_prefix("run")
    proc, summary, records = run_trainer(run_dir, *quick_job(steps), *etcd_args(cluster.endpoints, prefix), *extra,
                                         timeout=timeout)
    return proc, summary, records, prefix


def commits(records):
    return [r for r in records if "loss" in r and "val_loss" not in r and "event" not in r]


def exactly_once(records, replicas, steps):
    recs = commits(records)
    assert not [r for r in recs if r.get("duplicate")], "a step was committed twice"
    for q in range(replicas):
        got = sorted(r["step"] for r in recs if r["replica"] == q)
        assert got == list(range(steps)), f"replica {q}: steps skipped or repeated: {got}"


def losses(records, replica=0):
    return {r["step"]: r["loss"] for r in commits(records) if r["replica"] == replica}


def logged(log, pattern):
    """(wall time, match) of every launcher line of entry.log matching `pattern`, in order."""
    import re
    from datetime import datetime
    stamp = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[kintsugi\.launch\]\[\w+\] - "
    return [(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), m)
            for m in re.finditer(stamp + pattern, log)]


def raft_leader(cluster):
    """The index of the member etcd elected its raft leader (asked of every member that answers)."""
    from kintsugi.recovery.etcd_client import EtcdClient
    for i, endpoint in enumerate(cluster.endpoints):
        try:
            status = EtcdClient([endpoint]).post("maintenance/status", {})
        except Exception:  # noqa: BLE001 - a member that is down
            continue
        if status["leader"] == status["header"]["member_id"]:
            return i
    raise AssertionError(f"no raft leader among {cluster.endpoints}")


class BackgroundRun:
    """`python -m trainer` in the background, for a test that acts on the run while it trains. Its
    stderr goes to a file (a pipe nobody reads while the test waits could fill and stall the run)."""

    def __init__(self, run_dir, *overrides, env=None):
        from testkit import ROOT
        self.run_dir = run_dir
        self.err_path = str(run_dir) + ".stderr"
        self._err = open(self.err_path, "w")
        full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet",
                                      *overrides], cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL,
                                     stderr=self._err, text=True)

    def stderr(self):
        if not self._err.closed:
            self._err.flush()
        with open(self.err_path) as f:
            return f.read()

    def log(self):
        path = os.path.join(str(self.run_dir), "entry.log")
        return open(path).read() if os.path.exists(path) else ""

    def steps(self):
        """Commit rows in metrics.jsonl so far (what the coordinator recorded)."""
        path = os.path.join(str(self.run_dir), "metrics.jsonl")
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            return sum(1 for line in f if '"loss"' in line and '"val_loss"' not in line and '"event"' not in line)

    def wait_steps(self, n, timeout=240):
        deadline = time.monotonic() + timeout
        while self.steps() < n:
            assert self.proc.poll() is None, f"the run ended ({self.proc.returncode}) before step {n}:\n" \
                                             f"{self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"fewer than {n} steps recorded after {timeout} s:\n" \
                                                f"{self.stderr()[-3000:]}"
            time.sleep(0.05)

    def workers(self):
        """{wid: pid} of this run's live worker processes (the launcher's children)."""
        out = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and "kintsugi.trainer.runtime.worker" in argv and "--wid" in argv:
                out[argv[argv.index("--wid") + 1]] = int(pid)
        return out

    def wait(self, timeout):
        """(exit code, summary or None, metrics records, stderr) once the run ended; kills it after `timeout`."""
        import json
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the run did not end within {timeout} s:\n{self.stderr()[-4000:]}")
        summary, records = None, []
        path = os.path.join(str(self.run_dir), "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                summary = json.load(f)
        path = os.path.join(str(self.run_dir), "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                records = [json.loads(line) for line in f if line.strip()]
        return self.proc.returncode, summary, records, self.stderr()

    def stop(self):
        """SIGTERM, then SIGKILL: the launcher stops its own children (they also die with their parent)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._err.close()


# --- network namespaces (partition tests; root only) ------------------------------------------------
def netns_unavailable():
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    probe = subprocess.run(["ip", "netns", "add", f"ktprobe{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"ktprobe{os.getpid()}"], capture_output=True)
    return None


class Namespace:
    """A network namespace joined to this one by a veth pair (10.77.x.1 here, 10.77.x.2 there);
    `partition()` takes both ends down (packets are lost, nothing is refused), `heal()` brings them
    back up."""

    def __init__(self):
        n = os.getpid() % 250
        self.ns, self.host_dev, self.ns_dev = f"ktetcd{os.getpid()}", f"kte{os.getpid()}h", f"kte{os.getpid()}n"
        self.host_ip, self.ns_ip = f"10.77.{n}.1", f"10.77.{n}.2"
        self._run("ip", "netns", "add", self.ns)
        self._run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        self._run("ip", "link", "set", self.ns_dev, "netns", self.ns)
        self._run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
        self._run("ip", "-n", self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
        self.heal()
        self._run("ip", "-n", self.ns, "link", "set", "lo", "up")

    @staticmethod
    def _run(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, timeout=20)

    def partition(self):
        self._run("ip", "link", "set", self.host_dev, "down")
        self._run("ip", "-n", self.ns, "link", "set", self.ns_dev, "down")

    def heal(self):
        self._run("ip", "link", "set", self.host_dev, "up")
        self._run("ip", "-n", self.ns, "link", "set", self.ns_dev, "up")

    def close(self):
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=20)
