"""The token the ranks of one torchrun node share when none was given (no KINTSUGI_TOKEN).

Rank 0 makes a fresh token and the other local ranks read it from a file; the token never goes
through a store. The file lives in a directory of its own per run, `<tmp>/kintsugi-<uid>-<key>`
(`key` names the torchrun job: master address and port, run id, restart count), because the ranks
must find it without talking to each other first. That name is predictable, so another local user
can create it before us; what keeps the token safe is that nothing here trusts a path:

- the directory is opened with O_NOFOLLOW | O_DIRECTORY and used through its descriptor only; it
  must belong to this user and give the group and others no access at all (0700), or the run stops
  with one line saying so (rank 0 creates it 0700 itself; a leftover of our own is reused);
- the token is written to a new file created with O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600, then
  renamed into place inside that directory, so no planted name or symlink receives it;
- readers open it with O_NOFOLLOW and check its owner and mode before reading a byte;
- the file names the torchrun agent that started rank 0 (the parent of every local rank, with its
  start time): a token left by an earlier run that was killed is never taken for this run's;
- rank 0 removes the file and the directory when it exits.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import stat
import tempfile
import time
import uuid
from typing import Mapping, Optional

from kintsugi.trainer.config.errors import ConfigError

TOKEN_FILE = "token"
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)


def token_dir(env: Optional[Mapping[str, str]] = None, base: Optional[str] = None) -> str:
    """The per-run directory of this torchrun job's node token (not necessarily existing)."""
    env = os.environ if env is None else env
    job = (f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}/{env.get('TORCHELASTIC_RUN_ID', '')}/"
           f"{env.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    key = hashlib.sha256(job.encode()).hexdigest()[:16]
    return os.path.join(base or tempfile.gettempdir(), f"kintsugi-{os.geteuid()}-{key}")


def _agent() -> str:
    """The process that started the local ranks (torchrun's agent), with its start time so that a
    reused pid is told apart: every rank of one node computes the same value."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except (OSError, IndexError):
        started = ""
    return f"{ppid}:{started}"


def _refuse(path: str, why: str) -> ConfigError:
    return ConfigError(f"the node's token directory {path} {why}; someone else may be trying to read or "
                       "replace this run's token: remove it (or set TMPDIR to a directory only you can "
                       f"write), or give every rank the token yourself with KINTSUGI_TOKEN")


def _open_private_dir(path: str) -> Optional[int]:
    """A descriptor of `path` once it is a directory of ours with no group/other access; None if it
    does not exist; ConfigError if it is anything else."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink; ENOTDIR: a file
        raise _refuse(path, f"is not a plain directory ({e.strerror})") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        os.close(fd)
        raise _refuse(path, f"belongs to uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o} (it must be "
                            f"uid {os.geteuid()}'s own, mode 700)")
    return fd


def _read(dir_fd: int) -> Optional[dict]:
    try:
        fd = os.open(TOKEN_FILE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
    except OSError:  # not written yet (or a symlink: never followed)
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            return None
        try:
            rec = json.loads(f.read(4096))
        except ValueError:
            return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("token"), str) else None


def write_node_token(token: str, path: Optional[str] = None) -> str:
    """Rank 0: publish `token` for the node's other ranks; removed when this process exits.
    Returns the directory."""
    path = path or token_dir()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # ours from an earlier run that was killed, or planted: _open_private_dir tells
    fd = _open_private_dir(path)
    if fd is None:
        raise _refuse(path, "vanished while it was being created")
    for name in os.listdir(fd):  # an earlier run's leftovers (our own directory: unlinking is safe)
        try:
            os.unlink(name, dir_fd=fd)
        except OSError:
            pass
    tmp = f".{TOKEN_FILE}-{os.getpid()}-{uuid.uuid4().hex}"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600, dir_fd=fd)
    with os.fdopen(out, "w") as f:
        json.dump({"agent": _agent(), "token": token}, f)
    os.replace(tmp, TOKEN_FILE, src_dir_fd=fd, dst_dir_fd=fd)

    def remove() -> None:
        try:
            os.unlink(TOKEN_FILE, dir_fd=fd)
        except OSError:
            pass
        try:
            os.rmdir(path)
        except OSError:
            pass

    atexit.register(remove)
    return path


def read_node_token(timeout_s: float = 60.0, path: Optional[str] = None) -> str:
    """Any other local rank: the token rank 0 wrote for this run (same agent), waiting for it."""
    path = path or token_dir()
    agent = _agent()
    deadline = time.monotonic() + timeout_s
    while True:
        fd = _open_private_dir(path)
        if fd is not None:
            try:
                rec = _read(fd)
            finally:
                os.close(fd)
            if rec is not None and rec.get("agent") == agent:
                return rec["token"]
        if time.monotonic() > deadline:
            raise ConfigError(f"no KINTSUGI_TOKEN and local rank 0 wrote none to {path} within {timeout_s:.0f}s "
                              "(is rank 0 on this node?); set KINTSUGI_TOKEN to the same value on every rank")
        time.sleep(0.05)
