"""OpenAI's `POST /v1/audio/transcriptions`: its form fields, response formats and errors.

A multipart form: `file` (required), `model` (required by OpenAI; any name is taken here, the
engine is the bridge's), `response_format` json | text | srt | vtt | verbose_json,
`timestamp_granularities[]` word and/or segment (verbose_json), `language`, `prompt`,
`temperature` (accepted). Errors are OpenAI's `{"error": {"message", "type", "param",
"code"}}`. No I/O here.

A `prompt` that is a list of terms ("Xarelto, Zyntrix, Brannock") becomes the stream's
keyterms (engine biasing, as Deepgram's `keyterm=`); a prompt in sentences (Whisper's style
hint, "Umm, let me think like, hmm...") is accepted and not used: biasing every word of a
sentence would pull the engine towards words nobody said.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from api.transcribe import Transcript, format_vtt, subrip

FORMATS: Final = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES: Final = ("word", "segment")
# Form fields taken; any other is refused as OpenAI refuses an unknown parameter.
FIELDS: Final = (
    "file",
    "model",
    "response_format",
    "timestamp_granularities[]",
    "timestamp_granularities",
    "language",
    "prompt",
    "temperature",
    "stream",
    "include[]",
    "chunking_strategy",
)
TRANSCRIPTIONS_PATH: Final = "/v1/audio/transcriptions"
LANGUAGE_NAMES: Final = {"en": "english", "fr": "french", "es": "spanish", "de": "german"}
TERM_WORDS_MAX: Final = 3  # a prompt item longer than this is prose, not a term
_SENTENCE_END = re.compile(r"[.!?;:]")


class OpenAIRequestError(ValueError):
    """A request OpenAI's API would answer with 400 invalid_request_error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class TranscriptionRequest:
    model: str = ""
    response_format: str = "json"
    words: bool = False  # timestamp_granularities[] has "word"
    language: str = ""
    prompt: str = ""

    @property
    def keyterms(self) -> tuple[str, ...]:
        return prompt_keyterms(self.prompt)


def error_body(
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def prompt_keyterms(prompt: str) -> tuple[str, ...]:
    """The prompt's terms when it is a list of them (comma or line separated, each at most
    `TERM_WORDS_MAX` words, no sentence punctuation); () for prose."""
    items = [item.strip() for item in re.split(r"[,\n]", prompt) if item.strip()]
    if not items or _SENTENCE_END.search(prompt):
        return ()
    if any(len(item.split()) > TERM_WORDS_MAX for item in items):
        return ()
    return tuple(dict.fromkeys(items))


def parse_fields(fields: Mapping[str, Sequence[str]]) -> TranscriptionRequest:
    """The form's text fields (every value of each, in order) to a request."""
    for name in fields:
        if name not in FIELDS:
            raise OpenAIRequestError(f"Unrecognized request argument supplied: {name}", name)

    def last(name: str) -> str:
        found = fields.get(name)
        return found[-1].strip() if found else ""

    response_format = last("response_format") or "json"
    if response_format not in FORMATS:
        raise OpenAIRequestError(
            f"Invalid value for 'response_format': {response_format!r}; "
            f"supported values are: {', '.join(FORMATS)}",
            "response_format",
            "invalid_value",
        )
    granularities = [
        *fields.get("timestamp_granularities[]", []),
        *fields.get("timestamp_granularities", []),
    ]
    for granularity in granularities:
        if granularity not in GRANULARITIES:
            raise OpenAIRequestError(
                f"Invalid value for 'timestamp_granularities[]': {granularity!r}; "
                "supported values are: word, segment",
                "timestamp_granularities[]",
                "invalid_value",
            )
    if granularities and response_format != "verbose_json":
        raise OpenAIRequestError(
            "timestamp_granularities[] is only supported with response_format verbose_json",
            "timestamp_granularities[]",
            "invalid_value",
        )
    if last("stream").lower() == "true":
        raise OpenAIRequestError(
            "stream is not supported here: the transcript is the response", "stream"
        )
    temperature = last("temperature")
    if temperature:
        try:
            value = float(temperature)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:
            raise OpenAIRequestError(
                f"Invalid value for 'temperature': {temperature!r}; a number from 0 to 1",
                "temperature",
                "invalid_value",
            )
    return TranscriptionRequest(
        model=last("model"),
        response_format=response_format,
        words="word" in granularities,
        language=last("language"),
        prompt=last("prompt"),
    )


# --- responses ---------------------------------------------------------------------------------


def _round(seconds: float) -> float:
    return round(max(0.0, seconds), 3)


def _compression_ratio(text: str) -> float:
    data = text.encode()
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def verbose_json(request: TranscriptionRequest, t: Transcript) -> dict[str, Any]:
    segments = []
    for n, segment in enumerate(t.segments):
        confidence = segment.confidence
        segments.append(
            {
                "id": n,
                "seek": int(segment.start_s * 100),  # Whisper's: 10 ms frames into the file
                "start": _round(segment.start_s),
                "end": _round(segment.end_s),
                "text": segment.text,
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": round(math.log(confidence), 4) if confidence else 0.0,
                "compression_ratio": _compression_ratio(segment.text),
                "no_speech_prob": 0.0,
            }
        )
    language = request.language.lower() or "en"
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": LANGUAGE_NAMES.get(language, language),
        "duration": _round(t.duration_s),
        "text": t.text,
        "segments": segments,
        "usage": {"type": "duration", "seconds": math.ceil(t.duration_s)},
    }
    if request.words:
        body["words"] = [
            {"word": w.text, "start": _round(w.start_s), "end": _round(w.end_s)} for w in t.words
        ]
    return body


def render(request: TranscriptionRequest, t: Transcript) -> tuple[str | dict[str, Any], str]:
    """The response body (a JSON document, or text) and its content type."""
    fmt = request.response_format
    if fmt == "json":
        usage = {"type": "duration", "seconds": math.ceil(t.duration_s)}
        return {"text": t.text, "usage": usage}, "application/json"
    if fmt == "verbose_json":
        return verbose_json(request, t), "application/json"
    if fmt == "srt":
        return subrip((s.start_s, s.end_s, s.text) for s in t.segments), "text/plain"
    if fmt == "vtt":
        return format_vtt(t), "text/plain"
    return t.text + "\n", "text/plain"
