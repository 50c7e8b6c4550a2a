"""State packages (recovery/packages.py, used by recovery/rebuild.py): bit-exact round trips of real
optimizer and stage states, nothing received is unpickled, and malformed input of every kind raises
PackageError (a ValueError) instead of crashing, hanging or allocating."""
import io
import json
import math
import os
import random
import struct

import pytest
import torch

from kintsugi.recovery import packages
from kintsugi.recovery.packages import PackageError
from kintsugi.recovery.rebuild import pack, unpack
from kintsugi.trainer.config.job import JobConfig, ParallelConfig, TrainConfig
from kintsugi.trainer.model.llama import ModelConfig, cross_entropy_loss
from kintsugi.trainer.runtime.stage import StageState

torch.set_num_threads(1)
MODEL = dict(dim=16, n_layers=4, n_heads=2, n_kv_heads=1, vocab_size=32)


def assert_identical(a, b, where="obj"):
    """Same types all the way down (int keys stay ints, tuples stay tuples), tensors equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        a, b = a.detach().contiguous().reshape(-1), b.contiguous().reshape(-1)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), where
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
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), where  # -0.0 stays -0.0
    else:
        assert a == b, where


def _stage_after_one_step():
    job = JobConfig(model=ModelConfig(**MODEL), parallel=ParallelConfig(stages=1),
                    train=TrainConfig(max_steps=4, warmup_steps=1))
    st = StageState(job, 0)
    tok = torch.randint(0, MODEL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    cross_entropy_loss(st.model(tok[:, :-1]), tok[:, 1:]).backward()
    sq = st.local_grad_sq()
    st.apply_step(0, sq, sq)
    return st, tok


def test_adamw_state_dict_round_trips_bit_exact_and_steps_identically():
    st, tok = _stage_after_one_step()
    sd = st.optimizer.state_dict()
    assert all(isinstance(k, int) for k in sd["state"]) and sd["state"]  # the int keys torch.save kept
    back = unpack(pack(sd))
    assert_identical(sd, back)
    # Loaded into a second stage, the next optimizer step gives the same weights bit for bit.
    twin, _ = _stage_after_one_step()
    twin.optimizer.load_state_dict(back)
    for s in (st, twin):
        cross_entropy_loss(s.model(tok[:, 1:]), tok[:, :-1]).backward()
        sq = s.local_grad_sq()
        s.apply_step(1, sq, sq)
    for (n, a), b in zip(st.model.state_dict().items(), twin.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_stage_export_with_every_value_kind_round_trips():
    st, _ = _stage_after_one_step()
    pkg = st.state_dict()
    g = torch.Generator().manual_seed(1)
    pkg.update({
        "lisa": {"layer_ids": [0, 1, 2, 3], "state_policy": "offload", "interval": 3, "active": [1, 3],
                 "scores": {0: 0.5, 2: float("nan")},
                 "anchors": {1: {"step": 4, "params": [torch.randn(3, 2, generator=g)]}},
                 "stash": {2: [{"step": torch.tensor(5.0), "exp_avg": torch.randn(4, generator=g)}, None]}},
        "diloco": {"step": 7, "num_syncs": 2, "fragments": [
            {"names": ["layers.0.w"], "global": {"layers.0.w": torch.randn(2, 2, dtype=torch.float64, generator=g)},
             "momentum": {}, "syncs": 1}]},
        "dtypes": [torch.randn(5, generator=g).to(torch.bfloat16), torch.arange(-3, 3),
                   torch.tensor([0, 7, 255], dtype=torch.uint8), torch.tensor([True, False, True]),
                   torch.tensor(2.5, dtype=torch.float64), torch.empty(0, 3), torch.zeros(2, 0, dtype=torch.int64),
                   torch.randn(4, 6, generator=g).t()],  # non-contiguous
        "specials": (float("inf"), -float("inf"), -0.0, 1e-310, 2 ** 70, -1, "", "ünïcode", None, True, b"\x00\xff"),
        (3, "tuple key"): {None: 1, True: 2, 1.5: 3, -4: [[], (), {}]},
    })
    back = unpack(pack(pkg))
    assert_identical(pkg, back)
    twin = StageState(st.job, 0)
    twin.load_state_dict(back, "handoff")  # the stage accepts it as it accepted torch.load's output
    assert_identical(st.model.state_dict(), twin.model.state_dict())


def test_a_tensor_held_twice_comes_back_shared():
    t = torch.arange(4.0)
    back = unpack(pack({"a": t, "b": [t]}))
    assert back["a"] is back["b"][0] and torch.equal(back["a"], t)


def test_values_the_format_cannot_hold_are_refused_when_sending():
    with pytest.raises(TypeError, match=r"obj\['x'\]\[1\]: a object"):
        pack({"x": [1, object()]})
    with pytest.raises(TypeError, match="complex64"):
        pack({"x": torch.zeros(2, dtype=torch.complex64)})


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this opens (creates) the marker file
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_rejected_and_never_runs(tmp_path):
    marker = str(tmp_path / "pwned")
    buf = io.BytesIO()
    torch.save({"params": {"w": torch.zeros(2)}, "evil": _Evil(marker)}, buf)
    raw = buf.getvalue()
    attempts = [raw, packages.MAGIC + struct.pack("<Q", len(raw)) + raw]  # with our prefix, too
    for payload in attempts:
        with pytest.raises(PackageError):
            unpack(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    assert not os.path.exists(marker)
    # The payload is live: the old reader (torch.load without weights_only) would have run it.
    torch.load(io.BytesIO(raw), weights_only=False)
    assert os.path.exists(marker)


def _small_package():
    return pack({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), 3: (1.5, None, "s"),
                 "b": torch.tensor([True, False]), "e": torch.empty(0)})


def test_every_truncation_raises_package_error():
    full = _small_package()
    for n in range(full.numel()):
        with pytest.raises(PackageError):
            unpack(full[:n].clone())


def test_bit_flips_raise_package_error_or_change_only_tensor_bytes():
    full = _small_package()
    header_end = packages._PREFIX.size + struct.unpack("<Q", full[8:16].numpy().tobytes())[0]
    rng = random.Random(0)
    raised = 0
    for _ in range(3000):
        bad = full.clone()
        pos, bit = rng.randrange(full.numel()), rng.randrange(8)
        bad[pos] ^= 1 << bit
        try:
            back = unpack(bad)
        except PackageError:
            raised += 1
            continue
        # A flip that still parses: in the tensor bytes (the manifest's hash catches those on disk),
        # or a header edit that JSON allows (e.g. one digit of a float). Never anything else.
        assert isinstance(back, dict)
    assert raised > 500  # most flips land in the prefix / header and are caught
    # Flips inside the tensor bytes of the float tensor decode to exactly that changed value.
    bad = full.clone()
    bad[header_end] ^= 1
    assert unpack(bad)["w"].view(-1).view(torch.uint8)[0] == 1


def _with_header(header: dict, data: bytes = b"") -> torch.Tensor:
    h = json.dumps(header).encode()
    return torch.frombuffer(bytearray(packages.MAGIC + struct.pack("<Q", len(h)) + h + data), dtype=torch.uint8)


def _header(tensors, tree=None, data_bytes=None):
    return {"format": packages.FORMAT, "version": 1, "tree": tree if tree is not None else {"t": 0},
            "tensors": tensors, "data_bytes": data_bytes if data_bytes is not None else 8}


@pytest.mark.parametrize("payload, message", [
    (_with_header(_header([{"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}]), b"\0" * 8), None),
    (_with_header(_header([{"dtype": "pickle", "shape": [2], "offset": 0, "nbytes": 8}]), b"\0" * 8), "dtype"),
    (_with_header(_header([{"dtype": "float32", "shape": [2], "offset": 4, "nbytes": 8}]), b"\0" * 8), "offset"),
    (_with_header(_header([{"dtype": "float32", "shape": [3], "offset": 0, "nbytes": 8}]), b"\0" * 8), "bytes"),
    (_with_header(_header([{"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}], data_bytes=9),
                  b"\0" * 8), "declares"),
    (_with_header(_header([{"dtype": "float32", "shape": [1 << 40], "offset": 0, "nbytes": 4 << 40}],
                          data_bytes=8), b"\0" * 8), "run past"),  # checked before any allocation
    (_with_header(_header([{"dtype": "float32", "shape": [0, 1 << 40, 1 << 40], "offset": 0, "nbytes": 0}],
                          data_bytes=0)), "shape"),
    (_with_header(_header([{"dtype": "bool", "shape": [8], "offset": 0, "nbytes": 8}]), b"\2" * 8), "bool"),
    (_with_header(_header([], tree={"t": 3}, data_bytes=0)), "tensor 3"),
    (_with_header(_header([], tree={"x": 1}, data_bytes=0)), "tag"),
    (_with_header(_header([], tree=[1, 2], data_bytes=0)), "untagged"),
    (_with_header(_header([], tree={"d": [[1, 2], [1, 3]]}, data_bytes=0)), "repeats key"),
    (_with_header(_header([], tree={"d": [[{"l": []}, 2]]}, data_bytes=0)), "key"),
    (_with_header(_header([], tree={"b": "not base64!"}, data_bytes=0)), "base64"),
    (_with_header({"format": "other"}), "header"),
    (torch.frombuffer(bytearray(packages.MAGIC + struct.pack("<Q", 1 << 62) + b"{}"), dtype=torch.uint8),
     "header length"),
    (torch.frombuffer(bytearray(packages.MAGIC + struct.pack("<Q", 3) + b"\xff\xfe{"), dtype=torch.uint8), "JSON"),
    (torch.frombuffer(bytearray(packages.MAGIC + struct.pack("<Q", 3) + b"NaN"), dtype=torch.uint8), "JSON"),
    (torch.zeros(4, dtype=torch.float32), "uint8"),
])
def test_malformed_packages_raise_package_error(payload, message):
    if message is None:  # the well-formed controls: the checks above are not rejecting everything
        unpack(payload)
        return
    with pytest.raises(PackageError, match=message):
        unpack(payload)


def test_deep_nesting_is_refused_not_a_crash():
    tree = {"l": []}
    for _ in range(packages.MAX_DEPTH + 5):
        tree = {"l": [tree]}
    with pytest.raises(PackageError, match="deeper"):
        unpack(_with_header(_header([], tree=tree, data_bytes=0)))
    h = b"[" * 200_000  # deeper than Python's recursion limit inside json itself
    with pytest.raises(PackageError, match="nested too deeply|JSON"):
        unpack(torch.frombuffer(bytearray(packages.MAGIC + struct.pack("<Q", len(h)) + h), dtype=torch.uint8))
    assert issubclass(PackageError, ValueError)


class _LoopbackTransport:
    """In-memory stand-in for parallel.transport.Transport: what is sent is received, in order."""

    def __init__(self):
        self.queue, self.recv_shapes = [], []

    def send(self, tensor, dst, tag, channel=None):
        self.queue.append(tensor.clone())

    def flush(self):
        pass

    def recv(self, shape, src, tag, channel=None, dtype=None):
        self.recv_shapes.append(tuple(shape))
        t = self.queue.pop(0)
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype
        return t


def test_send_and_recv_package_round_trip_and_refuse_a_garbled_length():
    from kintsugi.recovery.rebuild import MAX_PACKAGE_BYTES, recv_package, send_package
    st, _ = _stage_after_one_step()
    pkg = st.state_dict()
    link = _LoopbackTransport()
    n = send_package(link, pkg, dst=1, tag=10)
    assert_identical(pkg, recv_package(link, src=0, tag=10))
    assert link.recv_shapes == [(1,), (n,)]
    for bad in (-1, 0, MAX_PACKAGE_BYTES + 1):
        link = _LoopbackTransport()
        link.queue.append(torch.tensor([bad], dtype=torch.int64))
        with pytest.raises(PackageError, match="package length"):
            recv_package(link, src=0, tag=10)
        assert link.recv_shapes == [(1,)]  # the payload was never allocated
