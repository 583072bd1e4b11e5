"""One registered model behind an OpenAI request: lease its server from the pool, forward, stream back.

The HTTP API's "llama-swap" use. A local model's server is resolved by the same rule as `chorus serve`
(`Chorus.lease_model`), admitted by the same memory check, and leased from the same pool as pipeline
runs: started on demand, kept warm between requests, stopped when idle (the pool's reaper). A remote model
(`url:` in models.yaml) is forwarded to its endpoint with its key. The lease is held until the caller has
read the whole answer, so an idle-timeout stop or an LRU eviction never cuts a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from orchestrator.app import Chorus, GenerationClient, ModelServer
from orchestrator.engine.replicas import ReplicaSet, shared
from orchestrator.errors import (
    RequestFailed,
    RequestTimeout,
    ServerCrashed,
    ServerError,
    ServerUnreachable,
    connection_reason,
)

log = logging.getLogger("chorus.proxy")

Route = Literal["chat/completions", "completions"]
ROUTES: tuple[Route, ...] = ("chat/completions", "completions")


@dataclass(frozen=True)
class Upstream:
    """Where one request goes: a leased local llama-server, or a remote OpenAI base URL (…/v1)."""

    model: str
    base_url: str
    api_key: str | None
    remote: bool
    server: ModelServer | None = None  # local only: explains a lost connection (exit status, log tail)

    def url(self, route: Route) -> str:
        root = self.base_url.rstrip("/")
        return f"{root}/{route}" if self.remote else f"{root}/v1/{route}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class UpstreamResponse:
    """The upstream answer, still streaming; lines and JSON read through typed errors."""

    def __init__(self, upstream: Upstream, response: httpx.Response) -> None:
        self.upstream = upstream
        self.response = response

    @property
    def status_code(self) -> int:
        return self.response.status_code

    async def json(self) -> Any:
        """The whole body as JSON (a non-streamed answer or an error)."""
        raw = await self._guard(self.response.aread())
        try:
            return json.loads(raw)
        except ValueError:
            text = raw.decode("utf-8", errors="replace")[:500]
            raise RequestFailed(self.upstream.model, f"HTTP {self.status_code}, not JSON: {text}") from None

    async def lines(self) -> AsyncIterator[str]:
        """The body line by line (SSE), a lost connection raised as ServerCrashed naming the model."""
        iterator = self.response.aiter_lines()
        while True:
            try:
                line = await self._guard(iterator.__anext__())
            except StopAsyncIteration:
                return
            yield line

    async def _guard(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except httpx.TimeoutException as exc:
            raise RequestTimeout(self.upstream.model, f"no answer in time ({type(exc).__name__})") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise await _lost(self.upstream, exc) from None


class ModelProxy:
    """Forwards OpenAI requests to registered models; shared httpx clients (connection reuse)."""

    def __init__(self, chorus: Chorus, *, client: httpx.AsyncClient | None = None) -> None:
        self.chorus = chorus
        self._given = client  # every request goes through it (tests)
        # the pipelines' clients: none with a TLS context for plain http (every local llama-server)
        self._clients = GenerationClient(timeout_s=chorus.config.app.server.request_timeout_s)

    def _client(self, url: str) -> httpx.AsyncClient:
        return self._given or self._clients.http(url)

    async def aclose(self) -> None:
        if self._given is not None:
            await self._given.aclose()
        await self._clients.aclose()

    @contextlib.asynccontextmanager
    async def open(self, model: str, route: Route, body: dict[str, Any]) -> AsyncIterator[UpstreamResponse]:
        """Lease `model`'s server (after the memory admission) and send `body` to its `route`; the response
        streams inside the block. A remote model with `replicas:` goes to the least busy healthy replica;
        one that cannot be reached is marked down and the request goes to the next (the same replica state
        as pipeline calls). A local server that computes on the CPU is sent the request in its turn at the
        cores, taken by pipeline calls too: the turn is held until the answer is read.

        The body goes as the client sent it (llama-server understands sampling fields chorus does not
        model: top_k, min_p, penalties...), with `model` set to what the upstream expects. Raises
        ModelUnavailable, InsufficientMemory, a ServerStartError, RequestTimeout or ServerCrashed.
        """
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}")
        payload = {**body, "model": model}
        async with self.chorus.lease_model(model) as (record, server):
            if server is not None:
                upstream = Upstream(record.name, server.base_url, server.api_key, remote=False, server=server)
                async with self.chorus.compute_turn(server), self._send(upstream, route, payload, None) as response:
                    yield response
                return
            urls = [u for u in dict.fromkeys([record.entry.url, *record.entry.replicas]) if u]
            replicas = shared(urls) if len(urls) > 1 else None
            key = _remote_key(record.entry.api_key_env)
            tried: list[str] = []
            while True:
                url = replicas.choose(exclude=tried) if replicas is not None else (urls[0] if urls else "")
                tried.append(url)
                upstream = Upstream(record.name, url, key, remote=True)
                try:
                    async with self._send(upstream, route, payload, replicas) as response:
                        yield response
                    return
                except _NotReached as missed:
                    if replicas is None or len(set(tried)) >= len(replicas.replicas):
                        raise missed.error from None

    @contextlib.asynccontextmanager
    async def _send(self, upstream: Upstream, route: Route, payload: dict[str, Any],
                    replicas: ReplicaSet | None) -> AsyncIterator[UpstreamResponse]:
        """One request to one upstream; a replica that is not reached raises _NotReached (marked down)."""
        started = time.monotonic()
        client = self._client(upstream.url(route))
        request = client.build_request("POST", upstream.url(route), json=payload, headers=upstream.headers)
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            error: ServerError = (_unreached(upstream, exc) if upstream.remote and isinstance(exc, httpx.ConnectError)
                                  else RequestTimeout(upstream.model, f"no answer from {upstream.url(route)} in time "
                                                                      f"({type(exc).__name__})")
                                  if isinstance(exc, httpx.TimeoutException) else await _lost(upstream, exc))
            if replicas is None:
                raise error from None
            replicas.mark_down(upstream.base_url, since=started)
            replicas.release(upstream.base_url)
            log.warning("replica %s of '%s' not reached (%s); trying another", upstream.base_url, upstream.model,
                        error.detail)
            raise _NotReached(error) from None
        ok = False
        try:
            yield UpstreamResponse(upstream, response)
            ok = response.status_code < 500
        finally:
            await response.aclose()  # closing the stream stops the server's generation
            if replicas is not None:
                replicas.release(upstream.base_url, ok=ok)


class _NotReached(Exception):
    """A replica could not be reached before any byte came back: the request may go to another."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(str(error))
        self.error = error


def _remote_key(env_name: str | None) -> str | None:
    return os.environ.get(env_name) if env_name else None


def _unreached(upstream: Upstream, exc: BaseException) -> ServerError:
    """A remote endpoint chorus could not connect to: nothing was sent, and chorus cannot restart it."""
    return ServerUnreachable(upstream.model, f"could not connect to the remote endpoint {upstream.base_url}: "
                                             f"{connection_reason(exc)}",
                             hint=f"Check that the server at {upstream.base_url} is running and reachable from "
                                  "here, and that the model's `url:` in models.yaml is right.")


async def _lost(upstream: Upstream, exc: BaseException) -> ServerError:
    """A lost connection as ServerCrashed; for a server we started, with its exit status and log tail."""
    lost = ServerCrashed(upstream.model, f"connection to {upstream.base_url} lost: {exc or type(exc).__name__}",
                         hint="The server may have crashed; it is restarted on the next request.")
    if upstream.server is None:
        return lost
    return await asyncio.to_thread(upstream.server.explain_lost_connection, lost)


__all__ = ["ROUTES", "ModelProxy", "Route", "Upstream", "UpstreamResponse"]
