"""Issue 24.2: the UI beyond loopback. `chorus ui --host 0.0.0.0` used to start with no warning and no login,
so anyone who reached the port could run every model, while `chorus api` refused without a key.

Now the UI beyond loopback needs `--allow-remote` and a token (a file, $CHORUS_UI_TOKEN or a prompt, never
argv), warns loudly, and ui/app.py runs no page for a browser session until it has given the token.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from tests.clirun import run_main
from tests.conftest import REPO

APP = str(REPO / "ui" / "app.py")
TOKEN = "correct-horse-battery-staple-42"


@pytest.fixture
def config(remote_config: Path) -> Path:
    return remote_config


def chorus_ui(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`chorus ui` refusing its arguments: its main() in this process (tests/clirun.py). Where it starts, the
    test runs it as a process of its own: what `ps` shows is of a real process tree."""
    return run_main("ui", "--config-dir", str(config), *args, env=env)


def flat(text: str) -> str:
    """CLI output with its line wrapping undone."""
    return " ".join(text.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def token_file(tmp_path: Path, text: str = TOKEN) -> Path:
    path = tmp_path / "ui-token"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def env_without_token() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "CHORUS_UI_TOKEN"}


# ---------------------------------------------------------------- the CLI's policy

def test_ui_beyond_loopback_without_allow_remote_is_refused_before_listening(config: Path) -> None:
    port = free_port()
    out = chorus_ui(config, "--host", "0.0.0.0", "--port", str(port), env=env_without_token())
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "the UI would listen on 0.0.0.0 without --allow-remote" in flat(out.stderr)
    assert "--token-file" in flat(out.stderr)  # the hint says how
    assert not listening(port)


def test_ui_beyond_loopback_needs_a_token_even_with_allow_remote(config: Path) -> None:
    out = chorus_ui(config, "--host", "0.0.0.0", "--allow-remote", "--port", str(free_port()), env=env_without_token())
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "without a token" in flat(out.stderr)


def test_ui_token_on_the_command_line_is_refused_with_the_safe_ways(config: Path) -> None:
    out = chorus_ui(config, "--host", "0.0.0.0", "--allow-remote", "--token", TOKEN, "--port", str(free_port()))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--token on the command line is refused" in flat(out.stderr) and "ps -ef" in flat(out.stderr)
    assert "--token-file" in flat(out.stderr) and "$CHORUS_UI_TOKEN" in flat(out.stderr)


def test_a_short_ui_token_is_refused_naming_its_length(config: Path, tmp_path: Path) -> None:
    out = chorus_ui(config, "--host", "0.0.0.0", "--allow-remote", "--token-file", str(token_file(tmp_path, "letmein")),
                    "--port", str(free_port()))
    assert out.returncode == 2 and "has 7 characters; at least 12" in flat(out.stderr)


def test_ui_beyond_loopback_warns_loudly_and_gives_the_token_to_streamlit_outside_argv(config: Path,
                                                                                       tmp_path: Path) -> None:
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "cli", "ui", "--config-dir", str(config), "--host",
                           "0.0.0.0", "--allow-remote", "--token-file", str(token_file(tmp_path)), "--port", str(port)],
                          cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, start_new_session=True, env=env_without_token())
    try:
        deadline = time.monotonic() + 90
        while not listening(port) and ui.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert listening(port), f"chorus ui did not listen (exit {ui.poll()})"
        (streamlit,) = [p for p in psutil.Process(ui.pid).children() if "streamlit" in " ".join(p.cmdline())]
        assert TOKEN not in " ".join(streamlit.cmdline())
        assert streamlit.environ().get("CHORUS_UI_TOKEN") == TOKEN
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.pid, signal.SIGTERM)
        _, err = ui.communicate(timeout=30)
    assert "WARNING: the chorus UI listens on 0.0.0.0, beyond this machine" in err
    assert "sign-in token required" in err and TOKEN not in err


# ---------------------------------------------------------------- the sign-in gate (ui/app.py)

@pytest.fixture
def ui_env(config: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(config))
    monkeypatch.setenv("CHORUS_UI_TOKEN", TOKEN)
    yield
    from ui.common import _chorus

    _chorus.clear()


def gated(at: AppTest) -> bool:
    """The sign-in form and nothing of a page but its static heading: no widget, table or data of the app."""
    return (not at.exception and "chorus: sign in" in [t.value for t in at.title]
            and [t.key for t in at.text_input] == ["sign-in-token"] and len(at.button) == 1
            and not (at.radio or at.selectbox or at.dataframe or at.text_area or at.table or at.json))


def sign_in(at: AppTest, token: str) -> AppTest:
    at.text_input(key="sign-in-token").input(token)
    at.button[0].click().run()
    return at


PAGES = sorted(p.name for p in (REPO / "ui" / "views").glob("*.py") if p.name != "__init__.py")


def test_with_a_token_the_app_shows_only_the_sign_in_form(ui_env: None) -> None:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert gated(at)


@pytest.mark.parametrize("page", PAGES)
def test_with_a_token_no_page_runs_before_sign_in_even_asked_for_by_name(ui_env: None, page: str) -> None:
    """A page file run straight, without app.py (Streamlit did so for ui/pages/ before any st.navigation call)."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.switch_page(f"views/{page}")
    at.run()
    assert gated(at), f"{page} ran without the token"


def test_a_wrong_token_is_refused_after_a_delay_and_keeps_the_gate_shut(ui_env: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ui import auth

    slept: list[float] = []  # the guesser's wait, noted instead of waited out here
    monkeypatch.setattr(auth, "time", SimpleNamespace(sleep=slept.append))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    sign_in(at, TOKEN[:-1])
    assert slept == [auth.WRONG_TOKEN_DELAY_S] and auth.WRONG_TOKEN_DELAY_S >= 1.0
    assert [e.value for e in at.error] == ["Wrong token."]
    assert gated(at)


def test_the_right_token_opens_every_page_for_that_session(ui_env: None) -> None:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    sign_in(at, TOKEN)
    assert not at.exception and at.radio, "the Run page did not render after sign-in"
    at.switch_page("views/history.py")
    at.run()
    assert [t.value for t in at.title] == ["History"]


def test_streamlit_started_by_hand_beyond_loopback_without_a_token_shows_nothing(config: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(config))
    monkeypatch.delenv("CHORUS_UI_TOKEN", raising=False)
    before = st_config.get_option("server.address")
    st_config.set_option("server.address", "0.0.0.0")
    try:
        at = AppTest.from_file(APP, default_timeout=60)
        at.run()
    finally:
        st_config.set_option("server.address", before)
    assert not at.exception and not at.radio and not at.text_input
    assert any("listens on 0.0.0.0 without a token" in e.value for e in at.error)
