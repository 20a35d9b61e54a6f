"""The event bus: what every leg's engine events and every call's start and end become, and
how they fan out. Publishing never waits: the store and metrics are synchronous sinks that must
not block, live subscribers (`WS /v1/events`, webhooks' relay) each get a bounded queue and only
a slow one loses its own events."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.base import EngineEvent, event_to_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallStarted:
    call_id: str
    front_end: str
    legs: tuple[str, ...]
    labels: Mapping[str, str]
    at: float  # wall clock, seconds since the epoch
    redaction: tuple[str, ...] = ()  # the kinds redacted from every leg (the store keeps them)


@dataclass(frozen=True)
class LegEvent:
    call_id: str
    leg: str
    event: EngineEvent


@dataclass(frozen=True)
class CallEnded:
    call_id: str
    front_end: str
    reason: str
    at: float
    audio_s: Mapping[str, float]  # seconds of audio received per leg
    dropped_s: float = 0.0  # audio an engine buffer overflow dropped, all legs


@dataclass(frozen=True)
class DtmfPressed:
    """A key the caller pressed (AudioSocket DTMF, RFC 4733, Twilio dtmf)."""

    call_id: str
    leg: str
    digit: str
    at_s: float  # seconds of that leg's audio


@dataclass(frozen=True)
class AudioDropped:
    """A leg's engine fell behind and its buffer dropped the oldest audio (a real-time phone
    leg cannot wait). At most one per leg per `DROP_NOTICE_EVERY_S`; the call's total is in
    `CallEnded.dropped_s`. Times of later words still count the lost seconds."""

    call_id: str
    leg: str
    at_s: float  # seconds of that leg's audio when it was noticed
    dropped_s: float  # all that leg has lost so far


BusEvent = CallStarted | LegEvent | CallEnded | DtmfPressed | AudioDropped
DROP_NOTICE_EVERY_S = 1.0


def bus_event_to_json(event: BusEvent) -> dict[str, Any]:
    if isinstance(event, CallStarted):
        return {
            "type": "call_started",
            "call_id": event.call_id,
            "front_end": event.front_end,
            "legs": list(event.legs),
            "labels": dict(event.labels),
            "at": event.at,
            "redaction": list(event.redaction),
        }
    if isinstance(event, CallEnded):
        return {
            "type": "call_ended",
            "call_id": event.call_id,
            "front_end": event.front_end,
            "reason": event.reason,
            "at": event.at,
            "audio_s": dict(event.audio_s),
            "dropped_s": round(event.dropped_s, 3),
        }
    if isinstance(event, AudioDropped):
        return {
            "type": "audio_dropped",
            "call_id": event.call_id,
            "leg": event.leg,
            "at": round(event.at_s, 3),
            "dropped_s": round(event.dropped_s, 3),
        }
    if isinstance(event, DtmfPressed):
        return {
            "type": "dtmf",
            "call_id": event.call_id,
            "leg": event.leg,
            "digit": event.digit,
            "at": round(event.at_s, 3),
        }
    return {"call_id": event.call_id, "leg": event.leg, **event_to_json(event.event)}


class Subscription:
    """A bounded queue of bus events for one consumer; overflow drops the newest and counts."""

    def __init__(self, bus: EventBus, maxsize: int, call_id: str | None) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[BusEvent] = asyncio.Queue(maxsize)
        self.call_id = call_id
        self.dropped = 0

    def offer(self, event: BusEvent) -> None:
        if self.call_id is not None and event.call_id != self.call_id:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self._bus.dropped += 1

    async def get(self) -> BusEvent:
        return await self._queue.get()

    def __aiter__(self) -> AsyncIterator[BusEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[BusEvent]:
        while True:
            yield await self._queue.get()

    def close(self) -> None:
        self._bus._subscriptions.discard(self)


class EventBus:
    """Fan-out of call events. Publishing never waits: a slow consumer only loses its own events."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._sinks: list[Callable[[BusEvent], None]] = []
        self.dropped = 0  # events lost by slow subscribers, all of them together (metrics)

    def subscribe(self, maxsize: int = 1000, call_id: str | None = None) -> Subscription:
        sub = Subscription(self, maxsize, call_id)
        self._subscriptions.add(sub)
        return sub

    def add_sink(self, sink: Callable[[BusEvent], None]) -> None:
        """A synchronous consumer that sees every event (store, metrics); it must not block."""
        self._sinks.append(sink)

    def publish(self, event: BusEvent) -> None:
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                log.exception("event sink failed", extra={"call_id": event.call_id})
        for sub in list(self._subscriptions):
            sub.offer(event)

    def relay(self, event: BusEvent) -> None:
        """Another node's event (api/cluster.py): to live subscribers only; that node stored
        and counted it."""
        for sub in list(self._subscriptions):
            sub.offer(event)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)
