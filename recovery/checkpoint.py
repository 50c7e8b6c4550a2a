"""Per-slot checkpoints: the last-resort rebuild tier (`recovery.strategy=checkpoint`, or `tiered`
with `recovery.checkpoint_every`), the baseline CheckFree is compared against, and what
`train.resume` continues from after a preemption.

Layout: `<run_dir>/checkpoints/step_<k>/r<r>s<s>/` is one directory per slot, written by that
slot's worker alone (no collective: a worker writes in the background while its group trains, and
a slot's files never wait for another slot's). It holds the stage's weights, optimizer state, lr
scale, LISA state, the Streaming DiLoCo outer state (global copies, momentum, sync counts) and the
RNG state: everything an exact resume needs; the data cursor is the step itself. Three files:

- `tree.json`   the structure and every non-tensor value, plus the tensor table: a state-package
                header (`recovery/packages.py`), so int keys, tuples and NaN survive exactly;
- `tensors.bin` the tensors' raw bytes, in table order;
- `MANIFEST.json` written last: every file's size and sha256, and `manifest_sha256`, the sha256
                of its other fields as JSON with sorted keys and no spaces.

Nothing is pickled, so a crafted checkpoint cannot run code on resume (torch.distributed.checkpoint,
used before, pickles its `.metadata` and our tree of non-tensor values). A slot is written into a
private `<slot>.tmp-*` directory, its files, manifest and directory fsynced, then renamed into
place: a crash mid-write leaves no directory `is_complete` accepts. `verify` re-hashes every file;
`read_snapshot` verifies as it reads and raises `CheckpointCorrupt` naming the bad file.

Periodic checkpoints: the worker snapshots its stage in memory at a committed step, a background
thread writes it and appends to the store's `ckpt` log; the coordinator declares step k restorable
once every slot has written it. A rollback restores every slot to that step. With `keep` > 0 the
writer then prunes the run's checkpoints to the newest `keep` steps complete for every slot. A
failed write (disk full, ...) is reported through `on_error` and kept as `last_error`.

Suspend (`save_now`): when the whole job is being preempted (Slurm's warning signal to every task,
no spare left to hand off to), each worker writes its replica's last committed step synchronously
and exits; `train.resume` then continues every replica from its newest step that verifies
(recovery.resume_points).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from kintsugi.recovery import packages
from kintsugi.recovery import protocol as P

log = logging.getLogger("kintsugi.checkpoint")

MANIFEST, TREE, TENSORS = "MANIFEST.json", "tree.json", "tensors.bin"
FORMAT, VERSION = "kintsugi-checkpoint", 1
_CHUNK = 1 << 22
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SLOT_DIR = re.compile(r"^r(\d+)s(\d+)$")
_SLOT_TMP = re.compile(r"^r\d+s\d+\.(tmp|old)-")


class CheckpointCorrupt(ValueError):
    """A checkpoint that must not be restored: missing, incomplete, truncated or altered. `file` is
    the file that is wrong, `reason` what is wrong with it."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"checkpoint file {file} is unusable: {reason}; restore an older step or "
                         "resume from another run directory")
        self.file, self.reason = file, reason


def checkpoint_path(run_dir: str, step: int, slot) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step}", f"r{slot[0]}s{slot[1]}")


def is_complete(path: str) -> bool:
    """The slot's write finished: its manifest (written last) exists and parses. Cheap; `verify`
    is the check that every byte is still what was written."""
    try:
        _manifest(path)
        return True
    except CheckpointCorrupt:
        return False


# --- writing -----------------------------------------------------------------------------------------
def write_snapshot(snap: dict, path: str) -> None:
    """Write `snap` (nested dicts / lists of tensors and plain values) as a checkpoint at `path`,
    replacing one already there only once the new one is complete and on disk."""
    header, tensors = packages.encode(snap)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        files = {TREE: _write_file(os.path.join(tmp, TREE), [memoryview(header)]),
                 TENSORS: _write_file(os.path.join(tmp, TENSORS),
                                      (memoryview(packages.tensor_bytes(t).numpy()) for t in tensors if t.numel()))}
        # An int, not a float: a flipped last digit of a float can parse to the same double, and
        # then no hash could tell that the file changed.
        manifest = {"format": FORMAT, "version": VERSION, "created_unix_ns": time.time_ns(), "files": files}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        _write_file(os.path.join(tmp, MANIFEST), [memoryview(json.dumps(manifest, indent=1).encode())])
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):  # a directory cannot be renamed over a non-empty one: move it aside
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)  # the previous checkpoint stays the one in place
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    _fsync_dir(os.path.dirname(parent))  # the step directory's own entry, if it is new
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_file(path: str, chunks: Iterable[memoryview]) -> dict:
    h, size = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            h.update(chunk)
            size += chunk.nbytes
        f.flush()
        os.fsync(f.fileno())
    return {"size": size, "sha256": h.hexdigest()}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading and verifying -------------------------------------------------------------------------
def _manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    try:
        with open(file, "rb") as f:
            raw = f.read(1 << 20)
    except OSError as e:
        raise CheckpointCorrupt(file, f"missing ({e.strerror}); the write never completed") from None
    try:
        m = packages.loads_strict(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointCorrupt(file, f"not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("manifest_sha256") != _manifest_digest(m):
        raise CheckpointCorrupt(file, "its own sha256 does not match its content")
    files = m.get("files")
    if m.get("format") != FORMAT or m.get("version") != VERSION \
            or not isinstance(files, dict) or set(files) != {TREE, TENSORS}:
        raise CheckpointCorrupt(file, f"not a {FORMAT} v{VERSION} manifest listing {TREE} and {TENSORS}")
    for name, e in files.items():
        if not (isinstance(e, dict) and type(e.get("size")) is int and e["size"] >= 0
                and isinstance(e.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])):
            raise CheckpointCorrupt(file, f"malformed entry for {name}")
    return m


def _manifest_digest(m: dict) -> str:
    """sha256 of the manifest without this field, as canonical JSON: a manifest edit that still
    parses (one digit of a size or hash) is caught and blamed on the manifest, not on a data file."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_size(file: str, want: int) -> None:
    try:
        have = os.path.getsize(file)
    except OSError as e:
        raise CheckpointCorrupt(file, f"missing ({e.strerror})") from None
    if have != want:
        raise CheckpointCorrupt(file, f"{have} bytes, the manifest says {want} (truncated or overwritten)")


def _read_tree(path: str, m: dict) -> packages.Header:
    file, want = os.path.join(path, TREE), m["files"][TREE]
    _check_size(file, want["size"])
    if want["size"] > packages.MAX_HEADER_BYTES:
        raise CheckpointCorrupt(file, f"{want['size']} bytes exceeds the {packages.MAX_HEADER_BYTES}-byte limit")
    with open(file, "rb") as f:
        raw = f.read()
    if hashlib.sha256(raw).hexdigest() != want["sha256"]:  # checked before a byte is parsed
        raise CheckpointCorrupt(file, "sha256 differs from the manifest's")
    try:
        return packages.parse_header(raw, m["files"][TENSORS]["size"])
    except packages.PackageError as e:
        raise CheckpointCorrupt(file, str(e)) from None


def read_tree(path: str) -> packages.Header:
    """The verified `tree.json` of the checkpoint at `path` (structure and plain values; no tensor
    is read). Raises CheckpointCorrupt."""
    return _read_tree(path, _manifest(path))


def verify(path: str) -> None:
    """Check every file of the checkpoint at `path` against its manifest (size and sha256) and that
    its tree parses. Raises CheckpointCorrupt naming the first file that is wrong."""
    m = _manifest(path)
    _read_tree(path, m)
    file, want = os.path.join(path, TENSORS), m["files"][TENSORS]
    _check_size(file, want["size"])
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if h.hexdigest() != want["sha256"]:
        raise CheckpointCorrupt(file, "sha256 differs from the manifest's")


def read_snapshot(path: str) -> dict:
    """The snapshot written at `path`, verified as it is read (one pass over the tensor bytes).
    Raises CheckpointCorrupt naming the file that is missing, truncated or altered."""
    m = _manifest(path)
    header = _read_tree(path, m)
    file, want = os.path.join(path, TENSORS), m["files"][TENSORS]
    _check_size(file, want["size"])
    h = hashlib.sha256()
    with open(file, "rb") as f:
        def fill(spec: packages.TensorSpec, dst: torch.Tensor) -> None:
            view = memoryview(dst.numpy())  # tensors lie one after another, in table order
            if f.tell() != spec.offset or f.readinto(view) != spec.nbytes:
                raise CheckpointCorrupt(file, f"short read at byte {spec.offset}")
            h.update(view)

        try:
            snap = packages.decode(header, fill)
        except packages.PackageError as e:
            raise CheckpointCorrupt(file, str(e)) from None
    if h.hexdigest() != want["sha256"]:
        raise CheckpointCorrupt(file, "sha256 differs from the manifest's")
    return snap


# --- what a slot saves -----------------------------------------------------------------------------
def copy_state(obj):
    """A copy of a state dict that later training cannot change, in host memory: tensors copied to
    the CPU (a GPU stage's snapshot neither doubles its GPU memory nor ties the file to a device),
    containers rebuilt, other values deep-copied. (A stage's `state_dict()` hands out its live tensors.)"""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: copy_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_state(v) for v in obj)
    return copy.deepcopy(obj)


def snapshot(state, step: int) -> dict:
    """Everything an exact resume of this stage needs (`state.state_dict()`, copied in memory),
    as of its committed `step`."""
    snap = copy_state(state.state_dict())
    snap["step_done"] = step
    return snap


def _log_error(step: int, exc: BaseException) -> None:
    log.error("checkpoint of step %d failed: %s: %s", step, type(exc).__name__, exc)


class AsyncCheckpointer:
    """Writes a slot's checkpoints in the background. `keep` > 0 prunes the run to the newest
    `keep` complete steps after each write; `grid` = (replicas, stages) says which slots make a step
    complete (without it, the slots seen on disk). `on_error(step, exc)` hears of a failed
    background write (default: log.error); it runs on the writer thread."""

    def __init__(self, store, run_dir: str, every: int, *, keep: int = 0,
                 on_error: Optional[Callable[[int, BaseException], None]] = None,
                 grid: Optional[Tuple[int, int]] = None):
        if keep < 0:
            raise ValueError(f"recovery.keep_checkpoints={keep} must be >= 0 (0 keeps all)")
        self.store, self.run_dir, self.every, self.keep = store, run_dir, every, keep
        # `store`: where a complete checkpoint is announced (the coordinator's `ckpt` log): a store,
        # or a callable taking the record (a worker's authenticated connection).
        self.notify = store if callable(store) else (lambda rec: P.append(store, "ckpt", rec))
        self.on_error = on_error or _log_error
        self.slots = [(r, s) for r in range(grid[0]) for s in range(grid[1])] if grid else None
        self.last_error: Optional[Tuple[int, BaseException]] = None
        self._thread: Optional[threading.Thread] = None

    def due(self, committed_step: int) -> bool:
        return self.every > 0 and (committed_step + 1) % self.every == 0

    def save(self, state, slot, step: int) -> None:
        """Snapshot now (cheap copies), write in the background; one write in flight at a time."""
        self.wait()
        snap = snapshot(state, step)

        def write():
            try:
                self._write(snap, slot, step)
            except Exception as e:  # noqa: BLE001 - reported, never lost with the thread
                self.last_error = (step, e)
                self.on_error(step, e)
                return
            try:
                self.notify({"slot": list(slot), "step": step})
            except Exception:  # noqa: BLE001 - the run may be ending; the checkpoint is still there
                pass

        self._thread = threading.Thread(target=write, daemon=True, name="kintsugi-ckpt")
        self._thread.start()

    def save_now(self, state, slot, step: int) -> str:
        """Synchronous write (the job is being suspended): returns the path; a failure raises."""
        self.wait()
        try:
            return self._write(snapshot(state, step), slot, step)
        except Exception as e:
            self.last_error = (step, e)
            raise

    def _write(self, snap: dict, slot, step: int) -> str:
        path = checkpoint_path(self.run_dir, step, slot)
        write_snapshot(snap, path)
        if self.keep:
            try:
                prune(self.run_dir, self.keep, slots=self.slots)
            except OSError as e:  # another slot's writer pruning the same directory at once
                log.warning("pruning checkpoints in %s: %s", self.run_dir, e)
        return path

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def restore(state, run_dir: str, slot, step: int) -> None:
    """Load the slot's checkpoint of `step` into `state` (its `load_state_dict`); raises
    CheckpointCorrupt if it does not verify (nothing is changed then)."""
    state.load_state_dict(read_snapshot(checkpoint_path(run_dir, step, slot)), "checkpoint")


# --- which steps exist, which to resume from, which to delete ------------------------------------------
def steps_on_disk(run_dir: str) -> Dict[int, List[str]]:
    """step -> names in its directory (slots, and temporary directories of writes in progress)."""
    root = os.path.join(run_dir, "checkpoints")
    out = {}
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            try:
                out[int(m.group(1))] = os.listdir(os.path.join(root, name))
            except FileNotFoundError:  # pruned by another writer just now
                pass
    return out


def prune(run_dir: str, keep: int, *, slots: Optional[Iterable[Tuple[int, int]]] = None,
          stale_s: float = 3600.0) -> List[str]:
    """Delete step directories older than the newest `keep` steps complete for every slot (`slots`,
    else every slot seen under any step). Never deletes a complete step among the newest `keep`,
    anything newer, or a step where a write is in progress (a `*.tmp-*` directory modified in the
    last `stale_s` seconds: an older one is a crashed write). Returns the deleted paths."""
    if keep < 1:
        return []
    steps = steps_on_disk(run_dir)
    want = ({f"r{r}s{s}" for r, s in slots} if slots is not None else
            {n for names in steps.values() for n in names if _SLOT_DIR.match(n)})
    if not want:
        return []
    complete = sorted((k for k, names in steps.items() if want <= set(names)
                       and all(is_complete(checkpoint_path(run_dir, k, _slot(n))) for n in want)), reverse=True)
    if len(complete) < keep:
        return []
    cutoff = complete[keep - 1]
    deleted = []
    for k, names in sorted(steps.items()):
        step_dir = os.path.join(run_dir, "checkpoints", f"step_{k}")
        if k >= cutoff or any(_SLOT_TMP.match(n) and _recent(os.path.join(step_dir, n), stale_s) for n in names):
            # Kept: a slot directory a killed write left beside it (`*.tmp-*`, `*.old-*`) goes once
            # it is stale, so kills do not pile up copies of the stage on disk.
            for n in names:
                if _SLOT_TMP.match(n) and not _recent(os.path.join(step_dir, n), stale_s):
                    shutil.rmtree(os.path.join(step_dir, n), ignore_errors=True)
                    deleted.append(os.path.join(step_dir, n))
            continue
        shutil.rmtree(step_dir, ignore_errors=True)
        deleted.append(step_dir)
    return deleted


def _slot(name: str) -> Tuple[int, int]:
    m = _SLOT_DIR.match(name)
    return int(m.group(1)), int(m.group(2))


def _recent(path: str, stale_s: float) -> bool:
    try:
        newest = max([os.path.getmtime(path)] + [os.path.getmtime(os.path.join(path, n)) for n in os.listdir(path)])
    except OSError:
        return False
    return time.time() - newest < stale_s
