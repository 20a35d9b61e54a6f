"""Clients faster than real time, and phone legs whose engine is behind.

A WebSocket client that can wait (`/`, `/v1/stream`, Deepgram's `/v1/listen`, moshi-server's
`/api/asr-streaming`) sends a file as fast as its socket takes it: the bridge stops reading
the socket while the leg's engine buffer is over its high-water mark (TCP slows the client),
so nothing is dropped and every word comes back with the times of a paced run (on
`/v1/stream` a paced run beside it; everywhere the offline transcript, which a paced run
equals: the engine's cuts do not depend on how the audio is chunked). The engine buffer
here is 1 s, so without backpressure most of the file would be dropped.

A phone leg cannot wait: AudioSocket sent faster than real time drops the oldest audio, but the
words after the loss keep the times of the leg's audio (the dropped seconds count), the loss is
told to `/v1/events` subscribers and recorded with the call (`/v1/calls/{id}`).
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import uuid
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest

from api.app import Service
from telephony.audio import PcmArray, pcm16_to_float, ulaw_decode
from telephony.audiosocket import AudioSocketCodec
from tests.conftest import ServiceFactory
from tests.e2e.frontends import offline_words, paced, watch_events
from tests.e2e.ws_peer import BINARY, CLOSE, TEXT, RawWebSocket, client_frame, libwsc_request
from tests.speech import SENTENCES, phone_bytes

MAX_BUFFER_S = 1.0
TEXTS = (SENTENCES[0], SENTENCES[2], SENTENCES[4])  # about 13 s with the pauses
PAUSE_S = 0.6


def file_bytes(encoding: str, rate: int) -> bytes:
    """The three sentences with a pause after each, as wire audio."""
    width = 2 if encoding == "pcm16" else 1
    silence = (b"\x00" if width == 2 else b"\xff") * int(PAUSE_S * rate) * width
    return b"".join(phone_bytes(text, encoding, rate) + silence for text in TEXTS)


async def dropped_total(service: Service) -> float:
    url = f"http://127.0.0.1:{service.ports['health']}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    found = re.search(r"^stt_bridge_audio_dropped_seconds_total (\S+)$", text, re.M)
    assert found, "no stt_bridge_audio_dropped_seconds_total in /metrics"
    return float(found.group(1))


async def stored_call(service: Service, call_id: str) -> dict[str, Any]:
    """`GET /v1/calls/{id}` once its end is written (the store writes on its own thread)."""
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/{call_id}"
    async with aiohttp.ClientSession() as http, asyncio.timeout(10):
        while True:
            async with http.get(url) as response:
                call: dict[str, Any] = await response.json()
            if call["status"] != "live":
                return call
            await asyncio.sleep(0.1)


async def caught_up(service: Service, samples: int) -> None:
    """Until the one live call's engine has taken (or dropped) `samples` of its audio."""
    async with asyncio.timeout(30):
        while True:
            calls = list(service.bridge.hub.calls.values())
            if calls:
                stream = calls[0].leg("caller").stream
                if stream.stats.samples_in >= samples and stream.pending_samples == 0:
                    return
            await asyncio.sleep(0.05)


async def send_listen(
    url: str, audio: bytes, chunk: int, stop: str, pace_s: float = 0.0
) -> list[dict[str, Any]]:
    """Every chunk as fast as the socket takes it (or one per `pace_s`), then the stop; the
    replies."""
    chunks = [audio[i : i + chunk] for i in range(0, len(audio), chunk)]
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        if pace_s:
            async for piece in paced(chunks, pace_s):
                await ws.send_bytes(piece)
        else:
            for piece in chunks:
                await ws.send_bytes(piece)
        await ws.send_str(json.dumps({"type": stop}))
        return [json.loads(msg.data) async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]


async def send_moshi(url: str, pcm: PcmArray) -> list[str]:
    """moshi-server's client at full speed: audio, silence, a Marker, more silence; closes
    once the Marker is back. The kinds of messages it got."""
    floats = pcm16_to_float(pcm)
    kinds: list[str] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for i in range(0, len(floats), 1920):
            message = {"type": "Audio", "pcm": [float(x) for x in floats[i : i + 1920]]}
            await ws.send_bytes(msgpack.packb(message, use_single_float=True))
        await ws.send_bytes(msgpack.packb({"type": "Marker", "id": 1}))
        after = {"type": "Audio", "pcm": [0.0] * 24000}
        await ws.send_bytes(msgpack.packb(after, use_single_float=True))
        async for msg in ws:
            kinds.append(msgpack.unpackb(msg.data)["type"])
            if kinds[-1] == "Marker":
                await ws.close()
    return kinds


@pytest.mark.parametrize("route", ["root", "stream", "deepgram", "moshi"])
async def test_a_file_at_full_speed_loses_nothing_and_keeps_its_times(
    start_service: ServiceFactory, route: str
) -> None:
    service = await start_service(max_buffer_s=MAX_BUFFER_S, partial_interval_s=0)
    base = f"ws://127.0.0.1:{service.ports['audio']}"
    if route in ("root", "moshi"):
        wire = file_bytes("pcm16", 24000)
        if route == "moshi":
            wire += bytes(2 * 24000 * 2)  # the 2 s of silence before the Marker
        pcm, rate = np.frombuffer(wire, "<i2").astype(np.int16), 24000
    else:
        wire = file_bytes("mulaw", 8000)
        pcm, rate = ulaw_decode(wire), 8000
    async with watch_events(service) as events:
        if route == "root":
            replies = await send_listen(f"{base}/", wire, 4800, "stop")
        elif route == "stream":  # and the same file paced, beside it: the same words, times
            url = f"{base}/v1/stream?encoding=mulaw&sample_rate=8000"
            replies, paced_replies = await asyncio.gather(
                send_listen(f"{url}&call_id=fast", wire, 800, "stop"),
                send_listen(f"{url}&call_id=paced", wire, 160, "stop", pace_s=0.02),
            )
        elif route == "deepgram":
            url = f"{base}/v1/listen?encoding=mulaw&sample_rate=8000"
            replies = await send_listen(url, wire, 800, "CloseStream")
        else:
            kinds = await send_moshi(f"{base}/api/asr-streaming", pcm)
            pcm = np.concatenate([pcm, np.zeros(24000, np.int16)])  # the silence after it
        ended = await events.wait_ended(2 if route == "stream" else 1, timeout=60)
    if route == "stream":
        assert events.words("fast") == events.words("paced")
        assert ended.pop("paced")["dropped_s"] == 0.0
        assert [r for r in paced_replies if r["type"] == "word"] == [
            r for r in replies if r["type"] == "word"
        ]
    ((call_id, end),) = ended.items()
    expected = await offline_words(service, pcm, rate)
    assert len(expected) > 30
    assert events.words(call_id) == expected
    assert end["dropped_s"] == 0.0
    assert await dropped_total(service) == 0.0
    if route in ("root", "stream"):
        assert [r["text"] for r in replies if r["type"] == "word"] == [w["text"] for w in expected]
        assert replies[-1]["type"] == "closed"
    elif route == "deepgram":
        finals = [r for r in replies if r["type"] == "Results" and r["is_final"]]
        words = [w for r in finals for w in r["channel"]["alternatives"][0]["words"]]
        assert [w["start"] for w in words] == [w["start"] for w in expected]
        assert replies[-1]["type"] == "Metadata"
    else:
        assert kinds.count("Word") == len(expected) and kinds[-1] == "Marker"


async def test_a_phone_leg_whose_engine_is_behind_keeps_its_times_and_records_the_loss(
    start_service: ServiceFactory,
) -> None:
    """AudioSocket (Asterisk): two sentences (9.5 s) sent at once overflow a 6 s engine buffer;
    once the engine has taken what it kept, the third comes (5.6 s, at once: it fits, however
    slow a loaded machine makes the engine). Its words are stamped where they are in the
    call's audio, not earlier by the seconds dropped; the loss is on the bus, in the ended
    call, in `/v1/calls/{id}` and in `/metrics`."""
    service = await start_service(max_buffer_s=6.0, partial_interval_s=0)
    rate = 8000
    pause = bytes(int(PAUSE_S * rate) * 2)
    burst = b"".join(phone_bytes(text, "pcm16", rate) + pause for text in TEXTS[:2])
    last = bytes(rate * 2) + phone_bytes(TEXTS[2], "pcm16", rate) + pause
    call_id = uuid.uuid4()
    async with watch_events(service) as events:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["audiosocket"])
        writer.write(AudioSocketCodec.encode_uuid(call_id))
        for i in range(0, len(burst), 320):
            writer.write(AudioSocketCodec.encode_audio(burst[i : i + 320], rate))
        await writer.drain()
        await caught_up(service, len(burst) - 3200)  # at 16 kHz, less what the resampler holds
        for i in range(0, len(last), 320):
            writer.write(AudioSocketCodec.encode_audio(last[i : i + 320], rate))
        await writer.drain()
        writer.close()
        await reader.read()
        ended = await events.wait_ended(1, timeout=60)
    ((key, end),) = ended.items()
    dropped = end["dropped_s"]
    assert dropped > 1.0, "the engine kept up: no loss to check"
    notices = [e for e in events.of(key) if e["type"] == "audio_dropped"]
    assert notices and notices[-1]["dropped_s"] <= dropped
    assert all(0 < n["at"] <= len(burst) / 2 / rate + 0.1 for n in notices), (notices, dropped)
    # The third sentence, as the offline transcript of the whole call has it: the same words
    # at the same times (within a few VAD windows: the loss cut the VAD's history).
    whole = np.frombuffer(burst + last, "<i2").astype(np.int16)
    reference = await offline_words(service, whole, rate)
    burst_s = len(burst) / 2 / rate
    words_of_last = [w for w in reference if w["start"] >= burst_s]
    heard = [w for w in events.words(key) if w["start"] >= burst_s]
    assert len(words_of_last) >= 8
    assert [w["text"] for w in heard] == [w["text"] for w in words_of_last]
    for got, want in zip(heard, words_of_last, strict=True):
        assert abs(got["start"] - want["start"]) < 0.1 and abs(got["end"] - want["end"]) < 0.1
    stored = await stored_call(service, key)
    assert stored["dropped_s"] == pytest.approx(dropped, abs=0.001)
    assert await dropped_total(service) == pytest.approx(dropped, abs=0.001)


@pytest.mark.parametrize("module", ["audio_fork", "audio_stream"])
async def test_freeswitch_is_told_of_dropped_audio(
    start_service: ServiceFactory, module: str
) -> None:
    """mod_audio_fork and mod_audio_stream turn our text frames into FreeSWITCH events: a leg
    whose engine drops audio says so there (`mod_audio_fork::json` has no `type`: the module
    ignores types it does not know; `mod_audio_stream::json` takes any)."""
    service = await start_service(max_buffer_s=MAX_BUFFER_S, partial_interval_s=0)
    port = service.ports["audio"]
    slin = file_bytes("pcm16", 8000)
    frames = b"".join(client_frame(BINARY, slin[i : i + 320]) for i in range(0, len(slin), 320))
    key = RawWebSocket.new_key()
    host = f"127.0.0.1:{port}"
    if module == "audio_fork":
        request = (
            f"GET /freeswitch/fs-drop HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: audio.drachtio.org\r\n\r\n"
        ).encode()
        meta = client_frame(TEXT, b'{"uuid":"fs-drop","mix":"mono","rate":8000}')
    else:
        request = libwsc_request("/freeswitch/fs-drop?mix=mono&rate=8000", host, key)
        meta = client_frame(TEXT, b'{"uuid":"fs-drop"}')
    close = client_frame(CLOSE, struct.pack("!H", 1000))
    ws = await RawWebSocket.connect(port, request, key, pipelined=meta + frames + close)
    texts: list[dict[str, Any]] = []
    while True:
        opcode, payload = await ws.receive(timeout=30)
        if opcode == CLOSE:
            break
        texts.append(json.loads(payload))
    ws.writer.close()
    kind = "event" if module == "audio_fork" else "type"
    notices = [t for t in texts if t.get(kind) == "audio_dropped"]
    assert notices, texts
    assert notices[0]["call_id"] == "fs-drop" and notices[0]["leg"] == "caller"
    assert notices[0]["dropped_s"] > 0 and notices[0]["at"] > 0
    if module == "audio_fork":
        assert "type" not in notices[0]
