"""The generic WebSocket front end (browsers, apps, scripts).

Two routes on the audio port:
- `/`: the original protocol. Binary frames of raw int16 little-endian 24 kHz mono, any size
  (a sample split across frames is carried over).
- `/v1/stream?encoding=pcm16|mulaw|alaw&sample_rate=8000|16000|24000|48000&call_id=..`:
  the same with telephone encodings (it was `/v1/listen`, which now speaks Deepgram's protocol:
  telephony/deepgram.py).
Both take `redact=pci,ssn,numbers,pii` and `keyterm=` (repeatable) in the query; every other
query parameter becomes a label of the call (`customer=ACME-42`).
Both answer with text frames, one JSON object each (`word`, `segment`, `end_of_turn`, then
`closed` after the flush). The client ends with `{"type":"stop"}` (or Deepgram's
`{"type":"CloseStream"}`) or by closing; either way every word is flushed. `{"type":"KeepAlive"}`
is accepted and needs no answer; `{"type":"Finalize"}` ends the utterance in progress and is
answered with `{"type":"finalized","at":S}` once every word of the audio so far is out.
Malformed text frames get an `error` message and the stream goes on.

`ListenCodec` is the protocol without I/O, `ListenFront` its codec for the WebSocket adapter
(telephony/ws_front.py); `handle_*` check the query and hand the stream over.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Final

from aiohttp import WSMessage, WSMsgType, web
from multidict import MultiMapping

from engine.base import BridgeError, EngineEvent, event_to_json
from telephony.audio import SUPPORTED_RATES, AudioDecoder, Encoding, PcmArray
from telephony.call import Call
from telephony.errors import ProtocolError, rejection_for
from telephony.limits import parse_json
from telephony.transcript import NO_OPTIONS, TranscriptOptions, transcript_options
from telephony.ws_front import (
    HUB,
    AudioFormat,
    Media,
    OpenCall,
    Received,
    Reply,
    Stopped,
    WsCodec,
    run_stream,
)
from telephony.ws_front import Finalize as FrontFinalize

log = logging.getLogger(__name__)

FRONT_END: Final = "websocket"


class BadParameters(ProtocolError):
    """Query parameters that cannot be served (HTTP 400 before the upgrade)."""


# --- codec ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenParams:
    encoding: Encoding = Encoding.PCM16
    sample_rate: int = 24000
    call_id: str | None = None
    options: TranscriptOptions = NO_OPTIONS
    labels: dict[str, str] = field(default_factory=dict)  # the query's other parameters


@dataclass(frozen=True)
class Stop:
    """The client has no more audio: flush and close."""


@dataclass(frozen=True)
class KeepAlive:
    """The client has no audio now and keeps the stream open: nothing to answer."""


@dataclass(frozen=True)
class Finalize:
    """End the utterance in progress now; answered with `finalized` once its words are out."""


@dataclass(frozen=True)
class BadMessage:
    """A text frame the protocol does not know; reported to the client, the stream goes on."""

    reason: str


ControlMessage = Stop | KeepAlive | Finalize | BadMessage
_CONTROL: Final[dict[str, ControlMessage]] = {
    "stop": Stop(),
    "CloseStream": Stop(),
    "KeepAlive": KeepAlive(),
    "Finalize": Finalize(),
}

_CALL_ID_MAX: Final = 128
PROTOCOL_PARAMETERS: Final = frozenset({"encoding", "sample_rate", "call_id", "redact", "keyterm"})
MAX_QUERY_LABELS: Final = 32  # query parameters that become labels; more is a 400


def query_labels(query: MultiMapping[str]) -> dict[str, str]:
    """The query parameters that are not the protocol's own, as labels (the first of a
    repeated one); each is cleaned where the call opens (telephony/limits.py)."""
    labels: dict[str, str] = {}
    for name, value in query.items():
        if name not in PROTOCOL_PARAMETERS and name not in labels:
            labels[name] = value
    if len(labels) > MAX_QUERY_LABELS:
        raise BadParameters(f"at most {MAX_QUERY_LABELS} query parameters become labels")
    return labels


def parse_root_params(query: MultiMapping[str]) -> ListenParams:
    """`/`: raw 24 kHz int16 always; the transcript options and labels only."""
    options = transcript_options(query.getall("redact", ()), query.getall("keyterm", ()))
    return ListenParams(options=options, labels=query_labels(query))


def parse_listen_params(query: MultiMapping[str]) -> ListenParams:
    encoding_text = query.get("encoding", Encoding.PCM16.value)
    try:
        encoding = Encoding(encoding_text)
    except ValueError:
        names = ", ".join(e.value for e in Encoding)
        raise BadParameters(f"encoding must be one of {names}, not {encoding_text!r}") from None
    rate_text = query.get("sample_rate", "24000" if encoding is Encoding.PCM16 else "8000")
    try:
        sample_rate = int(rate_text)
    except ValueError:
        raise BadParameters(f"sample_rate must be an integer, not {rate_text!r}") from None
    if sample_rate not in SUPPORTED_RATES:
        rates = ", ".join(map(str, SUPPORTED_RATES))
        raise BadParameters(f"sample_rate must be one of {rates}, not {sample_rate}")
    call_id = query.get("call_id") or None
    if call_id is not None and (len(call_id) > _CALL_ID_MAX or not call_id.isprintable()):
        raise BadParameters(f"call_id must be printable and at most {_CALL_ID_MAX} characters")
    options = transcript_options(query.getall("redact", ()), query.getall("keyterm", ()))
    return ListenParams(encoding, sample_rate, call_id, options, query_labels(query))


class ListenCodec:
    """Frames in, audio at the engine's rate and control messages out; engine events to JSON."""

    def __init__(self, params: ListenParams, engine_rate: int) -> None:
        self.params = params
        self._decoder = AudioDecoder(params.encoding, params.sample_rate, engine_rate)

    def receive_bytes(self, data: bytes) -> PcmArray:
        return self._decoder.feed(data)

    @staticmethod
    def receive_text(text: str) -> ControlMessage:
        try:
            message = parse_json(text)
        except ValueError:
            return BadMessage("text frames must be JSON objects")
        if not isinstance(message, dict):
            return BadMessage("text frames must be JSON objects")
        kind = message.get("type")
        control = _CONTROL.get(kind) if isinstance(kind, str) else None
        if control is None:
            expected = ", ".join(repr(k) for k in _CONTROL)
            return BadMessage(f"unknown message type {kind!r}; expected one of {expected}")
        return control

    def end_of_audio(self) -> PcmArray:
        """What the resampler still holds once the client has no more audio."""
        return self._decoder.flush()

    @staticmethod
    def encode_event(event: EngineEvent) -> str:
        return json.dumps(event_to_json(event))

    @staticmethod
    def encode_finalized(at_s: float) -> str:
        return json.dumps({"type": "finalized", "at": round(at_s, 3)})

    @staticmethod
    def encode_error(reason: str) -> str:
        return json.dumps({"type": "error", "message": reason})


# --- asyncio adapter --------------------------------------------------------------------------


def is_websocket_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def handle_root(request: web.Request) -> web.StreamResponse:
    """`/`: the original raw 24 kHz int16 protocol."""
    try:
        params = parse_root_params(request.query)
    except BridgeError as exc:
        return _bad_parameters(exc)
    return await _serve(request, params)


def _bad_parameters(exc: BridgeError) -> web.Response:
    status = rejection_for(exc).http_status
    return web.json_response({"error": "bad_parameters", "reason": str(exc)}, status=status)


async def handle_stream(request: web.Request) -> web.StreamResponse:
    """`/v1/stream`: the same protocol with telephone encodings."""
    try:
        params = parse_listen_params(request.query)
    except BridgeError as exc:
        return _bad_parameters(exc)
    if params.call_id is not None and params.call_id in request.app[HUB].calls:
        reason = f"call {params.call_id} is already live"
        return web.json_response({"error": "duplicate_call", "reason": reason}, status=409)
    return await _serve(request, params)


class ListenFront(WsCodec):
    """`/` and `/v1/stream` for the WebSocket adapter (telephony/ws_front.py): the call opens
    at the upgrade, from the URL; the sender can wait (an app or a file), so it is slowed while
    the engine is behind, never dropped."""

    front_end = FRONT_END
    can_wait = True
    closed_reason = "client closed"

    def __init__(self, params: ListenParams, remote: str | None) -> None:
        self.params = params
        self.remote = remote

    def open_at_connect(self) -> OpenCall:
        params = self.params
        labels = {
            **params.labels,
            "encoding": params.encoding.value,
            "sample_rate": str(params.sample_rate),
        }
        if self.remote:
            labels["remote"] = self.remote
        return OpenCall(
            legs=("caller",),
            audio=AudioFormat(params.encoding, params.sample_rate),
            call_id=params.call_id,
            labels=labels,
            options=params.options,
        )

    def receive(self, msg: WSMessage) -> Received:
        if msg.type == WSMsgType.BINARY:
            return Media("caller", msg.data)
        if msg.type != WSMsgType.TEXT:
            return None
        control = ListenCodec.receive_text(msg.data)
        if isinstance(control, Stop):
            return Stopped("client stop")
        if isinstance(control, Finalize):
            return FrontFinalize()
        if isinstance(control, BadMessage):
            return Reply(ListenCodec.encode_error(control.reason))
        return None  # KeepAlive: nothing to answer

    def may_be_media(self, msg: WSMessage) -> bool:
        return msg.type == WSMsgType.BINARY

    def encode_event(self, call: Call, leg: str, event: EngineEvent) -> str:
        return ListenCodec.encode_event(event)

    def encode_finalized(self, at_s: float) -> str:
        return ListenCodec.encode_finalized(at_s)


async def _serve(request: web.Request, params: ListenParams) -> web.StreamResponse:
    return await run_stream(request, ListenFront(params, request.remote))
