"""HTTP/1.1 on the server's event loop (aiohttp), with the protections a public port needs and
aiohttp leaves to the deployer: a cap on open connections, a time limit on sending a request's
head (a slow sender is dropped, not waited for) and on idling between requests, bounded header
lines and bodies. Used by the REST API and by /metrics."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .config import ServerConfig

MAX_HEADER_LINE = 8190  # bytes of the request line and of each header line (aiohttp's own default)


@dataclass(frozen=True)
class Limits:
    max_connections: int
    head_timeout_s: float  # from connecting, or from the last response, to a request's head
    idle_timeout_s: float  # a kept-alive connection with no request in progress
    max_body_bytes: int


class _Connections:
    """Open connections, the ones waiting for a request first (oldest first), each with a timer
    that drops it when its client takes too long."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: set[asyncio.BaseTransport] = set()
        self.waiting: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def opened(self, transport: asyncio.BaseTransport) -> bool:
        """Admit a connection, dropping the longest-waiting idle one when at the cap (False: every
        connection is busy with a request, so the new one is refused)."""
        if len(self.open) >= self.limits.max_connections:
            if not self.waiting:
                return False
            _abort(next(iter(self.waiting)))
        self.open.add(transport)
        self._wait(transport, self.limits.head_timeout_s)
        return True

    def request_started(self, transport: asyncio.BaseTransport) -> None:
        timer = self.waiting.pop(transport, None)
        if timer is not None:
            timer.cancel()

    def request_ended(self, transport: asyncio.BaseTransport) -> None:
        if transport in self.open:
            self._wait(transport, self.limits.idle_timeout_s)

    def closed(self, transport: asyncio.BaseTransport) -> None:
        self.open.discard(transport)
        self.request_started(transport)

    def _wait(self, transport: asyncio.BaseTransport, seconds: float) -> None:
        self.request_started(transport)
        self.waiting[transport] = asyncio.get_running_loop().call_later(seconds, _abort, transport)


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, admitted and timed by :class:`_Connections`."""

    def __init__(self, inner: asyncio.Protocol, connections: _Connections) -> None:
        self.inner, self.connections = inner, connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.connections.opened(transport):
            _abort(transport)
            return
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport in self.connections.open:
            self.connections.closed(self.transport)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Fallback = Callable[[web.Request, int], Awaitable[web.StreamResponse]]
_CONNECTIONS = web.AppKey("connections", _Connections)


def application(limits: Limits, fallback: Fallback) -> web.Application:
    """An aiohttp application whose requests keep :class:`_Connections` informed, and whose
    unknown paths (404) and methods (405) are answered by ``fallback`` with that status."""

    @web.middleware
    async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
        connections: _Connections = request.app[_CONNECTIONS]
        transport = request.transport
        if transport is not None:
            connections.request_started(transport)
        try:
            try:
                return await handler(request)
            except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as unknown:
                return await fallback(request, unknown.status)
        finally:
            if transport is not None:
                connections.request_ended(transport)

    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[track])
    app[_CONNECTIONS] = _Connections(limits)
    return app


class HttpServer:
    """One aiohttp application listening on one address."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        limits = self.app[_CONNECTIONS].limits
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,  # a client that hangs up stops its request's work
            keepalive_timeout=limits.idle_timeout_s,
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
        )
        await runner.setup()
        self._runner = runner
        loop = asyncio.get_running_loop()
        connections = self.app[_CONNECTIONS]
        self._listener = await loop.create_server(
            lambda: _Guarded(runner.server(), connections),  # type: ignore[misc]
            host.strip("[]") or None,
            port,
            ssl=tls,
            reuse_address=True,
        )
        self.port = self._listener.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """HTTPS with the gRPC port's certificate (and client certificates for mutual TLS)."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(cafile=str(Path(config.tls_client_ca)))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
