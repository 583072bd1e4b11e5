#!/usr/bin/env bash
# Build the pinned upstream llama-server into bin/llama-server.
#
# Source: the vendor/llama.cpp tree of the llama-cpp-python sdist on PyPI (no git
# access needed), checked against a pinned sha256. LLAMA_CPP_SRC=/path builds a
# user's own llama.cpp checkout instead. The finished binary is cached by pin and
# variant under ${CHORUS_CACHE_DIR:-~/.cache/chorus} so a second clone on the same
# machine reuses it; a fresh machine builds it (about 9 minutes on 2 cores).
#
# Env: CHORUS_CUDA=1 forces a CUDA build (auto when nvcc is on PATH);
#      CHORUS_CUDA_ARCHITECTURES=90 (or native, or "80;90") builds the CUDA kernels for those GPUs only:
#        llama.cpp's default list compiles every kernel for each architecture on it;
#      CHORUS_BUILD_JOBS=N parallel jobs (default: nproc).
set -euo pipefail

PIN_PACKAGE="llama-cpp-python"
PIN_VERSION="0.3.36"
PIN_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CHORUS_CACHE_DIR:-$HOME/.cache/chorus}"
OUT_DIR="$ROOT/bin"
OUT="$OUT_DIR/llama-server"
JOBS="${CHORUS_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
PYTHON="${PYTHON:-python3}"

variant=cpu
if [[ "${CHORUS_CUDA:-}" == "1" ]] || { [[ "${CHORUS_CUDA:-}" != "0" ]] && command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1; }; then
  variant=cuda
  if [[ -n "${CHORUS_CUDA_ARCHITECTURES:-}" ]]; then
    variant="cuda-$(printf '%s' "$CHORUS_CUDA_ARCHITECTURES" | tr -c 'A-Za-z0-9' '_')"  # its own cache entry
  fi
fi

if [[ -n "${LLAMA_CPP_SRC:-}" ]]; then
  src="$(cd "$LLAMA_CPP_SRC" && pwd)"
  tag="custom-$(printf '%s' "$src" | sha256sum | cut -c1-12)"
else
  src=""
  tag="lcp${PIN_VERSION}"
fi
# The tag is embedded as the build "commit", so `llama-server --version` shows the pin.
# -b2: AMX off, rpc-server built too (bump it whenever the build flags change, so caches rebuild)
version_tag="chorus-${tag}-${variant}-b2"

current_version() {
  [[ -x "$1" ]] && "$1" --version 2>&1 | grep -o "chorus-[A-Za-z0-9._-]*" | head -n1 || true
}

if [[ "$(current_version "$OUT")" == "$version_tag" ]]; then
  echo "bin/llama-server is already $version_tag: nothing to do."
  exit 0
fi

cached="$CACHE/bin/$version_tag/llama-server"
if [[ "$(current_version "$cached")" == "$version_tag" ]]; then
  mkdir -p "$OUT_DIR"
  cp -f "$cached" "$OUT.tmp" && mv -f "$OUT.tmp" "$OUT"
  if [[ -x "$(dirname "$cached")/rpc-server" ]]; then
    cp -f "$(dirname "$cached")/rpc-server" "$OUT_DIR/rpc-server.tmp" && mv -f "$OUT_DIR/rpc-server.tmp" "$OUT_DIR/rpc-server"
  fi
  echo "bin/llama-server restored from cache ($cached)."
  exit 0
fi

if [[ -z "$src" ]]; then
  mkdir -p "$CACHE/src"
  tarball="$CACHE/src/llama_cpp_python-${PIN_VERSION}.tar.gz"
  if [[ ! -f "$tarball" ]]; then
    echo "Downloading ${PIN_PACKAGE}==${PIN_VERSION} source from the package registry..."
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps --no-build-isolation \
      "${PIN_PACKAGE}==${PIN_VERSION}" -d "$CACHE/src" 2>/dev/null \
    || "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps "${PIN_PACKAGE}==${PIN_VERSION}" -d "$CACHE/src"
  fi
  got="$(sha256sum "$tarball" | cut -d' ' -f1)"
  if [[ "$got" != "$PIN_SHA256" ]]; then
    echo "error: $tarball has sha256 $got, expected $PIN_SHA256. Delete it and run again." >&2
    exit 1
  fi
  unpacked="$CACHE/src/llama_cpp_python-${PIN_VERSION}"
  if [[ ! -f "$unpacked/vendor/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$unpacked"
    tar -xzf "$tarball" -C "$CACHE/src"
  fi
  src="$unpacked/vendor/llama.cpp"
fi

build="$CACHE/build/$version_tag"
cmake_args=(
  -S "$src" -B "$build"
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_NUMBER=0
  "-DLLAMA_BUILD_COMMIT=$version_tag"
  -DGGML_RPC=ON
)
# -march=native turns on AMX where the CPU has it, but a container or VM may not grant the AMX tile
# state (arch_prctl XCOMP_PERM): the server then dies with a general protection fault at its first
# ldtilecfg. AVX-512 and the rest of the native ISA stay on.
if [[ "$(uname -m)" == x86_64 ]]; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake_args+=("-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
               -DGGML_AMX_BF16=OFF)
fi
if [[ "$variant" == cuda* ]]; then
  cmake_args+=(-DGGML_CUDA=ON)
  if [[ -n "${CHORUS_CUDA_ARCHITECTURES:-}" ]]; then
    cmake_args+=("-DCMAKE_CUDA_ARCHITECTURES=$CHORUS_CUDA_ARCHITECTURES")
  fi
fi

echo "Building llama-server ($version_tag) from $src with $JOBS jobs; about 9 minutes on 2 cores..."
start=$(date +%s)
mkdir -p "$CACHE"  # LLAMA_CPP_SRC skips the download, which made it
cmake "${cmake_args[@]}" >"$CACHE/build-$version_tag.log" 2>&1 || { tail -n 30 "$CACHE/build-$version_tag.log" >&2; exit 1; }
cmake --build "$build" --target llama-server ggml-rpc-server -j "$JOBS" >>"$CACHE/build-$version_tag.log" 2>&1 \
  || { tail -n 30 "$CACHE/build-$version_tag.log" >&2; exit 1; }
elapsed=$(( $(date +%s) - start ))

mkdir -p "$(dirname "$cached")" "$OUT_DIR"
cp -f "$build/bin/llama-server" "$cached.tmp" && mv -f "$cached.tmp" "$cached"
cp -f "$build/bin/ggml-rpc-server" "$(dirname "$cached")/rpc-server.tmp" \
  && mv -f "$(dirname "$cached")/rpc-server.tmp" "$(dirname "$cached")/rpc-server"
cp -f "$cached" "$OUT.tmp" && mv -f "$OUT.tmp" "$OUT"
cp -f "$(dirname "$cached")/rpc-server" "$OUT_DIR/rpc-server.tmp" && mv -f "$OUT_DIR/rpc-server.tmp" "$OUT_DIR/rpc-server"
echo "Built bin/llama-server ($version_tag) in ${elapsed}s."
"$OUT" --version 2>&1 | head -n 2
