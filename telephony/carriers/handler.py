"""The one aiohttp handler the six carriers run on, and their routes.

A `Carrier` names its route, its codec and its credential check; `handle_stream` does the rest
as telephony/twilio.py's handler does: the codec's `Started` opens the call (refused with the
rejection's close code), media go to the legs (also on the direct path, as frames are parsed),
DTMF to the caller's leg, `stop` or a plain close ends the call (a close without stop is the
normal end for Plivo, Vonage and jambonz), bad input closes with 1007 and its reason.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import jwt
import numpy as np
from aiohttp import WSMessage, WSMsgType, web

from engine.base import BridgeError
from telephony.audio import AudioDecoder, Encoding, alaw_encode, deinterleave, ulaw_encode
from telephony.carriers.config import CarriersConfig
from telephony.carriers.events import (
    AudioFormat,
    CarrierEvent,
    Dtmf,
    Media,
    Skipped,
    Started,
    Stopped,
)
from telephony.carriers.jambonz import SUBPROTOCOL, JambonzCodec
from telephony.carriers.json_streams import (
    EXOTEL,
    PLIVO,
    SIGNALWIRE,
    TELNYX,
    JsonStreamCodec,
)
from telephony.carriers.vonage import VonageCodec
from telephony.errors import rejection_for, ws_close_at_end
from telephony.limits import messages, open_websocket
from telephony.session import Call, CallHub
from telephony.transcript import TranscriptOptions, transcript_options

log = logging.getLogger(__name__)

# A jump in a media timestamp beyond 20 ms is a gap (silence suppression, loss): filled with
# silence so later words keep their place; beyond 10 s it is a clock jump, not loss.
GAP_TOLERANCE_S: Final = 0.02
MAX_GAP_S: Final = 10.0
_ZERO: Final = np.zeros(1, dtype=np.int16)
SILENCE: Final = {
    Encoding.MULAW: ulaw_encode(_ZERO),
    Encoding.ALAW: alaw_encode(_ZERO),
    Encoding.PCM16: b"\0\0",
    Encoding.PCM16_BE: b"\0\0",
}


class CarrierCodec(Protocol):
    def receive(self, text: str) -> CarrierEvent: ...

    def receive_binary(self, data: bytes) -> CarrierEvent: ...


Check = Callable[[web.Request, CarriersConfig], str]  # "" when the upgrade may go on


@dataclass(frozen=True)
class Carrier:
    front_end: str
    path: str
    codec: Callable[[Mapping[str, str]], CarrierCodec]  # the upgrade's URL query -> a codec
    protocols: tuple[str, ...] = ()
    check: Check | None = None


class Legs:
    """Wire audio per leg → the engine's rate, gaps in the carrier's media clock as silence."""

    def __init__(self, call: Call, audio: AudioFormat) -> None:
        self.call = call
        self.audio = audio
        self._decoders = {
            leg: AudioDecoder(audio.encoding, audio.rate, call.sample_rate) for leg in call.legs
        }
        self._width = audio.encoding.bytes_per_sample
        self._origin: dict[str, int] = {}  # each leg's first timestamp, ms
        self._samples = dict.fromkeys(call.legs, 0)

    def media(self, event: Media) -> None:
        if event.leg is None:  # interleaved channels, one per leg in order
            first = next(iter(self._decoders.values()))
            channels = deinterleave(first.decode(event.payload), self.audio.channels)
            for (leg, leg_decoder), samples in zip(self._decoders.items(), channels, strict=False):
                pcm = leg_decoder.feed_samples(samples)
                if len(pcm):
                    self.call.leg(leg).push(pcm)
            return
        decoder = self._decoders.get(event.leg)
        if decoder is None:
            return  # a track the stream was not set up for
        payload = event.payload
        if event.timestamp_ms is not None:
            payload = self._fill_gap(event.leg, event.timestamp_ms, payload)
        self._samples[event.leg] += len(payload) // self._width
        pcm = decoder.feed(payload)
        if len(pcm):
            self.call.leg(event.leg).push(pcm)

    def _fill_gap(self, leg: str, timestamp_ms: int, payload: bytes) -> bytes:
        origin = self._origin.setdefault(leg, timestamp_ms)
        rate = self.audio.rate
        gap = (timestamp_ms - origin) * rate // 1000 - self._samples[leg]
        if gap > MAX_GAP_S * rate:
            self._samples[leg] += gap  # a clock jump: resynchronise, allocate nothing
        elif gap > GAP_TOLERANCE_S * rate:
            return SILENCE[self.audio.encoding] * gap + payload
        return payload

    def dtmf(self, digit: str) -> None:
        leg = "caller" if "caller" in self.call.legs else next(iter(self.call.legs))
        self.call.leg(leg).dtmf(digit, self._decoders[leg].seconds_in)

    def flush(self) -> None:
        for leg, decoder in self._decoders.items():
            self.call.leg(leg).push(decoder.flush())


def options_of(parameters: Mapping[str, str]) -> TranscriptOptions:
    """`redact` (comma-separated kinds) and `keyterm` (comma-separated terms) among a carrier's
    custom parameters become the call's transcript options, as Twilio's `<Parameter>`s do."""
    keyterms = parameters.get("keyterm", "").split(",")
    return transcript_options([parameters.get("redact", "")], keyterms)


# Options, and the API key: Exotel copies the stream URL's query into its custom parameters,
# so a `?token=KEY` there would otherwise be stored with the call.
NOT_LABELS: Final = frozenset({"redact", "keyterm", "token", "auth_id"})


def labels_of(event: Started) -> dict[str, str]:
    """The start's labels less the options; with two tracks, which track each leg is (as
    Twilio's labels say; jambonz's two channels are no tracks)."""
    labels = {k: v for k, v in event.labels.items() if k not in NOT_LABELS}
    if len(event.legs) == 2 and event.audio.channels == 1:
        labels.update(caller_leg="inbound", agent_leg="outbound")
    return labels


HUB: Final = web.AppKey("carriers_hub", CallHub)
CONFIG: Final = web.AppKey("carriers_config", CarriersConfig)


async def handle_stream(request: web.Request, carrier: Carrier) -> web.StreamResponse:
    front_end = carrier.front_end
    if carrier.check is not None:
        refused = carrier.check(request, request.app[CONFIG])
        if refused:
            log.warning(
                "%s stream refused: %s",
                front_end,
                refused,
                extra={"front_end": front_end, "remote": request.remote},
            )
            return web.Response(status=403, text=refused)
    ws = open_websocket(request, protocols=carrier.protocols, read_by_messages=True)
    await ws.prepare(request)
    codec = carrier.codec(request.query)
    call: Call | None = None
    legs: Legs | None = None
    reason = "socket closed"

    def receive(msg: WSMessage) -> CarrierEvent | None:
        if msg.type == WSMsgType.TEXT:
            return codec.receive(msg.data)
        if msg.type == WSMsgType.BINARY:
            return codec.receive_binary(msg.data)
        return None

    def media(msg: WSMessage) -> bool:
        """The loop's media branch, as frames are parsed; anything else is parsed again in the
        loop (harmless: only the start message changes a codec, and none is taken here)."""
        if legs is None or legs.call.ended:
            return False
        if msg.type == WSMsgType.TEXT and '"media"' not in msg.data:
            return False  # not a media message: leave it (and its parse) to the loop
        event = receive(msg)
        if not isinstance(event, Media):
            return False
        legs.media(event)
        return True

    try:
        async for msg in messages(ws, request, direct=media):
            event = receive(msg)
            if isinstance(event, Started):
                call = request.app[HUB].open_call(
                    front_end,
                    legs=event.legs,
                    call_id=event.call_id or None,
                    labels=labels_of(event),
                    options=options_of(event.parameters),
                )
                legs = Legs(call, event.audio)
            elif isinstance(event, Media) and legs is not None:
                legs.media(event)
                if legs.call.ended:  # by the engine (a lost engine node)
                    break
            elif isinstance(event, Dtmf) and legs is not None:
                legs.dtmf(event.digit)
            elif isinstance(event, Stopped):
                reason = event.reason
                break
            elif isinstance(event, Skipped):
                log.info(
                    "%s message skipped: %s",
                    front_end,
                    event.reason,
                    extra={"front_end": front_end},
                )
    except BridgeError as exc:
        log.warning("%s stream closed: %s", front_end, exc, extra={"front_end": front_end})
        reason = f"rejected: {exc}"
        await ws.close(code=rejection_for(exc).ws_close, message=str(exc).encode()[:120])
    finally:
        if legs is not None:
            legs.flush()
        if call is not None:
            await asyncio.shield(call.end(reason))
        if not ws.closed:
            code, message = ws_close_at_end(call)
            await ws.close(code=code, message=message)
    return ws


# --- credentials -------------------------------------------------------------------------------


def telnyx_token_check(request: web.Request, config: CarriersConfig) -> str:
    """Telnyx repeats `stream_auth_token` in `x-telnyx-streaming-auth-token` on the upgrade."""
    if not config.telnyx_stream_token:
        return ""
    presented = request.headers.get("x-telnyx-streaming-auth-token", "")
    expected = config.telnyx_stream_token
    if not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        return "invalid x-telnyx-streaming-auth-token"
    return ""


def vonage_jwt_check(request: web.Request, config: CarriersConfig) -> str:
    """Vonage signs the upgrade as it signs webhooks: `Authorization: Bearer <JWT>`, HS256 with
    the account's signature secret, `iat` at most `vonage_max_token_age_s` old."""
    secret = config.vonage_signature_secret
    if not secret:
        return ""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return "missing Vonage JWT"
    try:
        claims = jwt.decode(
            token.strip(), secret, algorithms=["HS256"], options={"require": ["iat"]}
        )
    except jwt.PyJWTError as exc:
        return f"invalid Vonage JWT: {type(exc).__name__}"
    issued = claims.get("iat")
    if not isinstance(issued, int | float) or time.time() - issued > config.vonage_max_token_age_s:
        return "stale Vonage JWT"
    return ""


CARRIERS: Final = (
    Carrier(
        "telnyx", "/telnyx/media", lambda q: JsonStreamCodec(TELNYX, q), check=telnyx_token_check
    ),
    Carrier("plivo", "/plivo/media", lambda q: JsonStreamCodec(PLIVO, q)),
    Carrier("vonage", "/vonage/media", lambda q: VonageCodec(), check=vonage_jwt_check),
    Carrier("exotel", "/exotel/media", lambda q: JsonStreamCodec(EXOTEL, q)),
    Carrier("signalwire", "/signalwire/media", lambda q: JsonStreamCodec(SIGNALWIRE, q)),
    Carrier("jambonz", "/jambonz/listen", lambda q: JambonzCodec(), protocols=(SUBPROTOCOL,)),
)
PATHS: Final = tuple(c.path for c in CARRIERS)


def signed_paths(config: CarriersConfig) -> tuple[str, ...]:
    """Routes whose carrier credential is set: checked by it instead of an API key."""
    return tuple(
        path
        for path, secret in (
            ("/telnyx/media", config.telnyx_stream_token),
            ("/vonage/media", config.vonage_signature_secret),
        )
        if secret
    )


def _route(carrier: Carrier) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await handle_stream(request, carrier)

    return handle


def add_routes(app: web.Application, hub: CallHub, config: CarriersConfig) -> None:
    app[HUB] = hub
    app[CONFIG] = config
    for carrier in CARRIERS:
        app.router.add_get(carrier.path, _route(carrier))
