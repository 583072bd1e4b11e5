"""The fast GGUF header reader: agrees with gguf.GGUFReader, applies llama.cpp's rules, fails cleanly."""

from __future__ import annotations

import json
import os
import random
import struct
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from launcher.errors import GGUFError
from launcher.memory import gguf as gguf_module
from launcher.memory.gguf import ArrayInfo, GGUFMetadata, clear_cache, read_gguf

if TYPE_CHECKING:
    from gguf import GGUFReader

# GGUF value type ids (gguf.GGUFValueType), spelled out so the hand-built files do not depend on gguf-py.
UINT8, INT32, UINT32, FLOAT32, BOOL, STRING, ARRAY, UINT64 = 0, 5, 4, 6, 7, 8, 9, 10


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CHORUS_CACHE_DIR", str(tmp_path / "cache"))  # headers kept on disk: this test's own
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def demo_path(demo_model: Path) -> Path:
    return demo_model


@pytest.fixture(scope="module")
def demo(demo_path: Path) -> GGUFMetadata:
    clear_cache()
    return read_gguf(demo_path)


@pytest.fixture(scope="module")
def reference(demo_path: Path) -> GGUFReader:
    """gguf-py's own reader of the demo model; slow (~12 s), so built once per module."""
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(demo_path)


# ------------------------------------------------------------------------------- hand-built files


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def _u32(key: str, value: int) -> bytes:
    return _kv(key, UINT32, struct.pack("<I", value))


def _text(key: str, value: str) -> bytes:
    return _kv(key, STRING, _str(value))


def _array(key: str, etype: int, count: int, body: bytes) -> bytes:
    return _kv(key, ARRAY, struct.pack("<IQ", etype, count) + body)


def _gguf(kvs: list[bytes], tensors: Sequence[tuple[str, tuple[int, ...], int]] = (), *,
          version: int = 3, data: bytes | None = None) -> bytes:
    """A GGUF file: header, the given KV blobs, F32-or-given-type tensors laid out back to back."""
    table, offset, sizes = b"", 0, []
    for name, shape, ggml_type in tensors:
        table += _str(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
        table += struct.pack("<IQ", ggml_type, offset)
        n = 4
        for d in shape:
            n *= d
        sizes.append(n)
        offset += -(-n // 32) * 32
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + table
    if tensors:
        head += b"\0" * (-len(head) % 32)
    return head + (data if data is not None else b"\0" * offset)


def _model_kvs(arch: str, *extra: bytes, blocks: int = 8) -> list[bytes]:
    return [_text("general.architecture", arch), _u32(f"{arch}.block_count", blocks),
            _u32(f"{arch}.embedding_length", 64), _u32(f"{arch}.attention.head_count", 4), *extra]


def _write(tmp_path: Path, content: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------- agreement with gguf.GGUFReader


def test_every_scalar_field_and_array_length_matches_gguf_reader(demo: GGUFMetadata,
                                                                 reference: GGUFReader) -> None:
    from gguf import GGUFValueType

    ref_keys = [k for k in reference.fields if not k.startswith("GGUF.")]
    assert list(demo.fields) == ref_keys
    for key in ref_keys:
        field, ours = reference.fields[key], demo.fields[key]
        if field.types[0] == GGUFValueType.ARRAY:
            length = ours.length if isinstance(ours, ArrayInfo) else len(ours)
            assert length == len(field.data), key
            if isinstance(ours, ArrayInfo):
                assert ours.element_type == field.types[-1].name, key
            else:
                assert list(ours) == field.contents(), key
        else:
            assert ours == field.contents(), key
            assert type(ours) is type(field.contents()), key


def test_every_tensor_name_type_shape_and_size_matches_gguf_reader(demo: GGUFMetadata,
                                                                   reference: GGUFReader) -> None:
    assert [t.name for t in demo.tensors] == [t.name for t in reference.tensors]
    for ref in reference.tensors:
        ours = demo.tensor(ref.name)
        assert ours is not None
        assert ours.ggml_type == int(ref.tensor_type) and ours.type_name == ref.tensor_type.name
        # GGUFReader keeps ne order in .shape and reverses it for the numpy view of the data.
        assert ours.shape == tuple(int(d) for d in ref.shape)
        if ours.type_name == "F32":
            assert tuple(ref.data.shape) == ours.shape[::-1]
        assert ours.n_bytes == ref.n_bytes
        assert demo.data_offset + ours.offset == ref.data_offset
    assert demo.tensor_bytes == sum(int(t.n_bytes) for t in reference.tensors)
    assert demo.alignment == reference.alignment and demo.data_offset == reference.data_offset


def test_demo_model_hparams_are_the_ones_llama_cpp_reads(demo: GGUFMetadata, reference: GGUFReader) -> None:
    assert demo.architecture == "gemma3" and demo.version == 3
    assert demo.context_length == 32768 and demo.block_count == 18
    assert demo.quantization == "Q4_K_M" and demo.file_type == 15
    assert demo.vocab_size == len(reference.fields["tokenizer.ggml.tokens"].data) == 262144
    assert demo.has_chat_template == ("tokenizer.chat_template" in reference.fields)
    assert demo.chat_template is None if not demo.has_chat_template else isinstance(demo.chat_template, str)
    assert demo.sliding_window == reference.fields["gemma3.attention.sliding_window"].contents()
    assert demo.key_length == reference.fields["gemma3.attention.key_length"].contents()
    assert demo.head_count_kv_at(0) == reference.fields["gemma3.attention.head_count_kv"].contents()


def test_demo_model_swa_layers_follow_gemma3_rule_five_sliding_then_one_full(demo: GGUFMetadata) -> None:
    # llama.cpp gemma3: load_swa_pattern(ml, 6) -> is_swa(il) = il % 6 < 5
    assert demo.sliding_window_pattern == 6
    assert [demo.is_swa_layer(i) for i in range(18)] == [i % 6 < 5 for i in range(18)]
    assert [i for i in range(18) if not demo.is_swa_layer(i)] == [5, 11, 17]
    with pytest.raises(IndexError):
        demo.is_swa_layer(18)


def test_summary_is_json_safe_and_has_no_tensor_table(demo: GGUFMetadata) -> None:
    summary = demo.to_summary()
    assert json.loads(json.dumps(summary)) == summary
    assert "fields" not in summary and "tensors" not in summary
    assert summary["architecture"] == "gemma3" and summary["quantization"] == "Q4_K_M"


# ---------------------------------------------------------------------------------------- caching


def test_cache_returns_same_object_for_unchanged_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _gguf(_model_kvs("llama")))
    first = read_gguf(path)
    assert read_gguf(str(path)) is first
    clear_cache()
    assert read_gguf(path) is not first


def test_cache_rereads_a_rewritten_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _gguf([*_model_kvs("llama"), _text("general.name", "one")]))
    first = read_gguf(path)
    path.write_bytes(_gguf([*_model_kvs("llama"), _text("general.name", "two")]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse-mtime filesystems
    second = read_gguf(path)
    assert second is not first and (first.name, second.name) == ("one", "two")


def test_cache_rereads_after_touch(tmp_path: Path) -> None:
    path = _write(tmp_path, _gguf(_model_kvs("llama")))
    first = read_gguf(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert read_gguf(path) is not first


def _no_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*_args: object) -> None:
        raise AssertionError("parsed the file again")
    monkeypatch.setattr(gguf_module, "_read_file", parse)


def test_a_header_read_once_is_read_back_from_disk_by_a_new_process_without_parsing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kvs = [*_model_kvs("gemma3", _u32("gemma3.attention.sliding_window", 512)), _text("general.name", "g"),
           _array("tokenizer.ggml.tokens", STRING, 3000, b"".join(_str(f"t{i}") for i in range(3000))),
           _array("gemma3.attention.head_count_kv", INT32, 8, struct.pack("<8i", *range(1, 9)))]
    path = _write(tmp_path, _gguf(kvs, [("token_embd.weight", (64, 3000), 0), ("blk.0.attn_q.weight", (64, 64), 1)]))
    parsed = read_gguf(path)
    clear_cache(disk=False)  # what a new process starts with
    _no_parse(monkeypatch)
    again = read_gguf(path)
    assert again == parsed and again.fields == parsed.fields and again.tensors == parsed.tensors
    assert again.fields["tokenizer.ggml.tokens"] == ArrayInfo("STRING", 3000)
    assert again.head_count_kv == tuple(range(1, 9))


def test_the_demo_models_header_read_back_from_disk_equals_the_parsed_one(
        demo_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = read_gguf(demo_path)
    clear_cache(disk=False)
    _no_parse(monkeypatch)
    again = read_gguf(demo_path)
    assert (again, again.fields, again.tensors, again.chat_template) == (parsed, parsed.fields, parsed.tensors,
                                                                        parsed.chat_template)


def test_a_rewritten_file_is_parsed_again_not_served_from_disk(tmp_path: Path) -> None:
    path = _write(tmp_path, _gguf([*_model_kvs("llama"), _text("general.name", "one")]))
    read_gguf(path)
    path.write_bytes(_gguf([*_model_kvs("llama"), _text("general.name", "two")]))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    clear_cache(disk=False)
    assert read_gguf(path).name == "two"


def test_a_damaged_disk_entry_is_parsed_again_and_rewritten(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, _gguf(_model_kvs("llama")))
    parsed = read_gguf(path)
    [entry] = (tmp_path / "cache" / "gguf").glob("*.json")
    entry.write_text('{"format": 1, "path": "elsewhere"')
    clear_cache(disk=False)
    assert read_gguf(path) == parsed
    json.loads(entry.read_text())  # whole again
    clear_cache(disk=False)
    _no_parse(monkeypatch)
    assert read_gguf(path) == parsed


def test_the_disk_cache_keeps_the_most_recently_read_headers_only(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_module, "DISK_MAX_ENTRIES", 3)
    paths = [_write(tmp_path, _gguf([*_model_kvs("llama"), _text("general.name", f"m{i}")]), f"m{i}.gguf")
             for i in range(5)]
    for path in paths:
        read_gguf(path)
        time.sleep(0.02)  # distinct mtimes on a filesystem with a coarse clock
    kept = {json.loads(e.read_text())["path"] for e in (tmp_path / "cache" / "gguf").glob("*.json")}
    assert kept == {str(p.resolve()) for p in paths[2:]}


# -------------------------------------------------------------------------------- hand-built files


def test_large_string_array_is_skipped_exactly_and_agrees_with_gguf_reader(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    rng = random.Random(7)
    # A first run of 1024+ strings under 256 bytes (the regex fast path), then lengths up to 300 that
    # cross its limit (the walk); arbitrary bytes include NULs and invalid UTF-8.
    strings = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 17, 255])))
               for _ in range(1100)]
    strings += [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 17, 255, 256, 300])))
                for _ in range(1900)]
    body = b"".join(_str(s) for s in strings)
    kvs = [*_model_kvs("llama"), _array("tokenizer.ggml.tokens", STRING, len(strings), body),
           _array("tokenizer.ggml.scores", FLOAT32, 2000, struct.pack("<2000f", *range(2000))),
           _array("llama.attention.head_count_kv", INT32, 8, struct.pack("<8i", 1, 2, 0, 2, 1, 2, 0, 2)),
           _array("small.strings", STRING, 2, _str("a") + _str(b"\xff")),
           _text("after.arrays", "still in sync")]
    path = _write(tmp_path, _gguf(kvs, [("w", (32, 2), 0)]))
    meta = read_gguf(path)
    assert meta.fields["tokenizer.ggml.tokens"] == ArrayInfo("STRING", 3000)
    assert meta.fields["tokenizer.ggml.scores"] == ArrayInfo("FLOAT32", 2000)
    assert meta.fields["small.strings"] == ("a", "\ufffd")
    assert meta.fields["after.arrays"] == "still in sync"
    assert meta.vocab_size == 3000
    assert meta.head_count_kv == (1, 2, 0, 2, 1, 2, 0, 2) and meta.head_count_kv_at(2) == 0
    ref = gguf.GGUFReader(path)
    assert len(ref.fields["tokenizer.ggml.tokens"].data) == 3000
    assert meta.data_offset == ref.data_offset
    assert [(t.name, t.n_bytes) for t in meta.tensors] == [(t.name, int(t.n_bytes)) for t in ref.tensors]


def test_head_count_kv_falls_back_to_head_count_like_llama_cpp(tmp_path: Path) -> None:
    meta = read_gguf(_write(tmp_path, _gguf(_model_kvs("llama"))))
    assert meta.head_count_kv is None and meta.head_count_kv_at(3) == 4
    assert meta.key_length == meta.value_length == 64 // 4


@pytest.mark.parametrize(("arch", "extra", "expected"), [
    ("gemma2", [], [i % 2 < 1 for i in range(8)]),                                 # always on, pattern 2
    ("gemma3", [], [False] * 8),                                                    # no window -> no SWA
    ("gemma3", ["window", "pattern3"], [i % 3 < 2 for i in range(8)]),             # file pattern wins
    ("cohere2moe", ["window"], [i % 4 != 0 for i in range(8)]),                    # dense_first
    ("gemma4", ["window", "bools"], [True, False, True, True, False, True, True, False]),
    ("phi3", ["window"], [False] * 8),                                              # llama.cpp disables it
    ("llama", ["window"], [False] * 8),                                             # no SWA code for llama
])
def test_swa_layers_follow_llama_cpp_per_architecture(tmp_path: Path, arch: str, extra: list[str],
                                                      expected: list[bool]) -> None:
    blobs = {
        "window": _u32(f"{arch}.attention.sliding_window", 512),
        "pattern3": _u32(f"{arch}.attention.sliding_window_pattern", 3),
        "bools": _array(f"{arch}.attention.sliding_window_pattern", BOOL, 8,
                        bytes([1, 0, 1, 1, 0, 1, 1, 0])),
    }
    meta = read_gguf(_write(tmp_path, _gguf(_model_kvs(arch, *(blobs[e] for e in extra)))))
    assert [meta.is_swa_layer(i) for i in range(8)] == expected
    assert (meta.sliding_window is None) == (not any(expected))


# ------------------------------------------------------------------------------------ clean errors


def _assert_gguf_error(path: Path, *words: str) -> GGUFError:
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    for word in words:
        assert word in err.message
    return err


def test_zero_byte_file_is_a_clean_error(tmp_path: Path) -> None:
    _assert_gguf_error(_write(tmp_path, b""), "empty")


def test_wrong_magic_is_a_clean_error_at_offset_zero(tmp_path: Path) -> None:
    err = _assert_gguf_error(_write(tmp_path, b"GGML" + b"\0" * 60), "not a GGUF file")
    assert err.offset == 0


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_unsupported_version_is_a_clean_error(tmp_path: Path, version: int) -> None:
    content = b"GGUF" + struct.pack("<IQQ", version, 0, 0)
    _assert_gguf_error(_write(tmp_path, content), "endian" if version == 0x03000000 else "version")


def test_directory_missing_file_and_fifo_are_clean_errors(tmp_path: Path) -> None:
    _assert_gguf_error(tmp_path, "directory")
    _assert_gguf_error(tmp_path / "absent.gguf", "cannot read")
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    _assert_gguf_error(fifo, "not a regular file")  # and does not block on open


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file_is_a_clean_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _gguf(_model_kvs("llama")))
    path.chmod(0)
    _assert_gguf_error(path, "cannot read")


def _truncated_copy(src: Path, tmp_path: Path, size: int) -> Path:
    dst = tmp_path / f"cut-{size}.gguf"
    with open(src, "rb") as f:
        dst.write_bytes(f.read(size))
    return dst


def test_demo_model_truncated_in_each_section_is_a_clean_error(demo: GGUFMetadata, demo_path: Path,
                                                                tmp_path: Path) -> None:
    with open(demo_path, "rb") as f:
        head = f.read(demo.data_offset)
    tokens_at = head.index(b"tokenizer.ggml.tokens")
    cuts = {
        "header": 10,
        "kv section": tokens_at - 10,  # inside the key "tokenizer.ggml.tokens"
        "tokens array": tokens_at + 3_000_000,  # past the count guard: the walk itself runs out
        "tensor table": demo.data_offset - 100,
    }
    for where, size in cuts.items():
        err = _assert_gguf_error(_truncated_copy(demo_path, tmp_path, size), "truncated")
        assert err.offset is not None and err.offset <= size, where


def test_demo_model_truncated_inside_tensor_data_is_a_clean_error(demo: GGUFMetadata, demo_path: Path,
                                                                   tmp_path: Path) -> None:
    dst = _truncated_copy(demo_path, tmp_path, demo.data_offset + 4096)
    with open(dst, "r+b") as f:  # sparse: 90% of the size without copying 230 MB
        f.truncate(demo.file_size * 9 // 10)
    _assert_gguf_error(dst, "past the end")


@pytest.mark.parametrize("size", [1, 3, 4, 8, 24, 100, 4096, 65536])
def test_random_bytes_are_a_clean_error(tmp_path: Path, size: int) -> None:
    rng = random.Random(size)
    noise = bytes(rng.randrange(256) for _ in range(size))
    _assert_gguf_error(_write(tmp_path, noise, "noise.gguf"))
    if size >= 8:
        _assert_gguf_error(_write(tmp_path, b"GGUF" + struct.pack("<I", 3) + noise, "magic.gguf"))


def test_random_corruption_of_a_valid_file_never_escapes_as_another_exception(tmp_path: Path) -> None:
    good = _gguf([*_model_kvs("llama"), _array("tokenizer.ggml.tokens", STRING, 1100,
                                               b"".join(_str(f"t{i}") for i in range(1100)))],
                 [("a", (32, 4), 0), ("b", (64,), 0)])
    rng = random.Random(42)
    path = tmp_path / "fuzz.gguf"
    outcomes: Counter[str] = Counter()
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.choice([len(data), rng.randrange(len(data))])]
        path.write_bytes(bytes(data))
        clear_cache()
        try:
            read_gguf(path)
            outcomes["read"] += 1
        except GGUFError:
            outcomes["GGUFError"] += 1
    assert outcomes["GGUFError"] > 0 and outcomes["read"] > 0


def test_unknown_value_type_is_a_clean_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _gguf([*_model_kvs("llama"), _kv("bad.type", 13, b"\0" * 8)]))
    assert _assert_gguf_error(path, "unknown value type", "bad.type").offset is not None


@pytest.mark.parametrize(("etype", "what"), [(UINT8, "UINT8"), (UINT64, "UINT64"), (STRING, "strings")])
def test_huge_claimed_array_length_is_a_clean_error_without_allocating(tmp_path: Path, etype: int,
                                                                       what: str) -> None:
    path = _write(tmp_path, _gguf([*_model_kvs("llama"), _array("huge", etype, 2**62, b"\0" * 64)]))
    _assert_gguf_error(path, "huge", what)


def test_huge_string_length_and_counts_are_clean_errors(tmp_path: Path) -> None:
    _assert_gguf_error(_write(tmp_path, _gguf([_kv("k", STRING, struct.pack("<Q", 2**63))])), "length")
    _assert_gguf_error(_write(tmp_path, b"GGUF" + struct.pack("<IQQ", 3, 0, 2**40)), "count")
    _assert_gguf_error(_write(tmp_path, b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0)), "count")


def test_unknown_ggml_type_and_bad_tensor_shapes_are_clean_errors(tmp_path: Path) -> None:
    kvs = _model_kvs("llama")
    _assert_gguf_error(_write(tmp_path, _gguf(kvs, [("w", (32,), 4)])), "unknown ggml type")
    _assert_gguf_error(_write(tmp_path, _gguf(kvs, [("w", (30,), 8)])), "multiple of 32")  # Q8_0 block
    _assert_gguf_error(_write(tmp_path, _gguf(kvs, [("w", (1, 1, 1, 1, 1), 0)])), "dimensions")
    _assert_gguf_error(_write(tmp_path, _gguf(kvs, [("w", (4,), 0), ("w", (4,), 0)])), "duplicate")


def test_tensor_data_past_end_of_file_is_a_clean_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _gguf(_model_kvs("llama"), [("w", (1024,), 0)], data=b"\0" * 100))
    _assert_gguf_error(path, "past the end")


def test_non_power_of_two_alignment_is_a_clean_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _gguf([*_model_kvs("llama"), _u32("general.alignment", 24)]))
    _assert_gguf_error(path, "power of two")
