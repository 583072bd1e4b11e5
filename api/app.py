"""The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, and /health.

`create_app()` with no arguments is uvicorn's factory (`chorus api`): it reads the config dir and the
API settings from the environment and builds the one front door (`Chorus`: registry, memory guard, pool)
the app shares across requests; its llama-servers are stopped when the app shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import catalog
from api.admission import Admission
from api.errors import BodyTooLarge, TooManyRuns, Unauthorized, error_body, invalid_body, status_of
from api.forward import EventStream, forward
from api.hosts import HostCheck
from api.mapping import conversation, prompt_question
from api.proxy import ModelProxy, Route
from api.runs import GONE, PipelineRuns, answer, stream
from api.schemas import ChatRequest, CompletionFields, CompletionRequest
from api.settings import ApiSettings
from api.shutdown import watching_stop_signals
from api.stream import Chunks, Kind
from orchestrator.app import Chorus
from orchestrator.config.hosts import HostPolicy
from orchestrator.engine.backend import Backend
from orchestrator.errors import ChorusError

log = logging.getLogger("chorus.api")


class BodyLimit:
    """Refuses a request body over `max_bytes` (413) before the app reads any of it into a model."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        body = bytearray()
        while True:  # read it all here, bounded, then replay it to the app
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later: the disconnect, which cancels a run

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = BodyTooLarge(self.max_bytes)
        await JSONResponse(error_body(exc), status_code=status_of(exc).http)(scope, receive, send)


def error_response(exc: BaseException) -> JSONResponse:
    status = status_of(exc)
    headers = {"Retry-After": str(exc.retry_after_s if isinstance(exc, TooManyRuns) else 1)} \
        if status.http == 429 else {}
    if status.http == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc), status_code=status.http, headers=headers)


def create_app(chorus: Chorus | None = None, settings: ApiSettings | None = None, *,
               backend_factory: Callable[[], Backend] | None = None, proxy: ModelProxy | None = None) -> FastAPI:
    """The app over `chorus` (default: the config dir's; then closed with the app).

    `backend_factory` replaces the real backend of pipeline runs (tests: FakeBackend); `proxy` the model
    proxy (tests: one over a mock transport).
    """
    settings = settings or ApiSettings.from_env()
    owned = chorus is None
    door = chorus or Chorus.from_dir(None)
    config = door.config
    limiter = Admission(settings.max_runs, settings.max_queue)
    door.expect_runs(settings.max_runs)  # servers get the slots to batch the runs that go at once
    runs = PipelineRuns(door, limiter, backend_factory=backend_factory)
    model_proxy = proxy or ModelProxy(door)

    def cancel_runs() -> None:
        for token in list(runs.tokens):
            token.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            async with watching_stop_signals(_app.state, on_stop=cancel_runs):  # streams end, runs stop
                yield
        finally:
            await runs.shutdown()
            await model_proxy.aclose()
            if owned:
                await asyncio.to_thread(door.close)  # stops the pool's llama-servers

    async def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise Unauthorized("missing or wrong API key", hint="Send the header 'Authorization: Bearer <key>'.")

    app = FastAPI(title="chorus", description="Every chorus pipeline and model behind the OpenAI API.",
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    allowed = settings.allowed_hosts if settings.allowed_hosts is not None else config.app.api.allowed_hosts
    app.add_middleware(HostCheck, policy=HostPolicy.for_bind(settings.host, allowed))  # outermost: first to run
    app.state.chorus, app.state.runs, app.state.limiter = door, runs, limiter

    @app.exception_handler(ChorusError)
    async def on_chorus_error(_request: Request, exc: ChorusError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        status, body = invalid_body(list(exc.errors()))
        return JSONResponse(body, status_code=status)

    @app.exception_handler(HTTPException)
    async def on_http(_request: Request, exc: HTTPException) -> JSONResponse:
        cause = exc.__cause__
        if exc.status_code == 400 and isinstance(cause, ValueError):  # FastAPI: a body it could not decode
            why = (f"it is not UTF-8 (byte {cause.object[cause.start]:#04x} at offset {cause.start})"
                   if isinstance(cause, UnicodeDecodeError) else str(cause)[:200])
            body = {"error": {"message": f"the request body is not valid JSON: {why}", "type": "invalid_request_error",
                              "param": None, "code": "invalid_json"}}
            return JSONResponse(body, status_code=400)
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                          "code": f"http_{exc.status_code}"}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = {"error": {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error",
                          "param": None, "code": "internal_error"}}
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "runs": limiter.going, "max_runs": limiter.limit, "queued": limiter.waiting,
                "max_queue": limiter.queue, "refused": limiter.refused}

    started_at = int(time.time())  # `created` of an entry whose file cannot be read: stable while the API runs

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [m.to_dict(catalog.created(m, config, started_at))
                                           for m in catalog.list_models(door)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def model(model_id: str) -> dict[str, Any]:
        entry = catalog.resolve(door, model_id)
        return entry.to_dict(catalog.created(entry, config, started_at))

    async def complete(request: Request, body: CompletionFields, kind: Kind, route: Route,
                       question: Callable[[], tuple[str, list[dict[str, str]]]]) -> Response:
        entry = catalog.resolve(door, body.model)
        if isinstance(entry, catalog.RegisteredModel):
            return await forward(request, model_proxy, limiter, entry.id, route, body)
        text, history = question()
        started = await runs.start(entry, body, text, history, request)
        if started is None:  # the client left while it waited for a place
            return Response(status_code=GONE)
        chunks = Chunks(kind, body.model)
        if not body.stream:
            return await answer(request, started, chunks)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        headers = {"X-Chorus-Session": started.session_id} if started.session_id else {}
        return EventStream(stream(started, chunks, include_usage=include_usage, heartbeat_s=settings.heartbeat_s),
                           headers=headers)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await complete(request, body, "chat", "chat/completions", lambda: conversation(body))

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await complete(request, body, "text", "completions", lambda: (prompt_question(body), []))

    return app
