"""Pipelines, config, model registry, aggregation, sessions and the CLI."""

__version__ = "0.1.0"
