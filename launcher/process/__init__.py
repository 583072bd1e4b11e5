"""Processes: llama-server and rpc-server lifecycles, the warm pool, the HTTP client, live-server records."""
