"""Data: corpus split and cache, tokenizers, sharded deterministic batches, config errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from kintsugi.trainer.data.corpus import CorpusInfo, DataConfig, prepare_corpus, validate_data_config
from kintsugi.trainer.data.batches import ShardedBatches, load_tokens, val_batches

torch.set_num_threads(1)


def _corpus(root, num_files=40):
    """Text files whose every line names the file, so a token range can be traced to its file."""
    os.makedirs(root, exist_ok=True)
    for i in range(num_files):
        sub = os.path.join(root, f"d{i % 3}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:03d}.txt"), "w") as f:
            f.write("".join(f"file{i:03d} line {j} the quick brown fox\n" for j in range(20 + i)))
    return root


def _files_cfg(tmp_path, **kw):
    return DataConfig(**{**dict(source="files", paths=[str(tmp_path / "corpus")], cache_dir=str(tmp_path / "cache"),
                                val_fraction=0.2, seq_len=16), **kw})


def _docs(path, dtype=np.uint8):
    data = load_tokens(path, dtype).tobytes()
    return [d.decode() for d in data.split(b"\0") if d]


def _names(docs):
    return {d[:7] for d in docs}


def test_split_by_file_is_deterministic_and_cached(tmp_path):
    _corpus(tmp_path / "corpus")
    cfg = _files_cfg(tmp_path)
    info = prepare_corpus(cfg)
    assert info.dtype == np.uint8 and info.vocab_size == 256 and info.eot_id == 0
    assert info.num_files == 40 and info.skipped_files == 0
    train, val = _docs(info.train_path), _docs(info.val_path)
    assert len(train) + len(val) == 40 and val and train
    # whole files on one side only: each document is exactly one file, untouched
    assert not _names(train) & _names(val)
    for doc in train + val:
        assert len(set(line.split()[0] for line in doc.splitlines())) == 1
    assert info.num_train_tokens == sum(len(d) + 1 for d in train)
    with open(os.path.join(os.path.dirname(info.val_path), "val_keys.txt")) as f:
        assert {os.path.basename(k)[1:4] for k in f.read().split()} == {n[4:] for n in _names(val)}

    # second call: same key, no rewrite
    mtime = os.stat(info.train_path).st_mtime_ns
    again = prepare_corpus(cfg)
    assert again == info and os.stat(info.train_path).st_mtime_ns == mtime
    # a fresh cache gives the same split; another split_seed gives another one
    other = prepare_corpus(_files_cfg(tmp_path, cache_dir=str(tmp_path / "cache2")))
    assert _names(_docs(other.val_path)) == _names(val)
    reseeded = prepare_corpus(_files_cfg(tmp_path, split_seed=1))
    assert reseeded.cache_key != info.cache_key and _names(_docs(reseeded.val_path)) != _names(val)
    # a changed file invalidates the cache
    with open(tmp_path / "corpus" / "d0" / "f000.txt", "a") as f:
        f.write("more\n")
    assert prepare_corpus(cfg).cache_key != info.cache_key


def test_non_utf8_file_is_skipped_and_counted(tmp_path):
    _corpus(tmp_path / "corpus", 6)
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"caf\xe9 latin-1\n")
    info = prepare_corpus(_files_cfg(tmp_path))
    assert info.skipped_files == 1 and info.num_files == 6
    meta = json.loads(open(os.path.join(os.path.dirname(info.train_path), "meta.json")).read())
    assert meta["skipped"] == ["bad.txt"]


def test_val_never_empty_and_tiny_corpus_rejected(tmp_path):
    _corpus(tmp_path / "corpus", 3)
    info = prepare_corpus(_files_cfg(tmp_path, val_fraction=1e-9))
    assert len(_docs(info.val_path)) == 1 and len(_docs(info.train_path)) == 2
    info = prepare_corpus(_files_cfg(tmp_path, val_fraction=1 - 1e-9))
    assert len(_docs(info.train_path)) == 1
    with pytest.raises(ValueError, match=r"^data\.paths=.*need at least 2"):
        prepare_corpus(_files_cfg(tmp_path, max_files=1))
    assert not [p for p in os.listdir(tmp_path / "cache") if ".tmp-" in p]  # failed builds leave nothing


def test_stdlib_subset(tmp_path):
    cfg = DataConfig(max_files=200, cache_dir=str(tmp_path), seq_len=64)
    info = prepare_corpus(cfg)
    assert info.num_files + info.skipped_files == 200 and info.num_val_tokens > 0
    assert info.dtype == np.uint8
    train = load_tokens(info.train_path, info.dtype)
    assert len(train) == info.num_train_tokens and b"import" in train[:200000].tobytes()
    assert prepare_corpus(cfg) == info


def test_jsonl_and_parquet_through_datasets(tmp_path):
    pd = pytest.importorskip("pandas")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "a.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"body": f"jsonl record {i}", "id": i}) + "\n")
    pd.DataFrame({"body": [f"parquet record {i}" for i in range(30)]}).to_parquet(corpus / "b.parquet")
    info = prepare_corpus(_files_cfg(tmp_path, text_field="body"))
    docs = _docs(info.train_path) + _docs(info.val_path)
    assert info.num_files == 2 and len(docs) == 60
    assert {d for d in docs if d.startswith("parquet")} == {f"parquet record {i}" for i in range(30)}
    assert _docs(info.val_path)  # records are documents: a single jsonl file still splits
    with pytest.raises(ValueError, match=r"^data\.text_field=text: missing"):
        prepare_corpus(_files_cfg(tmp_path, paths=[str(corpus / "a.jsonl")]))


def test_bpe_trains_caches_and_reloads_as_tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer

    _corpus(tmp_path / "corpus", 20)
    info = prepare_corpus(_files_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=300))
    assert 257 < info.vocab_size <= 300 and info.dtype == np.uint16
    tok = Tokenizer.from_file(os.path.join(info.tokenizer_path, "tokenizer.json"))
    assert tok.id_to_token(info.eot_id) == "<|endoftext|>"
    train = load_tokens(info.train_path, info.dtype)
    first = train[:int(np.argmax(train == info.eot_id))].tolist()
    assert tok.decode(first).startswith("file") and info.num_train_tokens < 0.6 * sum(
        len(d) for d in _docs(prepare_corpus(_files_cfg(tmp_path)).train_path))  # merges compress
    assert prepare_corpus(_files_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=300)) == info

    hf_dir = tmp_path / "my_tokenizer"
    hf_dir.mkdir()
    shutil.copy(os.path.join(info.tokenizer_path, "tokenizer.json"), hf_dir / "tokenizer.json")
    local = prepare_corpus(_files_cfg(tmp_path, tokenizer=str(hf_dir)))
    assert local.vocab_size == info.vocab_size and local.eot_id == info.eot_id
    assert local.tokenizer_path == str(hf_dir)
    assert np.array_equal(load_tokens(local.train_path, local.dtype), train)


def test_shards_are_disjoint_cover_and_batches_are_pure():
    tokens = np.arange(1000, dtype=np.uint16)
    shards = [ShardedBatches(tokens, seq_len=8, batch_size=4, replica=r, num_replicas=3, seed=5) for r in range(3)]
    ids = [set(s.local_ids.tolist()) for s in shards]
    assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]
    assert set().union(*ids) == set(range((1000 - 1) // 8))
    s = shards[1]
    x, y = s.batch_at(3)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
    assert torch.equal(x[:, 0], torch.tensor(s.batch_ids(3)) * 8)  # window i starts at i*seq_len
    assert all(i % 3 == 1 for k in range(20) for i in s.batch_ids(k))
    epoch0 = [i for k in range(s.batches_per_epoch) for i in s.batch_ids(k)]
    assert len(set(epoch0)) == len(epoch0)  # an epoch visits each sequence at most once
    assert s.batch_ids(s.batches_per_epoch) != s.batch_ids(0)  # next epoch, new order
    # purity: any call order gives the same batch
    fresh = ShardedBatches(tokens, seq_len=8, batch_size=4, replica=1, num_replicas=3, seed=5)
    for k in (50, 3, 0, 50):
        assert torch.equal(fresh.batch_at(k)[0], s.batch_at(k)[0])


def test_cursor_advances_only_on_commit_and_round_trips():
    tokens = np.arange(500, dtype=np.uint8)
    s = ShardedBatches(tokens, seq_len=4, batch_size=2, seed=1)
    first = s.next_batch()
    assert torch.equal(s.next_batch()[0], first[0])  # a retried step sees the same batch
    for _ in range(70):  # crosses an epoch boundary
        s.advance()
    state = s.state_dict()
    restored = ShardedBatches(tokens, seq_len=4, batch_size=2, seed=1)
    restored.load_state_dict(state)
    assert restored.position == 70 and restored.epoch == s.epoch == 70 // s.batches_per_epoch
    assert torch.equal(restored.next_batch()[1], s.next_batch()[1])
    with pytest.raises(ValueError, match="different settings"):
        ShardedBatches(tokens, seq_len=4, batch_size=2, seed=2).load_state_dict(state)


def test_too_few_sequences_and_val_batches():
    with pytest.raises(ValueError, match=r"^data\.seq_len=16: .*batch"):
        ShardedBatches(np.zeros(100, np.uint8), seq_len=16, batch_size=4, replica=1, num_replicas=2)
    tokens = np.arange(1001, dtype=np.uint16)
    batches = val_batches(tokens, seq_len=10, batch_size=8, max_batches=3)
    assert len(batches) == 3 and all(x.shape == (8, 10) for x, _ in batches)
    again = val_batches(tokens, seq_len=10, batch_size=8, max_batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert len(set(starts.tolist())) == 24 and starts.max() >= 900  # spread over the whole split
    assert len(val_batches(tokens, 10, 8, 0)) == 12
    small = val_batches(np.arange(40), seq_len=10, batch_size=8, max_batches=5)
    assert len(small) == 1 and small[0][0].shape == (3, 10)


@pytest.mark.parametrize("kw, key", [
    (dict(source="s3"), "data.source"),
    (dict(format="xml"), "data.format"),
    (dict(tokenizer="/no/such/tokenizer"), "data.tokenizer"),
    (dict(source="files", paths=["/no/such/dir"]), "data.paths"),
    (dict(source="files", paths=[]), "data.paths"),
    (dict(seq_len=1), "data.seq_len"),
    (dict(val_fraction=0.0), "data.val_fraction"),
    (dict(val_fraction=1.5), "data.val_fraction"),
    (dict(tokenizer="bpe", bpe_vocab_size=100), "data.bpe_vocab_size"),
    (dict(source="hf"), "data.hf_name"),
])
def test_bad_configs_raise_one_line_naming_the_key(kw, key):
    with pytest.raises(ValueError) as err:
        validate_data_config(DataConfig(**kw))
    msg = str(err.value)
    assert msg.startswith(key) and "\n" not in msg and ";" in msg


def test_directory_without_files_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^data\.paths=.*no files found"):
        validate_data_config(DataConfig(source="files", paths=[str(tmp_path / "empty")]))


_PREPARE = r"""
import json, logging, sys
from dataclasses import asdict
sys.path.insert(0, sys.argv[1])
from kintsugi.trainer.data.corpus import DataConfig, prepare_corpus
logging.basicConfig(level=logging.INFO, format="%(message)s")
info = prepare_corpus(DataConfig(source="files", paths=[sys.argv[2]], cache_dir=sys.argv[3], val_fraction=0.3, seq_len=8))
print(json.dumps(dict(asdict(info), dtype=str(info.dtype))))
"""


def test_fifo_socket_and_broken_link_are_skipped_unopened(tmp_path):
    import socket
    import subprocess
    import sys
    corpus = tmp_path / "corpus"
    _corpus(corpus, 4)
    (corpus / "real.py").write_text("print('a regular file reached through a link')\n")
    os.symlink(corpus / "real.py", corpus / "link.py")   # followed: a regular file
    os.mkfifo(corpus / "pipe.py")                         # opening it would block until a writer comes
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(corpus / "sock.py"))
    os.symlink(corpus / "gone.py", corpus / "dangling.py")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run([sys.executable, "-c", _PREPARE, root, str(corpus), str(tmp_path / "cache")],
                             capture_output=True, text=True, timeout=60)
    finally:
        sock.close()
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["num_files"] == 6 and info["skipped_files"] == 3  # 4 texts + real.py + link.py
    assert all(r in out.stderr for r in ("3 skipped", "FIFO (pipe.py)", "socket (sock.py)", "broken symlink (dangling.py)"))
    meta = json.load(open(os.path.join(tmp_path, "cache", info["cache_key"], "meta.json")))
    assert meta["skipped_reasons"] == {"pipe.py": "FIFO", "sock.py": "socket", "dangling.py": "broken symlink"}
    assert [n for n in os.listdir(tmp_path / "cache") if "tmp" in n] == []
    docs = _docs(os.path.join(tmp_path, "cache", info["cache_key"], "train.bin")) + \
        _docs(os.path.join(tmp_path, "cache", info["cache_key"], "val.bin"))
    assert sum("reached through a link" in d for d in docs) == 2


def test_a_failure_mid_preparation_leaves_no_temporary_files(tmp_path, monkeypatch):
    import kintsugi.trainer.data.corpus as data
    _corpus(tmp_path / "corpus", 10)
    calls = []

    def failing_hash(key, seed):  # the fifth document fails while both split files are open
        calls.append(key)
        if len(calls) == 5:
            raise OSError("disk full")
        return 0.5

    monkeypatch.setattr(data, "_unit_hash", failing_hash)
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus(_files_cfg(tmp_path))
    assert len(calls) == 5 and os.listdir(tmp_path / "cache") == []


def test_a_killed_preparers_leftovers_are_removed(tmp_path):
    import socket
    import subprocess
    import sys
    import kintsugi.trainer.data.corpus as data
    _corpus(tmp_path / "corpus", 6)
    cfg = _files_cfg(tmp_path)
    _, files, _ = data._list_files(cfg)
    key = data._cache_key(cfg, files)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    leftover = cache / f".{key}.tmp-{socket.gethostname()}-{dead.pid}-0000abcd"
    live = cache / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-0000abcd"  # a preparer still at work
    other_host = cache / f".{key}.tmp-elsewhere-{dead.pid}-0000abcd"             # not ours to judge
    for d in (leftover, live, other_host):
        (d / "part").mkdir(parents=True)
    info = prepare_corpus(cfg)
    assert info.num_files == 6
    assert not leftover.exists() and live.exists() and other_host.exists()
