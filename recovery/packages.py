"""State packages without pickle: the one format in which a stage's state travels (rebuilds, handoffs)
and rests (checkpoints, `trainer/checkpoint.py`).

A package is nested dicts / lists / tuples of tensors and plain values (None, bool, int, float, str,
bytes): a model or optimizer state dict, a LISA or DiLoCo state. It is split into

- a JSON header: the structure, every value tagged by type, and a table of the tensors
  (dtype from an allow-list, shape, byte offset, byte count);
- the raw bytes of the tensors, one after another in table order.

Why not torch.save: it pickles, and unpickling a crafted payload runs arbitrary code
(`torch.load(weights_only=True)` narrows that, but still runs an unpickler over bytes from the
network). Reading a package only parses JSON and copies bytes into tensors whose dtype and size the
header declared and the reader checked, so the worst a bad package can do is raise `PackageError`.

Tree encoding (`_enc`): JSON null / true / false / strings and finite numbers stand for themselves
(Python's json writes floats with repr, so they round-trip bit for bit); everything else is a
one-key object: `{"t": i}` tensor i of the table, `{"l": [...]}` list, `{"u": [...]}` tuple,
`{"d": [[key, value], ...]}` dict (keys keep their type, so an optimizer's int keys stay ints),
`{"f": "nan" | "inf" | "-inf"}` a non-finite float, `{"b": "<base64>"}` bytes. A tensor that occurs
twice in the tree is stored once and comes back shared, as with torch.save. Dict subclasses
(OrderedDict) come back as dicts; tensors come back as contiguous CPU tensors without grad.

In-memory layout (`pack` / `unpack`): MAGIC (8 bytes), header length (u64 little-endian), header,
tensor bytes. A checkpoint stores the header and the tensor bytes as two files.
"""
from __future__ import annotations

import base64
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch

MAGIC = b"KTSGPKG1"
FORMAT = "kintsugi-package"
VERSION = 1
MAX_HEADER_BYTES = 1 << 28  # a header is structure only; 256 MiB would describe ~2M tensors
MAX_DEPTH = 64              # real state nests < 10 deep; bounds recursion on crafted input
MAX_NDIM = 32

DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_PREFIX = struct.Struct("<8sQ")


class PackageError(ValueError):
    """A package (received or read back) is malformed: truncated, corrupted or crafted."""


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Header:
    tree: Any
    tensors: List[TensorSpec]
    data_bytes: int


# --- writing -----------------------------------------------------------------------------------------
def encode(obj) -> Tuple[bytes, List[torch.Tensor]]:
    """(header as JSON bytes, tensors in data order as contiguous CPU tensors). Raises TypeError for
    a value the format does not hold, naming where it sits in `obj`."""
    tensors: List[torch.Tensor] = []
    seen: Dict[int, int] = {}
    tree = _enc(obj, tensors, seen, None, 0)
    table, offset = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        table.append({"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": n})
        offset += n
    header = {"format": FORMAT, "version": VERSION, "tree": tree, "tensors": table, "data_bytes": offset}
    return json.dumps(header, allow_nan=False, separators=(",", ":")).encode(), tensors


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous CPU tensor as a 1-D uint8 view (0-d tensors included)."""
    return t.reshape(-1).view(torch.uint8)


def pack(obj) -> torch.Tensor:
    """`obj` as one 1-D uint8 tensor: prefix, header, tensor bytes."""
    header, tensors = encode(obj)
    total = _PREFIX.size + len(header) + sum(t.numel() * t.element_size() for t in tensors)
    out = torch.empty(total, dtype=torch.uint8)
    head = bytearray(_PREFIX.pack(MAGIC, len(header)) + header)
    out[:len(head)].copy_(torch.frombuffer(head, dtype=torch.uint8))
    pos = len(head)
    for t in tensors:
        raw = tensor_bytes(t)
        out[pos:pos + raw.numel()].copy_(raw)
        pos += raw.numel()
    return out


def _enc(obj, tensors: List[torch.Tensor], seen: Dict[int, int], where, depth: int):
    # `where` is (parent, key) or None, turned into text by _path only for an error message.
    if depth > MAX_DEPTH:
        raise TypeError(f"{_path(where)}: nested deeper than {MAX_DEPTH}")
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        f = float(obj)
        return f if math.isfinite(f) else {"f": "nan" if f != f else ("inf" if f > 0 else "-inf")}
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return {"b": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            tensors.append(_plain_tensor(obj, where))
            seen[id(obj)] = len(tensors) - 1
        return {"t": seen[id(obj)]}
    if isinstance(obj, dict):
        return {"d": [[_enc_key(k, (where, k)), _enc(v, tensors, seen, (where, k), depth + 1)]
                      for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):  # not namedtuples / torch.Size
        items = [_enc(v, tensors, seen, (where, i), depth + 1) for i, v in enumerate(obj)]
        return {"l": items} if isinstance(obj, list) else {"u": items}
    raise TypeError(f"{_path(where)}: a {type(obj).__name__} cannot go into a state package; "
                    "use tensors, dicts, lists, tuples, None, bool, int, float, str or bytes")


def _enc_key(k, where):
    if isinstance(k, tuple) and type(k) is tuple:
        return {"u": [_enc_key(v, where) for v in k]}
    if k is None or isinstance(k, (bool, int, float, str)):
        return _enc(k, [], {}, where, 0)
    raise TypeError(f"{_path(where)}: a {type(k).__name__} dict key cannot go into a state package")


def _path(where) -> str:
    keys = []
    while where is not None:
        where, k = where
        keys.append(f"[{k!r}]")
    return "obj" + "".join(reversed(keys))


def _plain_tensor(t: torch.Tensor, where) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"{_path(where)}: only dense tensors can go into a state package, not {t.layout}")
    if t.dtype not in _DTYPE_NAMES:
        raise TypeError(f"{_path(where)}: dtype {t.dtype} is not one of {', '.join(DTYPES)}")
    return t.detach().cpu().resolve_conj().resolve_neg().contiguous()


# --- reading -----------------------------------------------------------------------------------------
def parse_header(raw, data_bytes: int) -> Header:
    """Parse and check a header against the number of tensor bytes that follow it. Every tensor's
    dtype, shape, offset and size is checked here, before anything is allocated."""
    try:
        obj = loads_strict(raw)
    except RecursionError:
        raise PackageError("package header is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise PackageError(f"package header is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PackageError(f"not a {FORMAT} header")
    if obj.get("version") != VERSION:
        raise PackageError(f"package version {_short(obj.get('version'))} is not {VERSION}")
    table, declared = obj.get("tensors"), obj.get("data_bytes")
    if not isinstance(table, list) or not _is_int(declared) or "tree" not in obj:
        raise PackageError("package header lacks tree / tensors / data_bytes")
    if declared != data_bytes:
        raise PackageError(f"package declares {_short(declared)} tensor bytes but {data_bytes} are present")
    specs, offset = [], 0
    for i, e in enumerate(table):
        specs.append(_spec(e, i, offset, data_bytes))
        offset += specs[-1].nbytes
    if offset != data_bytes:
        raise PackageError(f"package tensors cover {offset} bytes but {data_bytes} are present")
    return Header(obj["tree"], specs, data_bytes)


def _spec(e, i: int, offset: int, data_bytes: int) -> TensorSpec:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "offset", "nbytes"}:
        raise PackageError(f"tensor {i}: malformed table entry")
    dtype = DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
    if dtype is None:
        raise PackageError(f"tensor {i}: dtype {_short(e['dtype'])} is not one of {', '.join(DTYPES)}")
    shape = e["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape) \
            or math.prod(max(d, 1) for d in shape) > 1 << 62:  # an empty tensor's strides must still fit int64
        raise PackageError(f"tensor {i}: bad shape {_short(shape)}")
    if not _is_int(e["offset"]) or e["offset"] != offset:
        raise PackageError(f"tensor {i}: offset {_short(e['offset'])} should be {offset}")
    nbytes = math.prod(shape) * dtype.itemsize  # exact (Python ints): a huge shape cannot wrap around
    if not _is_int(e["nbytes"]) or e["nbytes"] != nbytes:
        raise PackageError(f"tensor {i}: {_short(e['nbytes'])} bytes do not match shape {shape} of {e['dtype']}")
    if offset + nbytes > data_bytes:
        raise PackageError(f"tensor {i}: bytes {offset}..{offset + nbytes} run past the {data_bytes} present")
    return TensorSpec(dtype, tuple(shape), offset, nbytes)


def decode(header: Header, fill: Callable[[TensorSpec, torch.Tensor], None]):
    """Allocate each tensor of the table, let `fill(spec, uint8 view)` write its bytes, and rebuild
    the tree. The sizes were checked by `parse_header`, so allocation is bounded by the input."""
    tensors = []
    for i, spec in enumerate(header.tensors):
        t = torch.empty(spec.shape, dtype=spec.dtype)
        if spec.nbytes:
            raw = tensor_bytes(t)
            fill(spec, raw)
            if spec.dtype == torch.bool and bool((raw > 1).any()):
                raise PackageError(f"tensor {i}: bool tensor holds bytes other than 0 and 1")
        tensors.append(t)
    return _dec(header.tree, tensors, 0)


def unpack(payload: torch.Tensor):
    """Inverse of `pack`. Raises PackageError (a ValueError) on anything malformed."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise PackageError("a package is a 1-D uint8 tensor")
    payload = payload.cpu().contiguous()
    n = payload.numel()
    if n < _PREFIX.size:
        raise PackageError(f"package of {n} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, hlen = _PREFIX.unpack(payload[:_PREFIX.size].numpy().tobytes())
    if magic != MAGIC:
        raise PackageError(f"not a {FORMAT} (magic {magic!r})")
    if hlen > min(MAX_HEADER_BYTES, n - _PREFIX.size):
        raise PackageError(f"header length {hlen} exceeds the {n - _PREFIX.size} bytes present "
                           f"(or the {MAX_HEADER_BYTES}-byte limit)")
    start = _PREFIX.size + hlen
    header = parse_header(payload[_PREFIX.size:start].numpy().tobytes(), n - start)
    return decode(header, lambda spec, dst: dst.copy_(payload[start + spec.offset:start + spec.offset + spec.nbytes]))


def _dec(node, tensors: List[torch.Tensor], depth: int):
    if depth > MAX_DEPTH:
        raise PackageError(f"package tree is nested deeper than {MAX_DEPTH}")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise PackageError(f"package tree holds an untagged {type(node).__name__}")
    (tag, v), = node.items()
    if tag == "t":
        if not _is_int(v) or not 0 <= v < len(tensors):
            raise PackageError(f"package tree refers to tensor {_short(v)} of {len(tensors)}")
        return tensors[v]
    if tag in ("l", "u") and isinstance(v, list):
        items = [_dec(x, tensors, depth + 1) for x in v]
        return items if tag == "l" else tuple(items)
    if tag == "d" and isinstance(v, list):
        out = {}
        for pair in v:
            if not isinstance(pair, list) or len(pair) != 2:
                raise PackageError("package dict entry is not a [key, value] pair")
            k = _dec_key(pair[0], depth + 1)
            if k in out:
                raise PackageError(f"package dict repeats key {_short(k)}")
            out[k] = _dec(pair[1], tensors, depth + 1)
        return out
    if tag == "f" and isinstance(v, str) and v in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[v]
    if tag == "b" and isinstance(v, str):
        try:
            return base64.b64decode(v, validate=True)
        except ValueError:
            raise PackageError("package bytes are not valid base64") from None
    raise PackageError(f"package tree holds an unknown or malformed tag {_short(tag)}")


def _dec_key(node, depth: int):
    if depth > MAX_DEPTH:
        raise PackageError(f"package tree is nested deeper than {MAX_DEPTH}")
    if isinstance(node, dict) and set(node) == {"u"} and isinstance(node["u"], list):
        return tuple(_dec_key(x, depth + 1) for x in node["u"])
    if isinstance(node, dict) and set(node) == {"f"}:
        return _dec(node, [], depth)
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise PackageError("package dict key is not a None, bool, int, float, str or tuple")


def _short(x) -> str:
    """repr for an error message, cut short: a crafted header can hold huge values."""
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def loads_strict(raw):
    """JSON from bytes, refusing what Python's json accepts but JSON does not (NaN, Infinity) and
    repeated keys. Raises ValueError (UnicodeDecodeError, JSONDecodeError) or RecursionError."""
    return json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in a package header")


def _unique_keys(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("repeated key in a JSON object")
    return out
