"""The file routes' protocol pieces without a socket: Deepgram pre-recorded parameters and
utterances, OpenAI form fields and prompts, and decoding bodies (api/deepgram_files.py,
api/openai_files.py, api/file_audio.py). The routes themselves: tests/e2e/test_files.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from api.deepgram_files import parse_prerecorded, utterance_words
from api.file_audio import decode_container, decode_raw, looks_like_container
from api.openai_files import OpenAIRequestError, parse_fields, prompt_keyterms
from api.transcribe import AudioFileError
from engine.base import Segment, Word
from telephony.audio import Encoding, pcm16_encode
from telephony.deepgram import BadParameters


def test_prerecorded_parameters_container_and_raw() -> None:
    container = parse_prerecorded([("punctuate", "true"), ("redact", "pci,ssn")])
    assert not container.raw and container.live.formatted
    assert container.live.options.redact == frozenset({"pci", "ssn"})
    assert not parse_prerecorded([("encoding", "opus")]).raw  # Ogg Opus: read from its header
    raw = parse_prerecorded(
        [("encoding", "mulaw"), ("sample_rate", "8000"), ("channels", "2"), ("multichannel", "1")]
    )
    assert (
        raw.raw and raw.encoding is Encoding.MULAW and raw.live.legs == ("channel_0", "channel_1")
    )
    words = parse_prerecorded(
        [("utterances", "true"), ("utt_split", "1.5"), ("keyterm", "Xarelto")]
    )
    assert words.utterances and words.utt_split_s == 1.5
    assert words.live.options.keyterms == ("Xarelto",)


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ([("encoding", "linear16")], "sample_rate is required"),
        ([("encoding", "g729")], "not supported"),
        ([("encoding", "wma")], "encoding must be one of"),
        ([("callback", "https://example.com/hook")], "callback is not supported"),
        ([("summarize", "v2")], "summarize is not supported"),
        ([("utt_split", "soon")], "utt_split must be a number"),
        ([("utt_split", "0")], "between 0 and 60"),
        ([("utterances", "maybe")], "utterances must be true or false"),
        ([("redact", "everything")], "unknown redaction kind"),
        ([("keyterm", "x" * 61)], "60"),
    ],
)
def test_prerecorded_parameters_refused(query: list[tuple[str, str]], says: str) -> None:
    with pytest.raises(BadParameters, match=says):
        parse_prerecorded(query)


def test_utterances_follow_segments_and_pauses() -> None:
    words = [Word("a", 0.0, 0.2), Word("b", 0.3, 0.5), Word("c", 2.0, 2.2), Word("d", 2.3, 2.5)]
    words += [Word("e", 2.6, 2.8)]
    segments = [Segment("a b c d", 0.0, 2.5), Segment("e", 2.6, 2.8)]
    grouped = utterance_words(words, segments, split_s=0.8)
    # One segment, cut at its 1.5 s pause; the next segment its own utterance.
    assert [[w.text for w in g] for g in grouped] == [["a", "b"], ["c", "d"], ["e"]]
    assert len(utterance_words(words, segments, split_s=5.0)) == 2


def test_openai_fields() -> None:
    ask = parse_fields(
        {
            "model": ["whisper-1"],
            "response_format": ["verbose_json"],
            "timestamp_granularities[]": ["segment", "word"],
            "language": ["en"],
        }
    )
    assert ask.words and ask.response_format == "verbose_json" and ask.model == "whisper-1"
    assert parse_fields({}).response_format == "json"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": ["docx"]}, "response_format"),
        ({"timestamp_granularities[]": ["word"]}, "timestamp_granularities[]"),  # json: none
        ({"response_format": ["verbose_json"], "timestamp_granularities[]": ["char"]}, None),
        ({"stream": ["true"]}, "stream"),
        ({"temperature": ["hot"]}, "temperature"),
        ({"speed": ["2"]}, "speed"),
    ],
)
def test_openai_fields_refused(fields: dict[str, list[str]], param: str | None) -> None:
    with pytest.raises(OpenAIRequestError) as refused:
        parse_fields(fields)
    if param is not None:
        assert refused.value.param == param


def test_a_prompt_that_lists_terms_becomes_keyterms_and_prose_does_not() -> None:
    assert prompt_keyterms("Xarelto, Zyntrix,\nBrannock Street") == (
        "Xarelto",
        "Zyntrix",
        "Brannock Street",
    )
    assert prompt_keyterms("Umm, let me think like, hmm... Okay, here's what I'm thinking.") == ()
    assert prompt_keyterms("The customer calls about an order they placed last week") == ()
    assert prompt_keyterms("") == ()


def test_raw_bodies_split_or_mixed() -> None:
    left = np.full(1600, 1000, dtype=np.int16)
    right = np.full(1600, -3000, dtype=np.int16)
    body = pcm16_encode(np.stack([left, right], axis=1).reshape(-1)) + b"\x01"  # a stray byte
    split = decode_raw(body, Encoding.PCM16, 8000, 2, 16000, split=True)
    assert list(split.legs) == ["channel_0", "channel_1"] and split.duration_s == 0.2
    assert abs(int(np.median(split.legs["channel_1"])) + 3000) <= 1
    mixed = decode_raw(body, Encoding.PCM16, 8000, 2, 16000, split=False)
    assert list(mixed.legs) == ["caller"] and abs(int(np.median(mixed.legs["caller"])) + 1000) <= 1
    with pytest.raises(AudioFileError):
        decode_raw(b"\x00", Encoding.PCM16, 8000, 1, 16000, split=False)


def test_containers_read_and_junk_refused() -> None:
    out = io.BytesIO()
    soundfile.write(out, np.zeros((8000, 3), dtype=np.int16), 8000, format="FLAC")
    data = out.getvalue()
    assert looks_like_container(data)
    audio = decode_container(data, 16000, split=True)
    assert audio.channels == 3 and len(audio.legs) == 3 and audio.duration_s == 1.0
    assert len(audio.legs["channel_2"]) == 16000
    with pytest.raises(AudioFileError, match="not audio"):
        decode_container(b"%PDF-1.7 not audio" * 50, 16000, split=False)
    with pytest.raises(AudioFileError, match="empty"):
        decode_container(b"", 16000, split=False)
