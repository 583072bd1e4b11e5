"""Issue 24, item 10d: `999.1.1.1` was accepted as an RPC worker's address.

The pattern allowed any run of letters, digits, dots and dashes, so an impossible address only failed
later, when llama-server could not connect. Now a worker is an IPv4 address, a bracketed IPv6 address or
an RFC 1123 host name, and models.yaml says which entry, on which line, is neither.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.process.rpc import parse_endpoint
from orchestrator.config.schema import load_models_file
from orchestrator.errors import ConfigError
from tests import yamlfile

BAD = {
    "999.1.1.1:50052": "999.1.1.1 is not an IPv4 address",
    "1.2.3:50052": "1.2.3 is not an IPv4 address",
    "10.0.0.1.5:50052": "10.0.0.1.5 is not an IPv4 address",
    "-gpu:50052": "'-gpu' is not a host name",
    "gpu..lan:50052": "'gpu..lan' is not a host name",
    f"{'a' * 64}.lan:50052": "is not a host name",
    "box.123:50052": "'box.123' is neither an IPv4 address nor a host name",
}
GOOD = {"192.168.1.20:50052": ("192.168.1.20", 50052), "[::1]:50052": ("::1", 50052),
        "gpu-box.lan:50052": ("gpu-box.lan", 50052), "localhost:1": ("localhost", 1)}


def _models_yaml(tmp_path: Path, worker: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yamlfile.dump({"models": {"split": {"file": "big.gguf", "rpc": ["127.0.0.1:50052", worker]}}},
                                   sort_keys=False))
    return path


@pytest.mark.parametrize(("worker", "problem"), BAD.items(), ids=BAD.keys())
def test_an_impossible_worker_address_is_a_config_error_naming_the_entry(tmp_path: Path, worker: str,
                                                                         problem: str) -> None:
    path = _models_yaml(tmp_path, worker)
    with pytest.raises(ConfigError) as err:
        load_models_file(path)
    assert err.value.file == str(path) and err.value.field == "models.split.rpc[1]" and err.value.line
    assert problem in err.value.detail and worker in err.value.detail


@pytest.mark.parametrize(("worker", "parsed"), GOOD.items(), ids=GOOD.keys())
def test_addresses_and_host_names_are_accepted(tmp_path: Path, worker: str, parsed: tuple[str, int]) -> None:
    assert parse_endpoint(worker) == parsed
    assert load_models_file(_models_yaml(tmp_path, worker))["split"].rpc[1] == worker
