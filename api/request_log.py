"""One `request` log line per HTTP request, when its response has ended (for a stream:
when the stream has): method, route template, status, duration, bytes sent, the caller's
key id (never the key) and the job id when the request is about a job.

A pure ASGI middleware installed outside `AuthMiddleware`, so it sees the principal the
latter puts in the scope, and the 401s it answers. `GET /health` and `/metrics` (polled by
probes and scrapers) are logged at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import PUBLIC_PATHS, SCOPE_KEY, Principal
from api.metrics import METRICS_PATHS
from common.logs import log_event

log = logging.getLogger("api.requests")
QUIET_PATHS = PUBLIC_PATHS | METRICS_PATHS
# The status logged for a request whose client left before any response was sent.
CLIENT_CLOSED = 499


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = {"status": None, "job_id": None, "bytes": 0}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                for name, value in message.get("headers") or []:
                    if name.lower() == b"x-request-id":
                        state["job_id"] = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
            await send(message)

        outcome = "ok"
        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            outcome = "client_disconnected"
            raise
        except BaseException:
            outcome = "error"
            raise
        finally:
            self._log(scope, state, outcome, time.perf_counter() - started)

    @staticmethod
    def _log(scope: Scope, state: dict[str, Any], outcome: str, duration: float) -> None:
        path = get_route_path(scope)
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        if not log.isEnabledFor(level):
            return
        route = scope.get("route")
        template = getattr(route, "path", None)
        principal = scope.get(SCOPE_KEY)
        status = state["status"]
        if status is None:
            status = CLIENT_CLOSED if outcome == "client_disconnected" else 500
        job_id = state["job_id"] or (scope.get("path_params") or {}).get("completion_id")
        log_event(
            log,
            "request",
            level=level,
            job_id=job_id,
            method=scope.get("method"),
            # The route's template (`/v1/chat/completions/{completion_id}`); unrouted: the path.
            route=template or path[:200],
            status=status,
            duration_s=duration,
            bytes=state["bytes"],
            key_id=(principal.key_id or None) if isinstance(principal, Principal) else None,
            admin=True if isinstance(principal, Principal) and principal.admin else None,
            outcome=None if outcome == "ok" else outcome,
        )
