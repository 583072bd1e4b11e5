"""scripts/build_llama_server.sh's choices, with a stand-in `cmake` on PATH that records what it was asked.

The script runs from a copy in a temporary root (its bin/ is the root's), on an empty source folder
(LLAMA_CPP_SRC), so nothing is compiled and the checkout's bin/ is never touched.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from tests.conftest import REPO

FAKE_CMAKE = r"""#!/usr/bin/env bash
# configure: record the arguments; build: make the two binaries, reporting the configured build commit
if [[ "$1" == --build ]]; then
  commit="$(grep -o 'LLAMA_BUILD_COMMIT=[^ ]*' "$CMAKE_LOG" | head -n1 | cut -d= -f2)"
  mkdir -p "$2/bin"
  for b in llama-server ggml-rpc-server; do
    printf '#!/bin/sh\necho "version: 0 (%s)"\n' "$commit" > "$2/bin/$b"; chmod +x "$2/bin/$b"
  done
else
  printf '%s\n' "$*" >> "$CMAKE_LOG"
fi
"""


def _build(tmp_path: Path, **env: str) -> tuple[str, str]:
    """Run the script with `env`; return its stdout and what the stand-in cmake was configured with."""
    root, tools, src = tmp_path / "root", tmp_path / "tools", tmp_path / "llama.cpp"
    for d in (root / "scripts", tools, src):
        d.mkdir(parents=True, exist_ok=True)
    script = root / "scripts" / "build_llama_server.sh"
    script.write_text((REPO / "scripts" / "build_llama_server.sh").read_text())
    (tools / "cmake").write_text(FAKE_CMAKE)
    (tools / "cmake").chmod(0o755)
    log = tmp_path / "cmake.log"
    done = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "CMAKE_LOG": str(log),
             "LLAMA_CPP_SRC": str(src), "CHORUS_CACHE_DIR": str(tmp_path / "cache"), **env})
    assert done.returncode == 0, done.stderr
    return done.stdout, log.read_text()


def test_cuda_architectures_reach_cmake_and_get_a_cache_entry_of_their_own(tmp_path: Path) -> None:
    out, configured = _build(tmp_path, CHORUS_CUDA="1", CHORUS_CUDA_ARCHITECTURES="80;90")
    args = shlex.split(configured)
    assert "-DGGML_CUDA=ON" in args
    assert "-DCMAKE_CUDA_ARCHITECTURES=80;90" in args
    tag = next(a.split("=", 1)[1] for a in args if a.startswith("-DLLAMA_BUILD_COMMIT="))
    assert "-cuda-80_90-" in tag
    assert (tmp_path / "cache" / "bin" / tag / "llama-server").is_file()
    assert "Built bin/llama-server" in out


def test_a_plain_cuda_build_keeps_llama_cpps_architecture_list(tmp_path: Path) -> None:
    _, configured = _build(tmp_path, CHORUS_CUDA="1")
    args = shlex.split(configured)
    assert "-DGGML_CUDA=ON" in args
    assert not any(a.startswith("-DCMAKE_CUDA_ARCHITECTURES") for a in args)
    assert any(a.startswith("-DLLAMA_BUILD_COMMIT=") and a.endswith("-cuda-b2") for a in args)


def test_a_cpu_build_ignores_cuda_architectures(tmp_path: Path) -> None:
    _, configured = _build(tmp_path, CHORUS_CUDA="0", CHORUS_CUDA_ARCHITECTURES="90")
    args = shlex.split(configured)
    assert "-DGGML_CUDA=ON" not in args
    assert not any(a.startswith("-DCMAKE_CUDA_ARCHITECTURES") for a in args)
    assert any(a.startswith("-DLLAMA_BUILD_COMMIT=") and a.endswith("-cpu-b2") for a in args)
