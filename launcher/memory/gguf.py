"""Fast reader of GGUF v2/v3 headers: key/values, tensor table and the hparams chorus plans memory with.

Only the header is read. The file is memory-mapped and parsed with ``struct``; large arrays are skipped,
not decoded, so a model with a 262k-token vocabulary scans in milliseconds instead of the seconds that
``gguf.GGUFReader`` needs (it builds a numpy view per token). Any malformed input raises ``GGUFError``.

The hparams memory planning loops over are checked against the file (`validate_header`): a
``block_count`` that is negative, above llama.cpp's layer limit or below a ``blk.N`` tensor's index is
a `GGUFHeaderError` naming the field, so a hostile header is an invalid model, never a crash or a
40-second estimate.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import mmap
import os
import re
import stat
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from launcher.errors import GGUFError
from launcher.fileio import atomic_writer
from launcher.paths import cache_dir

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"
SMALL_ARRAY_MAX = 1024  # arrays shorter than this are decoded; longer ones become ArrayInfo
MAX_STRING_LENGTH = 1 << 30  # llama.cpp's GGUF_MAX_STRING_LENGTH
MAX_DIMS = 4  # GGML_MAX_DIMS
CACHE_MAX_ENTRIES = 64
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: no loadable model has more blocks
MAX_TENSOR_NAME = 63  # llama.cpp refuses a tensor name of GGML_MAX_NAME (64) bytes or more

# Caps no real model comes near (the largest have a few thousand tensors, a hundred keys, a 262k-token
# vocabulary): a header made of a million tensors, or of thousands of keys with a thousand strings each,
# took 5-9 s to parse; within these caps the worst header parses in well under a second.
MAX_TENSORS = 65_536
MAX_KV = 16_384
MAX_KEY_LENGTH = 65_535  # the GGUF spec's limit on a key
MAX_ARRAY_STRINGS = 1 << 22  # strings in all arrays together (skipped, not decoded, but walked)
MAX_DECODED_ELEMENTS = 1 << 16  # elements of the small arrays decoded to tuples, all together
MAX_DECODED_TEXT = 128 << 20  # bytes of keys and string values decoded, all together

# GGUF value types: id -> (name, struct code, size). STRING (8) and ARRAY (9) are variable-sized.
_STRING = 8
_ARRAY = 9
_UINT32 = 4
_SCALARS: dict[int, tuple[str, str, int]] = {
    0: ("UINT8", "B", 1),
    1: ("INT8", "b", 1),
    2: ("UINT16", "H", 2),
    3: ("INT16", "h", 2),
    4: ("UINT32", "I", 4),
    5: ("INT32", "i", 4),
    6: ("FLOAT32", "f", 4),
    7: ("BOOL", "?", 1),
    10: ("UINT64", "Q", 8),
    11: ("INT64", "q", 8),
    12: ("FLOAT64", "d", 8),
}
_SCALAR_STRUCTS = {t: struct.Struct("<" + code) for t, (_, code, _) in _SCALARS.items()}

_QK_K = 256
# ggml_type id -> (name, block size in elements, block size in bytes); from ggml.h / ggml.c type_traits.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 2 + 16),
    3: ("Q4_1", 32, 2 + 2 + 16),
    6: ("Q5_0", 32, 2 + 4 + 16),
    7: ("Q5_1", 32, 2 + 2 + 4 + 16),
    8: ("Q8_0", 32, 2 + 32),
    9: ("Q8_1", 32, 2 + 2 + 32),
    10: ("Q2_K", _QK_K, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    11: ("Q3_K", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    12: ("Q4_K", _QK_K, 2 + 2 + _QK_K // 2 + 12),
    13: ("Q5_K", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    14: ("Q6_K", _QK_K, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    15: ("Q8_K", _QK_K, 4 + _QK_K + _QK_K // 8),
    16: ("IQ2_XXS", _QK_K, 2 + _QK_K // 4),
    17: ("IQ2_XS", _QK_K, 2 + _QK_K // 4 + _QK_K // 32),
    18: ("IQ3_XXS", _QK_K, 2 + _QK_K // 4 + _QK_K // 8),
    19: ("IQ1_S", _QK_K, 2 + _QK_K // 8 + _QK_K // 16),
    20: ("IQ4_NL", 32, 2 + 16),
    21: ("IQ3_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    22: ("IQ2_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 16),
    23: ("IQ4_XS", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", _QK_K, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", _QK_K, 2 + 4 * 13),
    35: ("TQ2_0", _QK_K, 2 + 64),
    39: ("MXFP4", 32, 1 + 16),
    40: ("NVFP4", 64, 4 + 32),
    41: ("Q1_0", 128, 2 + 16),
    42: ("Q2_0", 64, 2 + 16),
}

# general.file_type (llama_ftype in llama.h) -> name without the LLAMA_FTYPE_MOSTLY_/ALL_ prefix.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
    32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}


@dataclass(frozen=True)
class _SwaRule:
    """How llama.cpp's load_arch_hparams sets up sliding-window attention for one architecture.

    when: "window" = only if {arch}.attention.sliding_window > 0; "always"; "unless_zero" = unless the
    file sets the window to 0; "never". pattern None means the per-layer array must come from the file.
    """

    when: str
    pattern: int | None = None
    dense_first: bool = False
    window: int | None = None
    only_block_count: int | None = None


# From src/models/*.cpp (load_swa_pattern / set_swa_pattern calls) of the pinned llama.cpp.
_SWA_RULES: dict[str, _SwaRule] = {
    "gemma2": _SwaRule("always", 2, window=4096),
    "gemma3": _SwaRule("window", 6),
    "gemma3n": _SwaRule("always", 5),
    "gemma-embedding": _SwaRule("always", 6),
    "gemma4": _SwaRule("always"),
    "gemma4-assistant": _SwaRule("always"),
    "cohere2": _SwaRule("always", 4),
    "cohere2moe": _SwaRule("always", 4, dense_first=True),
    "gpt-oss": _SwaRule("always", 2),
    "llama4": _SwaRule("unless_zero", 4, window=8192),
    "exaone4": _SwaRule("always", 4, window=4096, only_block_count=64),
    "exaone-moe": _SwaRule("always", 4, window=128),
    "afmoe": _SwaRule("window", 4),
    "mellum": _SwaRule("window", 4),
    "olmo2": _SwaRule("window", 4),
    "plamo3": _SwaRule("window", 8),
    "smallthinker": _SwaRule("window", 4, dense_first=True),
    "modern-bert": _SwaRule("window", 3, dense_first=True),
    "laguna": _SwaRule("window", 4, dense_first=True),
    "muse-glimmer": _SwaRule("always", 4),
    "deepseek4": _SwaRule("always", 0),
    "maple": _SwaRule("always"),
    "mimo2": _SwaRule("always"),
    "granite_swa": _SwaRule("always"),
    "dots3note": _SwaRule("always"),
    "phi3": _SwaRule("never"),
}


class GGUFHeaderError(GGUFError):
    """A header value that contradicts the file's tensors or llama.cpp's limits; names the field."""

    def __init__(self, path: str, field: str, value: object, reason: str) -> None:
        super().__init__(path, f"{field} = {value!r}: {reason}")
        self.hint = "The file's header is damaged or hostile; download the model again."
        self.field = field
        self.value = value
        self.reason = reason


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def block_index(tensor_name: str) -> int | None:
    """N of a 'blk.N.' tensor name, else None."""
    m = _BLOCK.match(tensor_name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ArrayInfo:
    """A large array left undecoded in ``GGUFMetadata.fields``: its element type and length only."""

    element_type: str
    length: int


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; ``offset`` is relative to the data section."""

    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFMetadata:
    """Everything chorus needs from a GGUF header, with llama.cpp's defaults applied where it has them."""

    path: str
    file_size: int
    version: int
    alignment: int
    data_offset: int
    fields: dict[str, object] = field(repr=False, hash=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    architecture: str
    name: str | None
    size_label: str | None
    file_type: int | None
    quantization: str | None
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    feed_forward_length: int | None
    head_count: int | tuple[int, ...] | None
    head_count_kv: int | tuple[int, ...] | None
    key_length: int | None
    value_length: int | None
    sliding_window: int | None
    sliding_window_pattern: int | tuple[bool, ...] | None
    vocab_size: int | None
    has_chat_template: bool
    chat_template: str | None = field(repr=False)
    tensor_bytes: int

    def head_count_kv_at(self, layer: int) -> int:
        """KV heads of one layer; like llama.cpp, falls back to head_count, and 0 when neither is set."""
        self._check_layer(layer)
        value = self.head_count_kv if self.head_count_kv is not None else self.head_count
        if value is None:
            return 0
        if isinstance(value, tuple):
            return value[layer] if layer < len(value) else 0
        return value

    def is_swa_layer(self, layer: int) -> bool:
        """Whether llama.cpp runs this layer with sliding-window attention (hparams.is_swa(il))."""
        self._check_layer(layer)
        pattern = self.sliding_window_pattern
        if pattern is None:
            return False
        if isinstance(pattern, tuple):
            return layer < len(pattern) and pattern[layer]
        nextn = _as_int(self.fields.get(f"{self.architecture}.nextn_predict_layers")) or 0
        if layer >= (self.block_count or 0) - nextn:
            return False  # set_swa_pattern leaves the MTP layers dense
        if pattern == 0:
            return True
        rule = _SWA_RULES.get(self.architecture)
        if rule is not None and rule.dense_first:
            return layer % pattern != 0
        return layer % pattern < pattern - 1

    def tensor(self, name: str) -> TensorInfo | None:
        """The tensor called ``name``, or None."""
        for info in self.tensors:
            if info.name == name:
                return info
        return None

    def to_summary(self) -> dict[str, object]:
        """A JSON-safe dict of the scalar fields (tuples become lists), for logs, the UI and --json."""
        skip = {"fields", "tensors"}
        summary: dict[str, object] = {}
        for name in self.__dataclass_fields__:
            if name in skip:
                continue
            value = getattr(self, name)
            summary[name] = list(value) if isinstance(value, tuple) else value
        summary["tensor_count"] = len(self.tensors)
        return summary

    def _check_layer(self, layer: int) -> None:
        if self.block_count is None or not 0 <= layer < self.block_count:
            raise IndexError(f"layer {layer} out of range for {self.block_count} blocks in {self.path}")


# ---------------------------------------------------------------------------------------------- parsing


_BUDGET_UNITS = {"array_strings": "strings in arrays", "decoded_elements": "elements in small (decoded) arrays",
                 "decoded_text": "bytes of keys and string values"}


class _Cursor:
    """Bounds-checked position in the mapped file, so bad input fails as GGUFError, never struct.error."""

    __slots__ = ("array_strings", "buf", "decoded_elements", "decoded_text", "path", "pos", "size")

    def __init__(self, buf: mmap.mmap, size: int, path: str) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0
        self.array_strings = 0
        self.decoded_elements = 0
        self.decoded_text = 0

    def spend(self, counter: str, amount: int, limit: int, what: str, offset: int) -> None:
        """Add to one of the header's budgets (`MAX_*`); a header past one is refused where it happens."""
        total: int = getattr(self, counter) + amount
        if total > limit:
            self.fail(f"{what} takes the header past {limit:,} {_BUDGET_UNITS[counter]} (no real model comes "
                      "near that)", offset)
        setattr(self, counter, total)

    def fail(self, message: str, offset: int | None = None) -> NoReturn:
        raise GGUFError(self.path, message, offset=self.pos if offset is None else offset)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"truncated: {what} needs {n} bytes, {max(self.size - self.pos, 0)} left")

    def unpack(self, st: struct.Struct, what: str) -> tuple[Any, ...]:
        self.need(st.size, what)
        values = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return values

    def u32(self, what: str) -> int:
        value: int = self.unpack(_U32, what)[0]
        return value

    def u64(self, what: str) -> int:
        value: int = self.unpack(_U64, what)[0]
        return value

    def string(self, what: str, max_length: int = MAX_STRING_LENGTH) -> str:
        start = self.pos
        length = self.u64(what)
        if length > max_length:
            self.fail(f"{what}: string length {length:,} is over the limit of {max_length:,} bytes", start)
        self.need(length, what)
        self.spend("decoded_text", length, MAX_DECODED_TEXT, f"{what} ({length:,} bytes of text)", start)
        end = self.pos + length
        text = self.buf[self.pos:end].decode("utf-8", "replace")
        self.pos = end
        return text


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_COUNTS = struct.Struct("<QQ")
_ARRAY_HEADER = struct.Struct("<IQ")
_TENSOR_TAIL = struct.Struct("<IQ")
_DIMS = tuple(struct.Struct(f"<{n}q") for n in range(MAX_DIMS + 1))
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-char key, type, 1-byte value
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 4 + 8  # name length, 1-char name, n_dims, type, offset


def _parse_header(cur: _Cursor) -> tuple[int, int, int]:
    """Magic, version and the two counts, with the counts checked against the file size."""
    if cur.buf[:4] != GGUF_MAGIC:
        cur.fail(f"not a GGUF file (magic {cur.buf[:4]!r}, expected {GGUF_MAGIC!r})", 0)
    cur.pos = len(GGUF_MAGIC)
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            cur.fail("big-endian GGUF files are not supported", 4)
        cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)", 4)
    n_tensors, n_kv = cur.unpack(_COUNTS, "header counts")
    if n_kv * _MIN_KV_BYTES > cur.size - cur.pos:
        cur.fail(f"key/value count {n_kv} is impossible for a {cur.size}-byte file", 16)
    if n_tensors * _MIN_TENSOR_BYTES > cur.size - cur.pos:
        cur.fail(f"tensor count {n_tensors} is impossible for a {cur.size}-byte file", 8)
    if n_kv > MAX_KV:
        cur.fail(f"key/value count {n_kv:,} is over the limit of {MAX_KV:,} (real models have about a hundred)", 16)
    if n_tensors > MAX_TENSORS:
        cur.fail(f"tensor count {n_tensors:,} is over the limit of {MAX_TENSORS:,} (real models have a few "
                 "thousand at most)", 8)
    return version, n_tensors, n_kv


def _parse_kvs(cur: _Cursor, n_kv: int) -> dict[str, object]:
    """All key/values in file order; duplicate or empty keys are errors, as in llama.cpp."""
    fields: dict[str, object] = {}
    for index in range(n_kv):
        start = cur.pos
        key = cur.string(f"key #{index}", MAX_KEY_LENGTH)
        if not key:
            cur.fail(f"key #{index} is empty", start)
        if key in fields:
            cur.fail(f"duplicate key {key!r}", start)
        vtype = cur.u32(f"type of {key!r}")
        if key == ALIGNMENT_KEY and vtype != _UINT32:
            cur.fail(f"{ALIGNMENT_KEY} must be UINT32", start)
        fields[key] = _parse_value(cur, vtype, key)
    return fields


def _parse_value(cur: _Cursor, vtype: int, key: str) -> object:
    if vtype == _STRING:
        return cur.string(f"value of {key!r}")
    if vtype == _ARRAY:
        return _parse_array(cur, key)
    st = _SCALAR_STRUCTS.get(vtype)
    if st is None:
        cur.fail(f"key {key!r} has unknown value type {vtype}", cur.pos - 4)
    return cur.unpack(st, f"value of {key!r}")[0]


def _parse_array(cur: _Cursor, key: str) -> tuple[object, ...] | ArrayInfo:
    """Small arrays decoded to a tuple; large ones skipped (strings by their lengths) as ArrayInfo."""
    start = cur.pos
    etype, length = cur.unpack(_ARRAY_HEADER, f"array header of {key!r}")
    left = cur.size - cur.pos
    if etype == _STRING:
        if length > left // 8:
            cur.fail(f"array {key!r} claims {length} strings, more than the file can hold", start)
        cur.spend("array_strings", length, MAX_ARRAY_STRINGS, f"array {key!r} of {length:,} strings", start)
        if length < SMALL_ARRAY_MAX:
            cur.spend("decoded_elements", length, MAX_DECODED_ELEMENTS, f"array {key!r} of {length:,} strings",
                      start)
            return tuple(cur.string(f"element of {key!r}") for _ in range(length))
        cur.pos = _skip_strings(cur, length, key)
        return ArrayInfo("STRING", length)
    spec = _SCALARS.get(etype)
    if spec is None:
        what = "nested arrays are not supported" if etype == _ARRAY else f"unknown element type {etype}"
        cur.fail(f"array {key!r}: {what}", start)
    name, code, size = spec
    if length > left // size:
        cur.fail(f"array {key!r} claims {length} x {name}, more than the file can hold", start)
    if length < SMALL_ARRAY_MAX:
        cur.spend("decoded_elements", length, MAX_DECODED_ELEMENTS, f"array {key!r} of {length:,} {name}", start)
        values = struct.unpack_from(f"<{length}{code}", cur.buf, cur.pos)
        cur.pos += length * size
        return values
    cur.pos += length * size
    return ArrayInfo(name, length)


# Strings in an array are skipped in C by the regex engine: one alternative per length 0..255 (the
# u64 length's 7 high bytes zero, then exactly that many bytes). Records that match are parsed exactly
# as the Python walk would; a run containing a longer string fails the match and is walked instead.
_RUN = 1024


def _string_record(n: int) -> bytes:
    """Regex for one string of length n; literal ops instead of {m} repeats are cheaper in sre."""
    data = b"." * n if n <= 32 else b".{%d}" % n
    return b"\\x%02x" % n + b"\\x00" * 7 + data


@functools.cache
def _string_run_pattern() -> re.Pattern[bytes]:
    alternatives = b"|".join(_string_record(n) for n in range(256))
    return re.compile(b"(?:" + alternatives + b"){%d}+" % _RUN, re.DOTALL)


def _walk_strings(buf: mmap.mmap, pos: int, count: int) -> int:
    unpack_from = _U64.unpack_from
    for _ in range(count):
        pos += unpack_from(buf, pos)[0] + 8
    return pos


def _skip_strings(cur: _Cursor, count: int, key: str) -> int:
    """Offset just past ``count`` length-prefixed strings starting at the cursor."""
    buf, pos = cur.buf, cur.pos
    match = _string_run_pattern().match
    runs, rest = divmod(count, _RUN)
    try:
        for _ in range(runs):
            found = match(buf, pos)
            pos = _walk_strings(buf, pos, _RUN) if found is None else found.end()
        pos = _walk_strings(buf, pos, rest)
    except (struct.error, OverflowError):
        cur.fail(f"truncated inside string array {key!r}")
    if pos > cur.size:
        cur.fail(f"truncated: string array {key!r} runs past the end of the file")
    return pos


def _parse_tensors(cur: _Cursor, n_tensors: int) -> list[tuple[str, int, tuple[int, ...], int, int]]:
    """The raw tensor table: (name, ggml type, shape, offset, n_bytes), each validated like gguf.cpp.

    One tight loop over local names; out-of-range reads surface as struct.error and become GGUFError.
    """
    buf, size, pos = cur.buf, cur.size, cur.pos
    u64, u32, tail = _U64.unpack_from, _U32.unpack_from, _TENSOR_TAIL.unpack_from
    table = []
    seen: set[str] = set()
    start = pos
    try:
        for index in range(n_tensors):
            start = pos
            length = u64(buf, pos)[0]
            pos += 8
            if length > MAX_TENSOR_NAME:
                cur.fail(f"name of tensor #{index} is {length:,} bytes long; llama.cpp allows "
                         f"{MAX_TENSOR_NAME}", start)
            if length > size - pos:
                cur.fail(f"truncated: name of tensor #{index} needs {length} bytes, {size - pos} left", start)
            name = buf[pos:pos + length].decode("utf-8", "replace")
            pos += length
            if name in seen:
                cur.fail(f"duplicate tensor name {name!r}", start)
            seen.add(name)
            n_dims = u32(buf, pos)[0]
            pos += 4
            if n_dims > MAX_DIMS:
                cur.fail(f"tensor {name!r} has {n_dims} dimensions (max {MAX_DIMS})", start)
            dims = _DIMS[n_dims]
            shape = dims.unpack_from(buf, pos)
            pos += dims.size
            ggml_type, offset = tail(buf, pos)
            pos += _TENSOR_TAIL.size
            n_bytes = _tensor_bytes(cur, name, ggml_type, shape, start)
            table.append((name, ggml_type, shape, offset, n_bytes))
    except struct.error:
        cur.fail("truncated inside the tensor table", start)
    cur.pos = pos
    return table


def _tensor_bytes(cur: _Cursor, name: str, ggml_type: int, shape: tuple[int, ...], start: int) -> int:
    spec = GGML_TYPES.get(ggml_type)
    if spec is None:
        cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}", start)
    type_name, block, type_size = spec
    n_elements = 1
    for n in shape:
        if n < 0:
            cur.fail(f"tensor {name!r} has a negative dimension {shape}", start)
        n_elements *= n
    if shape and shape[0] % block:
        cur.fail(f"tensor {name!r} ({type_name}) row of {shape[0]} is not a multiple of {block}", start)
    return n_elements // block * type_size


def _build_tensors(cur: _Cursor, table: list[tuple[str, int, tuple[int, ...], int, int]], data_offset: int,
                   alignment: int) -> tuple[TensorInfo, ...]:
    """TensorInfo per entry, checking alignment and that the data lies inside the file."""
    tensors = []
    for name, ggml_type, shape, offset, n_bytes in table:
        if offset % alignment:
            cur.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        end = data_offset + offset + n_bytes
        if end > cur.size:
            cur.fail(f"tensor {name!r} data ends at byte {end}, past the end of the "
                     f"{cur.size}-byte file (truncated download?)", data_offset + offset)
        tensors.append(TensorInfo(name, ggml_type, GGML_TYPES[ggml_type][0], shape, offset, n_bytes))
    return tuple(tensors)


def _alignment(cur: _Cursor, fields: dict[str, object]) -> int:
    value = fields.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if not isinstance(value, int) or value <= 0 or value & (value - 1):
        cur.fail(f"{ALIGNMENT_KEY} = {value!r} is not a power of two")
    return value


def _parse(buf: mmap.mmap, size: int, path: str, abs_path: str) -> GGUFMetadata:
    """The header's metadata, validated."""
    cur = _Cursor(buf, size, path)
    version, n_tensors, n_kv = _parse_header(cur)
    fields = _parse_kvs(cur, n_kv)
    alignment = _alignment(cur, fields)
    table = _parse_tensors(cur, n_tensors)
    data_offset = cur.pos
    if n_tensors:  # gguf.cpp pads to the alignment only when there is tensor data
        data_offset += -data_offset % alignment
    tensors = _build_tensors(cur, table, data_offset, alignment)
    meta = _metadata(abs_path, size, version, alignment, data_offset, fields, tensors)
    validate_header(meta, shown=path)
    return meta


# ------------------------------------------------------------------------------------ validation

_NON_NEGATIVE = ("context_length", "embedding_length", "feed_forward_length", "head_count", "head_count_kv",
                 "key_length", "value_length", "sliding_window", "sliding_window_pattern", "vocab_size")


def validate_header(meta: GGUFMetadata, *, shown: str | None = None) -> None:
    """Raise GGUFHeaderError when an hparam planning relies on contradicts the tensors or llama.cpp.

    Bounds every per-layer loop of the estimator: block_count is 0..MAX_LAYERS and every blk.N tensor
    lies below it. O(tensors), and the tensor count is bounded by the file size.
    """
    path = shown or meta.path
    arch = meta.architecture
    key = f"{arch}.block_count"
    raw = meta.fields.get(key)
    if raw is not None and meta.block_count is None:
        raise GGUFHeaderError(path, key, raw, "the layer count must be an integer")
    n_layer = meta.block_count
    if n_layer is not None:
        if n_layer < 0:
            raise GGUFHeaderError(path, key, n_layer, "a layer count cannot be negative")
        if n_layer > MAX_LAYERS:
            raise GGUFHeaderError(path, key, n_layer, f"more layers than llama.cpp supports ({MAX_LAYERS}); "
                                  f"the file has {len(meta.tensors)} tensors")
        top = max((i for i in (block_index(t.name) for t in meta.tensors) if i is not None), default=None)
        if top is not None and top >= n_layer:
            raise GGUFHeaderError(path, key, n_layer, f"the file's tensor 'blk.{top}.*' needs at least "
                                  f"{top + 1} layers")
    for name in _NON_NEGATIVE:
        value = getattr(meta, name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, int) and v < 0 for v in values):
            raise GGUFHeaderError(path, f"{arch}.{name}", value, "cannot be negative")


# ------------------------------------------------------------------------------------ derived hparams


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int_or_layers(value: object) -> int | tuple[int, ...] | None:
    """A scalar hparam or a per-layer tuple of ints (as get_key_or_arr accepts)."""
    if isinstance(value, tuple) and all(_as_int(v) is not None for v in value):
        return value
    return _as_int(value)


def _first(value: int | tuple[int, ...] | None) -> int | None:
    """llama.cpp's n_head() without a layer: element 0 of a per-layer array."""
    if isinstance(value, tuple):
        return value[0] if value else None
    return value


def _head_dim_default(embedding_length: int | None, head_count: int | tuple[int, ...] | None) -> int | None:
    heads = _first(head_count)
    if embedding_length is None or not heads:
        return None
    return embedding_length // heads


def _file_swa_pattern(value: object) -> int | tuple[bool, ...] | None:
    if isinstance(value, tuple):
        return tuple(bool(v) for v in value)
    return _as_int(value)


def _resolve_swa(arch: str, fields: dict[str, object],
                 block_count: int | None) -> tuple[int | None, int | tuple[bool, ...] | None]:
    """(window, pattern) as llama.cpp would use them; (None, None) when no layer is SWA."""
    window = _as_int(fields.get(f"{arch}.attention.sliding_window"))
    pattern = _file_swa_pattern(fields.get(f"{arch}.attention.sliding_window_pattern"))
    rule = _SWA_RULES.get(arch)
    if rule is None:
        # Architectures llama.cpp has no SWA code for ignore the keys unless the file spells out a pattern.
        return (window, pattern) if window and pattern is not None else (None, None)
    enabled = {
        "always": True,
        "window": bool(window and window > 0),
        "unless_zero": window != 0,
        "never": False,
    }[rule.when]
    if rule.only_block_count is not None and block_count != rule.only_block_count:
        enabled = False
    if not enabled:
        return None, None
    return (window if window is not None else rule.window,
            pattern if pattern is not None else rule.pattern)


def _vocab_size(arch: str, fields: dict[str, object]) -> int | None:
    tokens = fields.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArrayInfo):
        return tokens.length
    if isinstance(tokens, tuple):
        return len(tokens)
    return _as_int(fields.get(f"{arch}.vocab_size"))


def _feed_forward(value: object) -> int | None:
    """The FFN width; for per-layer widths, the largest (what memory planning needs)."""
    layers = _int_or_layers(value)
    if isinstance(layers, tuple):
        return max(layers, default=None)
    return layers


def _metadata(path: str, size: int, version: int, alignment: int, data_offset: int,
              fields: dict[str, object], tensors: tuple[TensorInfo, ...]) -> GGUFMetadata:
    arch = _as_str(fields.get("general.architecture")) or ""
    block_count = _as_int(fields.get(f"{arch}.block_count"))
    embedding = _as_int(fields.get(f"{arch}.embedding_length"))
    head_count = _int_or_layers(fields.get(f"{arch}.attention.head_count"))
    head_dim = _head_dim_default(embedding, head_count)
    key_length = _as_int(fields.get(f"{arch}.attention.key_length"))
    value_length = _as_int(fields.get(f"{arch}.attention.value_length"))
    window, pattern = _resolve_swa(arch, fields, block_count)
    file_type = _as_int(fields.get("general.file_type"))
    chat_template = _as_str(fields.get("tokenizer.chat_template"))
    return GGUFMetadata(
        path=path, file_size=size, version=version, alignment=alignment, data_offset=data_offset,
        fields=fields, tensors=tensors, architecture=arch,
        name=_as_str(fields.get("general.name")),
        size_label=_as_str(fields.get("general.size_label")),
        file_type=file_type,
        quantization=FILE_TYPE_NAMES.get(file_type) if file_type is not None else None,
        context_length=_as_int(fields.get(f"{arch}.context_length")),
        block_count=block_count,
        embedding_length=embedding,
        feed_forward_length=_feed_forward(fields.get(f"{arch}.feed_forward_length")),
        head_count=head_count,
        head_count_kv=_int_or_layers(fields.get(f"{arch}.attention.head_count_kv")),
        key_length=key_length if key_length is not None else head_dim,
        value_length=value_length if value_length is not None else head_dim,
        sliding_window=window,
        sliding_window_pattern=pattern,
        vocab_size=_vocab_size(arch, fields),
        has_chat_template=chat_template is not None,
        chat_template=chat_template,
        tensor_bytes=sum(t.n_bytes for t in tensors),
    )


# -------------------------------------------------------------------------------------- file + cache

_cache: OrderedDict[str, tuple[int, int, GGUFMetadata | GGUFError]] = OrderedDict()
_cache_lock = threading.Lock()


def read_gguf(path: str | os.PathLike[str]) -> GGUFMetadata:
    """Read a GGUF header, cached per process by (absolute path, size, mtime_ns), and on disk.

    A header that is refused is cached too: the registry, the planner and the estimator each ask for
    the same file, and a damaged one should cost its parse once, not once per question. A header read
    once is kept on disk (see `_disk_load`): each chorus process starts by reading every model's header.
    """
    shown = os.fspath(path)
    abs_path = os.path.abspath(shown)
    st = _stat_regular(shown)
    with _cache_lock:
        hit = _cache.get(abs_path)
        if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
            _cache.move_to_end(abs_path)
            if isinstance(hit[2], GGUFError):
                raise hit[2]
            return hit[2]
    cached = _disk_load(abs_path, st.st_size, st.st_mtime_ns, shown)
    if cached is not None:
        _remember(abs_path, st.st_size, st.st_mtime_ns, cached)
        return cached
    try:
        size, mtime_ns, meta = _read_file(shown, abs_path)
    except GGUFError as exc:
        if exc.offset is not None or isinstance(exc, GGUFHeaderError):  # the content's fault, not the read's
            _remember(abs_path, st.st_size, st.st_mtime_ns, exc)
        raise
    _remember(abs_path, size, mtime_ns, meta)
    _disk_store(abs_path, size, mtime_ns, meta)
    return meta


def _remember(abs_path: str, size: int, mtime_ns: int, outcome: GGUFMetadata | GGUFError) -> None:
    with _cache_lock:
        _cache[abs_path] = (size, mtime_ns, outcome)
        _cache.move_to_end(abs_path)
        while len(_cache) > CACHE_MAX_ENTRIES:
            _cache.popitem(last=False)


def clear_cache(*, disk: bool = True) -> None:
    """Forget every cached header (tests and benchmarks want cold reads); `disk=False`: this process's only,
    as a new process starts."""
    with _cache_lock:
        _cache.clear()
    if disk:
        for entry in (cache_dir() / "gguf").glob("*.json"):
            with contextlib.suppress(OSError):
                entry.unlink()


def _stat_regular(path: str) -> os.stat_result:
    """stat() before open(): a FIFO or device would block or stream instead of failing."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise GGUFError(path, f"cannot read: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise GGUFError(path, f"cannot read: {kind}")
    return st


def _read_file(path: str, abs_path: str) -> tuple[int, int, GGUFMetadata]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise GGUFError(path, "cannot read: not a regular file")
            if st.st_size == 0:
                raise GGUFError(path, "empty file", offset=0)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                meta = _parse(buf, len(buf), path, abs_path)
    except OSError as exc:
        raise GGUFError(path, f"cannot read: {exc.strerror or exc}") from exc
    except (ValueError, MemoryError) as exc:  # mmap refusing the file; parse errors are GGUFError already
        raise GGUFError(path, f"cannot map: {exc}") from exc
    return st.st_size, st.st_mtime_ns, meta


# ------------------------------------------------------------------------------ the header cache on disk
# Parsing a header means skipping its vocabulary: a 262k-token one cost 27 ms (10 of them compiling the
# skip pattern) at the start of every chorus process, before its first server could start. A parsed
# header is kept as JSON under the cache folder, keyed by absolute path, size and mtime_ns, and checked
# again (`validate_header`) when it is read back. Anything unreadable there is parsed again and rewritten.

_DISK_FORMAT = 1
DISK_MAX_ENTRIES = 128


def _disk_path(abs_path: str) -> Path:
    return cache_dir() / "gguf" / (hashlib.sha256(abs_path.encode()).hexdigest()[:32] + ".json")


def _encode(value: object) -> object:
    if isinstance(value, ArrayInfo):
        return {"array": [value.element_type, value.length]}
    if isinstance(value, tuple):
        return {"tuple": list(value)}
    return value


def _decode(value: object) -> object:
    if isinstance(value, dict):
        if "array" in value:
            element_type, length = value["array"]
            return ArrayInfo(str(element_type), int(length))
        return tuple(value["tuple"])
    return value


def _disk_store(abs_path: str, size: int, mtime_ns: int, meta: GGUFMetadata) -> None:
    data = {f.name: _encode(getattr(meta, f.name)) for f in fields(meta) if f.name not in ("fields", "tensors")}
    data["fields"] = {k: _encode(v) for k, v in meta.fields.items()}
    data["tensors"] = [[t.name, t.ggml_type, t.type_name, list(t.shape), t.offset, t.n_bytes] for t in meta.tensors]
    target = _disk_path(abs_path)
    with contextlib.suppress(OSError, ValueError, TypeError):  # not written: the next start parses it again
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(target, durable=False) as f:  # a cache lost in a power cut is parsed again
            f.write(json.dumps({"format": _DISK_FORMAT, "path": abs_path, "size": size, "mtime_ns": mtime_ns,
                                "meta": data}, separators=(",", ":")))
        _prune(target.parent)


def _prune(folder: Path) -> None:
    """At most DISK_MAX_ENTRIES headers kept: the least recently written go first (files moved or renamed
    leave entries nobody reads)."""
    entries = list(folder.glob("*.json"))
    if len(entries) <= DISK_MAX_ENTRIES:
        return

    def written(entry: Path) -> int:
        try:
            return entry.stat().st_mtime_ns
        except OSError:  # another process pruned it
            return 0

    by_age = sorted(entries, key=written)
    for entry in by_age[:len(entries) - DISK_MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            entry.unlink()


def _disk_load(abs_path: str, size: int, mtime_ns: int, shown: str) -> GGUFMetadata | None:
    """The header kept on disk for this very file (same path, size and mtime), else None."""
    try:
        with open(_disk_path(abs_path), encoding="utf-8") as f:
            data = json.load(f)
        if (data["format"], data["path"], data["size"], data["mtime_ns"]) != (_DISK_FORMAT, abs_path, size,
                                                                              mtime_ns):
            return None
        raw = data["meta"]
        kw: dict[str, Any] = {name: _decode(value) for name, value in raw.items() if name not in ("fields", "tensors")}
        meta = GGUFMetadata(**kw, fields={k: _decode(v) for k, v in raw["fields"].items()},
                            tensors=tuple(TensorInfo(n, g, t, tuple(shape), o, b)
                                          for n, g, t, shape, o, b in raw["tensors"]))
        validate_header(meta, shown=shown)
    except (OSError, ValueError, KeyError, TypeError, GGUFError):
        return None
    return meta
