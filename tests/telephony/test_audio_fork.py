"""mod_audio_fork: stream parameters from metadata/query, L16 frames, transcription messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.base import Word
from telephony.audio_fork import AudioForkCodec, AudioForkError, StreamFormat, stream_format

META = '{"event":"start","uuid":"u-1","from":"1001","mix":"stereo","rate":16000}'


def test_format_from_metadata_wins_over_query() -> None:
    fmt = stream_format(META, {"mix": "mono", "rate": "8000"})
    assert (fmt.mix, fmt.rate, fmt.legs) == ("stereo", 16000, ("caller", "callee"))
    assert fmt.metadata["uuid"] == "u-1"


@pytest.mark.parametrize(
    ("meta", "query", "expected"),
    [
        (None, {}, ("mono", 8000)),
        (None, {"mix": "mixed", "rate": "16k"}, ("mixed", 16000)),
        ("not json at all", {"rate": "16000"}, ("mono", 16000)),
        ('{"sampleRate": 24000}', {}, ("mono", 24000)),
    ],
)
def test_format_fallbacks(
    meta: str | None, query: dict[str, str], expected: tuple[str, int]
) -> None:
    fmt = stream_format(meta, query)
    assert (fmt.mix, fmt.rate) == expected


@pytest.mark.parametrize(
    ("meta", "message"),
    [('{"mix": "quad"}', "mix"), ('{"rate": 11025}', "rate"), ('{"rate": "x"}', "rate")],
)
def test_bad_format(meta: str, message: str) -> None:
    with pytest.raises(AudioForkError, match=message):
        stream_format(meta, {})


def test_stereo_frames_split_into_caller_and_callee() -> None:
    codec = AudioForkCodec(StreamFormat("stereo", 8000))
    # L,R interleaved little-endian: (+1000, -2), (3, 4)
    data = bytes.fromhex("e8 03 fe ff 03 00 04 00")
    left, right = codec.receive_audio(data[:5])  # a frame cut mid-sample is carried over
    assert left.tolist() == [1000] and right.tolist() == [-2]
    left, right = codec.receive_audio(data[5:])
    assert left.tolist() == [3] and right.tolist() == [4]


def test_mono_frames() -> None:
    codec = AudioForkCodec(StreamFormat("mono", 16000))
    (pcm,) = codec.receive_audio(np.array([5, -5, 7], dtype="<i2").tobytes())
    assert pcm.tolist() == [5, -5, 7]


def test_transcription_message_fires_a_freeswitch_event() -> None:
    message = json.loads(
        AudioForkCodec.encode_transcription("u-1", "caller", Word("hello", 1.0, 1.5))
    )
    assert message["type"] == "transcription"
    assert message["data"] == {
        "call_id": "u-1",
        "leg": "caller",
        "type": "word",
        "text": "hello",
        "start": 1.0,
        "end": 1.5,
    }
