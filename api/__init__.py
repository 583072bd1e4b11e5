"""The OpenAI-compatible HTTP API: every runnable pipeline and every registered model as an OpenAI model.

A front end beside `ui/`: it imports `orchestrator` only (tests/test_architecture.py), runs pipelines through
`orchestrator.runs.Runner` with its own observer, and proxies models through `api.proxy`.
Started by `chorus api` (cli/api.py) as `uvicorn api.app:create_app --factory`.
"""
