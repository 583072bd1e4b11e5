"""Fault: hostile GGUF headers (issue 13, item 7).

``block_count`` below a ``blk.N`` tensor's index, negative, 4e9 or 3e7 in a file of a few KB made
planning raise IndexError, MemoryError, or spend 39 s and 1.4 GB per estimate. The header is now
checked against the tensors actually present: the registry marks such a model invalid with a reason
that names the field, and the estimator's work is bounded whatever a header says. Estimates are
cached by file identity (path, size, mtime_ns) and spec.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest

from launcher.errors import GGUFError
from launcher.memory.estimate import clear_cache, estimate_for, estimate_memory
from launcher.memory.gguf import MAX_LAYERS, GGUFHeaderError, read_gguf
from launcher.process.server import ServerSpec
from tests.conftest import ConfigDir

gguf = pytest.importorskip("gguf")

TENSORS = ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_q.weight", "output.weight")


def write_model(path: Path, block_count: int, *, signed: bool = False, tensors: tuple[str, ...] = TENSORS,
                **hparams: int) -> Path:
    """A tiny llama-architecture GGUF (a few KB) with the given block_count, written by gguf-py."""
    writer = gguf.GGUFWriter(str(path), "llama")
    (writer.add_int32 if signed else writer.add_uint32)("llama.block_count", block_count)
    values = {"embedding_length": 64, "attention.head_count": 4, "context_length": 512,
              "feed_forward_length": 128, **hparams}
    for key, value in values.items():
        (writer.add_int32 if value < 0 else writer.add_uint32)(f"llama.{key}", value)
    for name in tensors:
        writer.add_tensor(name, np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


HOSTILE = {
    "below_a_tensor_index": dict(block_count=1),            # blk.1.* exists: IndexError before
    "zero_with_tensors": dict(block_count=0),
    "negative": dict(block_count=-1, signed=True),          # IndexError before
    "four_billion": dict(block_count=4_000_000_000),        # MemoryError before
    "thirty_million": dict(block_count=30_000_000),         # 39 s and 1.4 GB per estimate before
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_block_count_is_a_header_error_naming_the_field_and_is_fast(tmp_path: Path, case: str) -> None:
    path = write_model(tmp_path / f"{case}.gguf", **HOSTILE[case])  # type: ignore[arg-type]
    assert path.stat().st_size < 16 * 1024
    started = time.perf_counter()
    with pytest.raises(GGUFHeaderError) as info:
        read_gguf(path)
    elapsed = time.perf_counter() - started
    err = info.value
    assert isinstance(err, GGUFError) and err.field == "llama.block_count"
    assert err.value == HOSTILE[case]["block_count"] and err.reason
    assert "llama.block_count" in err.message and str(path) in err.message
    assert elapsed < 2.0, f"{case}: {elapsed:.1f} s"


def test_negative_hparam_is_a_header_error(tmp_path: Path) -> None:
    path = write_model(tmp_path / "neg.gguf", 2, **{"attention.head_count": -4})
    with pytest.raises(GGUFHeaderError) as info:
        read_gguf(path)
    assert info.value.field == "llama.head_count"


def test_valid_tiny_model_still_reads_and_estimates(tmp_path: Path) -> None:
    path = write_model(tmp_path / "ok.gguf", 2)
    meta = read_gguf(path)
    assert meta.block_count == 2
    est = estimate_memory(meta, ServerSpec("ok", path, n_ctx=512))
    assert est.ram_bytes > 0


def test_estimator_refuses_hostile_metadata_however_it_was_built(tmp_path: Path) -> None:
    """A GGUFMetadata made in code (not by read_gguf) with a huge block_count: the estimator still checks
    it first, so it neither allocates per-layer lists nor loops 3e7 times."""
    meta = read_gguf(write_model(tmp_path / "ok.gguf", 2))
    spec = ServerSpec("ok", tmp_path / "ok.gguf", n_ctx=512)
    for block_count in (30_000_000, 4_000_000_000, -1, 1):
        hostile = dataclasses.replace(meta, block_count=block_count)
        started = time.perf_counter()
        with pytest.raises(GGUFHeaderError):
            estimate_memory(hostile, spec)
        assert time.perf_counter() - started < 1.0
    assert MAX_LAYERS == 512


def test_registry_marks_hostile_models_invalid_with_the_reason_and_keeps_the_good_one(
        config_dir: ConfigDir) -> None:
    from orchestrator.config.registry import Registry
    from orchestrator.config.schema import load_config

    models = config_dir.models()
    demo = next(iter(models["models"].values()))
    for case, kwargs in HOSTILE.items():
        write_model(config_dir.models_dir / f"{case}.gguf", **kwargs)  # type: ignore[arg-type]
        models["models"][case] = {**demo, "file": f"{case}.gguf"}
    config_dir.write_models(models)
    registry = Registry(load_config(config_dir.path))
    for case in HOSTILE:
        rec = registry.records[case]
        assert rec.status == "invalid", (case, rec.status, rec.reason)
        assert rec.reason is not None and "block_count" in rec.reason, rec.reason
    assert registry.records["gemma3-270m"].available


def test_estimates_are_cached_by_file_identity_and_spec(tmp_path: Path) -> None:
    clear_cache()
    path = write_model(tmp_path / "ok.gguf", 2)
    spec = ServerSpec("ok", path, n_ctx=512)
    first = estimate_for(spec)
    assert estimate_for(spec) is first                                   # same file, same spec: cached
    assert estimate_for(dataclasses.replace(spec, n_ctx=1024)) is not first   # another spec
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert estimate_for(spec) is not first                               # touched: recomputed
    write_model(path, 30_000_000)                                        # replaced by a hostile file
    with pytest.raises(GGUFHeaderError):
        estimate_for(spec)
