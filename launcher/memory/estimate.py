"""How much RAM and VRAM one llama-server will hold, from the GGUF header alone (nothing is loaded).

The figures follow the pinned llama.cpp (src/llama-model.cpp, llama-context.cpp, llama-kv-cache*.cpp):

- **Weights.** Layer ``il`` of ``n_layer`` is on the GPU when ``il >= n_layer + 1 - n_gpu_layers``; the
  output layer counts as layer ``n_layer``, so it is the first one offloaded. ``token_embd`` (the input
  layer) always stays on the CPU. A model without ``output.weight`` ties the output to ``token_embd``:
  when the output layer is on a GPU, llama.cpp loads a second copy of it there. Several GPUs split the
  offloaded layers in proportion to their free memory. CPU weights are memory-mapped from the file; llama.cpp
  keeps the span from the first to the last tensor it uses in place mapped and unmaps the rest. On x86 with
  AVX2 the Q4_0/Q4_K/IQ4_NL/MXFP4 matrices are repacked into anonymous memory (CPU_REPACK).
- **KV cache**, per layer on that layer's device: ``cells x streams x (K row + V row)`` where the cache
  type sets the bytes per element. ``n_ctx`` (per slot) is padded to 256; with the server's default
  ``kv_unified = false`` every slot is its own stream. Sliding-window layers keep only
  ``pad256(min(n_ctx, n_swa + n_ubatch))`` cells.
- **Compute buffer**, per backend: ``n_ubatch`` tokens of activations (dense or routed-expert FFN) plus the
  attention mask (``n_ubatch x n_ctx`` f16 with flash attention) and one row of logits; an architecture in
  `COMPUTE_CALIBRATION` has its activation term scaled by a factor measured once.
- **Output buffer** (host): ``slots x n_vocab`` floats of logits.
- **Context checkpoints** (host, SWA models): ``-ctxcp`` copies of a slot's SWA cache per slot.
- **Overheads**: the process, the tokenizer (per token and per BPE merge), the KV cells' bookkeeping and
  per slot (host, fitted once over the zoo), and per GPU a CUDA context.

The per-layer loops are bounded: `estimate_memory` validates the header first (`launcher.memory.gguf.validate_header`:
at most 512 layers, every ``blk.N`` tensor below ``block_count``), and `estimate_for` caches estimates by the
file's identity (path, size, mtime_ns) and the spec, so a page that asks again costs a dict lookup.

Everything here is an estimate; `launcher.memory.calibration` replaces it with what a running server really
holds, per configuration. llama.cpp prints its own buffer sizes at ``-lv 4``; the constants below were
tuned against those lines and the peak RSS of the demo model and the synthetic zoo (bench/memory_accuracy.py,
docs/memory.md).
"""

from __future__ import annotations

import functools
import os
import platform
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypedDict

from launcher.memory.gguf import ArrayInfo, GGUFMetadata, TensorInfo, block_index, read_gguf, validate_header
from launcher.memory.probes import GpuMemory
from launcher.process.server import CTX_CHECKPOINTS, ServerSpec
from launcher.units import MiB

KV_PAD = 256  # llama-context.cpp pads n_ctx and n_ctx_seq to 256; the SWA cache is padded to 256 too

# KV cache types (-ctk / -ctv): (block size in elements, bytes per block)
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "iq4_nl": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24),
}

# ggml-cpu/repack.cpp: which weight types the CPU backend repacks into a second (anonymous) buffer.
_REPACK_X86_AVX2 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_REPACK_X86_AVX512 = frozenset({"Q2_K"})
_REPACK_ARM_DOTPROD = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"})
CACHE_MAX_ENTRIES = 256


@dataclass(frozen=True)
class EstimatorSettings:
    """llama.cpp context settings the estimate depends on, and the overhead constants."""

    n_ubatch: int = 512
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: bool = True          # llama.cpp's default "auto" enables it on CPU and CUDA
    kv_unified: bool = False         # llama-server's default
    swa_full: bool = False
    offload_kqv: bool = True
    # The llama-server process beyond its buffers, fitted once against RSS across the zoo (bench/memory_accuracy.py):
    host_base_bytes: int = 12 * MiB + MiB // 2  # code and libraries resident, HTTP server, threads
    host_per_vocab_bytes: int = 197  # tokenizer: token text, score, attributes, token-to-id map, piece cache
    host_per_merge_bytes: int = 115  # BPE merge ranks (a std::map of string pairs), per merge
    host_per_slot_bytes: int = 256 * 1024
    host_per_cell_bytes: int = 40    # llama_kv_cells per cell: pos + shift (int32) + a 256-bit seq set (formula)
    ctx_checkpoints: int = CTX_CHECKPOINTS  # SWA context checkpoints per slot, as chorus starts its servers
    gpu_context_bytes: int = 400 * MiB  # CUDA context + cuBLAS workspace, per GPU a process uses
    gpu_host_bytes: int = 256 * MiB     # the CUDA runtime's libraries and pinned buffers in RAM
    repack_types: frozenset[str] | None = None  # None: what this CPU repacks (x86 AVX2/AVX512, ARM)

    def for_args(self, args: Sequence[str]) -> EstimatorSettings:
        """These settings with a server's extra command-line flags applied (-ub, -ctk, -ctv, -fa...)."""
        changes: _FlagChanges = {}
        it = iter(args)
        for arg in it:
            name, _, inline = arg.partition("=")

            def value(inline: str = inline) -> str:
                return inline or next(it, "")

            if name in ("-ub", "--ubatch-size"):
                changes["n_ubatch"] = int(value())
            elif name in ("-ctk", "--cache-type-k"):
                changes["cache_type_k"] = value().lower()
            elif name in ("-ctv", "--cache-type-v"):
                changes["cache_type_v"] = value().lower()
            elif name in ("-fa", "--flash-attn"):
                changes["flash_attn"] = value().lower() not in ("off", "0", "false")
            elif name in ("-kvu", "--kv-unified"):
                changes["kv_unified"] = True
            elif name == "--no-kv-unified":
                changes["kv_unified"] = False
            elif name == "--swa-full":
                changes["swa_full"] = True
            elif name in ("-nkvo", "--no-kv-offload"):
                changes["offload_kqv"] = False
            elif name in ("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"):
                changes["ctx_checkpoints"] = max(0, int(value()))
        return replace(self, **changes) if changes else self


class _FlagChanges(TypedDict, total=False):
    """The EstimatorSettings fields `EstimatorSettings.for_args` sets from a server's flags."""

    n_ubatch: int
    cache_type_k: str
    cache_type_v: str
    flash_attn: bool
    kv_unified: bool
    swa_full: bool
    offload_kqv: bool
    ctx_checkpoints: int


@dataclass(frozen=True)
class MemoryEstimate:
    """What one server holds, per device ('ram', 'gpu0'...) and per kind (weights, kv, compute...).

    ``mapped_bytes`` is the part of RAM that is the model file's memory-mapped weights: page cache that
    servers of the same file share. ``source`` is "estimate", or "calibrated" for a measured figure.
    """

    model: str
    model_path: str
    n_ctx: int
    slots: int
    n_gpu_layers: int          # as asked for
    gpu_layers_used: int       # what llama.cpp will really offload (0 without a GPU)
    breakdown: dict[str, dict[str, int]]
    mapped_bytes: int = 0
    source: str = "estimate"
    estimate: MemoryEstimate | None = field(default=None, repr=False)  # the formula's figure, when calibrated

    def need(self) -> dict[str, int]:
        """Bytes per device."""
        return {dev: sum(kinds.values()) for dev, kinds in self.breakdown.items()}

    @property
    def ram_bytes(self) -> int:
        return sum(self.breakdown.get("ram", {}).values())

    @property
    def vram_bytes(self) -> int:
        return sum(v for dev, v in self.need().items() if dev != "ram")

    @property
    def anon_ram_bytes(self) -> int:
        """RAM that is this server's alone (not shared page cache)."""
        return max(0, self.ram_bytes - self.mapped_bytes)

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model, "model_path": self.model_path, "n_ctx": self.n_ctx, "slots": self.slots,
                "n_gpu_layers": self.n_gpu_layers, "gpu_layers_used": self.gpu_layers_used,
                "ram_bytes": self.ram_bytes, "vram_bytes": self.vram_bytes, "need": self.need(),
                "mapped_bytes": self.mapped_bytes, "breakdown": self.breakdown, "source": self.source}


# ---------------------------------------------------------------- helpers


def pad(n: int, to: int = KV_PAD) -> int:
    return (n + to - 1) // to * to


def cache_row_bytes(cache_type: str, n_elements: int) -> int:
    block, size = CACHE_TYPES.get(cache_type, CACHE_TYPES["f16"])
    return (n_elements + block - 1) // block * size


def kv_cells(meta: GGUFMetadata, n_ctx: int, slots: int, settings: EstimatorSettings) -> tuple[int, int, int]:
    """(cells per stream for full layers, cells per stream for SWA layers, streams), as llama.cpp sizes them."""
    slots = max(1, slots)
    total = pad(n_ctx * slots)
    if settings.kv_unified:
        kv_size, streams = total, 1
    else:
        kv_size, streams = pad(total // slots), slots
    window = meta.sliding_window or 0
    swa_cells = kv_size
    if window > 0 and not settings.swa_full:
        swa_cells = pad(min(kv_size, window * (slots if settings.kv_unified else 1) + settings.n_ubatch))
    return kv_size, swa_cells, streams


def kv_bytes_per_layer(meta: GGUFMetadata, n_ctx: int, slots: int,
                       settings: EstimatorSettings = EstimatorSettings()) -> list[int]:
    """KV cache bytes of each layer (0 for layers without attention KV)."""
    n_layer = meta.block_count or 0
    kv_size, swa_cells, streams = kv_cells(meta, n_ctx, slots, settings)
    key_len = meta.key_length or 0
    value_len = meta.value_length or 0
    has_swa = bool(meta.sliding_window)
    out = []
    for il in range(n_layer):
        heads = meta.head_count_kv_at(il)
        if heads <= 0:
            out.append(0)
            continue
        cells = swa_cells if has_swa and meta.is_swa_layer(il) else kv_size
        row = (cache_row_bytes(settings.cache_type_k, key_len * heads)
               + cache_row_bytes(settings.cache_type_v, value_len * heads))
        out.append(cells * streams * row)
    return out


def kv_cell_count(meta: GGUFMetadata, n_ctx: int, slots: int, settings: EstimatorSettings) -> int:
    """Cells llama.cpp keeps bookkeeping for (llama_kv_cells): the full cache's, plus the SWA cache's when the
    model has both kinds of layers (llama_kv_cache_iswa makes two caches)."""
    n_layer = meta.block_count or 0
    kv_size, swa_cells, streams = kv_cells(meta, n_ctx, slots, settings)
    swa = [meta.is_swa_layer(il) for il in range(n_layer)] if meta.sliding_window else [False] * n_layer
    return streams * ((kv_size if not all(swa) else 0) + (swa_cells if any(swa) else 0))


def checkpoint_bytes(meta: GGUFMetadata, n_ctx: int, slots: int, settings: EstimatorSettings) -> int:
    """Context checkpoints: llama-server copies a slot's SWA cache after a prompt (up to -ctxcp per slot).

    One checkpoint holds at most the SWA layers' cells of one stream; only SWA models make them."""
    if not settings.ctx_checkpoints or not meta.sliding_window or not meta.block_count:
        return 0
    streams = kv_cells(meta, n_ctx, slots, settings)[2]
    per_layer = kv_bytes_per_layer(meta, n_ctx, slots, settings)
    swa = sum(n for il, n in enumerate(per_layer) if meta.is_swa_layer(il)) // max(1, streams)
    return settings.ctx_checkpoints * max(1, slots) * swa


def merge_count(meta: GGUFMetadata) -> int:
    merges = meta.fields.get("tokenizer.ggml.merges")
    if isinstance(merges, ArrayInfo):
        return merges.length
    return len(merges) if isinstance(merges, tuple) else 0


# Per-architecture factors on the activation term of the compute buffer, measured once against llama.cpp's
# logged "CPU compute buffer size" (bench/memory_accuracy.py, zoo model of that family, n_ubatch 512). An
# architecture listed here is "calibrated"; every other one is sized by the formula alone.
COMPUTE_CALIBRATION: dict[str, float] = {
    "phi3": 0.845,  # fused QKV and gate/up: views of one tensor, fewer live intermediates than the formula
}


def compute_basis(meta: GGUFMetadata) -> str:
    """How the compute buffer of this architecture is sized: 'formula' or 'calibrated' (COMPUTE_CALIBRATION)."""
    return "calibrated" if meta.architecture in COMPUTE_CALIBRATION else "formula"


def _expert_shape(meta: GGUFMetadata) -> tuple[int, int, int]:
    """(experts, experts used per token, expert FFN width); (0, 0, 0) for a dense model."""
    arch = meta.architecture
    count = meta.fields.get(f"{arch}.expert_count")
    used = meta.fields.get(f"{arch}.expert_used_count")
    width = meta.fields.get(f"{arch}.expert_feed_forward_length", meta.feed_forward_length)
    if not isinstance(count, int) or count <= 0 or not isinstance(used, int) or not isinstance(width, int):
        return 0, 0, 0
    return count, used, width


def compute_buffer_bytes(meta: GGUFMetadata, n_ctx: int, slots: int, settings: EstimatorSettings) -> int:
    """One backend's compute buffer (graph intermediates for one ubatch), for the whole graph.

    f32 activations per token of the ubatch: the residual and its norm (2 n_embd), Q/K/V (H d + 2 Hkv d),
    and the FFN: gate, up and their product (3 n_ff) for a dense layer; for a MoE layer the same for each
    expert a token is routed to plus each expert's output (n_used x (3 n_ff_exp + n_embd)) and the router's
    logits, probabilities, weights and selection (4 n_expert). Plus the attention mask (f16 with flash
    attention: n_ubatch x n_kv; without: f32 mask and the f32 KQ matrix of every head) and one row of logits.
    """
    kv_size, _, _ = kv_cells(meta, n_ctx, slots, settings)
    n_embd = meta.embedding_length or 0
    n_ff = meta.feed_forward_length or 0
    heads = meta.head_count if isinstance(meta.head_count, int) else max(meta.head_count or (0,))
    heads_kv = meta.head_count_kv if isinstance(meta.head_count_kv, int) else max(meta.head_count_kv or (heads,))
    d_k = meta.key_length or 0
    ub = settings.n_ubatch
    n_expert, n_used, n_ff_exp = _expert_shape(meta)
    ffn = n_used * (3 * n_ff_exp + n_embd) + 4 * n_expert if n_expert else 3 * n_ff
    per_token = 4 * (2 * n_embd + ffn + heads * d_k + 2 * heads_kv * d_k)
    per_token = int(per_token * COMPUTE_CALIBRATION.get(meta.architecture, 1.0))
    # flash attention: the f16 KQ mask; without it: an f32 mask and the f32 KQ matrix per head
    attention = ub * kv_size * 2 if settings.flash_attn else ub * kv_size * 4 * (1 + heads)
    logits = (meta.vocab_size or 0) * 4
    return ub * per_token + attention + logits


def host_compute_bytes(meta: GGUFMetadata, settings: EstimatorSettings, slots: int) -> int:
    """The small host-side compute buffer when every layer runs on a GPU (inputs and outputs)."""
    return 3 * settings.n_ubatch * (meta.embedding_length or 0) * 4 + slots * (meta.vocab_size or 0) * 4


@functools.cache
def detect_repack_types() -> frozenset[str]:
    """The weight types this CPU's ggml backend repacks (ggml-cpu/repack.cpp), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        types = set(_REPACK_X86_AVX2) if "avx2" in flags else set()
        if "avx512f" in flags:
            types |= _REPACK_X86_AVX512
        return frozenset(types)
    if machine in ("aarch64", "arm64") and ("asimddp" in flags or "i8mm" in flags):
        return _REPACK_ARM_DOTPROD
    return frozenset()


def _repacked(t: TensorInfo, repack: frozenset[str]) -> bool:
    """Whether the CPU backend repacks this weight (ggml-cpu/repack.cpp: 2-D and 3-D (expert) matrices
    whose rows come in groups of 8)."""
    return (t.type_name in repack and len(t.shape) in (2, 3) and t.shape[1] % 8 == 0
            and not t.name.endswith("norm.weight"))


def _layer_of(tensor: TensorInfo, n_layer: int) -> int | None:
    """Layer index: blk.N -> N, the output layer -> n_layer, the input layer (token_embd...) -> None."""
    index = block_index(tensor.name)
    if index is not None:
        return index
    if tensor.name.startswith(("output.", "output_norm", "cls.", "cls_out")):
        return n_layer
    return None


def layer_devices(n_layer: int, n_gpu_layers: int, gpus: Sequence[GpuMemory]) -> list[str]:
    """Device of layers 0..n_layer (the last entry is the output layer): 'ram' or 'gpuN'."""
    if not gpus or n_gpu_layers == 0:
        return ["ram"] * (n_layer + 1)
    ngl = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    weights = [max(g.free_bytes, 0) for g in gpus]
    if sum(weights) == 0:
        weights = [1] * len(gpus)
    total = float(sum(weights))
    bounds, acc = [], 0.0
    for w in weights:
        acc += w
        bounds.append(acc / total)
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append("ram")
            continue
        frac = (il - start) / act
        index = next((i for i, b in enumerate(bounds) if frac < b), len(gpus) - 1)  # std::upper_bound
        out.append(f"gpu{gpus[index].index}")
    return out


def _add(breakdown: dict[str, dict[str, int]], device: str, kind: str, n: int) -> None:
    if n:
        kinds = breakdown.setdefault(device, {})
        kinds[kind] = kinds.get(kind, 0) + int(n)


# ---------------------------------------------------------------- the estimate


def estimate_memory(meta: GGUFMetadata, spec: ServerSpec, gpus: Sequence[GpuMemory] = (),
                    settings: EstimatorSettings | None = None) -> MemoryEstimate:
    """RAM and VRAM per device for `spec` on a machine with these GPUs (none: CPU only)."""
    validate_header(meta)  # bounds the per-layer work below, whatever built `meta`
    settings = (settings or EstimatorSettings()).for_args(spec.extra_args)
    if not meta.block_count:
        return _weights_only(meta, spec, settings)
    repack = settings.repack_types if settings.repack_types is not None else detect_repack_types()
    n_layer = meta.block_count
    slots = max(1, spec.slots)
    devices = layer_devices(n_layer, spec.n_gpu_layers, gpus)
    used = sum(d != "ram" for d in devices)
    breakdown: dict[str, dict[str, int]] = {"ram": {}}

    # weights: the CPU's mapped span, repacked copies, and each GPU's layers
    first, last = None, 0
    has_output = any(t.name == "output.weight" for t in meta.tensors)
    for t in meta.tensors:
        layer = _layer_of(t, n_layer)
        device = "ram" if layer is None else devices[layer]
        if device == "ram":
            if layer is not None and _repacked(t, repack):
                _add(breakdown, "ram", "weights_repacked", t.n_bytes)
            else:
                first = t.offset if first is None else min(first, t.offset)
                last = max(last, t.offset + t.n_bytes)
        else:
            _add(breakdown, device, "weights", t.n_bytes)
        if t.name == "token_embd.weight" and not has_output and devices[n_layer] != "ram":
            _add(breakdown, devices[n_layer], "weights", t.n_bytes)  # tied output: a copy on the GPU
    # llama.cpp keeps the file mapped from the first to the last tensor it uses in place and unmaps the
    # rest (llama-model-loader.cpp load_all_data: unmap_fragment): tensors copied elsewhere (GPU, repack)
    # between two mapped ones stay resident, those before the first or after the last do not.
    mapped = last - first if first is not None else 0
    _add(breakdown, "ram", "weights", mapped)

    # KV cache, on each layer's device
    for il, n in enumerate(kv_bytes_per_layer(meta, spec.n_ctx, slots, settings)):
        device = devices[il] if settings.offload_kqv else "ram"
        _add(breakdown, device, "kv", n)

    # compute buffers: one per backend that runs part of the graph
    compute = compute_buffer_bytes(meta, spec.n_ctx, slots, settings)
    gpu_devices = sorted({d for d in devices if d != "ram"})
    for device in gpu_devices:
        _add(breakdown, device, "compute", compute)
        _add(breakdown, device, "overhead", settings.gpu_context_bytes)
    all_on_gpu = all(d != "ram" for d in devices)
    _add(breakdown, "ram", "compute", host_compute_bytes(meta, settings, slots) if all_on_gpu else compute)

    # host: logits, context checkpoints, process and tokenizer, KV bookkeeping, CUDA runtime
    _add(breakdown, "ram", "output", slots * (meta.vocab_size or 0) * 4)
    _add(breakdown, "ram", "checkpoints", checkpoint_bytes(meta, spec.n_ctx, slots, settings))
    overhead = (settings.host_base_bytes + settings.host_per_vocab_bytes * (meta.vocab_size or 0)
                + settings.host_per_merge_bytes * merge_count(meta) + settings.host_per_slot_bytes * slots
                + settings.host_per_cell_bytes * kv_cell_count(meta, spec.n_ctx, slots, settings)
                + (settings.gpu_host_bytes if gpu_devices else 0))
    _add(breakdown, "ram", "overhead", overhead)

    return MemoryEstimate(model=spec.model, model_path=_resolved(spec.model_path), n_ctx=spec.n_ctx, slots=slots,
                          n_gpu_layers=spec.n_gpu_layers, gpu_layers_used=used, breakdown=breakdown,
                          mapped_bytes=mapped)


def _weights_only(meta: GGUFMetadata, spec: ServerSpec, settings: EstimatorSettings) -> MemoryEstimate:
    """A lower bound for a file whose architecture we cannot model (no block_count): weights and process.

    Refusing here would hide the real reason; llama-server then says whether it can load the file at all.
    """
    slots = max(1, spec.slots)
    breakdown = {"ram": {"weights": meta.tensor_bytes,
                         "overhead": settings.host_base_bytes + settings.host_per_slot_bytes * slots}}
    return MemoryEstimate(model=spec.model, model_path=_resolved(spec.model_path), n_ctx=spec.n_ctx, slots=slots,
                          n_gpu_layers=spec.n_gpu_layers, gpu_layers_used=0, breakdown=breakdown,
                          mapped_bytes=meta.tensor_bytes, source="lower bound (unknown architecture)")


_cache: OrderedDict[tuple[object, ...], MemoryEstimate] = OrderedDict()
_cache_lock = threading.Lock()


def estimate_for(spec: ServerSpec, gpus: Sequence[GpuMemory] = (),
                 settings: EstimatorSettings | None = None) -> MemoryEstimate:
    """`estimate_memory` of the spec's file, cached by file identity (path, size, mtime_ns) + spec + machine.

    GGUFError when the file is not readable or its header is not valid (not cached: a fixed file counts).
    """
    path = os.path.abspath(spec.model_path)
    try:
        st = os.stat(path)
        identity: tuple[object, ...] = (path, st.st_size, st.st_mtime_ns)
    except OSError:
        identity = (path, None, None)  # read_gguf raises the typed error
    # one GPU gets every offloaded layer whatever its free memory; several split by it
    machine = tuple((g.index, g.total_bytes) for g in gpus) if len(gpus) <= 1 else tuple(gpus)
    key = (*identity, spec.model, spec.n_ctx, spec.n_gpu_layers, spec.slots, tuple(spec.extra_args), machine,
           settings)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    est = estimate_memory(read_gguf(spec.model_path), spec, gpus, settings)
    with _cache_lock:
        _cache[key] = est
        while len(_cache) > CACHE_MAX_ENTRIES:
            _cache.popitem(last=False)
    return est


def clear_cache() -> None:
    """Forget every cached estimate (tests and benchmarks)."""
    with _cache_lock:
        _cache.clear()


def _resolved(path: os.PathLike[str] | str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return str(path)



# ---------------------------------------------------------------- llama.cpp RPC workers


def estimate_rpc_split(meta: GGUFMetadata, spec: ServerSpec, workers_free: Sequence[int],
                       settings: EstimatorSettings | None = None) -> dict[str, dict[str, int]]:
    """Per place — 'local' and each of `spec.rpc` in order — the bytes it needs, by kind (weights, kv...).

    llama.cpp treats each RPC worker as a GPU-like device and splits the offloaded layers (-ngl) over the
    devices in proportion to their free memory, as for several GPUs; so this is `estimate_memory` with one
    pseudo-GPU per worker (free memory as reported by the worker), each GPU renamed to its worker. A worker
    runs no CUDA context here, so the per-GPU context and the host's CUDA runtime are left out. Local GPUs
    are not modelled next to workers: the local part is what stays in this machine's RAM.
    """
    if len(workers_free) != len(spec.rpc):
        raise ValueError(f"{len(spec.rpc)} workers but {len(workers_free)} free-memory figures")
    base = replace(settings or EstimatorSettings(), gpu_context_bytes=0, gpu_host_bytes=0)
    gpus = [GpuMemory(i, f"rpc {w}", max(free, 0), max(free, 0))
            for i, (w, free) in enumerate(zip(spec.rpc, workers_free, strict=True))]
    est = estimate_memory(meta, spec, gpus if spec.rpc else (), base)
    out: dict[str, dict[str, int]] = {"local": dict(est.breakdown.get("ram", {}))}
    for i, worker in enumerate(spec.rpc):
        out[worker] = dict(est.breakdown.get(f"gpu{i}", {}))
    return out
