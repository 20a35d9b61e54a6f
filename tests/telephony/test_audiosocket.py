"""AudioSocket codec, byte by byte, with the vectors of ../shared/protocols/audiosocket.md."""

from __future__ import annotations

import uuid

import pytest

from telephony.audiosocket import (
    Audio,
    AudioSocketCodec,
    AudioSocketError,
    Dtmf,
    Hangup,
    Identified,
    PeerError,
)

CALL = uuid.UUID("40325ec2-5efd-4bd3-805f-53576e581d13")
UUID_MSG = bytes.fromhex("01 00 10 40 32 5e c2 5e fd 4b d3 80 5f 53 57 6e 58 1d 13")
SILENCE_8K = bytes.fromhex("10 01 40") + bytes(320)


def identified() -> AudioSocketCodec:
    codec = AudioSocketCodec()
    assert codec.feed(UUID_MSG) == [Identified(CALL)]
    return codec


def test_uuid_message() -> None:
    assert AudioSocketCodec.encode_uuid(CALL) == UUID_MSG
    identified()


@pytest.mark.parametrize(
    ("header", "rate"),
    [
        ("10 01 40", 8000),
        ("11 01 e0", 12000),
        ("12 02 80", 16000),
        ("13 03 c0", 24000),
        ("14 05 00", 32000),
        ("15 06 e4", 44100),
        ("16 07 80", 48000),
        ("17 0f 00", 96000),
        ("18 1e 00", 192000),
    ],
)
def test_every_audio_kind_gives_its_rate(header: str, rate: int) -> None:
    head = bytes.fromhex(header)
    payload = bytes(int.from_bytes(head[1:], "big"))
    assert identified().feed(head + payload) == [Audio(rate, payload)]
    assert AudioSocketCodec.encode_audio(payload, rate) == head + payload


def test_samples_are_little_endian() -> None:
    (event,) = identified().feed(bytes.fromhex("10 00 04 e8 03 fe ff"))
    assert isinstance(event, Audio)
    assert event.payload == bytes.fromhex("e8 03 fe ff")  # +1000, -2


def test_messages_split_anywhere_across_reads() -> None:
    codec = AudioSocketCodec()
    stream = UUID_MSG + SILENCE_8K + bytes.fromhex("03 00 01 35") + SILENCE_8K
    events = []
    for i in range(len(stream)):
        events += codec.feed(stream[i : i + 1])
    assert events == [Identified(CALL), Audio(8000, bytes(320)), Dtmf("5"), Audio(8000, bytes(320))]
    codec.end_of_stream()


def test_dtmf_hangup_and_errors() -> None:
    codec = identified()
    assert codec.feed(bytes.fromhex("03 00 01 35")) == [Dtmf("5")]
    assert codec.feed(bytes.fromhex("00 00 00")) == [Hangup()]
    assert codec.feed(bytes.fromhex("ff 00 01 01")) == [PeerError(1)]
    assert codec.feed(bytes.fromhex("ff 00 00")) == [PeerError(None)]
    assert AudioSocketCodec.encode_hangup() == bytes.fromhex("00 00 00")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes.fromhex("42 00 00"), "unknown message kind 0x42"),
        (bytes.fromhex("02 00 00"), "unknown message kind 0x02"),
        (bytes.fromhex("10 ff ff"), "too long"),
        (bytes.fromhex("10 00 00"), "audio payload of 0 bytes"),
        (bytes.fromhex("10 00 03 01 02 03"), "audio payload of 3 bytes"),
        (bytes.fromhex("03 00 01 78"), "bad DTMF"),
        (UUID_MSG, "second UUID"),
    ],
)
def test_bad_framing_is_an_error(data: bytes, message: str) -> None:
    with pytest.raises(AudioSocketError, match=message):
        identified().feed(data)


def test_audio_before_uuid_is_an_error() -> None:
    with pytest.raises(AudioSocketError, match="before the UUID"):
        AudioSocketCodec().feed(SILENCE_8K)


def test_short_uuid_is_an_error() -> None:
    with pytest.raises(AudioSocketError, match="UUID payload of 4 bytes"):
        AudioSocketCodec().feed(bytes.fromhex("01 00 04 01 02 03 04"))


def test_truncated_message_at_end_of_stream() -> None:
    codec = identified()
    assert codec.feed(SILENCE_8K[:100]) == []
    with pytest.raises(AudioSocketError, match="inside a message"):
        codec.end_of_stream()


def test_a_long_message_trickled_a_byte_at_a_time_is_whole() -> None:
    """The largest payload, one byte per read: one event with every byte, in order."""
    codec = identified()
    payload = bytes(range(256)) * 128  # 32768 bytes: MAX_PAYLOAD
    message = AudioSocketCodec.encode_audio(payload, 16000)
    events = []
    for i in range(len(message)):
        events += codec.feed(message[i : i + 1])
    assert events == [Audio(16000, payload)]
    codec.end_of_stream()
