"""FreeSWITCH mod_audio_stream (amigniter): WebSocket `/freeswitch[/<uuid>]`, no subprotocol.

`uuid_audio_stream <uuid> start ws://HOST:8080/freeswitch/<uuid>?mix=stereo&rate=16000 stereo
16k {"caller":"1001"}` makes FreeSWITCH connect and send binary frames of L16 little-endian
audio: mono (the caller), mixed, or stereo (interleaved: left = the caller, right = what the
channel sends, the callee); and its metadata once, as a text frame that may come after the
first audio. Nothing on the wire says the rate or channels, so they come from the URL query
(`mix`, `rate`), or from the metadata when it arrives before any audio. Every text frame we
send becomes a `mod_audio_stream::json` event, verbatim. See
../shared/protocols/freeswitch-audio-stream.md.

mod_audio_fork uses the same paths with subprotocol `audio.drachtio.org`; `handle_freeswitch`
sends each connection to the module it came from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import WSMessage, WSMsgType, web

from engine.base import BridgeError, Closed, EngineEvent, event_to_json
from telephony import audio_fork
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
    WsCodec,
    run_stream,
)

log = logging.getLogger(__name__)

FRONT_END: Final = "freeswitch_stream"
MIXES: Final = ("mono", "mixed", "stereo")
STEREO_LEGS: Final = ("caller", "callee")
MAX_RATE: Final = 192000
METADATA_WAIT_S: Final = 0.5  # audio held back while the metadata may still come (labels)
TEXT_MAX: Final = 8192  # the module's own metadata limit


class AudioStreamError(ProtocolError):
    """Stream parameters we cannot serve (unknown mix, a rate not a multiple of 8000)."""


@dataclass(frozen=True)
class StreamFormat:
    mix: str = "mono"
    rate: int = 8000

    @property
    def channels(self) -> int:
        return 2 if self.mix == "stereo" else 1

    @property
    def legs(self) -> tuple[str, ...]:
        return STEREO_LEGS if self.mix == "stereo" else ("caller",)


def parse_rate(value: Any) -> int:
    """`8k`, `16k`, `16000`: the forms `uuid_audio_stream` takes (a multiple of 8000)."""
    text = str(value).strip().lower()
    try:
        rate = int(text[:-1]) * 1000 if text.endswith("k") else int(text)
    except ValueError:
        raise AudioStreamError(f"rate must be a number, not {value!r}") from None
    if rate <= 0 or rate % 8000 or rate > MAX_RATE:
        raise AudioStreamError(f"rate must be a multiple of 8000 up to {MAX_RATE}, not {rate}")
    return rate


def stream_format(query: Mapping[str, str], metadata: Mapping[str, Any]) -> StreamFormat:
    """The metadata's `mix`/`rate` (`sampleRate`), else the URL query's, else 8 kHz mono."""
    mix = str(metadata.get("mix") or query.get("mix") or "mono").lower()
    if mix not in MIXES:
        raise AudioStreamError(f"mix must be one of {', '.join(MIXES)}, not {mix!r}")
    rate = metadata.get("rate") or metadata.get("sampleRate") or query.get("rate") or 8000
    return StreamFormat(mix, parse_rate(rate))


def parse_metadata(text: str) -> dict[str, Any]:
    """The metadata argument, verbatim: a JSON object, or any text (kept as one label)."""
    try:
        parsed = parse_json(text)
    except ValueError:
        return {"metadata": text}
    return parsed if isinstance(parsed, dict) else {"metadata": text}


@dataclass
class AudioStreamCodec:
    """Binary frames in, one array per channel out (at the wire rate); events to JSON text."""

    format: StreamFormat
    _carry: bytes = field(default=b"", repr=False)

    def receive_audio(self, data: bytes) -> list[PcmArray]:
        data = self._carry + data
        group = 2 * self.format.channels  # a frame may end mid-sample (resampled packets)
        usable = len(data) - len(data) % group
        self._carry = data[usable:]
        return deinterleave(pcm16_decode(data[:usable]), self.format.channels)

    @staticmethod
    def encode_event(call_id: str, leg: str, event: EngineEvent) -> str:
        """What FreeSWITCH fires as `mod_audio_stream::json`: our event JSON (word, partial,
        segment, end_of_turn) with the call, leg and stereo channel (0 caller, 1 callee)."""
        channel = STEREO_LEGS.index(leg) if leg in STEREO_LEGS else 0
        body = {"call_id": call_id, "leg": leg, "channel": channel, **event_to_json(event)}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    @staticmethod
    def encode_error(reason: str) -> str:
        return json.dumps({"type": "error", "reason": reason}, separators=(",", ":"))

    @staticmethod
    def encode_dropped(notice: AudioDropped) -> str:
        """`{"type":"audio_dropped",...}` as `/v1/events` has it (a `mod_audio_stream::json`)."""
        return json.dumps(bus_event_to_json(notice), separators=(",", ":"))


# --- aiohttp adapter --------------------------------------------------------------------------


class AudioStreamFront(WsCodec):
    """mod_audio_stream for the WebSocket adapter (telephony/ws_front.py). The metadata labels
    the call, and may come after the first audio: that audio is held for up to
    `METADATA_WAIT_S`, then the call opens from the URL alone. A phone call, pushed."""

    front_end = FRONT_END
    compress = False  # libwsc offers permessage-deflate; declining it keeps frames plain
    closed_reason = "closed by FreeSWITCH"

    def __init__(self, path_id: str | None, query: Mapping[str, str]) -> None:
        self.path_id = path_id
        self.query = query
        self.metadata: dict[str, Any] | None = None
        self.opened = False
        self._held: list[bytes] = []  # audio before the metadata
        self._held_since = 0.0

    def _open(self) -> tuple[FrontEvent, ...]:
        """The call, then the audio held for it."""
        meta = self.metadata or {}
        fmt = stream_format(self.query, meta)
        labels = {"mix": fmt.mix, "rate": str(fmt.rate)}
        for source in (meta, self.query):
            for key, value in source.items():
                labels.setdefault(str(key), str(value))
        call_id = self.path_id or str(meta.get("uuid") or meta.get("callId") or "") or None
        self.opened = True
        audio = AudioFormat(Encoding.PCM16, fmt.rate, fmt.channels)
        held, self._held = self._held, []
        return (OpenCall(fmt.legs, audio, call_id, labels), *(Media(None, d) for d in held))

    def receive(self, msg: WSMessage) -> Received:
        if msg.type == WSMsgType.BINARY:
            if self.opened:
                return Media(None, msg.data)
            now = time.monotonic()
            if not self._held:
                self._held_since = now
            self._held.append(msg.data)
            if now - self._held_since < METADATA_WAIT_S:
                return None
            return self._open()  # no metadata yet: the URL alone says it all
        if msg.type != WSMsgType.TEXT:
            return None
        if self.metadata is None:
            self.metadata = parse_metadata(msg.data[:TEXT_MAX])
            if not self.opened:
                return self._open()
            return Skipped("metadata after the audio: the call is labelled already")
        return Skipped("a text frame (send_text / stop <text>): nothing to act on")

    def at_close(self) -> Received:
        if not self.opened and self._held:  # a stream shorter than the wait, then hangup
            return self._open()
        return None

    def may_be_media(self, msg: WSMessage) -> bool:
        return msg.type == WSMsgType.BINARY

    def encode_event(self, call: Call, leg: str, event: EngineEvent) -> str | None:
        if isinstance(event, Closed):
            return None
        return AudioStreamCodec.encode_event(call.id, leg, event)

    def encode_rejection(self, exc: BridgeError) -> str:
        # An error text (a `::json` event), then a close whose code and reason FreeSWITCH
        # reports in `mod_audio_stream::disconnect`.
        return AudioStreamCodec.encode_error(str(exc))

    def encode_dropped(self, notice: AudioDropped) -> str:
        return AudioStreamCodec.encode_dropped(notice)


async def handle_stream(request: web.Request) -> web.StreamResponse:
    front = AudioStreamFront(request.match_info.get("call_id"), request.query)
    return await run_stream(request, front)


async def handle_freeswitch(request: web.Request) -> web.StreamResponse:
    """`/freeswitch[/<uuid>]`: mod_audio_fork offers its subprotocol, mod_audio_stream none."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    if audio_fork.SUBPROTOCOL in (p.strip() for p in offered.split(",")):
        return await audio_fork.handle_fork(request)
    return await handle_stream(request)


def add_routes(app: web.Application, hub: CallHub) -> None:
    """Both FreeSWITCH modules on `/freeswitch` and `/freeswitch/{call_id}` (instead of
    `audio_fork.add_routes`)."""
    app[HUB] = hub
    app.router.add_get("/freeswitch", handle_freeswitch)
    app.router.add_get("/freeswitch/{call_id}", handle_freeswitch)
