"""Deepgram's live protocol without sockets: parameters, client messages, server messages.

Server messages are checked against the `deepgram-sdk` package's own models (strict pydantic
validation), the way its socket client reads them.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from deepgram.listen.v1.types import (
    ListenV1Error,
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)

from engine.base import Closed, EndOfTurn, Partial, Segment, Word
from telephony.audio import Encoding, resample_whole, ulaw_decode, ulaw_encode
from telephony.deepgram import (
    BadMessage,
    BadParameters,
    CloseStream,
    Configure,
    DeepgramCodec,
    DeepgramParams,
    Finalize,
    KeepAlive,
    ModelInfo,
    parse_client_message,
    parse_params,
    plain_word,
)

# What deepgram-sdk 7.17.0 sends for connect(model="nova-3", encoding="mulaw", sample_rate=8000,
# channels=2, multichannel=True, interim_results=True, punctuate=True, smart_format=True,
# endpointing=300, utterance_end_ms=1000, vad_events=True, keyterm=[...], language="en-US").
SDK_QUERY = (
    "channels=2&encoding=mulaw&endpointing=300&interim_results=true&keyterm=stt-bridge"
    "&keyterm=FreeSWITCH&language=en-US&model=nova-3&multichannel=true&punctuate=true"
    "&sample_rate=8000&smart_format=true&utterance_end_ms=1000&vad_events=true"
)
# What LiveKit's plugin adds to every stream.
LIVEKIT_EXTRAS = "&no_delay=true&filler_words=true&profanity_filter=false&numerals=false"
MODEL = ModelInfo("stt-bridge-test", "0.1.0")
REQUEST_ID = "5d8f6c1e-2b7a-4c1d-9e0f-0123456789ab"


def query(text: str) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(text, keep_blank_values=True)


def codec(text: str = "encoding=mulaw&sample_rate=8000", rate: int = 16000) -> DeepgramCodec:
    created = datetime(2026, 1, 1, 12, tzinfo=UTC)
    return DeepgramCodec(parse_params(query(text)), rate, REQUEST_ID, MODEL, created)


def loads(texts: list[str]) -> list[dict[str, Any]]:
    return [json.loads(t) for t in texts]


# --- parameters -------------------------------------------------------------------------------


def test_what_the_sdk_sends_is_accepted() -> None:
    params = parse_params(query(SDK_QUERY + LIVEKIT_EXTRAS))
    assert params.encoding is Encoding.MULAW and params.sample_rate == 8000
    assert params.channels == 2 and params.multichannel
    assert params.interim_results and params.vad_events and params.punctuate
    assert params.utterance_end_ms == 1000 and params.endpointing
    assert params.keyterms == ("stt-bridge", "FreeSWITCH")
    assert params.legs == ("channel_0", "channel_1")
    assert params.labels() == {
        "encoding": "mulaw",
        "sample_rate": "8000",
        "channels": "2",
        "model": "nova-3",
        "language": "en-US",
    }


def test_defaults_and_mono() -> None:
    params = parse_params(query("encoding=linear16&sample_rate=16000"))
    assert params == DeepgramParams(Encoding.PCM16, 16000)
    assert params.legs == ("caller",) and not params.interim_results


def test_channels_without_multichannel_are_one_leg() -> None:
    assert parse_params(query("encoding=alaw&sample_rate=8000&channels=2")).legs == ("caller",)


def test_endpointing_false_and_tags_extra_as_labels() -> None:
    params = parse_params(
        query("encoding=mulaw&sample_rate=8000&endpointing=false&tag=a&tag=b&extra=agent:bob")
    )
    assert not params.endpointing
    assert params.labels()["tag"] == "a,b" and params.labels()["agent"] == "bob"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("sample_rate=8000", "encoding is required"),
        ("encoding=opus&sample_rate=48000", "opus is not supported"),
        ("encoding=mp3&sample_rate=8000", "encoding must be one of"),
        ("encoding=mulaw", "sample_rate is required"),
        ("encoding=mulaw&sample_rate=11025", "sample_rate must be one of"),
        ("encoding=mulaw&sample_rate=fast", "sample_rate must be an integer"),
        ("encoding=mulaw&sample_rate=8000&channels=0", "channels must be between"),
        ("encoding=mulaw&sample_rate=8000&channels=99", "channels must be between"),
        ("encoding=mulaw&sample_rate=8000&interim_results=maybe", "interim_results must be"),
        ("encoding=mulaw&sample_rate=8000&endpointing=soon", "endpointing must be"),
        ("encoding=mulaw&sample_rate=8000&utterance_end_ms=-1", "utterance_end_ms must be"),
        ("encoding=mulaw&sample_rate=8000&diarize=yes", "diarize must be"),
        ("encoding=mulaw&sample_rate=8000&extra=nocolon", "extra must be key:value"),
    ],
)
def test_bad_parameters(text: str, names: str) -> None:
    with pytest.raises(BadParameters, match=names):
        parse_params(query(text))


# --- client messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"type": "KeepAlive"}', KeepAlive()),  # as the SDK writes it: a space after the colon
        ('{"type":"Finalize"}', Finalize()),
        ('{"type":"Finalize","channel":1}', Finalize(1)),
        ('{"type": "CloseStream"}', CloseStream()),
        ('{"type":"Configure","keyterms":["x"]}', Configure()),
    ],
)
def test_client_messages(text: str, message: object) -> None:
    assert parse_client_message(text) == message


@pytest.mark.parametrize(
    "text",
    ["not json", "[1, 2]", '{"type": "Kepalive"}', "{}", '{"type":"Finalize","channel":"1"}'],
)
def test_bad_client_messages(text: str) -> None:
    with pytest.raises(BadMessage):
        parse_client_message(text)


# --- audio ------------------------------------------------------------------------------------


def test_mono_mulaw_is_decoded_and_resampled_once() -> None:
    tone = (8000 * np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000)).astype(np.int16)
    wire = ulaw_encode(tone)
    c = codec()
    out = []
    for i in range(0, len(wire), 333):  # odd-sized frames
        out += c.receive_audio(wire[i : i + 333])
    out += c.end_of_audio()
    expected = resample_whole(ulaw_decode(wire), 8000, 16000)
    np.testing.assert_array_equal(np.concatenate(out), expected)
    assert c.audio_s == 1.0


def test_stereo_linear16_split_into_legs_with_a_sample_cut_between_frames() -> None:
    left = np.arange(0, 1600, dtype=np.int16)
    right = -np.arange(0, 1600, dtype=np.int16)
    wire = np.stack([left, right], axis=1).reshape(-1).astype("<i2").tobytes()
    c = codec("encoding=linear16&sample_rate=16000&channels=2&multichannel=true")
    legs: list[list[np.ndarray[Any, Any]]] = [[], []]
    for i in range(0, len(wire), 1001):
        for n, pcm in enumerate(c.receive_audio(wire[i : i + 1001])):
            legs[n].append(pcm)
    for n, pcm in enumerate(c.end_of_audio()):
        legs[n].append(pcm)
    np.testing.assert_array_equal(np.concatenate(legs[0]), left)
    np.testing.assert_array_equal(np.concatenate(legs[1]), right)


# --- server messages --------------------------------------------------------------------------

HELLO = (Word("Hello,", 3.12, 3.5), Word("world.", 3.58, 4.2))


def test_words_give_interims_then_one_final_that_the_sdk_validates() -> None:
    c = codec(SDK_QUERY)
    out = c.on_event("channel_1", HELLO[0]) + c.on_event("channel_1", HELLO[1])
    out += c.on_event("channel_1", Segment("Hello, world.", 3.12, 4.2, HELLO))
    out += c.on_event("channel_1", EndOfTurn(4.5))
    started, first, second, final, end = loads(out)
    ListenV1SpeechStarted.model_validate(started)
    assert started == {"type": "SpeechStarted", "channel": [1, 2], "timestamp": 3.12}
    for interim in (first, second):
        ListenV1Results.model_validate(interim)
        assert interim["is_final"] is False and interim["channel_index"] == [1, 2]
    assert second["channel"]["alternatives"][0]["transcript"] == "Hello, world."
    ListenV1Results.model_validate(final)
    assert final["is_final"] is True and final["speech_final"] is True
    assert final["from_finalize"] is False
    assert (final["start"], final["duration"]) == (0.0, 4.2)
    alternative = final["channel"]["alternatives"][0]
    assert alternative["transcript"] == "Hello, world."
    assert alternative["words"] == [
        {
            "word": "hello",
            "start": 3.12,
            "end": 3.5,
            "confidence": 1.0,
            "punctuated_word": "Hello,",
        },
        {
            "word": "world",
            "start": 3.58,
            "end": 4.2,
            "confidence": 1.0,
            "punctuated_word": "world.",
        },
    ]
    assert final["metadata"]["request_id"] == REQUEST_ID
    ListenV1UtteranceEnd.model_validate(end)
    assert end == {"type": "UtteranceEnd", "channel": [1, 2], "last_word_end": 4.2}
    # The next utterance starts where this one ended.
    nxt = loads(c.on_event("channel_1", Segment("Again.", 5.0, 5.4, (Word("Again.", 5.0, 5.4),))))
    assert (nxt[-1]["start"], nxt[-1]["duration"]) == (4.2, 1.2)


def test_word_and_transcript_confidence_are_the_engines() -> None:
    sure, unsure = Word("Hello,", 3.12, 3.5, 0.98765), Word("Xarelto.", 3.58, 4.2, 0.41)
    c = codec()
    (final,) = loads(c.on_event("caller", Segment("Hello, Xarelto.", 3.12, 4.2, (sure, unsure))))
    ListenV1Results.model_validate(final)
    alternative = final["channel"]["alternatives"][0]
    assert [w["confidence"] for w in alternative["words"]] == [0.9877, 0.41]
    assert alternative["confidence"] == pytest.approx((0.9877 + 0.41) / 2, abs=1e-4)


def test_without_punctuate_the_transcript_is_plain_and_nothing_optional_is_sent() -> None:
    c = codec()
    out = loads(c.on_event("caller", HELLO[0]) + c.on_event("caller", HELLO[1]))
    assert out == []  # no interim_results, no vad_events
    (final,) = loads(c.on_event("caller", Segment("Hello, world.", 3.12, 4.2, HELLO)))
    assert final["channel"]["alternatives"][0]["transcript"] == "hello world"
    assert final["channel_index"] == [0, 1]
    assert c.on_event("caller", EndOfTurn(4.5)) == []  # no utterance_end_ms


def test_partials_are_the_interims_once_an_engine_gives_them() -> None:
    c = codec("encoding=mulaw&sample_rate=8000&interim_results=true&punctuate=true")
    (interim,) = loads(c.on_event("caller", Partial("Hi, I'd like", 0.5, 1.4)))
    alternative = interim["channel"]["alternatives"][0]
    assert alternative["transcript"] == "Hi, I'd like" and not interim["is_final"]
    assert [w["word"] for w in alternative["words"]] == ["hi", "i'd", "like"]
    assert alternative["words"][0]["start"] == 0.5 and alternative["words"][-1]["end"] == 1.4
    # The words that come with the Segment do not repeat the interim.
    assert c.on_event("caller", Word("Hi,", 0.5, 0.7)) == []
    (final,) = loads(c.on_event("caller", Segment("Hi,", 0.5, 0.7, (Word("Hi,", 0.5, 0.7),))))
    assert final["is_final"]


def test_finalize_marks_the_final_it_brings_out() -> None:
    c = codec("encoding=mulaw&sample_rate=8000&interim_results=true")
    c.on_event("caller", Partial("hello", 0.2, 0.6))
    c.begin_finalize("caller")
    (final,) = loads(c.on_event("caller", Segment("hello", 0.2, 0.6, (Word("hello", 0.2, 0.6),))))
    assert final["from_finalize"] is True and final["is_final"] is True
    assert c.finalized("caller", 0.8) == []  # already answered


def test_finalize_with_nothing_to_cut_answers_with_the_words_out_so_far() -> None:
    c = codec("encoding=mulaw&sample_rate=8000")
    c.on_event("caller", Word("billing", 1.0, 1.4))  # an engine with no endpoint to cut
    c.begin_finalize("caller")
    (answer,) = loads(c.finalized("caller", 1.6))
    ListenV1Results.model_validate(answer)
    assert answer["from_finalize"] is True and answer["is_final"] is True
    assert answer["speech_final"] is False
    assert (answer["start"], answer["duration"]) == (0.0, 1.6)
    assert answer["channel"]["alternatives"][0]["transcript"] == "billing"
    # The turn's Segment later holds the same word: not sent twice.
    assert c.on_event("caller", Segment("billing", 1.0, 1.4, (Word("billing", 1.0, 1.4),))) == []
    c.begin_finalize("caller")
    (empty,) = loads(c.finalized("caller", 2.0))
    assert empty["channel"]["alternatives"][0] == {"transcript": "", "confidence": 0.0, "words": []}
    assert (empty["start"], empty["duration"]) == (1.6, 0.4)


def test_words_left_at_close_become_a_final() -> None:
    c = codec()
    c.on_event("caller", Word("goodbye", 0.1, 0.5))
    (final,) = loads(c.on_event("caller", Closed("flushed")))
    assert final["is_final"] and final["channel"]["alternatives"][0]["transcript"] == "goodbye"


def test_metadata_error_and_configure() -> None:
    c = codec("encoding=mulaw&sample_rate=8000&channels=2")
    audio = bytes(range(256)) * 125
    c.receive_audio(audio)
    metadata = json.loads(c.metadata())
    ListenV1Metadata.model_validate(metadata)
    assert metadata["sha256"] == hashlib.sha256(audio).hexdigest()
    assert metadata["duration"] == 2.0 and metadata["channels"] == 2
    assert metadata["created"] == "2026-01-01T12:00:00.000Z"
    assert metadata["request_id"] == REQUEST_ID
    error = json.loads(DeepgramCodec.error("could not parse client message", "not json"))
    ListenV1Error.model_validate(error)
    assert json.loads(c.configure_failure())["type"] == "ConfigureFailure"


@pytest.mark.parametrize(
    ("written", "plain"),
    [("Hi,", "hi"), ("30319.", "30319"), ("I'd", "i'd"), ("(well)", "well"), ("—", "")],
)
def test_plain_word(written: str, plain: str) -> None:
    assert plain_word(written) == plain
