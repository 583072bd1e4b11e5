"""Ending open streams properly when `chorus api` is told to stop (SIGTERM, SIGINT, SIGHUP).

On a stop signal uvicorn waits for open responses up to its graceful timeout, then cancels them: a stream
still going ended with a 55-line "Exception in ASGI application" traceback in the log, and the client saw
its connection drop without a word. So the app watches the same signals (passing each on to the handler it
replaced, uvicorn's) and on the first one ends every open stream at once with an error chunk and `[DONE]`,
and cancels the runs behind them, which record how they ended. uvicorn then has nothing left to cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

from api.errors import ApiError, error_body
from api.stream import DONE, sse

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class ShuttingDown(ApiError):
    """The API is stopping: what a stream still open gets as its last chunk."""

    def __init__(self) -> None:
        super().__init__("chorus api is shutting down: this answer was cut short and its run cancelled",
                         hint="Send the request again once the API is back.")


class StopWatch:
    """`stopping` is set on the first stop signal; the handlers it wraps still run, in the same order."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Wrap the stop signals' handlers; False where signals cannot be handled (not the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            self._previous[sig] = previous
            signal.signal(sig, self._handler(loop, previous))
        return True

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handler(self, loop: asyncio.AbstractEventLoop, previous: Any) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing is streaming any more
                loop.call_soon_threadsafe(self.stopping.set)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:  # nobody else handles it: do what the signal would have done
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
        return handler


@contextlib.asynccontextmanager
async def watching_stop_signals(state: Any, on_stop: Callable[[], None]) -> AsyncIterator[StopWatch]:
    """For the app's lifespan: `state.stopping` for the streams, and `on_stop()` once a stop signal comes."""
    watch = StopWatch()
    watch.install()
    state.stopping = watch.stopping

    async def call_on_stop() -> None:
        await watch.stopping.wait()
        on_stop()

    waiter = asyncio.ensure_future(call_on_stop())
    try:
        yield watch
    finally:
        waiter.cancel()
        watch.restore()


async def stream_until_stopped(response: StreamingResponse, send: Send, stopping: asyncio.Event) -> None:
    """`StreamingResponse.stream_response`, ended early with an error chunk and `[DONE]` once `stopping` is set.

    The pending read of the body is cancelled, so the body's generator runs its `finally` (a pipeline
    stream cancels its run there, a forwarded one lets go of its llama-server). So it is when this is
    cancelled itself (the client left): a read left running would keep the generator running, closing it
    would fail, and its `finally` would wait for the garbage collector, the run's place held until then.
    """
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    chunks = aiter(response.body_iterator)
    stop = asyncio.ensure_future(stopping.wait())
    following: asyncio.Future[Any] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(chunks))
            await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                await asyncio.wait({following})
                for last in (sse(error_body(ShuttingDown())), DONE):
                    await send({"type": "http.response.body", "body": last.encode(), "more_body": True})
                break
            try:
                chunk = following.result()
            except StopAsyncIteration:
                break
            body = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(response.charset)
            await send({"type": "http.response.body", "body": body, "more_body": True})
    finally:
        stop.cancel()
        if following is not None and not following.done():
            following.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({following})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
