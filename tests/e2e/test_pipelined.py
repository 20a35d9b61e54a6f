"""A client that writes its upgrade request, its audio and its end in one `sendall`.

Embedded clients and proxies pipeline: the first frames (here all of them, and the stop or
close) arrive with the handshake, before the server has answered it. On every WebSocket audio
route, on aiohttp's own reader and on our direct one (telephony/direct_ws.py), every word must
come back and the call must end as the protocol ends it.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

from telephony import direct_ws, ws_front
from telephony.audio import PcmArray, pcm16_to_float
from tests.conftest import ServiceFactory
from tests.e2e.frontends import offline_words, watch_events
from tests.e2e.ws_peer import (
    BINARY,
    CLOSE,
    TEXT,
    RawWebSocket,
    asterisk_request,
    client_frame,
    libwsc_request,
)
from tests.speech import SENTENCES, phone_bytes

SENTENCE = SENTENCES[1]


def close_frame(code: int = 1000) -> bytes:
    return client_frame(CLOSE, struct.pack("!H", code))


def text(message: Any) -> bytes:
    return client_frame(TEXT, json.dumps(message, separators=(",", ":")).encode())


def chunks(audio: bytes, size: int) -> list[bytes]:
    return [audio[i : i + size] for i in range(0, len(audio), size)]


def plain_request(path: str, host: str, key: str, protocol: str | None = None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class Route:
    """One route: its upgrade, everything the client sends, and the audio the engine hears."""

    name: str
    request: Callable[[str, str], bytes]  # (host, key) -> the upgrade request
    frames: bytes  # every frame, the end (stop / close) included
    pcm: PcmArray  # what the words come from
    rate: int
    closed_message: bool = False  # the JSON front ends: a `closed` text before the close


def _ulaw_pcm() -> tuple[bytes, PcmArray]:
    from telephony.audio import ulaw_decode

    ulaw = phone_bytes(SENTENCE, "mulaw", 8000)
    return ulaw, ulaw_decode(ulaw)


def route(name: str) -> Route:
    ulaw, ulaw_pcm = _ulaw_pcm()
    slin = phone_bytes(SENTENCE, "pcm16", 8000)
    slin_pcm = np.frombuffer(slin, "<i2").astype(np.int16)
    if name == "root":
        pcm24 = phone_bytes(SENTENCE, "pcm16", 24000)
        frames = b"".join(client_frame(BINARY, c) for c in chunks(pcm24, 4800))
        return Route(
            name,
            lambda host, key: plain_request("/", host, key),
            frames + text({"type": "stop"}),
            np.frombuffer(pcm24, "<i2").astype(np.int16),
            24000,
            closed_message=True,
        )
    if name == "stream":
        frames = b"".join(client_frame(BINARY, c) for c in chunks(ulaw, 160))
        return Route(
            name,
            lambda h, k: plain_request("/v1/stream?encoding=mulaw&sample_rate=8000", h, k),
            frames + text({"type": "stop"}),
            ulaw_pcm,
            8000,
            closed_message=True,
        )
    if name == "deepgram":
        frames = b"".join(client_frame(BINARY, c) for c in chunks(ulaw, 160))
        return Route(
            name,
            lambda h, k: plain_request("/v1/listen?encoding=mulaw&sample_rate=8000", h, k),
            frames + text({"type": "CloseStream"}),
            ulaw_pcm,
            8000,
        )
    if name == "twilio":
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "streamSid": "MZ" + "2" * 32,
                "accountSid": "AC" + "1" * 32,
                "callSid": "CA" + "3" * 32,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {},
            },
        }
        media = [
            text(
                {
                    "event": "media",
                    "media": {
                        "track": "inbound",
                        "timestamp": str(n * 20),
                        "payload": base64.b64encode(c).decode(),
                    },
                }
            )
            for n, c in enumerate(chunks(ulaw, 160))
        ]
        frames = text({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        frames += text(start) + b"".join(media) + text({"event": "stop"})
        return Route(
            name, lambda h, k: plain_request("/twilio/media", h, k), frames, ulaw_pcm, 8000
        )
    if name == "audio_fork":
        meta = {"uuid": "fs-pipelined", "mix": "mono", "rate": 8000}
        frames = text(meta) + b"".join(client_frame(BINARY, c) for c in chunks(slin, 320))
        return Route(
            name,
            lambda h, k: plain_request("/freeswitch/fs-pipelined", h, k, "audio.drachtio.org"),
            frames + close_frame(),
            slin_pcm,
            8000,
        )
    if name == "audio_stream":
        frames = text({"uuid": "fs-pipelined"})
        frames += b"".join(client_frame(BINARY, c) for c in chunks(slin, 320))
        return Route(
            name,
            lambda h, k: libwsc_request("/freeswitch/fs-pipelined?mix=mono&rate=8000", h, k),
            frames + close_frame(),
            slin_pcm,
            8000,
        )
    if name == "asterisk_media":
        media_start = (
            "MEDIA_START connection_id:stt channel:WebSocket/stt/0x7f1cc000a6d1 "
            "channel_id:1733000000.1 format:ulaw optimal_frame_size:160 ptime:20"
        )
        frames = client_frame(TEXT, media_start.encode())
        frames += b"".join(client_frame(BINARY, c) for c in chunks(ulaw, 160))
        return Route(
            name,
            lambda h, k: asterisk_request("/asterisk/media", h, k, "media"),
            frames + close_frame(),
            ulaw_pcm,
            8000,
        )
    if name == "aeap":
        setup = {
            "request": "setup",
            "version": "0.1.0",
            "codecs": [{"name": "ulaw"}],
            "params": {},
            "id": "6f1c2a4e-0000-4000-8000-000000000001",
        }
        frames = text(setup) + b"".join(client_frame(BINARY, c) for c in chunks(ulaw, 160))
        return Route(
            name,
            lambda h, k: asterisk_request("/asterisk/aeap", h, k, "speech_to_text"),
            frames + close_frame(),
            ulaw_pcm,
            8000,
        )
    assert name == "moshi"
    pcm24 = phone_bytes(SENTENCE, "pcm16", 24000)
    pcm = np.frombuffer(pcm24, "<i2").astype(np.int16)
    floats = pcm16_to_float(pcm)
    # Kyutai's client: the audio, silence after it, a Marker, more silence; it closes once
    # the Marker is back (every word is out then), which the test does below.
    floats = np.concatenate([floats, np.zeros(24000 * 2, np.float32)])
    frames = b"".join(
        client_frame(
            BINARY,
            msgpack.packb(
                {"type": "Audio", "pcm": [float(x) for x in floats[i : i + 1920]]},
                use_single_float=True,
            ),
        )
        for i in range(0, len(floats), 1920)
    )
    marker = client_frame(BINARY, msgpack.packb({"type": "Marker", "id": 7}))
    # Audio after the Marker settles what came before it (a VAD ends its pause on it).
    after = client_frame(
        BINARY, msgpack.packb({"type": "Audio", "pcm": [0.0] * 24000}, use_single_float=True)
    )
    return Route(
        name,
        lambda h, k: plain_request("/api/asr-streaming", h, k),
        frames + marker + after,
        np.concatenate([pcm, np.zeros(24000 * 3, np.int16)]),
        24000,
    )


ROUTES = (
    "root",
    "stream",
    "deepgram",
    "twilio",
    "audio_fork",
    "audio_stream",
    "asterisk_media",
    "aeap",
    "moshi",
)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "aiohttp"])
@pytest.mark.parametrize("name", ROUTES)
async def test_upgrade_audio_and_end_in_one_write(
    start_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch, name: str, direct: bool
) -> None:
    if not direct:
        if not direct_ws.DIRECT_SUPPORTED:
            pytest.fail("the direct path is the one this aiohttp takes: nothing to compare")
        monkeypatch.setattr(ws_front, "DIRECT_SUPPORTED", False)  # aiohttp's own reader
    service = await start_service()
    port = service.ports["audio"]
    spec = route(name)
    key = RawWebSocket.new_key()
    async with watch_events(service) as events:
        request = spec.request(f"127.0.0.1:{port}", key)
        ws = await RawWebSocket.connect(port, request, key, pipelined=spec.frames)
        received: list[tuple[int, bytes]] = []
        while True:
            opcode, payload = await ws.receive(timeout=30)
            if opcode == CLOSE:
                break
            received.append((opcode, payload))
            if name == "moshi" and msgpack.unpackb(payload)["type"] == "Marker":
                ws.close(1000)  # the Marker is back: every word is out
        ws.writer.close()
        ended = await events.wait_ended(1, timeout=30)
    assert ws.close_code == 1000, (ws.close_code, ws.close_reason)
    (call_id,) = ended
    expected = await offline_words(service, spec.pcm, spec.rate)
    assert expected and events.words(call_id) == expected
    texts = [json.loads(p) for op, p in received if op == TEXT and p.startswith(b"{")]
    if spec.closed_message:
        assert texts[-1]["type"] == "closed"
        words = [t["text"] for t in texts if t["type"] == "word"]
        assert words == [w["text"] for w in expected]
    if name == "deepgram":
        assert texts[-1]["type"] == "Metadata"
        heard = [
            w["word"]
            for t in texts
            if t["type"] == "Results" and t["is_final"]
            for w in t["channel"]["alternatives"][0]["words"]
        ]
        assert len(heard) == len(expected)
    if name == "aeap":
        assert texts[0]["response"] == "setup" and "error_msg" not in texts[0]
    if name == "moshi":
        kinds = [msgpack.unpackb(p)["type"] for op, p in received if op == BINARY]
        assert kinds[0] == "Ready" and kinds.count("Word") == len(expected)
        assert kinds[-1] == "Marker"
    if name == "asterisk_media":
        assert received[0] == (TEXT, b"ANSWER")
