"""The one aiohttp handler the six carriers run on, and their routes.

A `Carrier` names its route, its codec and its credential check; `handle_stream` does the rest
through the WebSocket adapter (telephony/ws_front.py), as Twilio's does: the codec's `Started`
opens the call (refused with the rejection's close code), media go to the legs (also on the
direct path, as frames are parsed), DTMF to the caller's leg, `stop` or a plain close ends the
call (a close without stop is the normal end for Plivo, Vonage and jambonz), bad input closes
with 1007 and its reason.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

import jwt
from aiohttp import WSMessage, WSMsgType, web

from telephony.call import CallHub
from telephony.carriers.config import CarriersConfig
from telephony.carriers.events import (
    CarrierEvent,
    Started,
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
from telephony.transcript import TranscriptOptions, transcript_options
from telephony.ws_front import HUB, OpenCall, Received, WsCodec, run_stream

log = logging.getLogger(__name__)


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


CONFIG: Final = web.AppKey("carriers_config", CarriersConfig)


class CarrierFront(WsCodec):
    """A carrier's codec for the WebSocket adapter (telephony/ws_front.py): a phone call, pushed
    in real time; its start opens the call with its labels and options."""

    closed_reason = "socket closed"  # the normal end for Plivo, Vonage and jambonz

    def __init__(self, carrier: Carrier, query: Mapping[str, str]) -> None:
        self.front_end = carrier.front_end
        self.protocols = carrier.protocols
        self.codec = carrier.codec(query)

    def receive(self, msg: WSMessage) -> Received:
        if msg.type == WSMsgType.TEXT:
            event = self.codec.receive(msg.data)
        elif msg.type == WSMsgType.BINARY:
            event = self.codec.receive_binary(msg.data)
        else:
            return None
        if isinstance(event, Started):
            return OpenCall(
                legs=event.legs,
                audio=event.audio,
                call_id=event.call_id or None,
                labels=labels_of(event),
                options=options_of(event.parameters),
            )
        return event

    def may_be_media(self, msg: WSMessage) -> bool:
        # A JSON message that is not media is left (and its parse) to the loop.
        return msg.type != WSMsgType.TEXT or '"media"' in msg.data


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
    return await run_stream(request, CarrierFront(carrier, request.query))


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
