"""LISA: the sampler (pure, exact inclusion probabilities), the controller on real StageStates (grads
only where sampled, frozen layers bitwise still, bounded optimizer state, bitwise full training at
gamma = all, continuous lr, exact resume), and the pretrained-checkpoint loader."""
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kintsugi.trainer.config.job import JobConfig, LisaConfig, ParallelConfig, TrainConfig, lr_at
from kintsugi.trainer.runtime.lisa import LisaController, inclusion_probabilities, sample_layers, systematic_sample
from kintsugi.trainer.model.llama import Llama, ModelConfig, cross_entropy_loss, from_hf_state_dict, hf_config
from kintsugi.trainer.model.pretrained import checkpoint_model_config, load_into_stage, save_full_model
from kintsugi.trainer.runtime.stage import StageState

torch.set_num_threads(1)

MODEL = dict(dim=32, n_layers=8, n_heads=2, n_kv_heads=1, vocab_size=64)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _job(stages=1, **train):
    return JobConfig(model=ModelConfig(**MODEL), parallel=ParallelConfig(stages=stages),
                     train=TrainConfig(**{"max_steps": 40, "warmup_steps": 2, **train}))


def _lisa(**kw):
    return LisaConfig(**{"enabled": True, "layers_per_stage": 2, "interval": 2, **kw})


def _step(st, ctrl, step):
    """One single-stage training step on a batch that depends on `step` only (the data position)."""
    if ctrl is not None:
        ctrl.before_step(step)
    st.zero_grad()
    tok = torch.randint(0, MODEL["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1000 + step))
    loss = cross_entropy_loss(st.model(tok[:, :-1]), tok[:, 1:])
    loss.backward()
    sq = st.local_grad_sq()
    st.apply_step(step, sq, sq)
    return loss.item()


def _layers_with_grad(st):
    return sorted({int(n.split(".")[1]) for n, p in st.model.named_parameters()
                   if n.startswith("layers.") and p.grad is not None})


def _layer_state(st, i):
    return [p.detach().clone() for p in st.model.layers[str(i)].parameters()]


# ---- sampler ---------------------------------------------------------------------------------------

def test_sample_layers_is_a_pure_function_agreed_across_processes():
    ids = list(range(4, 12))
    sets = [sample_layers(ids, 3, 7, k, stage=2) for k in range(50)]
    assert sets == [sample_layers(ids, 3, 7, k, stage=2) for k in range(50)]
    assert all(len(s) == 3 and s == sorted(set(s)) and set(s) <= set(ids) for s in sets)
    assert len({tuple(s) for s in sets}) > 10  # it does vary with the interval
    assert sets != [sample_layers(ids, 3, 7, k, stage=1) for k in range(50)]
    assert sets != [sample_layers(ids, 3, 8, k, stage=2) for k in range(50)]
    # replicas agree unless lisa.per_replica
    assert sets == [sample_layers(ids, 3, 7, k, stage=2, replica=1) for k in range(50)]
    assert sets != [sample_layers(ids, 3, 7, k, stage=2, replica=1, per_replica=True) for k in range(50)]
    assert sample_layers(ids, 8, 7, 0, stage=2) == ids  # gamma = all layers
    # uniform: each layer is in the set gamma/N of the time
    counts = np.zeros(12)
    for k in range(4000):
        counts[sample_layers(ids, 3, 0, k, stage=0)] += 1
    assert np.abs(counts[4:] / 4000 - 3 / 8).max() < 5 * math.sqrt((3 / 8) * (5 / 8) / 4000)
    # another process (another interpreter, hash seed, thread count) computes the same sets
    code = ("from kintsugi.trainer.runtime.lisa import sample_layers; "
            "print([sample_layers(range(4, 12), 3, 7, k, stage=2) for k in range(50)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == str(sets)


def test_systematic_sampling_has_exact_inclusion_probabilities():
    weights = np.array([8.0, 5.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.2, 0.0])
    k = 3
    pi = inclusion_probabilities(weights, k)
    assert pi[0] == 1.0 and pi[-1] == 0.0 and abs(pi.sum() - k) < 1e-12
    free = slice(1, 8)  # below the cap pi is proportional to the weights
    np.testing.assert_allclose(pi[free] / weights[free], pi[1] / weights[1])
    rng = np.random.default_rng(0)
    n = 8000
    counts = np.zeros(len(weights))
    for _ in range(n):
        picked = systematic_sample(weights, k, rng)
        assert len(picked) == k == len(set(picked))
        counts[picked] += 1
    tol = 5 * np.sqrt(pi * (1 - pi) / n) + 1e-9
    assert np.all(np.abs(counts / n - pi) <= tol)
    # The pitfall: sequential weighted draws without replacement miss these probabilities by far.
    p = weights / weights.sum()
    naive = np.zeros(len(weights))
    for _ in range(2000):
        naive[rng.choice(len(p), size=k, replace=False, p=p)] += 1
    assert np.abs(naive / 2000 - pi).max() > 0.1  # e.g. the surest unit is drawn only ~86% of the time
    with pytest.raises(ValueError):
        inclusion_probabilities([1.0, 0.0, 0.0], 2)  # fewer positive weights than draws


# ---- controller on a real stage --------------------------------------------------------------------

def test_only_sampled_layers_train_and_frozen_ones_stay_bitwise():
    job = _job()
    assert job.train.weight_decay > 0
    st = StageState(job, 0)
    ctrl = LisaController(_lisa(), st, seed=job.train.seed, replica=0)
    initial = {i: _layer_state(st, i) for i in st.layer_ids}
    ever = set()
    for step in range(12):
        before = {i: _layer_state(st, i) for i in st.layer_ids}
        ctrl.before_step(step)
        expected = sample_layers(st.layer_ids, 2, job.train.seed, step // 2, stage=0)
        assert ctrl.active_layers == expected
        st.zero_grad()
        tok = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(step))
        cross_entropy_loss(st.model(tok[:, :-1]), tok[:, 1:]).backward()
        assert _layers_with_grad(st) == expected
        for name in ("tok_embeddings.weight", "norm.weight", "output.weight"):
            assert st.model.get_parameter(name).grad is not None
        # CheckFree's norm sums only what trained
        trained_sq = sum(float(p.grad.double().pow(2).sum()) for p in st.model.parameters() if p.grad is not None)
        assert st.local_grad_sq() == trained_sq
        sq = st.local_grad_sq()
        st.apply_step(step, sq, sq)
        for i in st.layer_ids:
            after = _layer_state(st, i)
            same = all(torch.equal(a, b) for a, b in zip(before[i], after))
            assert same == (i not in expected), f"layer {i} at step {step}"
        ever |= set(expected)
    for i in ever:  # every layer that was ever sampled has moved
        assert not all(torch.equal(a, b) for a, b in zip(initial[i], _layer_state(st, i)))


def test_freeze_embeddings_trains_only_sampled_layers():
    job = _job()
    st = StageState(job, 0)
    ctrl = LisaController(_lisa(freeze_embeddings=True), st, seed=0, replica=0)
    emb = st.model.tok_embeddings.weight.detach().clone()
    for step in range(3):
        _step(st, ctrl, step)
    assert torch.equal(st.model.tok_embeddings.weight, emb)
    trainable = {n for n, p in st.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layers.") for n in trainable)


def test_middle_stage_passes_activation_gradients_through_frozen_layers():
    job = _job(stages=4)
    st, ref = StageState(job, 1), StageState(job, 1)  # ref: same weights, everything trainable
    assert st.layer_ids == [2, 3] and not (st.is_first or st.is_last)
    ctrl = LisaController(_lisa(layers_per_stage=1), st, seed=0, replica=0)
    ctrl.before_step(0)
    (active,) = ctrl.active_layers
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, 32, generator=gen)
    g = torch.randn(2, 16, 32, generator=gen)
    x, x_ref = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    st.model(x).backward(g)
    ref.model(x_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)  # the previous stage gets the same gradient
    assert _layers_with_grad(st) == [active]
    for n, p in st.model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, ref.model.get_parameter(n).grad)
    assert st.local_grad_sq() == pytest.approx(sum(
        float(p.grad.double().pow(2).sum()) for p in ref.model.layers[str(active)].parameters()), rel=1e-12)


def _param_state_bytes(params):
    # AdamW (foreach=False, not capturable): exp_avg + exp_avg_sq per element, one fp32 step scalar.
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)


@pytest.mark.parametrize("policy", ["reset", "offload", "keep"])
def test_optimizer_state_stays_at_the_active_set_size(policy):
    job = _job()
    st = StageState(job, 0)
    ctrl = LisaController(_lisa(layers_per_stage=1, interval=1, state_policy=policy), st, seed=0, replica=0)
    ends = [p for n, p in st.model.named_parameters() if not n.startswith("layers.")]
    one_layer = list(st.model.layers["0"].parameters())
    bound = _param_state_bytes(ends) + _param_state_bytes(one_layer)
    intervals = math.ceil(2 * 8 / 1 * math.log(8))  # 2 (N/gamma) ln N: past full coverage
    seen, sizes = set(), []
    for step in range(intervals):
        _step(st, ctrl, step)
        seen |= set(ctrl.active_layers)
        sizes.append(ctrl.optimizer_state_bytes())
    assert seen == set(st.layer_ids)  # the run was long enough for every layer to be sampled
    if policy == "keep":  # the public implementations' behaviour: grows back to full fine-tuning
        assert sizes[-1] == _param_state_bytes(st.model.parameters()) > bound
    else:
        assert sizes == [bound] * len(sizes)
    if policy == "offload":
        assert ctrl.offloaded_bytes() == 7 * _param_state_bytes(one_layer)


def test_offloaded_moments_come_back_when_a_layer_is_resampled():
    job = _job()
    st = StageState(job, 0)
    ctrl = LisaController(_lisa(layers_per_stage=1, interval=1, state_policy="offload"), st, seed=0, replica=0)
    last = {}
    for step in range(30):
        ctrl.before_step(step)
        (i,) = ctrl.active_layers
        w = st.model.layers[str(i)].attention.wq.weight
        if i in last:  # re-sampled: the moments it left with are back, not fresh ones
            assert torch.equal(st.optimizer.state[w]["exp_avg"], last[i])
            return
        _step(st, ctrl, step)
        last[i] = st.optimizer.state[w]["exp_avg"].clone()
    pytest.fail("no layer was re-sampled")


def test_gamma_all_layers_reproduces_full_training_bitwise():
    job = _job()
    full, lisa = StageState(job, 0), StageState(job, 0)
    ctrl = LisaController(_lisa(layers_per_stage=8), lisa, seed=0, replica=0)
    losses_full = [_step(full, None, s) for s in range(6)]
    losses_lisa = [_step(lisa, ctrl, s) for s in range(6)]
    assert losses_full == losses_lisa
    for (n, a), b in zip(full.model.state_dict().items(), lisa.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_learning_rate_is_continuous_across_switches():
    job = _job(max_steps=12, warmup_steps=3)
    st = StageState(job, 0)
    ctrl = LisaController(_lisa(interval=2), st, seed=0, replica=0)
    lrs = []
    for step in range(12):
        _step(st, ctrl, step)
        lrs.append({g["lr"] for g in st.optimizer.param_groups})
    assert lrs == [{lr_at(s, job.train)} for s in range(12)]
    assert len(st.optimizer.param_groups) == 2
    assert [g["weight_decay"] for g in st.optimizer.param_groups] == [job.train.weight_decay, 0.0]


@pytest.mark.parametrize("policy,sampling", [("reset", "uniform"), ("offload", "uniform"),
                                             ("keep", "uniform"), ("offload", "importance")])
def test_resume_reproduces_active_sets_and_losses(policy, sampling):
    job = _job()
    cfg = _lisa(interval=3, state_policy=policy, sampling=sampling)
    st = StageState(job, 0)
    ctrl = LisaController(cfg, st, seed=0, replica=0)
    straight = []
    for s in range(12):
        straight.append((_step(st, ctrl, s), ctrl.active_layers))

    st = StageState(job, 0)
    ctrl = LisaController(cfg, st, seed=0, replica=0)
    resumed = [(_step(st, ctrl, s), ctrl.active_layers) for s in range(7)]  # stop mid-interval
    buf = io.BytesIO()
    torch.save({"model": st.model.state_dict(), "optimizer": st.optimizer.state_dict(),
                "lisa": ctrl.state_dict(), "position": 7}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    st = StageState(job, 0)
    ctrl = LisaController(cfg, st, seed=0, replica=0)
    st.model.load_state_dict(ckpt["model"])
    ctrl.load_state_dict(ckpt["lisa"])            # first: rebuilds the optimizer over the active set
    st.optimizer.load_state_dict(ckpt["optimizer"])  # then its moments line up
    resumed += [(_step(st, ctrl, s), ctrl.active_layers) for s in range(ckpt["position"], 12)]
    assert resumed == straight


def test_importance_sampling_prefers_layers_that_move():
    job = _job()
    st = StageState(job, 0)
    ctrl = LisaController(_lisa(layers_per_stage=2, interval=2, sampling="importance"), st, seed=0, replica=0)
    for s in range(24):
        _step(st, ctrl, s)
        assert len(ctrl.active_layers) == 2
    assert set(ctrl._scores) == set(st.layer_ids) and all(v > 0 for v in ctrl._scores.values())
    weights = ctrl._importance_weights(24)
    assert abs(sum(weights.values()) - 1) < 1e-12 and min(weights.values()) >= 0.1 / 8


# ---- pretrained checkpoints ------------------------------------------------------------------------

def test_load_hf_checkpoint_into_stages(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(**{**MODEL, "n_layers": 4})
    hf = transformers.LlamaForCausalLM(hf_config(cfg)).float().eval()
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")  # sharded on purpose
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = from_hf_state_dict(hf.state_dict(), cfg)
    job2 = JobConfig(model=cfg, parallel=ParallelConfig(stages=2))
    for stage in range(2):
        st = StageState(job2, stage)
        names = load_into_stage(st, str(tmp_path))
        assert names == sorted(st.model.state_dict())
        for n, v in st.model.state_dict().items():
            assert torch.equal(v, ours[n]), n
    # the whole model computes what HF computes
    st = StageState(JobConfig(model=cfg, parallel=ParallelConfig(stages=1)), 0)
    load_into_stage(st, str(tmp_path))
    tok = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(st.model(tok), hf(tok).logits, atol=1e-5, rtol=1e-5)
    assert checkpoint_model_config(str(tmp_path), ModelConfig(vocab_size=0)).ffn_dim == cfg.ffn_dim
    wrong = JobConfig(model=ModelConfig(**{**MODEL, "n_layers": 4, "norm_eps": 1e-3}), parallel=ParallelConfig(stages=1))
    with pytest.raises(ValueError, match="model.norm_eps"):
        load_into_stage(StageState(wrong, 0), str(tmp_path))


def test_save_and_load_our_format_into_a_middle_stage(tmp_path):
    cfg = ModelConfig(**MODEL)
    full = Llama(cfg, seed=5)
    save_full_model(full, str(tmp_path))
    st = StageState(JobConfig(model=cfg, parallel=ParallelConfig(stages=4)), 2)
    load_into_stage(st, str(tmp_path))
    ref = full.state_dict()
    assert all(torch.equal(v, ref[n]) for n, v in st.model.state_dict().items())
    assert checkpoint_model_config(str(tmp_path), ModelConfig(dim=8, n_heads=2, n_kv_heads=2)).dim == 32
    with pytest.raises(ValueError, match="whole model"):
        save_full_model(st.model, str(tmp_path / "x"))


def test_lisa_finetune_preset_composes():
    from hydra import compose, initialize_config_dir

    from kintsugi import CONF_DIR
    from kintsugi.trainer.config.store import register, to_job_config

    register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=lisa_finetune"])
    job = to_job_config(cfg)
    assert job.lisa.enabled and job.lisa.layers_per_stage >= 1
