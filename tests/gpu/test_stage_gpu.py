"""The trainer's CUDA path on a real GPU (skipped without CUDA): a stage's weights, optimizer and
DiLoCo state live on the GPU while what leaves it is CPU tensors; a GPU stage rebuilt on a CPU stage
and back bit for bit; a CUDA stage's checkpoint restored in a process that sees no GPU; the real
launcher training a pipeline of stages that share one GPU over the gloo-staged transport, against
the same run on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from testkit import ROOT, run_trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.timeout(600)]
MODEL = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128)


def _job(**diloco):
    from kintsugi.trainer.config.job import DilocoConfig, JobConfig, ParallelConfig, TrainConfig
    from kintsugi.trainer.model.llama import ModelConfig
    return JobConfig(model=ModelConfig(**MODEL), parallel=ParallelConfig(stages=1),
                     train=TrainConfig(max_steps=4, warmup_steps=1), diloco=DilocoConfig(**diloco))


def _step(st, k, seed=0):
    from kintsugi.trainer.model.llama import cross_entropy_loss
    tok = torch.randint(0, MODEL["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(seed + k))
    tok = tok.to(st.device)
    cross_entropy_loss(st.model(tok[:, :-1]), tok[:, 1:]).backward()
    sq = st.local_grad_sq()
    st.apply_step(k, sq, sq)


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


@pytest.mark.parametrize("offload", [False, True])
def test_a_stage_lives_on_its_gpu_and_sends_cpu_tensors(offload):
    from kintsugi.parallel.diloco import StreamingDiLoCo
    from kintsugi.recovery.checkpoint import snapshot
    from kintsugi.recovery.rebuild import pack, unpack
    from kintsugi.trainer.runtime.stage import StageState
    dev = torch.device("cuda", 0)
    job = _job(enabled=True, sync_every=2, offload=offload)
    st = StageState(job, 0, device=dev)
    diloco = StreamingDiLoCo(dict(st.model.named_parameters()), job.diloco)
    st.attach_diloco(diloco)
    for k in range(2):
        _step(st, k)
    assert all(p.device == dev for p in st.model.parameters())
    state = [v for s in st.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert state and all(v.device == dev for v in state)  # AdamW moments created on the GPU
    globs = [g for f in diloco.fragments for g in f.glob]
    assert all(g.device.type == ("cpu" if offload else "cuda") for g in globs)
    for name, obj in {"source_package": st.source_package(), "end_params": st.end_params(),
                      "checkpoint": snapshot(st, 1), "package": unpack(pack(st.state_dict()))}.items():
        tensors = list(_tensors(obj))
        assert tensors and all(t.device.type == "cpu" for t in tensors), name


def test_a_gpu_stage_is_rebuilt_on_a_cpu_stage_and_back_exactly():
    from kintsugi.recovery.rebuild import pack, unpack
    from kintsugi.trainer.runtime.stage import StageState
    gpu = StageState(_job(), 0, device="cuda")
    for k in range(3):
        _step(gpu, k)
    cpu = StageState(_job(), 0, seed_offset=1)
    cpu.load_state_dict(unpack(pack(gpu.state_dict())), "handoff")  # the package a handoff sends
    for (n, a), (_, b) in zip(gpu.model.state_dict().items(), cpu.model.state_dict().items()):
        assert torch.equal(a.cpu(), b), n
    _step(cpu, 3)
    back = StageState(_job(), 0, seed_offset=2, device="cuda")
    back.load_state_dict(unpack(pack(cpu.state_dict())), "handoff")
    assert all(p.device.type == "cuda" for p in back.model.parameters())
    for (n, a), (_, b) in zip(cpu.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b.cpu()), n
    moments = [v for s in back.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(v.device.type == "cuda" for v in moments)  # load_state_dict moved them


def test_a_cuda_stage_checkpoint_restores_in_a_process_that_sees_no_gpu(tmp_path):
    from kintsugi.recovery.checkpoint import snapshot, write_snapshot
    from kintsugi.trainer.runtime.stage import StageState
    gpu = StageState(_job(), 0, device="cuda")
    for k in range(2):
        _step(gpu, k)
    path = str(tmp_path / "ckpt")
    write_snapshot(snapshot(gpu, 1), path)
    torch.save({k: v.cpu() for k, v in gpu.model.state_dict().items()}, tmp_path / "want.pt")
    code = f'''
import sys, torch
assert not torch.cuda.is_available()
from kintsugi.recovery.checkpoint import restore, read_snapshot
from kintsugi.trainer.config.job import JobConfig, ParallelConfig, TrainConfig
from kintsugi.trainer.model.llama import ModelConfig
from kintsugi.trainer.runtime.stage import StageState
job = JobConfig(model=ModelConfig(**{MODEL!r}), parallel=ParallelConfig(stages=1), train=TrainConfig(max_steps=4, warmup_steps=1))
st = StageState(job, 0, seed_offset=5)
st.load_state_dict(read_snapshot(sys.argv[1]), "checkpoint")
want = torch.load(sys.argv[2])
bad = [k for k, v in st.model.state_dict().items() if not torch.equal(v, want[k])]
print("BAD", bad) if bad else print("OK", st.step_done)
'''
    proc = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "want.pt")], cwd=ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "OK 1", proc.stdout


def _commits(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r and r.get("replica") == 0 and "event" not in r}


def test_the_launcher_trains_stages_sharing_one_gpu_like_the_cpu(tmp_path):
    common = ("experiment=quick", "parallel.stages=2", "train.max_steps=4", "faults=none")
    _, gpu_summary, gpu_records = run_trainer(tmp_path / "gpu", *common, "train.device=cuda",
                                              "train.seed=0", timeout=400)
    _, cpu_summary, cpu_records = run_trainer(tmp_path / "cpu", *common, "train.device=cpu", "train.seed=0",
                                              timeout=400)
    placed = [r["event"] for r in gpu_records if isinstance(r.get("event"), dict) and r["event"].get("kind") == "device"]
    assert len(placed) == 2 and all(e["device"].startswith("cuda:0 ") for e in placed), placed
    assert gpu_summary["config"]["device"].startswith("cuda:0 ") and cpu_summary["config"]["device"] == "cpu"
    g, c = _commits(gpu_records), _commits(cpu_records)
    assert sorted(g) == sorted(c) == [0, 1, 2, 3]
    for k in c:
        assert abs(g[k] - c[k]) / abs(c[k]) < 0.02, (k, g[k], c[k])
    print(json.dumps({"gpu_losses": g, "cpu_losses": c}))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per stage process")
def test_nccl_data_plane_trains_like_the_gloo_staged_one(tmp_path):
    common = ("experiment=quick", "parallel.stages=2", "train.max_steps=4", "faults=none", "train.device=cuda")
    _, nccl_summary, nccl = run_trainer(tmp_path / "nccl", *common, "parallel.backend=nccl", timeout=400)
    _, _, gloo = run_trainer(tmp_path / "gloo", *common, "parallel.backend=gloo", timeout=400)
    n, g = _commits(nccl), _commits(gloo)
    assert sorted(n) == sorted(g) == [0, 1, 2, 3]
    for k in g:  # the same bytes cross either way; attention backward kernels may add in any order
        assert abs(n[k] - g[k]) / abs(g[k]) < 1e-3, (k, n[k], g[k])
    placed = [r["event"]["device"] for r in nccl if isinstance(r.get("event"), dict)
              and r["event"].get("kind") == "device"]
    assert sorted(d.split(" ")[0] for d in placed) == ["cuda:0", "cuda:1"]  # one GPU per stage process
    assert nccl_summary["bytes"]["p2p"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="2 NCCL stages and a spare need 3 GPUs")
def test_nccl_cell_survives_a_killed_stage_and_rebuilds_it(tmp_path):
    _, summary, records = run_trainer(
        tmp_path / "run", "experiment=quick", "parallel.stages=2", "train.max_steps=8", "train.device=cuda",
        "parallel.backend=nccl", "faults.spares=1", "recovery.p2p_deadline_s=20",
        "faults.schedule=[{step: 3, replica: 0, stage: 1, kind: kill}]", timeout=500)
    assert summary["steps"] == 8 and summary["failures"] >= 1
    assert [(rb["slot"], rb["step"]) for rb in summary["rebuilds"]] == [([0, 1], 3)], summary["rebuilds"]
    assert sorted(_commits(records)) == list(range(8))
