"""The memory fit check: probes, the estimator, calibration, admission, planning and `chorus plan`.

Unit tests simulate machines with FixedProbe and read the demo model's real GGUF header; the tests
marked integration start the real llama-server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.errors import InsufficientMemory
from launcher.memory.admission import Demand, MemoryGuard, Schedule, combined_need
from launcher.memory.calibration import CalibrationCache, Measurement, measure_server, parse_buffer_sizes
from launcher.memory.estimate import EstimatorSettings, estimate_memory, kv_bytes_per_layer
from launcher.memory.fit import footprint, held
from launcher.memory.gguf import read_gguf
from launcher.memory.probes import FixedProbe, GpuMemory, SystemProbe, process_memory
from launcher.process.client import Endpoint, GenerationClient, GenerationRequest
from launcher.process.server import ModelServer, ServerOptions, ServerSpec
from orchestrator.config.schema import load_config
from orchestrator.runtime import Runtime
from tests.clirun import run_main
from tests.conftest import REPO, ConfigDir

MiB = 1 << 20
GiB = 1 << 30
NO_REPACK = EstimatorSettings(repack_types=frozenset())
KV_ROW = 256 * 2 + 256 * 2  # gemma3 270M: one KV head of 256, K and V in f16


def spec(model: Path, **kw: object) -> ServerSpec:
    return ServerSpec("gemma3-270m", model, **{"n_ctx": 2048, **kw})  # type: ignore[arg-type]


def machine(ram_gib: float = 16, free_gib: float | None = None, *gpus: tuple[float, float]) -> FixedProbe:
    """A simulated machine: RAM total/free, and (total, free) GiB per GPU."""
    return FixedProbe(int(ram_gib * GiB), int((ram_gib if free_gib is None else free_gib) * GiB),
                      tuple(GpuMemory(i, f"sim{i}", int(t * GiB), int(f * GiB)) for i, (t, f) in enumerate(gpus)))


def guard(probe: FixedProbe, **kw: object) -> MemoryGuard:
    return MemoryGuard(probe, **{"settings": NO_REPACK, **kw})  # type: ignore[arg-type]


class FakeServer(ModelServer):
    """A running server as far as the admission check can tell, without a process."""

    def __init__(self, spec: ServerSpec) -> None:
        super().__init__(spec, Path("/nonexistent/llama-server"), Path("/tmp"))

    def is_alive(self) -> bool:
        return True


# ---------------------------------------------------------------- the estimator


def test_kv_cache_caps_sliding_window_layers_at_the_window_plus_ubatch(demo_model: Path) -> None:
    meta = read_gguf(demo_model)
    layers = kv_bytes_per_layer(meta, 8192, 1)
    full = [i for i in range(18) if not meta.is_swa_layer(i)]
    assert full == [5, 11, 17]  # 5 of every 6 layers use the 512-token window
    for i, n in enumerate(layers):
        cells = 8192 if i in full else 1024  # pad256(min(8192, 512 + n_ubatch 512))
        assert n == cells * KV_ROW
    # llama.cpp's log for -c 8192: 24.00 MiB non-SWA + 15.00 MiB SWA
    assert sum(layers) == 24 * MiB + 15 * MiB
    # a context below the window is not capped further than itself
    assert sum(kv_bytes_per_layer(meta, 512, 1)) == 18 * 512 * KV_ROW


def test_kv_cache_is_per_slot_padded_to_256_and_multiplied_by_slots(demo_model: Path) -> None:
    meta = read_gguf(demo_model)
    one = sum(kv_bytes_per_layer(meta, 2048, 1))
    assert one == 3 * 2048 * KV_ROW + 15 * 1024 * KV_ROW  # 6 MiB + 15 MiB, as llama.cpp logs
    assert sum(kv_bytes_per_layer(meta, 2048, 3)) == 3 * one  # not unified: one stream per slot
    assert sum(kv_bytes_per_layer(meta, 1000, 1)) == sum(kv_bytes_per_layer(meta, 1024, 1))
    q8 = replace(NO_REPACK, cache_type_k="q8_0", cache_type_v="q8_0")
    assert sum(kv_bytes_per_layer(meta, 2048, 1, q8)) == (3 * 2048 + 15 * 1024) * 2 * 256 // 32 * 34


def test_cpu_only_estimate_maps_every_weight_and_uses_no_vram(demo_model: Path) -> None:
    meta = read_gguf(demo_model)
    est = estimate_memory(meta, spec(demo_model, n_gpu_layers=99), (), NO_REPACK)
    assert est.gpu_layers_used == 0 and est.vram_bytes == 0 and set(est.need()) == {"ram"}
    assert est.breakdown["ram"]["weights"] == meta.tensor_bytes == est.mapped_bytes
    assert est.breakdown["ram"]["kv"] == 21 * MiB
    assert est.breakdown["ram"]["output"] == 262144 * 4  # one slot of logits
    assert 50 * MiB < est.ram_bytes - meta.tensor_bytes < 150 * MiB  # KV, compute, logits, process


def test_extra_server_flags_change_the_estimate(demo_model: Path) -> None:
    meta = read_gguf(demo_model)
    base = estimate_memory(meta, spec(demo_model), (), NO_REPACK)
    q8 = estimate_memory(meta, spec(demo_model, extra_args=("-ctk", "q8_0", "-ctv", "q8_0")), (), NO_REPACK)
    assert q8.breakdown["ram"]["kv"] < base.breakdown["ram"]["kv"]
    small_ub = estimate_memory(meta, spec(demo_model, extra_args=("-ub", "128")), (), NO_REPACK)
    assert small_ub.breakdown["ram"]["compute"] < base.breakdown["ram"]["compute"]


def test_repacked_weights_are_counted_on_top_of_the_mapped_file(demo_model: Path) -> None:
    meta = read_gguf(demo_model)
    avx2 = replace(NO_REPACK, repack_types=frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}))
    est = estimate_memory(meta, spec(demo_model), (), avx2)
    q4k = sum(t.n_bytes for t in meta.tensors if t.type_name == "Q4_K")
    assert est.breakdown["ram"]["weights_repacked"] == q4k  # llama.cpp: CPU_REPACK 12.66 MiB
    assert round(q4k / MiB, 2) == 12.66


def test_output_layer_is_offloaded_first_and_token_embd_stays_on_the_cpu(demo_model: Path) -> None:
    meta = read_gguf(demo_model)
    gpu = (GpuMemory(0, "sim", 8 * GiB, 8 * GiB),)
    embd = meta.tensor("token_embd.weight")
    assert embd is not None and meta.tensor("output.weight") is None  # tied embeddings
    norm = meta.tensor("output_norm.weight").n_bytes  # type: ignore[union-attr]
    layer = {i: sum(t.n_bytes for t in meta.tensors if t.name.startswith(f"blk.{i}.")) for i in range(18)}

    one = estimate_memory(meta, spec(demo_model, n_gpu_layers=1), gpu, NO_REPACK)
    # only the output layer: output_norm plus a GPU copy of the tied token_embd
    assert one.breakdown["gpu0"]["weights"] == embd.n_bytes + norm
    assert one.breakdown["ram"]["weights"] == meta.tensor_bytes - norm  # token_embd stays mapped on the CPU
    assert "kv" not in one.breakdown["gpu0"]  # no repeating layer offloaded: its KV stays on the CPU

    three = estimate_memory(meta, spec(demo_model, n_gpu_layers=3), gpu, NO_REPACK)
    assert three.breakdown["gpu0"]["weights"] == embd.n_bytes + norm + layer[17] + layer[16]
    assert three.breakdown["gpu0"]["kv"] == 2048 * KV_ROW + 1024 * KV_ROW  # layer 17 (full) + 16 (SWA)

    every = estimate_memory(meta, spec(demo_model, n_gpu_layers=-1), gpu, NO_REPACK)
    assert every.gpu_layers_used == 19
    assert every.breakdown["ram"]["weights"] == embd.n_bytes == every.mapped_bytes
    assert every.breakdown["gpu0"]["weights"] == meta.tensor_bytes
    assert every.breakdown["gpu0"]["overhead"] == NO_REPACK.gpu_context_bytes  # the CUDA context
    assert every.breakdown["ram"]["compute"] < one.breakdown["ram"]["compute"]  # host side only


def test_layers_split_over_two_gpus_by_their_free_memory(demo_model: Path) -> None:
    meta = read_gguf(demo_model)
    gpus = (GpuMemory(0, "a", 8 * GiB, 2 * GiB), GpuMemory(1, "b", 8 * GiB, 6 * GiB))
    est = estimate_memory(meta, spec(demo_model, n_gpu_layers=-1), gpus, NO_REPACK)
    assert est.breakdown["gpu1"]["weights"] > 2 * est.breakdown["gpu0"]["weights"] > 0


# ---------------------------------------------------------------- probes


def test_weights_our_servers_map_are_not_counted_as_free_ram(demo_model: Path) -> None:
    code = ("import mmap,sys,time\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ)\n"
            "s=sum(m[i] for i in range(0,len(m),4096))\nprint('ready',flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(demo_model)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        mem = process_memory(child.pid)
        assert mem is not None and mem.rss_file_bytes > 0.9 * demo_model.stat().st_size
        snap = SystemProbe().snapshot([child.pid])
        assert snap.own_page_cache_bytes >= mem.rss_file_bytes
        assert snap.ram_available_bytes <= snap.ram_total_bytes - snap.own_page_cache_bytes
    finally:
        child.kill()
        child.wait()


def test_buffer_sizes_are_read_from_the_llama_cpp_log() -> None:
    log = """
0.00.575 I load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
0.00.575 I load_tensors:   CPU_REPACK model buffer size =    12.66 MiB
0.00.575 I load_tensors:        CUDA0 model buffer size =  1000.00 MiB
0.00.593 I llama_context:        CPU  output buffer size =     1.00 MiB
0.00.593 I llama_kv_cache:        CUDA0 KV buffer size =     6.00 MiB
0.00.596 I llama_kv_cache:        CUDA0 KV buffer size =    15.00 MiB
0.00.608 I sched_reserve:      CUDA0 compute buffer size =    20.77 MiB
0.00.608 I sched_reserve:  CUDA_Host compute buffer size =     5.00 MiB
"""
    buffers = parse_buffer_sizes(log)
    assert buffers["ram"] == {"weights": int(235.16 * MiB) + int(12.66 * MiB), "output": MiB, "compute": 5 * MiB}
    assert buffers["gpu0"] == {"weights": 1000 * MiB, "kv": 21 * MiB, "compute": int(20.77 * MiB)}


# ---------------------------------------------------------------- admission


def test_check_fit_refuses_on_a_2_gib_machine_with_need_have_and_suggestions(demo_model: Path) -> None:
    g = guard(machine(2, 1.2))  # margin: 10% of 2 GiB + 512 MiB = 717 MiB, so ~512 MiB usable
    big = spec(demo_model, n_ctx=32768, slots=3)
    with pytest.raises(InsufficientMemory) as err:
        g.check_fit(big, [])
    exc = err.value
    have = g.available().have()["ram"]
    assert exc.need["ram"] == g.need(big).ram_bytes > have == exc.have["ram"]
    assert re.match(r"model 'gemma3-270m' does not fit in memory \(ram: needs \d+ MiB, \d+ MiB free\)", exc.message)
    m = re.match(r"use n_ctx (\d+) or less \(saves ([\d.]+) (MiB|GiB)\)", exc.suggestions[0])
    assert m, exc.suggestions
    n_ctx = int(m.group(1))
    assert g.need(replace(big, n_ctx=n_ctx)).ram_bytes <= have
    saved = exc.need["ram"] - g.need(replace(big, n_ctx=n_ctx)).ram_bytes
    assert abs(float(m.group(2)) * (GiB if m.group(3) == "GiB" else MiB) - saved) < 0.05 * GiB
    g.check_fit(replace(big, n_ctx=n_ctx), [])  # the suggestion works
    m = next(re.match(r"use (\d+) slots? or fewer", s) for s in exc.suggestions if "slot" in s)
    assert m, exc.suggestions  # 3 slots hold 3 contexts: fewer is the other way
    assert g.need(replace(big, slots=int(m.group(1)))).ram_bytes <= have


def test_margin_is_ten_percent_plus_512_mib_by_default_and_configurable(demo_model: Path) -> None:
    s = spec(demo_model)
    need = guard(machine()).need(s).ram_bytes
    margin = int(4 * GiB * 0.10) + 512 * MiB
    guard(machine(4, (need + margin) / GiB)).check_fit(s, [])
    with pytest.raises(InsufficientMemory):
        guard(machine(4, (need + margin - MiB) / GiB)).check_fit(s, [])
    guard(machine(4, (need + 1) / GiB), margin_fraction=0, margin_fixed_bytes=0).check_fit(s, [])


def test_gpu_short_suggests_fewer_gpu_layers_that_fit(demo_model: Path) -> None:
    g = guard(machine(16, 16, (8, 1.9)))  # an 8 GiB GPU, ~0.6 GiB usable after its 1.3 GiB margin
    s = spec(demo_model, n_gpu_layers=99)
    with pytest.raises(InsufficientMemory) as err:
        g.check_fit(s, [])
    assert err.value.need["gpu0"] > err.value.have["gpu0"]
    hint = next(x for x in err.value.suggestions if "n_gpu_layers" in x)
    ngl = int(re.search(r"n_gpu_layers (\d+)", hint).group(1))  # type: ignore[union-attr]
    have = g.available().have()
    assert 0 < ngl < 19
    assert g.need(replace(s, n_gpu_layers=ngl)).need()["gpu0"] <= have["gpu0"]
    assert g.need(replace(s, n_gpu_layers=ngl + 1)).need()["gpu0"] > have["gpu0"]
    g.check_fit(replace(s, n_gpu_layers=ngl), [])


def test_running_servers_use_up_a_simulated_machine_and_stopping_them_is_suggested(demo_model: Path) -> None:
    g = guard(machine(4, 4), margin_fraction=0, margin_fixed_bytes=0)
    other = FakeServer(replace(spec(demo_model, n_ctx=32768, slots=3), model="big"))
    s = spec(demo_model)
    # shared file: the new server needs only its own memory, not the mapped weights again
    assert combined_need([g.need(s)], [str(demo_model.resolve())])["ram"] == g.need(s).anon_ram_bytes
    total = g.need(other.spec).ram_bytes + g.need(s).anon_ram_bytes
    tight = guard(machine(4, (total - MiB) / GiB), margin_fraction=0, margin_fixed_bytes=0)
    with pytest.raises(InsufficientMemory) as err:
        tight.check_fit(s, [other])
    assert any(re.match(r"stop 'big' \(frees \d+ MiB\)", x) for x in err.value.suggestions), err.value.suggestions
    guard(machine(4, (total + MiB) / GiB), margin_fraction=0, margin_fixed_bytes=0).check_fit(s, [other])


def test_concurrent_starts_count_each_other_until_they_run(demo_model: Path) -> None:
    probe = machine(4, 4)
    first, second = spec(demo_model, n_ctx=32768, slots=3), replace(spec(demo_model), model="other")
    other_file = replace(second, model_path=Path("/dev/null"))  # no GGUF: not checked, never pending
    g = guard(probe, margin_fraction=0, margin_fixed_bytes=0)
    room = g.need(first).ram_bytes + g.need(second).anon_ram_bytes
    g = guard(machine(4, (room - MiB) / GiB), margin_fraction=0, margin_fixed_bytes=0)
    g.check_fit(first, [])  # admitted; its server is still loading
    with pytest.raises(InsufficientMemory):
        g.check_fit(second, [])  # both would fit the empty machine, not together
    g.check_fit(other_file, [])
    g.forget(first)  # its start failed
    g.check_fit(second, [])


def test_no_gpu_forces_n_gpu_layers_0_with_one_log_line(config_dir: ConfigDir,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    cpu = Runtime(load_config(config_dir.path), probe=machine(8))
    with caplog.at_level(logging.INFO, logger="chorus.runtime"):
        assert cpu.server_spec("gemma3-270m").n_gpu_layers == 0  # models.yaml asks for 99
        assert cpu.server_spec("gemma3-270m", n_gpu_layers=5).n_gpu_layers == 0
    warnings = [r for r in caplog.records if "n_gpu_layers forced to 0" in r.getMessage()]
    assert len(warnings) == 1 and "no GPU" in warnings[0].getMessage()
    gpu = Runtime(load_config(config_dir.path), probe=machine(8, 8, (8, 8)))
    assert gpu.server_spec("gemma3-270m").n_gpu_layers == 99


# ---------------------------------------------------------------- planning


def waves_of(sched: Schedule) -> list[list[int]]:
    return [[p.demand for p in w.placements] for w in sched.waves]


def test_scheduler_packs_servers_that_do_not_fit_together_into_waves(demo_model: Path) -> None:
    g0 = guard(machine())
    specs = [spec(demo_model, n_ctx=c) for c in (32768, 16384, 8192)]
    pair = combined_need([g0.need(specs[0]), g0.need(specs[1])])["ram"]
    trio = combined_need([g0.need(s) for s in specs])["ram"]
    g = guard(machine(8, (pair + MiB) / GiB), margin_fraction=0, margin_fixed_bytes=0)
    assert pair < trio
    demands = [Demand(s, 1) for s in specs]
    sched = g.schedule(demands, g.state())
    assert not sched.fits_together and sched.unfit == []
    assert waves_of(sched) == [[0, 1], [2]]
    roomy = guard(machine(8, (trio + MiB) / GiB), margin_fraction=0, margin_fixed_bytes=0)
    together = roomy.schedule(demands, roomy.state())
    assert together.fits_together and waves_of(together) == [[0, 1, 2]]
    tiny = guard(machine(8, 0.1), margin_fraction=0, margin_fixed_bytes=0)
    alone = tiny.schedule(demands, tiny.state())
    assert [u.demand for u in alone.unfit] == [0, 1, 2] and alone.waves == []


def test_scheduler_reuses_a_warm_server_and_stops_an_idle_one_it_does_not_use(demo_model: Path) -> None:
    g0 = guard(machine())
    idle = FakeServer(spec(demo_model, n_ctx=32768, slots=3))
    used = FakeServer(spec(demo_model, n_ctx=2048, slots=3))
    wanted = [Demand(spec(demo_model, n_ctx=2048, slots=2), 2), Demand(spec(demo_model, n_ctx=16384, slots=3), 3)]
    # room for the used server and the new one, not for the idle one as well
    room = combined_need([g0.need(used.spec), g0.need(wanted[1].spec)])["ram"] + MiB
    g = guard(machine(8, room / GiB), margin_fraction=0, margin_fixed_bytes=0)
    sched = g.schedule(wanted, g.state([idle, used]))
    assert sched.fits_together
    wave = sched.waves[0]
    first, second = wave.placements
    assert first.reuse is not None and first.reuse.holding.server is used  # 3 slots serve a request for 2
    assert second.starts and second.spec.slots == 3
    assert [w.holding.server for w in wave.stop] == [idle]
    assert g.state([idle, used]).have["ram"] < g.need(wanted[1].spec).anon_ram_bytes  # not without stopping it
    # the idle one in use now (by another run): nothing may stop it, so the new server waits for the warm
    # one to finish its calls, and then takes its room
    busy = g.schedule(wanted, g.state([idle, used], idle=lambda s: s is not idle))
    # (room for one slot of it then: three waves on that one server, started once)
    assert waves_of(busy) == [[0], [1], [1], [1]] and busy.unfit == []
    assert [w.holding.server for w in busy.waves[1].stop] == [used]
    assert [p.starts for w in busy.waves[1:] for p in w.placements] == [True, False, False]


def test_a_server_that_does_not_fit_with_all_its_slots_runs_with_fewer_then_reuses_them(demo_model: Path) -> None:
    """Issue #22, shape 1: three calls of one model never split. They run as a 2-slot server, then 1 call
    on the same (warm) server: no reload, and "does not fit even alone" is never said."""
    g0 = guard(machine())
    three, two = (g0.need(spec(demo_model, n_ctx=4096, slots=n)) for n in (3, 2))
    assert footprint(two) < footprint(three)
    g = guard(machine(8, (two.ram_bytes + MiB) / GiB), margin_fraction=0, margin_fixed_bytes=0)
    sched = g.schedule([Demand(spec(demo_model, n_ctx=4096, slots=3), 3)], g.state())
    assert sched.unfit == [] and len(sched.waves) == 2
    first, second = sched.waves
    assert [(p.spec.slots, p.calls, p.starts) for p in first.placements] == [(2, 2, True)]
    assert [(p.spec.slots, p.calls, p.starts) for p in second.placements] == [(2, 1, False)]
    assert second.stop == [] and second.need.get("ram", 0) == 0


def test_a_warm_server_with_too_few_slots_is_restarted_bigger_when_that_fits(demo_model: Path) -> None:
    g0 = guard(machine())
    warm = FakeServer(spec(demo_model, n_ctx=4096, slots=1))
    three = g0.need(spec(demo_model, n_ctx=4096, slots=3))
    g = guard(machine(8, (three.ram_bytes + MiB) / GiB), margin_fraction=0, margin_fixed_bytes=0)
    sched = g.schedule([Demand(spec(demo_model, n_ctx=4096, slots=3), 3)], g.state([warm]))
    assert len(sched.waves) == 1
    wave = sched.waves[0]
    assert [w.holding.server for w in wave.stop] == [warm]
    assert [(p.spec.slots, p.calls, p.starts) for p in wave.placements] == [(3, 3, True)]
    busy = g.schedule([Demand(spec(demo_model, n_ctx=4096, slots=3), 3)], g.state([warm], idle=lambda s: False))
    assert [len(w.placements) and w.placements[0].calls for w in busy.waves] == [1, 1, 1]  # in use: reused as is


# ---------------------------------------------------------------- the budget device and the ledger


def test_budget_is_a_device_of_the_probe_with_no_margin(demo_model: Path, tmp_path: Path) -> None:
    from launcher.memory.ledger import AdmissionLedger
    from launcher.memory.probes import BudgetProbe

    ledger = AdmissionLedger(tmp_path / "admission.json")
    snap = BudgetProbe(machine(8), 500 * MiB, ledger).snapshot()
    assert snap.free()["budget"] == snap.total()["budget"] == 500 * MiB and "budget" in snap.static_devices
    g = guard(machine(8), budget_bytes=500 * MiB, ledger=ledger)
    avail = g.available()
    assert avail.have()["budget"] == 500 * MiB and avail.margin["budget"] == 0
    assert "memory_budget_mib" in (avail.notes.get("budget") or "")
    other = FakeServer(replace(spec(demo_model), model="other"))
    used = g.need(other.spec)
    assert g.available([other]).have()["budget"] == 500 * MiB - (used.ram_bytes + used.vram_bytes)


def test_ledger_drops_entries_of_dead_processes_and_reused_pids(tmp_path: Path) -> None:
    import os

    from launcher.memory.ledger import AdmissionLedger, LedgerEntry, this_process

    ledger = AdmissionLedger(tmp_path / "admission.json")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid, started = this_process()
    with ledger.transaction() as entries:
        entries.append(LedgerEntry(dead.pid, started, "k1", "gone", {"budget": 100 * MiB}))
        entries.append(LedgerEntry(pid, started - 1000, "k2", "reused pid", {"budget": 100 * MiB}))
        entries.append(LedgerEntry(pid, started, "k3", "mine", {"budget": 7 * MiB}))
        entries.append(LedgerEntry(pid, started, "k4", "stale start", {"budget": 9 * MiB}, since=time.time() - 1e4))
    assert [e.model for e in ledger.entries()] == ["mine"]
    assert ledger.held("budget") == 0 and ledger.held("budget", others_only=False) == 7 * MiB
    assert oct(os.stat(tmp_path / "admission.json").st_mode & 0o777) == "0o600"
    (tmp_path / "admission.json").write_text("{not json")
    assert ledger.entries() == []  # a damaged ledger is ignored, not fatal


# ---------------------------------------------------------------- calibration (no server)


def test_calibration_cache_returns_the_measured_figure_for_that_configuration(demo_model: Path,
                                                                              tmp_path: Path) -> None:
    cache = CalibrationCache(tmp_path / "cal")
    g = guard(machine(), calibration=cache)
    s = spec(demo_model)
    est = g.need(s)
    assert est.source == "estimate"
    m = Measurement(pid=1, rss_bytes=est.ram_bytes + 10 * MiB, rss_anon_bytes=90 * MiB, rss_file_bytes=250 * MiB,
                    pss_bytes=None)
    rec = cache.record(s, m, est)
    assert rec is not None and rec.error_pct["ram"] < 0
    again = MemoryGuard(machine(), calibration=CalibrationCache(tmp_path / "cal"), settings=NO_REPACK).need(s)
    assert again.source == "calibrated" and again.ram_bytes == est.ram_bytes + 10 * MiB
    low = Measurement(pid=1, rss_bytes=est.ram_bytes // 2, rss_anon_bytes=0, rss_file_bytes=0, pss_bytes=None)
    cache.record(replace(s, n_ctx=4096), low, g.need(replace(s, n_ctx=4096)))  # RSS right after a start
    assert g.need(replace(s, n_ctx=4096)).ram_bytes == g.estimate(replace(s, n_ctx=4096)).ram_bytes  # not lower
    data = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert data["version"] == 1 and len(data["records"]) == 2
    assert not list((tmp_path / "cal").glob("*.tmp"))  # written atomically, nothing left over
    (tmp_path / "cal" / "calibration.json").write_text("{not json")
    assert CalibrationCache(tmp_path / "cal").get(s) is None  # a broken cache is ignored, not fatal


# ---------------------------------------------------------------- integration: the real server


def _generate(server: ModelServer) -> None:
    ep = Endpoint(server.model, server.base_url, "completion", server.api_key)

    async def go() -> None:
        async with GenerationClient(timeout_s=120) as client:
            await client.generate(ep, GenerationRequest("The capital of France is", max_tokens=8, seed=1))

    asyncio.run(go())


@pytest.mark.integration
@pytest.mark.serial  # measures a real server's memory
def test_estimate_matches_llama_cpp_buffers_and_measured_rss(llama_server_bin: Path, demo_model: Path,
                                                            tmp_path: Path) -> None:
    """The estimate is llama.cpp's peak (full KV and compute buffers); RSS after a short generation
    touches a little less of them. Against the peak, bench/memory_accuracy.py holds every row within 5%
    (demo and zoo); this short run allows 15% for an unfilled compute buffer, another CPU and kernel, and
    still catches a wrong formula (a missing SWA cap or slot factor is off by 30% or more at this size)."""
    s = spec(demo_model, n_ctx=2048, slots=3)
    server = ModelServer(s, llama_server_bin, tmp_path, ServerOptions(log_verbosity=4)).start()
    try:
        _generate(server)
        m = measure_server(server)
    finally:
        server.stop()
    assert m is not None
    est = MemoryGuard(machine()).estimate(s)  # this CPU's repacking included
    ram = est.breakdown["ram"]
    logged = m.buffers["ram"]
    assert ram["kv"] == logged["kv"] == 63 * MiB  # (6 + 15) MiB x 3 slots
    assert ram["output"] == logged["output"]
    assert abs(ram["weights"] + ram.get("weights_repacked", 0) - logged["weights"]) < 0.02 * MiB * 2
    assert abs(ram["compute"] - logged["compute"]) < 0.10 * logged["compute"]
    # SWA context checkpoints are an allowance (up to CTX_CHECKPOINTS copies per slot once prompts repeat):
    # a short generation makes none, so RSS is compared with the estimate without them
    without = est.ram_bytes - ram.get("checkpoints", 0)
    error = (without - m.rss_bytes) / m.rss_bytes
    assert abs(error) < 0.15, f"estimate {without / MiB:.0f} MiB vs RSS {m.rss_bytes / MiB:.0f} MiB"


@pytest.mark.integration
@pytest.mark.serial  # measures a real server's memory
def test_runtime_calibrates_a_new_server_and_the_next_need_is_the_measurement(
        config_dir: ConfigDir, llama_server_bin: Path, tmp_path: Path) -> None:
    cache = CalibrationCache(tmp_path / "cal")
    rt = Runtime(load_config(config_dir.path), calibration=cache)
    try:
        s = rt.server_spec("gemma3-270m", n_ctx=1024)
        assert rt.memory_guard.need(s).source == "estimate"
        with rt.pool.lease(s) as server:
            rss = server.rss_bytes()
        rec = cache.get(s)
        assert rec is not None and rss is not None
        assert abs(rec.ram_bytes - rss) < 0.05 * rss  # measured right after the start
        assert rec.estimate_ram_bytes and "ram" in rec.error_pct
        need = rt.memory_guard.need(s)
        assert need.source == "calibrated" and need.ram_bytes == max(rec.ram_bytes, rec.estimate_ram_bytes)
    finally:
        rt.close()


@pytest.mark.integration
@pytest.mark.serial  # measures a real server's memory
def test_a_calibrated_need_still_covers_the_server_after_a_long_prompt(
        config_dir: ConfigDir, llama_server_bin: Path, tmp_path: Path) -> None:
    """RSS right after the start misses the KV and compute pages a long prompt touches: calibrated from it,
    the need was 332 MiB where the server held 372-382 MiB, and a budget it admitted was exceeded."""
    cache = CalibrationCache(tmp_path / "cal")
    rt = Runtime(load_config(config_dir.path), calibration=cache)
    try:
        s = rt.server_spec("gemma3-270m", n_ctx=2048)
        with rt.pool.lease(s) as server:
            assert cache.get(s) is not None  # calibrated at the start
            ep = Endpoint(server.model, server.base_url, "completion", server.api_key)
            prompt = "The harbour was quiet before dawn and the boats rocked at the pier. " * 90  # ~1500 tokens

            async def go() -> None:
                async with GenerationClient(timeout_s=300) as client:
                    await client.generate(ep, GenerationRequest(prompt, max_tokens=8, seed=1))

            asyncio.run(go())
            held = server.rss_bytes()
        need = rt.memory_guard.need(s)
        assert need.source == "calibrated" and held is not None
        assert need.ram_bytes >= held, f"need {need.ram_bytes / MiB:.0f} MiB < held {held / MiB:.0f} MiB"
    finally:
        rt.close()


@pytest.mark.integration
@pytest.mark.serial  # measures a real server's memory
def test_runtime_admission_stops_the_lru_idle_server_then_refuses(llama_server_bin: Path, demo_model: Path,
                                                                 config_dir: ConfigDir, tmp_path: Path) -> None:
    """The one eviction policy, through the pool's admission (a start no wave reserved): the scheduler
    stops the least recently used idle server; with both in use, nothing is stopped and the start is refused."""
    a, b, c, d = (spec(demo_model, n_ctx=n) for n in (512, 768, 1024, 640))
    probe = FixedProbe(4 * GiB, 4 * GiB)
    rt = Runtime(load_config(config_dir.path), probe=probe, calibration=CalibrationCache(tmp_path))
    pool = rt.pool
    try:
        sa = pool.acquire(a)
        pool.release(sa)
        time.sleep(0.01)
        sb = pool.acquire(b)
        pool.release(sb)
        # a and b up (and measured): room for c's own memory only once half of a's is given back
        g = rt.memory_guard
        up = held([w.holding for w in rt.memory_state().warm])["ram"]
        margin = int(4 * GiB * 0.10) + 512 * MiB
        probe.ram_available_bytes = margin + up + g.need(c).anon_ram_bytes - g.need(a).anon_ram_bytes // 2
        sc = pool.acquire(c)  # a is idle and least recently used: stopped to make room
        assert not sa.is_alive() and sb.is_alive() and sc.is_alive()
        sb2 = pool.acquire(b)  # b and c both in use now: nothing can be stopped
        assert sb2 is sb
        with pytest.raises(InsufficientMemory) as err:
            pool.acquire(d)
        assert err.value.need["ram"] > err.value.have["ram"]
        assert len(pool.servers()) == 2
    finally:
        rt.close()


def test_chorus_plan_json_has_the_documented_keys(config_dir: ConfigDir) -> None:
    """`chorus plan` as a user runs it, a process of its own."""
    out = subprocess.run([sys.executable, "-m", "cli", "plan", "--json", "--config-dir",
                          str(config_dir.path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"ram_bytes", "vram_bytes"} <= set(data["available"])
    assert [s["name"] for s in data["stages"]] == ["analyse", "draft", "review"]
    for stage in data["stages"]:
        assert isinstance(stage["fits_together"], bool) and isinstance(stage["waves"], list)
        for m in stage["models"]:
            assert {"name", "ram_bytes", "vram_bytes"} <= set(m) and m["ram_bytes"] > 0
    text = run_main("plan", "--config-dir", str(config_dir.path))  # the table: main() in this process
    assert text.returncode == 0 and "stage 'review'" in text.stdout and "fits together" in text.stdout


# ---------------------------------------------------------------- VRAM through a fake NVML


class FakeNvml:
    """The part of pynvml chorus calls, for a machine with these GPUs (total, used) and per-process VRAM."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[tuple[str, int, int]], procs: dict[int, dict[int, int]] | None = None) -> None:
        self.gpus, self.procs = gpus, procs or {}
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.gpus[h][0].encode()

    def nvmlDeviceGetMemoryInfo(self, h: int) -> object:
        _, total, used = self.gpus[h]
        return type("Mem", (), {"total": total, "free": total - used, "used": used})()

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[object]:
        return [type("Proc", (), {"pid": pid, "usedGpuMemory": per_gpu[h]})()
                for pid, per_gpu in self.procs.items() if h in per_gpu]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    nvml = FakeNvml([("Fake A100 80GB", 80 * GiB, 2 * GiB), ("Fake L4", 24 * GiB, 0)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


def test_system_probe_sees_the_gpus_nvml_reports_and_the_estimate_plans_vram_on_them(
        fake_nvml: FakeNvml, demo_model: Path) -> None:
    snap = SystemProbe().snapshot()
    assert [(g.index, g.name, g.total_bytes, g.free_bytes) for g in snap.gpus] == [
        (0, "Fake A100 80GB", 80 * GiB, 78 * GiB), (1, "Fake L4", 24 * GiB, 24 * GiB)]
    assert fake_nvml.inits == 0  # every nvmlInit is shut down again
    g = MemoryGuard(SystemProbe(), settings=NO_REPACK)
    full = g.estimate(spec(demo_model, n_gpu_layers=-1))
    assert full.gpu_layers_used == 19 and {"gpu0", "gpu1"} <= set(full.need())  # split by free memory
    assert full.vram_bytes > full.breakdown["gpu0"]["weights"] + full.breakdown["gpu1"]["weights"]
    cpu = g.estimate(spec(demo_model, n_gpu_layers=0))
    assert cpu.vram_bytes == 0 and "kv" not in full.breakdown["ram"] and cpu.breakdown["ram"]["kv"] > 0
    assert full.mapped_bytes < cpu.mapped_bytes  # only the input layer stays mapped on the CPU
    assert full.breakdown["ram"]["overhead"] - cpu.breakdown["ram"]["overhead"] == NO_REPACK.gpu_host_bytes


def test_server_vram_from_nvml_is_measured_per_gpu_and_calibrates_the_next_need(
        fake_nvml: FakeNvml, demo_model: Path, tmp_path: Path) -> None:
    import os

    fake_nvml.procs = {os.getpid(): {0: 700 * MiB, 1: 300 * MiB}, 1: {0: 5 * GiB}}  # pid 1: not ours
    server = FakeServer(spec(demo_model, n_gpu_layers=-1))
    server.process = type("P", (), {"pid": os.getpid(), "poll": lambda self: None})()  # type: ignore[assignment]
    assert server.pid == os.getpid()
    m = measure_server(server)
    assert m is not None and m.vram_bytes == {0: 700 * MiB, 1: 300 * MiB}
    cache = CalibrationCache(tmp_path / "cal")
    g = MemoryGuard(SystemProbe(), calibration=cache, settings=NO_REPACK)
    est = g.estimate(server.spec)
    rec = cache.record(server.spec, m, est)
    assert rec is not None and rec.vram_bytes == {"gpu0": 700 * MiB, "gpu1": 300 * MiB}
    assert set(rec.error_pct) >= {"ram", "gpu0", "gpu1"}
    need = g.need(server.spec)
    assert need.source == "calibrated" and need.need()["gpu0"] == 700 * MiB and need.need()["gpu1"] == 300 * MiB


def test_no_driver_means_no_gpu_and_a_cpu_only_estimate(monkeypatch: pytest.MonkeyPatch, demo_model: Path) -> None:
    broken = FakeNvml([])

    def fail() -> None:
        raise FakeNvml.NVMLError("NVML Shared Library Not Found")

    broken.nvmlInit = fail  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    snap = SystemProbe().snapshot()
    assert snap.gpus == () and snap.gpu_note and "no GPU" in snap.gpu_note
    est = MemoryGuard(SystemProbe(), settings=NO_REPACK).estimate(spec(demo_model, n_gpu_layers=99))
    assert est.vram_bytes == 0 and est.gpu_layers_used == 0


def test_no_driver_is_one_quiet_debug_line_without_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from launcher.memory.probes import process_vram

    broken = FakeNvml([])

    def fail() -> None:
        raise FakeNvml.NVMLError("NVML Shared Library Not Found")

    broken.nvmlInit = fail  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    with caplog.at_level(logging.DEBUG, logger="chorus"):
        assert process_vram([1]) == {}
    [record] = [r for r in caplog.records if "NVML" in r.getMessage()]
    assert record.exc_info is None and record.getMessage() == "no per-process VRAM from NVML: NVIDIA driver not found"
