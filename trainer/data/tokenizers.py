"""Tokenizers for the corpus cache: a byte-level BPE trained on the corpus (`train_bpe`), a local
Hugging Face tokenizer directory (`load_tokenizer`), and encoding the raw documents the corpus
preparation wrote (NUL-separated UTF-8, `read_docs`) into a token file (`encode_file`)."""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator, List, Tuple

import numpy as np

BPE_EOT = "<|endoftext|>"
_EOT_CANDIDATES = (BPE_EOT, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
_ENCODE_CHUNK = 256

Encoder = Callable[[List[str]], List[List[int]]]


def train_bpe(texts: Iterator[str], vocab_size: int, out_dir: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # Makes the directory loadable as data.tokenizer and by transformers' AutoTokenizer.
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BPE_EOT}, f)


def load_tokenizer(directory: str) -> Tuple[Encoder, int, int]:
    """(encode, vocab_size, eot_id) for a local Hugging Face tokenizer directory."""
    directory = os.path.expanduser(directory)
    eos = None
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            eos = json.load(f).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        eot_id = next((tok.token_to_id(t) for t in (eos, *_EOT_CANDIDATES) if t and tok.token_to_id(t) is not None), None)
        encode: Encoder = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        eot_id = tok.eos_token_id
        encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
        vocab_size = len(tok)
    if eot_id is None:
        raise ValueError(f"data.tokenizer={directory}: has no end-of-text token; set eos_token in its tokenizer_config.json")
    return encode, vocab_size, eot_id


def read_docs(path: str, ends: List[int], max_bytes: int = 1 << 62) -> Iterator[str]:
    data = np.memmap(path, dtype=np.uint8, mode="r") if ends else []
    start = 0
    for end in ends:
        if start >= max_bytes:
            return
        yield bytes(data[start:end]).decode("utf-8")
        start = end + 1  # skip the NUL separator


def encode_file(src: str, ends: List[int], encode: Encoder, eot_id: int, dtype: np.dtype, dst: str) -> None:
    docs = read_docs(src, ends)
    with open(dst, "wb") as f:
        while chunk := [d for _, d in zip(range(_ENCODE_CHUNK), docs)]:
            for ids in encode(chunk):
                f.write(np.asarray(list(ids) + [eot_id], dtype=dtype).tobytes())
