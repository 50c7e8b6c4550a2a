"""The pipeline computes exactly what one process would: same loss and gradients as the
single-process model (2 and 4 stages, GPipe and 1F1B), and the same loss curve end to end."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from testkit import commits, run_trainer
from kintsugi.parallel.schedules import StageExecutor, actions_for, routes_for, swapped_route, plain_route
from kintsugi.parallel.topology import per_stage_layers
from kintsugi.parallel.transport import Transport
from kintsugi.trainer.config.job import JobConfig, ParallelConfig, TrainConfig
from kintsugi.trainer.data.corpus import DataConfig
from kintsugi.trainer.model.llama import Llama, ModelConfig, cross_entropy_loss
from kintsugi.trainer.runtime.stage import StageState

pytestmark = pytest.mark.distributed

MODEL = dict(dim=32, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32)


def _job(stages, schedule):
    return JobConfig(model=ModelConfig(**MODEL), parallel=ParallelConfig(stages=stages, schedule=schedule),
                     train=TrainConfig(batch_size=8, microbatches=4), data=DataConfig(seq_len=16))


def _batch():
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, MODEL["vocab_size"], (8, 17), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _stage_proc(rank, world, schedule, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    job = _job(world, schedule)
    st = StageState(job, rank)
    inputs, targets = _batch()
    routes = routes_for(world, 4, alternate=False)
    ex = StageExecutor(st.model, rank, world, Transport(), lambda s: s, MODEL["dim"], cross_entropy_loss)
    loss = ex.run(inputs, targets, routes, actions_for(schedule, rank, world, routes))
    grads = {n: p.grad.clone() for n, p in st.model.named_parameters()}
    torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"stage{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("stages,schedule", [(2, "gpipe"), (2, "1f1b"), (4, "gpipe"), (4, "1f1b")])
def test_stage_gradients_match_single_process(tmp_path, stages, schedule):
    mp.start_processes(_stage_proc, args=(stages, schedule, str(tmp_path / "store"), str(tmp_path)),
                       nprocs=stages, start_method="spawn", join=True)
    full = Llama(ModelConfig(**MODEL), seed=0)
    inputs, targets = _batch()
    # The batch mean equals the mean of equal-sized microbatch means.
    loss = cross_entropy_loss(full(inputs), targets)
    loss.backward()
    got = {}
    pipe_loss = None
    for s in range(stages):
        rec = torch.load(tmp_path / f"stage{s}.pt")
        got.update(rec["grads"])
        if rec["loss"] is not None:
            pipe_loss = rec["loss"]
    assert abs(pipe_loss - loss.item()) < 1e-5
    names = {n for n, _ in full.named_parameters()}
    assert names == set(got), "every parameter lives on exactly one stage"
    for n, p in full.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=0, msg=n)


def test_partition_and_routes():
    assert per_stage_layers(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    parts = per_stage_layers(10, 4)
    assert [len(p) for p in parts] == [2, 3, 3, 2]  # extra layers go to the middle stages
    assert per_stage_layers(6, 3, [1, 2, 3]) == [[0], [1, 2], [3, 4, 5]]
    # CheckFree+ odd route: E, S2, S1, S3, ..., S_n, S_{n-1}, E^-1 for several stage counts
    for S in (2, 4, 5, 6, 8):
        route = swapped_route(S)
        layer_order = [h.stage for h in route if "layers" in h.parts]
        expect = list(range(S))
        expect[0], expect[1] = expect[1], expect[0]
        if S >= 4:
            expect[-1], expect[-2] = expect[-2], expect[-1]
        assert layer_order == expect
        assert "embed" in route[0].parts and route[0].stage == 0
        assert "head" in route[-1].parts and route[-1].stage == S - 1
    assert [h.stage for h in plain_route(3)] == [0, 1, 2]


@pytest.mark.slow  # long; the default run stays near 20 minutes on 2 cores
def test_training_curve_matches_single_process(tmp_path):
    """End to end through the launcher, coordinator and workers: a 4-stage GPipe run and a 2-stage
    1F1B run follow the 1-stage run's loss curve (fp32, 1e-5)."""
    common = ["experiment=quick", "train.max_steps=4", "train.microbatches=2", "train.batch_size=4",
              "data.seq_len=32", "model.n_layers=4", "model.dim=32", "recovery.strategy=none"]
    _, s1, r1 = run_trainer(tmp_path / "s1", "parallel=single", *common)
    _, s4, r4 = run_trainer(tmp_path / "s4", "parallel.stages=4", "parallel.schedule=gpipe", *common)
    _, s2, r2 = run_trainer(tmp_path / "s2", "parallel.stages=2", "parallel.schedule=1f1b", *common)
    l1 = [c["loss"] for c in commits(r1)]
    assert len(l1) == 4
    for other in (r4, r2):
        lo = [c["loss"] for c in commits(other)]
        assert len(lo) == 4
        for a, b in zip(l1, lo):
            assert abs(a - b) < 1e-5, (l1, lo)
    assert abs(s1["final_val_loss"] - s4["final_val_loss"]) < 1e-5
    assert l1[-1] < l1[0]


def _alt_proc(rank, world, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    inputs, targets = _batch()
    routes = routes_for(world, 4, alternate=True)
    out = {}
    for schedule in ("gpipe", "1f1b"):
        st = StageState(_job(world, schedule), rank)
        ex = StageExecutor(st.model, rank, world, Transport(), lambda s: s, MODEL["dim"], cross_entropy_loss)
        loss = ex.run(inputs, targets, routes, actions_for(schedule, rank, world, routes))
        out[schedule] = {"loss": loss, "grads": {n: p.grad.clone() for n, p in st.model.named_parameters()}}
    torch.save(out, os.path.join(out_dir, f"alt{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("stages", [2, 4])
def test_1f1b_on_checkfree_plus_routes_matches_gpipe(tmp_path, stages):
    """CheckFree+ alternates the route per microbatch; 1F1B then runs a simulated schedule that
    interleaves forwards and backwards yet computes exactly what GPipe computes on those routes."""
    routes = routes_for(stages, 4, alternate=True)
    first = actions_for("1f1b", 0, stages, routes)
    assert first.index(("B", 0, 0)) < max(i for i, a in enumerate(first) if a[0] == "F"), "1F1B interleaves"
    mp.start_processes(_alt_proc, args=(stages, str(tmp_path / "store"), str(tmp_path)), nprocs=stages,
                       start_method="spawn", join=True)
    for s in range(stages):
        rec = torch.load(tmp_path / f"alt{s}.pt")
        if rec["gpipe"]["loss"] is not None:
            assert abs(rec["gpipe"]["loss"] - rec["1f1b"]["loss"]) < 1e-6
        for n, g in rec["gpipe"]["grads"].items():
            torch.testing.assert_close(rec["1f1b"]["grads"][n], g, atol=1e-6, rtol=0, msg=n)
