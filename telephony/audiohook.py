"""Genesys AudioHook (protocol v2) without I/O: the session's messages, its sequence numbers and
stream position, and the Transcription Connector's `transcript` events.

Genesys Cloud is the client. It sends JSON text frames (`open`, `ping`, `paused`, `resumed`,
`discarded`, `update`, `error`, `close`) and binary audio frames in the media format the server
chose in `opened` (PCMU or L16 at 8 kHz; channels `external` = the customer, `internal` = the
agent, interleaved in the chosen order). The server answers `opened`, `pong`, `closed`,
`disconnect` and, with the connector, `event` messages carrying transcripts. Positions count the
samples per channel actually received (paused or discarded audio is never sent, so never
counted). See ../shared/protocols/audiohook.md; upstream is Genesys's reference implementation
(purecloudlabs/audiohook-reference-implementation, app/audiohook/src/server/serversessionimpl.ts).

`AudioHookCodec` turns frames into events and builds the server's messages; a protocol
violation raises `AudioHookError`, which the adapter answers with `disconnect(error)`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal

import numpy as np

from engine.base import Word
from telephony.errors import ProtocolError
from telephony.limits import parse_json

VERSION: Final = "2"
RATE: Final = 8000
CHANNELS: Final = ("external", "internal")  # customer, agent
FORMATS: Final = {"PCMU": 1, "L16": 2}  # bytes per sample
MAX_TEXT_CHARS: Final = 65535  # the reference server refuses a longer text message
DURATION: Final = re.compile(r"^PT(?:\d*\.)?\d+S$")
LANGUAGE: Final = re.compile(r"^[a-z]{2,3}-[A-Za-z]{2,3}$")
CLIENT_TYPES: Final = frozenset(
    {"open", "close", "discarded", "error", "paused", "ping", "resumed", "update"}
)
DisconnectReason = Literal["completed", "unauthorized", "error"]
State = Literal["connected", "active", "paused", "closing", "closed", "disconnected"]


class AudioHookError(ProtocolError):
    """A client message that breaks the protocol; its text goes back as `disconnect` info."""


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioHookConfig:
    """`[audiohook]`: the client secret of each API key Genesys Cloud uses (its integration's
    "Client Secret", base-64), and the languages `opened` lists when asked."""

    client_secrets: tuple[str, ...] = ()  # "KEY:BASE64SECRET" entries
    languages: tuple[str, ...] = ("en-US",)

    def __post_init__(self) -> None:
        parse_client_secrets(self.client_secrets)
        for language in self.languages:
            if not LANGUAGE.match(language):
                raise ValueError(
                    f"audiohook.languages: {language[:40]!r} is not a language code like en-US"
                )

    def secrets(self) -> dict[str, bytes]:
        return parse_client_secrets(self.client_secrets)


def parse_client_secrets(entries: Sequence[str]) -> dict[str, bytes]:
    """`KEY:BASE64SECRET` entries as {key: secret bytes}; an empty secret is allowed (the key
    then needs no signature, as in Genesys's reference server)."""
    secrets: dict[str, bytes] = {}
    for entry in entries:
        key, colon, encoded = entry.rpartition(":")
        if not colon or not key:
            raise ValueError(
                "audiohook.client_secrets: each entry is KEY:BASE64SECRET "
                f"(the API key, a colon, the client secret); got {entry[:8]!r}..."
            )
        try:
            secrets[key] = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"audiohook.client_secrets: the secret of key {key[:4]!r}... is not base-64"
            ) from None
    return secrets


# --- durations --------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """An ISO-8601 duration as AudioHook writes it: `PT12.34S` (milliseconds at most)."""
    text = f"{max(0.0, seconds):.3f}".rstrip("0").rstrip(".")
    return f"PT{text}S"


def parse_duration(value: object) -> float:
    if not isinstance(value, str) or not DURATION.match(value):
        raise AudioHookError(f"invalid duration {str(value)[:40]!r}")
    return float(Decimal(value[2:-1]))


def samples_duration(samples: int) -> str:
    return duration(samples / RATE)


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaFormat:
    format: str  # PCMU | L16
    rate: int
    channels: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "audio",
            "format": self.format,
            "channels": list(self.channels),
            "rate": self.rate,
        }

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel."""
        return FORMATS[self.format] * len(self.channels)


@dataclass(frozen=True)
class Participant:
    id: str
    ani: str = ""
    ani_name: str = ""
    dnis: str = ""


@dataclass(frozen=True)
class Open:
    organization_id: str
    conversation_id: str
    participant: Participant
    offered: tuple[MediaFormat, ...]
    media: MediaFormat | None  # the first offered format we take; None: none of them
    language: str | None = None
    wants_languages: bool = False  # `supportedLanguages: true`: list them in `opened`
    custom_config: Mapping[str, Any] = field(default_factory=dict)
    continued_sessions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Audio:
    """One binary frame, split per channel (raw PCMU or L16 bytes of each)."""

    channels: Mapping[str, bytes]
    samples: int  # per channel
    position: int  # samples per channel received before this frame


@dataclass(frozen=True)
class Ping:
    rtt: float | None


@dataclass(frozen=True)
class Paused:
    position: int


@dataclass(frozen=True)
class Resumed:
    start: float  # where the pause began, seconds
    discarded: float  # audio the client did not send, seconds


@dataclass(frozen=True)
class Discarded:
    start: float
    discarded: float


@dataclass(frozen=True)
class Update:
    language: str | None
    position: int


@dataclass(frozen=True)
class ClientError:
    code: int
    message: str


@dataclass(frozen=True)
class Close:
    reason: str
    position: float  # the client's final position, seconds
    received: int  # samples per channel we received: equal unless frames were lost


@dataclass(frozen=True)
class Ignored:
    """A valid message the state makes moot (a second `open`, `paused` while paused): the
    reference server logs and ignores these."""

    type: str
    reason: str


ClientEvent = Open | Ping | Paused | Resumed | Discarded | Update | ClientError | Close | Ignored


# --- the codec --------------------------------------------------------------------------------


class AudioHookCodec:
    """One session: client frames in, events out; the server's messages out as text.

    `seq` counts the server's messages and `clientseq` the last client message taken; a client
    message must carry `seq == clientseq + 1` and a `serverseq` no higher than ours."""

    def __init__(self, session_id: str) -> None:
        self.id = session_id
        self.seq = 0
        self.clientseq = 0
        self.position = 0  # samples per channel received
        self.state: State = "connected"
        self.media: MediaFormat | None = None
        self.language: str | None = None

    # client → server

    def receive_text(self, text: str) -> ClientEvent:
        if len(text) > MAX_TEXT_CHARS:
            raise AudioHookError(f"Text message too large (>64K). Length: {len(text)}")
        try:
            message = parse_json(text)
        except ValueError:
            raise AudioHookError("Text message not valid JSON") from None
        if not _well_formed(message):
            raise AudioHookError("Message not a well-formed client message")
        if message["seq"] != self.clientseq + 1:
            raise AudioHookError("Invalid seq value (not monotonically increasing)")
        self.clientseq = message["seq"]
        if message["serverseq"] > self.seq:
            raise AudioHookError("Invalid serverseq value")
        if message["id"] != self.id:
            raise AudioHookError("Session identifier mismatch")
        kind = message["type"]
        if kind not in CLIENT_TYPES:
            raise AudioHookError(f"Invalid Message: '{str(kind)[:40]}' is not a supported message")
        params = message["parameters"]
        try:
            return self._dispatch(kind, params, parse_duration(message["position"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, AudioHookError):
                raise
            raise AudioHookError("Invalid Message: Invalid/missing parameters") from None

    def _dispatch(self, kind: str, params: dict[str, Any], position: float) -> ClientEvent:
        if kind == "open":
            if self.state != "connected":
                return Ignored(kind, f"in state {self.state}")
            event = _open(params)
            self.media = event.media
            self.language = event.language
            return event
        if kind == "ping":
            rtt = params.get("rtt")
            return Ping(parse_duration(rtt) if rtt is not None else None)
        if kind == "close":
            if self.state == "closing":
                return Ignored(kind, "already closing")
            self.state = "closing"
            return Close(str(params.get("reason", "")), position, self.position)
        if kind == "paused":
            if self.state != "active":
                return Ignored(kind, f"in state {self.state}")
            self.state = "paused"
            return Paused(self.position)
        if kind == "resumed":
            start, discarded = parse_duration(params["start"]), parse_duration(params["discarded"])
            if self.state != "paused":
                return Ignored(kind, f"in state {self.state}")
            self.state = "active"
            return Resumed(start, discarded)
        if kind == "discarded":
            return Discarded(parse_duration(params["start"]), parse_duration(params["discarded"]))
        if kind == "update":
            language = params.get("language")
            if language is not None and not (
                isinstance(language, str) and LANGUAGE.match(language)
            ):
                raise AudioHookError("Invalid Message: Invalid/missing parameters")
            if self.state not in ("active", "paused"):
                return Ignored(kind, f"in state {self.state}")
            self.language = language or self.language
            return Update(language, self.position)
        # error
        code = params.get("code", 0)
        return ClientError(code if isinstance(code, int) else 0, str(params.get("message", "")))

    def receive_audio(self, data: bytes) -> Audio:
        """A binary frame: accepted only while the session is active."""
        if self.state != "active":
            raise AudioHookError(f"Received audio in state {self.state.upper()}")
        media = self.media
        if media is None:
            raise AudioHookError("Unexpected binary message: No media selected")
        if len(data) % media.frame_bytes:
            raise AudioHookError(
                "Binary data not a valid audio frame. Error: "
                f"{len(data)} bytes is not a whole number of {media.frame_bytes}-byte samples"
            )
        samples = len(data) // media.frame_bytes
        if len(media.channels) == 1:
            channels = {media.channels[0]: bytes(data)}
        else:  # interleaved: one row per sample, a column per channel
            dtype = np.uint8 if media.format == "PCMU" else np.dtype("<i2")
            rows = np.frombuffer(data, dtype=dtype).reshape(samples, len(media.channels))
            channels = {name: rows[:, i].tobytes() for i, name in enumerate(media.channels)}
        before = self.position
        self.position += samples
        return Audio(channels, samples, before)

    # server → client

    def opened(
        self,
        media: MediaFormat | None,
        languages: Sequence[str] | None = None,
        start_paused: bool = False,
    ) -> str:
        params: dict[str, Any] = {
            "media": [media.to_json()] if media is not None else [],
            "startPaused": start_paused,
        }
        if languages is not None:
            params["supportedLanguages"] = list(languages)
        self.state = "paused" if start_paused else "active"
        return self._message("opened", params)

    def pong(self) -> str:
        return self._message("pong", {})

    def closed(self) -> str:
        self.state = "closed"
        return self._message("closed", {})

    def disconnect(self, reason: DisconnectReason, info: str = "") -> str:
        """`disconnect`: the server ends the session; the client then sends `close`."""
        params: dict[str, Any] = {"reason": reason}
        if info:
            params["info"] = info
        self.state = "disconnected"
        return self._message("disconnect", params)

    @property
    def can_send_events(self) -> bool:
        """Events go out while the session is active, paused or closing (as upstream's)."""
        return self.state in ("active", "paused", "closing")

    def event(self, entities: Sequence[Mapping[str, Any]]) -> str:
        return self._message("event", {"entities": list(entities)})

    def _message(self, kind: str, params: Mapping[str, Any]) -> str:
        self.seq += 1
        message = {
            "version": VERSION,
            "id": self.id,
            "type": kind,
            "seq": self.seq,
            "clientseq": self.clientseq,
            "parameters": params,
        }
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


def _well_formed(message: object) -> bool:
    """The fields every client message has (upstream's isClientMessageBase)."""
    if not isinstance(message, dict):
        return False
    return (
        message.get("version") == VERSION
        and isinstance(message.get("id"), str)
        and isinstance(message.get("type"), str)
        and _count(message.get("seq"))
        and _count(message.get("serverseq"))
        and isinstance(message.get("position"), str)
        and isinstance(message.get("parameters"), dict)
    )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _open(params: dict[str, Any]) -> Open:
    participant = params["participant"]
    if not isinstance(participant, dict):
        raise TypeError("participant")
    offered = tuple(_media(m) for m in params["media"])
    language = params.get("language")
    if language is not None and not (isinstance(language, str) and LANGUAGE.match(language)):
        raise ValueError("language")
    custom = params.get("customConfig") or {}
    if not isinstance(custom, dict):
        raise TypeError("customConfig")
    continued = params.get("continuedSessions") or []
    if not isinstance(continued, list):
        raise TypeError("continuedSessions")
    return Open(
        organization_id=_uuid(params["organizationId"]),
        conversation_id=_uuid(params["conversationId"]),
        participant=Participant(
            _uuid(participant["id"]),
            str(participant.get("ani", "")),
            str(participant.get("aniName", "")),
            str(participant.get("dnis", "")),
        ),
        offered=offered,
        media=next((m for m in offered if _supported(m)), None),
        language=language,
        wants_languages=params.get("supportedLanguages") is True,
        custom_config=custom,
        continued_sessions=tuple(str(c.get("id", "")) for c in continued if isinstance(c, dict)),
    )


def _media(entry: object) -> MediaFormat:
    if not isinstance(entry, dict) or entry.get("type") != "audio":
        raise ValueError("media")
    channels = entry["channels"]
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise TypeError("channels")
    rate = entry["rate"]
    if not isinstance(rate, int) or isinstance(rate, bool):
        raise TypeError("rate")
    return MediaFormat(str(entry["format"]), rate, tuple(channels))


def _supported(media: MediaFormat) -> bool:
    return (
        media.format in FORMATS
        and media.rate == RATE
        and 1 <= len(media.channels) <= 2
        and len(set(media.channels)) == len(media.channels)
        and all(c in CHANNELS for c in media.channels)
    )


def _uuid(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a UUID")
    return str(uuid.UUID(value))


# --- the Transcription Connector --------------------------------------------------------------


@dataclass(frozen=True)
class Phrase:
    """Words of one channel between pauses: one final `transcript` event."""

    channel_id: int  # index of the channel in the chosen media format
    words: tuple[Word, ...]

    @property
    def confidence(self) -> float:
        known = [w.confidence for w in self.words if w.confidence is not None]
        return sum(known) / len(known) if known else 1.0


class PhraseCutter:
    """Cuts one channel's engine segments into phrases as Genesys's compliance suite expects
    them: a pause of `pause_s` between two words ends a phrase, and so does a cut (`paused`,
    `update`) at a stream position between them. Times are stream positions in seconds: the
    engine counts only the audio it was given, as the position does."""

    def __init__(self, channel_id: int, pause_s: float = 0.4) -> None:
        self.channel_id = channel_id
        self.pause_s = pause_s
        self._cuts: list[float] = []

    def cut_at(self, position_s: float) -> None:
        self._cuts.append(position_s)

    def phrases(self, words: Sequence[Word]) -> list[Phrase]:
        out: list[Phrase] = []
        current: list[Word] = []
        for word in words:
            if current and self._boundary(current[-1], word):
                out.append(Phrase(self.channel_id, tuple(current)))
                current = []
            current.append(word)
        if current:
            out.append(Phrase(self.channel_id, tuple(current)))
        if words:  # cuts behind these words are spent
            last = words[-1].start_s
            self._cuts = [c for c in self._cuts if c > last]
        return out

    def _boundary(self, before: Word, after: Word) -> bool:
        if after.start_s - before.end_s >= self.pause_s:
            return True
        return any(before.start_s < cut <= after.start_s for cut in self._cuts)


def transcript_entity(phrase: Phrase, language: str | None = None) -> dict[str, Any]:
    """The `transcript` entity of a final phrase (upstream's entities-transcript.ts)."""
    tokens: list[dict[str, Any]] = []
    last_offset = -1.0
    for word in phrase.words:
        # Token offsets must be unique in an interpretation: a word the aligner put at the
        # same millisecond as the one before moves up by one.
        offset = max(round(word.start_s, 3), round(last_offset + 0.001, 3))
        last_offset = offset
        tokens.append(
            {
                "type": "word",
                "value": word.text,
                "confidence": round(word.confidence if word.confidence is not None else 1.0, 3),
                "offset": duration(offset),
                "duration": duration(max(0.0, word.end_s - offset)),
            }
        )
    first, last = phrase.words[0], phrase.words[-1]
    data: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "channelId": phrase.channel_id,
        "isFinal": True,
        "offset": duration(first.start_s),
        "duration": duration(last.end_s - first.start_s),
        "alternatives": [
            {
                "confidence": round(phrase.confidence, 3),
                **({"languages": [language]} if language else {}),
                "interpretations": [
                    {
                        "type": "display",
                        "transcript": " ".join(w.text for w in phrase.words),
                        "tokens": tokens,
                    }
                ],
            }
        ],
    }
    return {"type": "transcript", "data": data}
