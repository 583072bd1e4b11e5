"""The synthetic model zoo (bench/zoo/make_zoo.py): real tokenizers and attention shapes, few layers, sparse files.

The unit tests read the generated headers; the integration test starts every zoo model in the real
llama-server, one after another, and checks that it answers and that llama.cpp's own buffer sizes are the
estimator's.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from bench.zoo.make_zoo import ZOO, ZooModel, ensure_zoo, vocab_dir
from launcher.memory.calibration import measure_server
from launcher.memory.estimate import (
    EstimatorSettings,
    compute_basis,
    compute_buffer_bytes,
    detect_repack_types,
    estimate_memory,
    host_compute_bytes,
    kv_bytes_per_layer,
)
from launcher.memory.gguf import GGUFMetadata, read_gguf
from launcher.memory.probes import GpuMemory
from launcher.process.server import CTX_CHECKPOINTS, ModelServer, ServerOptions, ServerSpec
from tests.conftest import REPO

MiB = 1 << 20
GiB = 1 << 30
BY_NAME = {m.name: m for m in ZOO}


@pytest.fixture(scope="session")
def zoo() -> dict[str, Path]:
    """The zoo's files, made once per zoo version in the chorus cache (about a minute the first time)."""
    if not any(vocab_dir().glob("ggml-vocab-*.gguf")) and "CHORUS_ZOO_DIR" not in os.environ:
        pytest.skip(f"llama.cpp's vocab files are not in {vocab_dir()}: run scripts/build_llama_server.sh")
    return ensure_zoo()


def test_zoo_covers_the_popular_families() -> None:
    archs = {m.arch for m in ZOO}
    assert {"llama", "qwen2", "phi3", "gemma2", "qwen3moe"} <= archs
    assert any(m.n_swa for m in ZOO) and any(m.n_expert for m in ZOO)
    assert {m.name for m in ZOO} >= {"llama3-8b", "qwen2.5-7b", "mistral-7b", "phi3-mini", "gemma2-9b"}


@pytest.mark.parametrize("model", ZOO, ids=lambda m: m.name)
def test_zoo_header_has_the_real_models_shapes(zoo: dict[str, Path], model: ZooModel) -> None:
    meta = read_gguf(zoo[model.name])
    assert meta.architecture == model.arch and meta.block_count == model.n_layer
    assert (meta.embedding_length, meta.head_count, meta.head_count_kv) == (model.n_embd, model.n_head,
                                                                          model.n_head_kv)
    assert meta.key_length == meta.value_length == model.head_dim
    assert meta.vocab_size == model.vocab_size
    assert meta.fields.get("tokenizer.ggml.model") is not None  # a real tokenizer, copied from llama.cpp
    assert (meta.sliding_window or 0) == model.n_swa
    assert meta.fields.get(f"{model.arch}.expert_count", 0) == model.n_expert
    embd = meta.tensor("token_embd.weight")
    assert embd is not None and embd.shape == (model.n_embd, model.vocab_size)
    assert (meta.tensor("output.weight") is None) == model.tied


@pytest.mark.parametrize("model", ZOO, ids=lambda m: m.name)
def test_zoo_file_is_sparse_and_small_on_disk(zoo: dict[str, Path], model: ZooModel) -> None:
    st = zoo[model.name].stat()
    meta = read_gguf(zoo[model.name])
    assert st.st_size == meta.data_offset + sum((t.n_bytes + 31) // 32 * 32 for t in meta.tensors)
    assert st.st_blocks * 512 < 40 * MiB < st.st_size / 5  # the zero weights are holes


def test_kv_cache_of_zoo_models_follows_gqa_and_the_sliding_window(zoo: dict[str, Path]) -> None:
    llama = read_gguf(zoo["llama3-8b"])
    # 8 KV heads of 128, K and V in f16, per cell per layer
    assert kv_bytes_per_layer(llama, 4096, 1) == [4096 * 8 * 128 * 2 * 2] * 2
    phi = read_gguf(zoo["phi3-mini"])  # no GQA: 32 KV heads of 96
    assert kv_bytes_per_layer(phi, 4096, 1) == [4096 * 32 * 96 * 2 * 2] * 2
    gemma = read_gguf(zoo["gemma2-9b"])  # every other layer slides over 4096 tokens
    row = 8 * 256 * 2 * 2
    assert kv_bytes_per_layer(gemma, 32768, 3) == [3 * 4608 * row, 3 * 32768 * row]  # pad256(4096 + 512)
    assert kv_bytes_per_layer(gemma, 2048, 1) == [2048 * row] * 2  # shorter than the window: no cap


@pytest.mark.integration
def test_every_zoo_model_answers_in_llama_server_with_the_estimated_buffers(
        zoo: dict[str, Path], llama_server_bin: Path, tmp_path: Path) -> None:
    """One short request per model, servers started one after another and stopped; llama.cpp's logged KV
    and weight buffers are the estimator's to the byte (within the log's 0.01 MiB rounding)."""
    settings = EstimatorSettings(repack_types=detect_repack_types())
    for name, path in zoo.items():
        spec = ServerSpec(name, path, n_ctx=512, slots=1)
        server = ModelServer(spec, llama_server_bin, tmp_path, ServerOptions(log_verbosity=4)).start()
        try:
            r = httpx.post(f"{server.base_url}/completion", timeout=120,
                           headers={"Authorization": f"Bearer {server.api_key}"},
                           json={"prompt": "Hello, world", "n_predict": 4, "seed": 1})
            m = measure_server(server)
        finally:
            server.stop()
        assert r.status_code == 200, f"{name}: {r.text[:200]}"
        assert r.json()["tokens_predicted"] >= 1, name
        assert m is not None and m.buffers, name
        est = estimate_memory(read_gguf(path), spec, (), settings)
        ram, logged = est.breakdown["ram"], m.buffers["ram"]
        assert abs(ram["kv"] - logged["kv"]) <= 0.01 * MiB, name
        weights = ram["weights"] + ram.get("weights_repacked", 0)
        assert abs(weights - logged["weights"]) <= 0.02 * MiB, (name, weights / MiB, logged["weights"] / MiB)
        assert abs(ram["output"] - logged["output"]) <= 0.01 * MiB, name


# ---------------------------------------------------------------- VRAM on paper, over the zoo's shapes

GPU = (GpuMemory(0, "sim-80g", 80 * GiB, 80 * GiB),)
NO_REPACK = EstimatorSettings(repack_types=frozenset())


def _layer_bytes(meta: GGUFMetadata, il: int) -> int:
    return sum(t.n_bytes for t in meta.tensors if t.name.startswith(f"blk.{il}."))


def _output_bytes(meta: GGUFMetadata) -> int:
    return sum(t.n_bytes for t in meta.tensors if t.name.startswith(("output.", "output_norm")))


def test_full_offload_puts_every_layer_its_kv_and_a_compute_buffer_on_the_gpu(zoo: dict[str, Path]) -> None:
    meta = read_gguf(zoo["llama3-8b"])
    spec = ServerSpec("llama3", zoo["llama3-8b"], n_ctx=8192, slots=2, n_gpu_layers=-1)
    est = estimate_memory(meta, spec, GPU, NO_REPACK)
    gpu, ram = est.breakdown["gpu0"], est.breakdown["ram"]
    embd = meta.tensor("token_embd.weight")
    assert embd is not None and est.gpu_layers_used == meta.block_count + 1  # + the output layer
    assert gpu["weights"] == meta.tensor_bytes - embd.n_bytes  # the input layer stays on the CPU
    assert ram["weights"] == embd.n_bytes == est.mapped_bytes
    assert gpu["kv"] == sum(kv_bytes_per_layer(meta, 8192, 2)) and "kv" not in ram
    assert gpu["compute"] == compute_buffer_bytes(meta, 8192, 2, NO_REPACK)
    assert gpu["overhead"] == NO_REPACK.gpu_context_bytes
    assert ram["compute"] == host_compute_bytes(meta, NO_REPACK, 2) < gpu["compute"]


def test_partial_offload_splits_weights_and_kv_by_layer_from_the_output_down(zoo: dict[str, Path]) -> None:
    meta = read_gguf(zoo["gemma2-9b"])  # tied output: the GPU gets its own copy of token_embd
    spec = ServerSpec("gemma2", zoo["gemma2-9b"], n_ctx=32768, slots=3, n_gpu_layers=2)
    est = estimate_memory(meta, spec, GPU, NO_REPACK)
    embd = meta.tensor("token_embd.weight")
    assert embd is not None and est.gpu_layers_used == 2  # the output layer and layer 1
    gpu, ram = est.breakdown["gpu0"], est.breakdown["ram"]
    assert gpu["weights"] == _output_bytes(meta) + embd.n_bytes + _layer_bytes(meta, 1)
    swa, full = kv_bytes_per_layer(meta, 32768, 3)
    assert (ram["kv"], gpu["kv"]) == (swa, full)  # layer 0 slides (CPU), layer 1 is full attention (GPU)
    assert "compute" in ram and "compute" in gpu  # both backends run part of the graph
    none = estimate_memory(meta, replace(spec, n_gpu_layers=0), GPU, NO_REPACK)
    assert none.vram_bytes == 0 and none.gpu_layers_used == 0


def test_moe_experts_go_with_their_layer(zoo: dict[str, Path]) -> None:
    meta = read_gguf(zoo["qwen3-30b-a3b"])
    spec = ServerSpec("moe", zoo["qwen3-30b-a3b"], n_ctx=4096, slots=1, n_gpu_layers=2)
    est = estimate_memory(meta, spec, GPU, NO_REPACK)
    experts = sum(t.n_bytes for t in meta.tensors if t.name.startswith("blk.1.") and "_exps" in t.name)
    assert experts > 0.9 * _layer_bytes(meta, 1)
    assert est.breakdown["gpu0"]["weights"] == _output_bytes(meta) + _layer_bytes(meta, 1)


def test_kv_offload_off_keeps_the_cache_in_ram(zoo: dict[str, Path]) -> None:
    meta = read_gguf(zoo["qwen2.5-7b"])
    spec = ServerSpec("qwen", zoo["qwen2.5-7b"], n_ctx=4096, slots=1, n_gpu_layers=-1, extra_args=("-nkvo",))
    est = estimate_memory(meta, spec, GPU, NO_REPACK)
    assert "kv" not in est.breakdown["gpu0"] and est.breakdown["ram"]["kv"] == sum(kv_bytes_per_layer(meta, 4096, 1))


# ---------------------------------------------------------------- the estimator's components on the zoo

AVX2 = EstimatorSettings(repack_types=frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}))


def test_mapped_weights_are_the_span_llama_cpp_keeps_mapped(zoo: dict[str, Path]) -> None:
    """Repacked tensors after the last mapped one are unmapped by llama.cpp: they are not in the RSS twice."""
    meta = read_gguf(zoo["llama3-8b"])
    est = estimate_memory(meta, ServerSpec("l", zoo["llama3-8b"], n_ctx=512), (), AVX2)
    kept = [t for t in meta.tensors if t.type_name != "Q4_0"]  # token_embd (Q8_0) and the norms
    assert est.mapped_bytes == max(t.offset + t.n_bytes for t in kept) - min(t.offset for t in kept)
    assert est.mapped_bytes < meta.tensor_bytes - 90 * MiB  # layer 1's FFN, last in the file, is unmapped
    assert round(est.mapped_bytes / MiB, 2) == 953.70  # llama.cpp: "CPU_Mapped model buffer size = 953.70 MiB"
    assert round(est.breakdown["ram"]["weights_repacked"] / MiB, 2) == 515.81  # "CPU_REPACK ... = 515.81 MiB"


def test_ctx_checkpoints_hold_a_copy_of_each_slots_sliding_window_cache(zoo: dict[str, Path]) -> None:
    gemma = read_gguf(zoo["gemma2-9b"])
    spec = ServerSpec("g", zoo["gemma2-9b"], n_ctx=32768, slots=3, extra_args=("--ctx-checkpoints", "4"))
    est = estimate_memory(gemma, spec, (), NO_REPACK)
    swa_layer = kv_bytes_per_layer(gemma, 32768, 3)[0]  # layer 0 slides: 3 streams of 4608 cells
    assert est.breakdown["ram"]["checkpoints"] == 4 * 3 * swa_layer // 3
    default = estimate_memory(gemma, replace(spec, extra_args=()), (), NO_REPACK)
    assert default.breakdown["ram"]["checkpoints"] == CTX_CHECKPOINTS * 3 * swa_layer // 3  # what chorus starts
    off = estimate_memory(gemma, replace(spec, extra_args=("-ctxcp", "0")), (), NO_REPACK)
    assert "checkpoints" not in off.breakdown["ram"]
    llama = read_gguf(zoo["llama3-8b"])
    dense = estimate_memory(llama, ServerSpec("l", zoo["llama3-8b"], extra_args=("-ctxcp", "4")), (), NO_REPACK)
    assert "checkpoints" not in dense.breakdown["ram"]  # no sliding window: llama-server makes none


def test_moe_compute_buffer_counts_the_routed_experts_not_the_dense_width(zoo: dict[str, Path]) -> None:
    meta = read_gguf(zoo["qwen3-30b-a3b"])
    ub, n_embd = NO_REPACK.n_ubatch, 2048
    dense = replace(meta, fields={k: v for k, v in meta.fields.items() if "expert" not in k})
    moe_ffn, dense_ffn = 8 * (3 * 768 + n_embd) + 4 * 128, 3 * 6144
    assert (compute_buffer_bytes(meta, 512, 1, NO_REPACK) - compute_buffer_bytes(dense, 512, 1, NO_REPACK)
            == ub * 4 * (moe_ffn - dense_ffn))
    assert compute_basis(meta) == "formula" and compute_basis(read_gguf(zoo["phi3-mini"])) == "calibrated"


def test_host_overhead_grows_with_bpe_merges_and_kv_cells(zoo: dict[str, Path]) -> None:
    meta = read_gguf(zoo["llama3-8b"])
    spec = ServerSpec("l", zoo["llama3-8b"], n_ctx=512)
    base = estimate_memory(meta, spec, (), NO_REPACK).breakdown["ram"]["overhead"]
    no_merges = replace(meta, fields={k: v for k, v in meta.fields.items() if k != "tokenizer.ggml.merges"})
    assert base - estimate_memory(no_merges, spec, (), NO_REPACK).breakdown["ram"]["overhead"] == (
        NO_REPACK.host_per_merge_bytes * 280147)
    longer = estimate_memory(meta, replace(spec, n_ctx=4096), (), NO_REPACK).breakdown["ram"]["overhead"]
    assert longer - base == NO_REPACK.host_per_cell_bytes * (4096 - 512)


def test_gpu_check_without_a_working_gpu_says_so_in_its_json_line_and_exits_0(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["gpu"] is False and summary["ran"] is False and summary["target_met"] is None
    assert "nvidia-smi does not work" in summary["reason"]
