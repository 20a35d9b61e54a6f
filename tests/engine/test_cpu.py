"""The CPU engine (PocketSphinx) on real speech, through the engine contract."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from engine.base import Closed, EndOfTurn, EngineEvent, EngineFull, Segment, Word
from engine.cpu import CpuEngine
from telephony.audio import ENGINE_RATE, PcmArray, ResampleStream
from tests.speech import SENTENCES, read_pcm, speech_wav, word_error_rate

# Measured on SENTENCES at 24 kHz (clean hibari speech): mean WER 0.12, worst sentence 0.23.
MEAN_WER_BOUND = 0.2


def sentence_pcm(text: str, pad_s: float = 0.3) -> PcmArray:
    pcm, rate = read_pcm(speech_wav(text))
    assert rate == ENGINE_RATE
    pad = np.zeros(int(pad_s * ENGINE_RATE), dtype=np.int16)
    return np.concatenate([pad, pcm, pad])


async def run_stream(engine: CpuEngine, pcm: PcmArray, chunk: int | list[int]) -> list[EngineEvent]:
    stream = engine.open("call", "caller")
    sizes = [chunk] * (len(pcm) // chunk + 1) if isinstance(chunk, int) else chunk
    start = 0
    for size in sizes:
        await stream.write(pcm[start : start + size])
        start += size
    await stream.write(pcm[start:])
    stream.close()
    return [event async for event in stream.events()]


def words(events: list[EngineEvent]) -> list[Word]:
    return [e for e in events if isinstance(e, Word)]


async def test_transcribes_call_centre_sentences(cpu_engine: CpuEngine) -> None:
    rates = []
    for text in SENTENCES:
        events = await run_stream(cpu_engine, sentence_pcm(text), 1920)
        rates.append(word_error_rate(text, " ".join(w.text for w in words(events))))
    assert float(np.mean(rates)) <= MEAN_WER_BOUND, rates


async def test_events_are_ordered_and_timed(cpu_engine: CpuEngine) -> None:
    pcm = sentence_pcm(SENTENCES[0], pad_s=1.0)
    events = await run_stream(cpu_engine, pcm, 4800)
    assert isinstance(events[-1], Closed)
    ws = words(events)
    assert ws, "no words"
    starts = [w.start_s for w in ws]
    assert starts == sorted(starts)
    assert all(w.end_s > w.start_s for w in ws)
    # Speech begins after the 1 s of leading silence and ends before the audio does.
    assert ws[0].start_s >= 0.8
    assert ws[-1].end_s <= len(pcm) / ENGINE_RATE
    segments = [e for e in events if isinstance(e, Segment)]
    assert " ".join(s.text for s in segments) == " ".join(w.text for w in ws)
    turns = [e for e in events if isinstance(e, EndOfTurn)]
    assert len(turns) == len(segments)
    assert all(t.at_s >= s.end_s for t, s in zip(turns, segments, strict=True))


async def test_chunking_does_not_change_the_words(cpu_engine: CpuEngine) -> None:
    pcm = sentence_pcm(SENTENCES[1])
    rng = np.random.default_rng(7)
    big = words(await run_stream(cpu_engine, pcm, 24000))
    tiny = words(await run_stream(cpu_engine, pcm, [int(n) for n in rng.integers(1, 900, 600)]))
    assert big and big == tiny


async def test_close_flushes_words_still_being_spoken(cpu_engine: CpuEngine) -> None:
    """Audio that stops mid-speech (hangup) still yields its words."""
    pcm = sentence_pcm(SENTENCES[4], pad_s=0.3)
    cut = pcm[: int(len(pcm) * 0.7)]  # no trailing silence: the endpointer is still in speech
    events = await run_stream(cpu_engine, cut, 1920)
    assert len(words(events)) >= 4
    assert isinstance(events[-1], Closed)


async def test_full_engine_refuses_then_frees_the_slot() -> None:
    engine = CpuEngine(capacity=2)
    await engine.start()
    try:
        a, b = engine.open("a"), engine.open("b")
        assert engine.free_slots == 0
        with pytest.raises(EngineFull):
            engine.open("c")
        a.close()
        assert [type(e) for e in [e async for e in a.events()]] == [Closed]
        assert engine.free_slots == 1
        engine.open("c").close()
        b.close()
    finally:
        await engine.stop()


async def test_overflow_drops_oldest_audio_and_counts_it() -> None:
    engine = CpuEngine(capacity=1, max_buffer_s=0.5)
    await engine.start()
    try:
        stream = engine.open("flood")
        for _ in range(100):  # 10 s pushed at once, far faster than real time
            stream.push(np.zeros(2400, dtype=np.int16))
        assert stream.stats.samples_dropped > 0
        assert stream.pending_samples <= 0.5 * ENGINE_RATE
        stream.close()
        assert isinstance([e async for e in stream.events()][-1], Closed)
    finally:
        await engine.stop()


async def test_decoding_never_stalls_the_event_loop(cpu_engine: CpuEngine) -> None:
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    pcm = np.concatenate([sentence_pcm(t) for t in SENTENCES[:3]])
    stream = cpu_engine.open("loop")
    stream.push(pcm)  # 15 s of audio queued at once: decoding takes a while
    stream.close()
    assert words([e async for e in stream.events()])
    tick.cancel()
    # A blocked loop would show one lag as long as the decoding (over a second).
    assert max(lags) < 0.25, max(lags)


async def test_streams_decode_independently(cpu_engine: CpuEngine) -> None:
    pcm_a, pcm_b = sentence_pcm(SENTENCES[0]), sentence_pcm(SENTENCES[3])
    alone_a = words(await run_stream(cpu_engine, pcm_a, 1920))
    alone_b = words(await run_stream(cpu_engine, pcm_b, 1920))
    together = await asyncio.gather(
        run_stream(cpu_engine, pcm_a, 1920), run_stream(cpu_engine, pcm_b, 3000)
    )
    assert [words(e) for e in together] == [alone_a, alone_b]


def test_resampling_to_decoder_rate_uses_the_audio_module() -> None:
    # The engine converts 24 kHz to 16 kHz with telephony.audio, like every other path.
    stream = ResampleStream(ENGINE_RATE, 16000)
    out = np.concatenate([stream.process(np.zeros(24000, np.int16)), stream.flush()])
    assert len(out) == 16000
