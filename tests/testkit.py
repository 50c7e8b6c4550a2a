"""Helpers the tests share: the repository root, the real CLI run in the foreground or background, a
benchmark's one JSON line, and readers of metrics.jsonl. (A module of its own, not conftest.py: two
conftest modules exist under tests/, and `from testkit import` would take whichever came first.)"""
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The job the attack tests run (tests/distributed/test_trust.py, test_freshness.py), attacked and
# left alone (conftest's `undisturbed_attack_run`).
ATTACK_JOB = ["experiment=quick", "train.max_steps=24", "train.eval_batches=1", "faults=none", "faults.spares=1",
              "recovery.heartbeat_timeout_s=2.0"]


def beat_key_on_the_wire(store, token, wid):
    """Worker `wid`'s beat key as an eavesdropper on the store's traffic would see it. The token only
    names the key here (a client that merely reaches the port cannot); nothing is sealed with it."""
    from kintsugi.recovery import protocol as P
    from kintsugi.recovery.auth import Auth
    run_id = json.loads(store.get("run_id"))["run_id"]   # readable by anyone
    return P.beat_key(Auth(token, run_id), wid)


def run_trainer(run_dir, *overrides, timeout=240, check=True, env=None):
    """Run `python -m trainer` for real (coordinator + worker processes) and return
    (completed process, summary dict or None, metrics records). `env`: extra environment variables."""
    cmd = [sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", *overrides]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = None
    path = os.path.join(run_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    records = []
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(mpath):  # not a device standing in for it (tests/distributed/test_disk_full.py)
        with open(mpath) as f:
            records = [json.loads(l) for l in f]
    return proc, summary, records


def start_trainer(run_dir, *overrides, env=None):
    """Start `python -m trainer` (coordinator + workers) in the background, stderr piped, for a test
    that acts on the run while it trains. `env`: extra environment variables."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "trainer", f"hydra.run.dir={run_dir}", "logger=quiet", *overrides],
                            cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_benchmark(module: str, *args: str, timeout: float) -> dict:
    """Run `python -m <module> <args>` (a benchmark) for real and return its one JSON line, plus
    `_elapsed_s` (wall seconds of the whole process)."""
    import time
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {lines!r}"
    return dict(json.loads(lines[0]), _elapsed_s=time.time() - t0)


def observed_batch_ids(rec, replicas=1):
    """The batch a commit record says its step trained on: the ids the replica's stage 0 read and
    stated in the commit's sum, whichever stage (or data-parallel root) wrote the record."""
    ids = rec["batch_ids"]
    assert isinstance(ids, list), f"replica {rec.get('replica')} step {rec['step']}: batch ids not observed ({ids!r})"
    return ids


def commits(records, replica=0):
    out = {}
    for r in records:
        if "loss" in r and r.get("replica") == replica and "val_loss" not in r:
            out[r["step"]] = r
    return [out[k] for k in sorted(out)]


# --- processes: what a test left running ---------------------------------------------------------
def _descendants(pid):
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children = {}
    for p, pp in zip(out[::2], out[1::2]):
        children.setdefault(int(pp), []).append(int(p))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def kill_tree(pid):
    """SIGKILL `pid` and every descendant it has now."""
    for p in [pid] + _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_env(**extra):
    """A "node"'s environment: this checkout, one thread, no etcd settings or death signal inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINTSUGI_ETCD_") and k != "KINTSUGI_PDEATHSIG"}
    env.update(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TORCH_CPP_LOG_LEVEL="ERROR", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Fleet:
    """The processes of one scenario, each logging to a file; `tree` remembers every descendant seen,
    so leftovers are found even after their parents exited."""

    def __init__(self, tmp_path, **env):
        self.tmp, self.procs, self.seen, self.env = tmp_path, {}, set(), env  # env: for every process

    def start(self, name, cmd, **env):
        env = dict(self.env, **env)
        log = open(self.tmp / f"{name}.log", "w")
        # Own session: a node is killed as a whole, never together with pytest.
        self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=node_env(**env), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self.procs[name]

    def watch(self):
        for p in self.procs.values():
            if p.poll() is None:
                self.seen.update(_descendants(p.pid))

    def kill_node(self, name):
        """A node dies: its torchrun agent and all its workers at once. torchrun starts every worker in
        a session of its own, so killing the agent's process group would leave them running."""
        p = self.procs[name]
        tree = [p.pid] + _descendants(p.pid)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=10)
        return tree

    def wait(self, name, timeout):
        deadline = time.time() + timeout
        while self.procs[name].poll() is None and time.time() < deadline:
            self.watch()
            time.sleep(0.2)
        return self.procs[name].poll()

    def log(self, name):
        return (self.tmp / f"{name}.log").read_text()[-3000:]

    def cleanup(self):
        for p in self.procs.values():
            if p.poll() is None:
                kill_tree(p.pid)
                p.wait(timeout=10)
