"""Vectors from an embedding model: its own `llama-server --embeddings` (leased from the runtime's pool by
`orchestrator.runtime.runtime_embedder`), or a remote URL.

A models.yaml entry with `role: embedding` is resolved with `--embeddings` (plan/resolve.py), so it is a
server family of its own and never serves chat. The pool's lease runs the same memory admission as any
model. A model without a pooling type in its GGUF (a chat model used for a test) needs
`extra_args: ["--pooling", "mean"]`, else llama-server refuses OpenAI-style embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from launcher.errors import ChorusError


class EmbeddingFailed(ChorusError):
    """The embedding server refused or failed a request; carries the model and the server's reason."""

    def __init__(self, model: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"embedding model '{model}': {reason}", hint=hint)
        self.model = model
        self.reason = reason


class NotAnEmbeddingModel(ChorusError):
    def __init__(self, model: str, role: str) -> None:
        super().__init__(f"model '{model}' has role '{role}', not 'embedding'",
                         hint="Give it `role: embedding` in models.yaml (it then runs as llama-server --embeddings).")
        self.model = model


@dataclass(frozen=True)
class HttpEmbedder:
    """POST /v1/embeddings (OpenAI's shape) to one server; local servers' URL is their root, remote ones' …/v1."""

    model: str
    base_url: str
    api_key: str | None = None
    remote: bool = False
    timeout_s: float = 300.0

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        url = self.base_url.rstrip("/") + ("/embeddings" if self.remote else "/v1/embeddings")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        import httpx  # on first use: the runtime imports this module on every cold start

        try:
            resp = httpx.post(url, json={"model": self.model, "input": list(texts)}, headers=headers,
                              timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise EmbeddingFailed(self.model, f"request failed: {exc}") from None
        if resp.status_code != 200:
            hint = ("A model without its own pooling type needs extra_args: [\"--pooling\", \"mean\"]; the input "
                    "must fit the server's batch (-ub).") if "pool" in resp.text.lower() else None
            raise EmbeddingFailed(self.model, f"HTTP {resp.status_code}: {resp.text[:300]}", hint=hint)
        try:
            data: list[dict[str, Any]] = resp.json()["data"]
            vectors = [d["embedding"] for d in sorted(data, key=lambda d: d.get("index", 0))]
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingFailed(self.model, f"unexpected response ({exc})") from None
        if len(vectors) != len(texts) or not all(isinstance(v, list) and v for v in vectors):
            raise EmbeddingFailed(self.model, f"asked for {len(texts)} vectors, got {len(vectors)}")
        return vectors
