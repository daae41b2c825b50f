"""The socket path's requests that aiohttp parsed: upgrades that are not their connection's first request
(aiohttp's client, for one, upgrades pooled keep-alive connections). The front door (frontdoor.py) takes
every first request; these get the same checks and the same WebSocketProtocol (transports/websocket.py).
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from push_service.api import json_response
from push_service.limits import taken_over
from push_service.transports.admission import Admission
from push_service.transports.handshake import (PATH, UPGRADE_REQUIRED_HEADERS, AskBackend, Refusal, admit, ask_backend,
                                               is_upgrade, refused, version_refusal, wrong_version)
from push_service.transports.websocket import WebSocketProtocol, open_socket


def setup(app: web.Application, admission: Admission) -> None:
    """Serve the socket path's requests that aiohttp parsed (the front door takes the rest)."""

    async def handle_request(request: web.Request) -> web.StreamResponse:
        return await handle(admission, request)

    app.router.add_get(PATH, handle_request)


async def handle(admission: Admission, request: web.Request) -> web.StreamResponse:
    """The socket path as aiohttp sees it: requests the front door did not take. A well-formed upgrade
    here is not its connection's first request (aiohttp's client, for one, upgrades pooled keep-alive
    connections): the connection is taken over from aiohttp all the same, and this handler waits
    until the socket closes."""
    if wrong_version(request.headers.get):
        refusal = version_refusal(admission)
        return web.Response(status=426, body=orjson.dumps({"error": refusal.message}), content_type="application/json",
                            headers=UPGRADE_REQUIRED_HEADERS)
    try:
        identity, serializer = admit(admission, request.headers.get("Origin"), request.query.get("vsn"),
                                     request.headers.get("Sec-WebSocket-Protocol"), request.query.get("token"))
    except Refusal as refusal:
        return json_response({"error": refusal.message}, refusal.status)
    except AskBackend as ask:
        try:
            identity = await ask_backend(admission, ask.token, WebSocketProtocol.transport_name,
                                         request.remote or "", request.headers.get)
        except Refusal as refusal:
            return json_response({"error": refusal.message}, refusal.status)
        serializer = ask.serializer
    transport, http = request.transport, request.protocol
    if not is_upgrade(request.headers.get) or transport is None:
        not_websocket = Refusal(400, "not_websocket", "expected a WebSocket upgrade request")
        refused(admission, not_websocket)
        return json_response({"error": not_websocket.message}, not_websocket.status)
    http.keep_alive(False)  # no keep-alive timer of aiohttp's may close the socket later
    # What the client sent behind its request head, which the connection's wrapper kept aside.
    rest = taken_over(transport)
    if rest is None:
        too_early = Refusal(400, "not_websocket", "too much data sent before the upgrade was answered")
        refused(admission, too_early)
        response = json_response({"error": too_early.message}, too_early.status)
        response.force_close()
        return response
    lost = asyncio.get_running_loop().create_future()
    headers = request.headers

    def header(name: str) -> str | None:  # repeated headers joined, as the front door's parser does
        return ", ".join(headers.getall(name)) if name in headers else None

    open_socket(admission, transport, header, identity, serializer, rest, lost)
    transport.resume_reading()  # in case aiohttp paused it while the tail grew
    await lost
    # aiohttp still thinks it owns the connection: tell it the connection is gone (its answer to this
    # request is never written; 101 is what the request metric should say).
    http.connection_lost(None)
    return web.Response(status=101)
