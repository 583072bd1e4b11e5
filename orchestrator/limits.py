"""Bounds and defaults the command line shows and checks while it parses (`chorus serve --n-ctx`, `chorus
worker --port`, `chorus eval --judge-max-tokens`): importable without the engine, so building the parser
(`chorus --help`, an argument error) loads nothing else. orchestrator.app re-exports them as before."""

from launcher.process.limits import MIN_N_CTX, RPC_DEFAULT_PORT

JUDGE_MAX_TOKENS = 256  # the judge's max_tokens per verdict (eval/run.py)

__all__ = ["JUDGE_MAX_TOKENS", "MIN_N_CTX", "RPC_DEFAULT_PORT"]
