"""Failing parts and greedy clients (issue 17), against the real service: a client that sends
faster than real time, a store whose disk fills, hostile webhook receivers, an engine that
raises mid-call."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

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
