"""Runtime: the shared objects of one chorus process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.config.schema import load_config
from orchestrator.runtime import Runtime
from tests.conftest import ConfigDir


def test_lazy_parts_are_built_once_when_threads_ask_together(config_dir: ConfigDir, llama_server_bin: Path) -> None:
    rt = Runtime(load_config(config_dir.path))
    try:
        with ThreadPoolExecutor(8) as ex:
            pools = list(ex.map(lambda _: rt.pool, range(32)))
            guards = list(ex.map(lambda _: rt.memory_guard, range(32)))
        assert len({id(p) for p in pools}) == 1 and len({id(g) for g in guards}) == 1
        assert rt.has_pool
    finally:
        rt.close()


def test_closing_a_runtime_that_never_started_a_server_is_a_no_op(config_dir: ConfigDir) -> None:
    rt = Runtime(load_config(config_dir.path))
    rt.close()
    assert not rt.has_pool
