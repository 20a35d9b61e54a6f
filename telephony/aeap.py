"""Asterisk dialplan speech (res_speech_aeap): an AEAP speech-to-text server.

`SpeechCreate(stt-bridge)` makes Asterisk open a WebSocket to `/asterisk/aeap` (subprotocol
`speech_to_text`) and send a JSON `setup` request naming one codec (`ulaw`, `alaw`, `slin`) and
the `@` parameters of aeap.conf; each `SpeechBackground` then streams the caller's audio as
binary messages. We end a recognition by pushing `{"request":"set","params":{"results":[...]}}`
the moment the engine closes the utterance (a `Segment`), and answer Asterisk's `get` for
results with the best hypothesis so far. Every JSON message is `{"request"|"response": name,
"id": ...}`; a failed answer carries `error_msg`. See ../shared/protocols/asterisk-aeap.md.

Each recognition (from its first audio to its result, a DTMF entry or a `get`) is one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import WSMsgType, web

from engine.base import BridgeError, EngineEvent, EngineFull, Partial, Segment, Word
from telephony.audio import WIRE_RATES, AudioDecoder, Encoding
from telephony.call import Call, CallHub, Draining
from telephony.errors import ProtocolError, rejection_for
from telephony.limits import clean_labels, limits_of, parse_json
from telephony.ws_front import HUB

log = logging.getLogger(__name__)

FRONT_END: Final = "asterisk_aeap"
SUBPROTOCOL: Final = "speech_to_text"
PATH: Final = "/asterisk/aeap"

CODECS: Final[Mapping[str, Encoding]] = {
    "ulaw": Encoding.MULAW,
    "alaw": Encoding.ALAW,
    "slin": Encoding.PCM16,
}
"""Codec names (not format names: `slin16` is announced as `slin`) we take."""

FRAME_S: Final = 0.02  # Asterisk's speech frames are 20 ms: a first `slin` frame tells its rate
SCORE_FINAL: Final = 900  # a finished utterance whose engine gives no confidence of its own
SCORE_PARTIAL: Final = 500  # a hypothesis still being spoken, handed over on `get`
# Otherwise a result's score is 1000 x its segments' mean confidence (0..1, engine/confidence.py)
TAIL_S: Final = 0.1  # audio this soon after a result is that recognition's last frames in flight
UNSUPPORTED: Final = "Unsupported and/or un-handled message"  # res_aeap's own wording

_DIGIT_WORDS: Final = {
    "zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
}  # fmt: skip


class AeapError(ProtocolError):
    """A message res_speech_aeap would not send: not JSON, no name or id, audio before setup."""


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    id: str
    version: str
    codecs: tuple[str, ...]
    params: Mapping[str, str]


@dataclass(frozen=True)
class Get:
    id: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class Set:
    id: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Response:
    """Asterisk's answer to one of our requests (the results `set`)."""

    name: str
    id: str
    error_msg: str | None = None


@dataclass(frozen=True)
class Unknown:
    """A request we do not serve: answered with `error_msg`, as res_aeap does."""

    name: str
    id: str


AeapMessage = Setup | Get | Set | Response | Unknown


def digits_of(text: str) -> str:
    """The digits a caller spoke: figures kept, number words read ("four five" -> "45")."""
    out = []
    for token in re.findall(r"[0-9]+|[a-z]+", text.lower()):
        out.append(token if token.isdigit() else _DIGIT_WORDS.get(token, ""))
    return "".join(out)


def _setting_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


@dataclass
class Settings:
    """What the setup `params` (aeap.conf `@key = value`) and `SPEECH_ENGINE(key)=` set."""

    grammar: str = ""  # "digits": the result is the digits spoken; else reported as given
    sample_rate: int = 0  # of `slin`; 0: told by the size of the first 20 ms frame
    no_input_timeout_ms: int = 0  # no speech in this much audio: an empty result (0: none)
    recognition_timeout_ms: int = 0  # this much audio: the best hypothesis so far (0: none)
    results_type: str = "normal"
    extra: dict[str, str] = field(default_factory=dict)  # the rest: labels, `get`-able

    def update(self, params: Mapping[str, Any]) -> None:
        for raw_name, raw_value in params.items():
            name, value = _setting_name(str(raw_name)), str(raw_value).strip()
            try:
                if name == "grammar":
                    self.grammar = value
                elif name in ("sample_rate", "rate"):
                    rate = int(value)
                    if rate not in WIRE_RATES:
                        raise AeapError(f"sample_rate must be one of {WIRE_RATES}, not {rate}")
                    self.sample_rate = rate
                elif name == "no_input_timeout":
                    self.no_input_timeout_ms = max(0, int(value))
                elif name == "recognition_timeout":
                    self.recognition_timeout_ms = max(0, int(value))
                elif name == "results_type":
                    self.results_type = value
                else:
                    self.extra[name] = value
            except ValueError:
                raise AeapError(f"{raw_name} must be a whole number, not {value!r}") from None

    def get(self, name: str) -> str | None:
        name = _setting_name(name)
        values = {
            "grammar": self.grammar,
            "sample_rate": str(self.sample_rate),
            "no_input_timeout": str(self.no_input_timeout_ms),
            "recognition_timeout": str(self.recognition_timeout_ms),
            "results_type": self.results_type,
        }
        return values.get(name, self.extra.get(name))


@dataclass
class Recognition:
    """One `SpeechBackground`: what the engine has heard of the utterance so far."""

    number: int
    segments: list[str] = field(default_factory=list)
    confidences: list[float | None] = field(default_factory=list)  # one per segment
    partial: str = ""
    heard: bool = False  # any word, partial or segment
    audio_s: float = 0.0  # at the wire rate, as Asterisk sent it
    done: bool = False

    def hear(self, event: EngineEvent) -> bool:
        """Take one engine event; True when it ends the utterance (a `Segment`)."""
        if isinstance(event, Segment):
            self.segments.append(event.text)
            self.confidences.append(event.confidence)
            self.partial = ""
            self.heard = True
            return True
        if isinstance(event, Partial):
            self.partial = event.text
            self.heard = True
        elif isinstance(event, Word):
            self.heard = True
        return False

    @property
    def hypothesis(self) -> str:
        return " ".join(t for t in (*self.segments, self.partial) if t)

    def score(self, final: bool) -> int:
        """0-1000: the segments' mean confidence where the engine gives it; a hypothesis with
        words still being spoken scores at most `SCORE_PARTIAL`."""
        known = [c for c in self.confidences if c is not None]
        if not known or len(known) < len(self.confidences):
            return SCORE_FINAL if final else SCORE_PARTIAL
        score = round(1000 * sum(known) / len(known))
        return score if final and not self.partial else min(score, SCORE_PARTIAL)


class AeapCodec:
    """JSON and binary messages in; JSON answers, results and audio at the engine's rate out."""

    def __init__(self, engine_rate: int, query: Mapping[str, str] | None = None) -> None:
        self.engine_rate = engine_rate
        self.settings = Settings()
        self.settings.update(query or {})
        self.codec: str | None = None
        self.last_results: list[dict[str, Any]] = []

    # -- in --

    def receive_text(self, text: str) -> AeapMessage:
        try:
            message = parse_json(text)
        except ValueError:
            raise AeapError("a text message that is not JSON") from None
        if not isinstance(message, dict):
            raise AeapError("a JSON message that is not an object")
        ident = message.get("id")
        if not isinstance(ident, str) or not ident:
            raise AeapError("a message without an id")
        if isinstance(message.get("response"), str):
            error = message.get("error_msg")
            return Response(message["response"], ident, None if error is None else str(error))
        name = message.get("request")
        if not isinstance(name, str):
            raise AeapError("a message that is neither a request nor a response")
        if name == "setup":
            codecs = message.get("codecs") or []
            names = tuple(str(c.get("name", "")) for c in codecs if isinstance(c, dict))
            params = message.get("params") or {}
            if not isinstance(params, dict):
                raise AeapError("setup params must be an object")
            return Setup(ident, str(message.get("version", "")), names, params)
        if self.codec is None:
            raise AeapError(f"{name} before setup")
        if name == "get":
            asked = message.get("params") or []
            if not isinstance(asked, list) or not asked:
                raise AeapError("get without parameter names")
            return Get(ident, tuple(str(n) for n in asked))
        if name == "set":
            params = message.get("params")
            if not isinstance(params, dict) or not params:
                raise AeapError("set without parameters")
            return Set(ident, params)
        return Unknown(name, ident)

    def accept_setup(self, setup: Setup) -> str:
        """The setup answer: the offered codec, exactly as named; raises if we cannot take it."""
        if self.codec is not None:
            raise AeapError("a second setup")
        if not setup.codecs or setup.codecs[0] not in CODECS:
            offered = ", ".join(setup.codecs) or "none"
            raise AeapError(f"codec {offered} is not served; use one of {', '.join(CODECS)}")
        self.settings.update(setup.params)
        self.codec = setup.codecs[0]
        return self.encode_response("setup", setup.id, codecs=[{"name": self.codec}])

    def decoder(self, first_frame: bytes | None) -> AudioDecoder:
        """A decoder for one recognition's audio. G.711 is 8 kHz; `slin` is at the rate the
        parameters said, else at the one its first 20 ms frame shows (640 bytes: 16 kHz)."""
        if self.codec is None:
            raise AeapError("audio before setup")
        if self.codec != "slin":
            return AudioDecoder(CODECS[self.codec], 8000, self.engine_rate)
        if first_frame is None and not self.settings.sample_rate:  # no audio to tell
            return AudioDecoder(Encoding.PCM16, 8000, self.engine_rate)
        if first_frame is not None and not self.settings.sample_rate:
            rate = round(len(first_frame) // 2 / FRAME_S)
            if rate not in WIRE_RATES:
                raise AeapError(f"a first slin frame of {len(first_frame)} bytes: set @sample_rate")
            self.settings.sample_rate = rate
        return AudioDecoder(Encoding.PCM16, self.settings.sample_rate, self.engine_rate)

    # -- out --

    def result(self, text: str, score: int) -> dict[str, Any]:
        """One result as res_speech_aeap reads it (`score` and `best` JSON integers)."""
        grammar = self.settings.grammar
        if grammar == "digits":
            text = digits_of(text)
        return {"text": text, "score": score, "grammar": grammar or "default", "best": 0}

    def results_of(self, recognition: Recognition, final: bool) -> list[dict[str, Any]]:
        text = recognition.hypothesis
        if not text or (self.settings.grammar == "digits" and not digits_of(text)):
            return []
        return [self.result(text, recognition.score(final))]

    def encode_results(self, results: list[dict[str, Any]]) -> str:
        """Our `set` request that ends `SpeechBackground` with these results."""
        self.last_results = results
        return _dump({"request": "set", "id": str(uuid.uuid4()), "params": {"results": results}})

    def answer_get(self, get: Get, recognition: Recognition | None) -> str:
        """Results (the best hypothesis so far) or one setting; res_speech_aeap reads only the
        first name. `digits`: the digits of the latest result."""
        name = get.names[0]
        if name == "results":
            results = (
                self.results_of(recognition, final=False)
                if recognition is not None and not recognition.done
                else self.last_results
            )
            self.last_results = results
            return self.encode_response("get", get.id, params={"results": results})
        if _setting_name(name) == "digits":
            text = self.last_results[-1]["text"] if self.last_results else ""
            return self.encode_response("get", get.id, params={name: digits_of(text)})
        value = self.settings.get(name)
        if value is None:
            return self.encode_error("get", get.id, f"no setting {name!r}")
        return self.encode_response("get", get.id, params={name: value})

    @staticmethod
    def encode_response(name: str, ident: str, **payload: Any) -> str:
        return _dump({"response": name, "id": ident, **payload})

    @staticmethod
    def encode_error(name: str, ident: str, error: str) -> str:
        return _dump({"response": name, "id": ident, "error_msg": error})


def _dump(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


# --- aiohttp adapter --------------------------------------------------------------------------


@dataclass(eq=False)
class _Live:
    recognition: Recognition
    call: Call
    decoder: AudioDecoder


class _SpeechObject:
    """One connection (one `SpeechCreate`): its recognitions, one call each."""

    def __init__(self, ws: web.WebSocketResponse, hub: CallHub, codec: AeapCodec) -> None:
        self.ws = ws
        self.hub = hub
        self.codec = codec
        self.speech_id = uuid.uuid4().hex[:12]
        self.live: _Live | None = None
        self.count = 0
        self.ended_at = -1.0
        self.endings: set[asyncio.Task[None]] = set()

    def open(self, first_frame: bytes | None) -> _Live:
        decoder = self.codec.decoder(first_frame)
        self.count += 1
        recognition = Recognition(self.count)
        settings = self.codec.settings
        labels = {
            "speech_id": self.speech_id,
            "recognition": str(self.count),
            "codec": self.codec.codec or "",
            "sample_rate": str(decoder.sample_rate),
            "grammar": settings.grammar or "default",
        }
        for key, value in settings.extra.items():
            labels.setdefault(key, value)

        async def reply(leg: str, event: EngineEvent) -> None:
            if recognition.hear(event) and not recognition.done:
                await self.finish(recognition, final=True)

        call = self.hub.open_call(
            FRONT_END,
            call_id=f"aeap-{self.speech_id}-{self.count}",
            labels=clean_labels(labels),
            reply=reply,
        )
        self.live = _Live(recognition, call, decoder)
        return self.live

    async def audio(self, data: bytes) -> None:
        if self.live is None:
            if asyncio.get_running_loop().time() - self.ended_at < TAIL_S:
                return  # the last frames in flight of the recognition that just ended
            self.open(data)
        assert self.live is not None
        live, recognition = self.live, self.live.recognition
        live.call.leg("caller").push(live.decoder.feed(data))
        width = live.decoder.encoding.bytes_per_sample
        recognition.audio_s += len(data) / width / live.decoder.sample_rate
        settings = self.codec.settings
        if recognition.done:
            return
        heard_ms = recognition.audio_s * 1000
        silent = not recognition.heard and 0 < settings.no_input_timeout_ms <= heard_ms
        if silent or 0 < settings.recognition_timeout_ms <= heard_ms:
            await self.finish(recognition, final=False)

    async def finish(self, recognition: Recognition, final: bool) -> None:
        """Push this recognition's results (ending `SpeechBackground`) and end its call."""
        recognition.done = True
        if not self.ws.closed:
            await self.ws.send_str(
                self.codec.encode_results(self.codec.results_of(recognition, final))
            )
        self.end(recognition, "result")

    def end(self, recognition: Recognition, reason: str) -> None:
        """End the recognition's call in the background: its flush must not hold the socket."""
        live = self.live
        if live is None or live.recognition is not recognition:
            return
        recognition.done = True
        self.live = None
        loop = asyncio.get_running_loop()
        self.ended_at = loop.time()
        live.call.leg("caller").push(live.decoder.flush())
        task = loop.create_task(live.call.end(reason))
        self.endings.add(task)
        task.add_done_callback(self.endings.discard)

    async def message(self, message: AeapMessage) -> None:
        codec = self.codec
        if isinstance(message, Setup):
            if self.hub.draining:
                raise Draining("the service is draining")
            if self.hub.engine.free_slots <= 0:
                raise EngineFull("no free engine slot")
            await self.ws.send_str(codec.accept_setup(message))
        elif isinstance(message, Get):
            recognition = self.live.recognition if self.live is not None else None
            await self.ws.send_str(codec.answer_get(message, recognition))
            if recognition is not None and message.names[0] == "results":
                self.end(recognition, "results asked")
        elif isinstance(message, Set):
            params = dict(message.params)
            dtmf = params.pop("dtmf", None)
            try:
                codec.settings.update(params)
            except AeapError as exc:  # a bad SPEECH_ENGINE() value: refused, the rest goes on
                await self.ws.send_str(codec.encode_error("set", message.id, str(exc)))
                return
            await self.ws.send_str(codec.encode_response("set", message.id))
            if dtmf is not None:  # SpeechBackground ended on keys: Asterisk keeps them itself
                live = self.live
                if live is None:  # keys before any audio: still a recognition of its own
                    live = self.open(None)
                for digit in str(dtmf):
                    live.call.leg("caller").dtmf(digit)
                self.end(live.recognition, "dtmf")
        elif isinstance(message, Unknown):
            await self.ws.send_str(codec.encode_error(message.name, message.id, UNSUPPORTED))
        elif message.error_msg:
            log.warning("asterisk refused our %s: %s", message.name, message.error_msg)

    async def close(self, reason: str) -> None:
        if self.live is not None:
            self.end(self.live.recognition, reason)
        if self.endings:
            await asyncio.shield(asyncio.gather(*self.endings, return_exceptions=True))


async def handle_aeap(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    # No idle timeout: between two SpeechBackground() calls the socket is silent for as long
    # as the dialplan plays prompts. Pings (Asterisk answers them) find a dead peer.
    ws = web.WebSocketResponse(
        protocols=(SUBPROTOCOL,),
        heartbeat=30.0,
        max_msg_size=limits_of(request).websocket_max_message_bytes,
    )
    await ws.prepare(request)
    speech = _SpeechObject(ws, hub, AeapCodec(hub.engine.sample_rate, request.query))
    reason = "closed by Asterisk"
    pending: Setup | Get | Set | Unknown | None = None
    try:
        async for msg in ws:
            pending = None
            if msg.type == WSMsgType.TEXT:
                message = speech.codec.receive_text(msg.data)
                if not isinstance(message, Response):
                    pending = message
                await speech.message(message)
            elif msg.type == WSMsgType.BINARY:
                await speech.audio(msg.data)
            elif msg.type == WSMsgType.ERROR:
                reason = f"connection error: {ws.exception()}"
                break
    except BridgeError as exc:
        # One place for every refusal: the request it came from gets `error_msg` (a refused
        # setup makes SpeechCreate set ERROR=1), then our close with the reason.
        reason = f"rejected: {exc}"
        log.warning("aeap refused: %s", exc, extra={"front_end": FRONT_END})
        if not ws.closed:
            if pending is not None:
                name = pending.name if isinstance(pending, Unknown) else type(pending).__name__
                with contextlib.suppress(ConnectionError):
                    await ws.send_str(AeapCodec.encode_error(name.lower(), pending.id, str(exc)))
            await ws.close(code=rejection_for(exc).ws_close, message=str(exc).encode()[:120])
    finally:
        await speech.close(reason)
        if not ws.closed:
            await ws.close()
    return ws


def add_routes(app: web.Application, hub: CallHub) -> None:
    app[HUB] = hub
    app.router.add_get(PATH, handle_aeap)
