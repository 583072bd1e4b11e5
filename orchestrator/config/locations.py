"""Which config folder chorus uses, and what relative paths in it are relative to.

The same rules hold for a checkout and for a package installed with pip (nothing here looks for the repo).
The config folder, first match wins:

1. ``--config-dir DIR``;
2. ``$CHORUS_CONFIG_DIR``: a config folder itself (kept for compatibility; ``chorus ui`` hands it on);
3. ``$CHORUS_HOME``: its ``config/`` when that holds app.yaml or models.yaml, else the packaged default
   config. A set ``$CHORUS_HOME`` is the whole chorus: ./config and the user config folder are not consulted;
4. ``./config`` when it holds app.yaml or models.yaml;
5. the user config folder (``$XDG_CONFIG_HOME/chorus`` or ``~/.config/chorus``) when it holds them;
6. the default config that ships inside the package (``orchestrator/config/defaults/``).

Relative paths in app.yaml (``models_dir: ../models``) are relative to the config folder, with one
exception: the packaged default config (read-only, inside site-packages) and the user config folder (under
~/.config) are not folders of their own, so their relative paths are taken as if the config lived in
``<data home>/config``: ``../models`` is ``$CHORUS_HOME/models``, or ``~/.local/share/chorus/models``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from launcher.paths import chorus_home, data_home, user_config_dir

CONFIG_FILES = ("app.yaml", "models.yaml", "pipeline.yaml")


@dataclass(frozen=True)
class ConfigLocation:
    """A config folder and the rule that picked it (shown by `chorus init` and in tests)."""

    path: Path
    source: str


def packaged_config_dir() -> Path:
    """The default config shipped as package data (in a checkout: links to the repo's config/ files)."""
    return Path(str(resources.files("orchestrator.config").joinpath("defaults")))


def has_config(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("app.yaml", "models.yaml"))


def find_config_dir(explicit: Path | str | None = None) -> ConfigLocation:
    """Apply the lookup order in this module's docstring."""
    if explicit:
        return ConfigLocation(Path(explicit).expanduser(), "--config-dir")
    env = os.environ.get("CHORUS_CONFIG_DIR", "").strip()
    if env:
        return ConfigLocation(Path(env).expanduser(), "$CHORUS_CONFIG_DIR")
    home = chorus_home()
    if home is not None:
        if has_config(home / "config"):
            return ConfigLocation(home / "config", "$CHORUS_HOME")
        return ConfigLocation(packaged_config_dir(), "packaged defaults ($CHORUS_HOME has no config/ yet)")
    local = Path.cwd() / "config"
    if has_config(local):
        return ConfigLocation(local, "./config")
    user = user_config_dir()
    if has_config(user):
        return ConfigLocation(user, "user config folder")
    return ConfigLocation(packaged_config_dir(), "packaged defaults")


def default_init_dir() -> Path:
    """Where `chorus init` writes when given no folder: $CHORUS_HOME/config, else the user config folder."""
    home = chorus_home()
    return home / "config" if home is not None else user_config_dir()


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.expanduser().resolve() == b.expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def relative_base(config_dir: Path) -> Path:
    """What relative paths in this config folder's app.yaml are relative to (see the module docstring)."""
    if _same_dir(config_dir, packaged_config_dir()) or _same_dir(config_dir, user_config_dir()):
        return data_home() / "config"
    return config_dir
