"""Nodes sharing one PostgreSQL store (in process): every node shows every node's calls, live
and stored; a dead node's live calls become interrupted with their words; its webhooks go out
from the others, each once; a full or leaving node answers SIP OPTIONS with 503."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web

from api.app import Service
from api.config import Config, WebhookConfig
from api.store import Store
from engine.base import Segment, Word
from telephony.bus import CallStarted, LegEvent
from tests.api.test_calls_api import get, stream_call
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import watch_events
from tests.pg import Postgres, free_port
from tests.speech import SENTENCES

LEASE_S = 1.0


def node_config(url: str, node: str, hook: str = "", **engine: Any) -> Config:
    base = make_config(data_url=url, **engine)
    return dataclasses.replace(
        base,
        server=dataclasses.replace(base.server, node_id=node),
        data=dataclasses.replace(base.data, lease_s=LEASE_S),
        webhook=WebhookConfig(url=hook, timeout_s=5.0),
    )


class Hooks:
    """A webhook receiver on loopback: every body it was given, in order."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bodies: list[dict[str, Any]] = []
        self.down = False  # answer 503 to everything (the receiver is having trouble)
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        if self.down:
            return web.Response(status=503)
        self.bodies.append(body)
        return web.Response(status=204)

    async def __aenter__(self) -> Hooks:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    async with Hooks() as receiver:
        yield receiver


async def flush(*services: Service) -> None:
    loop = asyncio.get_running_loop()
    for service in services:
        await loop.run_in_executor(None, service.bridge.store.flush)


async def test_every_node_shows_every_nodes_calls(
    postgres: Postgres, start_service: ServiceFactory, hooks: Hooks
) -> None:
    """A call on node a: node b's /v1/events shows its events as they happen (the latency is
    printed), b's /v1/calls and transcript show it once it ends, with the node that took it;
    both nodes send webhooks, and each goes out once."""
    url = postgres.fresh_database()
    a = await start_service(node_config(url, "a", hooks.url))
    b = await start_service(node_config(url, "b", hooks.url))
    async with watch_events(a) as seen_a, watch_events(b) as seen_b:
        stamps: dict[str, list[float]] = {"a": [], "b": []}
        for log, name in ((seen_a, "a"), (seen_b, "b")):
            original = log.add

            def add(event: dict[str, Any], original: Any = original, name: str = name) -> None:
                stamps[name].append(time.perf_counter())
                original(event)

            log.add = add  # type: ignore[method-assign]
        words = await stream_call(a, SENTENCES[0], "on-a")
        await stream_call(b, SENTENCES[3], "on-b")
        await seen_b.wait_ended(2, timeout=30)
        await seen_a.wait_ended(2, timeout=30)
    # b saw a's events, the same ones in the same order; and a saw b's.
    assert [e for e in seen_b.events if e["call_id"] == "on-a"] == seen_a.of("on-a")
    assert [e for e in seen_a.events if e["call_id"] == "on-b"] == seen_b.of("on-b")
    assert [w["text"] for w in seen_b.words("on-a")] == words
    index_a = [i for i, e in enumerate(seen_a.events) if e["call_id"] == "on-a"]
    index_b = [i for i, e in enumerate(seen_b.events) if e["call_id"] == "on-a"]
    lags = sorted(stamps["b"][j] - stamps["a"][i] for i, j in zip(index_a, index_b, strict=True))
    p99 = lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))]
    print(
        f"\ncross-node event latency over {len(lags)} events: "
        f"p50 {statistics.median(lags) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"
    )
    await flush(a, b)
    for service in (a, b):
        status, listing = await get(service, "/v1/calls")
        assert status == 200
        assert {(c["id"], c["node"], c["status"]) for c in listing["calls"]} == {
            ("on-a", "a", "ended"),
            ("on-b", "b", "ended"),
        }
        status, transcript = await get(service, "/v1/calls/on-a/transcript")
        assert [w["text"] for w in transcript["words"]] == words
    # Each webhook once, whichever node sent it.
    async with asyncio.timeout(20):
        while sum(1 for h in hooks.bodies if h["event"] == "call.ended") < 2:
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    keys = [json.dumps(h, sort_keys=True) for h in hooks.bodies]
    assert len(keys) == len(set(keys))


async def test_a_new_view_starts_with_calls_live_on_other_nodes(
    postgres: Postgres, start_service: ServiceFactory
) -> None:
    url = postgres.fresh_database()
    a = await start_service(node_config(url, "a"))
    b = await start_service(node_config(url, "b"))
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{a.ports['audio']}/v1/stream?call_id=long")
        await ws.send_bytes(bytes(9600))
        async with asyncio.timeout(10):
            while "long" not in b.bridge.cluster.remote_live:  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
        view = await http.ws_connect(f"ws://127.0.0.1:{b.ports['audio']}/v1/calls/long/events")
        first = await view.receive_json(timeout=5)
        assert first["type"] == "call_started" and first["call_id"] == "long"
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass
        types = []
        while "call_ended" not in types:
            types.append((await view.receive_json(timeout=10))["type"])
        await view.close()


async def test_a_dead_nodes_calls_are_interrupted_and_its_webhooks_delivered(
    postgres: Postgres, start_service: ServiceFactory, hooks: Hooks
) -> None:
    """Node "dead" takes a call, says words, queues webhooks the receiver never got (it was
    down), then stops renewing its lease (as if killed). Node b marks the call interrupted
    with its words, tells its live view, and delivers every pending webhook of the dead node,
    each once, plus the interrupted call's call.ended."""
    url = postgres.fresh_database()
    dead = Store(url, [hooks.url], node_id="dead", lease_s=LEASE_S)
    dead.record(CallStarted("cut-off", "sip", ("caller",), {"from": "alice"}, time.time()))
    words = [Word(w, 0.5 + n, 0.9 + n) for n, w in enumerate(("my", "order", "is"))]
    for word in words:
        dead.record(LegEvent("cut-off", "caller", word))
    dead.record(LegEvent("cut-off", "caller", Segment("my order", 0.5, 1.9, tuple(words[:2]))))
    assert dead.flush()
    pending = dead.pending_webhooks()
    assert pending == 2  # call.started and the segment: the receiver never saw them

    b = await start_service(node_config(url, "b", hooks.url))
    async with watch_events(b) as seen:
        ended = await seen.wait_ended(1, timeout=LEASE_S * 10)
    assert ended["cut-off"]["reason"] == "node dead stopped mid-call"
    _, call = await get(b, "/v1/calls/cut-off")
    assert call["status"] == "interrupted" and call["node"] == "dead"
    _, transcript = await get(b, "/v1/calls/cut-off/transcript")
    assert [w["text"] for w in transcript["words"]] == ["my", "order", "is"]
    assert " ".join(s["text"] for s in transcript["segments"]) == "my order is"
    async with asyncio.timeout(20):
        while len(hooks.bodies) < 3:
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    assert sorted(h["event"] for h in hooks.bodies) == ["call.ended", "call.started", "segment"]
    last = next(h for h in hooks.bodies if h["event"] == "call.ended")
    assert last["call"]["status"] == "interrupted"
    assert [line["text"] for line in last["transcript"]] == ["my order", "is"]
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT node, delivered_by FROM outbox ORDER BY id").fetchall()
    assert rows == [("dead", "b"), ("dead", "b"), ("b", "b")]
    dead.close()


async def test_a_node_whose_event_loop_is_busy_is_not_declared_dead(
    postgres: Postgres, start_service: ServiceFactory
) -> None:
    """Node a has a call live when its event loop is kept busy (CPU-bound Python, not a sleep)
    for three leases. Another node's lease check runs meanwhile on its own thread, as on a
    node of its own: a's lease, renewed from a's lease thread, never runs out, so a is not
    declared dead, its call stays live, and the call then ends normally."""
    url = postgres.fresh_database()
    watcher = Store(url, node_id="watcher", lease_s=LEASE_S)
    a = await start_service(node_config(url, "a"))
    declared: list[str] = []
    checks: list[float] = []
    stop = threading.Event()

    def nodes() -> set[str]:
        with psycopg.connect(url) as db:
            return {row[0] for row in db.execute("SELECT id FROM nodes").fetchall()}

    def check_leases() -> None:  # what another node's cluster-lease thread does
        while not stop.wait(LEASE_S / 4):
            declared.extend(event.call_id for event in watcher.heartbeat())
            checks.append(time.monotonic())

    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{a.ports['audio']}/v1/stream?call_id=busy")
        await ws.send_bytes(bytes(9600))
        await flush(a)
        assert (await get(a, "/v1/calls/busy"))[1]["status"] == "live"
        assert nodes() == {"a", "watcher"}  # a holds a lease that can run out
        checker = threading.Thread(target=check_leases, name="other-node-lease")
        checker.start()
        try:
            busy_until = time.monotonic() + 3 * LEASE_S
            spins = 0
            while time.monotonic() < busy_until:  # the loop runs nothing else meanwhile
                spins += sum(range(1000)) > 0
            await asyncio.sleep(LEASE_S)  # and the other node looks once more after it
        finally:
            stop.set()
            checker.join()
        assert spins > 1000
        # The other node looked all through the block, and never found a's lease run out.
        # (at least twice once a lease missed would have run out: a whole lease and a half
        # into the block; about eight times on an idle machine)
        late = busy_until - 1.5 * LEASE_S
        assert sum(late < t < busy_until for t in checks) >= 2
        assert declared == []
        assert nodes() == {"a", "watcher"}
        assert (await get(a, "/v1/calls/busy"))[1]["status"] == "live"
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass
    await flush(a)
    _, call = await get(a, "/v1/calls/busy")
    assert (call["status"], call["reason"]) == ("ended", "client stop")
    watcher.close()


async def test_a_node_whose_database_connections_are_cut_keeps_its_lease(
    postgres: Postgres, start_service: ServiceFactory
) -> None:
    """PostgreSQL drops every connection of node a (as in a restart or a proxy's failover)
    while a call is live on it, right after a started: a's lease, renewed as it started, is
    fresh, and its lease thread opens a new connection and renews in time, so a node that
    looks for dead nodes over the next three leases finds none, and the call stays live."""
    url = postgres.fresh_database()
    a = await start_service(node_config(url, "a"))
    with psycopg.connect(url) as db:  # renewed as it started, not only a period later
        ages = db.execute(
            "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 - heartbeat_at FROM nodes"
        ).fetchall()
    assert len(ages) == 1 and ages[0][0] < LEASE_S / 2
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{a.ports['audio']}/v1/stream?call_id=cut")
        await ws.send_bytes(bytes(9600))
        await flush(a)
        with psycopg.connect(url, autocommit=True) as db:
            cut = db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        assert len(cut) >= 3  # the writer's, the reader's, the lease's (and the listener's)
        watcher = Store(url, node_id="watcher", lease_s=LEASE_S)  # its own, new connections
        declared: list[str] = []
        loop = asyncio.get_running_loop()
        for _ in range(12):  # three leases
            await asyncio.sleep(LEASE_S / 4)
            declared += [e.call_id for e in await loop.run_in_executor(None, watcher.heartbeat)]
        assert declared == []
        with psycopg.connect(url) as db:
            status = db.execute("SELECT status, reason FROM calls WHERE id = 'cut'").fetchone()
        assert status == ("live", None)
        await ws.close()
    watcher.close()


async def test_options_answer_503_when_full_or_leaving(start_service: ServiceFactory) -> None:
    """Kamailio's ds_ping: 200 with a free slot, 503 (with Retry-After) when full, and 503
    while a drain is announced."""
    from tests.e2e.sip_peers import sip_config, sip_options

    service = await start_service(sip_config({"capacity": 1}))
    port = service.ports["sip"]

    assert (await sip_options(port)).startswith("SIP/2.0 200")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/v1/stream")
        await ws.send_bytes(bytes(9600))
        full = await sip_options(port)
        assert full.startswith("SIP/2.0 503") and "Retry-After:" in full
        await ws.close()
    async with asyncio.timeout(5):
        while not (await sip_options(port)).startswith("SIP/2.0 200"):
            await asyncio.sleep(0.1)
    service.bridge.hub.leaving = True
    assert (await sip_options(port)).startswith("SIP/2.0 503")
    service.bridge.hub.leaving = False
