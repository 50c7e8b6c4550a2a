"""Operator mistakes found in what a job reads, each through the real CLI as a user makes it: one line
naming the key or file and the fix, exit 2, no traceback, before any process starts (no job.json,
no metrics in the run directory) and nothing changed on disk (the token cache, the model folder).

- a timeout that is not a finite, sane number of seconds (inf crashed the coordinator at start),
  a negative checkpoint interval or count;
- a corpus that cannot be read: only binary files, a bad JSON line, a binary file named .json;
- a model.init_from that is not a usable checkpoint: missing, a file, a folder without a model, a
  truncated safetensors file, a config.json without num_attention_heads, weights of another model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from testkit import ROOT

pytestmark = pytest.mark.distributed  # real CLI processes (a few seconds each)


def _cli(tmp_path, *overrides):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer", "experiment=quick", "parallel.stages=2", "logger=quiet",
                           f"hydra.run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    errors = [l for l in out.splitlines() if l.startswith("kintsugi: config error:")]
    assert proc.returncode == 2, out[-3000:]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    # Nothing started: a launcher writes job.json first, the coordinator metrics.jsonl.
    assert not (run_dir / "job.json").exists() and not (run_dir / "metrics.jsonl").exists()
    return errors[0]


@pytest.mark.parametrize("override,needle", [
    ("recovery.init_timeout_s=inf", "recovery.init_timeout_s=inf must be a finite number of seconds"),
    ("recovery.init_timeout_s=1e30", "recovery.init_timeout_s=1e+30 must be a finite number of seconds"),
    ("recovery.coordinator_wait_s=172800", "at most 86400"),
    ("launcher.start_timeout_s=nan", "launcher.start_timeout_s=nan must be a finite number"),
    ("recovery.checkpoint_every=-1", "recovery.checkpoint_every=-1 must be >= 0"),
    ("recovery.keep_checkpoints=-2", "recovery.keep_checkpoints=-2 must be >= 0"),
])
def test_timeouts_and_checkpoint_counts_must_be_sane(tmp_path, override, needle):
    assert needle in _cli(tmp_path, override)


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, n), folder) for r, _, ns in os.walk(folder) for n in ns)


def test_a_corpus_of_binary_files_names_them(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.bin").write_bytes(bytes(range(256)) * 20)
    (corpus / "notes.txt").write_bytes(b"\xff\xfe\x00\x81" * 300)
    line = _cli(tmp_path, "data.source=files", f"data.paths=[{corpus}]")
    assert "found 0 non-empty document(s)" in line and "2 not UTF-8 (a.bin, notes.txt)" in line
    assert "add UTF-8 text files" in line
    assert _files(tmp_path / "cache") == [], "a half-built token cache was left behind"


@pytest.mark.parametrize("name,content,needle", [
    ("data.jsonl", b'{"text": "one document"}\n{"text": "two"}\n{"text": broken\n', "JSON parse error"),
    ("blob.json", bytes(range(256)) * 8, "cannot be read as json"),
])
def test_an_unparsable_json_file_is_named(tmp_path, name, content, needle):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("a plain text document\n" * 50)
    (corpus / name).write_bytes(content)
    line = _cli(tmp_path, "data.source=files", f"data.paths=[{corpus}]")
    assert str(corpus / name) in line and needle in line and "data.format=text" in line
    assert _files(tmp_path / "cache") == []


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A real model of the quick job's architecture, saved as `kintsugi export` / save_full_model do."""
    from kintsugi.trainer.cli.compose import compose_job
    from kintsugi.trainer.model.llama import Llama
    from kintsugi.trainer.model.pretrained import save_full_model
    job, _ = compose_job(["experiment=quick"])
    job.model.vocab_size = 256
    folder = tmp_path_factory.mktemp("model")
    save_full_model(Llama(job.model), str(folder))
    return folder


def _hf_config(folder, **drop):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 8, "num_attention_heads": 4,
           "num_key_value_heads": 4, "vocab_size": 256, "intermediate_size": 176}
    for k in drop:
        cfg.pop(k)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_a_model_folder_that_is_not_usable_is_named(tmp_path, saved_model):
    missing = tmp_path / "no-such-model"
    assert "does not exist" in _cli(tmp_path, f"model.init_from={missing}")
    weights = saved_model / "model.safetensors"
    assert "is a file" in _cli(tmp_path, f"model.init_from={weights}")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("not a model")
    assert "neither kintsugi_model.json nor config.json" in _cli(tmp_path, f"model.init_from={empty}")

    headless = _hf_config(tmp_path / "headless", num_attention_heads=None)
    line = _cli(tmp_path, f"model.init_from={headless}")
    assert f"{headless}/config.json has no (integer) num_attention_heads" in line

    # A download cut short: the first half of the weights.
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "kintsugi_model.json").write_bytes((saved_model / "kintsugi_model.json").read_bytes())
    data = weights.read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = _files(truncated)
    line = _cli(tmp_path, f"model.init_from={truncated}")
    assert f"{truncated}/model.safetensors is not a readable safetensors file" in line and "copy it again" in line
    assert _files(truncated) == before and len((truncated / "model.safetensors").read_bytes()) == len(data) // 2

    # Weights of something else under a matching config.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "kintsugi_model.json").write_bytes((saved_model / "kintsugi_model.json").read_bytes())
    from safetensors.torch import save_file
    save_file({"classifier.weight": torch.zeros(3, 3)}, str(foreign / "model.safetensors"))
    assert "the checkpoint lacks 75 of the model's 75 tensors" in _cli(tmp_path, f"model.init_from={foreign}")
