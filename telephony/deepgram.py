"""Deepgram's live streaming protocol (WebSocket `/v1/listen`), so Deepgram clients work unchanged.

The client opens `/v1/listen?encoding=mulaw&sample_rate=8000&...` with `Authorization: Token KEY`,
sends raw audio as binary frames and `KeepAlive` / `Finalize` / `CloseStream` as JSON text; we
answer `Results` (interim and final), `SpeechStarted`, `UtteranceEnd`, then `Metadata` before a
1000 close. See ../shared/protocols/deepgram-live.md; the `deepgram-sdk` package is the reference.

`parse_params` and `DeepgramCodec` are the protocol without I/O; `handle_listen` is the aiohttp
adapter. With `multichannel=true` each interleaved channel is a leg of one call (`channel_0`,
`channel_1`, ...) with its own `channel_index`; a mono stream is the leg `caller`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import numpy as np
from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from engine.base import BridgeError, Closed, EndOfTurn, EngineEvent, Partial, Segment, Word
from engine.keyterms import InvalidKeyterms, parse_keywords
from telephony.audio import WIRE_RATES, AudioDecoder, Encoding, PcmArray, ResampleStream
from telephony.audio import deinterleave as split_channels
from telephony.call import Call, CallHub
from telephony.errors import ProtocolError, rejection_for, ws_close_at_end
from telephony.limits import limits_of, parse_json
from telephony.transcript import NO_OPTIONS, InvalidOptions, TranscriptOptions, transcript_options
from telephony.ws_front import HUB, messages, open_websocket

log = logging.getLogger(__name__)

FRONT_END: Final = "deepgram"
PATH: Final = "/v1/listen"
MAX_CHANNELS: Final = 8
IDLE_TIMEOUT_S: Final = 10.0
"""Deepgram closes a stream that gets neither audio nor a text frame for 10 s (NET-0001)."""
FINALIZE_WAIT_S: Final = 5.0
"""The longest a `Finalize` waits for the engine before it is answered with what is out."""
WORD_CONFIDENCE: Final = 1.0
"""For words whose engine gives no confidence (or interim words from a partial's text): 1.0
keeps clients that filter on confidence working. Others carry the engine's (0..1)."""

ENCODINGS: Final = {"linear16": Encoding.PCM16, "mulaw": Encoding.MULAW, "alaw": Encoding.ALAW}
UNSUPPORTED_ENCODINGS: Final = (
    "linear32",
    "flac",
    "opus",
    "ogg-opus",
    "speex",
    "amr-nb",
    "amr-wb",
    "g729",
)
IGNORED_PARAMS: Final = (
    "model",
    "language",
    "diarize",
    "diarize_model",
    "numerals",
    "profanity_filter",
    "replace",
    "search",
    "dictation",
    "filler_words",
    "detect_entities",
    "language_hint",
    "callback",
    "callback_method",
    "mip_opt_out",
    "version",
    "no_delay",
)
"""Accepted and not acted on (docs/deepgram.md lists them); `model`, `language`, `tag`, `extra`
label the call. Any other unknown parameter is ignored too, as Deepgram does."""


class DeepgramError(ProtocolError):
    """Root of this protocol's errors."""


class BadParameters(DeepgramError):
    """A query parameter we cannot serve: HTTP 400 before the upgrade."""


class BadMessage(DeepgramError):
    """A text frame that is not one of the protocol's client messages."""


# --- query parameters -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeepgramParams:
    encoding: Encoding
    sample_rate: int
    channels: int = 1
    multichannel: bool = False
    interim_results: bool = False
    endpointing: bool = True  # `endpointing=false`: no `speech_final` at all
    utterance_end_ms: int | None = None
    vad_events: bool = False
    punctuate: bool = False
    smart_format: bool = False
    model: str = ""
    language: str = ""
    keywords: tuple[str, ...] = ()
    keyterms: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()
    # `redact=` (repeated or comma-separated) and `keyterm=` with `keywords=word:boost`.
    options: TranscriptOptions = NO_OPTIONS

    @property
    def legs(self) -> tuple[str, ...]:
        """One leg per channel with `multichannel=true`, else one (channels mixed down)."""
        if self.multichannel and self.channels > 1:
            return tuple(f"channel_{n}" for n in range(self.channels))
        return ("caller",)

    @property
    def formatted(self) -> bool:
        """Transcripts keep the engine's punctuation and case (`punctuate` / `smart_format`)."""
        return self.punctuate or self.smart_format

    def labels(self) -> dict[str, str]:
        labels = {
            "encoding": next(k for k, v in ENCODINGS.items() if v is self.encoding),
            "sample_rate": str(self.sample_rate),
            "channels": str(self.channels),
        }
        if self.model:
            labels["model"] = self.model
        if self.language:
            labels["language"] = self.language
        if self.tags:
            labels["tag"] = ",".join(self.tags)
        for key, value in self.extra:
            labels.setdefault(key, value)
        return labels


def _bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise BadParameters(f"{name} must be true or false, not {text!r}")


def _int(name: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BadParameters(f"{name} must be an integer, not {text!r}") from None
    if not low <= value <= high:
        raise BadParameters(f"{name} must be between {low} and {high}, not {value}")
    return value


def parse_params(query: Iterable[tuple[str, str]]) -> DeepgramParams:
    """The query's pairs (repeated keys allowed: `keyterm=a&keyterm=b`) to parameters."""
    values: dict[str, list[str]] = {}
    for key, value in query:
        values.setdefault(key, []).append(value)

    def last(name: str) -> str | None:
        found = values.get(name)
        return found[-1] if found else None

    encoding_text = last("encoding")
    if encoding_text is None:
        raise BadParameters(
            "encoding is required: stt-bridge takes raw audio (linear16, mulaw or alaw), "
            "not containers"
        )
    encoding = ENCODINGS.get(encoding_text.lower())
    if encoding is None:
        supported = ", ".join(ENCODINGS)
        if encoding_text.lower() in UNSUPPORTED_ENCODINGS:
            raise BadParameters(f"encoding {encoding_text} is not supported here; use {supported}")
        raise BadParameters(f"encoding must be one of {supported}, not {encoding_text!r}")
    rate_text = last("sample_rate")
    if rate_text is None:
        raise BadParameters("sample_rate is required with encoding")
    sample_rate = _int("sample_rate", rate_text, 1, 10**6)
    if sample_rate not in WIRE_RATES:
        rates = ", ".join(map(str, WIRE_RATES))
        raise BadParameters(f"sample_rate must be one of {rates}, not {sample_rate}")
    channels_text = last("channels")
    channels = 1 if channels_text is None else _int("channels", channels_text, 1, MAX_CHANNELS)

    def flag(name: str, default: bool = False) -> bool:
        text = last(name)
        return default if text is None else _bool(name, text)

    endpointing = True
    endpointing_text = last("endpointing")
    if endpointing_text is not None:
        lowered = endpointing_text.strip().lower()
        if lowered in ("true", "false"):
            endpointing = lowered == "true"
        else:
            _int("endpointing", endpointing_text, 0, 60_000)  # ms: valid, the engine's own pause
    utterance_end_text = last("utterance_end_ms")
    utterance_end_ms = (
        None
        if utterance_end_text is None
        else _int("utterance_end_ms", utterance_end_text, 0, 60_000)
    )
    for name in ("diarize", "numerals", "profanity_filter", "dictation", "filler_words"):
        flag(name)  # not acted on, but a bad value is still a bad request
    extra: list[tuple[str, str]] = []
    for item in values.get("extra", []):
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise BadParameters(f"extra must be key:value, not {item!r}")
        extra.append((key, value))
    try:
        keywords = parse_keywords(values.get("keywords", []))
        options = transcript_options(
            values.get("redact", []), [*values.get("keyterm", []), *keywords]
        )
    except (InvalidKeyterms, InvalidOptions) as exc:
        raise BadParameters(str(exc)) from exc
    return DeepgramParams(
        encoding=encoding,
        sample_rate=sample_rate,
        channels=channels,
        multichannel=flag("multichannel"),
        interim_results=flag("interim_results"),
        endpointing=endpointing,
        utterance_end_ms=utterance_end_ms,
        vad_events=flag("vad_events"),
        punctuate=flag("punctuate"),
        smart_format=flag("smart_format"),
        model=last("model") or "",
        language=last("language") or "",
        keywords=tuple(values.get("keywords", [])),
        keyterms=tuple(values.get("keyterm", [])),
        tags=tuple(values.get("tag", [])),
        extra=tuple(extra),
        options=options,
    )


# --- client messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeepAlive:
    """No audio for a while: keep the stream open."""


@dataclass(frozen=True)
class Finalize:
    """Finish the utterance in progress now (one channel, or all when `channel` is None)."""

    channel: int | None = None


@dataclass(frozen=True)
class CloseStream:
    """No more audio: flush every word, send `Metadata`, close with 1000."""


@dataclass(frozen=True)
class Configure:
    """Mid-stream keyterms / formatting (SDK 7.x `send_configure`); not supported here."""


ClientMessage = KeepAlive | Finalize | CloseStream | Configure
_MESSAGES: Final[dict[str, type[ClientMessage]]] = {
    "KeepAlive": KeepAlive,
    "CloseStream": CloseStream,
    "Configure": Configure,
}


def parse_client_message(text: str) -> ClientMessage:
    try:
        message = parse_json(text)
    except ValueError:
        raise BadMessage("could not parse client message: not JSON") from None
    if not isinstance(message, dict):
        raise BadMessage("could not parse client message: not a JSON object")
    kind = message.get("type")
    if kind == "Finalize":
        channel = message.get("channel")
        if channel is not None and (not isinstance(channel, int) or isinstance(channel, bool)):
            raise BadMessage("Finalize: channel must be an integer")
        return Finalize(channel)
    known = _MESSAGES.get(kind) if isinstance(kind, str) else None
    if known is None:
        raise BadMessage(f"unknown client message type {kind!r}")
    return known()


# --- server messages --------------------------------------------------------------------------

_EDGE_PUNCTUATION = re.compile(r"^\W+|\W+$")


def plain_word(written: str) -> str:
    """Deepgram's `word`: lowercase, without the punctuation around it ("Hi," -> "hi")."""
    return _EDGE_PUNCTUATION.sub("", written).lower()


def _confidence(value: float | None) -> float:
    return WORD_CONFIDENCE if value is None else round(value, 4)


def _time(seconds: float) -> float:
    return round(max(0.0, seconds), 3)


@dataclass(frozen=True)
class ModelInfo:
    """What `metadata.model_info` says about the engine behind the bridge."""

    name: str
    version: str
    arch: str = "stt-bridge"

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"stt-bridge:{self.name}:{self.version}"))


@dataclass
class _Channel:
    index: int
    cursor_s: float = 0.0  # where the next Results span starts: the end of the last final
    words: list[Word] = field(default_factory=list)  # out since the last final
    partial_seen: bool = False  # this utterance had a `Partial`: interims come from those
    in_speech: bool = False  # SpeechStarted sent for the utterance in progress
    finalizing: bool = False  # a Finalize waits for its answer
    last_word_end: float | None = None  # of the last final, for UtteranceEnd
    utterance_end_sent: bool = True


class DeepgramCodec:
    """Audio frames in, one array per leg at the engine's rate out; engine events to messages.

    Every `on_event` / `finalized` / `metadata` call returns the JSON text frames to send, in
    order; nothing here does I/O.
    """

    def __init__(
        self,
        params: DeepgramParams,
        engine_rate: int,
        request_id: str,
        model: ModelInfo,
        created: datetime | None = None,
    ) -> None:
        self.params = params
        self.request_id = request_id
        self.model = model
        self.created = created or datetime.now(UTC)
        # One channel: wire bytes batched, decoded and resampled per 80 ms (AudioDecoder).
        # Several: decoded per packet, split, then each channel resampled on its own.
        self._mono = (
            AudioDecoder(params.encoding, params.sample_rate, engine_rate)
            if params.channels == 1
            else None
        )
        self._wire = AudioDecoder(params.encoding, params.sample_rate, params.sample_rate)
        self._frame_bytes = params.encoding.bytes_per_sample * params.channels
        self._carry = b""
        self._resamplers = (
            {leg: ResampleStream(params.sample_rate, engine_rate) for leg in self.legs}
            if self._mono is None
            else {}
        )
        self._sha256 = hashlib.sha256()
        self._bytes = 0
        total = params.channels if len(self.legs) > 1 else 1
        self._total_channels = total
        self._channels = {leg: _Channel(n) for n, leg in enumerate(self.legs)}

    @property
    def legs(self) -> tuple[str, ...]:
        return self.params.legs

    def leg_of(self, channel: int) -> str | None:
        return self.legs[channel] if 0 <= channel < len(self.legs) else None

    # -- audio --

    def receive_audio(self, data: bytes) -> list[PcmArray]:
        """One array per leg (same order as `legs`), at the engine's rate."""
        self._sha256.update(data)
        self._bytes += len(data)
        if self._mono is not None:
            return [self._mono.feed(data)]
        data = self._carry + data
        usable = len(data) - len(data) % self._frame_bytes
        self._carry = data[usable:]
        pcm = self._wire.decode(data[:usable])
        if self.params.channels == 1:
            per_leg = [pcm]
        else:
            channels = split_channels(pcm, self.params.channels)
            if len(self.legs) == 1:  # channels without multichannel: mixed to one stream
                mixed = np.mean(np.stack(channels).astype(np.int32), axis=0)
                per_leg = [np.rint(mixed).astype(np.int16)]
            else:
                per_leg = channels
        return [self._resamplers[leg].process(p) for leg, p in zip(self.legs, per_leg, strict=True)]

    def end_of_audio(self) -> list[PcmArray]:
        """What the resamplers still hold once the client has no more audio."""
        if self._mono is not None:
            return [self._mono.flush()]
        return [self._resamplers[leg].flush() for leg in self.legs]

    @property
    def audio_s(self) -> float:
        return self._bytes / self._frame_bytes / self.params.sample_rate

    # -- engine events to server messages --

    def on_event(self, leg: str, event: EngineEvent) -> list[str]:
        channel = self._channels[leg]
        out: list[str] = []
        if isinstance(event, Word):
            out += self._speech_started(channel, event.start_s)
            channel.words.append(event)
            # An engine without partials (or an utterance too short for one): the words so
            # far are the interim.
            if self.params.interim_results and not channel.partial_seen:
                out.append(self._results(channel, channel.words, event.end_s, final=False))
        elif isinstance(event, Partial):
            channel.partial_seen = True
            out += self._speech_started(channel, event.start_s)
            if self.params.interim_results and event.text.strip():
                words = _spread(event.text, event.start_s, event.end_s)
                out.append(self._results(channel, words, event.end_s, final=False))
        elif isinstance(event, Segment):
            # Words a `Finalize` already made final (an engine with no endpoint to cut, whose
            # turn went on) end before the cursor: only the rest are new.
            words = [w for w in (event.words or channel.words) if w.end_s > channel.cursor_s]
            if words or channel.finalizing:
                out.append(
                    self._results(
                        channel,
                        words,
                        max(event.end_s, channel.cursor_s),
                        final=True,
                        speech_final=self.params.endpointing,
                        from_finalize=channel.finalizing,
                    )
                )
            channel.finalizing = False
        elif isinstance(event, EndOfTurn):
            if self.params.utterance_end_ms is not None and not channel.utterance_end_sent:
                channel.utterance_end_sent = True
                out.append(
                    _dumps(
                        {
                            "type": "UtteranceEnd",
                            "channel": [channel.index, self._total_channels],
                            "last_word_end": channel.last_word_end,
                        }
                    )
                )
        elif isinstance(event, Closed) and channel.words:  # words no Segment took: final
            last_end = channel.words[-1].end_s
            out.append(self._results(channel, channel.words, last_end, final=True))
        return out

    def begin_finalize(self, leg: str) -> None:
        self._channels[leg].finalizing = True

    def finalized(self, leg: str, settled_s: float) -> list[str]:
        """The answer to a `Finalize` once the engine has settled `settled_s` of this leg:
        nothing when a final already carried `from_finalize`, else a final of the words out
        since the last one (often none)."""
        channel = self._channels[leg]
        if not channel.finalizing:
            return []
        channel.finalizing = False
        words = channel.words
        end = max(settled_s, channel.cursor_s, words[-1].end_s if words else 0.0)
        return [self._results(channel, words, end, final=True, from_finalize=True)]

    def _speech_started(self, channel: _Channel, at_s: float) -> list[str]:
        if channel.in_speech:
            return []
        channel.in_speech = True
        if not self.params.vad_events:
            return []
        message = {
            "type": "SpeechStarted",
            "channel": [channel.index, self._total_channels],
            "timestamp": _time(at_s),
        }
        return [_dumps(message)]

    def _results(
        self,
        channel: _Channel,
        words: list[Word],
        end_s: float,
        *,
        final: bool,
        speech_final: bool = False,
        from_finalize: bool = False,
    ) -> str:
        start = channel.cursor_s
        entries: list[dict[str, Any]] = []
        for word in words:
            plain = plain_word(word.text)
            if not plain:
                continue
            entries.append(
                {
                    "word": plain,
                    "start": _time(word.start_s),
                    "end": _time(word.end_s),
                    "confidence": _confidence(word.confidence),
                    "punctuated_word": word.text,
                }
            )
        key = "punctuated_word" if self.params.formatted else "word"
        transcript = " ".join(str(e[key]) for e in entries)
        message = {
            "type": "Results",
            "channel_index": [channel.index, self._total_channels],
            "duration": _time(end_s - start),
            "start": _time(start),
            "is_final": final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {
                "alternatives": [
                    {
                        "transcript": transcript,
                        # as Deepgram's: the mean of its words'
                        "confidence": round(
                            sum(float(e["confidence"]) for e in entries) / len(entries), 4
                        )
                        if entries
                        else 0.0,
                        "words": entries,
                    }
                ]
            },
            "metadata": self._result_metadata(),
        }
        if final:
            channel.cursor_s = max(channel.cursor_s, end_s)
            channel.words = []
            channel.in_speech = False
            channel.partial_seen = False
            if entries:
                channel.last_word_end = float(entries[-1]["end"])
                channel.utterance_end_sent = False
        return _dumps(message)

    def _result_metadata(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "model_info": {
                "name": self.model.name,
                "version": self.model.version,
                "arch": self.model.arch,
            },
            "model_uuid": self.model.uuid,
        }

    def metadata(self) -> str:
        """The summary sent after `CloseStream`, before the close."""
        model = {"name": self.model.name, "version": self.model.version, "arch": self.model.arch}
        created = self.created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return _dumps(
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": self.request_id,
                "sha256": self._sha256.hexdigest(),
                "created": created,
                "duration": _time(self.audio_s),
                "channels": self.params.channels,
                "models": [self.model.uuid],
                "model_info": {self.model.uuid: model},
            }
        )

    @staticmethod
    def error(description: str, message: str = "") -> str:
        """Deepgram's `Error` message (sent before we close on bad client input)."""
        body = {"type": "Error", "variant": "BadRequest", "description": description}
        if message:
            body["message"] = message[:200]
        return _dumps(body)

    def configure_failure(self) -> str:
        return _dumps(
            {
                "type": "ConfigureFailure",
                "request_id": self.request_id,
                "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                "description": "the engine takes no keyterms; the stream goes on as it was",
            }
        )


def rejection_body(error: str, description: str, request_id: str) -> dict[str, str]:
    """Deepgram's error body for a refused upgrade (`err_code`, `err_msg`, `request_id`)."""
    return {"err_code": error, "err_msg": description, "request_id": request_id}


def _spread(text: str, start_s: float, end_s: float) -> list[Word]:
    """A `Partial` has no word times: its words share its span evenly (interims only)."""
    tokens = text.split()
    step = max(0.0, end_s - start_s) / max(1, len(tokens))
    return [
        Word(token, start_s + n * step, start_s + (n + 1) * step) for n, token in enumerate(tokens)
    ]


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


# --- aiohttp adapter --------------------------------------------------------------------------


def _model_info(hub: CallHub) -> ModelInfo:
    try:
        version = importlib.metadata.version("stt-bridge")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return ModelInfo(f"stt-bridge-{hub.engine.name}", version)


async def handle_listen(request: web.Request) -> web.StreamResponse:
    request_id = str(uuid.uuid4())
    headers = {"dg-request-id": request_id}
    try:
        params = parse_params(request.query.items())
    except BadParameters as exc:
        body = rejection_body("Bad Request", str(exc), request_id)
        headers["dg-error"] = str(exc)
        return web.json_response(body, status=400, headers=headers)
    hub = request.app[HUB]
    codec = DeepgramCodec(params, hub.engine.sample_rate, request_id, _model_info(hub))
    # Browsers send the key as `Sec-WebSocket-Protocol: token, KEY`: select `token`.
    ws = open_websocket(request, protocols=("token",), read_by_messages=True)
    ws.headers.update(headers)
    if not ws.can_prepare(request).ok:  # not a WebSocket upgrade: no call to open
        description = "a WebSocket upgrade is required"
        headers["dg-error"] = description
        body = rejection_body("Bad Request", description, request_id)
        return web.json_response(body, status=400, headers=headers)
    send_lock = asyncio.Lock()

    async def send(texts: list[str]) -> None:
        async with send_lock:
            for text in texts:
                if not ws.closed:
                    await ws.send_str(text)

    async def reply(leg: str, event: EngineEvent) -> None:
        await send(codec.on_event(leg, event))

    labels = params.labels()
    if request.remote:
        labels["remote"] = request.remote
    session_id = request.headers.get("x-deepgram-session-id", "")
    if session_id and len(session_id) <= 64 and session_id.isprintable():
        labels["session_id"] = session_id
    try:
        # Admitted before the upgrade, so a full engine is an HTTP status the SDK reports.
        call = hub.open_call(
            FRONT_END,
            legs=params.legs,
            call_id=request_id,
            labels=labels,
            reply=reply,
            options=params.options,
        )
    except BridgeError as exc:
        log.warning("deepgram stream rejected: %s", exc, extra={"front_end": FRONT_END})
        status = rejection_for(exc).http_status
        headers["dg-error"] = str(exc)
        body = rejection_body("Service Unavailable", str(exc), request_id)
        return web.json_response(body, status=status, headers=headers)
    try:
        await ws.prepare(request)
    except BaseException:
        await asyncio.shield(call.end("upgrade failed"))
        raise
    ignored = sorted({key for key in request.query if key in IGNORED_PARAMS})
    if ignored:
        log.info(
            "deepgram parameters not acted on: %s",
            ", ".join(ignored),
            extra={"call_id": call.id, "front_end": FRONT_END},
        )
    # The operator's idle limit applies too, when it is shorter than Deepgram's 10 s.
    idle_s = min(IDLE_TIMEOUT_S, limits_of(request).idle_timeout_s)
    await _serve(request, ws, call, codec, send, idle_s)
    return ws


async def _serve(
    request: web.Request,
    ws: web.WebSocketResponse,
    call: Call,
    codec: DeepgramCodec,
    send: Callable[[list[str]], Awaitable[None]],
    idle_s: float,
) -> None:
    reason = "client closed"
    close_stream = False
    close_code: int = WSCloseCode.OK
    close_reason = ""
    finalizing: set[asyncio.Task[None]] = set()

    async def finalize(legs: tuple[str, ...]) -> None:
        legs_open = [call.leg(leg) for leg in legs]
        streams = [leg.stream for leg in legs_open]
        for leg, stream in zip(legs, streams, strict=True):
            codec.begin_finalize(leg)
            stream.finalize()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(s.wait_settled(s.stream.stats.samples_in) for s in legs_open)),
                FINALIZE_WAIT_S,
            )
        for leg, stream in zip(legs, streams, strict=True):
            await send(codec.finalized(leg, stream.settled_samples / stream.sample_rate))

    async def idle() -> None:
        nonlocal reason, close_code, close_reason
        reason = "idle timeout"
        close_code = WSCloseCode.INTERNAL_ERROR
        close_reason = f"NET-0001: no audio or message received for {idle_s:g} s"
        await ws.close(code=close_code, message=close_reason.encode()[:120])

    def push(data: bytes) -> None:
        for leg, pcm in zip(codec.legs, codec.receive_audio(data), strict=True):
            call.leg(leg).push(pcm)

    async def write(data: bytes) -> None:
        # Backpressure, never loss: waits while the engine is behind (see websocket.py).
        for leg, pcm in zip(codec.legs, codec.receive_audio(data), strict=True):
            await call.leg(leg).write(pcm)

    def push_direct(msg: WSMessage) -> bool:  # the loop's BINARY branch, as frames are parsed
        if msg.type != WSMsgType.BINARY or not msg.data or call.ended:
            return False
        if not all(call.leg(leg).has_room for leg in codec.legs):
            return False  # the engine is behind: the loop waits for room
        push(msg.data)
        return True

    try:
        async for msg in messages(ws, request, idle_s, idle, direct=push_direct):
            if msg.type == WSMsgType.BINARY:
                if not msg.data:  # the old protocol's end of audio
                    reason, close_stream = "client CloseStream", True
                    break
                await write(msg.data)
                if call.ended:  # by the engine (a lost engine node)
                    reason = call.engine_reason
                    close_code, close_reason = ws_close_at_end(call)[0], call.engine_reason
                    break
            elif msg.type == WSMsgType.TEXT:
                try:
                    message = parse_client_message(msg.data)
                except BadMessage as exc:
                    await send([codec.error(str(exc), msg.data)])
                    reason = f"bad client message: {exc}"
                    close_code = WSCloseCode.POLICY_VIOLATION
                    close_reason = f"DATA: {exc}"
                    break
                if isinstance(message, CloseStream):
                    reason, close_stream = "client CloseStream", True
                    break
                if isinstance(message, Finalize):
                    legs = codec.legs
                    if message.channel is not None:
                        one = codec.leg_of(message.channel)
                        legs = (one,) if one is not None else ()
                    task = asyncio.create_task(finalize(legs))
                    finalizing.add(task)
                    task.add_done_callback(finalizing.discard)
                elif isinstance(message, Configure):
                    await send([codec.configure_failure()])
                # KeepAlive: receiving it was the point
            elif msg.type == WSMsgType.ERROR:
                reason = f"connection error: {ws.exception()}"
                break
    finally:
        if close_code != WSCloseCode.OK and not ws.closed:
            # A fatal error: the client hears no more, but its words still reach the store.
            await ws.close(code=close_code, message=close_reason.encode()[:120])
        for leg, pcm in zip(codec.legs, codec.end_of_audio(), strict=True):
            call.leg(leg).push(pcm)
        if finalizing:
            await asyncio.shield(asyncio.gather(*finalizing, return_exceptions=True))
        # Shielded: a cancelled handler (server shutdown) must still flush the transcript.
        await asyncio.shield(call.end(reason))
        if close_stream:
            await send([codec.metadata()])
        if not ws.closed:
            await ws.close(code=close_code, message=close_reason.encode()[:120])


def add_routes(app: web.Application, hub: CallHub) -> None:
    """`/v1/listen`, and any path ending in it (a base URL with a prefix, or given twice)."""
    app[HUB] = hub
    app.router.add_get(PATH, handle_listen)
    app.router.add_get("/{prefix:.+}" + PATH, handle_listen)
