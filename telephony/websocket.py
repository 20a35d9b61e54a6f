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

`ListenCodec` is the protocol without I/O; `handle_*` are the aiohttp adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Final

from aiohttp import WSMessage, WSMsgType, web
from multidict import MultiMapping

from engine.base import BridgeError, Closed, EngineEvent, event_to_json
from telephony.audio import SUPPORTED_RATES, AudioDecoder, Encoding, PcmArray
from telephony.errors import ProtocolError, rejection_for, ws_close_at_end
from telephony.limits import parse_json
from telephony.session import Session
from telephony.transcript import NO_OPTIONS, TranscriptOptions, transcript_options
from telephony.ws_front import HUB, messages, open_websocket

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
FINALIZE_WAIT_S: Final = 5.0

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

    def receive_text(self, text: str) -> ControlMessage:
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


async def _serve(request: web.Request, params: ListenParams) -> web.StreamResponse:
    hub = request.app[HUB]
    codec = ListenCodec(params, hub.engine.sample_rate)
    ws = open_websocket(request, read_by_messages=True)
    await ws.prepare(request)

    async def reply(leg: str, event: EngineEvent) -> None:
        await ws.send_str(codec.encode_event(event))
        if isinstance(event, Closed) and call.engine_reason:
            # The engine ended the call (a lost node): say so now, not at the client's next
            # frame (a client waiting for words may send none).
            code, message = ws_close_at_end(call)
            await ws.close(code=code, message=message)

    labels = {
        **params.labels,
        "encoding": params.encoding.value,
        "sample_rate": str(params.sample_rate),
    }
    if request.remote:
        labels["remote"] = request.remote
    try:
        call = hub.open_call(
            FRONT_END,
            call_id=params.call_id,
            labels=labels,
            reply=reply,
            options=params.options,
        )
    except BridgeError as exc:
        log.warning("stream rejected: %s", exc, extra={"front_end": FRONT_END})
        await ws.close(code=rejection_for(exc).ws_close, message=str(exc).encode()[:120])
        return ws

    leg = call.leg("caller")
    reason = "client closed"

    def push(msg: WSMessage) -> bool:  # the loop's BINARY branch, as frames are parsed
        if msg.type != WSMsgType.BINARY or call.ended or not leg.has_room:
            return False  # the engine is behind: the loop waits for room (below)
        leg.push(codec.receive_bytes(msg.data))
        return True

    try:
        async for msg in messages(ws, request, direct=push):
            if msg.type == WSMsgType.BINARY:
                # Backpressure, never loss: while the engine is behind, this waits; frames
                # queue in aiohttp's reader, which stops reading the socket once it holds
                # 128 KiB, and TCP slows a client sending faster than real time.
                await leg.write(codec.receive_bytes(msg.data))
                if call.ended:  # by the engine (a lost engine node): its `closed` went out
                    break
            elif msg.type == WSMsgType.TEXT:
                control = codec.receive_text(msg.data)
                if isinstance(control, Stop):
                    reason = "client stop"
                    break
                if isinstance(control, Finalize):
                    await ws.send_str(codec.encode_finalized(await _finalize(leg)))
                elif isinstance(control, BadMessage):
                    await ws.send_str(codec.encode_error(control.reason))
            elif msg.type == WSMsgType.ERROR:
                reason = f"connection error: {ws.exception()}"
                break
    finally:
        leg.push(codec.end_of_audio())
        # Shielded: a cancelled handler (server shutdown) must still flush the transcript.
        await asyncio.shield(call.end(reason))
        if not ws.closed:
            code, message = ws_close_at_end(call)
            await ws.close(code=code, message=message)
    return ws


async def _finalize(leg: Session) -> float:
    """Cut the utterance in progress; wait (bounded) until every word so far is out.

    Returns the seconds of this leg's audio that are settled (all their words sent)."""
    stream = leg.stream
    stream.finalize()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(leg.wait_settled(stream.stats.samples_in), FINALIZE_WAIT_S)
    return stream.settled_samples / stream.sample_rate
