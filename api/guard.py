"""The HTTP ports' defences against hostile networks ([limits] in the config).

- connections per source address and in total, per listener: over either, the connection gets
  `503 Service Unavailable` and is closed before a byte of it is parsed;
- the handshake timeout is aiohttp's keep-alive timer, which also runs before the first
  request: a client that connects and sends nothing (or trickles its headers) is closed;
- one plain HTTP request may take `http_request_timeout_s` (504), WebSocket upgrades excepted;
- a request body must arrive at `min_body_bytes_per_s` once `body_rate_grace_s` have passed
  (Apache mod_reqtimeout's rule: the grace, plus one second per that many bytes received), or
  the request is answered 408 and its connection closed, on every route that reads a body;
- malformed requests (scanners, TLS on the plain port, garbage) are logged as one short line
  per source per minute, never as a traceback that echoes their bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import StreamReader, web
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
    """Middleware: a plain request that takes longer than `http_request_timeout_s` gets 504;
    one whose body comes slower than `min_body_bytes_per_s` (after the grace) gets 408."""
    slow_log = SourceLog(log)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await handler(request)  # streams have their own idle timeout
        async with asyncio.timeout(limits.http_request_timeout_s):
            if not request.body_exists or limits.min_body_bytes_per_s <= 0:
                return await handler(request)
            return await _at_body_rate(request, handler, limits, slow_log)

    return middleware


class BodyRate:
    """Watches a request body arrive: calls `on_slow` once, at the moment the body is short of
    `grace_s + received / min_rate` seconds' worth; nothing once the whole body is in.

    One timer per request, re-armed at the next moment the rule could fail (not a poll): a
    body that keeps up costs one callback per re-arm, a fast one none at all."""

    def __init__(
        self,
        body: StreamReader,
        grace_s: float,
        min_bytes_per_s: float,
        on_slow: Callable[[], None],
    ) -> None:
        self._body = body
        self._grace_s = grace_s
        self._rate = min_bytes_per_s
        self._on_slow = on_slow
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self._timer = self._loop.call_at(self._deadline(), self._check)

    def _deadline(self) -> float:
        return self._start + self._grace_s + self._body.total_bytes / self._rate

    def _check(self) -> None:
        if self._body.is_eof():  # the whole body has arrived: the handler may take its time
            return
        deadline = self._deadline()
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._check)
        else:
            self._on_slow()

    def cancel(self) -> None:
        self._timer.cancel()


async def _at_body_rate(
    request: web.Request, handler: Handler, limits: LimitsConfig, slow_log: SourceLog
) -> web.StreamResponse:
    """The handler, cancelled with a 408 if its request's body comes too slowly (the way
    `asyncio.timeout` cancels: this task only, and only this cancellation is turned into 408)."""
    task = asyncio.current_task()
    assert task is not None
    too_slow = False

    def expire() -> None:
        nonlocal too_slow
        too_slow = True
        task.cancel()

    watch = BodyRate(request.content, limits.body_rate_grace_s, limits.min_body_bytes_per_s, expire)
    try:
        return await handler(request)
    except asyncio.CancelledError:
        if not too_slow or task.uncancel() > 0:
            raise  # cancelled by something else too (shutdown, the client gone): let it end
    finally:
        watch.cancel()
    source = request.remote or "unknown"
    slow_log.warning(
        source,
        "request body from %s slower than %s bytes/s: 408 (limits.min_body_bytes_per_s)",
        source,
        limits.min_body_bytes_per_s,
    )
    reason = (
        f"the request body came slower than {limits.min_body_bytes_per_s:g} bytes/s "
        f"after {limits.body_rate_grace_s:g} s"
    )
    response = web.json_response({"error": "body_too_slow", "reason": reason}, status=408)
    response.force_close()  # "Connection: close"
    await response.prepare(request)
    await response.write_eof()
    # The rest of the body is not waited for: aiohttp would otherwise read it for up to 10 s
    # more (its lingering close) at the very rate this limit refuses. The transport sends the
    # answer before it closes.
    request.protocol.force_close()
    return response


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
