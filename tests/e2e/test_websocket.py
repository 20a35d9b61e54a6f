"""The generic WebSocket front end over real loopback sockets, with real speech."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from api.app import Service
from telephony.audio import AudioDecoder, Encoding, PcmArray, ulaw_decode
from tests.conftest import ServiceFactory
from tests.e2e import frontends
from tests.speech import SENTENCES, phone_bytes, read_pcm, speech_wav, word_error_rate

# Measured: μ-law 8 kHz hibari sentences through the Moonshine engine, WER 0.00 each.
PHONE_WER_BOUND = 0.05


def url(service: Service, path: str) -> str:
    return f"ws://127.0.0.1:{service.ports['audio']}{path}"


async def offline_words(service: Service, pcm: PcmArray, rate: int = 24000) -> list[dict[str, Any]]:
    """The same audio (24 kHz unless said) transcribed offline through the same engine."""
    return await frontends.offline_words(service, pcm, rate)


async def stream_and_collect(
    ws: aiohttp.ClientWebSocketResponse, frames: list[bytes], pace_s: float = 0.0
) -> list[dict[str, Any]]:
    """Send frames, then stop; return every message until `closed`."""
    messages: list[dict[str, Any]] = []

    async def receive() -> None:
        async for msg in ws:
            messages.append(json.loads(msg.data))
            if messages[-1]["type"] == "closed":
                return

    receiver = asyncio.create_task(receive())
    for frame in frames:
        await ws.send_bytes(frame)
        if pace_s:
            await asyncio.sleep(pace_s)
    await ws.send_str(json.dumps({"type": "stop"}))
    await asyncio.wait_for(receiver, 60)
    return messages


def only_words(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: m[k] for k in ("text", "start", "end")} for m in messages if m["type"] == "word"]


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def test_raw_24k_protocol_gives_the_offline_transcript(start_service: ServiceFactory) -> None:
    service = await start_service()
    pcm, _ = read_pcm(speech_wav(SENTENCES[0]))
    # Odd-sized frames: samples are split across frames and must be carried over.
    frames = split(pcm.tobytes(), 3333)
    async with aiohttp.ClientSession() as http, http.ws_connect(url(service, "/")) as ws:
        messages = await stream_and_collect(ws, frames)
    assert messages[-1]["type"] == "closed"
    got = only_words(messages)
    assert got and got == await offline_words(service, pcm)
    kinds = [m["type"] for m in messages]
    assert "segment" in kinds and "end_of_turn" in kinds
    assert kinds.index("segment") > kinds.index("word")


async def test_listen_mulaw_8k_equals_offline_transcript_of_same_audio(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    wire = phone_bytes(SENTENCES[1], "mulaw", 8000)
    same_audio = ulaw_decode(wire)
    path = "/v1/stream?encoding=mulaw&sample_rate=8000&call_id=ulaw-test"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(service, "/v1/events")) as events:
            async with http.ws_connect(url(service, path)) as ws:
                # 20 ms frames, sent a little faster than real time
                messages = await stream_and_collect(ws, split(wire, 160), pace_s=0.002)
            seen = []
            while not seen or seen[-1]["type"] != "call_ended":
                seen.append(await asyncio.wait_for(events.receive_json(), 10))
    got = only_words(messages)
    assert got == await offline_words(service, same_audio, 8000)
    text = " ".join(w["text"] for w in got)
    assert word_error_rate(SENTENCES[1], text) <= PHONE_WER_BOUND, text
    # The live events feed saw the same call, labelled, with the same words.
    assert seen[0]["type"] == "call_started" and seen[0]["call_id"] == "ulaw-test"
    assert seen[0]["front_end"] == "websocket" and seen[0]["labels"]["encoding"] == "mulaw"
    live_words = [
        {k: e[k] for k in ("text", "start", "end")} for e in seen if e.get("type") == "word"
    ]
    assert live_words == got
    assert all(e["call_id"] == "ulaw-test" for e in seen)


@pytest.mark.parametrize(("encoding", "rate"), [("alaw", 8000), ("pcm16", 16000), ("pcm16", 48000)])
async def test_listen_other_encodings(
    start_service: ServiceFactory, encoding: str, rate: int
) -> None:
    service = await start_service()
    wire = phone_bytes(SENTENCES[2], encoding, rate)
    same_audio = AudioDecoder(Encoding(encoding), rate, rate).decode(wire)
    path = f"/v1/stream?encoding={encoding}&sample_rate={rate}"
    async with aiohttp.ClientSession() as http, http.ws_connect(url(service, path)) as ws:
        messages = await stream_and_collect(ws, split(wire, rate // 25))
    got = only_words(messages)
    assert got and got == await offline_words(service, same_audio, rate)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("encoding=opus", "encoding"),
        ("encoding=mulaw&sample_rate=11025", "sample_rate"),
        ("sample_rate=fast", "sample_rate"),
    ],
)
async def test_bad_parameters_get_400_before_upgrade(
    start_service: ServiceFactory, query: str, reason: str
) -> None:
    service = await start_service()
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"http://127.0.0.1:{service.ports['audio']}/v1/stream?{query}",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        ) as response:
            assert response.status == 400
            body = await response.json()
    assert body["error"] == "bad_parameters" and reason in body["reason"]
    assert service.bridge.engine.free_slots == service.bridge.engine.capacity


async def test_malformed_text_frames_get_an_error_and_the_stream_goes_on(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    pcm, _ = read_pcm(speech_wav(SENTENCES[3]))
    async with aiohttp.ClientSession() as http, http.ws_connect(url(service, "/")) as ws:
        await ws.send_str("not json")
        first = await ws.receive_json(timeout=5)
        await ws.send_str(json.dumps({"type": "pause"}))
        second = await ws.receive_json(timeout=5)
        messages = await stream_and_collect(ws, split(pcm.tobytes(), 4800))
    assert first["type"] == second["type"] == "error"
    assert "JSON" in first["message"] and "pause" in second["message"]
    assert only_words(messages) == await offline_words(service, pcm)


async def test_full_engine_closes_with_1013_and_other_streams_are_untouched(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(capacity=2)
    pcm, _ = read_pcm(speech_wav(SENTENCES[5]))
    async with aiohttp.ClientSession() as http:
        busy = [await http.ws_connect(url(service, "/")) for _ in range(2)]
        rejected = await http.ws_connect(url(service, "/"))
        msg = await rejected.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert rejected.close_code == 1013
        assert "busy" in (msg.extra or "")
        messages = await stream_and_collect(busy[0], split(pcm.tobytes(), 1920))
        await busy[1].close()
    assert only_words(messages) == await offline_words(service, pcm)


async def test_fifty_streams_beyond_capacity(start_service: ServiceFactory) -> None:
    service = await start_service(capacity=4)
    pcm, _ = read_pcm(speech_wav(SENTENCES[0]))

    async def first_message(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMsgType | None:
        try:
            return (await ws.receive(timeout=2)).type
        except TimeoutError:
            return None  # admitted: the server says nothing until there are words

    async with aiohttp.ClientSession() as http:
        sockets = await asyncio.gather(*(http.ws_connect(url(service, "/")) for _ in range(50)))
        firsts = await asyncio.gather(*(first_message(ws) for ws in sockets))
        admitted = [ws for ws, first in zip(sockets, firsts, strict=True) if first is None]
        rejected = [ws for ws, first in zip(sockets, firsts, strict=True) if first is not None]
        assert len(admitted) == 4
        assert all(ws.close_code == 1013 for ws in rejected) and len(rejected) == 46
        messages = await stream_and_collect(admitted[0], split(pcm.tobytes(), 4800))
        for ws in admitted[1:]:
            await ws.close()
    assert only_words(messages) == await offline_words(service, pcm)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/health") as r:
            assert (await r.json())["status"] == "healthy"


async def test_client_vanishing_mid_stream_keeps_its_words_and_spares_others(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    vanishing, _ = read_pcm(speech_wav(SENTENCES[4]))
    steady, _ = read_pcm(speech_wav(SENTENCES[0]))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(service, "/v1/events")) as events:
            other = await http.ws_connect(url(service, "/"))
            gone = await http.ws_connect(url(service, "/"))
            for frame in split(vanishing.tobytes(), 9600):
                await gone.send_bytes(frame)
            # The client goes away without a stop message, with no close handshake either.
            transport = gone._response.connection.transport  # type: ignore[union-attr]
            assert transport is not None
            transport.abort()
            messages = await stream_and_collect(other, split(steady.tobytes(), 4800))
            ended: dict[str, dict[str, Any]] = {}
            words_by_call: dict[str, list[str]] = {}
            while len(ended) < 2:
                event = await asyncio.wait_for(events.receive_json(), 30)
                if event["type"] == "call_ended":
                    ended[event["call_id"]] = event
                elif event["type"] == "word":
                    words_by_call.setdefault(event["call_id"], []).append(event["text"])
    assert only_words(messages) == await offline_words(service, steady)
    reasons = sorted(e["reason"] for e in ended.values())
    assert reasons[0].startswith("c")  # "client closed" / connection error, and "client stop"
    vanished_id = next(cid for cid, e in ended.items() if e["reason"] != "client stop")
    offline = [w["text"] for w in await offline_words(service, vanishing)]
    assert words_by_call[vanished_id] == offline
