"""`chorus models` (what is registered, and the .gguf files that are not) and `chorus models add FILE`.

`add` appends one block to models.yaml rather than re-dumping it, so the user's comments, order and
layout stay as they were; the result is validated before it replaces the file (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any, cast

import yaml

from cli.output import mib, print_table
from orchestrator.app import read_gguf
from orchestrator.config.registry import Registry, UnregisteredFile, suggest_name
from orchestrator.config.schema import NAME_PATTERN, ChorusConfig, load_config, load_models_file
from orchestrator.errors import ConfigError, GGUFError

_TOP_LEVEL_KEY = re.compile(r"^[^\s#]")
_MODELS_KEY = re.compile(r"^models\s*:\s*(?P<rest>[^#]*?)\s*(#.*)?$")


# ---------------------------------------------------------------- listing

def cmd_models(args: argparse.Namespace) -> int:
    registry = Registry(load_config(args.config_dir))
    records = [r.to_dict() for r in registry.records.values()]
    loose = registry.unregistered_files()
    if args.json:
        print(json.dumps(records + [f.to_dict() for f in loose], indent=2))
        return 0
    print_table(
        [(r["name"], r["file"] or r["url"], mib(cast("int | None", r["size_bytes"])), r["architecture"],
          r["size_label"], r["quantization"], r["context_length"], r["mode"], r["status"], r["reason"])
         for r in records],
        ["NAME", "FILE", "SIZE", "ARCH", "PARAMS", "QUANT", "MAX CTX", "MODE", "STATUS", "REASON"])
    if loose:
        print_unregistered(registry.config, loose)
    return 0


def print_unregistered(config: ChorusConfig, files: list[UnregisteredFile]) -> None:
    print(f"\nNot registered: .gguf files in {config.models_dir} that models.yaml does not use")
    print_table([(f.file, mib(f.size_bytes), f.metadata.architecture if f.metadata else None,
                  f.metadata.size_label if f.metadata else None, f.metadata.quantization if f.metadata else None,
                  f.metadata.context_length if f.metadata else None,
                  ("yes" if f.metadata.has_chat_template else "no") if f.metadata else None, f.reason)
                 for f in files], ["FILE", "SIZE", "ARCH", "PARAMS", "QUANT", "MAX CTX", "CHAT TEMPLATE", "REASON"])
    for f in files:
        entry = f.entry()
        if entry is None:
            continue
        print(f"\n{f.file}: `{add_command(f.file)}` writes to {config.paths.models}:\n")
        print(entry_block(f.suggested_name, entry, 2).rstrip("\n"))


def add_command(file: str) -> str:
    """`chorus models add FILE` as a shell takes it: quoted, and as ./FILE when the name starts with '-' (not
    an option; options may still follow it, as they could not after `--`). FILE is looked for in models_dir."""
    return f"chorus models add {shlex.quote('./' + file if file.startswith('-') else file)}"


# ---------------------------------------------------------------- add

def cmd_models_add(args: argparse.Namespace) -> int:
    config = load_config(args.config_dir)
    known = registered_as(config, find_model_file(config, args.file))
    if known and args.name is None:  # a second entry for the same file is only added when asked for by name
        print(f"{args.file}: already registered as '{known[0]}' in {config.paths.models}; nothing was added "
              "(give --name to add it again under another name, e.g. with other settings)")
        return 0
    name, entry = new_entry(config, args.file, args.name)
    how = add_entry(config.paths.models, name, entry)
    print(f"added '{name}' to {config.paths.models}{how}:\n")
    print(entry_block(name, entry, 2).rstrip("\n"))
    if known:
        print(f"\n(the same file is also registered as {', '.join(repr(k) for k in known)})")
    print(f"\nuse it in a pipeline stage (models: [{name}]), or try it with `chorus serve {shlex.quote(name)}`")
    return 0


def find_model_file(config: ChorusConfig, given: str) -> Path:
    """The file `given` names: a path, else a name inside models_dir."""
    path = Path(given).expanduser()
    candidates = [path] if path.is_absolute() else [config.models_dir / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(given, "no such model file",
                      hint=f"Give a path to a .gguf file, or the name of one in models_dir ({config.models_dir}); "
                           "`chorus models` lists the files there that are not registered.")


def registered_as(config: ChorusConfig, path: Path) -> list[str]:
    """The models.yaml names whose file is `path` once links are resolved, as the registry matches files."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):
        return []
    names = []
    for name, entry in config.models.items():
        if not entry.file:
            continue
        try:
            given = Path(entry.file).expanduser()
            if (given if given.is_absolute() else config.models_dir / given).resolve() == target:
                names.append(name)
        except (OSError, RuntimeError):  # '~nosuchuser/m.gguf', a link loop: not this file
            continue
    return names


def new_entry(config: ChorusConfig, given: str, name: str | None) -> tuple[str, dict[str, Any]]:
    """(name, entry) for the file: its header read, the name checked free and well-formed."""
    path = find_model_file(config, given)
    try:
        meta = read_gguf(path)
    except GGUFError as exc:
        raise ConfigError(str(path), f"not a valid GGUF file: {exc.message}", hint=exc.hint) from None
    taken = set(config.models)
    if name is None:
        name = suggest_name(path.name, taken)
    elif not re.match(NAME_PATTERN, name):
        raise ConfigError(str(config.paths.models), f"'{name}' is not a valid model name",
                          hint="Use letters, digits, '.', '_' and '-' (up to 64), starting with a letter or digit.")
    if name in taken:
        raise ConfigError(str(config.paths.models), f"a model named '{name}' is already defined",
                          hint="Choose another name with --name, or edit the existing entry.")
    try:  # the folder, not the file: a link in models_dir is named as it is there
        inside = path.absolute().parent.resolve() == config.models_dir.resolve()
    except (OSError, RuntimeError):
        inside = False
    suggested = UnregisteredFile(path, None, name, meta).entry()
    assert suggested is not None  # the header was read
    entry = {**suggested, "file": path.name if inside else str(path.absolute())}
    return name, entry


def entry_block(name: str, entry: dict[str, Any], indent: int) -> str:
    """`name:` and its keys as YAML, indented under `models:` by `indent` spaces."""
    text = yaml.safe_dump({name: entry}, sort_keys=False, default_flow_style=False, allow_unicode=True,
                          indent=max(2, indent), width=1000)
    return "".join(" " * indent + line + "\n" for line in text.splitlines())


def append_entry_text(text: str, name: str, entry: dict[str, Any]) -> str | None:
    """models.yaml's text with the entry added at the end of the `models:` mapping, everything else as it was;
    None when the file's layout is not one this can append to (a flow mapping with entries)."""
    lines = text.splitlines()
    at = next((i for i, line in enumerate(lines) if _MODELS_KEY.match(line)), None)
    if at is None:
        if text.strip() and any(_TOP_LEVEL_KEY.match(line) for line in lines):
            return None  # other top-level keys but no `models:`: the schema would refuse it anyway
        body = text + ("\n" if text and not text.endswith("\n") else "")
        return body + "models:\n" + entry_block(name, entry, 2)
    match = _MODELS_KEY.match(lines[at])
    assert match is not None
    rest = match.group("rest")
    if rest in ("{}", "null", "~"):
        lines[at] = "models:" + (f"  {match.group(2)}" if match.group(2) else "")
    elif rest:
        return None
    end = next((i for i in range(at + 1, len(lines)) if _TOP_LEVEL_KEY.match(lines[i])), len(lines))
    if end < len(lines):  # blank and column-0 comment lines just above the next key belong to that key
        while end > at + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
            end -= 1
    indent = 2
    for line in lines[at + 1:end]:
        if line.strip() and not line.lstrip().startswith("#"):
            indent = len(line) - len(line.lstrip(" "))
            break
    block = entry_block(name, entry, indent).splitlines()
    spacer = [""] if end > at + 1 and lines[end - 1].strip() else []
    out = lines[:end] + spacer + block + lines[end:]
    return "\n".join(out) + "\n"


def add_entry(models_yaml: Path, name: str, entry: dict[str, Any]) -> str:
    """Add the entry to models.yaml: appended as a block when the layout allows it, else (comments lost) the
    whole file written again. Validated before it replaces the file; returns a note on how it was written."""
    target = models_yaml.resolve() if models_yaml.is_symlink() else models_yaml
    try:
        text = target.read_text(encoding="utf-8") if target.exists() else ""
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    except OSError as exc:
        raise ConfigError(str(models_yaml), f"cannot read it: {exc.strerror or exc}") from None
    before = load_models_file(target) if target.exists() else {}
    new_text = append_entry_text(text, name, entry)
    note = ""
    if new_text is None:
        data = yaml.safe_load(text) or {}
        data.setdefault("models", {})
        data["models"] = {**(data["models"] or {}), name: entry}
        new_text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        note = " (rewritten whole: its layout did not allow appending, so its comments are gone)"
    _replace_validated(target, new_text, mode, name, before)
    return note


def _replace_validated(target: Path, text: str, mode: int, name: str, before: dict[str, Any]) -> None:
    """Write `text` next to `target`, check it loads with the new entry and every old one unchanged, then
    rename it over `target`; on any problem the file is left as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            after = load_models_file(Path(tmp))
        except ConfigError as exc:
            raise ConfigError(str(target), f"the new entry would not load ({exc.detail}); nothing was written",
                              hint="Add the entry by hand; `chorus models` prints it.") from None
        if name not in after or {k: v for k, v in after.items() if k != name} != before:
            raise ConfigError(str(target), "appending the entry would change other entries; nothing was written",
                              hint="Add the entry by hand; `chorus models` prints it.")
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
