"""Asterisk chan_websocket (WebSocket `/asterisk/media`, subprotocol `media`).

`Dial(WebSocket/<connection>/c(slin16))` makes Asterisk connect to us as a WebSocket client.
Its first message is the text event `MEDIA_START` (plain text `MEDIA_START key:value ...` or a
JSON object, as `chan_websocket.conf` / the `f()` dial option chose) announcing the format:
`ulaw`, `alaw` or `slin`, `slin12` ... `slin192`; binary messages of raw audio in that format
follow, and text events (`DTMF_END`, `MEDIA_XOFF`, ...). We send commands in the call's format:
`ANSWER` (what a channel dialled with `n` waits for) and `HANGUP`. We send no media, so the
rule that Asterisk drops a partial frame of ours never applies. See
../shared/protocols/asterisk-websocket.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from aiohttp import WSMessage, WSMsgType, web

from engine.base import BridgeError, EngineFull
from telephony.audio import AudioDecoder, Encoding, PcmArray
from telephony.call import CallHub, Draining
from telephony.errors import ProtocolError, rejection_for
from telephony.limits import CALL_ID_MAX_CHARS, clean_labels, parse_json
from telephony.ws_front import (
    HUB,
    AudioFormat,
    Dtmf,
    Media,
    OpenCall,
    Received,
    Reply,
    Skipped,
    WsCodec,
    run_stream,
)

log = logging.getLogger(__name__)

FRONT_END: Final = "asterisk_media"
SUBPROTOCOL: Final = "media"
PATH: Final = "/asterisk/media"

FORMATS: Final[Mapping[str, tuple[Encoding, int]]] = {
    "ulaw": (Encoding.MULAW, 8000),
    "alaw": (Encoding.ALAW, 8000),
    "slin": (Encoding.PCM16, 8000),
    "slin12": (Encoding.PCM16, 12000),
    "slin16": (Encoding.PCM16, 16000),
    "slin24": (Encoding.PCM16, 24000),
    "slin32": (Encoding.PCM16, 32000),
    "slin44": (Encoding.PCM16, 44100),
    "slin48": (Encoding.PCM16, 48000),
    "slin96": (Encoding.PCM16, 96000),
    "slin192": (Encoding.PCM16, 192000),
}
"""Asterisk format names we take (its `c()` dial option), with what they carry."""

MAX_COMMAND_BYTES: Final = 128  # Asterisk ignores a longer text message (MAX_TEXT_MESSAGE_LEN)


class AsteriskMediaError(ProtocolError):
    """What chan_websocket sent cannot be served: no MEDIA_START first, an unknown format."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaStart:
    connection_id: str
    channel: str
    channel_id: str
    format: str
    optimal_frame_size: int
    ptime: int
    channel_variables: Mapping[str, str] = field(default_factory=dict)
    json_format: bool = False  # the call's control messages are JSON, so our commands are too

    @property
    def encoding(self) -> Encoding:
        return FORMATS[self.format][0]

    @property
    def sample_rate(self) -> int:
        return FORMATS[self.format][1]


@dataclass(frozen=True)
class DtmfEnd:
    digit: str


@dataclass(frozen=True)
class Notice:
    """Any other event (MEDIA_XOFF, STATUS, ERROR, ...): name and fields, as text."""

    name: str
    fields: Mapping[str, str] = field(default_factory=dict)


AsteriskEvent = MediaStart | DtmfEnd | Notice


def parse_event(text: str) -> tuple[str, dict[str, Any], bool]:
    """One text message: (event name, fields, was it JSON).

    Plain text is `EVENT key:value key:value`, split on spaces, each token on its first `:`
    (channel names hold `/`, values may hold `:`); a token without `:` continues the value
    before it (`error_text` has spaces) or, first, is a bare argument (`MEDIA_MARK_PROCESSED id`).
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            message = parse_json(text)
        except ValueError:
            raise AsteriskMediaError("a text message that is neither an event nor JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("event"), str):
            raise AsteriskMediaError("a JSON message without an 'event' name")
        name = message.pop("event")
        return name, message, True
    name, _, rest = text.partition(" ")
    if not name:
        raise AsteriskMediaError("an empty text message")
    fields: dict[str, Any] = {}
    last: str | None = None
    for token in rest.split(" "):
        if not token:
            continue
        key, colon, value = token.partition(":")
        if colon and key.replace("_", "").isalnum():
            fields[key] = value
            last = key
        elif last is not None:
            fields[last] += " " + token
        else:
            fields["id"] = token
            last = "id"
    return name, fields, False


class AsteriskMediaCodec:
    """Text and binary messages in, events and audio at the engine's rate out; commands out."""

    def __init__(self, engine_rate: int, decode: bool = True) -> None:
        """`decode=False`: the audio is decoded elsewhere (the WebSocket adapter's legs), so
        no decoder of its own is built at MEDIA_START."""
        self.engine_rate = engine_rate
        self.decode = decode
        self.start: MediaStart | None = None
        self.json_format = False  # the call's control format, as its first event showed it
        self._decoder: AudioDecoder | None = None

    def receive_text(self, text: str) -> AsteriskEvent:
        name, fields, is_json = parse_event(text)
        if self.start is None:
            self.json_format = is_json
        if name == "MEDIA_START":
            if self.start is not None:
                raise AsteriskMediaError("a second MEDIA_START")
            self.start = self._media_start(fields, is_json)
            if self.decode:
                self._decoder = AudioDecoder(
                    self.start.encoding, self.start.sample_rate, self.engine_rate
                )
            return self.start
        if self.start is None:
            raise AsteriskMediaError(f"{name} before MEDIA_START")
        if name == "DTMF_END":
            digit = str(fields.get("digit", ""))
            if len(digit) != 1:
                raise AsteriskMediaError(f"DTMF_END without one digit: {digit!r}")
            return DtmfEnd(digit)
        return Notice(name, {k: str(v) for k, v in fields.items()})

    @staticmethod
    def _media_start(fields: Mapping[str, Any], is_json: bool) -> MediaStart:
        fmt = str(fields.get("format", ""))
        if fmt not in FORMATS:
            names = ", ".join(FORMATS)
            raise AsteriskMediaError(f"format {fmt!r} is not served; dial with c() one of {names}")
        channel_id = str(fields.get("channel_id", ""))
        if not channel_id or not channel_id.isprintable() or len(channel_id) > CALL_ID_MAX_CHARS:
            raise AsteriskMediaError("MEDIA_START without a usable channel_id")
        try:
            frame, ptime = int(fields.get("optimal_frame_size", 0)), int(fields.get("ptime", 20))
        except (TypeError, ValueError):
            raise AsteriskMediaError("MEDIA_START with a non-numeric frame size") from None
        variables = fields.get("channel_variables") or {}
        if not isinstance(variables, dict):
            raise AsteriskMediaError("channel_variables must be an object")
        return MediaStart(
            connection_id=str(fields.get("connection_id", "")),
            channel=str(fields.get("channel", "")),
            channel_id=channel_id,
            format=fmt,
            optimal_frame_size=frame,
            ptime=ptime,
            channel_variables={str(k): str(v) for k, v in variables.items()},
            json_format=is_json,
        )

    def receive_audio(self, data: bytes) -> PcmArray:
        if self._decoder is None:
            raise AsteriskMediaError("audio before MEDIA_START")
        return self._decoder.feed(data)

    def end_of_audio(self) -> PcmArray:
        return self._decoder.flush() if self._decoder is not None else np.zeros(0, np.int16)

    def encode_command(self, command: str) -> str:
        """`ANSWER` / `HANGUP` in the call's control format (plain text before any event)."""
        text = (
            json.dumps({"command": command}, separators=(",", ":")) if self.json_format else command
        )
        assert len(text.encode()) <= MAX_COMMAND_BYTES
        return text

    def labels(self, query: Mapping[str, str]) -> dict[str, str]:
        """The call's labels: what MEDIA_START names, then the channel variables (JSON format
        only) and the `v()` query parameters (first come, first kept: labels are bounded)."""
        assert self.start is not None
        start = self.start
        labels = {
            "connection_id": start.connection_id,
            "channel": start.channel,
            "channel_id": start.channel_id,
            "format": start.format,
        }
        for source in (start.channel_variables, query):
            for key, value in source.items():
                labels.setdefault(str(key), str(value))
        return clean_labels(labels)


class AsteriskFront(WsCodec):
    """chan_websocket for the WebSocket adapter (telephony/ws_front.py): MEDIA_START opens the
    call and is answered with ANSWER; a refusal is a HANGUP in the call's control format
    (Asterisk ends the channel and closes with 1000), then our close with the reason."""

    front_end = FRONT_END
    protocols = (SUBPROTOCOL,)
    closed_reason = "closed by Asterisk"

    def __init__(self, engine_rate: int, query: Mapping[str, str]) -> None:
        self.codec = AsteriskMediaCodec(engine_rate, decode=False)
        self.query = query

    def receive(self, msg: WSMessage) -> Received:
        codec = self.codec
        if msg.type == WSMsgType.BINARY:
            if codec.start is None:
                raise AsteriskMediaError("audio before MEDIA_START")
            return Media("caller", msg.data)
        if msg.type != WSMsgType.TEXT:
            return None
        event = codec.receive_text(msg.data)
        if isinstance(event, MediaStart):
            audio = AudioFormat(event.encoding, event.sample_rate)
            call = OpenCall(("caller",), audio, event.channel_id, codec.labels(self.query))
            return call, Reply(codec.encode_command("ANSWER"))
        if isinstance(event, DtmfEnd):
            return Dtmf(event.digit)
        if event.name == "ERROR":
            return Skipped(f"asterisk reports: {event.fields.get('error_text', '')}")
        return None

    def may_be_media(self, msg: WSMessage) -> bool:
        return msg.type == WSMsgType.BINARY

    def encode_rejection(self, exc: BridgeError) -> str:
        return self.codec.encode_command("HANGUP")


# --- aiohttp adapter --------------------------------------------------------------------------


async def handle_media(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    # Full or draining before the upgrade: an HTTP refusal makes Dial() fail at once with
    # CHANUNAVAIL (after Asterisk's reconnect attempts), and the dialplan goes on.
    refusal: BridgeError | None = None
    if hub.draining:
        refusal = Draining("the service is draining")
    elif hub.engine.free_slots <= 0:
        refusal = EngineFull("no free engine slot")
    if refusal is not None:
        reason = str(refusal)
        log.warning("asterisk media refused: %s", reason, extra={"front_end": FRONT_END})
        status = rejection_for(refusal).http_status
        return web.json_response({"error": "unavailable", "reason": reason}, status=status)

    return await run_stream(request, AsteriskFront(hub.engine.sample_rate, request.query))


def add_routes(app: web.Application, hub: CallHub) -> None:
    app[HUB] = hub
    app.router.add_get(PATH, handle_media)
