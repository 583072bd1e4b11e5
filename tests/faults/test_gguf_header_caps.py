"""Issue 24, item 10a: GGUF headers far larger than any real model's.

Before: a header claiming 1,000,000 tensors, or 3,000 keys each holding an array of 1,000 strings, took
5-9 s to parse in `chorus models`, `plan` and `check` (15 s for `chorus models` with both in models_dir).
Now counts and sizes no real model comes near are refused where they occur, a refused header is cached by
path, size and mtime like a good one, and the worst header within the caps parses in well under a second.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from launcher.errors import GGUFError
from launcher.memory import gguf as gguf_module
from launcher.memory.gguf import MAX_DECODED_ELEMENTS, MAX_TENSOR_NAME, MAX_TENSORS, clear_cache, read_gguf
from orchestrator.config.registry import Registry
from orchestrator.config.schema import load_config
from tests.conftest import ConfigDir

_STRING, _ARRAY, _UINT32, _F32 = 8, 9, 4, 0


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv_string_array(key: str, n: int) -> bytes:
    return _s(key) + struct.pack("<IIQ", _ARRAY, _STRING, n) + _s("ab") * n


def _tensor(name: str) -> bytes:
    """A 1-D F32 tensor of 8 elements at data offset 0 (they may share it: only the header is read)."""
    return _s(name) + struct.pack("<Iq", 1, 8) + struct.pack("<IQ", _F32, 0)


def write_gguf(path: Path, *, n_tensors: int = 0, tensors: list[bytes] | None = None, kvs: list[bytes] | None = None,
               n_kv: int | None = None, pad_to: int = 0) -> Path:
    """A raw GGUF v3 header: an architecture key, `kvs`, `tensors`; `n_*` may claim more than is written,
    and `pad_to` makes the file that long (sparse), so counts are plausible for its size."""
    kvs = [_s("general.architecture") + struct.pack("<I", _STRING) + _s("llama"), *(kvs or [])]
    tensors = tensors or []
    claimed_tensors = n_tensors or len(tensors)
    claimed_kv = n_kv if n_kv is not None else len(kvs)
    head = b"GGUF" + struct.pack("<IQQ", 3, claimed_tensors, claimed_kv) + b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % 32) + b"\0" * 32
    with path.open("wb") as f:
        f.write(head)
        f.truncate(max(pad_to, len(head)))
    return path


def _timed_refusal(path: Path) -> tuple[GGUFError, float]:
    clear_cache()
    started = time.perf_counter()
    with pytest.raises(GGUFError) as err:
        read_gguf(path)
    return err.value, time.perf_counter() - started


def test_a_million_tensors_is_refused_at_once_naming_count_and_limit(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tensors.gguf", n_tensors=1_000_000, pad_to=40_000_000)
    error, elapsed = _timed_refusal(path)
    assert "tensor count 1,000,000 is over the limit of 65,536" in error.message and str(path) in error.message
    assert elapsed < 1.0


def test_thousands_of_keys_with_a_thousand_strings_each_are_refused_within_the_first_hundred(tmp_path: Path) -> None:
    written = [_kv_string_array(f"junk.{i}", 1000) for i in range(70)]  # the rest claimed, left sparse
    path = write_gguf(tmp_path / "strings.gguf", kvs=written, n_kv=3001, pad_to=30_000_000)
    error, elapsed = _timed_refusal(path)
    assert "array 'junk.65' of 1,000 strings takes the header past 65,536 elements" in error.message
    assert elapsed < 1.0


def test_more_keys_than_any_model_has_are_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "keys.gguf", n_kv=20_000, pad_to=1_000_000)
    error, _ = _timed_refusal(path)
    assert "key/value count 20,000 is over the limit of 16,384" in error.message


def test_a_tensor_name_llama_cpp_would_refuse_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "name.gguf", tensors=[_tensor("x" * (MAX_TENSOR_NAME + 1))])
    error, _ = _timed_refusal(path)
    assert f"is {MAX_TENSOR_NAME + 1} bytes long; llama.cpp allows {MAX_TENSOR_NAME}" in error.message


def test_the_largest_headers_within_the_caps_parse_quickly(tmp_path: Path) -> None:
    many_tensors = write_gguf(tmp_path / "many.gguf", tensors=[_tensor(f"t{i}") for i in range(MAX_TENSORS)])
    full_arrays = write_gguf(tmp_path / "arrays.gguf",
                             kvs=[_kv_string_array(f"k.{i}", 1000) for i in range(MAX_DECODED_ELEMENTS // 1000)])
    counts = []
    for path in (many_tensors, full_arrays):
        clear_cache()
        started = time.perf_counter()
        meta = read_gguf(path)
        assert time.perf_counter() - started < 2.0, path.name  # ~0.3 s on 2 busy cores
        counts.append((len(meta.tensors), len(meta.fields)))
    assert counts == [(MAX_TENSORS, 1), (0, 1 + MAX_DECODED_ELEMENTS // 1000)]


def test_a_refused_header_is_parsed_once_until_the_file_changes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_gguf(tmp_path / "tensors.gguf", n_tensors=1_000_000, pad_to=40_000_000)
    first, _ = _timed_refusal(path)
    parses: list[str] = []
    real_parse = gguf_module._parse
    monkeypatch.setattr(gguf_module, "_parse", lambda *a: parses.append(a[2]) or real_parse(*a))
    with pytest.raises(GGUFError) as again:
        read_gguf(path)
    assert again.value is first and parses == []
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(GGUFError):
        read_gguf(path)
    assert parses == [str(path)]


def test_registry_marks_oversized_headers_invalid_and_keeps_the_demo_models(config_dir: ConfigDir) -> None:
    write_gguf(config_dir.models_dir / "tensors.gguf", n_tensors=1_000_000, pad_to=40_000_000)
    models = config_dir.models()
    demo = next(iter(models["models"].values()))
    models["models"]["hostile"] = {**demo, "file": "tensors.gguf"}
    config_dir.write_models(models)
    clear_cache()
    started = time.perf_counter()
    registry = Registry(load_config(config_dir.path))
    assert time.perf_counter() - started < 2.0
    record = registry.records["hostile"]
    assert record.status == "invalid" and record.reason is not None and "65,536" in record.reason
    assert registry.records["gemma3-270m"].available
