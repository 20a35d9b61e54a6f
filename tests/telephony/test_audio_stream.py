"""mod_audio_stream codec: formats from the URL and metadata, stereo frames, replies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.base import Segment, Word
from telephony.audio_stream import (
    AudioStreamCodec,
    AudioStreamError,
    StreamFormat,
    parse_metadata,
    parse_rate,
    stream_format,
)


@pytest.mark.parametrize(
    ("text", "rate"), [("8k", 8000), ("16k", 16000), ("16000", 16000), ("48000", 48000)]
)
def test_rates_as_uuid_audio_stream_takes_them(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["11025", "abc", "0", "-8000", "384000"])
def test_rates_it_cannot_send_are_refused(text: str) -> None:
    with pytest.raises(AudioStreamError):
        parse_rate(text)


def test_metadata_wins_over_the_url_and_defaults_are_8k_mono() -> None:
    assert stream_format({}, {}) == StreamFormat("mono", 8000)
    query = {"mix": "stereo", "rate": "16k"}
    assert stream_format(query, {}) == StreamFormat("stereo", 16000)
    assert stream_format(query, {"mix": "mixed", "sampleRate": 8000}) == StreamFormat("mixed", 8000)
    with pytest.raises(AudioStreamError, match="mix"):
        stream_format({"mix": "both"}, {})
    assert parse_metadata('{"uuid":"a"}') == {"uuid": "a"}
    assert parse_metadata("call 42") == {"metadata": "call 42"}
    assert parse_metadata("[1, 2]") == {"metadata": "[1, 2]"}


def test_stereo_frames_split_anywhere_give_caller_and_callee() -> None:
    left = np.arange(0, 400, dtype=np.int16)
    right = -np.arange(0, 400, dtype=np.int16)
    wire = np.stack([left, right], axis=1).astype("<i2").tobytes()
    codec = AudioStreamCodec(StreamFormat("stereo", 8000))
    parts = [codec.receive_audio(wire[i : i + 333]) for i in range(0, len(wire), 333)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), left)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), right)


def test_replies_are_compact_json_events_never_stream_audio() -> None:
    word = json.loads(AudioStreamCodec.encode_event("c1", "callee", Word("Hi,", 0.5, 0.75)))
    assert word == {
        "call_id": "c1", "leg": "callee", "channel": 1, "type": "word",
        "text": "Hi,", "start": 0.5, "end": 0.75,
    }  # fmt: skip
    segment = AudioStreamCodec.encode_event("c1", "caller", Segment("Hi.", 0.5, 0.75))
    assert json.loads(segment)["type"] == "segment" and json.loads(segment)["channel"] == 0
    assert json.loads(AudioStreamCodec.encode_error("no")) == {"type": "error", "reason": "no"}
