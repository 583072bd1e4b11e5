"""The DNS-rebinding guard: a request whose `Host:` the policy does not allow gets 403 before any route runs.

The policy (orchestrator/config/hosts.py) comes from where the API listens and `api.allowed_hosts`.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import HostNotAllowed, error_body, status_of
from orchestrator.config.hosts import HostPolicy


class HostCheck:
    """Outermost middleware: /health and every /v1 route answer only hosts the policy allows."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.policy.names is None:
            await self.app(scope, receive, send)
            return
        values = [v for k, v in scope.get("headers") or [] if k == b"host"]
        header = values[0].decode("latin-1") if len(values) == 1 else None  # none, or two: refused
        if self.policy.allows(header):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        exc = HostNotAllowed(header, self.policy.describe())
        await JSONResponse(error_body(exc), status_code=status_of(exc).http)(scope, receive, send)
