"""YAML for the tests' own reading and writing of config files: libyaml's C loader and dumper where PyYAML
has them, as chorus itself reads (orchestrator/config/yamlio.py). The pure-Python ones, called for every
test's config folder, were a tenth of the fast tier's CPU time."""

from __future__ import annotations

from typing import Any

import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str | bytes) -> Any:
    return yaml.load(text, Loader=_LOADER)


def dump(data: Any, stream: Any = None, **options: Any) -> Any:
    return yaml.dump(data, stream, Dumper=_DUMPER, **options)
