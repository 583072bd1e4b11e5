"""Fault 24.1: the Documents page read any file the chorus user can read.

Before: a visitor typed a server folder (one holding `PASSWORD=...` in a .txt), clicked Index, searched,
and the secret was on the page. Now the page takes no server path of its own: it offers the folders
app.yaml `docs.allowed_roots` lists (none by default), a path inside one (checked after resolving symlinks
and '..'), and files uploaded through the browser, saved under `<sessions_dir>/uploads/<collection>/`.
The logic is orchestrator/rag/sources.py; the CLI, run by the operator, still indexes any path.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from orchestrator.config.schema import load_config
from orchestrator.errors import ConfigError
from orchestrator.rag.sources import (
    PathNotAllowed,
    UploadRefused,
    add_from_page,
    allowed_path,
    save_upload,
    uploads_dir,
)
from orchestrator.rag.store import DocStore
from tests.conftest import REPO, ConfigDir
from tests.faults.conftest import chorus

SECRET = "PASSWORD=hunter2"


@pytest.fixture
def cfg(tmp_path: Path) -> ConfigDir:
    models = tmp_path / "models"
    models.mkdir()
    return ConfigDir(tmp_path, models)


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed folder (with a link out of it) and a secrets folder beside it."""
    allowed = tmp_path / "handbook"
    (allowed / "ops").mkdir(parents=True)
    (allowed / "ops" / "backup.md").write_text("# Backups\n\nBackups run nightly and are kept 30 days.\n")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "env.txt").write_text(f"{SECRET}\n")
    (allowed / "shortcut").symlink_to(secrets)
    return allowed, secrets


def page(cfg: ConfigDir, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("CHORUS_CONFIG_DIR", str(cfg.path))
    at = AppTest.from_file(str(REPO / "ui" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("views/documents.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# ---------------------------------------------------------------- the allow-list (orchestrator/rag/sources.py)


@pytest.mark.parametrize("relative", ["../secrets", "/etc", "shortcut", "shortcut/env.txt", "ops/../../secrets"])
def test_a_path_that_leads_out_of_the_allowed_folder_is_refused(places: tuple[Path, Path], relative: str) -> None:
    allowed, _ = places
    with pytest.raises(PathNotAllowed, match="outside") as caught:
        allowed_path(allowed, relative, [allowed])
    assert str(allowed) in caught.value.hint and "docs.allowed_roots" in caught.value.hint


def test_a_path_inside_the_allowed_folder_is_given_back_resolved(places: tuple[Path, Path]) -> None:
    allowed, _ = places
    assert allowed_path(allowed, "", [allowed]) == allowed.resolve()
    assert allowed_path(allowed, "ops/./backup.md", [allowed]) == (allowed / "ops" / "backup.md").resolve()
    with pytest.raises(PathNotAllowed, match="not found"):
        allowed_path(allowed, "ops/nothing.md", [allowed])


def test_a_folder_not_on_the_list_is_refused_and_none_is_allowed_by_default(places: tuple[Path, Path]) -> None:
    allowed, secrets = places
    with pytest.raises(PathNotAllowed, match="not one of the folders") as caught:
        allowed_path(secrets, "", [allowed])
    assert caught.value.allowed == [str(allowed)]
    with pytest.raises(PathNotAllowed) as none:
        allowed_path(allowed, "", [])
    assert "docs.allowed_roots is empty" in none.value.hint and "chorus docs add" in none.value.hint


def test_add_from_page_checks_the_folder_before_writing_anything(cfg: ConfigDir, places: tuple[Path, Path]) -> None:
    allowed, _ = places
    store = DocStore.beside(cfg.sessions_dir)
    with pytest.raises(PathNotAllowed):
        add_from_page(store, "kb", sessions_dir=cfg.sessions_dir, allowed=[allowed], max_file_bytes=1 << 20,
                      uploads=[("notes.md", b"# Notes\n")], root=allowed, relative="../secrets")
    assert not uploads_dir(cfg.sessions_dir, "kb").exists() and not store.path.exists()


@pytest.mark.parametrize(("name", "why"), [("evil.exe", "unsupported type"), (".bashrc.txt", "not a plain file name"),
                                           ("", "not a plain file name"), ("a\x00.txt", "not a plain file name")])
def test_an_upload_with_a_bad_name_is_refused(cfg: ConfigDir, name: str, why: str) -> None:
    with pytest.raises(UploadRefused, match=why):
        save_upload(cfg.sessions_dir, "kb", name, b"text", 1 << 20)


def test_an_upload_is_saved_by_its_last_name_owner_only_and_capped(cfg: ConfigDir) -> None:
    path = save_upload(cfg.sessions_dir, "kb", "../../../etc/cron.d/notes.txt", b"hello", 1 << 20)
    assert path == uploads_dir(cfg.sessions_dir, "kb") / "notes.txt" and path.read_bytes() == b"hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(UploadRefused, match=r"over the 1\.0 MiB limit"):
        save_upload(cfg.sessions_dir, "kb", "big.txt", b"x" * (2 << 20), 1 << 20)


# ---------------------------------------------------------------- config


def test_allowed_roots_are_relative_to_the_config_folder_and_empty_by_default(cfg: ConfigDir) -> None:
    assert load_config(cfg.path).app.docs.allowed_roots == []
    cfg.write_app(docs={"allowed_roots": ["../handbook", "/srv/docs"]})
    roots = load_config(cfg.path).app.docs.allowed_roots
    assert roots == [(cfg.path / ".." / "handbook").resolve(), Path("/srv/docs")]


@pytest.mark.parametrize("value", ["/srv/docs", [["a"]], ["a\x00b"]])
def test_a_bad_allowed_roots_value_names_the_field(cfg: ConfigDir, value: object) -> None:
    cfg.write_app(docs={"allowed_roots": value})
    with pytest.raises(ConfigError, match="allowed_roots"):
        load_config(cfg.path)


# ---------------------------------------------------------------- the page and the CLI


def test_the_page_takes_no_server_path_without_an_allowed_folder(cfg: ConfigDir,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(cfg, monkeypatch)
    assert [t.key for t in at.text_input] == ["docs-add-name"]  # no path box: only the collection's name
    assert not any(s.key == "docs-add-root" for s in at.selectbox)
    assert any("allowed\\_roots is empty" in c.value for c in at.caption)


def test_an_uploaded_file_is_indexed_and_searchable(cfg: ConfigDir, monkeypatch: pytest.MonkeyPatch) -> None:
    at = page(cfg, monkeypatch)
    at.text_input(key="docs-add-name").set_value("kb")
    at.file_uploader(key="docs-add-files").set_value(("guide.md", b"# Install\n\nThe daemon listens on 8125.\n",
                                                      "text/markdown"))
    at.button(key="docs-add-submit").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert (uploads_dir(cfg.sessions_dir, "kb") / "guide.md").is_file()
    at.text_input(key="docs-search-query").set_value("daemon").run()
    assert any("daemon listens on 8125" in t.value for t in at.text)

    at.button(key="docs-rm").click().run()  # removing the collection deletes the uploaded copies
    assert not uploads_dir(cfg.sessions_dir, "kb").exists()


def test_the_page_indexes_an_allowed_folder_but_not_a_way_out_of_it(cfg: ConfigDir, monkeypatch: pytest.MonkeyPatch,
                                                                     places: tuple[Path, Path]) -> None:
    allowed, _ = places
    cfg.write_app(docs={"allowed_roots": [str(allowed)]})
    at = page(cfg, monkeypatch)
    assert at.selectbox(key="docs-add-root").options == ["none", str(allowed)]
    at.text_input(key="docs-add-name").set_value("kb")
    at.selectbox(key="docs-add-root").set_value(str(allowed))
    at.text_input(key="docs-add-sub").set_value("../secrets")
    at.button(key="docs-add-submit").click().run()
    assert not at.exception
    assert any("outside" in e.value for e in at.error)
    assert DocStore.beside(cfg.sessions_dir).collections() == []  # nothing indexed

    at.text_input(key="docs-add-sub").set_value("")
    at.button(key="docs-add-submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    store = DocStore.beside(cfg.sessions_dir)
    assert [Path(f["path"]).name for f in store.files("kb")] == ["backup.md"]  # the link out is not walked
    at.text_input(key="docs-search-query").set_value("hunter2 PASSWORD").run()
    assert not any(SECRET in t.value for t in at.text)
    assert any("No passage matches" in i.value for i in at.info)


def test_the_operator_cli_still_indexes_any_folder(cfg: ConfigDir, places: tuple[Path, Path]) -> None:
    _, secrets = places  # not in docs.allowed_roots: the allow-list binds the UI, not the operator's shell
    out = chorus(cfg, "docs", "add", "ops-secrets", str(secrets), "--no-embed", timeout=60)
    assert out.returncode == 0 and "1 added" in out.stdout, out.stderr
