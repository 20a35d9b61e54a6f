"""Prometheus metrics on the health port (`/metrics`), one registry per service.

Counters and gauges follow the bus (calls per front end), the engine (slots), the front ends'
rejections (counted by `CallHub` admission) and webhook delivery. Audio dropped by an engine
buffer is added up when each call ends. Every bounded queue on the way out shows what it
dropped: live subscribers (`stt_bridge_live_events_dropped_total`) and the store's write queue
(`stt_bridge_store_events_dropped_total`); webhooks wait on disk (`stt_bridge_webhooks_pending`),
and those whose attempts ran out stay there dead-lettered (`stt_bridge_webhooks_failed`).
The event loop's own lag (`stt_bridge_event_loop_lag_seconds`) is how long any ready socket
waits to be read: with it under 20 ms, no frame waits longer than a frame.

With workers (api/workers.py) `/metrics`, whichever worker answers, is the node's: every
process keeps its counters, gauges and histograms in prometheus_client's multiprocess files
(the supervisor sets PROMETHEUS_MULTIPROC_DIR for each), summed when read; a dead worker's
counters still count, its live gauges do not. The figures read from other objects (the
collectors below) are copied there every `MIRROR_S`; what every worker sees alike (the engine
processes' slots, the one outbox) is said once, by the worker that answers (`serve_node`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Final, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api.store import DB_ERRORS, Store
from engine.base import Engine
from telephony.bus import BusEvent, CallEnded, CallStarted, EventBus
from telephony.call import CallHub

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LOOP_PROBE_S: Final = 0.01
MIRROR_S: Final = 0.5  # with workers: how often a worker's collected figures reach the node's
STEP_BUCKETS: Final = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2, 0.5)

# With workers, the engine figures every worker sees alike when its engine is the engine
# processes (or any remote nodes): said once, not summed. Without nodes (`sink` in each worker)
# each worker's own slots add up like the rest.
NODE_SHARED_ENGINE: Final = frozenset(
    {
        "stt_bridge_slots_used",
        "stt_bridge_slots_free",
        "stt_bridge_engine_node_up",
        "stt_bridge_engine_node_free_slots",
        "stt_bridge_engine_node_capacity",
    }
)
# How a gauge of the collectors adds up over a node's live workers; livesum unless named here.
NODE_GAUGE_MODES: Final[dict[str, Literal["livesum", "livemin"]]] = {
    "stt_bridge_store_available": "livemin",  # 0 while any worker's store takes no writes
}


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
            "stt_bridge_store_unwritten_events",
            "Events recorded and not yet written: the queue and the batch the writer retries",
            value=self._store.unwritten,
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


class _Outbox(Collector):
    def __init__(self, store: Store | None) -> None:
        self._store = store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._store is None:
            return
        with contextlib.suppress(*DB_ERRORS):  # the database is away: the rest still shows
            yield GaugeMetricFamily(
                "stt_bridge_webhooks_pending",
                "Webhook deliveries waiting in the outbox",
                value=self._store.pending_webhooks(),
            )
            yield GaugeMetricFamily(
                "stt_bridge_webhooks_failed",
                "Webhooks dead-lettered (attempts ran out), kept in the outbox for a retry",
                value=self._store.count_webhooks("failed"),
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


class _Only(Collector):
    """The families of `collector` named in `names` (`keep`), or all the others."""

    def __init__(self, collector: Collector, names: frozenset[str], keep: bool = True) -> None:
        self._collector = collector
        self._names = names
        self._keep = keep

    def collect(self) -> Iterable[Metric]:
        for family in self._collector.collect():
            if (family.name in self._names) == self._keep:
                yield family


class _Mirror:
    """A worker's own collected figures, copied into prometheus_client's multiprocess files,
    where every worker's `/metrics` adds them up: gauges set (`NODE_GAUGE_MODES`), counters
    raised by what they grew since the last copy."""

    def __init__(self, collectors: list[Collector]) -> None:
        self._collectors = collectors
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._counted: dict[tuple[str, tuple[str, ...]], float] = {}

    def sync(self) -> None:
        for collector in self._collectors:
            for family in collector.collect():
                for sample in family.samples:
                    names = tuple(sorted(sample.labels))
                    values = tuple(sample.labels[n] for n in names)
                    if family.type == "counter":
                        if sample.name.endswith("_total"):
                            self._count(family, names, values, sample.value)
                    elif family.type == "gauge":
                        gauge = self._gauges.get(family.name)
                        if gauge is None:
                            mode = NODE_GAUGE_MODES.get(family.name, "livesum")
                            gauge = self._gauges[family.name] = Gauge(
                                family.name,
                                family.documentation,
                                names,
                                registry=None,
                                multiprocess_mode=mode,
                            )
                        (gauge.labels(*values) if names else gauge).set(sample.value)

    def _count(
        self, family: Metric, names: tuple[str, ...], values: tuple[str, ...], total: float
    ) -> None:
        counter = self._counters.get(family.name)
        if counter is None:
            counter = self._counters[family.name] = Counter(
                family.name, family.documentation, names, registry=None
            )
        key = (family.name, values)
        grown = total - self._counted.get(key, 0.0)
        if grown > 0:
            (counter.labels(*values) if names else counter).inc(grown)
            self._counted[key] = total


def observe_steps(engine: Engine, registry: CollectorRegistry | None = None) -> Histogram:
    """`stt_bridge_engine_step_seconds` from the engine's batched steps (an engine process with
    workers: into the node's multiprocess files)."""
    histogram = Histogram(
        "stt_bridge_engine_step_seconds",
        "Time of one batched engine step",
        buckets=STEP_BUCKETS,
        registry=registry,
    )
    engine.on_step = lambda seconds, _streams: histogram.observe(seconds)
    return histogram


class Metrics:
    def __init__(self, hub: CallHub, store: Store | None = None) -> None:
        self.registry = CollectorRegistry()
        self._served = self.registry  # what /metrics says: this process, or the node's
        self._mirror: _Mirror | None = None
        self._hub = hub
        self.calls_total = Counter(
            "stt_bridge_calls", "Calls admitted", ["front_end"], registry=self.registry
        )
        self.calls_active = Gauge(
            "stt_bridge_calls_active",
            "Calls live now",
            ["front_end"],
            registry=self.registry,
            multiprocess_mode="livesum",  # with workers: the live workers' calls, added up
        )
        self.rejections = Counter(
            "stt_bridge_rejections",
            "Calls refused",
            ["front_end", "reason"],
            registry=self.registry,
        )
        self._dropped_ended_s = 0.0  # audio dropped by calls that have ended
        self.step_seconds = observe_steps(hub.engine, self.registry)
        self.webhooks = Counter(
            "stt_bridge_webhook_deliveries", "Webhook attempts", ["result"], registry=self.registry
        )
        self.loop_lag = Histogram(
            "stt_bridge_event_loop_lag_seconds",
            "How late the event loop ran a timer (what a ready socket waits to be read)",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self._slots = _Slots(hub.engine)
        self._queues = _Queues(hub.bus, store)
        self._outbox = _Outbox(store)
        self._dropped = _Dropped(self)
        for collector in (self._slots, self._queues, self._outbox, self._dropped):
            self.registry.register(collector)
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

    def serve_node(self, directory: Path) -> None:
        """One of a node's workers (api/workers.py; prometheus_client imported with
        PROMETHEUS_MULTIPROC_DIR = `directory`): `/metrics` answers for every process of the
        node. Call before the service starts."""
        shared = NODE_SHARED_ENGINE if self._hub.engine.nodes() else frozenset()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
        registry.register(_Only(self._slots, shared))
        registry.register(self._outbox)  # one outbox for the node: any worker counts it all
        self._served = registry
        self._mirror = _Mirror(
            [_Only(self._slots, shared, keep=False), self._queues, self._dropped]
        )

    async def watch_loop(self, app: web.Application) -> AsyncIterator[None]:
        """An aiohttp cleanup context: samples the loop's lag while the app runs (and, in a
        worker, copies its figures for the node's /metrics)."""
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._watch_loop())]
        if self._mirror is not None:
            tasks.append(loop.create_task(self._mirror_forever(self._mirror)))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _mirror_forever(self, mirror: _Mirror) -> None:
        while True:
            mirror.sync()
            await asyncio.sleep(MIRROR_S)

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LOOP_PROBE_S)
            self.loop_lag.observe(max(0.0, loop.time() - start - LOOP_PROBE_S))

    def rejected(self, front_end: str, reason: str) -> None:
        self.rejections.labels(front_end, reason).inc()

    def webhook_result(self, result: str) -> None:
        """One attempt: "delivered", "failed" (tried again later) or "dead_lettered"."""
        self.webhooks.labels(result).inc()

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._served),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type": CONTENT_TYPE},
        )
