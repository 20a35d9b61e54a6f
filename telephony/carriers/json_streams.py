"""The Twilio-shaped carriers: Telnyx, SignalWire, Exotel and Plivo, sans I/O.

All four send JSON text frames with an `event` name: a `start` that says who the call is and how
its audio comes, `media` with a base64 payload and a track, `dtmf`, and (except Plivo) `stop`.
They differ in field names, in where the format is announced and in their codecs, so one codec
(`JsonStreamCodec`) runs on a `Dialect` per carrier whose only job is to read `start`.
"""

from __future__ import annotations

import base64
import binascii
import json
from binascii import a2b_base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from telephony.audio import Encoding
from telephony.carriers.events import (
    LEG_OF_TRACK,
    AudioFormat,
    CarrierEvent,
    CarrierStreamError,
    Media,
    Skipped,
    Started,
    Stopped,
    dtmf_of,
    legs_of,
)
from telephony.limits import parse_json
from telephony.ws_front import STAMP_TYPES, media_message

# Names the carriers give their codecs, lower-cased, `audio/` and `x-` dropped. L16 is
# little-endian everywhere but on Telnyx, whose payload is the RTP payload (network order).
ENCODINGS: Final = {
    "mulaw": Encoding.MULAW,
    "pcmu": Encoding.MULAW,
    "ulaw": Encoding.MULAW,
    "alaw": Encoding.ALAW,
    "pcma": Encoding.ALAW,
    "l16": Encoding.PCM16,
    "raw": Encoding.PCM16,  # Exotel's names for its slin
    "slin": Encoding.PCM16,
    "base64": Encoding.PCM16,
}
DEFAULT_TRACK: Final = "inbound"


def encoding_of(name: object, l16: Encoding = Encoding.PCM16) -> Encoding:
    """`audio/x-mulaw`, `PCMU`, `audio/x-L16`, `audio/L16;rate=16000` ... to an `Encoding`.
    G.722, Opus and AMR-WB (Telnyx and SignalWire can send them) are refused: no decoder here."""
    text = str(name).strip().lower().split(";")[0].removeprefix("audio/").removeprefix("x-")
    encoding = ENCODINGS.get(text)
    if encoding is None:
        raise CarrierStreamError(f"unsupported media encoding {str(name)[:40]!r}")
    return l16 if encoding is Encoding.PCM16 and text == "l16" else encoding


def json_object(text: str) -> dict[str, Any] | Skipped:
    """A text frame's JSON object, or why it is none (NaN, deep nesting and arrays included)."""
    try:
        message = parse_json(text)
    except ValueError:
        return Skipped("not JSON")
    if not isinstance(message, dict):
        return Skipped("not a JSON object")
    return message


def rate_of(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise CarrierStreamError(f"sample rate {str(value)[:20]!r} is not a number")
    try:
        return int(value)
    except ValueError:
        raise CarrierStreamError(f"sample rate {str(value)[:20]!r} is not a number") from None


def member(message: Mapping[str, Any], name: str, required: bool = True) -> dict[str, Any]:
    """A member that must be a JSON object (absent or null is {} unless `required`)."""
    value = message.get(name)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise CarrierStreamError(f"{name} is not a JSON object")
    return value


def first(obj: Mapping[str, Any], *names: str) -> str:
    """The first of `names` present (carriers spell fields two ways), as text; "" if none."""
    for name in names:
        value = obj.get(name)
        if value is not None and not isinstance(value, dict | list):
            return str(value)
    return ""


def flat_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    """Every field as a label: scalars as text, objects and lists as compact JSON."""
    labels: dict[str, str] = {}
    for key, value in obj.items():
        if value is None:
            continue
        if isinstance(value, dict | list):
            labels[str(key)] = json.dumps(value, separators=(",", ":"))[:1024]
        elif isinstance(value, bool):
            labels[str(key)] = "true" if value else "false"
        else:
            labels[str(key)] = str(value)
    return labels


def parameters_of(value: object) -> dict[str, str]:
    """Custom parameters in any of the carriers' shapes: an object, a `[{name, value}]` list
    (Telnyx Call Control), or a `k=v;k2=v2` / `k=v,k2=v2` string (Plivo's extra_headers)."""
    if isinstance(value, dict):
        return flat_labels(value)
    if isinstance(value, list):
        return {
            str(p["name"]): str(p.get("value", ""))
            for p in value
            if isinstance(p, dict) and "name" in p
        }
    if isinstance(value, str):
        pairs = (p.partition("=") for p in value.replace(",", ";").split(";"))
        return {k.strip(): v.strip() for k, sep, v in pairs if sep and k.strip()}
    return {}


StartReader = Callable[[dict[str, Any], Mapping[str, str]], Started]


@dataclass(frozen=True)
class Dialect:
    front_end: str
    read_start: StartReader  # (the start message, the upgrade's URL query) -> Started
    # Where a media message's clock is: ms from the stream's start (Plivo: Unix ms; any origin
    # works, the handler counts from the first).
    has_timestamps: bool = True


class JsonStreamCodec:
    """Text frames in, events out; binary frames are not part of these protocols."""

    def __init__(self, dialect: Dialect, query: Mapping[str, str]) -> None:
        self.dialect = dialect
        self.query = query
        self.started: Started | None = None

    def receive_binary(self, data: bytes) -> CarrierEvent:
        return Skipped(f"a binary frame of {len(data)} bytes")

    def receive(self, text: str) -> CarrierEvent:
        # The per-frame case, a well-formed media message once started, on a short road (as
        # Twilio's: telephony/twilio.py); anything else, or anything it would not take as is,
        # is read in full by `read`, which decides every answer as before.
        if self.started is not None:
            parts = media_message(text)
            if parts is not None:
                message, media = parts
                track = media.get("track") or message.get("track") or DEFAULT_TRACK
                payload = media.get("payload")
                stamp = media.get("timestamp")
                leg = LEG_OF_TRACK.get(track) if type(track) is str else None
                if (
                    leg is not None
                    and type(payload) is str
                    and (stamp is None or type(stamp) in STAMP_TYPES)
                ):
                    try:
                        # b64decode(validate=True) for ASCII text, without its copy to bytes.
                        audio = a2b_base64(payload, strict_mode=True)
                        if stamp is None or not self.dialect.has_timestamps:
                            return Media(leg, audio, None)
                        return Media(leg, audio, int(float(stamp)))
                    except (ValueError, OverflowError):  # binascii.Error is a ValueError
                        pass
        return self.read(text)

    def read(self, text: str) -> CarrierEvent:
        """Any message, in full (what `receive` does, the short road aside)."""
        message = json_object(text)
        if isinstance(message, Skipped):
            return message
        kind = message.get("event")
        if kind == "start":
            if self.started is not None:
                raise CarrierStreamError("a second start message")
            try:
                self.started = self.dialect.read_start(message, self.query)
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, CarrierStreamError):
                    raise
                raise CarrierStreamError(f"malformed start message: {exc!r}") from None
            return self.started
        if kind == "stop":
            stop = message.get("stop")
            reason = first(stop, "reason") if isinstance(stop, dict) else ""
            return Stopped(f"stop: {reason}" if reason else "stop")
        if kind in ("media", "dtmf"):
            if self.started is None:
                raise CarrierStreamError(f"{kind} before start")
            try:
                return self._media(message) if kind == "media" else self._dtmf(message)
            except (KeyError, TypeError, ValueError, OverflowError) as exc:  # "1e999" included
                return Skipped(f"malformed {kind} message: {exc!r}")
        if kind == "error":  # Telnyx reports what it thought of our frames
            return Skipped(f"the carrier reports an error: {str(message.get('payload'))[:200]}")
        return Skipped(f"{str(kind)[:40]} event")

    def _media(self, message: Mapping[str, Any]) -> Media | Skipped:
        media = member(message, "media")
        # Exotel's beta extension puts the track beside the media object, the others inside.
        track = str(media.get("track") or message.get("track") or DEFAULT_TRACK)
        leg = LEG_OF_TRACK.get(track)
        if leg is None:
            return Skipped(f"unknown track {track[:20]!r}")
        try:
            payload = base64.b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError):
            return Skipped("media payload is not base64")
        stamp = media.get("timestamp")
        if isinstance(stamp, bool) or not isinstance(stamp, int | float | str | None):
            raise TypeError("media.timestamp is not a number")
        at = int(float(stamp)) if stamp is not None and self.dialect.has_timestamps else None
        return Media(leg, payload, at)

    @staticmethod
    def _dtmf(message: Mapping[str, Any]) -> CarrierEvent:
        return dtmf_of(member(message, "dtmf")["digit"])


def _split(parameters: Mapping[str, str], own: Mapping[str, str]) -> dict[str, str]:
    """Labels: the custom parameters, then the carrier's own fields (which win a clash)."""
    return {**parameters, **{k: v for k, v in own.items() if v}}


# --- one start reader per carrier --------------------------------------------------------------


def telnyx_start(message: dict[str, Any], query: Mapping[str, str]) -> Started:
    """`start` carries no track list: the stream URL says which tracks Telnyx was asked for
    (`?track=both_tracks`, as `stream_track`), inbound alone by default as Telnyx's own."""
    start = member(message, "start")
    fmt = member(start, "media_format", required=False)
    audio = AudioFormat(
        encoding_of(fmt.get("encoding", "PCMU"), l16=Encoding.PCM16_BE),
        rate_of(fmt.get("sample_rate", 8000)),
    )
    parameters = parameters_of(start.get("custom_parameters"))
    tags = start.get("tags")
    own = {
        "call_control_id": first(start, "call_control_id"),
        "call_session_id": first(start, "call_session_id"),
        "call_leg_id": first(start, "call_leg_id"),
        "stream_id": first(message, "stream_id") or first(start, "stream_id"),
        "user_id": first(start, "user_id"),
        "from": first(start, "from"),
        "to": first(start, "to"),
        "client_state": first(start, "client_state"),
        "tags": ",".join(map(str, tags)) if isinstance(tags, list) else "",
    }
    return Started(
        call_id=str(start["call_control_id"]),
        legs=legs_of(query.get("track") or query.get("stream_track")),
        audio=audio,
        labels=_split(parameters, own),
        parameters=parameters,
    )


def signalwire_start(message: dict[str, Any], query: Mapping[str, str]) -> Started:
    """Twilio's start; `mediaFormat.encoding` may be `audio/x-L16` (16 or 24 kHz, little-endian
    as SignalWire's own example reads it) or PCMA besides Twilio's μ-law."""
    start = member(message, "start")
    fmt = member(start, "mediaFormat", required=False)
    audio = AudioFormat(
        encoding_of(fmt.get("encoding", "audio/x-mulaw")), rate_of(fmt.get("sampleRate", 8000))
    )
    parameters = parameters_of(start.get("customParameters"))
    own = {
        "call_sid": first(start, "callSid"),
        "stream_sid": first(start, "streamSid") or first(message, "streamSid"),
        "account_sid": first(start, "accountSid"),
    }
    return Started(
        call_id=str(start["callSid"]),
        legs=legs_of(start.get("tracks", [DEFAULT_TRACK])),
        audio=audio,
        labels=_split(parameters, own),
        parameters=parameters,
    )


def exotel_start(message: dict[str, Any], query: Mapping[str, str]) -> Started:
    """16-bit little-endian PCM at `media_format.sample_rate` (a string), else the URL's
    `?sample-rate=`; μ-law only where the beta extension names it. `encoding` is not trusted
    beyond that (Exotel's pages disagree on its value)."""
    start = member(message, "start")
    fmt = member(start, "media_format", required=False)
    named = str(fmt.get("encoding", "")).lower()
    encoding = Encoding.MULAW if "mulaw" in named or "ulaw" in named else Encoding.PCM16
    rate = fmt.get("sample_rate") or query.get("sample-rate") or 8000
    parameters = parameters_of(start.get("custom_parameters") or start.get("customParameters"))
    own = {
        "call_sid": first(start, "call_sid", "callSid"),
        "stream_sid": first(start, "stream_sid", "streamSid")
        or first(message, "stream_sid", "streamSid"),
        "account_sid": first(start, "account_sid", "accountSid"),
        "from": first(start, "from"),
        "to": first(start, "to"),
    }
    if not own["call_sid"]:
        raise CarrierStreamError("start has no call_sid")
    return Started(
        call_id=own["call_sid"],
        legs=legs_of(start.get("tracks") or query.get("track")),
        audio=AudioFormat(encoding, rate_of(rate)),
        labels=_split(parameters, own),
        parameters=parameters,
    )


def plivo_start(message: dict[str, Any], query: Mapping[str, str]) -> Started:
    """`mediaFormat` decides (Plivo's pages disagree on the default); `extra_headers` rides
    beside `start` as `k=v;k2=v2` (or `,`, or an object)."""
    start = member(message, "start")
    fmt = member(start, "mediaFormat", required=False)
    audio = AudioFormat(
        encoding_of(fmt.get("encoding", "audio/x-l16")), rate_of(fmt.get("sampleRate", 8000))
    )
    parameters = parameters_of(message.get("extra_headers") or start.get("extra_headers"))
    own = {
        "call_id": first(start, "callId"),
        "stream_id": first(start, "streamId") or first(message, "streamId"),
        "account_id": first(start, "accountId"),
    }
    return Started(
        call_id=str(start["callId"]),
        legs=legs_of(start.get("tracks", [DEFAULT_TRACK])),
        audio=audio,
        labels=_split(parameters, own),
        parameters=parameters,
    )


TELNYX: Final = Dialect("telnyx", telnyx_start)
SIGNALWIRE: Final = Dialect("signalwire", signalwire_start)
EXOTEL: Final = Dialect("exotel", exotel_start)
PLIVO: Final = Dialect("plivo", plivo_start)
