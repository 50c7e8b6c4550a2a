"""Model: parity with Hugging Face Llama, stages as bitwise slices of the full model, config errors."""

import pytest
import torch

from kintsugi.trainer.model.llama import (Llama, ModelConfig, cross_entropy_loss, from_hf_state_dict, hf_config,
                           load_hf_pretrained, num_params, to_hf_state_dict)

torch.set_num_threads(1)

CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


def _tokens(seed=0, b=2, t=16, vocab=97):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _hf_model(cfg):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM._from_config(hf_config(cfg), attn_implementation="eager")
    return hf.float().eval()


def test_matches_hf_llama_both_directions():
    ours = Llama(CFG, seed=3).eval()
    hf = _hf_model(CFG)
    x = _tokens()

    # ours -> HF
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), CFG), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    # HF -> ours, from a differently initialised HF model
    hf2 = _hf_model(CFG)
    with torch.no_grad():
        for p in hf2.parameters():
            p.normal_(0, 0.05)
    fresh = Llama(CFG, seed=99).eval()
    fresh.load_state_dict(from_hf_state_dict(hf2.state_dict(), CFG), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), hf2(x).logits, atol=1e-5, rtol=1e-5)


def test_load_hf_pretrained_from_local_directory(tmp_path):
    hf = _hf_model(CFG)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg, sd = load_hf_pretrained(str(tmp_path), ModelConfig(max_seq_len=32))
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.ffn_dim) == \
        (CFG.dim, CFG.n_layers, CFG.n_heads, CFG.n_kv_heads, CFG.vocab_size, CFG.ffn_dim)
    model = Llama(cfg).eval()
    model.load_state_dict(sd, strict=True)
    x = _tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_stage_chain_is_bitwise_the_full_model():
    full = Llama(CFG, seed=7).eval()
    splits = [[0, 1], [2], [3]]
    stages = [Llama(CFG, layer_ids=ids, has_embedding=i == 0, has_head=i == len(splits) - 1, seed=7).eval()
              for i, ids in enumerate(splits)]
    full_sd = full.state_dict()
    seen = set()
    for stage in stages:
        for name, tensor in stage.state_dict().items():
            assert torch.equal(tensor, full_sd[name]), name
            seen.add(name)
    assert seen == set(full_sd)
    assert "layers.2.attention.wq.weight" in stages[1].state_dict()
    assert sum(num_params(s) for s in stages) == num_params(full)

    x = _tokens(2)
    with torch.no_grad():
        h = x
        for stage in stages:
            h = stage(h)
        assert h.shape == (2, 16, CFG.vocab_size)
        assert torch.equal(h, full(x))


def test_init_depends_on_seed_and_name_only():
    a, b = Llama(CFG, seed=1), Llama(CFG, seed=2)
    assert not torch.equal(a.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)
    # distinct names get distinct draws even with equal shapes
    assert not torch.equal(a.layers["0"].attention.wq.weight, a.layers["1"].attention.wq.weight)
    assert torch.all(a.norm.weight == 1) and torch.all(a.layers["3"].ffn_norm.weight == 1)
    std = a.tok_embeddings.weight.std().item()
    assert abs(std - CFG.init_std) < 0.003
    before = a.output.weight.clone()
    with torch.no_grad():
        a.output.weight.zero_()
    a.reset_parameters(1)
    assert torch.equal(a.output.weight, before)


def test_gqa_shapes_and_ffn_rule():
    cfg = ModelConfig(dim=128, n_heads=8, n_kv_heads=2, vocab_size=10, n_layers=1)
    attn = Llama(cfg).layers["0"].attention
    assert attn.wq.weight.shape == (128, 128)
    assert attn.wk.weight.shape == (32, 128) and attn.wv.weight.shape == (32, 128)
    # LLaMA rule: int(8 * 128 / 3) = 341, rounded up to a multiple of 32
    assert cfg.ffn_dim == 352
    assert ModelConfig(dim=4096, multiple_of=256, n_heads=32, n_kv_heads=32).ffn_dim == 11008
    assert ModelConfig(ffn_hidden=100).ffn_dim == 100
    assert Llama(cfg).layers["0"].feed_forward.w1.weight.shape == (352, 128)


def test_middle_stage_takes_hidden_and_returns_hidden():
    stage = Llama(CFG, layer_ids=[1, 2], has_embedding=False, has_head=False)
    assert not hasattr(stage, "tok_embeddings") and not hasattr(stage, "output")
    h = torch.randn(2, 8, CFG.dim)
    assert stage(h).shape == (2, 8, CFG.dim)


def test_loss_is_mean_fp32_cross_entropy():
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (2, 5))
    loss = cross_entropy_loss(logits, targets)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    ref = -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("kwargs, key", [
    (dict(dim=130, n_heads=4), "model.n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads"),
    (dict(n_layers=0), "model.n_layers"),
    (dict(dim=-8), "model.dim"),
    (dict(vocab_size=-1), "model.vocab_size"),
    (dict(norm_eps=0.0), "model.norm_eps"),
    (dict(dim=12, n_heads=4, n_kv_heads=1), "model.n_heads"),  # odd head dim
])
def test_config_errors_are_one_line_naming_the_key(kwargs, key):
    with pytest.raises(ValueError) as err:
        ModelConfig(**kwargs)
    msg = str(err.value)
    assert msg.startswith(key + "=") and "\n" not in msg and ";" in msg


def test_model_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^model\.vocab_size=0"):
        Llama(ModelConfig())
    with pytest.raises(ValueError, match="layer_ids"):
        Llama(CFG, layer_ids=[4])
    with pytest.raises(ValueError, match="model.max_seq_len"):
        Llama(CFG)(torch.zeros(1, CFG.max_seq_len + 1, dtype=torch.long))


def test_activation_checkpointing_gives_the_same_gradients():
    # Recomputing each block in the backward must not change what is learned: same loss, same
    # gradient for every parameter (to 1e-6), for the full model and for a middle stage.
    x = _tokens(seed=5)
    for layer_ids, embed, head in ((None, True, True), ([1, 2], False, False)):
        grads = []
        for recompute in (False, True):
            m = Llama(CFG, layer_ids, has_embedding=embed, has_head=head, seed=7)
            m.activation_checkpointing = recompute
            inp = x if embed else torch.randn(2, 16, CFG.dim, generator=torch.Generator().manual_seed(1))
            out = m(inp)
            loss = cross_entropy_loss(out, x) if head else out.square().mean()
            loss.backward()
            grads.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        (l0, g0), (l1, g1) = grads
        assert l0 == pytest.approx(l1, abs=1e-6)
        assert g0.keys() == g1.keys() and g0
        for n in g0:
            assert (g0[n] - g1[n]).abs().max().item() <= 1e-6, n


def test_activation_checkpointing_keeps_fewer_activations():
    # What it is for: autograd holds only each block's input, not its intermediates. Counted as the
    # bytes of tensors saved for the backward (torch's saved-tensor hooks see every one).
    x = _tokens(seed=5, b=4, t=32)
    saved = {}
    for recompute in (False, True):
        m = Llama(CFG, seed=7)
        m.activation_checkpointing = recompute
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cross_entropy_loss(m(x), x)
        saved[recompute] = total[0]
    assert saved[True] < 0.5 * saved[False], saved
