"""A registered model's request, forwarded to its llama-server through `api.proxy`.

The server is leased (started on demand after the memory fit check) before the response starts, so a
model that does not fit answers 503 and one whose server will not start answers 502, streamed or not.
The upstream answer is passed on with `model` set to the registry name; a lost connection mid-stream
ends the stream with an OpenAI error chunk naming the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from api.admission import Admission
from api.errors import error_body, upstream_error
from api.proxy import ModelProxy, Route
from api.runs import GONE, admitted, until_done_or_gone
from api.schemas import CompletionFields
from api.shutdown import stream_until_stopped
from api.stream import sse
from orchestrator.errors import ChorusError

log = logging.getLogger("chorus.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(StreamingResponse):
    """A streaming response that always closes its generator when the response ends, client gone or not
    (its `finally` cancels the run or releases the server at once, not when the generator is collected)."""

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
        self._generator = content
        self._stopping: asyncio.Event | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stopping = getattr(getattr(scope.get("app"), "state", None), "stopping", None)  # api/shutdown.py
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        try:
            if self._stopping is None:
                await super().stream_response(send)
            else:  # a stop signal ends the stream with an error chunk and [DONE], not a dropped connection
                await stream_until_stopped(self, send, self._stopping)
        finally:
            aclose = getattr(self._generator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def renamed(data: Any, model: str) -> Any:
    """The upstream JSON with `model` set to the name the client asked for."""
    if isinstance(data, dict) and "model" in data:
        data["model"] = model
    return data


class _Held:
    """The upstream response and the run slot, given back once, shielded from cancellation."""

    def __init__(self, limiter: Admission) -> None:
        self.limiter = limiter
        self.stack = contextlib.AsyncExitStack()
        self.closed = False
        self.began = time.monotonic()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self.stack.aclose()
        finally:
            self.limiter.release(time.monotonic() - self.began)


async def forward(request: Request, proxy: ModelProxy, limiter: Admission, model: str, route: Route,
                  body: CompletionFields) -> Response:
    if not await admitted(request, limiter, ahead=True):  # a place (in the server's queue when need be),
        return Response(status_code=GONE)  # a wait, or 429; the client left while it waited
    if not body.stream:
        return await _whole(request, proxy, limiter, model, route, body)
    held = _Held(limiter)
    try:
        upstream = await held.stack.enter_async_context(proxy.open(model, route, body.wire()))
    except BaseException:
        await held.close()
        raise
    if upstream.status_code != 200:
        try:
            data = await upstream.json()
        finally:
            await held.close()
        return _answer(upstream.status_code, data, model, route, body)

    async def lines() -> AsyncIterator[str]:
        try:
            async for line in upstream.lines():
                yield _rename_line(line, model, route) + "\n"
        except ChorusError as exc:
            log.warning("%s", exc)
            yield sse(error_body(exc))
        finally:
            await held.close()

    return EventStream(lines())


async def _whole(request: Request, proxy: ModelProxy, limiter: Admission, model: str, route: Route,
                 body: CompletionFields) -> Response:
    """A non-streamed answer, read in one task that is cancelled when the client leaves: the connection to
    llama-server closes and it stops generating, and the place is given back (waiting for the headers of a
    non-streamed answer is waiting for the whole generation, max_tokens for nobody)."""
    held = _Held(limiter)

    async def fetch() -> tuple[int, Any]:
        async with proxy.open(model, route, body.wire()) as upstream:
            return upstream.status_code, await upstream.json()

    try:
        finished, result = await until_done_or_gone(request, fetch(), lambda: None)
    finally:
        await held.close()  # here, not in the task: one cancelled before it began never runs its `finally`
    if not finished or result is None:
        return Response(status_code=GONE)
    status, data = result
    return _answer(status, data, model, route, body)


def _answer(status: int, data: Any, model: str, route: Route, body: CompletionFields) -> JSONResponse:
    """The upstream's answer under the model's name; an error (llama-server's own shape) in OpenAI's, with the
    status an OpenAI client acts on (api.errors.upstream_error)."""
    if status < 400:
        return JSONResponse(renamed(data, model), status_code=status)
    sent = body.model_fields_set | set(body.model_extra or {})
    status, error = upstream_error(status, data, model=model, route=route, sent=sent)
    return JSONResponse(error, status_code=status)


def _rename_line(line: str, model: str, route: Route) -> str:
    """An upstream SSE line with `model` renamed; an error event (llama-server's own shape, sent mid-stream
    once its 200 went out) in OpenAI's, as its error answers are (api.errors.upstream_error)."""
    if not line.startswith("data:"):
        return line
    payload = line[5:].strip()
    if not payload.startswith("{"):
        return line
    try:
        data = json.loads(payload)
    except ValueError:
        return line
    if isinstance(data, dict) and "error" in data and "choices" not in data:
        error = data["error"]
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        _, data = upstream_error(status, data, model=model, route=route)
        return "data: " + json.dumps(data, ensure_ascii=False)
    return "data: " + json.dumps(renamed(data, model), ensure_ascii=False)
