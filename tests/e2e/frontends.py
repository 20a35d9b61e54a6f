"""Helpers for front-end end-to-end tests: watch `/v1/events`, pace audio like a phone."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp

from api.app import Service
from api.transcribe import transcribe_pcm
from telephony.audio import PcmArray, resample_whole
from telephony.audiosocket import AudioSocketCodec


class EventLog:
    """Every message of `WS /v1/events` while the block runs, grouped by call."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, call_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("call_id") == call_id]

    def words(self, call_id: str, leg: str | None = None) -> list[dict[str, Any]]:
        return [
            {k: e[k] for k in ("text", "start", "end")}
            for e in self.of(call_id)
            if e["type"] == "word" and (leg is None or e["leg"] == leg)
        ]

    def ended(self) -> dict[str, dict[str, Any]]:
        return {e["call_id"]: e for e in self.events if e["type"] == "call_ended"}

    async def wait_ended(self, count: int, timeout: float = 60) -> dict[str, dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.ended()) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.ended()


@asynccontextmanager
async def watch_events(
    service: Service, headers: Mapping[str, str] | None = None
) -> AsyncIterator[EventLog]:
    """`WS /v1/events` while the block runs (`headers`: an API key, where the service has keys)."""
    log = EventLog()
    async with aiohttp.ClientSession(headers=headers) as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/v1/events")

        async def read() -> None:
            async for msg in ws:
                log.add(msg.json())

        reader = asyncio.create_task(read())
        try:
            yield log
        finally:
            reader.cancel()
            await ws.close()


async def offline_words(service: Service, pcm: PcmArray, rate: int) -> list[dict[str, Any]]:
    """The offline transcript of the same audio at the wire rate, through the same engine."""
    hub = service.bridge.hub
    transcript = await transcribe_pcm(
        hub, resample_whole(pcm, rate, hub.engine.sample_rate), "reference"
    )
    return [{"text": w.text, "start": w.start_s, "end": w.end_s} for w in transcript.words]


T = TypeVar("T")


async def paced(frames: Sequence[T], frame_s: float = 0.02) -> AsyncIterator[T]:
    """Yield frames at real-time pace (a phone sends one every 20 ms)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n, frame in enumerate(frames):
        delay = start + n * frame_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield frame


# --- peers: each speaks its front end's wire protocol, paced like a phone ----------------------


async def asterisk_call(
    port: int,
    call_id: uuid.UUID,
    slin: bytes,
    rate: int = 8000,
    dtmf: str = "",
    garbage_after: int | None = None,
) -> bytes:
    """Act as Asterisk: UUID, audio in 20 ms frames, then close; returns what we were sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(AudioSocketCodec.encode_uuid(call_id))
    frame = rate // 50 * 2
    frames = [slin[i : i + frame] for i in range(0, len(slin), frame)]
    sent = 0
    async for chunk in paced(frames):
        writer.write(AudioSocketCodec.encode_audio(chunk, rate))
        sent += 1
        if dtmf and sent == 10:
            writer.write(AudioSocketCodec.encode_dtmf(dtmf))
        if garbage_after is not None and sent == garbage_after:
            writer.write(b"\x42\x00\x05hello")  # an unknown kind: the session must end
            break
    await writer.drain()
    writer.close()  # the caller hangs up: Asterisk just closes the socket
    return await reader.read()


async def twilio_call(base_ws: str, call_sid: str, ulaw: bytes) -> None:
    """Act as Twilio: connected, start (inbound track), paced media, stop."""
    start = {
        "event": "start",
        "start": {
            "streamSid": "MZ" + call_sid[2:],
            "accountSid": "AC" + "1" * 32,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {},
        },
    }
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{base_ws}/twilio/media") as ws:
        await ws.send_str(json.dumps(start))
        async for offset in paced(range(0, len(ulaw), 160)):
            payload = base64.b64encode(ulaw[offset : offset + 160]).decode()
            media = {"track": "inbound", "timestamp": str(offset // 8), "payload": payload}
            await ws.send_str(json.dumps({"event": "media", "media": media}))
        await ws.send_str(json.dumps({"event": "stop"}))
        async for _ in ws:
            pass


async def freeswitch_call(base_ws: str, call_id: str, slin: bytes, rate: int = 8000) -> None:
    """Act as mod_audio_fork: metadata, paced mono L16, then hang up (normal close)."""
    url = f"{base_ws}/freeswitch/{call_id}"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, protocols=("audio.drachtio.org",))
        await ws.send_str(json.dumps({"uuid": call_id, "mix": "mono", "rate": rate}))
        frame = rate // 50 * 2
        async for chunk in paced([slin[i : i + frame] for i in range(0, len(slin), frame)]):
            await ws.send_bytes(chunk)
        await ws.close()
