"""G.711 against the standard library's audioop, and the streaming resampler."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest

from telephony import audio
from telephony.audio import AudioDecoder, Encoding, ResampleStream

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_CODES = bytes(range(256))
ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)


def test_ulaw_decode_matches_audioop_for_every_code() -> None:
    assert audio.ulaw_decode(ALL_CODES).tobytes() == audioop.ulaw2lin(ALL_CODES, 2)


def test_alaw_decode_matches_audioop_for_every_code() -> None:
    assert audio.alaw_decode(ALL_CODES).tobytes() == audioop.alaw2lin(ALL_CODES, 2)


def test_ulaw_encode_matches_audioop_for_every_int16() -> None:
    assert audio.ulaw_encode(ALL_INT16) == audioop.lin2ulaw(ALL_INT16.tobytes(), 2)


def test_alaw_encode_matches_audioop_for_every_int16() -> None:
    assert audio.alaw_encode(ALL_INT16) == audioop.lin2alaw(ALL_INT16.tobytes(), 2)


def test_pcm16_is_little_endian() -> None:
    assert audio.pcm16_decode(b"\x01\x00\xff\x7f\x00\x80").tolist() == [1, 32767, -32768]
    assert audio.pcm16_encode(np.array([1, -2], dtype=np.int16)) == b"\x01\x00\xfe\xff"


def test_deinterleave_splits_channels_and_drops_partial_frame() -> None:
    left, right = audio.deinterleave(np.array([1, -1, 2, -2, 3], dtype=np.int16), 2)
    assert left.tolist() == [1, 2] and right.tolist() == [-1, -2]


def _chunked(stream: ResampleStream, pcm: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, start = [], 0
    for size in sizes:
        out.append(stream.process(pcm[start : start + size]))
        start += size
    out.append(stream.process(pcm[start:]))
    out.append(stream.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_resampler_output_does_not_depend_on_chunking(rate: int) -> None:
    rng = np.random.default_rng(rate)
    pcm = (np.sin(np.arange(rate * 2) * 0.05) * 12000 + rng.normal(0, 2000, rate * 2)).astype(
        np.int16
    )
    whole = _chunked(ResampleStream(rate, 24000), pcm, [])
    random_sizes = [int(n) for n in rng.integers(1, 700, size=400)]
    pieces = _chunked(ResampleStream(rate, 24000), pcm, random_sizes)
    frames = _chunked(
        ResampleStream(rate, 24000), pcm, [rate // 50] * 100
    )  # 20 ms telephone frames
    assert len(whole) == len(pieces) == len(frames) == len(pcm) * 24000 // rate
    assert np.abs(whole.astype(int) - pieces).max() <= 1
    assert np.abs(whole.astype(int) - frames).max() <= 1


def test_resampler_keeps_a_tone_at_its_frequency() -> None:
    t = np.arange(8000) / 8000
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    stream = ResampleStream(8000, 24000)
    out = np.concatenate([stream.process(tone), stream.flush()])
    spectrum = np.abs(np.fft.rfft(out.astype(float)))
    assert abs(np.argmax(spectrum) * 24000 / len(out) - 440) < 2


def test_resampler_memory_stays_flat_over_a_long_call() -> None:
    stream = ResampleStream(8000, 24000)
    frame = (np.sin(np.arange(160) * 0.3) * 8000).astype(np.int16)
    for _ in range(500):  # warm up
        stream.process(frame)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(30_000):  # 10 minutes of 20 ms frames
        stream.process(frame)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 64 * 1024


def test_decoder_carries_a_sample_split_across_frames() -> None:
    pcm = np.arange(-500, 500, 7, dtype=np.int16)
    data = pcm.tobytes()
    whole = AudioDecoder(Encoding.PCM16, 24000, 24000).feed(data)
    split = AudioDecoder(Encoding.PCM16, 24000, 24000)
    parts = [split.feed(data[i : i + 3]) for i in range(0, len(data), 3)]
    assert np.concatenate(parts).tolist() == whole.tolist() == pcm.tolist()


def test_decoder_turns_8k_ulaw_into_24k() -> None:
    decoder = AudioDecoder(Encoding.MULAW, 8000, 24000)
    tone = (np.sin(np.arange(1600) * 2 * np.pi * 1000 / 8000) * 8000).astype(np.int16)
    out = np.concatenate([decoder.feed(audio.ulaw_encode(tone)), decoder.flush()])
    assert len(out) == 4800
    assert 5000 < np.abs(out).max() < 9000


def test_decoder_rejects_unsupported_rate() -> None:
    with pytest.raises(ValueError, match="sample rate"):
        AudioDecoder(Encoding.PCM16, 11025, 24000)


@pytest.mark.parametrize("encoding", [Encoding.MULAW, Encoding.PCM16])
def test_decoder_batches_bytes_into_the_same_samples_as_decoding_then_resampling(
    encoding: Encoding,
) -> None:
    """The decoder gathers wire bytes in 80 ms batches before decoding: the result is what
    decoding every byte and resampling the samples gives, however the packets were cut (a
    16-bit sample split between packets included)."""
    rng = np.random.default_rng(7)
    pcm = (np.sin(np.arange(8000) * 0.07) * 9000 + rng.normal(0, 500, 8000)).astype(np.int16)
    wire = audio.ulaw_encode(pcm) if encoding is Encoding.MULAW else audio.pcm16_encode(pcm)
    reference = AudioDecoder(encoding, 8000, 16000).decode(wire)
    expected = audio.resample_whole(reference, 8000, 16000)
    decoder = AudioDecoder(encoding, 8000, 16000)
    cuts = np.cumsum(rng.integers(1, 400, size=200))
    pieces = np.split(np.frombuffer(wire, dtype=np.uint8), cuts[cuts < len(wire)])
    out = [decoder.feed(piece.tobytes()) for piece in pieces]
    got = np.concatenate([*out, decoder.flush()])
    assert len(got) == len(expected) == 16000
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_decoder_counts_the_batch_it_is_still_gathering() -> None:
    """`seconds_in` (DTMF timing) is the wire position, not what has been resampled."""
    decoder = AudioDecoder(Encoding.MULAW, 8000, 16000)
    assert len(decoder.feed(b"\xff" * 160)) == 0  # 20 ms: the batch is not whole yet
    assert decoder.seconds_in == pytest.approx(0.02)
    for _ in range(3):
        decoder.feed(b"\xff" * 160)
    assert decoder.seconds_in == pytest.approx(0.08)
    assert len(decoder.flush()) > 0


def test_batch_phase_comes_from_the_call_id_and_spreads_a_burst() -> None:
    ids = [f"CA{n:032x}" for n in range(400)]
    phases = [audio.batch_phase(call_id) for call_id in ids]
    assert phases == [audio.batch_phase(call_id) for call_id in ids]  # the same on every run
    counts = [phases.count(p) for p in (0.0, 0.25, 0.5, 0.75)]
    assert sum(counts) == len(ids) and min(counts) > 60, counts  # all four slots, evenly


@pytest.mark.parametrize("encoding", [Encoding.MULAW, Encoding.PCM16])
def test_a_phased_decoder_ends_its_first_batch_early_and_gives_the_same_samples(
    encoding: Encoding,
) -> None:
    rng = np.random.default_rng(7)
    width = encoding.bytes_per_sample
    packets = [rng.integers(0, 256, 160 * width, dtype=np.uint8).tobytes() for _ in range(40)]
    outputs = {}
    for phase in (0.0, 0.25, 0.5, 0.75):
        decoder = AudioDecoder(encoding, 8000, 16000, phase=phase)
        sizes = [len(decoder.feed(p)) for p in packets]
        # Batches end after packet 3, 7, 11, ... at phase 0; one packet earlier per quarter.
        ends = {n % 4 for n, size in enumerate(sizes) if size}
        assert ends == {3 - int(phase * 4)}, (phase, sizes)
        replay = AudioDecoder(encoding, 8000, 16000, phase=phase)
        outputs[phase] = np.concatenate([*(replay.feed(p) for p in packets), replay.flush()])
    for phase in (0.25, 0.5, 0.75):  # where batches end does not change a sample
        assert np.array_equal(outputs[phase], outputs[0.0])


def test_media_clock_fills_gaps_tolerates_jitter_resyncs_on_a_reset_and_says_late() -> None:
    clock = audio.MediaClock(max_gap=80_000, tolerance=160)  # 10 s and 20 ms at 8 kHz
    assert clock.gap(1_000_000) == 0  # the first stamp sets the clock
    clock.advance(160)
    assert clock.gap(1_000_160 + 100) == 0  # 12.5 ms of jitter plays on
    clock.advance(160)
    assert clock.gap(1_000_320 + 800) == 800  # 100 ms missing: silence of that length
    clock.advance(800 + 160)
    assert clock.gap(1_000_320 - 320) == -1280  # before the clock's position: late
    assert clock.gap(9_000_000) == 0 and clock.position == 9_000_000  # a reset: resynchronised
    from_zero = audio.MediaClock(max_gap=80_000, start=0)  # a stream clock that starts at 0
    assert from_zero.gap(480) == 480  # a track that starts late is preceded by silence
