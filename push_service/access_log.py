"""PUSH_ACCESS_LOG=on: one line per HTTP request, from aiohttp (a middleware, added only when on) and from
the front door (publishes and WebSocket upgrades, behind one boolean check).

Only the path is written, never the query string (client tokens travel in it) nor any header (the
publish key travels in Authorization).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger("push_service.access")
# Written whatever PUSH_LOG_LEVEL says: asking for an access log is asking for these lines.
log.setLevel(logging.INFO)
# The status a request counts as when its client left before the answer (nginx's convention).
CLIENT_CLOSED = 499


def remote_address(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None


def write(method: str, path: str, status: int, started: float, remote: str | None, size: int) -> None:
    """One request's line; `started` is its time.time() on arrival."""
    log.info("request", extra={"event": "http_access", "method": method, "path": path, "status": status,
                               "duration_ms": round((time.time() - started) * 1000, 3), "remote": remote,
                               "bytes": size})


@web.middleware
async def middleware(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Outermost: the answer as sent, errors already made JSON by api.errors_and_metrics."""
    started, remote = time.time(), remote_address(request.transport)  # the transport is gone after a WebSocket
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        write(request.method, request.path, CLIENT_CLOSED, started, remote, 0)
        raise
    # A prepared response (a WebSocket's, a stream's) has counted what it sent; an unsent one is its body.
    size = response.body_length if response.prepared else (response.content_length or 0)
    write(request.method, request.path, response.status, started, remote, size)
    return response
