"""The HTTP ports' defences against hostile networks ([limits] in the config).

- connections per source address and in total, per listener: over either, the connection gets
  `503 Service Unavailable` and is closed before a byte of it is parsed;
- the handshake timeout is aiohttp's keep-alive timer, which also runs before the first
  request: a client that connects and sends nothing (or trickles its headers) is closed;
- one plain HTTP request may take `http_request_timeout_s` (504), WebSocket upgrades excepted;
- malformed requests (scanners, TLS on the plain port, garbage) are logged as one short line
  per source per minute, never as a traceback that echoes their bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from api.config import LimitsConfig
from telephony.limits import ConnectionGate, SourceLog

log = logging.getLogger(__name__)

REFUSED: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\n"
    b"Content-Length: 0\r\n\r\n"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_timeout(limits: LimitsConfig) -> Any:
    """Middleware: a plain request that takes longer than `http_request_timeout_s` gets 504."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await handler(request)  # streams have their own idle timeout
        async with asyncio.timeout(limits.http_request_timeout_s):
            return await handler(request)

    return middleware


def gate_connections(runner: web.AppRunner, limits: LimitsConfig, name: str) -> ConnectionGate:
    """Count the runner's connections per source; refuse those over `limits` with a 503."""
    server = runner.server
    assert server is not None, "gate_connections after runner.setup()"
    gate = ConnectionGate(limits.connections_per_ip, limits.connections_total)
    refusals = SourceLog(log)
    sources: dict[RequestHandler, str] = {}
    made, lost = server.connection_made, server.connection_lost

    def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "unknown"
        if gate.admit(source):
            sources[handler] = source
        else:
            refusals.warning(
                source,
                "%s port: connection from %s refused (limits.connections_per_ip/_total)",
                name,
                source,
            )
            transport.write(REFUSED)
            # Closed once the handler has started: closing now would end the connection
            # before aiohttp's own start-up, which then fails on it.
            asyncio.get_running_loop().call_soon(transport.close)
        made(handler, transport)

    def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
        source = sources.pop(handler, None)
        if source is not None:
            gate.release(source)
        lost(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]
    quiet_bad_requests()
    return gate


class _BadRequestLines(logging.Filter):
    """aiohttp logs a malformed request at ERROR with a traceback that quotes its bytes: one
    short WARNING line per source per minute instead (the client still gets its 400)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = SourceLog(log)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | ConnectionError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        source = str(args[0]) if args else "unknown"
        if not self.lines.allow(source):
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "malformed HTTP request from %s: %s", (source, type(exc).__name__)
        record.exc_info = record.exc_text = None
        return True


_FILTER: Final = _BadRequestLines()


def quiet_bad_requests() -> None:
    logger = logging.getLogger("aiohttp.server")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
