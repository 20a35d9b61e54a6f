"""Failing parts and greedy clients (issue 17), against the real service: a client that sends
faster than real time, a store whose disk fills, hostile webhook receivers, an engine that
raises mid-call."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from api.store import Store
from api.webhooks import WebhookSender
from engine.moonshine import MoonshineEngine
from telephony.bus import CallStarted
from tests.conftest import ServiceFactory, make_config
from tests.e2e.server_process import ServerProcess
from tests.speech import SENTENCES, read_pcm, speech_wav

pytestmark = pytest.mark.xdist_group("durability")

RATE = 24000  # /v1/stream's default: pcm16 at 24 kHz, as the test speech is


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.cleanup()


def speech(n: int) -> bytes:
    pcm, rate = read_pcm(speech_wav(SENTENCES[n]))
    assert rate == RATE
    return pcm.tobytes()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return 0.0


async def get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        return await r.text()


async def call_words(
    http: aiohttp.ClientSession, server: ServerProcess, call_id: str, audio: bytes, pace: float
) -> list[str]:
    """A /v1/stream call sending 100 ms chunks every `pace` seconds; the words it is told."""
    ws = await http.ws_connect(server.url(f"/v1/stream?call_id={call_id}"))
    chunk = RATE // 10 * 2
    for i in range(0, len(audio), chunk):
        await ws.send_bytes(audio[i : i + chunk])
        if pace:
            await asyncio.sleep(pace)
    await ws.send_str('{"type": "stop"}')
    messages = [json.loads(m.data) async for m in ws]
    assert messages[-1]["type"] == "closed"
    return [m["text"] for m in messages if m["type"] == "word"]


async def ended_call(
    http: aiohttp.ClientSession, server: ServerProcess, call_id: str
) -> dict[str, Any]:
    """The call as /v1/calls shows it once its end is on disk (the store writes behind)."""
    async with asyncio.timeout(10):
        while True:
            status, call = await json_of(http, server.url(f"/v1/calls/{call_id}", "http"))
            if status == 200 and call["status"] != "live":
                return dict(call)
            await asyncio.sleep(0.1)


async def test_a_client_sending_20x_real_time_is_slowed_loses_nothing_and_disturbs_no_other_call(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """A WebSocket client can wait: while its engine stream's buffer (`engine.max_buffer_s`)
    is over its high-water mark the bridge stops reading its socket, and TCP slows it. Nothing
    is dropped (`stt_bridge_audio_dropped_seconds_total` stays 0, live and at the end),
    resident memory stays flat, and a real-time call beside it keeps every word. (A phone leg
    cannot wait and drops: tests/e2e/test_backpressure.py.)"""
    log_file = tmp_path / "server.log"
    server = ServerProcess(
        tmp_path / "data",
        STT_BRIDGE_ENGINE_THREADS="2",
        STT_BRIDGE_ENGINE_CAPACITY="4",
        STT_BRIDGE_ENGINE_MAX_BUFFER_S="2",
        STT_BRIDGE_ENGINE_PARTIAL_INTERVAL_S="0",
    )
    server.log_to = log_file
    servers.append(server.start())
    assert server.process is not None
    pid = server.process.pid
    metrics_url = f"http://127.0.0.1:{server.ports['health']}/metrics"
    quiet = speech(1)
    flood = b"".join(speech(n) for n in (0, 2, 3, 4)) * 4  # ~100 s of speech, looped below
    async with aiohttp.ClientSession() as http:
        alone = await call_words(http, server, "alone", quiet, pace=0.1)
        await call_words(http, server, "warm-up", flood[: RATE * 2 * 20], pace=0)
        baseline = rss_mb(pid)

        seconds, factor = 8.0, 20
        chunk = RATE * 2 // 10  # 100 ms of audio, ten at a time, paced to `factor` x real time
        sent_s = 0.0
        rss: list[float] = []
        dropped_live = 0.0

        async def flooding() -> None:
            nonlocal sent_s, dropped_live
            ws = await http.ws_connect(server.url("/v1/stream?call_id=flood"))
            began = time.monotonic()
            i = 0
            while time.monotonic() - began < seconds:
                for _ in range(10):
                    start = (i * chunk) % (len(flood) - chunk)
                    await ws.send_bytes(flood[start : start + chunk])
                    i += 1
                sent_s = i * 0.1
                ahead = began + sent_s / factor - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                rss.append(rss_mb(pid))
            dropped_live = metric(
                await get_text(http, metrics_url), "stt_bridge_audio_dropped_seconds_total"
            )
            await ws.send_str('{"type": "stop"}')
            async for _ in ws:
                pass

        async def beside() -> list[str]:
            await asyncio.sleep(1.0)  # the flood is on
            return await call_words(http, server, "beside", quiet, pace=0.1)

        _, words_beside = await asyncio.gather(flooding(), beside())
        dropped_end = metric(
            await get_text(http, metrics_url), "stt_bridge_audio_dropped_seconds_total"
        )
        flood_call = await ended_call(http, server, "flood")

    assert sent_s >= 2 * seconds, f"sent only {sent_s:.0f} s of audio"  # it did flood
    assert words_beside == alone, "the real-time call beside the flood lost words"
    assert dropped_live == 0.0 and dropped_end == 0.0, (dropped_live, dropped_end)
    assert flood_call["status"] == "ended" and flood_call["dropped_s"] == 0.0
    growth = max(rss) - baseline
    assert growth < 40, f"RSS grew {growth:.0f} MB (baseline {baseline:.0f} MB)"
    lines = log_file.read_text().splitlines()
    assert not [ln for ln in lines if "audio dropped" in ln and "call_id=flood" in ln]
    print(
        f"\nflood: {sent_s:.0f} s sent in {seconds:.0f} s (TCP held the rest back), "
        f"{dropped_end:.0f} s dropped; RSS {baseline:.0f} -> max {max(rss):.0f} MB"
    )


# -- the store's disk fills -----------------------------------------------------------------------


class LogPipe:
    """The server's stderr through a FIFO: a file size limit on the server must not hit its log."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self.path.open() as fifo:
            for line in fifo:
                self.lines.append(line)


def set_file_size_limit(pid: int, limit: int | None) -> None:
    """RLIMIT_FSIZE of the server: no regular file of it may grow past `limit` bytes (writes
    fail with EFBIG, as on a full disk); None lifts it."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if limit is None else limit, hard))


async def json_of(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as r:
        return r.status, await r.json()


async def test_a_full_disk_keeps_calls_going_and_their_events_wait_until_it_comes_back(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """The database's disk fills mid-service: calls go on and their words reach the caller; the
    events wait in memory; `/ready` and `/metrics` say so; once there is room again every
    waiting event is written, and the database is intact."""
    data = tmp_path / "data"
    server = ServerProcess(data, STT_BRIDGE_ENGINE_CAPACITY="4", STT_BRIDGE_ENGINE_THREADS="2")
    server.log_to = tmp_path / "stderr.fifo"
    log = LogPipe(server.log_to)
    servers.append(server.start())
    assert server.process is not None
    pid = server.process.pid
    health = f"http://127.0.0.1:{server.ports['health']}"
    async with aiohttp.ClientSession() as http:
        before = await call_words(http, server, "before", speech(5), pace=0)
        await ended_call(http, server, "before")  # on disk
        set_file_size_limit(pid, 4096)  # every write to the database or its WAL fails now
        during = await call_words(http, server, "during", speech(1), pace=0)
        assert during, "the call went on and its words reached the caller"
        await asyncio.sleep(0.5)
        status, ready = await json_of(http, f"{health}/ready")
        assert status == 503 and ready["reason"].startswith("store unavailable"), ready
        metrics = await get_text(http, f"{health}/metrics")
        assert metric(metrics, "stt_bridge_store_available") == 0
        assert metric(metrics, "stt_bridge_store_queue_depth") > len(during)
        assert metric(metrics, "stt_bridge_store_write_errors_total") >= 1
        assert metric(metrics, "stt_bridge_store_events_dropped_total") == 0
        async with http.get(server.url("/v1/calls/during", "http")) as r:
            assert r.status == 404  # not on disk yet
        async with http.get(server.url("/v1/calls/before/transcript", "http")) as r:
            assert r.status == 200  # what is on disk still reads

        set_file_size_limit(pid, None)  # room again
        async with asyncio.timeout(15):
            while (await json_of(http, f"{health}/ready"))[0] != 200:
                await asyncio.sleep(0.2)
        await ended_call(http, server, "during")  # its last event: all before it are written
        async with http.get(server.url("/v1/calls/during/transcript", "http")) as r:
            stored = await r.json()
        metrics = await get_text(http, f"{health}/metrics")
    assert stored["call"]["status"] == "ended"
    assert [w["text"] for w in stored["words"]] == during
    assert metric(metrics, "stt_bridge_store_available") == 1
    assert metric(metrics, "stt_bridge_store_queue_depth") == 0
    assert await asyncio.to_thread(server.terminate) == 0
    with sqlite3.connect(data / "stt-bridge.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM calls").fetchone() == (2,)
    text = "".join(log.lines)
    assert text.count("store unavailable") == 1, "one line when it fails"
    assert text.count("store available again") == 1
    assert before


async def test_with_the_disk_still_full_memory_stays_bounded_and_sigterm_exits_in_time(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """The disk never comes back: waiting events stop at `data.max_queue_events` (beyond it they
    are dropped and counted); a SIGTERM still ends the process promptly (its supervisor would
    kill it otherwise), with status 0, losing only the waiting events."""
    data = tmp_path / "data"
    server = ServerProcess(
        data,
        STT_BRIDGE_ENGINE_NAME="sink",
        STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S="1",
        STT_BRIDGE_DATA_MAX_QUEUE_EVENTS="20",
    )
    server.log_to = tmp_path / "stderr.fifo"
    log = LogPipe(server.log_to)
    servers.append(server.start())
    assert server.process is not None
    metrics_url = f"http://127.0.0.1:{server.ports['health']}/metrics"
    async with aiohttp.ClientSession() as http:
        await call_words(http, server, "kept", bytes(RATE), pace=0)
        async with asyncio.timeout(10):  # on disk
            while (await json_of(http, server.url("/v1/calls/kept", "http")))[0] != 200:
                await asyncio.sleep(0.1)
        set_file_size_limit(server.process.pid, 4096)
        for n in range(30):  # call_started and call_ended each: 60 events
            await call_words(http, server, f"lost-{n}", bytes(RATE // 10), pace=0)
        metrics = await get_text(http, metrics_url)
    assert metric(metrics, "stt_bridge_store_queue_depth") <= 20
    # The writer holds the batch it is retrying, the queue holds 20: the rest is dropped.
    assert metric(metrics, "stt_bridge_store_events_dropped_total") >= 60 - 20 - 2
    began = time.monotonic()
    assert await asyncio.to_thread(server.terminate) == 0
    took = time.monotonic() - began
    assert took < 15, f"SIGTERM took {took:.0f} s"
    with sqlite3.connect(data / "stt-bridge.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT id FROM calls").fetchall() == [("kept",)]
    assert any("store closing with" in line for line in log.lines)


# -- hostile webhook receivers --------------------------------------------------------------------


class HostileReceiver:
    """Webhook endpoints that redirect, refuse, answer 100 MB, or hang mid-answer (real sockets)."""

    def __init__(self) -> None:
        self.target_hits = 0
        self.huge_written = 0
        self._runner: web.AppRunner | None = None
        self._raw: asyncio.Server | None = None
        self.port = 0
        self.raw_port = 0

    async def _redirect(self, request: web.Request) -> web.Response:
        await request.read()
        raise web.HTTPTemporaryRedirect("/target")  # 307: a client following it POSTs again

    async def _target(self, request: web.Request) -> web.Response:
        self.target_hits += 1
        return web.Response(status=204)

    async def _gone(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=410, text="no such hook")

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Length": str(100 * 2**20)})
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            while self.huge_written < 100 * 2**20:
                await response.write(chunk)
                self.huge_written += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the sender closed: it read no further
        return response

    async def _hang(self, request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(3600)
        return web.Response()

    async def _half_answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")  # and nothing more
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the sender gives up
        writer.close()

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/redirect", self._redirect)
        app.router.add_route("*", "/target", self._target)
        app.router.add_post("/gone", self._gone)
        app.router.add_post("/huge", self._huge)
        app.router.add_post("/hang", self._hang)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._raw = await asyncio.start_server(self._half_answer, "127.0.0.1", 0)
        self.raw_port = self._raw.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._raw is not None:
            self._raw.close()
        if self._runner is not None:
            await self._runner.cleanup()


async def test_hostile_webhook_receivers_cost_a_bounded_attempt_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each attempt ends within `webhook.timeout_s` and reads no answer body: a redirect is not
    followed, 3xx/4xx are failures retried with backoff, a 100 MB answer costs nothing (its
    status is all that is read), a receiver that hangs mid-answer is a timeout, retried."""
    receiver = HostileReceiver()
    await receiver.up()
    base = f"http://127.0.0.1:{receiver.port}"
    urls = {
        "redirect": f"{base}/redirect",
        "gone": f"{base}/gone",
        "huge": f"{base}/huge",
        "hang": f"{base}/hang",
        "half": f"http://127.0.0.1:{receiver.raw_port}/half",
    }
    store = Store(tmp_path / "s.sqlite3", list(urls.values()))
    sender = WebhookSender(store, "secret", timeout_s=1.0, poll_s=0.05)
    try:
        store.record(CallStarted("hooked", "test", ("caller",), {}, time.time()))
        assert store.flush(10)
        began = time.monotonic()
        sender.start()
        await asyncio.sleep(2.6)
        await sender.stop()
        elapsed = time.monotonic() - began
    finally:
        await receiver.down()
        store.close()
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        rows = {
            url: (attempts, delivered, error, next_at)
            for url, attempts, delivered, error, next_at in db.execute(
                "SELECT url, attempts, delivered_at, last_error, next_at FROM outbox"
            )
        }
    now = time.time()
    redirect, gone, huge = rows[urls["redirect"]], rows[urls["gone"]], rows[urls["huge"]]
    assert redirect[1] is None and redirect[2] == "HTTP 307" and receiver.target_hits == 0
    assert gone[1] is None and gone[2] == "HTTP 410" and gone[0] >= 2  # retried, backing off
    assert gone[3] > now
    assert huge[1] is not None and huge[0] == 1  # delivered once: 200 is all that counts
    assert receiver.huge_written < 10 * 2**20, receiver.huge_written
    for name in ("hang", "half"):
        attempts, delivered, error, next_at = rows[urls[name]]
        assert delivered is None and "Timeout" in error and attempts >= 1, (name, error)
        assert next_at > now
    assert elapsed < 4
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("webhook failed")]
    assert any("HTTP 307" in m for m in failed) and any("HTTP 410" in m for m in failed)


# -- the engine raises mid-call -------------------------------------------------------------------


async def test_a_failing_decode_ends_each_call_it_hits_with_its_words_and_the_service_goes_on(
    start_service: ServiceFactory,
) -> None:
    """The Moonshine model starts raising (the one fake here: a real model cannot be made to
    fail on demand): each live call ends with the words it had, reason `engine error`, stored
    and shown by /v1/calls; once the model decodes again, a new call works."""
    service = await start_service(make_config(capacity=4, threads=2, partial_interval_s=0))
    engine = service.bridge.engine
    assert isinstance(engine, MoonshineEngine) and engine.model is not None
    model = engine.model
    real = model.decode  # what every final and partial calls (transcribe does too)
    broken = False

    def decode(*args: Any, **kwargs: Any) -> Any:
        if broken:
            raise RuntimeError("onnxruntime: Non-zero status code returned while running Add")
        return real(*args, **kwargs)

    model.decode = decode  # type: ignore[method-assign]
    pause = bytes(RATE * 2)  # 1 s of silence: the utterance before it ends and is decoded
    base = f"ws://127.0.0.1:{service.ports['audio']}"
    api = f"http://127.0.0.1:{service.ports['audio']}/v1/calls"
    async with aiohttp.ClientSession() as http:
        calls = {n: await http.ws_connect(f"{base}/v1/stream?call_id=call-{n}") for n in range(2)}
        first: dict[int, list[str]] = {}
        for n, ws in calls.items():
            await ws.send_bytes(speech(n + 1) + pause)
        for n, ws in calls.items():
            first[n] = []
            while True:
                message = await ws.receive_json(timeout=30)
                if message["type"] == "word":
                    first[n].append(message["text"])
                if message["type"] == "end_of_turn":
                    break
        broken = True
        told: dict[int, list[dict[str, Any]]] = {}
        for ws in calls.values():
            await ws.send_bytes(speech(4) + pause)
        for n, ws in calls.items():
            told[n] = []
            async with asyncio.timeout(30):
                while not told[n] or told[n][-1]["type"] != "closed":
                    told[n].append(await ws.receive_json())
            await ws.close()
        stored: dict[int, dict[str, Any]] = {}
        for n in calls:
            async with asyncio.timeout(10):  # its end is on disk (the store writes behind)
                while n not in stored or stored[n]["call"]["status"] == "live":
                    await asyncio.sleep(0.05)
                    async with http.get(f"{api}/call-{n}/transcript") as r:
                        stored[n] = await r.json()
        broken = False
        ws = await http.ws_connect(f"{base}/v1/stream?call_id=after")
        await ws.send_bytes(speech(1) + pause)
        await ws.send_str('{"type": "stop"}')
        after = [json.loads(m.data) async for m in ws]
    for n in calls:
        assert first[n], "words before the failure"
        assert told[n][-1] == {"type": "closed", "reason": "engine error"}
        assert not [m for m in told[n] if m["type"] == "word"], "nothing decoded after it"
        assert stored[n]["call"]["status"] == "ended"
        assert stored[n]["call"]["reason"] == "engine error"
        assert [w["text"] for w in stored[n]["words"]] == first[n]
    assert [m["text"] for m in after if m["type"] == "word"] == first[0]
    assert after[-1] == {"type": "closed", "reason": "flushed"}
