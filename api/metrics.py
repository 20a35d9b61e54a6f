"""Prometheus metrics on the health port (`/metrics`), one registry per service.

Counters and gauges follow the bus (calls per front end), the engine (slots), the front ends'
rejections (counted by `CallHub` admission) and webhook delivery. Audio dropped by an engine
buffer is added up when each call ends.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.base import Engine
from telephony.session import BusEvent, CallEnded, CallHub, CallStarted

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class _Slots(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterable[GaugeMetricFamily]:
        used = self._engine.capacity - self._engine.free_slots
        yield GaugeMetricFamily("stt_bridge_slots_used", "Engine slots in use", value=used)
        yield GaugeMetricFamily(
            "stt_bridge_slots_free", "Engine slots free", value=self._engine.free_slots
        )


class Metrics:
    def __init__(self, hub: CallHub) -> None:
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
        self.audio_dropped = Counter(
            "stt_bridge_audio_dropped_seconds",
            "Audio dropped because an engine stream's buffer overflowed",
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "stt_bridge_engine_step_seconds",
            "Time of one batched engine step",
            buckets=(0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5),
            registry=self.registry,
        )
        self.webhooks = Counter(
            "stt_bridge_webhook_deliveries", "Webhook attempts", ["result"], registry=self.registry
        )
        self.registry.register(_Slots(hub.engine))
        hub.bus.add_sink(self.observe)
        hub.on_reject = self.rejected

    def observe(self, event: BusEvent) -> None:
        if isinstance(event, CallStarted):
            self.calls_total.labels(event.front_end).inc()
            self.calls_active.labels(event.front_end).inc()
        elif isinstance(event, CallEnded):
            self.calls_active.labels(event.front_end).dec()
            self.audio_dropped.inc(event.dropped_s)

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
