"""Models in and out of real runs.

- export: a real 2-stage run -> `kintsugi export` -> transformers' LlamaForCausalLM computes the same
  logits as Kintsugi's Llama with the exported weights, and those weights ARE the run's: its recorded
  final validation loss is reproduced by the exported model on the same validation batches.
- init_from: a random local Hugging Face Llama (tied embeddings, non-default rope_theta and eps,
  random norm gains so a norm that is not loaded shows) -> a real 2-stage run with model.init_from,
  one step at lr 1e-12 (AdamW moves each weight by about lr, far below the tolerance) -> export ->
  logits equal the original's. This checks the whole path: the entry point takes the architecture
  from the checkpoint, each stage loads only its slice (the tied head comes from the embedding,
  which lives on the other stage), replica 0 writes the final weights, export reassembles them.
  A model-level twin of it (no processes) pins the same property in a second.
"""
import json
import os

import pytest
import torch

from testkit import run_trainer
from kintsugi.trainer.cli.main import main as cli_main
from kintsugi.trainer.config.job import JobConfig, ParallelConfig
from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
from kintsugi.trainer.data.batches import load_tokens, val_batches
from kintsugi.trainer.model.llama import Llama, ModelConfig, cross_entropy_loss, load_hf_pretrained

transformers = pytest.importorskip("transformers")

QUICK = ("experiment=quick", "faults=none", "parallel.stages=2", "parallel.replicas=1")


def _hf_logits(directory, ids):
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def _ours_from(directory):
    cfg, sd = load_hf_pretrained(directory, ModelConfig())
    model = Llama(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def _random_hf_llama(directory, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-6, rope_theta=5e5, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(directory)
    return hf


IDS = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))


@pytest.mark.distributed
def test_exported_run_loads_in_transformers_with_our_logits(tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    _, summary, _ = run_trainer(run_dir, *QUICK, "train.max_steps=3", timeout=180)
    assert cli_main(["export", run_dir, out]) == 0

    ours = _ours_from(out)
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(out, IDS), ours(IDS), atol=1e-5, rtol=1e-5)

    # The exported weights are the trained ones: the run's own final validation loss comes back.
    with open(os.path.join(run_dir, "job.json")) as f:
        job = JobConfig.from_dict(json.load(f))
    corpus = prepare_corpus(job.data)  # the cache the run built; nothing is re-tokenized
    batches = val_batches(load_tokens(corpus.val_path, corpus.dtype), job.data.seq_len, job.train.batch_size,
                          job.train.eval_batches)
    with torch.no_grad():
        val = sum(float(cross_entropy_loss(ours(x), y)) for x, y in batches) / len(batches)
    assert val == pytest.approx(summary["final_val_loss"], abs=1e-4)


@pytest.mark.distributed
def test_init_from_a_hf_directory_reproduces_its_logits(tmp_path):
    src, run_dir, out = str(tmp_path / "src"), str(tmp_path / "run"), str(tmp_path / "hf")
    hf = _random_hf_llama(src)
    with torch.no_grad():
        want = hf(IDS).logits
    _, summary, _ = run_trainer(run_dir, *QUICK, f"model.init_from={src}", "train.max_steps=1",
                                "train.lr=1e-12", "train.warmup_steps=0", timeout=180)
    assert summary["steps"] == 1
    with open(os.path.join(run_dir, "job.json")) as f:
        model = json.load(f)["model"]
    assert (model["dim"], model["n_layers"], model["n_kv_heads"], model["ffn_hidden"], model["rope_theta"],
            model["norm_eps"]) == (64, 4, 2, 96, 5e5, 1e-6), "the architecture comes from the checkpoint"
    assert cli_main(["export", run_dir, out]) == 0
    torch.testing.assert_close(_hf_logits(out, IDS), want, atol=1e-5, rtol=1e-5)


def test_init_from_loads_each_stage_slice(tmp_path):
    """Model level, no processes: two StageStates loaded from a HF directory and run in sequence
    compute the HF model's logits."""
    from kintsugi.trainer.model.pretrained import checkpoint_model_config, load_into_stage
    from kintsugi.trainer.runtime.stage import StageState

    hf = _random_hf_llama(str(tmp_path))
    cfg = checkpoint_model_config(str(tmp_path), ModelConfig(init_from=str(tmp_path)))
    job = JobConfig(model=cfg, parallel=ParallelConfig(stages=2), data=DataConfig(seq_len=64))
    stages = [StageState(job, s) for s in range(2)]
    for st in stages:
        assert load_into_stage(st, str(tmp_path)) == sorted(st.model.state_dict())
    with torch.no_grad():
        logits = stages[1].model(stages[0].model(IDS))
        torch.testing.assert_close(logits, hf(IDS).logits, atol=1e-5, rtol=1e-5)
