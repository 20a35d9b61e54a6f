"""RTP receive path: packet bytes, timeline by timestamp, reorder window, RFC 4733 DTMF."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from telephony.audio import Encoding, alaw_encode, ulaw_decode, ulaw_encode
from telephony.sip.rtp import Audio, Dtmf, RtpError, RtpPacket, RtpReceiver

# RFC 3550 header: V=2, M=1, PT=0, seq 0x1234, ts 0x00000a0b, SSRC 0xdeadbeef, 4 payload bytes
PACKET = bytes.fromhex("80801234 00000a0b deadbeef ff7f0080".replace(" ", ""))


def rtp(seq: int, ts: int, payload: bytes, pt: int = 0, ssrc: int = 1) -> bytes:
    return RtpPacket(pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc, False, payload).serialize()


def audio(outputs: list[Audio | Dtmf]) -> np.ndarray:
    parts = [o.pcm for o in outputs if isinstance(o, Audio)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def test_parse_header_fields() -> None:
    packet = RtpPacket.parse(PACKET)
    assert (packet.payload_type, packet.marker, packet.sequence) == (0, True, 0x1234)
    assert (packet.timestamp, packet.ssrc, packet.payload) == (
        0x0A0B,
        0xDEADBEEF,
        b"\xff\x7f\x00\x80",
    )
    assert packet.serialize() == PACKET


def test_parse_skips_csrc_extension_and_padding() -> None:
    # CC=1, X=1, P=1: one CSRC, a one-word extension, 2 bytes of padding
    data = bytes([0xB1, 8]) + struct.pack("!HII", 1, 160, 7) + b"CSRC" + b"\xbe\xde\x00\x01XXXX"
    data += b"\xd5\xd5" + b"\x00\x02"
    packet = RtpPacket.parse(data)
    assert packet.payload_type == 8 and packet.payload == b"\xd5\xd5"


@pytest.mark.parametrize("data", [b"", b"\x80" * 11, b"\x40" + b"\x00" * 15])
def test_parse_rejects_non_rtp(data: bytes) -> None:
    with pytest.raises(RtpError):
        RtpPacket.parse(data)


def test_in_order_packets_decode_to_the_same_samples() -> None:
    pcm = (np.sin(np.arange(800) / 7) * 8000).astype(np.int16)
    wire = ulaw_encode(pcm)
    receiver = RtpReceiver()
    out = []
    for i in range(5):
        out += receiver.feed(rtp(i, i * 160, wire[i * 160 : (i + 1) * 160]))
    out += receiver.flush()
    assert np.array_equal(audio(out), ulaw_decode(wire))
    assert receiver.stats.lost_samples == 0


def test_reordered_packets_are_put_back_in_order() -> None:
    wire = bytes(range(256)) * 4  # 1024 bytes: 6 packets of 160 plus a short one
    chunks = [(i, wire[i * 160 : (i + 1) * 160]) for i in range(7)]
    order = [0, 2, 1, 4, 3, 6, 5]
    receiver = RtpReceiver(reorder_packets=3)
    out = []
    for i in order:
        out += receiver.feed(rtp(i, i * 160, chunks[i][1]))
    out += receiver.flush()
    assert np.array_equal(audio(out), ulaw_decode(wire))


def test_lost_packet_becomes_silence_of_its_length() -> None:
    wire = b"\x00" * 160 * 4
    receiver = RtpReceiver(reorder_packets=0)
    out = []
    for i in (0, 1, 3):  # packet 2 never arrives
        out += receiver.feed(rtp(i, i * 160, wire[:160]))
    samples = audio(out)
    assert len(samples) == 4 * 160  # later audio keeps its place on the timeline
    assert np.all(samples[320:480] == 0) and receiver.stats.lost_samples == 160


def test_late_duplicate_is_dropped_and_timestamps_wrap() -> None:
    receiver = RtpReceiver(reorder_packets=0)
    start = 0xFFFFFFFF - 159  # the second packet's timestamp wraps to 0
    out = receiver.feed(rtp(0, start, b"\x00" * 160)) + receiver.feed(
        rtp(1, start + 160, b"\x00" * 160)
    )
    out += receiver.feed(rtp(0, start, b"\x00" * 160))  # duplicate
    assert len(audio(out)) == 320 and receiver.stats.late == 1


def test_pcma_and_unknown_payloads() -> None:
    receiver = RtpReceiver({8: Encoding.ALAW}, reorder_packets=0)
    pcm = np.full(160, 1000, np.int16)
    out = receiver.feed(rtp(0, 0, alaw_encode(pcm), pt=8)) + receiver.feed(
        rtp(1, 160, b"\0" * 160, pt=13)
    )
    assert len(audio(out)) == 160 and abs(int(audio(out)[0]) - 1000) < 40


def dtmf(event: int, end: bool, duration: int) -> bytes:
    return struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)


def test_rfc4733_key_reported_once_with_its_duration() -> None:
    receiver = RtpReceiver(reorder_packets=0)
    out = []
    for i, (end, duration) in enumerate(
        [(False, 160), (False, 320), (True, 800), (True, 800), (True, 800)]
    ):
        out += receiver.feed(rtp(i, 8000, dtmf(11, end, duration), pt=101))
    assert out == [Dtmf("#", 0.1)]


def test_key_without_end_packets_is_reported_at_the_next_key_or_flush() -> None:
    receiver = RtpReceiver(reorder_packets=0)
    out = receiver.feed(rtp(0, 100, dtmf(5, False, 160), pt=101))
    out += receiver.feed(rtp(1, 900, dtmf(10, False, 160), pt=101))
    out += receiver.flush()
    assert out == [Dtmf("5", 0.02), Dtmf("*", 0.02)]
