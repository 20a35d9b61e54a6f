"""FreeSWITCH mod_audio_fork (WebSocket `/freeswitch[/<uuid>]`, sub-protocol audio.drachtio.org).

FreeSWITCH connects, sends its metadata string as the first text frame (normally JSON), then
binary frames of L16 little-endian audio at the rate given to `uuid_audio_fork ... start`: mono
or mixed (one channel) or stereo (interleaved; left = what the channel receives = the caller,
right = what it sends = the callee). A zero-length binary frame means graceful shutdown.
We answer with JSON text frames of type `transcription`, which FreeSWITCH fires as
`mod_audio_fork::transcription` events for ESL listeners. See
../shared/protocols/freeswitch-audio-fork.md.

The wire carries no rate or channel count, so they come from the metadata (`rate` or
`sampleRate`, `mix`), else from the URL query (`?rate=16000&mix=stereo`), else 8 kHz mono.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import WSMessage, WSMsgType, web

from engine.base import BridgeError, EngineEvent, event_to_json
from telephony.audio import PcmArray, ResampleStream, deinterleave, pcm16_decode
from telephony.errors import ProtocolError, rejection_for, ws_close_at_end
from telephony.limits import parse_json
from telephony.session import AudioDropped, Call, CallHub, bus_event_to_json
from telephony.ws_front import HUB, messages, open_websocket

log = logging.getLogger(__name__)

FRONT_END: Final = "freeswitch"
SUBPROTOCOL: Final = "audio.drachtio.org"
MIXES: Final = ("mono", "mixed", "stereo")
RATES: Final = (8000, 16000, 24000, 32000, 48000, 64000)
STEREO_LEGS: Final = ("caller", "callee")


class AudioForkError(ProtocolError):
    """Stream parameters we cannot serve (unknown mix, unsupported rate)."""


@dataclass(frozen=True)
class StreamFormat:
    mix: str = "mono"
    rate: int = 8000
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return 2 if self.mix == "stereo" else 1

    @property
    def legs(self) -> tuple[str, ...]:
        return STEREO_LEGS if self.mix == "stereo" else ("caller",)


def stream_format(metadata_text: str | None, query: Mapping[str, str]) -> StreamFormat:
    """Mix and rate from the metadata JSON, else the URL query, else 8 kHz mono."""
    metadata: dict[str, Any] = {}
    if metadata_text:
        try:
            parsed = parse_json(metadata_text)
        except ValueError:
            parsed = {"text": metadata_text}  # metadata need not be JSON; keep it as a label
        metadata = parsed if isinstance(parsed, dict) else {"metadata": parsed}
    mix = str(metadata.get("mix") or query.get("mix") or "mono").lower()
    rate_value = metadata.get("rate") or metadata.get("sampleRate") or query.get("rate") or 8000
    rate_text = str(rate_value).lower().removesuffix("k")
    try:
        rate = int(rate_text) * (1000 if str(rate_value).lower().endswith("k") else 1)
    except ValueError:
        raise AudioForkError(f"rate must be a number, not {rate_value!r}") from None
    if mix not in MIXES:
        raise AudioForkError(f"mix must be one of {', '.join(MIXES)}, not {mix!r}")
    if rate not in RATES:
        raise AudioForkError(f"rate must be one of {', '.join(map(str, RATES))}, not {rate}")
    return StreamFormat(mix, rate, metadata)


class AudioForkCodec:
    """Binary frames in, one array of samples per channel out (at the wire rate)."""

    def __init__(self, fmt: StreamFormat) -> None:
        self.format = fmt
        self._carry = b""

    def receive_audio(self, data: bytes) -> list[PcmArray]:
        data = self._carry + data
        frame = 2 * self.format.channels
        usable = len(data) - len(data) % frame
        self._carry = data[usable:]
        pcm = pcm16_decode(data[:usable])
        return deinterleave(pcm, self.format.channels)

    @staticmethod
    def encode_transcription(call_id: str, leg: str, event: EngineEvent) -> str:
        """What FreeSWITCH turns into a `mod_audio_fork::transcription` event."""
        return json.dumps(
            {
                "type": "transcription",
                "data": {"call_id": call_id, "leg": leg, **event_to_json(event)},
            }
        )

    @staticmethod
    def encode_error(reason: str) -> str:
        """Fired as `mod_audio_fork::error` before we close."""
        return json.dumps({"type": "error", "data": {"reason": reason}})

    @staticmethod
    def encode_dropped(notice: AudioDropped) -> str:
        """Fired as `mod_audio_fork::json`: the module ignores a `type` it does not know, so
        this one has none; `event` says what it is."""
        body = bus_event_to_json(notice)
        body["event"] = body.pop("type")
        return json.dumps(body, separators=(",", ":"))


def send_soon(ws: web.WebSocketResponse, text: str) -> None:
    """Send from synchronous code (a push in the parser's callback); order is kept by the
    socket's writer, and a closing socket is no error."""
    if ws.closed:
        return
    task = asyncio.ensure_future(ws.send_str(text))
    task.add_done_callback(_quiet)


def _quiet(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # the socket closed under it: nothing to tell


# --- aiohttp adapter --------------------------------------------------------------------------


async def handle_fork(request: web.Request) -> web.StreamResponse:
    ws = open_websocket(request, protocols=(SUBPROTOCOL,), read_by_messages=True)
    await ws.prepare(request)
    hub = request.app[HUB]
    path_id = request.match_info.get("call_id")
    call: Call | None = None
    codec: AudioForkCodec | None = None
    resamplers: dict[str, ResampleStream] = {}
    reason = "closed by FreeSWITCH"

    async def reply(leg: str, event: EngineEvent) -> None:
        if call is not None and not ws.closed and event_to_json(event)["type"] != "closed":
            await ws.send_str(AudioForkCodec.encode_transcription(call.id, leg, event))

    def open_call(metadata_text: str | None) -> tuple[Call, AudioForkCodec]:
        fmt = stream_format(metadata_text, request.query)
        labels = {"mix": fmt.mix, "rate": str(fmt.rate)}
        labels.update({str(k): str(v) for k, v in fmt.metadata.items() if k not in ("mix", "rate")})
        call_id = (
            path_id or str(fmt.metadata.get("uuid") or fmt.metadata.get("callId") or "") or None
        )
        opened = hub.open_call(
            FRONT_END, legs=fmt.legs, call_id=call_id, labels=labels, reply=reply
        )
        for leg in fmt.legs:
            resamplers[leg] = ResampleStream(fmt.rate, opened.sample_rate)
        # The engine fell behind and dropped audio: FreeSWITCH fires it as an event.
        opened.on_audio_dropped = lambda n: send_soon(ws, AudioForkCodec.encode_dropped(n))
        return opened, AudioForkCodec(fmt)

    def push(data: bytes) -> None:
        assert call is not None and codec is not None
        for leg, pcm in zip(codec.format.legs, codec.receive_audio(data), strict=True):
            call.leg(leg).push(resamplers[leg].process(pcm))

    def push_direct(msg: WSMessage) -> bool:  # the loop's BINARY branch, once the call is open
        if msg.type != WSMsgType.BINARY or not msg.data or call is None or call.ended:
            return False
        push(msg.data)
        return True

    try:
        async for msg in messages(ws, request, direct=push_direct):
            if msg.type == WSMsgType.TEXT:
                if call is None:
                    call, codec = open_call(msg.data)
                else:
                    log.info(
                        "freeswitch text frame", extra={"call_id": call.id, "front_end": FRONT_END}
                    )
            elif msg.type == WSMsgType.BINARY:
                if call is None:  # the metadata frame was lost (it happens under load)
                    call, codec = open_call(None)
                if not msg.data:
                    reason = "graceful shutdown"
                    break
                push(msg.data)
                if call.ended:  # by the engine (a lost engine node)
                    break
    except BridgeError as exc:
        log.warning("freeswitch fork refused: %s", exc, extra={"front_end": FRONT_END})
        reason = f"rejected: {exc}"
        if not ws.closed:
            await ws.send_str(AudioForkCodec.encode_error(str(exc)))
            await ws.close(code=rejection_for(exc).ws_close, message=str(exc).encode()[:120])
    finally:
        if call is not None:
            await call.end_flushing(resamplers, reason)
        if not ws.closed:
            code, message = ws_close_at_end(call)
            await ws.close(code=code, message=message)
    return ws


def add_routes(app: web.Application, hub: CallHub) -> None:
    app[HUB] = hub
    app.router.add_get("/freeswitch", handle_fork)
    app.router.add_get("/freeswitch/{call_id}", handle_fork)
