"""Hostile input and hostile networks: what every front end shares to survive them.

- `parse_json`: JSON text from the wire, bounded in nesting (100 000 `[` is a ValueError, not a
  RecursionError) and without NaN/Infinity, which no peer sends honestly. orjson parses it,
  the standard library what orjson refuses.
- `clean_label`: text that reaches the store and the logs: no lone surrogate (it cannot be
  encoded), no NUL or control character, bounded in length.
- `SourceLog`: one log line per source per minute, so a flood cannot fill the disk.
- `ConnectionGate`: open connections per source address and in total, per listener.

The WebSocket a front end reads (message size, idle timeout) is telephony/ws_front.py's.
The limits themselves are `api.config.LimitsConfig` ([limits] in the config file).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from telephony.config import LimitsConfig

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
