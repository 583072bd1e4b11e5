"""Saved pipelines: `<config dir>/pipelines/NAME.yaml`, written by the UI's builder and read back.

A name is a plain file name (no folder, no dot first), so a save can never land outside `pipelines/`.
Saving never replaces a file unless asked to (the refusal is atomic: a hard link fails on an existing
name). Loading goes through the config loader, so errors carry the file, line and field.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

import yaml

from orchestrator.config.schema import PipelineSpec, load_pipeline
from orchestrator.errors import ConfigError

FOLDER = "pipelines"
SUFFIX = ".yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class PipelineExists(ConfigError):
    """A save would replace an existing pipeline file; the caller asks the user, then saves with overwrite."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), "a saved pipeline with this name exists",
                         hint="Choose another name, or confirm that it should be replaced.")
        self.path = path


def pipelines_dir(config_dir: Path) -> Path:
    return Path(config_dir) / FOLDER


def check_name(name: str) -> str:
    """The file stem for `name` ('review' or 'review.yaml'); anything that is not a plain name is refused."""
    stem = name.strip().removesuffix(SUFFIX)
    if not _NAME.match(stem):
        raise ConfigError("pipeline name", f"'{name}' is not a valid pipeline name",
                          hint="Use 1 to 64 letters, digits, '-' or '_', starting with a letter or digit.")
    return stem


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def path_for(config_dir: Path, name: str) -> Path:
    return pipelines_dir(config_dir) / f"{check_name(name)}{SUFFIX}"


def list_saved(config_dir: Path) -> list[str]:
    """Names of the saved pipelines, sorted; files whose names the UI could not save are left out."""
    folder = pipelines_dir(config_dir)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob(f"*{SUFFIX}") if _NAME.match(p.stem) and p.is_file())


_FIRST = ("name", "description", "defaults", "model", "label", "models", "system_prompt", "prompt", "type")


def _ordered(value: object) -> object:
    """Mappings with the keys a reader looks for first (name, model, label, prompts), the rest after."""
    if isinstance(value, dict):
        keys = [k for k in _FIRST if k in value] + [k for k in value if k not in _FIRST]
        return {k: _ordered(value[k]) for k in keys}
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


class _Dumper(yaml.SafeDumper):
    """Multi-line text as a block (prompts), short text with line breaks quoted with \\n (stop strings)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = None
    if "\n" in value:
        style = "|" if len(value) > 40 and not value[:1].isspace() and not value[-1:].isspace() else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(spec: PipelineSpec) -> str:
    """The spec as pipeline.yaml text: only what differs from the schema's defaults, readable key order."""
    data = _ordered(spec.model_dump(mode="json", exclude_defaults=True))
    return "# Saved by the chorus UI; the same format as pipeline.yaml.\n" + yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def save(config_dir: Path, name: str, spec: PipelineSpec, *, overwrite: bool = False) -> Path:
    """Write `spec` as pipelines/NAME.yaml; an existing file raises PipelineExists unless `overwrite`."""
    path = path_for(config_dir, name)
    spec = spec.model_copy(update={"name": path.stem})
    text = to_yaml(spec)
    load_check = PipelineSpec.model_validate(yaml.safe_load(text))  # what is written loads back the same
    if load_check.model_dump() != spec.model_dump():
        raise ConfigError(str(path), "the pipeline does not read back as it was built", hint="Report this bug.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            if overwrite:
                os.replace(tmp, path)
            else:
                _link_new(tmp, path, text)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be written ({exc.strerror or exc})",
                          hint="Check that the config folder is writable.") from None
    return path


def _link_new(tmp: str, path: Path, text: str) -> None:
    """Put the written file at `path` only if nothing is there, atomically (a hard link, else O_EXCL)."""
    try:
        os.link(tmp, path)  # fails if the name exists, even if it appeared a moment ago
        return
    except FileExistsError:
        raise PipelineExists(path) from None
    except OSError:  # a file system without hard links
        pass
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise PipelineExists(path) from None


def load(config_dir: Path, name: str) -> PipelineSpec:
    """A saved pipeline, validated as pipeline.yaml is (ConfigError with file, line and field)."""
    return load_pipeline(path_for(config_dir, name))


__all__ = ["FOLDER", "PipelineExists", "check_name", "list_saved", "load", "path_for", "pipelines_dir", "save",
           "to_yaml", "valid_name"]
