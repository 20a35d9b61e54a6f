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

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import WSMessage, WSMsgType, web

from engine.base import BridgeError, Closed, EngineEvent, event_to_json
from telephony.audio import Encoding, PcmArray, deinterleave, pcm16_decode
from telephony.bus import AudioDropped, bus_event_to_json
from telephony.call import Call, CallHub
from telephony.errors import ProtocolError
from telephony.limits import parse_json
from telephony.ws_front import (
    HUB,
    AudioFormat,
    FrontEvent,
    Media,
    OpenCall,
    Received,
    Skipped,
    Stopped,
    WsCodec,
    run_stream,
)

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


class AudioForkFront(WsCodec):
    """mod_audio_fork for the WebSocket adapter (telephony/ws_front.py): the metadata frame (or,
    when it was lost, the first audio) opens the call; a phone call, pushed in real time."""

    front_end = FRONT_END
    protocols = (SUBPROTOCOL,)
    closed_reason = "closed by FreeSWITCH"

    def __init__(self, path_id: str | None, query: Mapping[str, str]) -> None:
        self.path_id = path_id
        self.query = query
        self.opened = False

    def _open(self, metadata_text: str | None) -> OpenCall:
        fmt = stream_format(metadata_text, self.query)
        labels = {"mix": fmt.mix, "rate": str(fmt.rate)}
        labels.update({str(k): str(v) for k, v in fmt.metadata.items() if k not in ("mix", "rate")})
        call_id = self.path_id or str(fmt.metadata.get("uuid") or fmt.metadata.get("callId") or "")
        self.opened = True
        return OpenCall(
            fmt.legs, AudioFormat(Encoding.PCM16, fmt.rate, fmt.channels), call_id or None, labels
        )

    def receive(self, msg: WSMessage) -> Received:
        if msg.type == WSMsgType.BINARY:
            audio: FrontEvent = Media(None, msg.data) if msg.data else Stopped("graceful shutdown")
            if not self.opened:  # the metadata frame was lost (it happens under load)
                return self._open(None), audio
            return audio
        if msg.type != WSMsgType.TEXT:
            return None
        if not self.opened:
            return self._open(msg.data)
        return Skipped("a text frame after the metadata")

    def may_be_media(self, msg: WSMessage) -> bool:
        return msg.type == WSMsgType.BINARY and bool(msg.data)

    def encode_event(self, call: Call, leg: str, event: EngineEvent) -> str | None:
        if isinstance(event, Closed):
            return None
        return AudioForkCodec.encode_transcription(call.id, leg, event)

    def encode_rejection(self, exc: BridgeError) -> str:
        return AudioForkCodec.encode_error(str(exc))

    def encode_dropped(self, notice: AudioDropped) -> str:
        return AudioForkCodec.encode_dropped(notice)


# --- aiohttp adapter --------------------------------------------------------------------------


async def handle_fork(request: web.Request) -> web.StreamResponse:
    front = AudioForkFront(request.match_info.get("call_id"), request.query)
    return await run_stream(request, front)


def add_routes(app: web.Application, hub: CallHub) -> None:
    app[HUB] = hub
    app.router.add_get("/freeswitch", handle_fork)
    app.router.add_get("/freeswitch/{call_id}", handle_fork)
