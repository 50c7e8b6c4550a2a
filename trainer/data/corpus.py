"""Corpus preparation, tokenizers and the on-disk token cache.

`prepare_corpus` runs once, in the launcher, before any worker starts: it splits the documents into
train/val by a hash of each document's key, tokenizes, and writes `train.bin`, `val.bin` and
`meta.json` under `cache_dir/<cache_key>/`. Workers only memmap those files (`load_tokens`).

Only regular files are read (symlinks are followed to regular files only): a FIFO, socket, device
or broken symlink in a corpus directory is skipped without being opened (opening a FIFO blocks
until a writer comes) and counted, with its reason, in the skipped figure and `meta.json`.

An end-of-text token follows every document. The byte tokenizer keeps vocab 256 (one byte per
cached token) and uses byte 0 (NUL), which text files do not contain, as end-of-text; BPE uses
`<|endoftext|>`, a Hugging Face tokenizer its eos token.

The tokenizers (byte-level BPE training, local Hugging Face tokenizers) are trainer.data.tokenizers;
reading the cached tokens in batches is trainer.data.batches.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import sysconfig
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from kintsugi.trainer.data.tokenizers import encode_file, load_tokenizer, read_docs, train_bpe

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "files", "hf")
FORMATS = ("auto", "text", "json", "jsonl", "parquet")
BYTE_EOT = 0
_CACHE_VERSION = 1
_BPE_TRAIN_BYTES = 256 << 20  # BPE merges stabilise long before this; bounds training time


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | files | hf
    paths: List[str] = field(default_factory=list)  # files, directories or globs for source=files
    format: str = "auto"  # auto | text | json | jsonl | parquet (auto: by extension)
    text_field: str = "text"
    hf_name: Optional[str] = None  # a hub dataset name, only where a hub is reachable (source=hf)
    tokenizer: str = "byte"  # byte | bpe | path to a local Hugging Face tokenizer directory
    bpe_vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.02  # fraction of documents held out, chosen by hash
    split_seed: int = 0
    max_files: int = 0  # 0 = all; else the first N files after a deterministic sort
    cache_dir: str = "~/.cache/kintsugi"


@dataclass
class CorpusInfo:
    train_path: str
    val_path: str
    vocab_size: int
    dtype: np.dtype
    num_train_tokens: int
    num_val_tokens: int
    num_files: int  # files (or hf records) read successfully
    skipped_files: int  # files skipped: not UTF-8, or not regular files (FIFO, socket, device, broken link)
    cache_key: str
    eot_id: int = BYTE_EOT
    tokenizer_path: Optional[str] = None  # directory usable as data.tokenizer; None for bytes


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---- configuration and file listing ---------------------------------------------------------

def validate_data_config(cfg: DataConfig) -> None:
    """Cheap checks (no reading, no tokenization); each error is one line naming key and fix."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source}: unknown; use one of {', '.join(SOURCES)}")
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format={cfg.format}: unknown; use one of {', '.join(FORMATS)}")
    if cfg.tokenizer not in ("byte", "bpe") and not os.path.isdir(os.path.expanduser(cfg.tokenizer)):
        raise ValueError(f"data.tokenizer={cfg.tokenizer}: neither 'byte', 'bpe' nor an existing tokenizer directory; use byte, bpe or a local path")
    if cfg.tokenizer == "bpe" and cfg.bpe_vocab_size < 258:
        raise ValueError(f"data.bpe_vocab_size={cfg.bpe_vocab_size}: must exceed the 256-byte alphabet plus end-of-text; use >= 258")
    if cfg.seq_len < 2:
        raise ValueError(f"data.seq_len={cfg.seq_len}: must be >= 2; set data.seq_len to e.g. 128")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction}: must be in (0, 1); use e.g. 0.02")
    if cfg.max_files < 0:
        raise ValueError(f"data.max_files={cfg.max_files}: must be >= 0; use 0 for all files")
    if cfg.source == "hf" and not cfg.hf_name:
        raise ValueError("data.hf_name=None: required with data.source=hf; set data.hf_name=<dataset>")
    if cfg.source == "files":
        _list_files(cfg)  # raises on missing paths / no files


def _not_regular(path: str) -> Optional[str]:
    """Why `path` is not a regular file (following symlinks), or None if it is one. Only stats:
    opening a FIFO to look at it would block."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken symlink" if os.path.islink(path) else "vanished"
    except OSError as e:  # a symlink loop, no permission
        return f"cannot stat ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return what
    return "not a regular file"


def _list_files(cfg: DataConfig) -> Tuple[str, List[str], Dict[str, str]]:
    """(root, sorted absolute paths of regular files, {absolute path: why skipped} of the other
    entries found); documents are keyed by their path relative to root."""
    if cfg.source == "stdlib":
        root, tops = sysconfig.get_paths()["stdlib"], None
        skip_dirs = ("site-packages", "dist-packages", "__pycache__")
    else:
        if not cfg.paths:
            raise ValueError("data.paths=[]: empty but data.source=files; list files, directories or globs")
        tops = []
        for raw in cfg.paths:
            path = os.path.expanduser(str(raw))
            found = [path] if os.path.exists(path) else glob.glob(path, recursive=True)
            if not found:
                raise ValueError(f"data.paths={raw} does not exist; give existing files, directories or globs")
            tops += found
    files = []
    for top in tops or [root]:
        if not os.path.isdir(top):
            files.append(os.path.abspath(top))
        for dirpath, dirnames, filenames in os.walk(top):
            if tops is None:
                dirnames[:] = [d for d in dirnames if d not in skip_dirs]
                files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
            else:  # hidden entries are VCS metadata and editor droppings, not corpus
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                files += [os.path.abspath(os.path.join(dirpath, f)) for f in filenames if not f.startswith(".")]
    files = sorted(set(files))
    skipped = {f: why for f in files if (why := _not_regular(f)) is not None}
    files = [f for f in files if f not in skipped]
    if not files:
        why = f" ({len(skipped)} skipped{_why_skipped(skipped)})" if skipped else ""
        raise ValueError(f"data.paths={list(cfg.paths)}: no files found{why}; point it at non-empty directories or files")
    if tops is not None:
        root = os.path.commonpath([os.path.dirname(f) for f in files])
    return root, files[:cfg.max_files or None], skipped


def _format_of(path: str, cfg: DataConfig) -> str:
    if cfg.format != "auto":
        return "json" if cfg.format == "jsonl" else cfg.format
    ext = os.path.splitext(path)[1].lower()
    return {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(ext, "text")


# ---- documents and the train/val split ------------------------------------------------------

def _iter_documents(cfg: DataConfig, root: str, files: List[str], stats: dict) -> Iterator[Tuple[str, bytes]]:
    """Yields (key, utf-8 bytes) per document; a text file is one document, so is a record."""
    if cfg.source == "hf":
        import datasets

        records = datasets.load_dataset(cfg.hf_name, split="train", streaming=True)
        for key, doc in _records(records, cfg, cfg.hf_name, "", limit=cfg.max_files):
            stats["num_files"] += 1  # with no files, max_files and num_files count records
            yield key, doc
        return
    from tqdm import tqdm

    for path in tqdm(files, desc="reading corpus", unit="file", disable=None, leave=False):
        rel = os.path.relpath(path, root)
        fmt = _format_of(path, cfg)
        if fmt != "text":
            stats["num_files"] += 1
            yield from _file_records(cfg, path, fmt, f"{rel}#")
            continue
        raw = _read_regular(path)
        if raw is None:  # replaced by a FIFO or the like since it was listed
            stats["skipped"][rel] = _not_regular(path) or "not a regular file"
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped"][rel] = "not UTF-8"
            continue
        stats["num_files"] += 1
        yield rel, raw


def _read_regular(path: str) -> Optional[bytes]:
    """The file's bytes, or None if it is not a regular file. O_NONBLOCK: opening a FIFO returns at
    once instead of waiting for a writer; fstat then tells what was opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read()


class DataError(ValueError):
    """A corpus file the job cannot read; the message is one line naming the file and the fix."""


def _file_records(cfg: DataConfig, path: str, fmt: str, prefix: str) -> Iterator[Tuple[str, bytes]]:
    """The records of one json / jsonl / parquet file. A file that does not parse (a bad JSON line,
    binary bytes, a truncated parquet) is a DataError naming it, not a reader's traceback."""
    import datasets

    # The reader logs its parse errors itself (twice, through its handler and the root's) before
    # raising: the one line below says it all.
    quiet, level = logging.getLogger("datasets"), logging.getLogger("datasets").level
    quiet.setLevel(logging.CRITICAL)
    try:
        records = datasets.load_dataset(fmt, data_files=path, split="train", streaming=True)
        yield from _records(records, cfg, path, prefix)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise many types for one cause: unparsable
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"data.paths: {path} cannot be read as {cfg.format if cfg.format != 'auto' else fmt} "
                        f"({why}); fix or remove it, or set data.format=text to read every file as plain text") from None
    finally:
        quiet.setLevel(level)


def _records(records, cfg: DataConfig, where: str, prefix: str, limit: int = 0) -> Iterator[Tuple[str, bytes]]:
    for i, rec in enumerate(records):
        if limit and i >= limit:
            return
        if cfg.text_field not in rec:
            raise DataError(f"data.text_field={cfg.text_field}: missing in {where}; use one of {sorted(rec)}")
        if rec[cfg.text_field] is not None:
            yield f"{prefix}{i}", str(rec[cfg.text_field]).encode()


def _unit_hash(key: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def _assign_splits(docs: Iterator[Tuple[str, bytes]], cfg: DataConfig,
                   skipped: Optional[Dict[str, str]] = None) -> Iterator[Tuple[bool, str, bytes]]:
    """Yields (is_val, key, doc). A document is held out iff hash(key) < val_fraction, except that
    neither split may end empty: the train document nearest the threshold is held back until the
    end and moved to val if val would otherwise be empty (and symmetrically for train)."""
    keep = {False: None, True: None}  # split -> (distance from threshold, key, doc)
    count = {False: 0, True: 0}
    for key, doc in docs:
        if not doc:
            continue
        u = _unit_hash(key, cfg.split_seed)
        is_val = u < cfg.val_fraction
        count[is_val] += 1
        cand = (abs(u - cfg.val_fraction), key, doc)
        if keep[is_val] is None or cand[0] < keep[is_val][0]:
            cand, keep[is_val] = keep[is_val], cand
        if cand is not None:
            yield is_val, cand[1], cand[2]
    if count[False] + count[True] < 2:
        where = "the Python stdlib" if cfg.source == "stdlib" else f"data.paths={list(cfg.paths)}"
        why = f" ({len(skipped)} skipped{_why_skipped(skipped)})" if skipped else ""
        raise DataError(f"{where}: found {count[False] + count[True]} non-empty document(s){why}; need at least 2 "
                        "so one can be held out; add UTF-8 text files or raise data.max_files")
    for is_val in (False, True):
        if keep[is_val] is not None:
            moved = count[not is_val] == 0  # the other split is empty
            yield (not is_val) if moved else is_val, keep[is_val][1], keep[is_val][2]


# ---- the cache ------------------------------------------------------------------------------

def _cache_key(cfg: DataConfig, files: List[str]) -> str:
    h = hashlib.sha256()
    settings = dict(v=_CACHE_VERSION, source=cfg.source, format=cfg.format, text_field=cfg.text_field,
                    hf_name=cfg.hf_name, tokenizer=cfg.tokenizer, val_fraction=cfg.val_fraction,
                    split_seed=cfg.split_seed, max_files=cfg.max_files,
                    bpe_vocab_size=cfg.bpe_vocab_size if cfg.tokenizer == "bpe" else None)
    h.update(json.dumps(settings, sort_keys=True).encode())
    if cfg.tokenizer not in ("byte", "bpe"):  # stat, not content: the dir may also hold weights
        tok_dir = os.path.abspath(os.path.expanduser(cfg.tokenizer))
        files = [os.path.join(tok_dir, n) for n in sorted(os.listdir(tok_dir))] + files
    for path in files:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _info_from_meta(directory: str) -> CorpusInfo:
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)["info"]
    meta.update(train_path=os.path.join(directory, "train.bin"), val_path=os.path.join(directory, "val.bin"),
                dtype=np.dtype(meta["dtype"]))
    if meta["tokenizer_path"]:  # relative for a BPE trained into the cache, else absolute
        meta["tokenizer_path"] = os.path.join(directory, meta["tokenizer_path"])
    return CorpusInfo(**meta)


def prepare_corpus(cfg: DataConfig) -> CorpusInfo:
    """Tokenize the corpus into cache_dir/<cache_key>/ once; later calls return the cached files."""
    validate_data_config(cfg)
    root, files, not_regular = _list_files(cfg) if cfg.source != "hf" else ("", [], {})
    key = _cache_key(cfg, files)
    cache_dir = os.path.expanduser(cfg.cache_dir)
    final = os.path.join(cache_dir, key)
    if os.path.isfile(os.path.join(final, "meta.json")):
        log.info("data: reusing token cache %s", final)
        return _info_from_meta(final)
    t0 = time.perf_counter()
    # Built in a private directory and renamed into place, so concurrent preparers never see
    # (or write into) a half-built cache. Any exception removes it (finally); a preparer that was
    # killed leaves it behind, and the next one on this host removes it once its pid is gone.
    _remove_dead_preparers(cache_dir, key)
    tmp = os.path.join(cache_dir, f"{_tmp_prefix(key)}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        skipped = {os.path.relpath(p, root): why for p, why in not_regular.items()}
        _build(cfg, root, files, key, tmp, skipped)
        try:
            os.replace(tmp, final)
        except OSError:  # another preparer finished first; its cache is identical
            if not os.path.isfile(os.path.join(final, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = _info_from_meta(final)
    with open(os.path.join(final, "meta.json")) as f:
        reasons = json.load(f).get("skipped_reasons", {})
    log.info("data: %d files (%d skipped%s) -> %d train / %d val tokens, vocab %d, in %.1fs -> %s",
             info.num_files, info.skipped_files, _why_skipped(reasons), info.num_train_tokens,
             info.num_val_tokens, info.vocab_size, time.perf_counter() - t0, final)
    return info


def _why_skipped(reasons: Dict[str, str]) -> str:
    """': 2 not UTF-8, 1 FIFO (pipe)' with up to three names per reason."""
    by_reason: Dict[str, List[str]] = {}
    for rel, why in sorted(reasons.items()):
        by_reason.setdefault(why, []).append(rel)
    return "".join(f"{', ' if i else ': '}{len(rels)} {why} ({', '.join(rels[:3])}{', ...' if len(rels) > 3 else ''})"
                   for i, (why, rels) in enumerate(sorted(by_reason.items())))


def _tmp_prefix(key: str) -> str:
    return f".{key}.tmp-{socket.gethostname()}-"


def _remove_dead_preparers(cache_dir: str, key: str) -> None:
    prefix = _tmp_prefix(key)
    for name in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
        pid = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            log.info("data: removing %s, left by a preparer that died", name)
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _build(cfg: DataConfig, root: str, files: List[str], key: str, out_dir: str,
           skipped: Optional[Dict[str, str]] = None) -> None:
    # Pass 1 stores raw UTF-8 documents per split (the final files for the byte tokenizer); other
    # tokenizers need the whole train split first (BPE trains on it), then encode from these.
    stats = {"num_files": 0, "skipped": dict(skipped or {})}
    raw = [os.path.join(out_dir, f"{split}.bytes") for split in ("train", "val")]
    ends: List[List[int]] = [[], []]
    val_keys = []
    with open(raw[0], "wb") as f_train, open(raw[1], "wb") as f_val:
        out = (f_train, f_val)
        for is_val, doc_key, doc in _assign_splits(_iter_documents(cfg, root, files, stats), cfg, stats["skipped"]):
            out[is_val].write(doc)
            ends[is_val].append(out[is_val].tell())
            out[is_val].write(bytes([BYTE_EOT]))
            if is_val:
                val_keys.append(doc_key)
    bins = [os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")]
    if cfg.tokenizer == "byte":
        vocab_size, eot_id, tokenizer_path = 256, BYTE_EOT, None
        for src, dst in zip(raw, bins):
            os.replace(src, dst)
    else:
        tokenizer_path = os.path.abspath(os.path.expanduser(cfg.tokenizer))
        if cfg.tokenizer == "bpe":
            tokenizer_path = "tokenizer"  # relative to the cache directory, which moves into place
            train_bpe(read_docs(raw[0], ends[0], _BPE_TRAIN_BYTES), cfg.bpe_vocab_size,
                       os.path.join(out_dir, tokenizer_path))
        encode, vocab_size, eot_id = load_tokenizer(os.path.join(out_dir, tokenizer_path))
        for src, doc_ends, dst in zip(raw, ends, bins):
            encode_file(src, doc_ends, encode, eot_id, token_dtype(vocab_size), dst)
            os.remove(src)
    dtype = token_dtype(vocab_size)
    num_tokens = [os.path.getsize(b) // dtype.itemsize for b in bins]
    info = CorpusInfo(train_path="", val_path="", vocab_size=vocab_size, dtype=dtype,
                      num_train_tokens=num_tokens[0], num_val_tokens=num_tokens[1],
                      num_files=stats["num_files"], skipped_files=len(stats["skipped"]), cache_key=key,
                      eot_id=eot_id, tokenizer_path=tokenizer_path)
    meta = dict(info=dict(asdict(info), dtype=dtype.name), config=asdict(cfg), skipped=sorted(stats["skipped"]),
                skipped_reasons=stats["skipped"])
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out_dir, "val_keys.txt"), "w") as f:
        f.write("".join(k + "\n" for k in val_keys))
