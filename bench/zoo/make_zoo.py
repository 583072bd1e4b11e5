"""A synthetic model zoo: small GGUF files with the real tokenizer and attention shapes of popular models.

    python bench/zoo/make_zoo.py [--dir DIR] [--force]

Each model copies the tokenizer of one of llama.cpp's vocab files (``vendor/llama.cpp/models/ggml-vocab-*.gguf``,
in the source the build unpacked) and the shapes of a real model that matter to memory planning: n_embd,
n_head, n_head_kv, head_dim, n_ff, vocab size, sliding window, experts. It has fewer layers, and its weights
are zero except the norms (ones) and the first `RANDOM_ROWS` rows of the token embedding and the output
matrix (random), so a request produces (garbage) tokens. Zero data is never written: the file is sparse,
so a model whose tensors add up to a gigabyte takes a few MB of disk. llama.cpp maps the file and reads
every page (MAP_POPULATE), so the server's resident memory is that of a real model of this shape.

The zoo is made once per `ZOO_VERSION` in ``$CHORUS_ZOO_DIR`` or ``<chorus cache>/zoo/v<N>/``; `ensure_zoo`
returns the paths and rebuilds only what is missing. Files are written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

from launcher.paths import cache_dir  # noqa: E402

ZOO_VERSION = 1
RANDOM_ROWS = 2048  # rows of token_embd / output with random values (the rest are zero, not stored)
ALIGNMENT = 32
LLAMA_CPP_VERSION = "0.3.36"
# tokens in each vocab file (checked against the file when a model is made)
VOCAB_SIZES = {"llama-bpe": 128256, "llama-spm": 32000, "qwen2": 151936, "phi-3": 32064, "gemma-4": 262144}


@dataclass(frozen=True)
class ZooModel:
    """The shapes of one real model, with `n_layer` layers instead of its real count."""

    name: str
    like: str             # the model whose shapes these are
    arch: str
    vocab: str            # llama.cpp's models/ggml-vocab-<vocab>.gguf
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_layer: int
    real_layers: int
    tied: bool = False    # no output.weight: the output reuses token_embd
    n_swa: int = 0        # sliding window (0: none)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    bias_qkv: bool = False
    extra: dict[str, tuple[object, V]] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZES[self.vocab]


ZOO: tuple[ZooModel, ...] = (
    ZooModel("llama3-8b", "Meta Llama 3 8B", "llama", "llama-bpe", 4096, 32, 8, 128, 14336, 2, 32,
             extra={"rope.freq_base": (500000.0, V.FLOAT32)}),
    ZooModel("qwen2.5-7b", "Qwen 2.5 7B", "qwen2", "qwen2", 3584, 28, 4, 128, 18944, 2, 28, bias_qkv=True,
             extra={"rope.freq_base": (1000000.0, V.FLOAT32)}),
    ZooModel("mistral-7b", "Mistral 7B v0.3 shapes, v0.1 vocab", "llama", "llama-spm", 4096, 32, 8, 128, 14336,
             2, 32, extra={"rope.freq_base": (1000000.0, V.FLOAT32)}),
    ZooModel("phi3-mini", "Phi-3 mini 4k", "phi3", "phi-3", 3072, 32, 32, 96, 8192, 2, 32,
             extra={"rope.dimension_count": (96, V.UINT32)}),
    ZooModel("gemma2-9b", "Gemma 2 9B (SWA 4096, every other layer; Gemma 4's 262k vocab)", "gemma2", "gemma-4",
             3584, 16, 8, 256, 14336, 2, 42, tied=True, n_swa=4096,
             extra={"attn_logit_softcapping": (50.0, V.FLOAT32), "final_logit_softcapping": (30.0, V.FLOAT32)}),
    ZooModel("qwen3-30b-a3b", "Qwen3 30B-A3B MoE (128 experts, 8 used)", "qwen3moe", "qwen2", 2048, 32, 4, 128,
             6144, 2, 48, n_expert=128, n_expert_used=8, n_ff_exp=768,
             extra={"rope.freq_base": (1000000.0, V.FLOAT32)}),
)


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]      # ggml order: ne0 (row length) first
    qtype: Q
    fill: str = "zero"          # zero (a hole in the file), one (norms), random_rows (embeddings)


def _tensors(m: ZooModel) -> Iterator[_Tensor]:
    e, q, kv, ff = m.n_embd, m.n_head * m.head_dim, m.n_head_kv * m.head_dim, m.n_ff
    mat = Q.Q4_0  # x86 AVX2 repacks Q4_0: the CPU_REPACK buffer is part of what is measured
    yield _Tensor("token_embd.weight", (e, m.vocab_size), Q.Q8_0, "random_rows")
    yield _Tensor("output_norm.weight", (e,), Q.F32, "one")
    if not m.tied:
        yield _Tensor("output.weight", (e, m.vocab_size), Q.Q4_0, "random_rows")
    for i in range(m.n_layer):
        p = f"blk.{i}."
        yield _Tensor(p + "attn_norm.weight", (e,), Q.F32, "one")
        if m.arch == "phi3":
            yield _Tensor(p + "attn_qkv.weight", (e, q + 2 * kv), mat)
        else:
            yield _Tensor(p + "attn_q.weight", (e, q), mat)
            yield _Tensor(p + "attn_k.weight", (e, kv), mat)
            yield _Tensor(p + "attn_v.weight", (e, kv), mat)
        if m.bias_qkv:
            yield _Tensor(p + "attn_q.bias", (q,), Q.F32)
            yield _Tensor(p + "attn_k.bias", (kv,), Q.F32)
            yield _Tensor(p + "attn_v.bias", (kv,), Q.F32)
        if m.arch == "qwen3moe":
            yield _Tensor(p + "attn_q_norm.weight", (m.head_dim,), Q.F32, "one")
            yield _Tensor(p + "attn_k_norm.weight", (m.head_dim,), Q.F32, "one")
        yield _Tensor(p + "attn_output.weight", (q, e), mat)
        if m.arch == "gemma2":
            yield _Tensor(p + "post_attention_norm.weight", (e,), Q.F32, "one")
            yield _Tensor(p + "post_ffw_norm.weight", (e,), Q.F32, "one")
        yield _Tensor(p + "ffn_norm.weight", (e,), Q.F32, "one")
        if m.n_expert:
            yield _Tensor(p + "ffn_gate_inp.weight", (e, m.n_expert), Q.F32)
            yield _Tensor(p + "ffn_gate_exps.weight", (e, m.n_ff_exp, m.n_expert), mat)
            yield _Tensor(p + "ffn_up_exps.weight", (e, m.n_ff_exp, m.n_expert), mat)
            yield _Tensor(p + "ffn_down_exps.weight", (m.n_ff_exp, e, m.n_expert), mat)
        elif m.arch == "phi3":
            yield _Tensor(p + "ffn_up.weight", (e, 2 * ff), mat)  # gate and up, fused
            yield _Tensor(p + "ffn_down.weight", (ff, e), mat)
        else:
            yield _Tensor(p + "ffn_gate.weight", (e, ff), mat)
            yield _Tensor(p + "ffn_up.weight", (e, ff), mat)
            yield _Tensor(p + "ffn_down.weight", (ff, e), mat)


def _nbytes(t: _Tensor) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    n = int(np.prod(t.shape))
    return n // block * size


def _pad(n: int, to: int = ALIGNMENT) -> int:
    return (n + to - 1) // to * to


def vocab_dir() -> Path:
    """llama.cpp's models/ folder of the source the build unpacked (``$CHORUS_VOCAB_DIR`` overrides)."""
    env = os.environ.get("CHORUS_VOCAB_DIR")
    if env:
        return Path(env)
    return cache_dir() / "src" / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp" / "models"


def zoo_dir() -> Path:
    env = os.environ.get("CHORUS_ZOO_DIR")
    return Path(env) if env else cache_dir() / "zoo" / f"v{ZOO_VERSION}"


def _tokenizer_fields(path: Path) -> list[tuple[str, object, V, V | None]]:
    reader = gguf.GGUFReader(path)
    out = []
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = V(f.types[0])
        sub = V(f.types[-1]) if vtype == V.ARRAY else None
        out.append((name, f.contents(), vtype, sub))
    return out


def _random_rows(t: _Tensor, rng: np.random.Generator) -> bytes:
    rows = min(RANDOM_ROWS, t.shape[1])
    data = rng.standard_normal((rows, t.shape[0]), dtype=np.float32)
    return gguf.quants.quantize(data, t.qtype).tobytes()


def make_model(m: ZooModel, out: Path, vocab: Path | None = None) -> Path:
    """Write one zoo model to `out` (sparse, atomically)."""
    vocab = vocab or vocab_dir() / f"ggml-vocab-{m.vocab}.gguf"
    fields = _tokenizer_fields(vocab)
    tokens = next(v for k, v, _, _ in fields if k == "tokenizer.ggml.tokens")
    if len(tokens) != m.vocab_size:
        raise ValueError(f"{vocab}: {len(tokens)} tokens, expected {m.vocab_size}")
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, m.arch)
    a = m.arch
    w.add_name(f"chorus zoo {m.name}")
    w.add_string("general.description", f"synthetic: the shapes of {m.like}, {m.n_layer} of {m.real_layers} "
                 "layers, zero weights")
    w.add_uint32(f"{a}.context_length", 32768)
    w.add_uint32(f"{a}.embedding_length", m.n_embd)
    w.add_uint32(f"{a}.block_count", m.n_layer)
    w.add_uint32(f"{a}.feed_forward_length", m.n_ff)
    w.add_uint32(f"{a}.attention.head_count", m.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", m.n_head_kv)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    if m.head_dim * m.n_head != m.n_embd:
        w.add_uint32(f"{a}.attention.key_length", m.head_dim)
        w.add_uint32(f"{a}.attention.value_length", m.head_dim)
    if m.n_swa:
        w.add_uint32(f"{a}.attention.sliding_window", m.n_swa)
    if m.n_expert:
        w.add_uint32(f"{a}.expert_count", m.n_expert)
        w.add_uint32(f"{a}.expert_used_count", m.n_expert_used)
        w.add_uint32(f"{a}.expert_feed_forward_length", m.n_ff_exp)
    for key, (value, vtype) in m.extra.items():
        w.add_key_value(f"{a}.{key}", value, vtype)
    w.add_uint32("general.file_type", 2)  # mostly Q4_0
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    tensors = list(_tensors(m))
    for t in tensors:
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), _nbytes(t), raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    f = w.fout[0]
    start = _pad(f.tell())
    rng = np.random.default_rng(sum(map(ord, m.name)))
    offset = 0
    for t in tensors:
        if t.fill != "zero":
            f.seek(start + offset)
            if t.fill == "one":
                f.write(np.ones(t.shape, dtype=np.float32).tobytes())
            else:
                f.write(_random_rows(t, rng))
        offset += _pad(_nbytes(t))
    f.truncate(start + offset)  # the zeros: a hole, no disk
    w.close()
    os.replace(tmp, out)
    return out


def ensure_zoo(directory: Path | None = None, names: list[str] | None = None, force: bool = False) -> dict[str, Path]:
    """The zoo's files by name, made where missing. FileNotFoundError when the vocab files are not there."""
    directory = directory or zoo_dir()
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for m in ZOO:
        if names and m.name not in names:
            continue
        path = directory / f"{m.name}.gguf"
        if force or not path.is_file():
            vocab = vocab_dir() / f"ggml-vocab-{m.vocab}.gguf"
            if not vocab.is_file():
                raise FileNotFoundError(f"{vocab} not found: run scripts/build_llama_server.sh (it unpacks the "
                                        "llama.cpp source) or set CHORUS_VOCAB_DIR")
            make_model(m, path, vocab)
        out[m.name] = path
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    for name, path in ensure_zoo(args.dir, force=args.force).items():
        st = path.stat()
        print(f"{name:16} {st.st_size / 2**20:8.1f} MiB apparent {st.st_blocks * 512 / 2**20:7.1f} MiB on disk  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
