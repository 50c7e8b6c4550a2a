"""A stage's state and the devices it crosses, on CPU: what leaves a stage (source packages, end
parameters, checkpoint snapshots, test dumps) is CPU copies that later training cannot change; a
file a GPU wrote (its tensors tagged cuda:0) loads on this CPU-only machine through the map-location
loaders and restores a CPU stage exactly; the per-step checks wait for the device once and give
what the per-parameter loops they replace gave, bit for bit."""
import io
import os

import pytest
import torch
from torch import serialization

from kintsugi.parallel.device import load_cpu
from kintsugi.recovery.checkpoint import copy_state, read_snapshot, snapshot, write_snapshot
from kintsugi.recovery.rebuild import pack, unpack
from kintsugi.trainer.config.job import JobConfig, ParallelConfig, TrainConfig
from kintsugi.trainer.model.llama import ModelConfig, cross_entropy_loss
from kintsugi.trainer.runtime.rebuild import load_dump
from kintsugi.trainer.runtime.stage import StageState

torch.set_num_threads(1)
MODEL = dict(dim=16, n_layers=4, n_heads=2, n_kv_heads=1, vocab_size=32)


def _job(stages=1):
    return JobConfig(model=ModelConfig(**MODEL), parallel=ParallelConfig(stages=stages),
                     train=TrainConfig(max_steps=4, warmup_steps=1))


def _trained_stage(steps=2, seed=0):
    st = StageState(_job(), 0)
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        tok = torch.randint(0, MODEL["vocab_size"], (2, 9), generator=gen)
        cross_entropy_loss(st.model(tok[:, :-1]), tok[:, 1:]).backward()
        sq = st.local_grad_sq()
        st.apply_step(k, sq, sq)
    tok = torch.randint(0, MODEL["vocab_size"], (2, 9), generator=gen)
    cross_entropy_loss(st.model(tok[:, :-1]), tok[:, 1:]).backward()  # gradients present for the norm
    return st


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_the_grad_norm_is_the_per_parameter_sum_in_order_bit_for_bit():
    st = _trained_stage()
    # Independently: the loop the step used to run, one float64 partial per parameter, summed
    # left to right in Python (each float() a host synchronisation on a GPU).
    expected = 0.0
    for p in st.model.parameters():
        if p.grad is not None:
            expected += float(p.grad.detach().double().pow(2).sum())
    assert st.local_grad_sq() == expected  # bitwise: the clip and the golden losses depend on it
    st.zero_grad()
    assert st.local_grad_sq() == 0.0


def test_finite_weights_are_checked_at_once():
    st = _trained_stage(steps=1)
    assert st.params_finite()
    with torch.no_grad():
        list(st.model.parameters())[-1].view(-1)[3] = float("inf")
    assert not st.params_finite()
    with torch.no_grad():
        list(st.model.parameters())[-1].view(-1)[3] = float("nan")
    assert not st.params_finite()


def test_what_leaves_a_stage_is_cpu_copies_training_cannot_change():
    st = _trained_stage()
    live = {p.untyped_storage().data_ptr() for p in st.model.parameters()}
    live |= {v.untyped_storage().data_ptr() for s in st.optimizer.state.values() for v in s.values()
             if torch.is_tensor(v)}
    outgoing = {"source_package": st.source_package(), "end_params": st.end_params(),
                "checkpoint": snapshot(st, 1), "copy": copy_state(st.state_dict())}
    for name, obj in outgoing.items():
        tensors = list(_tensors(obj))
        assert tensors, name
        assert all(t.device.type == "cpu" for t in tensors), name
        assert not any(t.untyped_storage().data_ptr() in live for t in tensors), f"{name} aliases the live stage"
    before = {k: v.clone() for k, v in outgoing["source_package"]["params"].items()}
    sq = st.local_grad_sq()
    st.apply_step(2, sq, sq)  # training goes on: what was sent must not move with it
    for k, v in outgoing["source_package"]["params"].items():
        assert torch.equal(v, before[k]), k
    # One stage of four layers: positional names are the stage's own. The step did move the live
    # weights (else the check above proves nothing).
    assert any(not torch.equal(v, before[k]) for k, v in st.model.state_dict().items())


def _save_tagged_cuda(obj) -> bytes:
    """`obj` saved as a GPU process saves it: every storage's location tag is cuda:0 (torch's own
    tagging hook, the format a torch.save of CUDA tensors writes)."""
    ptrs = {t.untyped_storage().data_ptr() for t in _tensors(obj)}

    def tagger(storage):
        try:
            return "cuda:0" if storage.data_ptr() in ptrs else None
        except Exception:  # noqa: BLE001 - storages of other kinds: not ours
            return None

    serialization.register_package(1, tagger, lambda storage, location: None)
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
    finally:
        serialization._package_registry[:] = [e for e in serialization._package_registry if e[1] is not tagger]
    return buf.getvalue()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only process reading what a GPU wrote")
def test_a_dump_a_gpu_wrote_loads_here_and_restores_a_cpu_stage_exactly(tmp_path):
    src = _trained_stage()
    state = copy_state(src.state_dict())
    raw = _save_tagged_cuda(state)
    assert b"cuda:0" in raw
    with pytest.raises(RuntimeError, match="CUDA"):  # really a GPU's file: a plain load refuses it here
        torch.load(io.BytesIO(raw), weights_only=False)
    path = tmp_path / "g1_target_0,0.pt"
    path.write_bytes(raw)
    back = load_dump(str(path))
    assert all(t.device.type == "cpu" for t in _tensors(back))
    dst = StageState(_job(), 0, seed_offset=1)  # different initial weights
    assert not torch.equal(dst.model.layers["0"].attention.wq.weight, src.model.layers["0"].attention.wq.weight)
    dst.load_state_dict(back, "handoff")
    for (name, a), (_, b) in zip(src.model.state_dict().items(), dst.model.state_dict().items()):
        assert torch.equal(a, b), name
    s_opt, d_opt = src.optimizer.state_dict()["state"], dst.optimizer.state_dict()["state"]
    for i in s_opt:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s_opt[i][k], d_opt[i][k]), (i, k)
    weights = _save_tagged_cuda({"w": torch.arange(6.0)})
    assert torch.equal(load_cpu(io.BytesIO(weights))["w"], torch.arange(6.0))  # weights_only path too


def test_packages_and_checkpoints_record_no_device(tmp_path):
    """A package or checkpoint holds dtype, shape and bytes only: what a GPU stage sends is byte for
    byte what the same state on the CPU sends, and it loads wherever it lands."""
    st = _trained_stage()
    payload = pack(st.state_dict())
    header_len = int.from_bytes(payload[8:16].numpy().tobytes(), "little")
    header = bytes(payload[16:16 + header_len].numpy().tobytes())
    assert b"cuda" not in header and b"device" not in header
    path = os.path.join(str(tmp_path), "ckpt")
    write_snapshot(snapshot(st, 1), path)
    back = read_snapshot(path)
    assert all(t.device.type == "cpu" for t in _tensors(back))
    for k, v in st.model.state_dict().items():
        assert torch.equal(unpack(payload)["params"][k], v) and torch.equal(back["params"][k], v), k


def test_adopted_optimizer_state_is_a_copy_on_the_parameters_device():
    st = _trained_stage()
    p = next(iter(st.model.parameters()))
    received = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.optimizer.state[p].items()}
    twin = StageState(_job(), 0)
    q = next(iter(twin.model.parameters()))
    twin.adopt_optimizer_state(q, received)
    got = twin.optimizer.state[q]
    assert set(got) == set(received)
    for k, v in received.items():
        assert torch.equal(got[k], v) and got[k].device == (q.device if v.dim() > 0 else torch.device("cpu"))
        assert got[k].untyped_storage().data_ptr() != v.untyped_storage().data_ptr(), k  # not aliased
