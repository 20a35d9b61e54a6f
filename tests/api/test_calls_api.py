"""Calls recorded in the store, served by the REST API, live per call, with metrics and keys."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from typing import Any

import aiohttp
import pytest

from api.app import Service
from api.config import ApiConfig
from tests.conftest import ServiceFactory, make_config
from tests.speech import SENTENCES, read_pcm, speech_wav


async def stream_call(service: Service, text: str, call_id: str, headers: Any = None) -> list[str]:
    pcm, _ = read_pcm(speech_wav(text))
    url = f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?call_id={call_id}"
    words: list[str] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        data = pcm.tobytes()
        for i in range(0, len(data), 9600):
            await ws.send_bytes(data[i : i + 9600])
        await ws.send_str('{"type": "stop"}')
        async for msg in ws:
            message = json.loads(msg.data)
            if message["type"] == "word":
                words.append(message["text"])
    return words


async def get(service: Service, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['audio']}{path}", **kwargs) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body


async def test_calls_are_listed_and_transcripts_rendered(start_service: ServiceFactory) -> None:
    service = await start_service()
    words_a = await stream_call(service, SENTENCES[0], "call-a")
    words_b = await stream_call(service, SENTENCES[3], "call-b")
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)

    status, listing = await get(service, "/v1/calls?limit=1")
    assert status == 200 and listing["total"] == 2 and listing["next_offset"] == 1
    assert listing["calls"][0]["id"] == "call-b"  # newest first
    status, page2 = await get(service, "/v1/calls?limit=1&offset=1")
    assert page2["calls"][0]["id"] == "call-a" and "next_offset" not in page2
    status, filtered = await get(service, "/v1/calls?front_end=twilio")
    assert filtered["total"] == 0

    status, call = await get(service, "/v1/calls/call-a")
    assert call["status"] == "ended" and call["front_end"] == "websocket"
    assert call["labels"]["encoding"] == "pcm16"

    status, transcript = await get(service, "/v1/calls/call-a/transcript")
    assert [w["text"] for w in transcript["words"]] == words_a
    # The engine's word confidence is stored with each word and exported (clear speech: sure)
    sure = [w["confidence"] for w in transcript["words"]]
    assert all(0.0 < c <= 1.0 for c in sure) and sum(sure) / len(sure) > 0.8, sure
    assert " ".join(s["text"] for s in transcript["segments"]) == " ".join(words_a)
    status, txt = await get(service, "/v1/calls/call-b/transcript?format=txt")
    assert txt.splitlines()[0].startswith("[00:00:0") and "caller: " in txt
    assert " ".join(line.split(": ", 1)[1] for line in txt.splitlines()) == " ".join(words_b)
    status, vtt = await get(service, "/v1/calls/call-b/transcript?format=vtt")
    assert vtt.startswith("WEBVTT") and "<v caller>" in vtt
    status, srt = await get(service, "/v1/calls/call-b/transcript?format=srt")
    assert srt.startswith("1\n00:00:") and " --> " in srt and "," in srt.splitlines()[1]
    status, _ = await get(service, "/v1/calls/call-b/transcript?format=doc")
    assert status == 400

    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/call-a"
        async with http.delete(url) as r:
            assert r.status == 200
        async with http.delete(url) as r:
            assert r.status == 404
    status, _ = await get(service, "/v1/calls/call-a")
    assert status == 404


async def test_per_call_live_events(start_service: ServiceFactory) -> None:
    service = await start_service()
    url = f"ws://127.0.0.1:{service.ports['audio']}/v1/calls/watched/events"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as live:
        other = asyncio.create_task(stream_call(service, SENTENCES[1], "other"))
        words = await stream_call(service, SENTENCES[2], "watched")
        await other
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["type"] != "call_ended":
            seen.append(await live.receive_json(timeout=10))
    assert {e["call_id"] for e in seen} == {"watched"}
    assert [e["text"] for e in seen if e["type"] == "word"] == words


async def test_metrics_count_calls_slots_and_rejections(start_service: ServiceFactory) -> None:
    service = await start_service(capacity=1)
    await stream_call(service, SENTENCES[5], "m-1")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/")
        refused = await http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/")
        await refused.receive(timeout=5)
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/metrics") as r:
            text = await r.text()
        await ws.close()
    assert 'stt_bridge_calls_total{front_end="websocket"} 2.0' in text
    assert 'stt_bridge_calls_active{front_end="websocket"} 1.0' in text
    assert "stt_bridge_slots_used 1.0" in text and "stt_bridge_slots_free 0.0" in text
    assert 'stt_bridge_rejections_total{front_end="websocket",reason="EngineFull"} 1.0' in text
    # Every bounded queue shows what it dropped; the loop's lag is sampled all along.
    for line in (
        "stt_bridge_live_events_dropped_total 0.0",
        "stt_bridge_store_events_dropped_total 0.0",
        "stt_bridge_audio_dropped_seconds_total 0.0",
        "stt_bridge_webhooks_pending 0.0",
    ):
        assert line in text, line
    lag_samples = re.search(r"^stt_bridge_event_loop_lag_seconds_count (\S+)$", text, re.M)
    assert lag_samples and float(lag_samples.group(1)) > 10


@pytest.fixture
async def keyed(start_service: ServiceFactory) -> Service:
    config = dataclasses.replace(
        make_config(),
        api=ApiConfig(keys=("k-one", "k-two"), max_streams_per_key=1, requests_per_minute=8),
    )
    return await start_service(config)


async def test_api_keys_and_limits(keyed: Service) -> None:
    service = keyed
    assert (await get(service, "/v1/calls"))[0] == 401
    assert (await get(service, "/v1/calls", headers={"Authorization": "Bearer nope"}))[0] == 401
    assert (await get(service, "/v1/calls", headers={"Authorization": "Bearer k-one"}))[0] == 200
    assert (await get(service, "/v1/calls?token=k-two"))[0] == 200
    assert (await get(service, "/v1/calls", headers={"kyutai-api-key": "k-two"}))[0] == 200
    assert (await get(service, "/"))[0] == 200  # the page itself stays open
    base = f"ws://127.0.0.1:{service.ports['audio']}"
    async with aiohttp.ClientSession() as http:
        # WebSockets are refused with close 1008 and a reason a browser can show.
        assert await refusal(http, f"{base}/v1/stream") == (1008, "unauthorized")
        assert await refusal(http, f"{base}/v1/events?token=nope") == (1008, "unauthorized")
        first = await http.ws_connect(f"{base}/v1/stream?token=k-one")
        await first.send_bytes(bytes(4800))
        # One stream per key: the second is refused while the first goes on.
        assert await refusal(http, f"{base}/v1/stream?token=k-one") == (1008, "too_many_streams")
        await first.send_str('{"type": "stop"}')
        assert [json.loads(m.data)["type"] async for m in first][-1] == "closed"
        # k-two has made 2 requests; 6 more fit in the minute, the next is refused.
        statuses = []
        for _ in range(7):
            async with http.get(
                f"http://127.0.0.1:{service.ports['audio']}/v1/calls",
                headers={"Authorization": "Bearer k-two"},
            ) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert (await r.json())["error"] == "rate_limited"
        assert await refusal(http, f"{base}/v1/stream?token=k-two") == (1008, "rate_limited")
        # k-one is a separate budget and still streams.
        again = await http.ws_connect(f"{base}/v1/stream?token=k-one")
        await again.close()
    assert statuses == [200] * 6 + [429]


async def refusal(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """Open a WebSocket the server should refuse: its close code and the reason's first word."""
    ws = await http.ws_connect(url)
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    return int(message.data), str(message.extra).split(":")[0]
