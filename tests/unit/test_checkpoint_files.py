"""Checkpoint files (trainer/checkpoint.py): an exact round trip of a real stage with LISA and
Streaming DiLoCo state, every kind of damage caught and blamed on the right file without unpickling
anything, resume falling back past a bad step, pruning, and a write that fails mid-way (a file-size
limit in a subprocess) reported instead of lost."""
import errno
import hashlib
import io
import json
import logging
import os
import struct
import subprocess
import sys
import time

import pytest
import torch

from kintsugi.parallel.diloco import StreamingDiLoCo
from kintsugi.recovery.checkpoint import (MANIFEST, TENSORS, TREE, AsyncCheckpointer, CheckpointCorrupt, checkpoint_path,
                                is_complete, prune, read_snapshot, restore, snapshot, verify, write_snapshot)
from kintsugi.recovery.resume_points import find_resume_points, resume_points
from kintsugi.trainer.config.job import DilocoConfig, JobConfig, LisaConfig, ParallelConfig, TrainConfig
from kintsugi.trainer.runtime.lisa import LisaController
from kintsugi.trainer.model.llama import ModelConfig, cross_entropy_loss
from kintsugi.trainer.runtime.stage import StageState

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = dict(dim=16, n_layers=4, n_heads=2, n_kv_heads=1, vocab_size=32)
FILES = (TREE, TENSORS, MANIFEST)


def assert_identical(a, b, where="snap"):
    """Same types all the way down (int keys stay ints, tuples stay tuples), tensors equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)), where
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), where
    else:
        assert a == b, where


# --- a real stage with LISA and Streaming DiLoCo ----------------------------------------------------------
def _stage():
    job = JobConfig(model=ModelConfig(**MODEL), parallel=ParallelConfig(stages=1),
                    train=TrainConfig(max_steps=20, warmup_steps=1))
    st = StageState(job, 0)
    st.attach_lisa(LisaController(LisaConfig(enabled=True, layers_per_stage=1, interval=1, sampling="importance",
                                             state_policy="offload"), st, seed=0, replica=0))
    diloco = StreamingDiLoCo(dict(st.model.named_parameters()),
                             DilocoConfig(enabled=True, sync_every=2, fragments=2, overlap=0))
    st.attach_diloco(diloco)
    st.neighbour_copy = {"norm.weight": torch.randn(MODEL["dim"], generator=torch.Generator().manual_seed(5))}
    return st, diloco


def _train(st, diloco, steps):
    for step in steps:
        st.lisa.before_step(step)
        tok = torch.randint(0, MODEL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(100 + step))
        cross_entropy_loss(st.model(tok[:, :-1]), tok[:, 1:]).backward()
        sq = st.local_grad_sq()
        st.apply_step(step, sq, sq)
        diloco.after_inner_step(step + 1)


@pytest.fixture(scope="module")
def trained():
    st, diloco = _stage()
    _train(st, diloco, range(5))
    return st, diloco, snapshot(st, 4)


def test_snapshot_round_trips_bit_exact_and_resumes_exactly(tmp_path, trained):
    st, diloco, snap = trained
    assert snap["lisa"]["stash"] and snap["lisa"]["anchors"] and snap["diloco"]["fragments"][0]["momentum"]
    assert any(isinstance(k, int) for k in snap["optimizer"]["state"])
    path = checkpoint_path(str(tmp_path), 4, (0, 0))
    write_snapshot(snap, path)
    assert sorted(os.listdir(path)) == sorted(FILES) and is_complete(path)
    verify(path)
    assert_identical(snap, read_snapshot(path))
    # Restored into a fresh stage, the next steps match the uninterrupted run bit for bit.
    cont, cont_diloco = _stage()
    restore(cont, str(tmp_path), (0, 0), 4)
    ref, ref_diloco = _stage()
    _train(ref, ref_diloco, range(5))
    _train(ref, ref_diloco, range(5, 8))
    _train(cont, cont_diloco, range(5, 8))
    for (n, a), b in zip(ref.model.state_dict().items(), cont.model.state_dict().values()):
        assert torch.equal(a, b), n


# --- damage --------------------------------------------------------------------------------------------
def _flip(file, pos):
    with open(file, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))


def _truncate(file, by=1):
    os.truncate(file, os.path.getsize(file) - by)


def _expect_corrupt(path, name, call=read_snapshot):
    with pytest.raises(CheckpointCorrupt) as e:
        call(path)
    assert e.value.file == os.path.join(path, name), (e.value.file, name)
    assert name in str(e.value)


@pytest.fixture
def written(tmp_path, trained):
    path = checkpoint_path(str(tmp_path), 4, (0, 0))
    write_snapshot(trained[2], path)
    return path


@pytest.mark.parametrize("name", FILES)
def test_a_truncated_file_is_named(written, name):
    _truncate(os.path.join(written, name))
    _expect_corrupt(written, name)
    _expect_corrupt(written, name, verify)


@pytest.mark.parametrize("name", [TREE, TENSORS])
def test_a_flipped_byte_in_a_data_file_is_named(written, name):
    file = os.path.join(written, name)
    good = open(file, "rb").read()
    for pos in (0, len(good) // 2, len(good) - 1):
        _flip(file, pos)
        assert is_complete(written)  # the write finished; only the hashes tell
        _expect_corrupt(written, name)
        _expect_corrupt(written, name, verify)
        open(file, "wb").write(good)
    verify(written)  # restored: the checks above were about the flipped byte


def test_any_flipped_byte_in_the_manifest_is_blamed_on_the_manifest(written):
    file = os.path.join(written, MANIFEST)
    good = open(file, "rb").read()
    for pos in range(len(good)):  # every position: a digit of a size or a hash still parses as JSON
        _flip(file, pos)
        _expect_corrupt(written, MANIFEST, verify)
        assert not is_complete(written)
        open(file, "wb").write(good)
    assert is_complete(written)


@pytest.mark.parametrize("name", FILES)
def test_a_missing_file_is_named(written, name):
    os.remove(os.path.join(written, name))
    _expect_corrupt(written, name)
    assert is_complete(written) == (name != MANIFEST)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.marker, "w"))


def _rewrite_manifest(path):
    """What someone who can write the directory can do: make the manifest agree with the files."""
    file = os.path.join(path, MANIFEST)
    m = json.load(open(file))
    for name in (TREE, TENSORS):
        data = open(os.path.join(path, name), "rb").read()
        m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    del m["manifest_sha256"]
    m["manifest_sha256"] = hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    json.dump(m, open(file, "w"))


@pytest.mark.parametrize("consistent_manifest", [False, True])
def test_a_pickle_bomb_in_place_of_the_tree_is_rejected_unrun(written, tmp_path, consistent_manifest):
    marker = str(tmp_path / "pwned")
    buf = io.BytesIO()
    torch.save({"tree": _Evil(marker)}, buf)
    open(os.path.join(written, TREE), "wb").write(buf.getvalue())
    if consistent_manifest:
        _rewrite_manifest(written)
        assert is_complete(written)
    _expect_corrupt(written, TREE)
    _expect_corrupt(written, TREE, verify)
    assert not os.path.exists(marker)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # the bomb is live
    assert os.path.exists(marker)


def test_no_checkpoint_at_all_is_named(tmp_path):
    _expect_corrupt(str(tmp_path / "nothing"), MANIFEST)


# --- resume ----------------------------------------------------------------------------------------------
def _small(step):
    return {"step_done": step, "w": torch.full((3,), float(step))}


def test_resume_falls_back_past_a_bad_step_and_reports_it(tmp_path, caplog):
    run = str(tmp_path)
    for step in (3, 7):
        for s in (0, 1):
            write_snapshot(_small(step), checkpoint_path(run, step, (0, s)))
    write_snapshot(_small(9), checkpoint_path(run, 9, (0, 0)))  # stage 1 never wrote step 9
    for step in (5, 11):  # replica 1 suspended on its own schedule
        for s in (0, 1):
            write_snapshot(_small(step), checkpoint_path(run, step, (1, s)))
    assert resume_points(run, 2, 2) == {0: 7, 1: 11}  # step 9 lacks stage 1 of replica 0
    bad = checkpoint_path(run, 7, (0, 1))
    _flip(os.path.join(bad, TENSORS), 2)
    with caplog.at_level(logging.WARNING, logger="kintsugi.checkpoint"):
        points = resume_points(run, 2, 2)
    assert points == {0: 3, 1: 11}
    points2, rejected = find_resume_points(run, 2, 2)
    assert points2 == points
    assert [p for p, _ in rejected] == [checkpoint_path(run, 9, (0, 1)), bad]
    assert TENSORS in dict(rejected)[bad] and "sha256" in dict(rejected)[bad]
    assert bad in caplog.text and checkpoint_path(run, 9, (0, 1)) in caplog.text
    # No good step left for replica 0: nothing to resume from.
    _truncate(os.path.join(checkpoint_path(run, 3, (0, 0)), TREE))
    assert resume_points(run, 2, 2) is None


def test_resume_points_without_damage(tmp_path):
    run = str(tmp_path)
    for step in (3, 7):
        for s in (0, 1):
            write_snapshot(_small(step), checkpoint_path(run, step, (0, s)))
    assert find_resume_points(run, 1, 2) == ({0: 7}, [])
    assert resume_points(run, 2, 2) is None  # replica 1 has nothing


# --- pruning ---------------------------------------------------------------------------------------------
def _steps_on_disk(run):
    return sorted(int(n[5:]) for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step_"))


def test_prune_keeps_the_newest_complete_steps_and_writes_in_progress(tmp_path):
    run = str(tmp_path)
    for step in (0, 1, 2, 3, 4):
        for s in (0, 1):
            write_snapshot(_small(step), checkpoint_path(run, step, (0, s)))
    write_snapshot(_small(5), checkpoint_path(run, 5, (0, 0)))  # stage 1 has not written step 5 yet
    os.makedirs(checkpoint_path(run, 6, (0, 0)) + ".tmp-1-aa")  # step 6 is being written
    os.makedirs(checkpoint_path(run, 1, (0, 1)) + ".tmp-1-bb")  # a slow rewrite of step 1, just now
    stale = checkpoint_path(run, 0, (0, 1)) + ".tmp-1-cc"        # a crashed write, hours ago
    os.makedirs(stale)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    open(os.path.join(run, "checkpoints", "layout.json"), "w").write("{}")

    deleted = prune(run, keep=2)
    assert sorted(deleted) == [os.path.join(run, "checkpoints", f"step_{k}") for k in (0, 2)]
    assert _steps_on_disk(run) == [1, 3, 4, 5, 6]
    assert os.path.exists(os.path.join(run, "checkpoints", "layout.json"))
    # Complete for stage 0 alone, step 5 is the newest; keep=1 leaves it (and what is in progress).
    prune(run, keep=1, slots=[(0, 0)])
    assert _steps_on_disk(run) == [1, 5, 6]
    assert is_complete(checkpoint_path(run, 5, (0, 0)))
    assert prune(run, keep=0) == [] and _steps_on_disk(run) == [1, 5, 6]  # 0 keeps all


def test_prune_removes_stale_partial_writes_beside_the_steps_it_keeps(tmp_path):
    # A kill mid-write leaves `<slot>.tmp-*` (the new copy, never renamed into place) or `.old-*`
    # (the previous copy moved aside) inside a step that stays: an hour later they are garbage.
    run = str(tmp_path)
    for step in (0, 1):
        for s in (0, 1):
            write_snapshot(_small(step), checkpoint_path(run, step, (0, s)))
    hours_ago = time.time() - 7200
    old_copy = checkpoint_path(run, 1, (0, 0)) + ".old-1234abcd"
    crashed = checkpoint_path(run, 1, (0, 1)) + ".tmp-77-ee"
    writing = checkpoint_path(run, 0, (0, 1)) + ".tmp-78-ff"  # a rewrite going on now
    for path in (old_copy, crashed, writing):
        os.makedirs(path)
        with open(os.path.join(path, TENSORS), "wb") as f:
            f.write(b"\0" * 64)
    for path in (old_copy, crashed):
        for p in (path, os.path.join(path, TENSORS)):
            os.utime(p, (hours_ago, hours_ago))
    deleted = prune(run, keep=2)
    assert sorted(deleted) == sorted([old_copy, crashed])
    assert os.path.isdir(writing) and _steps_on_disk(run) == [0, 1]
    assert all(is_complete(checkpoint_path(run, k, (0, s))) for k in (0, 1) for s in (0, 1))


def test_async_checkpointer_prunes_after_each_write(tmp_path, trained):
    st = trained[0]
    ck = AsyncCheckpointer(None, str(tmp_path), every=4, keep=2, grid=(1, 1))
    for step in (3, 7, 11):
        assert ck.due(step)
        ck.save(st, (0, 0), step)
        ck.wait()
    assert ck.last_error is None
    assert _steps_on_disk(str(tmp_path)) == [7, 11]
    assert read_snapshot(checkpoint_path(str(tmp_path), 11, (0, 0)))["step_done"] == 11
    with pytest.raises(ValueError, match="keep_checkpoints"):
        AsyncCheckpointer(None, str(tmp_path), every=4, keep=-1)


# --- a write that fails mid-way --------------------------------------------------------------------------
_FAILING_WRITE = r"""
import errno, json, os, resource, signal, sys
import torch
sys.path.insert(0, {repo!r})
from tests.unit.test_checkpoint_files import _stage, _train
from kintsugi.recovery.checkpoint import AsyncCheckpointer, checkpoint_path, is_complete, read_snapshot
from kintsugi.recovery.resume_points import find_resume_points

run = sys.argv[1]
st, diloco = _stage()
_train(st, diloco, range(2))
errors = []
ck = AsyncCheckpointer(None, run, every=1, on_error=lambda step, e: errors.append([step, type(e).__name__, e.errno]))
ck.save(st, (0, 0), 3)
ck.wait()
small = read_snapshot(checkpoint_path(run, 3, (0, 0)))["params"]["norm.weight"].clone()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a killing signal
limit = 256 << 10
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
st.neighbour_copy["big"] = torch.zeros(1 << 20)  # 4 MiB: the tensor file outgrows the limit
with torch.no_grad():
    st.model.norm.weight.add_(1.0)
ck.save(st, (0, 0), 7)  # a new step
ck.wait()
ck.save(st, (0, 0), 3)  # over the good step 3
ck.wait()
after = read_snapshot(checkpoint_path(run, 3, (0, 0)))["params"]["norm.weight"]
print(json.dumps({{"errors": errors, "last_error": [ck.last_error[0], type(ck.last_error[1]).__name__],
                  "step7": sorted(os.listdir(os.path.join(run, "checkpoints", "step_7"))),
                  "step3": sorted(os.listdir(os.path.join(run, "checkpoints", "step_3"))),
                  "complete7": is_complete(checkpoint_path(run, 7, (0, 0))),
                  "step3_unchanged": bool(torch.equal(after, small)),
                  "resume": find_resume_points(run, 1, 1)[0]}}))
"""


def test_a_write_that_fails_mid_way_is_reported_and_leaves_nothing_complete(tmp_path):
    script = _FAILING_WRITE.format(repo=REPO)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["errors"] == [[7, "OSError", errno.EFBIG], [3, "OSError", errno.EFBIG]]
    assert res["last_error"] == [3, "OSError"]
    assert res["step7"] == [] and not res["complete7"]  # no half-written slot, no temporary left
    assert res["step3"] == ["r0s0"] and res["step3_unchanged"]  # the good checkpoint survived its rewrite
    assert res["resume"] == {"0": 3}  # (JSON keys are strings)
    assert "checkpoint of step 7 failed" not in out.stderr  # the callback replaced the default logging


def test_keep_checkpoints_must_not_be_negative():
    from kintsugi.trainer.config.errors import ConfigError
    from kintsugi.trainer.config.job import RecoveryConfig
    assert RecoveryConfig().keep_checkpoints == 0 and RecoveryConfig(keep_checkpoints=3).keep_checkpoints == 3
    with pytest.raises(ConfigError) as e:
        RecoveryConfig(keep_checkpoints=-1)
    assert str(e.value).startswith("recovery.keep_checkpoints=-1") and "\n" not in str(e.value)
