"""moshi-server's ASR messages, byte for byte: what Kyutai's clients send and what they read.

Vectors are written out by hand from the MessagePack spec: fixmap 0x8N, fixstr 0xaN, fixarray
0x9N, float32 0xca, float64 0xcb. Client frames are packed as stt_from_file_rust_server.py
packs them (`use_single_float=True`); server frames as rmp-serde writes moshi-server's `OutMsg`
(struct-as-map, "type" first, f64 times).
"""

from __future__ import annotations

import re

import msgpack
import numpy as np
import pytest
import sphn

from engine import moshi_wire as wire
from engine.base import Closed, EndOfTurn, ModelStep, Segment, Word
from engine.moshi_wire import Init, Marker
from telephony.audio import float_to_pcm16, pcm16_to_float
from telephony.errors import ProtocolError, rejection_for
from telephony.moshi_asr import (
    Audio,
    AudioFileError,
    MoshiAsrCodec,
    MoshiProtocolError,
    decode_audio_file,
    word_objects,
)

# --- client -> server --------------------------------------------------------------------------

AUDIO_HALF_AND_MINUS_ONE = (
    b"\x82\xa4type\xa5Audio\xa3pcm\x92\xca\x3f\x00\x00\x00\xca\xbf\x80\x00\x00"
)
MARKER_7 = b"\x82\xa4type\xa6Marker\xa2id\x07"
MARKER_NEGATIVE_INT64 = b"\x82\xa4type\xa6Marker\xa2id\xd3\x80\x00\x00\x00\x00\x00\x00\x00"
MARKER_7_AS_ARRAY = b"\x92\xa6Marker\x07"  # serde's sequence form of an internally tagged enum
INIT = b"\x81\xa4type\xa4Init"

# --- server -> client --------------------------------------------------------------------------

READY = b"\x81\xa4type\xa5Ready"
WORD_HELLO_AT_HALF = (
    b"\x83\xa4type\xa4Word\xa4text\xa5hello\xaastart_time\xcb\x3f\xe0\x00\x00\x00\x00\x00\x00"
)
END_WORD_AT_1_25 = b"\x82\xa4type\xa7EndWord\xa9stop_time\xcb\x3f\xf4\x00\x00\x00\x00\x00\x00"
MARKER_0 = b"\x82\xa4type\xa6Marker\xa2id\x00"
# Step{step_idx: 7, prs: [0.5, 1.0], buffered_pcm: 1920}, keys in moshi-server's order.
STEP_7 = (
    b"\x84\xa4type\xa4Step\xa8step_idx\x07\xa3prs\x92"
    b"\xcb\x3f\xe0\x00\x00\x00\x00\x00\x00\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00"
    b"\xacbuffered_pcm\xcd\x07\x80"
)
ERROR_NO_FREE_CHANNELS = b"\x82\xa4type\xa5Error\xa7message\xb0no free channels"


def test_audio_frame_as_kyutai_clients_pack_it() -> None:
    client = msgpack.packb({"type": "Audio", "pcm": [0.5, -1.0]}, use_single_float=True)
    assert client == AUDIO_HALF_AND_MINUS_ONE
    (audio,) = MoshiAsrCodec().receive(AUDIO_HALF_AND_MINUS_ONE)
    assert isinstance(audio, Audio)
    assert audio.pcm.dtype == np.int16 and audio.pcm.tolist() == [16384, -32768]


def test_audio_accepts_double_floats_integers_and_clips() -> None:
    frame = msgpack.packb({"type": "Audio", "pcm": [0.25, 0, 1, 3.0, -7.5, float("nan")]})
    (audio,) = MoshiAsrCodec().receive(frame)
    assert isinstance(audio, Audio)
    assert audio.pcm.tolist() == [8192, 0, 32767, 32767, -32768, 0]


def test_one_second_of_silence_in_one_message() -> None:
    frame = msgpack.packb({"type": "Audio", "pcm": [0.0] * 24000}, use_single_float=True)
    (audio,) = MoshiAsrCodec().receive(frame)
    assert isinstance(audio, Audio) and len(audio.pcm) == 24000 and not audio.pcm.any()


def test_markers_and_init() -> None:
    codec = MoshiAsrCodec()
    assert codec.receive(MARKER_7) == [Marker(7)]
    assert codec.receive(MARKER_7_AS_ARRAY) == [Marker(7)]
    assert codec.receive(MARKER_NEGATIVE_INT64) == [Marker(-(2**63))]
    assert codec.receive(INIT) == [Init()]
    # serde ignores fields it does not know
    assert codec.receive(msgpack.packb({"type": "Marker", "id": 3, "extra": "x"})) == [Marker(3)]


def test_ogg_opus_pages_decode_to_24k_audio() -> None:
    t = np.arange(1920 * 25) / 24000
    tone = (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    writer = sphn.OpusStreamWriter(24000)
    pages = [writer.append_pcm(tone[i : i + 1920]) for i in range(0, len(tone), 1920)]
    codec = MoshiAsrCodec()
    out = []
    for n, page in enumerate(pages):
        # bin, as msgpack-python packs bytes; the array-of-integers form serde also reads
        data: object = page if n % 2 else list(page)
        for message in codec.receive(msgpack.packb({"type": "OggOpus", "data": data})):
            assert isinstance(message, Audio)
            out.append(message.pcm)
    decoded = np.concatenate(out)
    assert decoded.dtype == np.int16 and len(decoded) == len(tone)
    # Opus is lossy and delays by a few ms; the level comes through.
    rms_in = float(np.sqrt(np.mean(tone[4800:].astype(np.float64) ** 2)))
    rms_out = float(np.sqrt(np.mean((decoded[4800:] / 32768.0) ** 2)))
    assert abs(rms_out - rms_in) < 0.05 * rms_in


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (b"\xc1", "MessagePack"),  # 0xc1 is never used
        (b"\x82\xa4type", "MessagePack"),  # cut short
        (MARKER_7 + b"\x00", "MessagePack"),  # trailing bytes
        (b"\xa5Audio", "map"),  # a bare string
        (msgpack.packb({"kind": "Audio"}), "map"),
        (msgpack.packb({"type": 3}), "map"),
        (msgpack.packb({"type": "Text", "text": "hi"}), "unknown message type 'Text'"),
        (msgpack.packb({"type": "Audio"}), "'pcm'"),
        (msgpack.packb({"type": "Audio", "pcm": "0.1,0.2"}), "numbers"),
        (msgpack.packb({"type": "Audio", "pcm": ["a", "b"]}), "numbers"),
        (msgpack.packb({"type": "Audio", "pcm": [[0.1], [0.2]]}), "numbers"),
        (msgpack.packb({"type": "Marker", "id": 1.5}), "64-bit integer"),
        (msgpack.packb({"type": "Marker", "id": 2**64 - 1}), "64-bit integer"),
        (msgpack.packb({"type": "OggOpus", "data": "text"}), "bytes"),
        (msgpack.packb({"type": "OggOpus", "data": b"garbage!" * 8}), "Ogg/Opus"),
    ],
)
def test_bad_frames_raise_the_protocol_error(frame: bytes, says: str) -> None:
    with pytest.raises(MoshiProtocolError, match=re.escape(says)):
        MoshiAsrCodec().receive(frame)


def test_protocol_error_maps_to_close_1007() -> None:
    exc = MoshiProtocolError("x")
    assert isinstance(exc, ProtocolError) and rejection_for(exc).ws_close == 1007


def test_server_frames_byte_for_byte() -> None:
    assert wire.encode(wire.Ready()) == READY
    assert wire.encode(wire.Word("hello", 0.5)) == WORD_HELLO_AT_HALF
    assert wire.encode(wire.EndWord(1.25)) == END_WORD_AT_1_25
    assert wire.encode(wire.Marker(0)) == MARKER_0
    assert wire.encode(wire.Error("no free channels")) == ERROR_NO_FREE_CHANNELS
    assert MoshiAsrCodec.encode_step(ModelStep(7, (0.5, 1.0), 1920)) == STEP_7


def test_a_word_is_word_then_end_word_and_nothing_else_goes_out() -> None:
    word = Word("hello", 0.5, 1.25)
    assert MoshiAsrCodec.encode_event(word) == [WORD_HELLO_AT_HALF, END_WORD_AT_1_25]
    for other in (EndOfTurn(1.3), Segment("hello", 0.5, 1.25, (word,)), Closed()):
        assert MoshiAsrCodec.encode_event(other) == []
    # What Kyutai's client reads back from them
    read = [msgpack.unpackb(f, raw=False) for f in MoshiAsrCodec.encode_event(word)]
    assert read == [
        {"type": "Word", "text": "hello", "start_time": 0.5},
        {"type": "EndWord", "stop_time": 1.25},
    ]
    assert word_objects(word) == read and word_objects(Closed()) == []


def test_float_conversion_round_trips_every_int16() -> None:
    every = np.arange(-32768, 32768, dtype=np.int16)
    assert np.array_equal(float_to_pcm16(pcm16_to_float(every)), every)
    assert pcm16_to_float(every).dtype == np.float32


def test_post_body_decoding() -> None:
    import io

    import soundfile

    stereo = np.zeros((8000, 2), dtype=np.int16)
    stereo[:, 0] = 1000  # upstream takes the first channel only
    stereo[:, 1] = -20000
    buf = io.BytesIO()
    soundfile.write(buf, stereo, 8000, format="WAV", subtype="PCM_16")
    pcm = decode_audio_file(buf.getvalue(), 24000)
    assert abs(len(pcm) - 24000) <= 1
    assert abs(int(np.median(pcm)) - 1000) <= 2
    for body in (b"", b"not audio at all" * 100):
        with pytest.raises(AudioFileError):
            decode_audio_file(body, 24000)
