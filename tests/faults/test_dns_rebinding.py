"""Issue 24.3: DNS rebinding. The keyless API on loopback answered `Host: attacker.example` with 200 on /v1/models
and /v1/chat/completions: a web page the user visits points its own name at 127.0.0.1 and runs pipelines.

Now an API bound to loopback answers only loopback names (localhost, 127.0.0.1, [::1], any port) and the names
in app.yaml's `api.allowed_hosts` or `--allowed-host`; any other gets 403 with an OpenAI-style error body.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from orchestrator.app import Chorus
from orchestrator.config.schema import load_config
from orchestrator.engine.fake import FakeBackend
from orchestrator.errors import ConfigError
from tests import yamlfile
from tests.apiwait import wait_healthy
from tests.clirun import run_main
from tests.conftest import REPO

ATTACKER = "attacker.example"
CHAT = {"model": "chorus/base", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}


@pytest.fixture
def config(remote_config: Path) -> Path:
    return remote_config


def set_allowed_hosts(config: Path, hosts: Any) -> None:
    app = yamlfile.load((config / "app.yaml").read_text())
    app["api"] = {"allowed_hosts": hosts}
    (config / "app.yaml").write_text(yamlfile.dump(app))


@pytest.fixture
def client(config: Path) -> Iterator[TestClient]:
    yield make_client(config)


def make_client(config: Path, **settings: Any) -> TestClient:
    app = create_app(Chorus(load_config(config)), ApiSettings(**settings), backend_factory=FakeBackend)
    return TestClient(app, base_url="http://127.0.0.1:8642")


def sessions(config: Path) -> list[Path]:
    root = config.parent / "sessions"
    return sorted(root.glob("session_*")) if root.is_dir() else []


def test_keyless_loopback_api_refuses_a_foreign_host_with_403_and_runs_nothing(client: TestClient,
                                                                              config: Path) -> None:
    with client:
        models = client.get("/v1/models", headers={"Host": f"{ATTACKER}:8642"})
        chat = client.post("/v1/chat/completions", json=CHAT, headers={"Host": ATTACKER})
        health = client.get("/health", headers={"Host": ATTACKER})
    assert (models.status_code, chat.status_code, health.status_code) == (403, 403, 403)
    error = chat.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "host_not_allowed"
    assert ATTACKER in error["message"] and "127.0.0.1" in error["message"]
    assert "allowed_hosts" in error["hint"]
    assert sessions(config) == [], "a pipeline ran for a foreign Host"


@pytest.mark.parametrize("host", ["localhost", "localhost:8642", "LOCALHOST:1", "localhost.", "127.0.0.1",
                                  "127.0.0.1:8642", "127.1.2.3:80", "[::1]", "[::1]:8642"])
def test_loopback_names_with_any_port_are_answered(client: TestClient, host: str) -> None:
    with client:
        r = client.get("/v1/models", headers={"Host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["localhost.attacker.example", "127.0.0.1.nip.io", "attacker.example:8642",
                                  "localhost@attacker.example", "localhost:8642@attacker.example",
                                  "localhost:http", "[::1", "::1", "[::1]x", "0.0.0.0", "192.168.1.10",
                                  "", "x" * 400])
def test_names_that_only_look_local_are_refused(client: TestClient, host: str) -> None:
    with client:
        r = client.get("/v1/models", headers={"Host": host})
    assert r.status_code == 403, (host, r.text)
    assert r.json()["error"]["code"] == "host_not_allowed"


def test_app_yaml_allowed_hosts_adds_names_and_star_allows_any(config: Path) -> None:
    set_allowed_hosts(config, ["chorus.lan", "10.0.0.5"])
    with make_client(config) as client:
        lan = client.get("/v1/models", headers={"Host": "Chorus.LAN:8642"})
        ip = client.get("/v1/models", headers={"Host": "10.0.0.5"})
        local = client.get("/v1/models", headers={"Host": "localhost:8642"})
        other = client.get("/v1/models", headers={"Host": ATTACKER})
    assert (lan.status_code, ip.status_code, local.status_code, other.status_code) == (200, 200, 200, 403)
    assert "chorus.lan" in other.json()["error"]["message"]
    set_allowed_hosts(config, ["*"])
    with make_client(config) as client:
        assert client.get("/v1/models", headers={"Host": ATTACKER}).status_code == 200


def test_settings_allowed_hosts_win_over_app_yaml(config: Path) -> None:
    set_allowed_hosts(config, ["chorus.lan"])
    with make_client(config, allowed_hosts=("other.lan",)) as client:
        assert client.get("/v1/models", headers={"Host": "other.lan"}).status_code == 200
        assert client.get("/v1/models", headers={"Host": "chorus.lan"}).status_code == 403


def test_beyond_loopback_with_a_key_any_name_is_answered(config: Path) -> None:
    """Off loopback a key is required, which a rebinding page does not have; clients use the machine's name."""
    with make_client(config, host="0.0.0.0", api_key="s3cret-s3cret") as client:
        r = client.get("/v1/models", headers={"Host": "workstation.lan:8642", "Authorization": "Bearer s3cret-s3cret"})
    assert r.status_code == 200


@pytest.mark.parametrize("entry", ["http://chorus.lan/", "chorus.lan:8642", "", "bad_name!", 7])
def test_a_bad_allowed_hosts_entry_is_a_config_error_naming_the_field(config: Path, entry: Any) -> None:
    set_allowed_hosts(config, [entry])
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "api.allowed_hosts" in str(caught.value)


# ---------------------------------------------------------------- the real `chorus api`

def flat(text: str) -> str:
    """CLI output with its line wrapping undone."""
    return " ".join(text.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(config: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--config-dir", str(config), "--port",
                             str(port), *extra], cwd=REPO, env=env, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if wait_healthy(proc, url):
        return proc, url
    stop(proc)
    pytest.fail(f"chorus api did not start (exit {proc.poll()})")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_real_chorus_api_refuses_a_rebound_host_and_honours_allowed_host(config: Path) -> None:
    proc, url = start_api(config, "--allowed-host", "chorus.lan")
    try:
        foreign = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Host": ATTACKER}, timeout=30)
        listed = httpx.get(f"{url}/v1/models", headers={"Host": "chorus.lan:1234"}, timeout=30)
        plain = httpx.get(f"{url}/v1/models", timeout=30)
    finally:
        stop(proc)
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "host_not_allowed"
    assert listed.status_code == 200 and plain.status_code == 200
    assert sessions(config) == []


def test_a_bad_allowed_host_flag_is_one_error_naming_the_flag(config: Path) -> None:
    out = run_main("api", "--config-dir", str(config), "--allowed-host", "http://chorus.lan/")  # in this process
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--allowed-host" in flat(out.stderr) and "not a URL" in flat(out.stderr)
