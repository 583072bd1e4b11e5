"""Issue 24, item 10e: `/v1/models` showed each pipeline's absolute file path to every client.

A client learns which pipelines there are, not how this machine's folders are laid out: the listing,
one model's entry and the 404 for a pipeline file that does not load name the file only.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from orchestrator.app import Chorus
from orchestrator.config.schema import load_config
from tests import yamlfile


def _client(tmp_path: Path) -> TestClient:
    root = tmp_path / "deep" / "private" / "config"
    (root / "pipelines").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (root / "app.yaml").write_text(yamlfile.dump({"models_dir": str(tmp_path / "models"),
                                                   "sessions_dir": str(tmp_path / "sessions"),
                                                   "logs_dir": str(tmp_path / "logs")}))
    (root / "models.yaml").write_text(yamlfile.dump({"models": {"far": {"url": "http://upstream.test/v1"}}}))
    (root / "pipeline.yaml").write_text(yamlfile.dump({"name": "base", "stages": [{"name": "s",
                                                                                     "models": ["far"]}]}))
    (root / "pipelines" / "solo.yaml").write_text(yamlfile.dump({"stages": [{"name": "x", "models": ["far"]}]}))
    (root / "pipelines" / "broken.yaml").write_text("stages: [ {name: x, models: [far], nonsense: 1} ]\n")
    return TestClient(create_app(Chorus(load_config(root)), ApiSettings()), base_url="http://127.0.0.1")


def test_models_and_model_entries_name_pipeline_files_without_their_folders(tmp_path: Path) -> None:
    with _client(tmp_path) as client:
        listing = client.get("/v1/models")
        one = client.get("/v1/models/chorus/solo")
        broken = client.post("/v1/chat/completions",
                             json={"model": "chorus/broken", "messages": [{"role": "user", "content": "hi"}]})
    files = {m["id"]: m["chorus"].get("file") for m in listing.json()["data"]}
    assert files["chorus/base"] == "pipeline.yaml" and files["chorus/solo"] == "solo.yaml"
    assert one.json()["chorus"]["file"] == "solo.yaml"
    assert broken.status_code == 404 and "broken.yaml" in broken.json()["error"]["message"]
    for response in (listing, one, broken):
        assert str(tmp_path) not in json.dumps(response.json()), response.json()
