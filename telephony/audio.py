"""The audio path: G.711 μ-law / A-law, 16-bit linear PCM, and streaming resampling.

Every front end turns its wire audio into mono int16 at the engine's own rate (`Engine.sample_rate`:
16 kHz for Moonshine, 24 kHz for Kyutai), in one resampling, through this module and nowhere
else. G.711 is table based (numpy); the tables are built once from the ITU-T reference
algorithm (the one in Sun's g711.c that CPython's audioop also uses), so results match
audioop bit for bit. Resampling is soxr's streaming resampler, which keeps only its filter
state, so a call of any length uses bounded memory and chunking does not change the output.
"""

from __future__ import annotations

import enum
import zlib
from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

# Defined at the bottom, where the engine uses them too; re-exported for the front ends.
from engine.pcm import PcmArray as PcmArray
from engine.pcm import float_to_pcm16 as float_to_pcm16
from engine.pcm import pcm16_to_float as pcm16_to_float

SUPPORTED_RATES: Final = (8000, 16000, 24000, 48000)
"""Rates a client may choose on `/v1/stream`."""

WIRE_RATES: Final = (8000, 12000, 16000, 24000, 32000, 44100, 48000, 64000, 96000, 192000)
"""Every rate some front end delivers (AudioSocket's slin kinds go up to 192 kHz)."""


class Encoding(enum.StrEnum):
    """Sample encodings the front ends receive."""

    PCM16 = "pcm16"  # signed 16-bit little-endian (slin, L16 as mod_audio_fork sends it)
    PCM16_BE = "pcm16be"  # signed 16-bit big-endian: L16 as an RTP payload (Telnyx's L16)
    MULAW = "mulaw"  # G.711 μ-law (PCMU)
    ALAW = "alaw"  # G.711 A-law (PCMA)

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self in (Encoding.PCM16, Encoding.PCM16_BE) else 1


# --- G.711 tables -------------------------------------------------------------------------

_SEG_U_END: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_SEG_A_END: Final = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
_ALL_INT16: Final = np.arange(-32768, 32768, dtype=np.int32)
_ALL_CODES: Final = np.arange(256, dtype=np.int32)


def _build_ulaw_decode() -> PcmArray:
    u = ~_ALL_CODES & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _build_alaw_decode() -> PcmArray:
    a = _ALL_CODES ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _build_ulaw_encode() -> npt.NDArray[np.uint8]:
    v = _ALL_INT16 >> 2  # audioop feeds the 14-bit value
    mask = np.where(v < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), 8159) + 33
    seg = np.searchsorted(_SEG_U_END, mag, side="left")
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8)


def _build_alaw_encode() -> npt.NDArray[np.uint8]:
    v = _ALL_INT16 >> 3  # audioop feeds the 13-bit value
    mask = np.where(v >= 0, 0xD5, 0x55)
    mag = np.where(v >= 0, v, -v - 1)
    seg = np.searchsorted(_SEG_A_END, mag, side="left")
    quant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (seg << 4) | quant)
    return (code ^ mask).astype(np.uint8)


ULAW_TO_LINEAR: Final = _build_ulaw_decode()
ALAW_TO_LINEAR: Final = _build_alaw_decode()
_LINEAR_TO_ULAW: Final = _build_ulaw_encode()
_LINEAR_TO_ALAW: Final = _build_alaw_encode()


def ulaw_decode(data: bytes) -> PcmArray:
    return ULAW_TO_LINEAR[np.frombuffer(data, dtype=np.uint8)]


def alaw_decode(data: bytes) -> PcmArray:
    return ALAW_TO_LINEAR[np.frombuffer(data, dtype=np.uint8)]


def ulaw_encode(pcm: PcmArray) -> bytes:
    return _LINEAR_TO_ULAW[pcm.astype(np.int32) + 32768].tobytes()


def alaw_encode(pcm: PcmArray) -> bytes:
    return _LINEAR_TO_ALAW[pcm.astype(np.int32) + 32768].tobytes()


def pcm16_decode(data: bytes) -> PcmArray:
    """Little-endian int16 bytes (length must be even) to samples."""
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def pcm16_encode(pcm: PcmArray) -> bytes:
    return pcm.astype("<i2").tobytes()


def deinterleave(pcm: PcmArray, channels: int) -> list[PcmArray]:
    """Split interleaved samples into one array per channel (drops a trailing partial frame)."""
    if channels == 1:
        return [pcm]
    usable = len(pcm) - len(pcm) % channels
    frames = pcm[:usable].reshape(-1, channels)
    return [np.ascontiguousarray(frames[:, c]) for c in range(channels)]


# --- streaming resampling -------------------------------------------------------------------


class ResampleStream:
    """Resamples one mono int16 stream chunk by chunk.

    The output does not depend on how the input is chunked and the state is soxr's filter
    memory only. `flush()` returns the samples still held by the filter. soxr runs in float32
    here: its int16 mode rounds per chunk and drifts by up to 2 LSB with the chunking.

    Input is resampled `BATCH_S` (80 ms, one Kyutai frame) at a time, not per 20 ms packet:
    each soxr call has a fixed cost, and batching four packets cut the audio path from 28 to
    8 µs per 20 ms frame (8 → 16 kHz, bench/audio.py). No engine acts on less than that: Kyutai
    steps every 80 ms, Moonshine decides per 32 ms window and decodes whole utterances.
    `AudioDecoder` batches the wire bytes instead, before decoding, and hands whole batches to
    `resample_batch`.
    """

    BATCH_S: Final = 0.08

    def __init__(self, in_rate: int, out_rate: int, phase: float = 0.0) -> None:
        """`phase` (0 ≤ phase < 1, `batch_phase`): the first batch is that much of a batch
        shorter, so calls that start in the same 20 ms do not resample in the same one."""
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.samples_in = 0
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
        )
        self._batch: list[PcmArray] = []
        self.batch_samples = int(self.BATCH_S * in_rate)
        # The first batch ends early by `phase` of a batch: counted as if already gathered.
        self._batched = int(self.batch_samples * phase)

    @property
    def passthrough(self) -> bool:
        """In and out rates are equal: samples go through untouched, at once."""
        return self._stream is None

    @property
    def seconds_in(self) -> float:
        """Audio taken so far, in seconds: where the stream is, whatever the filter holds."""
        return self.samples_in / self.in_rate

    def process(self, pcm: PcmArray) -> PcmArray:
        self.samples_in += len(pcm)
        if self._stream is None:
            return pcm
        self._batch.append(pcm)
        self._batched += len(pcm)
        if self._batched < self.batch_samples:
            return _EMPTY
        return self._resample(self._take_batch(), last=False)

    def resample_batch(self, samples: npt.NDArray[np.float32], last: bool = False) -> PcmArray:
        """A batch the caller gathered itself, float32 on the int16 scale (its own array: it is
        not kept). What `process` holds goes first."""
        self.samples_in += len(samples)
        if self._stream is None:
            return _float_to_int16(samples)
        if self._batch:
            samples = np.concatenate([self._take_batch(), samples])
        self._batched = 0
        return self._resample(samples, last)

    def flush(self) -> PcmArray:
        if self._stream is None:
            return _EMPTY
        return self._resample(self._take_batch(), last=True)

    def _resample(self, samples: npt.NDArray[np.float32], last: bool) -> PcmArray:
        assert self._stream is not None
        return _float_to_int16(self._stream.resample_chunk(samples, last=last))

    def _take_batch(self) -> npt.NDArray[np.float32]:
        batch = self._batch[0] if len(self._batch) == 1 else np.concatenate(self._batch or [_EMPTY])
        self._batch, self._batched = [], 0
        return batch.astype(np.float32)


class MediaClock:
    """One leg's media timeline in samples, from its sender's timestamps: where each chunk of
    audio belongs, so that a gap (loss, silence suppression) becomes silence of its length and
    later words keep their place on the call's timeline. RTP and the WebSocket carriers share it.

    A chunk stamped within `tolerance` of where the clock expects it plays on (a sender's
    millisecond clock jitters); later than that is a gap to fill; more than `max_gap` later is a
    clock reset or a hostile stamp, not loss: the clock resynchronises and nothing is filled (or
    allocated). Earlier than expected is late: RTP drops it, an in-order WebSocket plays it on.
    """

    def __init__(self, max_gap: int, tolerance: int = 0, start: int | None = None) -> None:
        self.max_gap = max_gap
        self.tolerance = tolerance
        self.position = start  # the clock's time of the next sample; None: the first stamp's

    def gap(self, at: int) -> int:
        """Samples missing before a chunk stamped `at`: 0 when it is on time (or the clock has
        just resynchronised), negative when it starts before the clock's position."""
        if self.position is None:
            self.position = at
            return 0
        gap = at - self.position
        if gap > self.max_gap:
            self.position = at
            return 0
        return gap if gap > self.tolerance or gap < 0 else 0

    def advance(self, samples: int) -> None:
        """`samples` were played out (audio or the silence that filled a gap)."""
        if self.position is not None:
            self.position += samples


BATCH_PHASES: Final = 4  # 80 ms batches of 20 ms packets: four places a batch can end


def batch_phase(call_id: str) -> float:
    """Where a call's 80 ms batches end, from its id: a burst of calls that start in the same
    20 ms (a mass reconnect) spreads its resampling and decoding over four 20 ms slots instead
    of all landing in one (bench/load.py --mass-start). From the id, not a counter or the
    clock, so a call's batches are the same on every run."""
    return (zlib.crc32(call_id.encode("utf-8", "replace")) % BATCH_PHASES) / BATCH_PHASES


def resample_whole(pcm: PcmArray, in_rate: int, out_rate: int) -> PcmArray:
    """A whole recording resampled at once: the same samples as streaming it chunk by chunk."""
    resampler = ResampleStream(in_rate, out_rate)
    return np.concatenate([resampler.process(pcm), resampler.flush()])


_EMPTY: Final[PcmArray] = np.zeros(0, dtype=np.int16)


def _float_to_int16(samples: npt.NDArray[np.float32]) -> PcmArray:
    """Round and saturate in place (ufuncs with `out=`: np.clip's Python wrapper and two
    temporaries cost more than the resampling at 80 ms batches)."""
    if not samples.flags.writeable:
        samples = samples.copy()
    np.rint(samples, out=samples)
    np.minimum(samples, 32767.0, out=samples)
    np.maximum(samples, -32768.0, out=samples)
    return samples.astype(np.int16)


_DECODE_FLOAT: Final = {
    Encoding.MULAW: ULAW_TO_LINEAR.astype(np.float32),
    Encoding.ALAW: ALAW_TO_LINEAR.astype(np.float32),
}


class AudioDecoder:
    """Wire bytes of one leg in, int16 at the engine's rate out.

    Bytes may arrive in any split: a 16-bit sample cut between two packets is carried over.
    When the rate changes, the wire bytes themselves wait for a whole 80 ms batch and are then
    decoded straight to float32 (G.711 through a float table) and resampled in one go: one
    numpy pass per step per batch instead of per packet.
    """

    def __init__(
        self, encoding: Encoding, sample_rate: int, out_rate: int, phase: float = 0.0
    ) -> None:
        if sample_rate not in WIRE_RATES:
            raise ValueError(f"unsupported sample rate {sample_rate}; use one of {WIRE_RATES}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self._carry = b""
        self._resampler = ResampleStream(sample_rate, out_rate)
        self._width = encoding.bytes_per_sample
        self._pending = bytearray()  # wire bytes of the batch being gathered (whole samples)
        self._batch_bytes = self._resampler.batch_samples * self._width
        # The first batch is shorter by `phase` of a batch (`batch_phase`), in whole samples.
        self._first_batch_bytes = (
            self._batch_bytes - int(self._batch_bytes * phase) // (self._width) * self._width
        )

    def decode(self, data: bytes) -> PcmArray:
        """Wire bytes to samples at the wire's own rate (no resampling)."""
        if self.encoding is Encoding.MULAW:
            return ulaw_decode(data)
        if self.encoding is Encoding.ALAW:
            return alaw_decode(data)
        data = self._carry + data
        usable = len(data) - len(data) % 2
        self._carry = data[usable:]
        if self.encoding is Encoding.PCM16_BE:
            return np.frombuffer(data[:usable], dtype=">i2").astype(np.int16)
        return pcm16_decode(data[:usable])

    def feed(self, data: bytes) -> PcmArray:
        if self._resampler.passthrough:
            return self._resampler.process(self.decode(data))
        pending = self._pending
        pending += data
        if len(pending) < self._first_batch_bytes:
            return _EMPTY
        self._first_batch_bytes = self._batch_bytes
        return self._resampler.resample_batch(self._take_pending())

    @property
    def seconds_in(self) -> float:
        """Audio taken so far, the batch being gathered included."""
        return self._resampler.seconds_in + len(self._pending) // self._width / self.sample_rate

    def feed_samples(self, pcm: PcmArray) -> PcmArray:
        """Samples already decoded at the wire rate (e.g. one channel of a stereo stream)."""
        return self._resampler.process(pcm)

    def flush(self) -> PcmArray:
        if self._pending:
            head = self._resampler.resample_batch(self._take_pending())
            return np.concatenate([head, self._resampler.flush()])
        return self._resampler.flush()

    def _take_pending(self) -> npt.NDArray[np.float32]:
        """The gathered whole samples as float32 (a trailing half sample stays)."""
        pending = self._pending
        usable = len(pending) - len(pending) % self._width
        data = bytes(pending[:usable])
        del pending[:usable]
        table = _DECODE_FLOAT.get(self.encoding)
        if table is not None:
            return np.take(table, np.frombuffer(data, dtype=np.uint8))
        order = ">i2" if self.encoding is Encoding.PCM16_BE else "<i2"
        return np.frombuffer(data, dtype=order).astype(np.float32)
