"""Twilio Media Streams: TwiML that forks the call's audio to us, and the stream's WebSocket.

`POST /twilio/voice` answers the voice webhook with `<Start><Stream track="both_tracks">` to
`wss://<public host>/twilio/media` (CallSid, From, To as custom parameters), then continues the
call (`<Dial>` a number, or `<Pause>`). On the stream Twilio sends JSON text frames: connected,
start, media (base64 μ-law 8 kHz, one track per message), dtmf, mark, stop. The inbound track
is the caller, the outbound track the agent (the dialled party). With an auth token configured,
the webhook and the stream's upgrade request must carry a valid X-Twilio-Signature (403 if not).
See ../shared/protocols/twilio-media-streams.md.

`TwilioMediaCodec` is the stream protocol without I/O; the handlers are the aiohttp adapter.
"""

from __future__ import annotations

import base64
import binascii
import logging
from binascii import a2b_base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import WSMessage, WSMsgType, web
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Start, VoiceResponse

from telephony.audio import Encoding
from telephony.call import CallHub
from telephony.config import TwilioConfig
from telephony.dtmf import DTMF_DIGITS
from telephony.errors import ProtocolError
from telephony.limits import parse_json
from telephony.transcript import TranscriptOptions, transcript_options
from telephony.ws_front import (
    HUB,
    STAMP_TYPES,
    AudioFormat,
    Dtmf,
    Media,
    OpenCall,
    Received,
    Stopped,
    WsCodec,
    media_message,
    run_stream,
)
from telephony.ws_front import Skipped as FrontSkipped

log = logging.getLogger(__name__)

FRONT_END: Final = "twilio"
LEG_OF_TRACK: Final = {"inbound": "caller", "outbound": "agent"}
RATE: Final = 8000


class TwilioStreamError(ProtocolError):
    """A message that makes the stream unusable (media before start, a second start)."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True)
class StreamStarted:
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DtmfDigit:
    digit: str


@dataclass(frozen=True)
class MarkEcho:
    name: str


@dataclass(frozen=True)
class StreamStopped:
    pass


@dataclass(frozen=True)
class Skipped:
    """A message the stream survives: logged and ignored, as Twilio's peers do."""

    reason: str


# Media is the adapter's own (a leg's μ-law 8 kHz at the stream's clock), so the per-frame
# message is built once.
TwilioEvent = Connected | StreamStarted | Media | DtmfDigit | MarkEcho | StreamStopped | Skipped


# --- codec ------------------------------------------------------------------------------------


class TwilioMediaCodec:
    """Text frames in, events out."""

    def __init__(self) -> None:
        self.started: StreamStarted | None = None

    def receive(self, text: str) -> TwilioEvent:
        # The per-frame case, a well-formed media message once started, on a short road
        # (TwilioFront.receive 2.6 µs against 3.6-3.7 in-process, timeit); anything else, or
        # anything it would not take as is, is read in full by `read`, which decides every
        # answer as before.
        if self.started is not None:
            parts = media_message(text)
            if parts is not None:
                media = parts[1]
                track = media.get("track", "inbound")
                payload = media.get("payload")
                stamp = media.get("timestamp", 0)
                leg = LEG_OF_TRACK.get(track) if type(track) is str else None
                if leg is not None and type(payload) is str and type(stamp) in STAMP_TYPES:
                    try:
                        # What b64decode(validate=True) does for ASCII text, without its copy
                        # to bytes; text that is not ASCII is a ValueError here as there.
                        return Media(leg, a2b_base64(payload, strict_mode=True), int(float(stamp)))
                    except (ValueError, OverflowError):  # binascii.Error is a ValueError
                        pass
        return self.read(text)

    def read(self, text: str) -> TwilioEvent:
        """Any message, in full (what `receive` does, the short road aside)."""
        try:
            message = parse_json(text)
        except ValueError:  # NaN/Infinity and 100 000 nested brackets included
            return Skipped("not JSON")
        if not isinstance(message, dict):
            return Skipped("not a JSON object")
        kind = message.get("event")
        try:
            if kind == "media":  # the per-frame case first
                if self.started is None:
                    raise TwilioStreamError("media before start")
                return self._media(_object(message, "media"))
            if kind == "connected":
                return Connected(str(message.get("protocol", "")), str(message.get("version", "")))
            if kind == "start":
                return self._start(message)
            if kind == "stop":
                return StreamStopped()
            if kind == "mark":
                return MarkEcho(str(_object(message, "mark")["name"]))
            if kind == "dtmf":
                if self.started is None:
                    raise TwilioStreamError("dtmf before start")
                digit = str(_object(message, "dtmf")["digit"])
                if digit not in DTMF_DIGITS:
                    return Skipped(f"unknown DTMF digit {digit[:8]!r}")
                return DtmfDigit(digit)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, TwilioStreamError):
                raise
            return Skipped(f"malformed {kind} message: {exc!r}")
        return Skipped(f"unknown event {kind!r}")

    def _start(self, message: dict[str, Any]) -> StreamStarted:
        if self.started is not None:
            raise TwilioStreamError("a second start message")
        start = _object(message, "start")
        announced = start.get("tracks", ["inbound"])
        if not isinstance(announced, list):
            raise TypeError("start.tracks is not a list")
        tracks = tuple(t for t in announced if isinstance(t, str) and t in LEG_OF_TRACK)
        encoding = (_object(start, "mediaFormat", {}) or {}).get("encoding", "audio/x-mulaw")
        if encoding != "audio/x-mulaw":
            raise TwilioStreamError(f"unsupported media encoding {str(encoding)[:40]!r}")
        params = _object(start, "customParameters", {}) or {}
        self.started = StreamStarted(
            stream_sid=str(start.get("streamSid") or message.get("streamSid", "")),
            call_sid=str(start["callSid"]),
            account_sid=str(start.get("accountSid", "")),
            tracks=tracks or ("inbound",),
            custom_parameters={str(k): str(v) for k, v in params.items()},
        )
        return self.started

    @staticmethod
    def _media(media: dict[str, Any]) -> Media | Skipped:
        track = str(media.get("track", "inbound"))
        leg = LEG_OF_TRACK.get(track)
        if leg is None:
            return Skipped(f"unknown track {track!r}")
        try:
            payload = base64.b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError):
            return Skipped("media payload is not base64")
        timestamp = media.get("timestamp", 0)
        if isinstance(timestamp, bool) or not isinstance(timestamp, int | float | str):
            raise TypeError("media.timestamp is not a number")
        return Media(leg, payload, int(float(timestamp)))


def _object(message: Mapping[str, Any], name: str, default: Any = None) -> dict[str, Any]:
    """A member that must be a JSON object (or absent/null, when a default is given)."""
    value = message.get(name, default) if default is not None else message[name]
    if value is None and default is not None:
        return dict(default)
    if not isinstance(value, dict):
        raise TypeError(f"{name} is not a JSON object")
    return value


# --- TwiML and signatures ---------------------------------------------------------------------


def public_base(request: web.Request, config: TwilioConfig) -> str:
    """https://host as Twilio reaches us: the configured public URL, else the request's host."""
    if config.public_url:
        return config.public_url.rstrip("/")
    host = request.headers.get("X-Forwarded-Host", request.host)
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
    return f"{scheme}://{host}"


def stream_url(base: str) -> str:
    parts = urlsplit(base)
    return f"wss://{parts.netloc}{parts.path.rstrip('/')}/twilio/media"


def voice_twiml(base: str, form: Mapping[str, str], config: TwilioConfig) -> str:
    response = VoiceResponse()
    start = Start()
    stream = start.stream(name="stt-bridge", url=stream_url(base), track="both_tracks")
    for name in ("CallSid", "From", "To"):
        if form.get(name):
            stream.parameter(name=name, value=form[name][:400])
    response.append(start)
    if config.dial:
        response.dial(config.dial)
    else:
        response.pause(length=config.pause_s)
    return str(response)


def _signature_ok(config: TwilioConfig, url: str, params: Mapping[str, str], header: str) -> bool:
    try:
        return bool(RequestValidator(config.auth_token).validate(url, dict(params), header))
    except (ValueError, TypeError):  # a signature or URL that is not even text: not valid
        return False


# --- aiohttp adapter --------------------------------------------------------------------------

CONFIG: Final = web.AppKey("twilio_config", TwilioConfig)


async def handle_voice(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    signature = request.headers.get("X-Twilio-Signature", "")
    if config.auth_token and not signature:  # refused before a byte of the body is parsed
        log.warning(
            "twilio webhook: missing signature",
            extra={"front_end": FRONT_END, "remote": request.remote},
        )
        return web.Response(status=403, text="invalid X-Twilio-Signature")
    try:
        form = {k: str(v) for k, v in (await request.post()).items()}
    except (ValueError, LookupError, AssertionError) as exc:  # bad charset, UTF-8, boundary
        return web.Response(status=400, text=f"unreadable form: {type(exc).__name__}")
    base = public_base(request, config)
    if config.auth_token and not _signature_ok(config, base + request.path_qs, form, signature):
        log.warning(
            "twilio webhook: invalid signature",
            extra={"front_end": FRONT_END, "remote": request.remote},
        )
        return web.Response(status=403, text="invalid X-Twilio-Signature")
    return web.Response(text=voice_twiml(base, form, config), content_type="application/xml")


class TwilioFront(WsCodec):
    """Twilio's stream for the WebSocket adapter (telephony/ws_front.py): a phone call, pushed
    in real time; tracks are legs, media.timestamp is the stream's clock from 0."""

    front_end = FRONT_END
    closed_reason = "socket closed without stop"

    def __init__(self) -> None:
        self.codec = TwilioMediaCodec()

    def receive(self, msg: WSMessage) -> Received:
        if msg.type != WSMsgType.TEXT:
            return None
        event = self.codec.receive(msg.data)
        if type(event) is Media:  # the per-frame case first
            return event
        if isinstance(event, StreamStarted):
            return OpenCall(
                legs=tuple(LEG_OF_TRACK[t] for t in event.tracks),
                audio=AudioFormat(Encoding.MULAW, RATE),
                call_id=event.call_sid,
                labels=_labels(event),
                options=_options(event),
                clock_from_zero=True,
            )
        if isinstance(event, DtmfDigit):
            return Dtmf(event.digit)
        if isinstance(event, StreamStopped):
            return Stopped("stop")
        if isinstance(event, Skipped):
            return FrontSkipped(event.reason)
        return None  # connected, mark: nothing to do


async def handle_media(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    if config.auth_token:
        signature = request.headers.get("X-Twilio-Signature", "")
        url = stream_url(public_base(request, config))
        if not signature or not _signature_ok(config, url, dict(request.query), signature):
            log.warning(
                "twilio stream: %s signature",
                "missing" if not signature else "invalid",
                extra={"front_end": FRONT_END, "remote": request.remote},
            )
            return web.Response(status=403, text="invalid X-Twilio-Signature")
    return await run_stream(request, TwilioFront())


def _labels(event: StreamStarted) -> dict[str, str]:
    params = event.custom_parameters
    labels = {
        "call_sid": event.call_sid,
        "stream_sid": event.stream_sid,
        "account_sid": event.account_sid,
        "caller_leg": "inbound",
        "agent_leg": "outbound",
    }
    for name in ("From", "To"):
        if name in params:
            labels[name.lower()] = params[name]
    return labels


def _options(event: StreamStarted) -> TranscriptOptions:
    """`<Parameter name="redact" value="pci,ssn"/>` and `<Parameter name="keyterm"
    value="Xarelto, Siobhan Nguyen"/>` (comma-separated: TwiML names a parameter once)."""
    params = event.custom_parameters
    keyterms = params.get("keyterm", "").split(",")
    return transcript_options([params.get("redact", "")], keyterms)


def add_routes(app: web.Application, hub: CallHub, config: TwilioConfig) -> None:
    app[HUB] = hub
    app[CONFIG] = config
    app.router.add_post("/twilio/voice", handle_voice)
    app.router.add_get("/twilio/media", handle_media)
