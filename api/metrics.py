"""Prometheus metrics on the health port (`/metrics`), one registry per service.

Counters and gauges follow the bus (calls per front end), the engine (slots), the front ends'
rejections (counted by `CallHub` admission) and webhook delivery. Audio dropped by an engine
buffer is added up when each call ends. Every bounded queue on the way out shows what it
dropped: live subscribers (`stt_bridge_live_events_dropped_total`) and the store's write queue
(`stt_bridge_store_events_dropped_total`); webhooks wait on disk (`stt_bridge_webhooks_pending`).
The event loop's own lag (`stt_bridge_event_loop_lag_seconds`) is how long any ready socket
waits to be read: with it under 20 ms, no frame waits longer than a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from api.store import DB_ERRORS, Store
from engine.base import Engine
from telephony.session import BusEvent, CallEnded, CallHub, CallStarted, EventBus

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LOOP_PROBE_S: Final = 0.01


class _Slots(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterable[GaugeMetricFamily]:
        used = self._engine.capacity - self._engine.free_slots
        yield GaugeMetricFamily("stt_bridge_slots_used", "Engine slots in use", value=used)
        yield GaugeMetricFamily(
            "stt_bridge_slots_free", "Engine slots free", value=self._engine.free_slots
        )
        nodes = self._engine.nodes()  # a remote engine's nodes
        if not nodes:
            return
        up = GaugeMetricFamily(
            "stt_bridge_engine_node_up", "Engine node reachable (1) or not (0)", labels=["url"]
        )
        free = GaugeMetricFamily(
            "stt_bridge_engine_node_free_slots", "Engine node slots free", labels=["url"]
        )
        capacity = GaugeMetricFamily(
            "stt_bridge_engine_node_capacity", "Engine node slots", labels=["url"]
        )
        streams = GaugeMetricFamily(
            "stt_bridge_engine_node_streams", "This service's streams on the node", labels=["url"]
        )
        for node in nodes:
            up.add_metric([node.url], 1 if node.reachable else 0)
            free.add_metric([node.url], node.free_slots)
            capacity.add_metric([node.url], node.capacity)
            streams.add_metric([node.url], node.streams)
        yield from (up, free, capacity, streams)


class _Queues(Collector):
    def __init__(self, bus: EventBus, store: Store | None) -> None:
        self._bus = bus
        self._store = store

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily(
            "stt_bridge_live_events_dropped",
            "Events a slow live subscriber (WS /v1/events, /v1/calls/{id}/events) did not get",
            value=self._bus.dropped,
        )
        yield GaugeMetricFamily(
            "stt_bridge_live_subscribers",
            "Live event subscribers",
            value=self._bus.subscriber_count,
        )
        if self._store is None:
            return
        yield CounterMetricFamily(
            "stt_bridge_store_events_dropped",
            "Events not stored because the store's write queue was full",
            value=self._store.dropped,
        )
        yield GaugeMetricFamily(
            "stt_bridge_store_queue_depth",
            "Events waiting for the store's writer",
            value=self._store.queue_depth,
        )
        yield GaugeMetricFamily(
            "stt_bridge_store_available",
            "1 while the store takes writes, 0 while its disk is full or read-only or it is away",
            value=0 if self._store.problem else 1,
        )
        yield CounterMetricFamily(
            "stt_bridge_store_write_errors",
            "Store writes that failed because the database took no writes (then retried)",
            value=self._store.unavailable_errors,
        )
        with contextlib.suppress(*DB_ERRORS):  # the database is away: the rest still shows
            yield GaugeMetricFamily(
                "stt_bridge_webhooks_pending",
                "Webhook deliveries waiting in the outbox",
                value=self._store.pending_webhooks(),
            )


class _Dropped(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(
            "stt_bridge_audio_dropped_seconds",
            "Audio dropped because an engine stream's buffer overflowed (live calls included)",
            value=self._metrics.audio_dropped_s,
        )


class Metrics:
    def __init__(self, hub: CallHub, store: Store | None = None) -> None:
        self.registry = CollectorRegistry()
        self._hub = hub
        self.calls_total = Counter(
            "stt_bridge_calls", "Calls admitted", ["front_end"], registry=self.registry
        )
        self.calls_active = Gauge(
            "stt_bridge_calls_active", "Calls live now", ["front_end"], registry=self.registry
        )
        self.rejections = Counter(
            "stt_bridge_rejections",
            "Calls refused",
            ["front_end", "reason"],
            registry=self.registry,
        )
        self._dropped_ended_s = 0.0  # audio dropped by calls that have ended
        self.step_seconds = Histogram(
            "stt_bridge_engine_step_seconds",
            "Time of one batched engine step",
            buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5),
            registry=self.registry,
        )
        self.webhooks = Counter(
            "stt_bridge_webhook_deliveries", "Webhook attempts", ["result"], registry=self.registry
        )
        self.loop_lag = Histogram(
            "stt_bridge_event_loop_lag_seconds",
            "How late the event loop ran a timer (what a ready socket waits to be read)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.registry.register(_Slots(hub.engine))
        self.registry.register(_Queues(hub.bus, store))
        self.registry.register(_Dropped(self))
        hub.engine.on_step = lambda seconds, _streams: self.step_seconds.observe(seconds)
        hub.bus.add_sink(self.observe)
        hub.on_reject = self.rejected

    def observe(self, event: BusEvent) -> None:
        if isinstance(event, CallStarted):
            self.calls_total.labels(event.front_end).inc()
            self.calls_active.labels(event.front_end).inc()
        elif isinstance(event, CallEnded):
            self.calls_active.labels(event.front_end).dec()
            self._dropped_ended_s += event.dropped_s

    @property
    def audio_dropped_s(self) -> float:
        """Audio engine buffers dropped: ended calls, and live ones as it happens."""
        live = sum(
            leg.stream.stats.samples_dropped / leg.stream.sample_rate
            for call in list(self._hub.calls.values())
            for leg in list(call.legs.values())
        )
        return self._dropped_ended_s + live

    async def watch_loop(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: samples the loop's lag while the app runs."""
        task = asyncio.get_running_loop().create_task(self._watch_loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LOOP_PROBE_S)
            self.loop_lag.observe(max(0.0, loop.time() - start - LOOP_PROBE_S))

    def rejected(self, front_end: str, reason: str) -> None:
        self.rejections.labels(front_end, reason).inc()

    def webhook_result(self, ok: bool) -> None:
        self.webhooks.labels("delivered" if ok else "failed").inc()

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type": CONTENT_TYPE},
        )
