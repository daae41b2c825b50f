"""A small HTTP proxy for the long-poll tests: it blocks WebSockets and forwards everything else.

It plays the network element that makes phoenix.js fall back to long-poll (a corporate proxy or
load balancer that does not pass WebSocket upgrades), and the load balancer in front of several
nodes (`upstream` can be switched to another node between two requests; given a list, it takes them in
turn, request after request, with no stickiness, and passes over one that refuses the connection, as
nginx's `proxy_next_upstream error`). It can also serve a few static files (the browser test's page and
the phoenix.js bundle).

    websocket="refuse": an upgrade to .../websocket is answered 403 (the client sees an error at once)
    websocket="hang":   an upgrade is accepted by TCP and never answered (the client waits)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "Origin", "Authorization", "X-Phoenix-AuthToken",
                             "X-Phoenix-Longpoll-Token", "Access-Control-Request-Method",
                             "Access-Control-Request-Headers")
DROPPED_RESPONSE_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


class Proxy:
    def __init__(self, upstream: str | list[str], websocket: str = "refuse",
                 static: dict[str, Path] | None = None) -> None:
        assert websocket in ("refuse", "hang")
        # e.g. http://127.0.0.1:4000, or several in turn; may be changed while running
        self.upstreams = [upstream] if isinstance(upstream, str) else list(upstream)
        self._turn = 0
        self.served: list[str] = []  # the upstream of each forwarded request, in order
        self.websocket = websocket
        self.static = static or {}
        self.port = 0
        self.websocket_attempts = 0
        self.forwarded: list[tuple[str, str, int]] = []  # (method, path, upstream status)
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def upstream(self) -> str:
        return self.upstreams[0]

    @upstream.setter
    def upstream(self, value: str) -> None:
        self.upstreams = [value]

    def _order(self) -> list[str]:
        """The upstreams to try for the next request: round-robin, then the others if one refuses."""
        start = self._turn % len(self.upstreams)
        self._turn += 1
        return self.upstreams[start:] + self.upstreams[:start]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Proxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._http = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def __aenter__(self) -> Proxy:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path in self.static:
            path = self.static[request.path]
            content_type = "text/javascript" if path.suffix in (".js", ".mjs") else "text/html"
            return web.Response(body=path.read_bytes(), content_type=content_type)
        if request.path.endswith("/websocket"):
            self.websocket_attempts += 1
            if self.websocket == "hang":
                await asyncio.sleep(3600)  # a proxy that never answers the upgrade: the client's timer must act
            return web.Response(status=403, text="WebSockets are blocked by this proxy")
        assert self._http is not None
        headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
        data = await request.read()
        for target in self._order():
            try:
                async with self._http.request(request.method, target + request.path_qs, headers=headers,
                                              data=data, allow_redirects=False) as upstream:
                    body = await upstream.read()
                    self.forwarded.append((request.method, request.path, upstream.status))
                    self.served.append(target)
                    response = web.Response(status=upstream.status, body=body)
                    for name, value in upstream.headers.items():
                        if name.lower() not in DROPPED_RESPONSE_HEADERS:
                            response.headers[name] = value
                    return response
            except aiohttp.ClientConnectorError:
                continue  # nothing listens there (a node that was killed): the next one
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                break  # cut in the middle of a request: a load balancer answers 502
        return web.Response(status=502, text="no upstream answered")
