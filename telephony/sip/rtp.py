"""RTP in (RFC 3550) for transcription: packets to a gap-true 8 kHz timeline, and DTMF.

`RtpReceiver` is sans-I/O: `feed(datagram)` returns what the packet completed, `flush()` the
rest at hang-up. It keeps a small reorder window (packets are released smallest timestamp
first), places audio by RTP timestamp so a lost packet becomes silence of its length instead
of pulling later words earlier, and turns RFC 4733 telephone-events into `Dtmf` once per key.
G.711 decoding goes through `telephony.audio` like every other front end.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from telephony.audio import Encoding, MediaClock, PcmArray, alaw_decode, ulaw_decode
from telephony.dtmf import DTMF_KEYS
from telephony.errors import ProtocolError

RTP_RATE: Final = 8000  # PCMU, PCMA and telephone-event all clock at 8 kHz
STATIC_PAYLOADS: Final = {0: Encoding.MULAW, 8: Encoding.ALAW}


class RtpError(ProtocolError):
    """A datagram that is not an RTP packet we can use; it is dropped and counted."""


@dataclass(frozen=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    marker: bool
    payload: bytes

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        if len(data) < 12:
            raise RtpError(f"{len(data)} bytes is shorter than an RTP header")
        first, second, sequence, timestamp, ssrc = struct.unpack_from("!BBHII", data)
        if first >> 6 != 2:
            raise RtpError(f"RTP version {first >> 6}, expected 2")
        offset = 12 + 4 * (first & 0x0F)  # CSRC list
        if first & 0x10:  # header extension: 4-byte header, then length 32-bit words
            if len(data) < offset + 4:
                raise RtpError("truncated header extension")
            (words,) = struct.unpack_from("!H", data, offset + 2)
            offset += 4 + 4 * words
        end = len(data)
        if first & 0x20:  # padding: the last byte says how much
            end -= data[-1]
        if end < offset:
            raise RtpError("header longer than the packet")
        return cls(second & 0x7F, sequence, timestamp, ssrc, bool(second & 0x80), data[offset:end])

    def serialize(self) -> bytes:
        second = (0x80 if self.marker else 0) | self.payload_type
        head = struct.pack("!BBHII", 0x80, second, self.sequence, self.timestamp, self.ssrc)
        return head + self.payload


@dataclass(frozen=True)
class Audio:
    """8 kHz samples, silence included where packets were lost."""

    pcm: PcmArray


@dataclass(frozen=True)
class Dtmf:
    digit: str
    duration_s: float


RtpOutput = Audio | Dtmf


@dataclass
class RtpStats:
    packets: int = 0
    late: int = 0  # arrived after their place in the timeline was played out
    invalid: int = 0
    lost_samples: int = 0  # filled with silence


@dataclass(order=True)
class _Held:
    timestamp: int
    samples: PcmArray = field(compare=False)


class RtpReceiver:
    """One RTP stream (one call leg) to 8 kHz audio and DTMF, by timestamp."""

    def __init__(
        self,
        payload_types: dict[int, Encoding] | None = None,
        dtmf_payload_type: int | None = 101,
        reorder_packets: int = 3,
        max_gap_s: float = 10.0,
    ) -> None:
        self.payload_types = dict(STATIC_PAYLOADS if payload_types is None else payload_types)
        self.dtmf_payload_type = dtmf_payload_type
        self.stats = RtpStats()
        self._reorder = reorder_packets
        self._clock = MediaClock(int(max_gap_s * RTP_RATE))
        self._held: list[_Held] = []
        self._ssrc: int | None = None
        self._last_raw = 0
        self._last_ext = 0
        self._dtmf_ts: int | None = None  # timestamp of the key being pressed
        self._dtmf_done: set[tuple[int, int]] = set()
        self._dtmf_pending: Dtmf | None = None

    def feed(self, datagram: bytes) -> list[RtpOutput]:
        """One datagram in; audio released from the reorder window and finished keys out."""
        try:
            packet = RtpPacket.parse(datagram)
        except RtpError:
            self.stats.invalid += 1
            return []
        if 72 <= packet.payload_type <= 76:  # RTCP multiplexed on the RTP port (RFC 5761)
            return []
        self.stats.packets += 1
        if packet.payload_type == self.dtmf_payload_type:
            return self._dtmf(packet)
        encoding = self.payload_types.get(packet.payload_type)
        if encoding is None:  # comfort noise and anything not negotiated
            return []
        out: list[RtpOutput] = []
        if packet.ssrc != self._ssrc:
            # A new source (transfer, media server switch): play out what the old one left,
            # then continue the timeline where it stopped.
            out.extend(self._release(0))
            self._ssrc = packet.ssrc
            self._last_raw = packet.timestamp
            position = self._clock.position
            self._last_ext = position if position is not None else packet.timestamp
        ext = self._extend(packet.timestamp)
        samples = (
            ulaw_decode(packet.payload)
            if encoding is Encoding.MULAW
            else alaw_decode(packet.payload)
        )
        heapq.heappush(self._held, _Held(ext, samples))
        out.extend(self._release(self._reorder))
        return out

    def flush(self) -> list[RtpOutput]:
        """Everything still held (call end): the last packets are never lost."""
        out = self._release(0)
        if self._dtmf_pending is not None:
            out.append(self._dtmf_pending)
            self._dtmf_pending = None
        return out

    def _extend(self, timestamp: int) -> int:
        delta = ((timestamp - self._last_raw + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        self._last_raw = timestamp
        self._last_ext += delta
        return self._last_ext

    def _release(self, keep: int) -> list[RtpOutput]:
        out: list[RtpOutput] = []
        while len(self._held) > keep:
            held = heapq.heappop(self._held)
            gap = self._clock.gap(held.timestamp)
            if gap < 0:
                self.stats.late += 1
                continue
            if gap:
                out.append(Audio(np.zeros(gap, dtype=np.int16)))
                self.stats.lost_samples += gap
            out.append(Audio(held.samples))
            self._clock.advance(gap + len(held.samples))
        return out

    def _dtmf(self, packet: RtpPacket) -> list[RtpOutput]:
        if len(packet.payload) < 4:
            self.stats.invalid += 1
            return []
        event, flags, duration = struct.unpack_from("!BBH", packet.payload)
        if event >= len(DTMF_KEYS):
            return []  # flash and other line events: not a key
        key = (packet.ssrc, packet.timestamp)
        if key in self._dtmf_done:
            return []  # the end packet is sent three times
        out: list[RtpOutput] = []
        if self._dtmf_ts != packet.timestamp and self._dtmf_pending is not None:
            out.append(self._dtmf_pending)  # the previous key's end packets were lost
        self._dtmf_ts = packet.timestamp
        press = Dtmf(DTMF_KEYS[event], duration / RTP_RATE)
        if flags & 0x80:
            self._dtmf_done.add(key)
            self._dtmf_pending = None
            out.append(press)
        else:
            self._dtmf_pending = press
        return out
