"""`chorus init [DIR]`: write the default config (the one shipped in the package) into a folder to edit.

Refuses to overwrite unless --force, so a user's models.yaml is never lost to a second `init`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.app import find_llama_server, write_text_atomic
from orchestrator.config.locations import CONFIG_FILES, default_init_dir, find_config_dir, packaged_config_dir
from orchestrator.config.schema import load_app_config, load_models_file
from orchestrator.errors import ChorusError, ConfigError


def write_default_config(target: Path, *, force: bool = False) -> list[Path]:
    """Copy the packaged app.yaml, models.yaml and pipeline.yaml into `target`, each atomically.

    When one of them is there already and not `force`, nothing is written.
    """
    if target.exists() and not target.is_dir():
        raise ConfigError(str(target), "exists and is not a folder", hint="Choose a folder for the config.")
    existing = [name for name in CONFIG_FILES if (target / name).exists() or (target / name).is_symlink()]
    if existing and not force:
        raise ConfigError(str(target), f"already has {', '.join(existing)}; nothing was written",
                          hint="Pass --force to overwrite them with the defaults, or choose another folder.")
    source = packaged_config_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for name in CONFIG_FILES:
            path = target / name
            write_text_atomic(path, (source / name).read_text(encoding="utf-8"))
            path.chmod(0o644)  # the temp file was private (mkstemp); a config file is ordinary
            written.append(path)
    except OSError as exc:
        raise ConfigError(str(target), f"cannot write the config: {exc.strerror or exc}",
                          hint="Choose a folder you can write to.") from None
    return written


def next_steps(target: Path) -> list[str]:
    """What to do after `init`, with the paths this config really resolves to."""
    app = load_app_config(target)
    found = find_config_dir().path.resolve() == target.resolve()
    flag = "" if found else f" --config-dir {target}"
    steps = [f"put your .gguf files into {app.models_dir} (models_dir in app.yaml; runs are saved under "
             f"{app.sessions_dir})",
             f"list them in {target / 'models.yaml'} ({_entries_note(target / 'models.yaml')})"]
    try:
        find_llama_server(app.llama_server)
    except ChorusError as exc:
        steps.append(f"get llama-server. {exc.hint}")
    steps += [f"chorus check{flag}", f'chorus run "your question"{flag}']
    if not found:
        steps.append("to drop --config-dir, set $CHORUS_CONFIG_DIR to this folder"
                     + (f", or $CHORUS_HOME to {target.parent}" if target.name == "config" else ""))
    return steps


def _entries_note(models_yaml: Path) -> str:
    """What the written models.yaml holds, read from it: 'its entries are the demo models, a and b'."""
    try:
        names = list(load_models_file(models_yaml))
    except ChorusError:
        names = []
    if not names:
        return "it has no entry yet"
    if len(names) == 1:
        return f"its one entry is the demo model, {names[0]}"
    return f"its {len(names)} entries are the demo models, {', '.join(names[:-1])} and {names[-1]}"


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir or args.config_dir or default_init_dir()).expanduser().absolute()
    for path in write_default_config(target, force=args.force):
        print(f"wrote {path}")
    print("\nnext steps:")
    for i, step in enumerate(next_steps(target), 1):
        print(f"  {i}. {step}")
    return 0
