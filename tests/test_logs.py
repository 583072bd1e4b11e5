"""Logs that do not pile up: one rotating, owner-only application log; llama-server logs pruned per model."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from cli.main import main
from launcher.process.server import ModelServer, ServerOptions, ServerSpec, prune_server_logs
from orchestrator.logs import APP_LOG_NAME, setup_app_log, setup_app_log_for
from tests.conftest import ConfigDir


@pytest.fixture(autouse=True)
def _no_app_log_left_behind():
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "chorus_app_log", False)]:
        root.removeHandler(handler)
        handler.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- the application log


def test_app_log_is_owner_only_and_rotates_keeping_a_fixed_number_of_files(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    path = setup_app_log(logs, max_bytes=2000, backups=2)
    assert path == logs / APP_LOG_NAME
    for i in range(200):
        logging.getLogger("chorus.test").info("line %d of a run that goes on and on", i)
    files = sorted(p.name for p in logs.iterdir())
    assert files == ["chorus.log", "chorus.log.1", "chorus.log.2"]
    assert all(mode(logs / f) == 0o600 for f in files) and mode(logs) == 0o700
    assert all((logs / f).stat().st_size <= 2000 for f in files)
    assert "line 199 of a run" in path.read_text()


def test_an_existing_world_readable_app_log_is_made_owner_only(tmp_path: Path) -> None:
    (tmp_path / APP_LOG_NAME).write_text("old\n")
    os.chmod(tmp_path / APP_LOG_NAME, 0o644)
    setup_app_log(tmp_path)
    logging.getLogger("chorus.test").warning("new")
    assert mode(tmp_path / APP_LOG_NAME) == 0o600 and "new" in (tmp_path / APP_LOG_NAME).read_text()


def test_setting_it_up_twice_writes_each_line_once(tmp_path: Path) -> None:
    setup_app_log(tmp_path)
    setup_app_log(tmp_path)
    logging.getLogger("chorus.test").info("only once")
    assert (tmp_path / APP_LOG_NAME).read_text().count("only once") == 1


def test_the_cli_logs_each_command_into_the_config_logs_dir(config_dir: ConfigDir,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--config-dir", str(config_dir.path)]) == 0
    text = (config_dir.path.parent / "logs" / APP_LOG_NAME).read_text()
    assert "chorus models started" in text
    assert "chorus models started" not in capsys.readouterr().err  # INFO goes to the file, not to stderr


def test_a_broken_app_yaml_costs_only_the_app_log(config_dir: ConfigDir) -> None:
    (config_dir.path / "app.yaml").write_text("models_dir: [unclosed\n")
    assert setup_app_log_for(config_dir.path, "check") is None  # the command itself reports the config error


# ---------------------------------------------------------------- llama-server logs


def old_logs(logs: Path, model: str, ports: range) -> list[Path]:
    """Log files with mtimes one minute apart, oldest first."""
    paths = []
    now = time.time()
    for i, port in enumerate(ports):
        path = logs / f"{model}-{port}.log"
        path.write_text(f"log of port {port}\n")
        os.utime(path, (now - 600 + 60 * i, now - 600 + 60 * i))
        paths.append(path)
    return paths


def test_only_the_newest_logs_of_a_model_are_kept(tmp_path: Path) -> None:
    mine = old_logs(tmp_path, "m", range(61001, 61009))
    other = old_logs(tmp_path, "m-2", range(61001, 61004))  # "m-2-61001.log" is not a log of "m"
    (tmp_path / "chorus.log").write_text("app\n")
    removed = prune_server_logs(tmp_path, "m", keep=3)
    assert sorted(removed) == sorted(mine[:5])
    assert all(p.exists() for p in mine[5:] + other) and (tmp_path / "chorus.log").exists()


def test_the_log_of_a_server_still_running_is_never_removed(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        live_port = listener.getsockname()[1]
        (live,) = old_logs(tmp_path, "m", range(live_port, live_port + 1))
        os.utime(live, (1, 1))  # the oldest of all
        newer = old_logs(tmp_path, "m", range(61001, 61004))
        prune_server_logs(tmp_path, "m", keep=2)
        assert live.exists() and newer[-1].exists()  # it counts among the two kept
        assert not newer[0].exists() and not newer[1].exists()


def test_kept_logs_are_cut_to_their_tail_and_keep_their_place(tmp_path: Path) -> None:
    (path,) = old_logs(tmp_path, "m", range(61001, 61002))
    path.write_text("".join(f"line {i}\n" for i in range(2000)))
    os.utime(path, (1000, 1000))
    prune_server_logs(tmp_path, "m", keep=5, cap_bytes=1024)
    text = path.read_text()
    assert text.startswith("[chorus: the first ") and text.endswith("line 1999\n")
    assert len(text.encode()) < 1024 + 80 and text.splitlines()[1].startswith("line ")  # whole lines only
    assert path.stat().st_mtime == 1000 and mode(path) == 0o600


@pytest.mark.integration
def test_a_server_start_prunes_its_model_logs_but_not_a_running_servers(llama_server_bin: Path, demo_model: Path,
                                                                       tmp_path: Path) -> None:
    old = old_logs(tmp_path, "m", range(61001, 61007))
    first = ModelServer(ServerSpec("m", demo_model, n_ctx=512), llama_server_bin, tmp_path).start()
    try:
        assert first.log_path is not None
        kept = sorted(p.name for p in tmp_path.glob("m-*.log"))
        assert len(kept) == 5 and first.log_path.name in kept  # four old ones + its own
        second = ModelServer(ServerSpec("m", demo_model, n_ctx=768), llama_server_bin, tmp_path,
                             ServerOptions(log_keep=1)).start()
        try:
            assert {p.name for p in tmp_path.glob("m-*.log")} == {first.log_path.name, second.log_path.name}
            assert not any(p.exists() for p in old)
        finally:
            second.stop()
    finally:
        first.stop()
