"""The capacity the Moonshine engine measures at start, against a real load of that many callers
who talk without stopping (sentences 1.2 s apart, 20 ms frames in real time from one timer, as
a media server sends them): their finals come within 1.0 s (p95) of the end of each sentence's
audio, every caller gets a partial per 2 s of speech or more; one caller more is refused."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from engine.base import EngineFull, Partial, Segment
from engine.moonshine import MoonshineEngine, MoonshineStream
from telephony.audio import PcmArray, resample_whole, ulaw_decode
from tests.conftest import MODEL_CACHE
from tests.speech import SENTENCES, phone_bytes

RATE = 16000
FRAME = RATE // 50
PAUSE = np.zeros(int(1.2 * RATE), dtype=np.int16)
CYCLE_S = 4.2  # a sentence and its pause, about

pytestmark = [pytest.mark.solo, pytest.mark.timeout(180)]  # a real-time load: alone


def caller(first: int, lead_s: float) -> tuple[PcmArray, float]:
    """Three sentences from `first` on, 1.2 s apart, after `lead_s` of silence; and the seconds
    of speech in them."""
    speech = [
        resample_whole(
            ulaw_decode(phone_bytes(SENTENCES[(first + k) % len(SENTENCES)])), 8000, RATE
        )
        for k in range(3)
    ]
    parts = [np.zeros(int((0.5 + lead_s) * RATE), dtype=np.int16)]
    for pcm in speech:
        parts += [pcm, PAUSE]
    return np.concatenate(parts), sum(len(pcm) for pcm in speech) / RATE


async def test_the_measured_capacity_keeps_finals_within_a_second_with_partials() -> None:
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=0, partial_interval_s=1.0)
    await engine.start()
    try:
        count = engine.capacity
        # Callers are not in step: each starts at its own point of a sentence's cycle (real
        # calls start at random times). All starting together is a mass start, where every
        # final is asked for in the same moment (bench/load.py --mass-start measures that).
        calls = [caller(n, lead_s=n * CYCLE_S / count) for n in range(count)]
        length = max(len(pcm) for pcm, _ in calls)
        calls = [(np.pad(pcm, (0, length - len(pcm))), speech) for pcm, speech in calls]
        streams = [engine.open(f"load-{n}") for n in range(count)]
        with pytest.raises(EngineFull):
            engine.open("one-more")
        latencies: list[float] = []
        partials = [0] * count
        began = time.perf_counter() + 0.1

        async def read(n: int, stream: MoonshineStream) -> None:
            async for event in stream.events():
                if isinstance(event, Segment):  # its last word's end: where the speech stopped
                    latencies.append(time.perf_counter() - (began + event.end_s))
                elif isinstance(event, Partial):
                    partials[n] += 1

        readers = [asyncio.create_task(read(n, s)) for n, s in enumerate(streams)]
        for i, at in enumerate(range(0, length, FRAME)):
            delay = began + (i + 1) * 0.02 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            for stream, (pcm, _) in zip(streams, calls, strict=True):
                stream.push(pcm[at : at + FRAME])
        for stream in streams:
            stream.close()
        await asyncio.gather(*readers)
    finally:
        await engine.stop()
    assert len(latencies) >= 3 * count  # every sentence came out (a long one may be cut in two)
    p95 = float(np.percentile(latencies, 95))
    assert p95 <= 1.0, (count, sorted(latencies)[-5:])
    assert max(latencies) <= 1.5, (count, sorted(latencies)[-5:])
    # Partials keep coming at capacity: thinner, but one per 2 s of speech for every caller.
    per_2s = [2 * n / speech_s for n, (_, speech_s) in zip(partials, calls, strict=True)]
    assert min(per_2s) >= 1.0, (count, sorted(per_2s)[:5])
