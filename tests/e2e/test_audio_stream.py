"""FreeSWITCH mod_audio_stream end to end: a peer that does what `uuid_audio_stream` does.

Written from amigniter/mod_audio_stream (audio_streamer_glue.cpp) and its libwsc client: the
handshake libwsc writes (no subprotocol, permessage-deflate offered, Origin), audio queued
during the handshake sent before the metadata, L16 frames of one 20 ms packet (stereo
interleaved caller/callee), and Close 1000 at hangup with no final text.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from tests.conftest import ServiceFactory
from tests.e2e.frontends import offline_words, paced, watch_events
from tests.e2e.test_audio_fork import stereo
from tests.e2e.ws_peer import CLOSE, TEXT, RawWebSocket, libwsc_request
from tests.speech import SENTENCES, phone_bytes


async def connect(port: int, path: str) -> RawWebSocket:
    key = RawWebSocket.new_key()
    ws = await RawWebSocket.connect(port, libwsc_request(path, f"127.0.0.1:{port}", key), key)
    assert "sec-websocket-protocol" not in ws.headers
    assert "sec-websocket-extensions" not in ws.headers  # deflate declined: plain frames
    return ws


async def stream(
    port: int, path: str, audio: bytes, frame: int, metadata: str | None, early_frames: int = 0
) -> list[dict[str, Any]]:
    """One `uuid_audio_stream ... start`: `early_frames` of audio before the metadata (queued
    during the handshake), the rest paced, then hangup. Returns the server's text frames."""
    ws = await connect(port, path)
    replies: list[dict[str, Any]] = []
    frames = [audio[i : i + frame] for i in range(0, len(audio), frame)]
    for chunk in frames[:early_frames]:
        ws.send_binary(chunk)
    if metadata is not None:
        ws.send_text(metadata)
    async for chunk in paced(frames[early_frames:]):
        ws.send_binary(chunk)
        while ws.pending():
            opcode, payload = await ws.receive()
            assert opcode == TEXT  # what FreeSWITCH fires as mod_audio_stream::json
            replies.append(json.loads(payload))
    ws.close(1000)  # hangup: Close 1000 "Normal closure"; libwsc waits 1 s for the reply
    await ws.writer.drain()
    while not ws.closed:
        opcode, payload = await ws.receive(timeout=1)
        if opcode == TEXT:  # callbacks are detached: FreeSWITCH fires no event for these
            replies.append(json.loads(payload))
    ws.writer.close()
    return replies


async def test_stereo_with_late_metadata_and_mono_from_the_url(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    port = service.ports["audio"]
    caller = phone_bytes(SENTENCES[1], "pcm16", 16000)
    callee = phone_bytes(SENTENCES[5], "pcm16", 16000)
    both = stereo(caller, callee) + bytes(1280 * 100)  # the call goes on 2 s after the words
    mono = phone_bytes(SENTENCES[3], "pcm16", 8000) + bytes(320 * 100)
    meta = json.dumps({"uuid": "fs-as-1", "from": "1001", "to": "1002"}, separators=(",", ":"))
    async with watch_events(service) as events:
        stereo_replies, mono_replies = await asyncio.gather(
            stream(port, "/freeswitch/fs-as-1?mix=stereo&rate=16k", both, 1280, meta, 3),
            stream(port, "/freeswitch/fs-as-2?mix=mono&rate=8000", mono, 320, None),
        )
        await events.wait_ended(2)
    channels = np.frombuffer(both, "<i2").reshape(-1, 2)
    for channel, leg in enumerate(("caller", "callee")):
        expected = await offline_words(service, channels[:, channel].astype(np.int16), 16000)
        assert expected and events.words("fs-as-1", leg) == expected
        replied = [
            {k: r[k] for k in ("text", "start", "end")}
            for r in stereo_replies
            if r["type"] == "word" and r["leg"] == leg
        ]
        # FreeSWITCH detaches its callbacks when it hangs up: what the flush finds after the
        # Close reaches the store (above), not the channel.
        assert replied and replied == expected[: len(replied)]
        assert all(r["channel"] == channel for r in stereo_replies if r["leg"] == leg)
    assert all(r["call_id"] == "fs-as-1" for r in stereo_replies)
    started = events.of("fs-as-1")[0]
    assert started["front_end"] == "freeswitch_stream" and started["legs"] == ["caller", "callee"]
    assert started["labels"]["from"] == "1001" and started["labels"]["rate"] == "16000"
    expected = await offline_words(service, np.frombuffer(mono, "<i2").astype(np.int16), 8000)
    assert expected and events.words("fs-as-2") == expected
    replied_mono = [r["text"] for r in mono_replies if r["type"] == "word"]
    assert replied_mono and replied_mono == [w["text"] for w in expected][: len(replied_mono)]


async def test_bad_rate_is_refused_while_another_stream_goes_on(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    port = service.ports["audio"]
    mono = phone_bytes(SENTENCES[0], "pcm16", 8000)

    async def bad_stream() -> tuple[dict[str, Any], int | None]:
        await asyncio.sleep(1.0)
        ws = await connect(port, "/freeswitch/fs-bad?mix=mono&rate=11025")
        ws.send_text('{"uuid":"fs-bad"}')
        opcode, payload = await ws.receive()
        assert opcode == TEXT
        opcode, _ = await ws.receive()
        assert opcode == CLOSE  # mod_audio_stream::disconnect with this code and reason
        ws.writer.close()
        return json.loads(payload), ws.close_code

    async with watch_events(service) as events:
        _, (error, code) = await asyncio.gather(
            stream(port, "/freeswitch/fs-good", mono, 320, '{"caller":"1001"}'), bad_stream()
        )
        await events.wait_ended(1)
    assert error["type"] == "error" and "multiple of 8000" in error["reason"] and code == 1007
    expected = await offline_words(service, np.frombuffer(mono, "<i2").astype(np.int16), 8000)
    assert expected and events.words("fs-good") == expected
    assert "fs-bad" not in events.ended()
