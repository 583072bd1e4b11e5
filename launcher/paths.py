"""Where chorus keeps its own files outside a config folder: the chorus home, the data home, the cache.

These live in the lowest layer because the launcher needs them too (the llama-server lookup reads
$CHORUS_HOME/bin and the build cache); the config lookup in orchestrator/config/locations.py builds on them.
Empty environment variables count as unset, and XDG variables must be absolute (the XDG spec says to
ignore relative ones).
"""

from __future__ import annotations

import os
from pathlib import Path


def _env_path(name: str, *, absolute_only: bool = False) -> Path | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    return None if absolute_only and not path.is_absolute() else path


def chorus_home() -> Path | None:
    """$CHORUS_HOME: one folder for a whole chorus (config/, models/, sessions/, logs/, bin/), or None."""
    return _env_path("CHORUS_HOME")


def data_home() -> Path:
    """Where models, sessions and logs go when the config does not live in a folder of its own.

    $CHORUS_HOME, else $XDG_DATA_HOME/chorus, else ~/.local/share/chorus.
    """
    home = chorus_home()
    if home is not None:
        return home
    xdg = _env_path("XDG_DATA_HOME", absolute_only=True)
    return (xdg if xdg is not None else Path.home() / ".local" / "share") / "chorus"


def user_config_dir() -> Path:
    """$XDG_CONFIG_HOME/chorus, else ~/.config/chorus."""
    xdg = _env_path("XDG_CONFIG_HOME", absolute_only=True)
    return (xdg if xdg is not None else Path.home() / ".config") / "chorus"


def cache_dir() -> Path:
    """$CHORUS_CACHE_DIR, else ~/.cache/chorus: the same folder scripts/build_llama_server.sh fills."""
    env = _env_path("CHORUS_CACHE_DIR")
    return env if env is not None else Path.home() / ".cache" / "chorus"
