"""PostgreSQL going away under a cluster's live calls: stopped cleanly (`pg_ctl stop -m fast`) and
killed (`kill -9` of the postmaster), then restarted on the same data. Calls go on, events wait in
memory, `/ready` and SIP OPTIONS answer 503; once it is back every word is written exactly once,
the other node's live view has every word, and every webhook goes out once. Also: a COMMIT whose
answer is lost is not written twice, a relay that missed notifications reads them back, and a
slow API reader stalls neither the writer, nor other readers, nor the webhooks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import psycopg
import pytest

from api.app import Service
from api.config import Config, WebhookConfig
from api.store import Store
from engine.base import Segment, Word
from telephony.bus import CallEnded, CallStarted, LegEvent
from tests.api.test_calls_api import get
from tests.api.test_cluster import Hooks, node_config
from tests.api.test_fanout import metric
from tests.conftest import ServiceFactory
from tests.e2e.frontends import EventLog, watch_events
from tests.e2e.sip_peers import sip_config, sip_options
from tests.pg import Postgres
from tests.speech import SENTENCES, read_pcm, speech_wav

CHUNK = 9600  # 0.3 s of 16 kHz pcm16: the clients send in real time


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A server of this test's own: it is stopped and killed, which the session's must not be.
    Durable commits (fsync, synchronous_commit) as in production: with the test servers' `off`,
    a `kill -9` loses the last transactions PostgreSQL had acknowledged, which no client can
    prevent."""
    server = Postgres(fsync=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    async with Hooks() as receiver:
        yield receiver


async def talk(
    service: Service, call_id: str, audio: bytes, heard_at: list[float] | None = None
) -> list[str]:
    """A `/v1/stream` client sending `audio` in real time while it reads what comes back: the
    words it was sent (and, into `heard_at`, when each came)."""
    url = f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?call_id={call_id}"
    words: list[str] = []

    async def send(ws: aiohttp.ClientWebSocketResponse) -> None:
        started = time.monotonic()
        for n, i in enumerate(range(0, len(audio), CHUNK)):
            await ws.send_bytes(audio[i : i + CHUNK])
            await asyncio.sleep(max(0.0, started + (n + 1) * 0.3 - time.monotonic()))
        await ws.send_str('{"type": "stop"}')

    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        sending = asyncio.create_task(send(ws))
        async for msg in ws:
            message = json.loads(msg.data)
            if message["type"] == "word":
                words.append(message["text"])
                if heard_at is not None:
                    heard_at.append(time.monotonic())
        await sending
    return words


async def ready(service: Service) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/ready") as r:
            return r.status, await r.json()


async def metrics(service: Service) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/metrics") as r:
            return await r.text()


def stored_words(url: str) -> dict[str, list[str]]:
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT call_id, text FROM events WHERE type = 'word' ORDER BY id")
        out: dict[str, list[str]] = {}
        for call_id, text in rows:
            out.setdefault(call_id, []).append(text)
        return out


def caught_up(service: Service) -> int:
    assert service.bridge.cluster is not None
    return service.bridge.cluster.caught_up


def view_words(view: EventLog, call_id: str) -> list[str]:
    return [w["text"] for w in view.words(call_id)]


async def outage(
    pg: Postgres, kill: bool, a: Service, b: Service, url: str, run: str, speech: bytes
) -> dict[str, Any]:
    """20 calls on two nodes (a speaking one on each, the others silent), PostgreSQL taken away
    mid-call and brought back: what the clients heard, and what was measured."""
    silence = bytes(len(speech))
    plan = {f"{run}-a-talk": (a, speech), f"{run}-b-talk": (b, speech)}
    for n in range(9):
        plan[f"{run}-a-{n}"] = (a, silence)
        plan[f"{run}-b-{n}"] = (b, silence)
    heard_at: list[float] = []
    calls = {c: asyncio.create_task(talk(s, c, audio, heard_at)) for c, (s, audio) in plan.items()}
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(40):  # the first words are out, and written
        while not heard_at:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await loop.run_in_executor(None, pg.kill if kill else pg.shut_down)
    down_at = time.monotonic()
    async with asyncio.timeout(10):  # both nodes say so within a lease
        for service in (a, b):
            while (await ready(service))[0] != 503:
                await asyncio.sleep(0.1)
    for service in (a, b):
        status, body = await ready(service)
        assert status == 503 and body["reason"].startswith("store unavailable"), body
    assert (await sip_options(a.ports["sip"])).split("\r\n")[0] == "SIP/2.0 503 Service Unavailable"
    # Down for 3 s at least, and until more words were spoken: those can only wait in memory.
    async with asyncio.timeout(40):
        while time.monotonic() < down_at + 3.0 or not any(at > down_at for at in heard_at):
            await asyncio.sleep(0.1)
    held = 0
    for service in (a, b):  # what waits in memory, as /metrics shows it
        text = await metrics(service)
        assert metric(text, "stt_bridge_store_available") == 0
        assert metric(text, "stt_bridge_store_events_dropped_total") == 0
        held += int(metric(text, "stt_bridge_store_unwritten_events"))
    assert held > 0  # their events wait in memory
    await loop.run_in_executor(None, pg.restart)
    back_at = time.monotonic()
    spoken_while_down = sum(1 for at in heard_at if down_at <= at < back_at)
    async with asyncio.timeout(20):
        while a.bridge.store.problem or b.bridge.store.problem:
            await asyncio.sleep(0.05)
    caught_up_s = time.monotonic() - back_at
    assert (await ready(a))[0] == 200 and (await ready(b))[0] == 200
    assert (await sip_options(a.ports["sip"])).split("\r\n")[0] == "SIP/2.0 200 OK"
    heard = dict(zip(calls, await asyncio.gather(*calls.values()), strict=True))
    for service in (a, b):
        assert await loop.run_in_executor(None, service.bridge.store.flush)
        assert service.bridge.store.dropped == 0
    return {"heard": heard, "held": held, "down": spoken_while_down, "caught_up_s": caught_up_s}


@pytest.mark.solo
async def test_postgres_stopped_and_killed_under_twenty_calls_on_two_nodes(
    own_postgres: Postgres, start_service: ServiceFactory, hooks: Hooks
) -> None:
    url = own_postgres.fresh_database()
    base_a = sip_config({"capacity": 11})
    with_b = node_config(url, "b", hooks.url, capacity=11)
    config_a: Config = dataclasses.replace(
        with_b,
        sip=base_a.sip,
        server=dataclasses.replace(with_b.server, node_id="a"),
        webhook=WebhookConfig(url=hooks.url, timeout_s=5.0),
    )
    a = await start_service(config_a)
    b = await start_service(with_b)
    # Two sentences with a pause between: the first one's words come while PostgreSQL is down.
    first, rate = read_pcm(speech_wav(SENTENCES[3]))
    second, _ = read_pcm(speech_wav(SENTENCES[4]))
    speech = first.tobytes() + bytes(rate * 2) + second.tobytes()  # 1 s of pcm16 silence
    heard: dict[str, list[str]] = {}
    async with watch_events(a) as view_a, watch_events(b) as view_b:
        for run, kill in (("stop", False), ("kill", True)):
            result = await outage(own_postgres, kill, a, b, url, run, speech)
            heard.update(result["heard"])
            spoken = sum(len(w) for w in result["heard"].values())
            stored = stored_words(url)
            written = sum(len(stored.get(c, [])) for c in result["heard"])
            print(
                f"\n{'kill -9' if kill else 'clean stop'}: {spoken} words spoken, {written} "
                f"written; {result['down']} of them spoken while PostgreSQL was down; "
                f"{result['held']} events held in memory at the restart; caught up "
                f"{result['caught_up_s']:.2f} s after PostgreSQL took connections again; "
                f"events the relays read back from the store so far: a {caught_up(a)}, "
                f"b {caught_up(b)}"
            )
        await view_a.wait_ended(40, timeout=30)
        await view_b.wait_ended(40, timeout=30)
    stored = stored_words(url)
    for call_id, words in heard.items():
        assert stored.get(call_id, []) == words, call_id  # each word once, in order
        assert view_words(view_a, call_id) == words, call_id  # both live views complete
        assert view_words(view_b, call_id) == words, call_id
    assert all(heard[f"{run}-{node}-talk"] for run in ("stop", "kill") for node in "ab")
    for service in (a, b):
        _, listing = await get(service, "/v1/calls?limit=100")
        assert {c["id"]: c["status"] for c in listing["calls"]} == dict.fromkeys(heard, "ended")
    # Every webhook once: a start and an end per call, a segment per stored segment.
    with psycopg.connect(url) as db:
        segments = Counter(
            r[0] for r in db.execute("SELECT call_id FROM events WHERE type = 'segment'")
        )
    expected = len(heard) * 2 + sum(segments.values())
    async with asyncio.timeout(30):
        while len(hooks.bodies) < expected:
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    keys = [json.dumps(h, sort_keys=True) for h in hooks.bodies]
    assert len(keys) == len(set(keys)) == expected
    per_call = Counter((h["event"], h.get("call_id") or h["call"]["id"]) for h in hooks.bodies)
    for call_id in heard:
        assert per_call[("call.started", call_id)] == per_call[("call.ended", call_id)] == 1
        assert per_call[("segment", call_id)] == segments[call_id]


class CommitCutter:
    """A TCP proxy on loopback in front of PostgreSQL that, once armed, passes one COMMIT to the
    server, lets it commit, and cuts the connection before its answer reaches the client."""

    def __init__(self, pg_port: int) -> None:
        self.pg_port = pg_port
        self.armed = False
        self.cuts = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.pg_port)
        holding = asyncio.Event()  # the COMMIT went up: nothing comes down any more

        async def up() -> None:
            while data := await client_r.read(65536):
                cut = self.armed and b"COMMIT" in data
                if cut:
                    self.armed = False
                    holding.set()
                server_w.write(data)
                await server_w.drain()
                if cut:
                    await asyncio.sleep(0.5)  # the server commits and answers into the void
                    self.cuts += 1
                    client_w.transport.abort()
                    server_w.transport.abort()
                    return

        async def down() -> None:
            while data := await server_r.read(65536):
                if holding.is_set():
                    continue
                client_w.write(data)
                await client_w.drain()

        with contextlib.suppress(OSError):
            await asyncio.gather(up(), down())
        client_w.transport.abort()
        server_w.transport.abort()

    async def __aenter__(self) -> CommitCutter:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_a_commit_whose_answer_is_lost_is_written_once(postgres: Postgres) -> None:
    """The connection breaks after the server committed a batch but before the writer heard
    so: the writer reconnects, finds the batch's mark, and does not write it again."""
    url = postgres.fresh_database()
    loop = asyncio.get_running_loop()
    async with CommitCutter(postgres.port) as cutter:
        via = url.replace(f":{postgres.port}/", f":{cutter.port}/")
        store = await loop.run_in_executor(None, lambda: Store(via, node_id="w", lease_s=60))
        try:
            words = [Word(w, n, n + 0.4) for n, w in enumerate(("refund", "my", "order"))]
            cutter.armed = True
            store.record(CallStarted("in-doubt", "websocket", ("caller",), {}, time.time()))
            for word in words:
                store.record(LegEvent("in-doubt", "caller", word))
            store.record(LegEvent("in-doubt", "caller", Segment("refund my order", 0, 2.4)))
            store.record(CallEnded("in-doubt", "websocket", "stop", time.time(), {}))
            assert await loop.run_in_executor(None, store.flush)
        finally:
            await loop.run_in_executor(None, store.close)
        assert cutter.cuts == 1 and store.unavailable_errors >= 1
    assert stored_words(url) == {"in-doubt": ["refund", "my", "order"]}
    with psycopg.connect(url) as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (4,)


async def test_a_relay_that_missed_notifications_reads_them_back(
    postgres: Postgres, start_service: ServiceFactory
) -> None:
    """Node b's event channel is cut; another node writes a call's words and its end while b
    is not listening (their notifications are lost); b's live view still gets each word once,
    in order, and the end, read back from the store."""
    url = postgres.fresh_database()
    b = await start_service(node_config(url, "b"))
    loop = asyncio.get_running_loop()
    other = await loop.run_in_executor(None, lambda: Store(url, node_id="other", lease_s=60))
    words = [Word(w, n, n + 0.4) for n, w in enumerate(("please", "cancel", "my", "plan"))]
    try:
        async with watch_events(b) as view:
            other.record(CallStarted("missed", "sip", ("caller",), {}, time.time()))
            other.record(LegEvent("missed", "caller", words[0]))
            assert await loop.run_in_executor(None, other.flush)
            async with asyncio.timeout(10):
                while view_words(view, "missed") != ["please"]:
                    await asyncio.sleep(0.05)
            with psycopg.connect(url, autocommit=True) as db:
                cut = db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                ).fetchall()
            assert cut == [(True,)]  # b's listener, the only one
            for word in words[1:]:
                other.record(LegEvent("missed", "caller", word))
            other.record(CallEnded("missed", "sip", "hangup", time.time(), {}))
            assert await loop.run_in_executor(None, other.flush)
            await view.wait_ended(1, timeout=15)
            await asyncio.sleep(1.0)  # a repeat would come now
        assert view_words(view, "missed") == ["please", "cancel", "my", "plan"]
        assert [e["type"] for e in view.of("missed")].count("call_started") == 1
        assert [e["type"] for e in view.of("missed")].count("call_ended") == 1
        assert b.bridge.cluster is not None and b.bridge.cluster.caught_up >= 3
    finally:
        await loop.run_in_executor(None, other.close)


async def test_a_slow_reader_stalls_neither_writes_nor_reads_nor_webhooks(
    postgres: Postgres, start_service: ServiceFactory, hooks: Hooks
) -> None:
    """A `DELETE /v1/calls/{id}` waits on a row another session holds locked. Meanwhile a call
    is written, `/v1/calls` answers at once, and the call's webhooks go out; then the lock is
    let go and the delete ends."""
    url = postgres.fresh_database()
    service = await start_service(node_config(url, "n", hooks.url))
    silence = bytes(CHUNK * 2)
    await talk(service, "old", silence)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, service.bridge.store.flush)
    with psycopg.connect(url) as holder:
        holder.execute("SELECT 1 FROM calls WHERE id = 'old' FOR UPDATE")  # a transaction
        async with aiohttp.ClientSession() as http:
            deleting = asyncio.create_task(
                http.delete(f"http://127.0.0.1:{service.ports['audio']}/v1/calls/old")
            )
            with psycopg.connect(url, autocommit=True) as db:
                async with asyncio.timeout(10):  # the delete is waiting on the lock
                    while not db.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'DELETE FROM calls%'"
                    ).fetchall():
                        await asyncio.sleep(0.05)
            async with asyncio.timeout(15):  # without the pool: never, while the lock is held
                await talk(service, "new", silence)
                assert await loop.run_in_executor(None, service.bridge.store.flush)
                status, call = await get(service, "/v1/calls/new")
                assert status == 200 and call["status"] == "ended"
                status, listing = await get(service, "/v1/calls")
                assert status == 200 and listing["total"] == 2
                while {(h["event"], h.get("call", {}).get("id")) for h in hooks.bodies} < {
                    ("call.started", "new"),
                    ("call.ended", "new"),
                }:
                    await asyncio.sleep(0.05)
            assert not deleting.done()
            holder.rollback()
            async with asyncio.timeout(10):
                response = await deleting
            assert response.status == 200
    _, listing = await get(service, "/v1/calls")
    assert [c["id"] for c in listing["calls"]] == ["new"]
