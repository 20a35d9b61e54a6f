"""Failing parts and greedy clients (issue 17), against the real service: a client that sends
faster than real time, a store whose disk fills, hostile webhook receivers, an engine that
raises mid-call."""

from __future__ import annotations

import asyncio
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
from prometheus_client.parser import text_string_to_metric_families

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


async def test_a_client_sending_20x_real_time_is_bounded_and_disturbs_no_other_call(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    """The engine stream's buffer (`engine.max_buffer_s`) bounds the flood: the oldest audio is
    dropped and counted live in `stt_bridge_audio_dropped_seconds_total`, resident memory stays
    flat, the log gets one line about it, and a real-time call beside it keeps every word."""
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
        async with http.get(server.url("/v1/calls/flood", "http")) as r:
            flood_call = await r.json()

    assert sent_s >= factor * seconds * 0.9, f"sent only {sent_s:.0f} s of audio"
    assert words_beside == alone, "the real-time call beside the flood lost words"
    assert dropped_live > 0, "the drop counter did not rise while the flood was on"
    assert dropped_end >= sent_s * 0.3, (dropped_end, sent_s)
    assert flood_call["status"] == "ended"
    growth = max(rss) - baseline
    assert growth < 40, f"RSS grew {growth:.0f} MB (baseline {baseline:.0f} MB)"
    lines = log_file.read_text().splitlines()
    flood_drops = [ln for ln in lines if "audio dropped" in ln and "call_id=flood" in ln]
    assert len(flood_drops) == 1, "one log line per stream per minute"
    print(
        f"\nflood: {sent_s:.0f} s sent in {seconds:.0f} s, {dropped_end:.0f} s dropped; "
        f"RSS {baseline:.0f} -> max {max(rss):.0f} MB"
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
