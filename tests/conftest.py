"""Shared fixtures: the two demo models, and throwaway config dirs built from the shipped ones.

Two tiers. A test that needs the real llama-server or a demo model file (it takes one of REAL_FIXTURES
below, directly or through another fixture, or is marked ``integration``/``browser``) is marked
``integration`` at collection. Every other test is the fast tier (``scripts/test.sh --fast``: ``-m "not
integration and not browser"``): its ``config_dir`` holds synthetic GGUF files with the demo models' names,
headers and tensor tables, sparse (a few KB on disk), written here, so it never skips for a missing model.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import yamlfile

if TYPE_CHECKING:
    from launcher.process.server import ModelServer

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"          # gemma3-270m: a base model, completion mode
SECOND_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # smollm2-135m: an instruct model, chat mode


def demo_model_path() -> Path:
    return Path(os.environ.get("CHORUS_DEMO_MODEL", REPO / "models" / DEMO_MODEL_NAME))


def second_model_path() -> Path:
    return Path(os.environ.get("CHORUS_SECOND_MODEL", REPO / "models" / SECOND_MODEL_NAME))


@pytest.fixture(scope="session")
def demo_model() -> Path:
    path = demo_model_path()
    if not path.is_file():
        pytest.skip(f"demo model not found at {path}: run scripts/setup.sh")
    return path


@pytest.fixture(scope="session")
def second_model() -> Path:
    """SmolLM2-135M-Instruct (scripts/fetch_smollm2.py): the base pipeline's chat-mode model."""
    path = second_model_path()
    if not path.is_file():
        pytest.skip(f"second demo model not found at {path}: run scripts/setup.sh")
    return path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("CHORUS_CONFIG_DIR", "CHORUS_MODELS_DIR", "CHORUS_SESSIONS_DIR", "CHORUS_HOME"):
        monkeypatch.delenv(var, raising=False)
    # the cross-process admission ledger of this test only (the real one is shared by the whole machine)
    monkeypatch.setenv("CHORUS_ADMISSION_LEDGER", str(tmp_path / "admission.json"))


@pytest.fixture(autouse=True)
def _no_fsync_in_the_fast_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync makes a write outlive a power cut, which no test can observe, and costs 4-20 ms on this disk:
    four history test files made 1,375 calls (24 s of waiting). The fast tier skips it in this process (the
    processes it starts keep it; test_sessions.py checks that an atomic write calls it); integration tests
    keep it. SQLite's own syncs stay: without them the concurrent-index test loses rows (a race they hide)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setattr(os, "fsync", lambda fd: None)


_STREAMLIT_ONCE: dict[str, Any] = {}  # what a served app computes once, computed once per test session


@pytest.fixture(autouse=True)
def _streamlit_work_done_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A served Streamlit app compiles each page once (magic rewrite, then compile) and scans the installed
    packages for components once; AppTest compiles every page again on each run (a third of a click's time)
    and scans the ~100 installed distributions' metadata for every new AppTest (0.1 s each). Here AppTest
    shares one page cache and one scan, as the server does: neither the pages nor the installed packages
    change during a test session. Only where a test module has imported AppTest."""
    if "streamlit.testing.v1.app_test" not in sys.modules:
        return
    from streamlit.components.v2 import manifest_scanner
    from streamlit.testing.v1 import app_test, local_script_runner

    if not _STREAMLIT_ONCE:
        _STREAMLIT_ONCE["pages"] = app_test.ScriptCache()
        _STREAMLIT_ONCE["manifests"] = manifest_scanner.scan_component_manifests()
    pages, manifests = _STREAMLIT_ONCE["pages"], _STREAMLIT_ONCE["manifests"]
    for module in (app_test, local_script_runner):
        monkeypatch.setattr(module, "ScriptCache", lambda: pages)
    monkeypatch.setattr(manifest_scanner, "scan_component_manifests", lambda max_workers=None: manifests)


class ConfigDir:
    """A copy of the shipped config in tmp, with models_dir pointing at a folder we control."""

    def __init__(self, root: Path, models_dir: Path) -> None:
        self.path = root / "config"
        shutil.copytree(REPO / "config", self.path)
        self.models_dir = models_dir
        self.sessions_dir = root / "sessions"
        self.write_app(models_dir=str(models_dir), sessions_dir=str(self.sessions_dir),
                       logs_dir=str(root / "logs"))

    def write_app(self, **values: object) -> None:
        app = yamlfile.load((self.path / "app.yaml").read_text()) or {}
        app.update(values)
        (self.path / "app.yaml").write_text(yamlfile.dump(app))

    def models(self) -> dict:
        return yamlfile.load((self.path / "models.yaml").read_text())

    def write_models(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else yamlfile.dump(data)
        (self.path / "models.yaml").write_text(text)

    def pipeline(self) -> dict:
        return yamlfile.load((self.path / "pipeline.yaml").read_text())

    def write_pipeline(self, data: dict | str) -> None:
        text = data if isinstance(data, str) else yamlfile.dump(data, sort_keys=False)
        (self.path / "pipeline.yaml").write_text(text)


# Fixtures that mean "needs the real llama-server or a demo model file": a test using one (directly or
# through another fixture) is an integration test.
REAL_FIXTURES = frozenset({"llama_server_bin", "demo_model", "second_model", "runtime", "shared_runtime",
                           "warm_demo_server", "warm_chat_server",
                           "zoo"})  # zoo: synthetic zoo files built from the llama.cpp source tree of the build


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "serial: runs with no other test at the same time, also under pytest-xdist "
                                       "(it measures real memory or needs the cores to itself)")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and os.environ.get("CHORUS_TESTS_SPLIT_CORES"):
        _take_this_workers_cores(int(workerinput["workercount"]), int(str(workerinput["workerid"]).removeprefix("gw")))


def _take_this_workers_cores(workers: int, index: int) -> None:
    """One xdist worker of `workers` (scripts/test.sh --rest) keeps to its own share of the cores, and so do
    the chorus processes and llama-servers it starts; a server started without -t runs a thread per core of
    the share (LLAMA_ARG_THREADS), chorus gives its servers a share of them (launcher.cpus reads the affinity).
    Two workers whose servers each ran a thread per core of the machine fought over the cores: llama.cpp's
    threads wait for each other at every step, and two 2-thread servers on 2 cores took twice the CPU time
    for the same tokens (the whole tier about 15 CPU-minutes instead of 7)."""
    cpus = sorted(os.sched_getaffinity(0))
    if 1 < workers <= len(cpus):
        mine = set(cpus[index::workers])
        os.sched_setaffinity(0, mine)
        os.environ["LLAMA_ARG_THREADS"] = str(len(mine))


# Real-server test files whose tests take longest, most of it waiting (for a worker to answer, timed cuts of
# a link, a browser): first, so that pytest-xdist starts them while the other worker runs the short ones,
# not last with nothing left to run beside them (scripts/test.sh --rest keeps this order).
LONG_FIRST = ("tests/test_netns_worker_lost.py", "tests/test_netns_failover.py", "tests/test_browser.py",
              "tests/test_gguf.py", "tests/test_eval_resume_after_stop.py", "tests/test_eval.py")
# The same for the fast tier (scripts/test.sh --fast), its files of 4-11 s: alphabetical order put
# test_ui.py last, alone on one worker while the other had finished.
FAST_LONG_FIRST = ("tests/test_ui.py", "tests/test_api_reasoning.py", "tests/faults/test_history_damage.py",
                   "tests/faults/test_api_key_argv.py", "tests/faults/test_bad_configs.py", "tests/test_install.py",
                   "tests/faults/test_api_stop_with_open_stream.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration") is None and (
                item.get_closest_marker("browser") is not None
                or REAL_FIXTURES.intersection(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.integration)
    slow = {path: i for i, path in enumerate(LONG_FIRST)}
    fast = {path: i for i, path in enumerate(FAST_LONG_FIRST)}

    def rank(item: pytest.Item) -> int:
        ranks = slow if item.get_closest_marker("integration") is not None else fast
        return ranks.get(item.nodeid.split("::")[0], len(ranks))

    items.sort(key=rank)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under pytest-xdist, a `serial` test holds a lock file exclusively and every other test holds it shared,
    around its whole setup, call and teardown: a serial test waits for the tests running on the other
    workers, and they wait for it. A serial test that waits also holds a turnstile that other tests pass
    before they take their share, so a worker going from test to test cannot starve it. Without xdist there
    is one test at a time anyway. (scripts/test.sh --rest runs the serial tests in a pass of their own, so
    that none waits for a long test on the other worker; this keeps them alone in any other run.)"""
    basetemp = item.config.option.basetemp  # a worker's: <the run's basetemp>/<worker id>
    if getattr(item.config, "workerinput", None) is None or not basetemp:
        yield
        return
    import fcntl

    root = Path(basetemp).parent
    with open(root / "serial.turnstile", "a") as turnstile, open(root / "serial.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if item.get_closest_marker("serial"):
            fcntl.flock(lock, fcntl.LOCK_EX)  # the turnstile stays closed until this test is done
        else:
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield  # both locks go with the files' closing


SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# The demo files' headers: metadata (no vocabulary list: {arch}.vocab_size instead) and the tensor table
# (name with {i} per block, GGUF shape ne0 first, ggml type; a pair alternates by block), copied from the
# real files.
SYNTHETIC_HEADERS: dict[str, dict[str, object]] = {
    DEMO_MODEL_NAME: {
        "arch": "gemma3", "blocks": 18,
        "strings": {"general.type": "model", "general.name": "Gemma 3 270m", "general.basename": "gemma-3",
                    "general.size_label": "270M", "general.license": "gemma", "tokenizer.ggml.model": "llama",
                    "tokenizer.ggml.pre": "default"},
        "u32": {"gemma3.context_length": 32768, "gemma3.embedding_length": 640, "gemma3.block_count": 18,
                "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
                "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
                "gemma3.attention.sliding_window": 512, "gemma3.attention.head_count_kv": 1,
                "gemma3.vocab_size": 262144, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
                "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
                "general.quantization_version": 2, "general.file_type": 15},
        "f32": {"gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6},
        "bool": {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False},
        "tensors": [("output_norm.weight", (640,), 0), ("token_embd.weight", (640, 262144), 8)]
        + [(f"blk.{{i}}.{n}", shape, t) for n, shape, t in (
            ("attn_k.weight", (640, 256), 6), ("attn_k_norm.weight", (256,), 0), ("attn_norm.weight", (640,), 0),
            ("attn_output.weight", (1024, 640), 12), ("attn_q.weight", (640, 1024), 6),
            ("attn_q_norm.weight", (256,), 0), ("attn_v.weight", (640, 256), (6, 8)),
            ("ffn_down.weight", (2048, 640), (12, 14)), ("ffn_gate.weight", (640, 2048), 6),
            ("ffn_norm.weight", (640,), 0), ("ffn_up.weight", (640, 2048), 6),
            ("post_attention_norm.weight", (640,), 0), ("post_ffw_norm.weight", (640,), 0))],
    },
    SECOND_MODEL_NAME: {
        "arch": "llama", "blocks": 30,
        "strings": {"general.type": "model", "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2",
                    "general.organization": "HuggingFaceTB", "general.basename": "smollm2",
                    "general.size_label": "135M", "general.license": "apache-2.0", "tokenizer.ggml.model": "gpt2",
                    "tokenizer.ggml.pre": "smollm", "tokenizer.chat_template": SMOLLM2_CHAT_TEMPLATE},
        "u32": {"llama.block_count": 30, "llama.context_length": 8192, "llama.embedding_length": 576,
                "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
                "llama.attention.head_count_kv": 3, "general.file_type": 3, "llama.vocab_size": 49152,
                "llama.rope.dimension_count": 64, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                "tokenizer.ggml.padding_token_id": 2, "general.quantization_version": 2},
        "f32": {"llama.rope.freq_base": 1e5, "llama.attention.layer_norm_rms_epsilon": 1e-5},
        "bool": {"tokenizer.ggml.add_bos_token": False},
        "tensors": [("token_embd.weight", (576, 49152), 8), ("output_norm.weight", (576,), 0)]
        + [(f"blk.{{i}}.{n}", shape, t) for n, shape, t in (
            ("attn_norm.weight", (576,), 0), ("ffn_down.weight", (1536, 576), 3),
            ("ffn_gate.weight", (576, 1536), 3), ("ffn_up.weight", (576, 1536), 3), ("ffn_norm.weight", (576,), 0),
            ("attn_k.weight", (576, 192), 3), ("attn_output.weight", (576, 576), 3),
            ("attn_q.weight", (576, 576), 3), ("attn_v.weight", (576, 192), 3))],
    },
}


def write_synthetic_gguf(path: Path, name: str = DEMO_MODEL_NAME) -> Path:
    """A stand-in for demo file `name`: its GGUF header (metadata, chat template, the full tensor table
    with the real shapes and quantization types), then a sparse hole for the tensor data. The registry,
    validate_header and the memory estimator see the demo model's numbers; a few hundred KB on disk;
    llama-server cannot run it (no vocabulary, zero weights)."""
    import gguf
    import numpy as np

    spec = SYNTHETIC_HEADERS[name]
    writer = gguf.GGUFWriter(str(path), str(spec["arch"]))
    for key, text in spec["strings"].items():  # type: ignore[attr-defined]
        writer.add_string(key, text)
    for key, number in spec["u32"].items():  # type: ignore[attr-defined]
        writer.add_uint32(key, number)
    for key, real in spec["f32"].items():  # type: ignore[attr-defined]
        writer.add_float32(key, real)
    for key, flag in spec["bool"].items():  # type: ignore[attr-defined]
        writer.add_bool(key, flag)
    data = 0
    for tname, shape, ggml_type in spec["tensors"]:  # type: ignore[attr-defined]
        for i in range(int(spec["blocks"]) if "{i}" in tname else 1):  # type: ignore[call-overload]
            qtype = gguf.GGMLQuantizationType(ggml_type[i % 2] if isinstance(ggml_type, tuple) else ggml_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * type_size
            writer.add_tensor_info(tname.format(i=i), tuple(reversed(shape)), np.dtype(np.float32), nbytes,
                                   raw_dtype=qtype)
            data += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    header_end = writer.fout[0].tell()
    writer.close()
    os.truncate(path, gguf.GGUFWriter.ggml_pad(header_end, writer.data_alignment) + data)
    return path


@pytest.fixture(scope="session")
def synthetic_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic stand-ins for the two demo files, by file name, written once per session."""
    root = tmp_path_factory.mktemp("synthetic-models")
    return {name: write_synthetic_gguf(root / name, name) for name in (DEMO_MODEL_NAME, SECOND_MODEL_NAME)}


@pytest.fixture
def config_dir(request: pytest.FixtureRequest, tmp_path: Path) -> ConfigDir:
    """Shipped config whose models_dir holds (links to) both demo models: the base pipeline uses both.

    In an integration test these are the real demo files (a skip when missing, locally); in a fast-tier
    test they are synthetic GGUF files with the same names (header and tensor shapes only), so the test
    runs on a clean checkout without models.
    """
    models = tmp_path / "models"
    models.mkdir()
    if request.node.get_closest_marker("integration") is not None:
        files = {DEMO_MODEL_NAME: request.getfixturevalue("demo_model"),
                 SECOND_MODEL_NAME: request.getfixturevalue("second_model")}
    else:
        files = request.getfixturevalue("synthetic_models")
    for name, target in files.items():
        (models / name).symlink_to(target)
    return ConfigDir(tmp_path, models)


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The real llama-server. Missing in CI is a failure (setup builds it); locally a skip."""
    from launcher.errors import BinaryNotFound
    from launcher.process.binary import find_llama_server

    try:
        return find_llama_server()
    except BinaryNotFound as exc:
        if os.environ.get("CI"):
            pytest.fail(f"llama-server is required in CI: {exc}")
        pytest.skip(f"llama-server not built: {exc}")


@pytest.fixture
def runtime(config_dir: ConfigDir, llama_server_bin: Path):
    """A Runtime on the shipped config (demo model), its servers stopped at the end."""
    from orchestrator.config.schema import load_config
    from orchestrator.runtime import Runtime

    rt = Runtime(load_config(config_dir.path))
    yield rt
    rt.close()


def real_config_dir(root: Path, demo_model: Path, second_model: Path) -> ConfigDir:
    """`config_dir` for a module- or session-scoped fixture: the shipped config under `root`, its models_dir
    linking the two real demo files."""
    models = root / "models"
    models.mkdir()
    (models / DEMO_MODEL_NAME).symlink_to(demo_model)
    (models / SECOND_MODEL_NAME).symlink_to(second_model)
    return ConfigDir(root, models)


def subprocess_env(config: ConfigDir) -> dict[str, str]:
    """The environment for a chorus process a module- or session-scoped fixture starts: no CHORUS_* of the
    caller (the per-test isolation is not in force yet when such a fixture is made), the config's own
    admission ledger."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    env["CHORUS_ADMISSION_LEDGER"] = str(config.path.parent / "admission.json")
    return env


@pytest.fixture(scope="session")
def shared_runtime(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, second_model: Path,
                   llama_server_bin: Path):
    """One Runtime on the shipped config for the whole session (one per xdist worker): its servers stay warm
    from test to test and module to module. For tests that only run pipelines and read the outcome (not ones
    that count starts from zero, stop, kill or reconfigure servers); a test that reads history gives its
    Runner a SessionStore of its own. Its own admission ledger; servers stopped at the end."""
    from orchestrator.config.schema import load_config
    from orchestrator.runtime import Runtime

    root = tmp_path_factory.mktemp("shared-runtime")
    config = real_config_dir(root, demo_model, second_model)
    with pytest.MonkeyPatch.context() as mp:  # the ledger is fixed when the runtime is made
        for var in ("CHORUS_CONFIG_DIR", "CHORUS_MODELS_DIR", "CHORUS_SESSIONS_DIR", "CHORUS_HOME"):
            mp.delenv(var, raising=False)
        mp.setenv("CHORUS_ADMISSION_LEDGER", str(root / "admission.json"))
        rt = Runtime(load_config(config.path))
    yield rt
    rt.close()


def _warm_server(tmp_path_factory: pytest.TempPathFactory, name: str, model: Path,
                 binary: Path) -> Iterator[ModelServer]:
    from launcher.process.server import ModelServer, ServerSpec

    server = ModelServer(ServerSpec(name, model, n_ctx=512), binary, tmp_path_factory.mktemp(f"warm-{name}")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def warm_demo_server(tmp_path_factory: pytest.TempPathFactory, demo_model: Path,
                     llama_server_bin: Path) -> Iterator[ModelServer]:
    """A llama-server of the demo model (completion mode, n_ctx 512, one slot) for the whole session, for
    tests that only send it requests: not ones that stop, kill or count it, or read its log from the start."""
    yield from _warm_server(tmp_path_factory, "gemma3-270m", demo_model, llama_server_bin)


@pytest.fixture(scope="session")
def warm_chat_server(tmp_path_factory: pytest.TempPathFactory, second_model: Path,
                     llama_server_bin: Path) -> Iterator[ModelServer]:
    """A llama-server of the second demo model (chat template, n_ctx 512, one slot), as `warm_demo_server`."""
    yield from _warm_server(tmp_path_factory, "smollm2-135m", second_model, llama_server_bin)


def small_pipeline(**overrides: object):
    """The shipped base pipeline with short answers, for fast integration tests."""
    from orchestrator.config.overrides import apply_overrides
    from orchestrator.config.schema import load_pipeline

    spec = load_pipeline(REPO / "config" / "pipeline.yaml")
    sets = [f"defaults.{k}={v}" for k, v in {"max_tokens": 12, "n_ctx": 1024, "seed": 7, **overrides}.items()]
    return apply_overrides(spec, sets)


def engine_run(runtime, spec, question: str = "Why is the sky blue?", *, mode: str = "manual",
               allow_sequential=True, observers=(), **kwargs):
    """Run `spec` on the real backend without history: (record, events)."""
    import asyncio

    from orchestrator.engine.local import LocalBackend
    from orchestrator.engine.run import Engine

    events: list = []

    async def go():
        async with LocalBackend(runtime) as backend:
            engine = Engine(backend, observers=[events.append, *observers], allow_sequential=allow_sequential)
            return await engine.run(runtime.plan(spec, mode), question, **kwargs)

    return asyncio.run(go()), events
