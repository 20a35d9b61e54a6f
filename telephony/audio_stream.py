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

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import WSMessage, WSMsgType, web

from engine.base import BridgeError, Closed, EngineEvent, event_to_json
from telephony import audio_fork
from telephony.audio import PcmArray, ResampleStream, deinterleave, pcm16_decode
from telephony.errors import ProtocolError, rejection_for, ws_close_at_end
from telephony.limits import clean_labels, limits_of, parse_json
from telephony.session import AudioDropped, Call, CallHub, bus_event_to_json
from telephony.ws_front import HUB, heartbeat_for, messages, send_soon

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


async def handle_stream(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    # libwsc offers permessage-deflate; declining it is allowed and keeps frames plain.
    size = limits_of(request).websocket_max_message_bytes
    ws = web.WebSocketResponse(
        heartbeat=heartbeat_for(request, True), compress=False, max_msg_size=size
    )
    await ws.prepare(request)
    path_id = request.match_info.get("call_id")
    loop = asyncio.get_running_loop()
    call: Call | None = None
    codec: AudioStreamCodec | None = None
    resamplers: dict[str, ResampleStream] = {}
    metadata: dict[str, Any] | None = None
    held: list[bytes] = []  # audio before the metadata, for at most METADATA_WAIT_S
    held_since = 0.0
    reason = "closed by FreeSWITCH"

    async def reply(leg: str, event: EngineEvent) -> None:
        if call is not None and not ws.closed and not isinstance(event, Closed):
            await ws.send_str(AudioStreamCodec.encode_event(call.id, leg, event))

    def open_call() -> tuple[Call, AudioStreamCodec]:
        meta = metadata or {}
        fmt = stream_format(request.query, meta)
        labels = {"mix": fmt.mix, "rate": str(fmt.rate)}
        for source in (meta, request.query):
            for key, value in source.items():
                labels.setdefault(str(key), str(value))
        call_id = path_id or str(meta.get("uuid") or meta.get("callId") or "") or None
        opened = hub.open_call(
            FRONT_END, legs=fmt.legs, call_id=call_id, labels=clean_labels(labels), reply=reply
        )
        for leg in fmt.legs:
            resamplers[leg] = ResampleStream(fmt.rate, opened.sample_rate)
        # The engine fell behind and dropped audio: FreeSWITCH fires it as an event.
        opened.on_audio_dropped = lambda n: send_soon(ws, AudioStreamCodec.encode_dropped(n))
        return opened, AudioStreamCodec(fmt)

    def push(data: bytes) -> None:
        assert call is not None and codec is not None
        for leg, pcm in zip(codec.format.legs, codec.receive_audio(data), strict=True):
            call.leg(leg).push(resamplers[leg].process(pcm))

    def push_direct(msg: WSMessage) -> bool:  # the loop's BINARY branch, once the call is open
        if msg.type != WSMsgType.BINARY or call is None or call.ended:
            return False
        push(msg.data)
        return True

    try:
        async for msg in messages(ws, request, direct=push_direct):
            if msg.type == WSMsgType.TEXT:
                if metadata is None and call is None:
                    metadata = parse_metadata(msg.data[:TEXT_MAX])
                    call, codec = open_call()
                    for data in held:
                        push(data)
                    held.clear()
                elif metadata is None:  # late metadata: the call is labelled already
                    metadata = parse_metadata(msg.data[:TEXT_MAX])
                    log.info(
                        "metadata after the audio", extra={"call_id": call.id if call else None}
                    )
                else:  # send_text / stop <text>: nothing for us to act on
                    log.info("freeswitch text frame", extra={"call_id": call.id if call else None})
            elif msg.type == WSMsgType.BINARY:
                if call is None:
                    if not held:
                        held_since = loop.time()
                    held.append(msg.data)
                    if loop.time() - held_since < METADATA_WAIT_S:
                        continue
                    call, codec = open_call()  # no metadata yet: the URL alone says it all
                    for data in held:
                        push(data)
                    held.clear()
                else:
                    push(msg.data)
                if call.ended:  # by the engine (a lost engine node)
                    break
            elif msg.type == WSMsgType.ERROR:
                reason = f"connection error: {ws.exception()}"
                break
        if call is None and held:  # a stream shorter than the wait, then hangup
            call, codec = open_call()
            for data in held:
                push(data)
    except BridgeError as exc:
        # One place for every refusal: an error text (a `::json` event), then a close whose
        # code and reason FreeSWITCH reports in `mod_audio_stream::disconnect`.
        log.warning("mod_audio_stream refused: %s", exc, extra={"front_end": FRONT_END})
        reason = f"rejected: {exc}"
        if not ws.closed:
            await ws.send_str(AudioStreamCodec.encode_error(str(exc)))
            await ws.close(code=rejection_for(exc).ws_close, message=str(exc).encode()[:120])
    finally:
        if call is not None:
            await call.end_flushing(resamplers, reason)
        if not ws.closed:
            code, message = ws_close_at_end(call)
            await ws.close(code=code, message=message)
    return ws


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
