"""Assemble the aiohttp application and run it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable

from aiohttp import web

from push_service import access_log, admin, api, console, frontdoor
from push_service.broker import Broker
from push_service.config import Settings
from push_service.errors import PushServiceError
from push_service.limits import ACCEPTS_PER_PASS, FILES_HEADROOM, reserve_descriptors
from push_service.node import NODE, Node
from push_service.transports import longpoll, longpoll_relay, websocket_aiohttp

log = logging.getLogger("push_service")

KEEPALIVE_TIMEOUT = 75.0
BACKLOG = 4096


def create_app(settings: Settings, broker: Broker | None = None) -> web.Application:
    node = Node(settings, broker)
    # aiohttp 3.14 keeps an idle keep-alive connection for an hour; 75 s (its former default, and nginx's)
    # frees the socket of a client gone quiet sooner.
    # The access log's middleware is there only when asked for: no cost per request otherwise.
    middlewares = [access_log.middleware] if settings.access_log else []
    app = web.Application(middlewares=[*middlewares, api.errors_and_metrics],
                          handler_args={"access_log": None, "keepalive_timeout": KEEPALIVE_TIMEOUT})
    app[NODE] = node
    api.add_routes(app, node)
    websocket_aiohttp.setup(app, node)
    polling = longpoll.setup(app, node)
    console.setup(app, node)

    async def start(_: web.Application) -> None:
        await node.start()

    async def stop(_: web.Application) -> None:
        await node.stop()

    app.on_startup.append(start)
    admin.setup(app, node)  # after the node's start: its control channel goes over the started broker
    longpoll_relay.setup(polling, app[admin.CONTROL])  # sessions of other nodes, over the control channel
    app[DOOR] = door = Door()
    app.on_shutdown.append(door.close)  # first: no new connection while the open ones are closed
    # on_shutdown runs before aiohttp cancels handlers: sockets get a close frame (1001) first.
    app.on_shutdown.append(stop)
    return app


class Door:
    """The listening socket, with our front door on it: a connection whose first request is a WebSocket
    upgrade or a publish never enters aiohttp (see frontdoor.py); aiohttp's runner keeps the application's
    startup and cleanup. Closed first thing at shutdown, as a site of aiohttp's would be."""

    def __init__(self) -> None:
        self.listener: frontdoor.Listener | None = None
        self.servers: list[asyncio.Server] = []  # the first bound the address; the rest watch its sockets' dups

    async def open(self, runner: web.AppRunner, host: str | None, port: int, reuse_port: bool | None) -> int:
        """Listen (OSError if the address cannot be had); returns the bound port."""
        assert runner.server is not None, "the runner is set up first"
        listener = frontdoor.Listener(runner.app[NODE], runner.server)
        reserve_descriptors(listener.guard.max_connections + FILES_HEADROOM)
        loop, factory = asyncio.get_running_loop(), listener.protocol_factory()
        server = await loop.create_server(factory, host, port, backlog=BACKLOG, reuse_port=reuse_port)
        self.servers.append(server)
        self.listener = listener
        if type(loop).__module__.startswith("uvloop"):  # asyncio's own loop accepts a whole queue per pass
            for listening in server.sockets * (ACCEPTS_PER_PASS - 1):  # dups: one socket, one queue
                self.servers.append(await loop.create_server(
                    factory, sock=socket.socket(fileno=os.dup(listening.fileno())), backlog=BACKLOG))
        return int(server.sockets[0].getsockname()[1]) if server.sockets else port

    async def close(self, _: web.Application | None = None) -> None:
        """Stop accepting; the connections open are aiohttp's (and the node's) to close."""
        for server in self.servers:
            server.close()
        if self.listener is not None:
            self.listener.close()


DOOR = web.AppKey("door", Door)


class ListenError(PushServiceError, OSError):
    """The listening socket could not be opened (address in use, not permitted...)."""


def tune_gc() -> None:
    """Fewer, cheaper collections: startup objects are frozen out of every scan, and the young
    generation grows before a pass, because the default thresholds rescan a server's many long-lived
    objects (sessions, presence metas) over and over (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def start(settings: Settings, reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """The application, listening; returns its runner (cleanup() stops it) and the bound port."""
    runner = web.AppRunner(create_app(settings), handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        port = await runner.app[DOOR].open(runner, settings.host, settings.port, reuse_port or None)
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    return runner, port


async def serve(settings: Settings, announce: Callable[[int], None] | None = None, reuse_port: bool = False) -> None:
    """Run until SIGTERM/SIGINT; `announce` gets the bound port once listening."""
    runner, port = await start(settings, reuse_port)
    app = runner.app
    tune_gc()
    log.info("listening", extra={"event": "listening", "host": settings.host, "port": port,
                                 "config": settings.redacted()})
    if announce is not None:
        announce(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping", extra={"event": "stopping"})
    await app[NODE].drain()
    await runner.cleanup()
    log.info("stopped", extra={"event": "stopped"})
