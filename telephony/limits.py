"""Hostile input and hostile networks: what every front end shares to survive them.

- `parse_json`: JSON text from the wire, bounded in nesting (100 000 `[` is a ValueError, not a
  RecursionError) and without NaN/Infinity, which no peer sends honestly. orjson parses it,
  the standard library what orjson refuses.
- `clean_label`: text that reaches the store and the logs: no lone surrogate (it cannot be
  encoded), no NUL or control character, bounded in length.
- `SourceLog`: one log line per source per minute, so a flood cannot fill the disk.
- `ConnectionGate`: open connections per source address and in total, per listener.
- `open_websocket` / `messages`: a WebSocket with the configured message size, closed with 1008
  when the client sends nothing (or trickles one frame) for `idle_timeout_s`.

The limits themselves are `api.config.LimitsConfig` ([limits] in the config file).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final

import orjson
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from telephony.config import LimitsConfig
from telephony.direct_ws import DIRECT_SUPPORTED, DirectHandler, DirectWebSocket

LIMITS: Final = web.AppKey("limits", LimitsConfig)
MAX_JSON_DEPTH: Final = 64
LABEL_MAX_CHARS: Final = 1024
LABEL_KEY_MAX_CHARS: Final = 64
LABELS_MAX: Final = 64
CALL_ID_MAX_CHARS: Final = 256


class JsonTooDeep(ValueError):
    """JSON nested deeper than `MAX_JSON_DEPTH`."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# One decoder for every message: `json.loads` with an argument builds a new one per call, which
# cost more than the parse itself (Twilio media, 388 bytes: 12.7 µs against 4.0 µs).
_DECODER: Final = json.JSONDecoder(parse_constant=_no_constant)


def _depth_over(text: str, limit: int) -> bool:
    """True when brackets nest deeper than `limit` (strings skipped); cheap when there are few."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def parse_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads` for wire input: raises ValueError (never RecursionError/OverflowError)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if _depth_over(text, max_depth):
        raise JsonTooDeep(f"JSON nested deeper than {max_depth} levels")
    # orjson is four times faster (a Twilio media message, 393 bytes: 1.0 µs against 4.4 µs,
    # one every 20 ms per call). It refuses some text the standard library reads (escaped lone
    # surrogates, numbers beyond a double), which then gets the standard library's answer: the
    # same value or error as before, except integers over 64 bits, which come out as floats.
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise JsonTooDeep("JSON nested too deeply") from None


def clean_label(value: object, max_chars: int = LABEL_MAX_CHARS) -> str:
    """A string the store, PostgreSQL, JSON and a terminal all accept."""
    text = value if isinstance(value, str) else str(value)
    text = text[: max_chars * 2].encode("utf-8", "replace").decode("utf-8")  # lone surrogates
    return "".join(c if c.isprintable() else "\ufffd" for c in text)[:max_chars]


def clean_labels(labels: Mapping[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in list(labels.items())[:LABELS_MAX]:
        out[clean_label(key, LABEL_KEY_MAX_CHARS)] = clean_label(value)
    return out


class SourceLog:
    """At most one line per source (address) per `every_s`; the lines skipped are counted."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0, sources: int = 10_000):
        self._logger = logger
        self._every_s = every_s
        self._sources = sources
        self._last: dict[str, float] = {}
        self.skipped = 0

    def allow(self, source: str) -> bool:
        now = time.monotonic()
        last = self._last.get(source)
        if last is not None and now - last < self._every_s:
            self.skipped += 1
            return False
        if len(self._last) >= self._sources:  # a spoofed-source flood: forget the oldest half
            for old in sorted(self._last, key=self._last.__getitem__)[: self._sources // 2]:
                del self._last[old]
        self._last[source] = now
        return True

    def warning(self, source: str, message: str, *args: object) -> None:
        if self.allow(source):
            self._logger.warning(message, *args, extra={"remote": source})


class ConnectionGate:
    """Open connections of one listener, per source address and in total."""

    def __init__(self, per_ip: int, total: int) -> None:
        self.per_ip = per_ip
        self.total = total
        self.open: dict[str, int] = {}
        self.count = 0
        self.refused = 0

    def admit(self, source: str) -> bool:
        if self.count >= self.total or self.open.get(source, 0) >= self.per_ip:
            self.refused += 1
            return False
        self.open[source] = self.open.get(source, 0) + 1
        self.count += 1
        return True

    def release(self, source: str) -> None:
        left = self.open.get(source, 0) - 1
        if left > 0:
            self.open[source] = left
        else:
            self.open.pop(source, None)
        self.count -= 1


class RateLimit:
    """A token bucket per source: `per_s` on average, bursts of up to `burst`."""

    def __init__(self, per_s: float, burst: float | None = None, sources: int = 10_000) -> None:
        self.per_s = per_s
        self.burst = max(1.0, per_s if burst is None else burst)
        self._sources = sources
        self._buckets: dict[str, tuple[float, float]] = {}
        self.refused = 0

    def allow(self, source: str) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.per_s)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            self.refused += 1
            return False
        if len(self._buckets) >= self._sources and source not in self._buckets:
            self._buckets.clear()  # a spoofed-source flood: start over rather than grow
        self._buckets[source] = (tokens - 1.0, now)
        return True


def limits_of(request: web.Request) -> LimitsConfig:
    return request.app.get(LIMITS) or LimitsConfig()


HEARTBEAT_S: Final = 30.0


def heartbeat_for(request: web.Request, read_by_messages: bool) -> float | None:
    """aiohttp's ping heartbeat, or None where `messages` watches the client already.

    A connection read through `messages` is closed once silent for `idle_timeout_s`, which
    finds a dead peer as a ping would. The heartbeat re-arms a timer after every message
    received (a loop callback per 20 ms audio frame: 3-4 % of the server at 200 calls), so
    audio connections go without it.
    """
    if read_by_messages and limits_of(request).idle_timeout_s > 0:
        return None
    return HEARTBEAT_S


def open_websocket(
    request: web.Request,
    protocols: tuple[str, ...] = (),
    max_msg_size: int | None = None,
    read_by_messages: bool = False,
) -> web.WebSocketResponse:
    """A WebSocketResponse with the configured message size (over it: close 1009).
    `read_by_messages`: the handler reads it through `messages` (see `heartbeat_for`), which
    may then hand messages to a `direct` function as they are parsed (telephony/direct_ws.py)."""
    limits = limits_of(request)
    size = limits.websocket_max_message_bytes if max_msg_size is None else max_msg_size
    heartbeat = heartbeat_for(request, read_by_messages)
    kind = DirectWebSocket if read_by_messages and DIRECT_SUPPORTED else web.WebSocketResponse
    return kind(protocols=protocols, heartbeat=heartbeat, max_msg_size=size)


async def messages(
    ws: web.WebSocketResponse,
    request: web.Request,
    idle_s: float | None = None,
    on_idle: Callable[[], Awaitable[None]] | None = None,
    direct: DirectHandler | None = None,
) -> AsyncIterator[WSMessage]:
    """`async for msg in ws`, except that a client silent for `idle_timeout_s` (a whole
    message must arrive in that time: trickling one frame does not count) is closed with 1008.
    A protocol with its own idle rule passes `idle_s` and `on_idle` (which closes the socket
    its own way); iteration then ends as for any close.

    One watchdog per connection checks the time of the last whole message, waking once per
    `idle_timeout_s`: a timeout around every `receive` cost 6 % of the server's time at
    100 calls (py-spy), an audio frame being a message every 20 ms.

    `direct(msg)`, on a socket from `open_websocket(read_by_messages=True)`, is offered each
    message as it is parsed while this loop waits with nothing queued (telephony/direct_ws.py):
    True when it handled it, False to have it yielded here in order. It must do exactly what
    the loop body does with such a message: on an aiohttp without the hook every message is
    yielded. What it raises is raised here, in place of that message.
    """
    loop = asyncio.get_running_loop()
    if idle_s is None:
        idle_s = limits_of(request).idle_timeout_s
    last = loop.time()
    # The handler is at work on a message (waiting for room in the engine's buffer: the client
    # is slowed, not silent): the time until it reads again is not the client's idleness.
    busy = False

    async def watch() -> None:
        assert idle_s is not None
        while not ws.closed:
            wait = last + idle_s - loop.time()
            if wait <= 0 and busy:
                wait = idle_s  # looked at again once the handler reads
            elif wait <= 0:
                if on_idle is not None:
                    await on_idle()
                else:
                    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"idle timeout")
                return
            await asyncio.sleep(wait)

    # Without a `direct` function (or without the hook) this is the plain loop.
    queue = ws.direct_queue if direct is not None and isinstance(ws, DirectWebSocket) else None
    if queue is not None:
        assert direct is not None

        def handled(msg: WSMessage) -> bool:
            nonlocal last
            if direct(msg):
                last = loop.time()
                return True
            return False

        queue.direct = handled

    watchdog = loop.create_task(watch()) if idle_s > 0 else None
    try:
        while True:
            if queue is None:
                msg = await ws.receive()
            else:
                queue.waiting = True
                try:
                    msg = await ws.receive()
                finally:
                    queue.waiting = False
                if queue.error is not None:
                    error, queue.error = queue.error, None
                    raise error
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            busy = True
            yield msg
            busy = False
            last = loop.time()
    finally:
        if queue is not None:
            queue.direct = None
        if watchdog is not None:
            watchdog.cancel()
