"""Deepgram's pre-recorded API (`POST /v1/listen`): its query parameters and response body.

The body is a whole file (any container libsndfile reads, or headerless audio with
`encoding=`/`sample_rate=`), or JSON `{"url": ...}`; the answer is one JSON document:
`metadata` (request_id, sha256, created, duration, channels, models, model_info) and
`results.channels[].alternatives[]` (transcript, confidence, words), with
`results.utterances` when `utterances=true`. The live route's parser
(`telephony.deepgram.parse_params`) reads every parameter the two share (redact=, keyterm=,
keywords=, multichannel=, punctuate=, tag=, extra=, ...), so both refuse the same bad values.
No I/O here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from api.transcribe import Transcript
from engine.base import Segment, Word
from telephony.audio import Encoding
from telephony.deepgram import (
    ENCODINGS,
    BadParameters,
    DeepgramParams,
    ModelInfo,
    parse_params,
    plain_word,
)

WORD_CONFIDENCE: Final = 1.0  # a word whose engine gave no confidence (the live route's value)
UTT_SPLIT_S: Final = 0.8  # Deepgram's default pause that ends an utterance
# Container formats Deepgram names as encodings: read from the file's own header here.
CONTAINER_ENCODINGS: Final = ("flac", "opus", "ogg-opus", "mp3", "wav")
# Asked for, and not something to ignore quietly: the client would wait for a POST that never
# comes, or for fields it then finds missing.
REFUSED: Final = {
    "callback": "callback is not supported: the result is the response to this request",
    "summarize": "summarize is not supported",
    "detect_language": "detect_language is not supported",
}


@dataclass(frozen=True)
class PrerecordedParams:
    live: DeepgramParams  # what the live route's parser made of the shared parameters
    raw: bool  # encoding= linear16, mulaw or alaw: the body is headerless samples
    utterances: bool = False
    utt_split_s: float = UTT_SPLIT_S

    @property
    def encoding(self) -> Encoding:
        return self.live.encoding


def _flag(name: str, text: str | None) -> bool:
    if text is None:
        return False
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise BadParameters(f"{name} must be true or false, not {text!r}")
    return value in ("true", "1")


def parse_prerecorded(query: Iterable[tuple[str, str]]) -> PrerecordedParams:
    """The query's pairs to parameters, or `BadParameters` (Deepgram's 400)."""
    pairs = list(query)
    values = {key: value for key, value in pairs}  # the last of a repeated key, as the live route
    for name, why in REFUSED.items():
        if values.get(name, "false").strip().lower() not in ("false", "0", ""):
            raise BadParameters(why)  # `summarize=v2` too, not only `true`
    encoding = values.get("encoding", "").lower()
    raw = encoding in ENCODINGS
    if not raw and encoding and encoding not in CONTAINER_ENCODINGS:
        # Let the live parser word the refusal (unknown or unsupported encoding).
        parse_params([("encoding", encoding), ("sample_rate", "16000")])
    if raw:
        live = parse_params(pairs)
    else:
        # A container says its own rate and channels: the live parser gets neutral ones, and
        # checks everything else.
        shared = [(k, v) for k, v in pairs if k not in ("encoding", "sample_rate", "channels")]
        live = parse_params([*shared, ("encoding", "linear16"), ("sample_rate", "16000")])
    split_text = values.get("utt_split")
    utt_split = UTT_SPLIT_S
    if split_text is not None:
        try:
            utt_split = float(split_text)
        except ValueError:
            raise BadParameters(f"utt_split must be a number, not {split_text!r}") from None
        if not 0.0 < utt_split <= 60.0:
            raise BadParameters(f"utt_split must be between 0 and 60 seconds, not {utt_split}")
    return PrerecordedParams(
        live, raw, utterances=_flag("utterances", values.get("utterances")), utt_split_s=utt_split
    )


# --- the response ------------------------------------------------------------------------------


def _time(seconds: float) -> float:
    return round(max(0.0, seconds), 3)


def _confidence(words: Sequence[Word]) -> float:
    if not words:
        return 0.0
    return round(sum(_word_confidence(w) for w in words) / len(words), 4)


def _word_confidence(word: Word) -> float:
    return WORD_CONFIDENCE if word.confidence is None else round(word.confidence, 4)


def _words(words: Sequence[Word]) -> list[dict[str, Any]]:
    """Deepgram's word objects; a word that is only punctuation has no `word` and is left out,
    as the live route does."""
    out = []
    for word in words:
        plain = plain_word(word.text)
        if plain:
            out.append(
                {
                    "word": plain,
                    "start": _time(word.start_s),
                    "end": _time(word.end_s),
                    "confidence": _word_confidence(word),
                    "punctuated_word": word.text,
                }
            )
    return out


def _kept(words: Sequence[Word]) -> list[Word]:
    return [w for w in words if plain_word(w.text)]


def _text(words: Sequence[Word], formatted: bool) -> str:
    return " ".join(w.text if formatted else plain_word(w.text) for w in words)


def utterance_words(
    words: Sequence[Word], segments: Sequence[Segment], split_s: float
) -> list[list[Word]]:
    """Words grouped into utterances: the engine's own (a `Segment` ends one), each also cut
    where a pause between two words is longer than `split_s` (Deepgram's `utt_split`)."""
    ends = sorted(s.end_s for s in segments)
    groups: list[list[Word]] = []
    segment = 0
    for word in words:
        new_segment = False
        while segment < len(ends) and word.start_s >= ends[segment]:
            segment += 1
            new_segment = True
        if not groups or new_segment or word.start_s - groups[-1][-1].end_s > split_s:
            groups.append([])
        groups[-1].append(word)
    return groups


def response(
    params: PrerecordedParams,
    transcripts: Sequence[Transcript],
    *,
    request_id: str,
    sha256: str,
    created: datetime,
    duration_s: float,
    channels: int,
    model: ModelInfo,
) -> dict[str, Any]:
    """The whole answer; `transcripts` one per leg, in channel order."""
    formatted = params.live.formatted
    results: dict[str, Any] = {
        "channels": [
            {
                "alternatives": [
                    {
                        "transcript": _text(_kept(t.words), formatted),
                        "confidence": _confidence(_kept(t.words)),
                        "words": _words(t.words),
                    }
                ]
            }
            for t in transcripts
        ]
    }
    if params.utterances:
        utterances = []
        for index, t in enumerate(transcripts):
            for group in utterance_words(_kept(t.words), t.segments, params.utt_split_s):
                utterances.append(
                    {
                        "start": _time(group[0].start_s),
                        "end": _time(group[-1].end_s),
                        "confidence": _confidence(group),
                        "channel": index,
                        "transcript": _text(group, formatted),
                        "words": _words(group),
                        "id": str(uuid.uuid4()),
                    }
                )
        results["utterances"] = sorted(utterances, key=lambda u: (u["start"], u["channel"]))
    info = {"name": model.name, "version": model.version, "arch": model.arch}
    metadata: dict[str, Any] = {
        "transaction_key": "deprecated",
        "request_id": request_id,
        "sha256": sha256,
        "created": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "duration": _time(duration_s),
        "channels": channels,
        "models": [model.uuid],
        "model_info": {model.uuid: info},
    }
    if params.live.tags:
        metadata["tags"] = list(params.live.tags)
    return {"metadata": metadata, "results": results}
