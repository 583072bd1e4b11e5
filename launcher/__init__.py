"""Model-server side of chorus: llama-server processes, GGUF metadata and memory.

Knows nothing of pipelines; the orchestrator builds on it.
"""
