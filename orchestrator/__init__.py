"""Pipelines, config, model registry, aggregation, sessions and the CLI."""

import launcher  # noqa: F401  # first: it spares `import httpx` its doomed CLI import (launcher/__init__.py)

__version__ = "0.1.0"
