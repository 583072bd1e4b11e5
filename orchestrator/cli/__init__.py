"""The `chorus` command line: one module per command group."""

from orchestrator.cli.main import main

__all__ = ["main"]
