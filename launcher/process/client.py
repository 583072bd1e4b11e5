"""Streaming generation over HTTP: a local llama-server, or any OpenAI-compatible endpoint.

Chat-mode models use /v1/chat/completions; base models without a chat template use llama-server's
native /completion (or /v1/completions on a remote endpoint). Both stream tokens over SSE.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from launcher.errors import (
    RequestFailed,
    RequestTimeout,
    ServerCrashed,
    ServerError,
    ServerUnreachable,
    connection_reason,
)
from launcher.process.server import find_server

if TYPE_CHECKING:  # httpx is imported on first use: a cold start spawns its server before paying for it
    import httpx

Mode = Literal["chat", "completion"]
TokenCallback = Callable[[str], None]
_NATIVE_NAMES = {"max_tokens": "n_predict"}  # llama-server's /completion name, where it differs from OpenAI's


@dataclass
class GenerationRequest:
    """One generation: the prompt and every sampling parameter, None = the server's default.

    The sampling fields mirror orchestrator/config/schema.py's GenerationParams name for name (the
    launcher cannot import the config layer; tests/test_sampling.py keeps the two in step).
    """

    prompt: str
    system_prompt: str = ""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    mirostat: int | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters that are set, under the request's names (url_and_body renames)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SAMPLING}
        out = {k: v for k, v in out.items() if v is not None}
        if "stop" in out:
            out["stop"] = list(out["stop"])
            if not out["stop"]:  # an empty list means the server's own stop strings, as no list does
                del out["stop"]
        return out


_NOT_SAMPLING = frozenset({"prompt", "system_prompt"})


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None
    total_s: float = 0.0
    finish_reason: str | None = None
    server_timings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        if not self.completion_tokens or self.total_s <= 0:
            return None
        gen_s = self.total_s - (self.first_token_s or 0.0)
        return self.completion_tokens / gen_s if gen_s > 0 else None


@dataclass(frozen=True)
class Endpoint:
    """Where to send requests: a local llama-server's root URL, or a remote OpenAI base URL (…/v1)."""

    model: str
    base_url: str
    mode: Mode = "chat"
    api_key: str | None = None
    remote: bool = False

    def url_and_body(self, req: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """The URL and JSON body for `req`, each parameter under the name that endpoint reads.

        OpenAI endpoints (/v1/chat/completions, /v1/completions) get OpenAI's names where OpenAI has the
        parameter (max_tokens, a json_schema as `response_format` in chat); llama-server reads its own
        extras (top_k, repeat_penalty, mirostat, grammar...) from the same body. The native /completion
        gets the native names (n_predict).
        """
        params = req.sampling()
        root = self.base_url.rstrip("/")
        if self.mode == "chat":
            messages = ([{"role": "system", "content": req.system_prompt}] if req.system_prompt else [])
            messages.append({"role": "user", "content": req.prompt})
            schema = params.pop("json_schema", None)
            if schema is not None:
                params["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "answer", "schema": schema}}
            body = {"stream": True, **params, "messages": messages, "stream_options": {"include_usage": True}}
            if self.remote:
                body["model"] = self.model
                return f"{root}/chat/completions", body
            return f"{root}/v1/chat/completions", body
        prompt = f"{req.system_prompt}\n\n{req.prompt}" if req.system_prompt else req.prompt
        if self.remote:
            return f"{root}/completions", {"stream": True, **params, "prompt": prompt,
                                           "model": self.model}
        native = {_NATIVE_NAMES.get(k, k): v for k, v in params.items()}
        return f"{root}/completion", {"stream": True, **native, "prompt": prompt, "cache_prompt": True}


def _parse_chunk(data: dict[str, Any], result: GenerationResult) -> str:
    """Pull the new text out of one SSE chunk (chat, OpenAI completion or native format)."""
    if "choices" in data:
        piece = ""
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            piece += delta.get("content") or choice.get("text") or ""
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
        usage = data.get("usage") or {}
        if usage:
            result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
            result.completion_tokens = usage.get("completion_tokens", result.completion_tokens)
        if data.get("timings"):
            result.server_timings = data["timings"]
        return piece
    piece = data.get("content") or ""
    if data.get("stop"):
        result.finish_reason = data.get("stop_type") or "stop"
        result.prompt_tokens = data.get("tokens_evaluated", result.prompt_tokens)
        result.completion_tokens = data.get("tokens_predicted", result.completion_tokens)
        result.server_timings = data.get("timings") or {}
    return piece


async def _sse_events(response: httpx.Response, model: str, url: str) -> AsyncIterator[dict[str, Any]]:
    """The stream's JSON events up to `[DONE]`; a data line that is not a JSON object fails the request.

    Skipping it (as before) turned `data: {not json` then `[DONE]` into an "ok" answer with no text.
    """
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        if not payload:
            continue
        try:
            data = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise RequestFailed(model, f"the stream from {url} sent an event that is not JSON ({exc.msg}): "
                                f"{payload[:120]!r}", hint=_BAD_STREAM_HINT) from None
        if not isinstance(data, dict):
            raise RequestFailed(model, f"the stream from {url} sent an event that is not a JSON object: "
                                f"{payload[:120]!r}", hint=_BAD_STREAM_HINT)
        yield data


_BAD_STREAM_HINT = "Check that the endpoint speaks OpenAI-compatible streaming (server-sent events of JSON)."


class GenerationClient:
    """One async httpx client shared by all requests (connection reuse keeps per-request cost low)."""

    def __init__(self, *, timeout_s: float = 600.0, connect_timeout_s: float = 10.0) -> None:
        # connecting may take half the deadline at most: a replica that cannot be reached leaves time for another
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s / 2)
        self._client: httpx.AsyncClient | None = None
        self._tls_client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> GenerationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def timeout(self) -> httpx.Timeout:
        """Every request's timeouts (httpx is imported here, on first use)."""
        import httpx

        return httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)

    def http(self, url: str) -> httpx.AsyncClient:
        """The client for `url`. Plain http (every local llama-server) gets one without a TLS context: loading
        the CA store costs 40-90 ms of CPU per client, paid on a cold start while the server loads. An https
        URL (a remote model) gets its own client that verifies certificates as usual."""
        import httpx

        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        timeout = self.timeout
        if url.startswith("https:"):
            if self._tls_client is None:
                self._tls_client = httpx.AsyncClient(timeout=timeout, limits=limits)
            return self._tls_client
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=timeout, limits=limits, verify=False)  # never TLS
        return self._client

    def preload(self) -> None:
        """Build the plain-http client and load httpx's async backend (anyio's asyncio module) now, inside the
        event loop: 40-60 ms that the first request would otherwise wait for."""
        import anyio

        self.http("http://127.0.0.1")
        anyio.current_time()  # the first call into anyio imports its backend

    async def aclose(self) -> None:
        for client in (self._client, self._tls_client):
            if client is not None:
                await client.aclose()
        self._client = self._tls_client = None

    async def generate(self, endpoint: Endpoint, req: GenerationRequest,
                       on_token: TokenCallback | None = None, *, timeout_s: float | None = None) -> GenerationResult:
        """Stream one generation; raise RequestTimeout / ServerCrashed / RequestFailed on failure.

        A request that got no byte back on a reused keep-alive connection (the server closed it
        between requests) is sent once more on a fresh one; a dead server then fails for real.
        """
        try:
            return await self._generate_with_retry(endpoint, req, on_token, timeout_s)
        except ServerCrashed as exc:
            raise await _explained(endpoint, exc) from None

    async def _generate_with_retry(self, endpoint: Endpoint, req: GenerationRequest, on_token: TokenCallback | None,
                                   timeout_s: float | None) -> GenerationResult:
        total = timeout_s or self.timeout_s or 600.0
        for attempt in (1, 2):
            result = GenerationResult(text="")
            try:
                async with asyncio.timeout(total):  # the whole request, not only the wait for each chunk
                    return await self._generate_once(endpoint, req, on_token, timeout_s, result)
            except TimeoutError:
                where = f" from {endpoint.base_url}" if endpoint.remote else ""  # which replica, say
                raise RequestTimeout(endpoint.model, f"no complete answer{where} within {total:.0f}s") from None
            except _StaleConnection as exc:
                if attempt == 2:
                    raise ServerCrashed(endpoint.model, f"connection lost: {exc.__cause__}",
                                        hint="The server may have crashed; it is restarted on the next request."
                                        ) from None
        raise AssertionError("unreachable")

    async def _generate_once(self, endpoint: Endpoint, req: GenerationRequest, on_token: TokenCallback | None,
                             timeout_s: float | None, result: GenerationResult) -> GenerationResult:
        import httpx

        url, body = endpoint.url_and_body(req)
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
        pieces: list[str] = []
        got_response = False
        start = time.perf_counter()
        timeout = httpx.Timeout(timeout_s or self.timeout_s, connect=self.connect_timeout_s)
        try:
            async with self.http(url).stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
                got_response = True
                if response.status_code != 200:
                    text = (await response.aread()).decode("utf-8", errors="replace")[:500]
                    raise RequestFailed(endpoint.model, f"HTTP {response.status_code} from {url}: {text}",
                                        hint=_status_hint(response.status_code))
                async for data in _sse_events(response, endpoint.model, url):
                    if "error" in data:
                        raise RequestFailed(endpoint.model, f"server error: {data['error']}")
                    piece = _parse_chunk(data, result)
                    if piece:
                        if result.first_token_s is None:
                            result.first_token_s = time.perf_counter() - start
                        pieces.append(piece)
                        if on_token is not None:
                            on_token(piece)
        except httpx.ConnectTimeout:
            if not endpoint.remote:
                raise RequestTimeout(endpoint.model, f"no answer from {url} in time (ConnectTimeout)") from None
            # never connected, nothing sent: a remote whose link is down; "no answer", so another replica may
            raise ServerUnreachable(endpoint.model, f"no connection within {timeout.connect:.0f}s at {url}",
                                    hint=f"Is {endpoint.base_url} up, and its network reachable from here?"
                                    ) from None
        except httpx.TimeoutException as exc:
            raise RequestTimeout(endpoint.model, f"no answer from {url} in time ({type(exc).__name__})") from None
        except httpx.RemoteProtocolError as exc:
            if not got_response:
                raise _StaleConnection() from exc
            raise ServerCrashed(endpoint.model, f"connection to {url} lost mid-answer: {exc}",
                                hint="The server may have crashed; it is restarted on the next request.") from None
        except httpx.ConnectError as exc:  # never connected: "no answer", said once with the reason
            hint = (f"Is the server at {endpoint.base_url} running, and is its `url:` in models.yaml right?"
                    if endpoint.remote else None)
            raise ServerUnreachable(endpoint.model, f"{connection_reason(exc)} at {url}", hint=hint) from None
        except (httpx.ReadError, httpx.WriteError) as exc:
            raise ServerCrashed(endpoint.model, f"connection to {url} lost: {exc or type(exc).__name__}",
                                hint="The server may have crashed; it is restarted on the next request."
                                ) from None
        except httpx.HTTPError as exc:
            raise RequestFailed(endpoint.model, f"{type(exc).__name__}: {exc}") from None
        result.text = "".join(pieces)
        result.total_s = time.perf_counter() - start
        if result.completion_tokens is None and pieces:
            result.completion_tokens = len(pieces)
        return result


async def _explained(endpoint: Endpoint, lost: ServerCrashed) -> ServerError:
    """A lost connection to a server this process started, with the server's exit status and log tail.

    Only the launcher knows the process behind a local endpoint; a remote one stays "connection lost".
    """
    if endpoint.remote:
        return lost
    server = find_server(endpoint.base_url)
    if server is None:
        return lost
    return await asyncio.to_thread(server.explain_lost_connection, lost)


class _StaleConnection(Exception):
    """No response at all on a connection the server may have closed between requests."""


def _status_hint(status: int) -> str | None:
    if status in (401, 403):
        return "Check the API key (api_key_env in models.yaml names the environment variable)."
    if status == 404:
        return "Check the endpoint URL; remote urls must be the OpenAI base URL, e.g. http://host:8080/v1."
    if status == 503:
        return "The server is still loading or overloaded; try again."
    return None


__all__ = ["Endpoint", "GenerationClient", "GenerationRequest", "GenerationResult", "ServerError"]
