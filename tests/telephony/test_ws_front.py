"""The WebSocket front-end adapter (telephony/ws_front.py) on a real loopback socket, with a
small codec of its own and the sink engine: what every front end on it gets once. Interleaved
audio cut anywhere still makes two whole legs, a media clock's gap is silence in place (a clock
jump is not), keys land where the wire was, and bad input, a full engine or a rate no decoder
takes close the stream with the protocol's code while another call goes on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import numpy as np
from aiohttp import WSMessage, WSMsgType, web

from engine.base import BridgeError
from engine.sink import SinkEngine
from telephony.audio import Encoding, ulaw_encode
from telephony.bus import BusEvent, CallEnded, DtmfPressed
from telephony.call import CallHub
from telephony.errors import ProtocolError
from telephony.ws_front import (
    HUB,
    AudioFormat,
    Dtmf,
    Media,
    OpenCall,
    Received,
    Stopped,
    WsCodec,
    run_stream,
)


class ProbeCodec(WsCodec):
    """A protocol of JSON text messages (open, media with a clock, dtmf, bad, stop) and binary
    frames of interleaved audio."""

    front_end = "probe"

    def receive(self, msg: WSMessage) -> Received:
        if msg.type == WSMsgType.BINARY:
            return Media(None, msg.data)
        message = json.loads(msg.data)
        if "open" in message:
            spec = message["open"]
            audio = AudioFormat(Encoding(spec["encoding"]), spec["rate"], spec.get("channels", 1))
            return OpenCall(tuple(spec["legs"]), audio, spec["call_id"])
        if "media" in message:
            media = message["media"]
            return Media(media["leg"], bytes.fromhex(media["hex"]), media["ts"])
        if "dtmf" in message:
            return Dtmf(message["dtmf"])
        if "bad" in message:
            raise ProtocolError(f"bad input: {message['bad']}")
        return Stopped("stop")

    def encode_rejection(self, exc: BridgeError) -> str:
        return json.dumps({"error": str(exc)})


@dataclass
class Bridge:
    port: int
    events: list[BusEvent]

    def ended(self, call_id: str) -> CallEnded:
        return next(e for e in self.events if isinstance(e, CallEnded) and e.call_id == call_id)


@asynccontextmanager
async def bridge(capacity: int = 4) -> AsyncIterator[Bridge]:
    hub = CallHub(SinkEngine(capacity))
    events: list[BusEvent] = []
    hub.bus.add_sink(events.append)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await run_stream(request, ProbeCodec())

    app = web.Application()
    app[HUB] = hub
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Bridge(runner.addresses[0][1], events)
    finally:
        await runner.cleanup()


def opening(call_id: str, legs: list[str], encoding: str, rate: int, channels: int = 1) -> str:
    spec = {"legs": legs, "encoding": encoding, "rate": rate, "channels": channels}
    return json.dumps({"open": {**spec, "call_id": call_id}})


async def closing(ws: aiohttp.ClientWebSocketResponse) -> list[str]:
    """The texts the bridge sends until it closes."""
    texts = []
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            texts.append(msg.data)
    return texts


async def test_interleaved_frames_cut_anywhere_make_two_whole_legs() -> None:
    frames = np.arange(8000 * 2, dtype=np.int16) % 1000  # 1 s of two channels at 8 kHz
    wire = frames.astype("<i2").tobytes()
    async with bridge() as b, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://127.0.0.1:{b.port}/") as ws:
            await ws.send_str(opening("stereo-1", ["caller", "agent"], "pcm16", 8000, 2))
            for at in range(0, len(wire), 333):  # 333 bytes: frames and samples cut in two
                await ws.send_bytes(wire[at : at + 333])
            await ws.send_str("{}")  # stop
            await closing(ws)
        assert ws.close_code == 1000
        await asyncio.sleep(0.05)
        audio_s = b.ended("stereo-1").audio_s
    assert abs(audio_s["caller"] - 1.0) < 0.002 and abs(audio_s["agent"] - 1.0) < 0.002


async def test_a_clock_gap_is_silence_in_place_and_a_clock_jump_is_not() -> None:
    packet = ulaw_encode(np.zeros(160, dtype=np.int16)).hex()  # 20 ms

    def media(ts: int) -> str:
        return json.dumps({"media": {"leg": "caller", "ts": ts, "hex": packet}})

    async with bridge() as b, aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://127.0.0.1:{b.port}/") as ws:
            await ws.send_str(opening("gap-1", ["caller"], "mulaw", 8000))
            # The clock starts at the first timestamp; 600 ms are missing after the second
            # packet; then the clock jumps 20 s (a reset, not loss).
            for ts in (5000, 5020, 5640):
                await ws.send_str(media(ts))
            await ws.send_str(json.dumps({"dtmf": "5"}))
            await ws.send_str(media(25660))
            await ws.send_str("{}")
            await closing(ws)
        await asyncio.sleep(0.05)
        audio_s = b.ended("gap-1").audio_s["caller"]
        keys = [e for e in b.events if isinstance(e, DtmfPressed)]
    assert abs(audio_s - 0.68) < 0.002  # 4 packets and the 600 ms gap, not the 20 s jump
    assert [k.digit for k in keys] == ["5"] and abs(keys[0].at_s - 0.66) < 0.002


async def test_bad_input_closes_with_1007_after_the_last_words_and_spares_the_call_beside() -> None:
    pcm = np.zeros(1600, dtype=np.int16).tobytes()  # 200 ms at 8 kHz
    async with bridge() as b, aiohttp.ClientSession() as http:
        async with (
            http.ws_connect(f"ws://127.0.0.1:{b.port}/") as bad,
            http.ws_connect(f"ws://127.0.0.1:{b.port}/") as good,
        ):
            await bad.send_str(opening("bad-1", ["caller"], "pcm16", 8000))
            await good.send_str(opening("good-1", ["caller"], "pcm16", 8000))
            await bad.send_bytes(pcm)
            await good.send_bytes(pcm)
            await bad.send_str(json.dumps({"bad": "a broken message"}))
            texts = await closing(bad)
            await good.send_bytes(pcm)  # the call beside goes on
            await good.send_str("{}")
            await closing(good)
        await asyncio.sleep(0.05)
        assert texts == [json.dumps({"error": "bad input: a broken message"})]
        assert bad.close_code == 1007 and good.close_code == 1000
        assert b.ended("bad-1").reason == "rejected: bad input: a broken message"
        assert b.ended("good-1").reason == "stop"
        assert abs(b.ended("good-1").audio_s["caller"] - 0.4) < 0.002


async def test_a_full_engine_closes_with_1013_and_an_odd_rate_with_1007() -> None:
    async with bridge(capacity=1) as b, aiohttp.ClientSession() as http:
        async with (
            http.ws_connect(f"ws://127.0.0.1:{b.port}/") as first,
            http.ws_connect(f"ws://127.0.0.1:{b.port}/") as second,
        ):
            await first.send_str(opening("full-1", ["caller"], "pcm16", 8000))
            await asyncio.sleep(0.1)  # admitted first
            await second.send_str(opening("full-2", ["caller"], "pcm16", 8000))
            await closing(second)
            assert second.close_code == 1013
            await first.send_str("{}")
            await closing(first)
        async with http.ws_connect(f"ws://127.0.0.1:{b.port}/") as odd:
            await odd.send_str(opening("odd-1", ["caller"], "pcm16", 40000))
            await closing(odd)
        assert odd.close_code == 1007
        assert first.close_code == 1000 and b.ended("full-1").reason == "stop"
