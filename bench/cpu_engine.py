"""The CPU engine (PocketSphinx): real-time factor per stream and concurrent real-time streams.

1. RTF: one stream, speech written as fast as the engine takes it; wall time / audio time.
2. Throughput: K streams at once, each as fast as it goes; audio seconds decoded per wall
   second is how many real-time streams the machine holds (at 100 % of its cores).
3. Real time: K streams paced like phones (20 ms frames); the lag from the end of each
   stream's audio to its `Closed` (all words out) tells whether K streams keep up.

    python bench/cpu_engine.py [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.base import Closed, Word
from engine.cpu import CpuEngine
from telephony.audio import ENGINE_RATE, PcmArray
from tests.speech import SENTENCES, read_pcm, speech_wav, word_error_rate


def call_audio() -> tuple[PcmArray, str]:
    """All test sentences with 0.6 s pauses: about 30 s of a caller talking."""
    gap = np.zeros(int(0.6 * ENGINE_RATE), dtype=np.int16)
    parts: list[PcmArray] = []
    for text in SENTENCES:
        parts += [read_pcm(speech_wav(text))[0], gap]
    return np.concatenate(parts), " ".join(SENTENCES)


async def run(engine: CpuEngine, pcm: PcmArray, pace: bool) -> tuple[float, float, str]:
    """(wall seconds, lag after the last sample, words)."""
    stream = engine.open("bench")
    start = time.perf_counter()
    frame = ENGINE_RATE // 50
    for i in range(0, len(pcm), frame):
        if pace:
            delay = start + i / ENGINE_RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stream.push(pcm[i : i + frame])
        else:
            await stream.write(pcm[i : i + frame])
    audio_done = time.perf_counter()
    stream.close()
    words = []
    async for event in stream.events():
        if isinstance(event, Word):
            words.append(event.text)
        if isinstance(event, Closed):
            break
    end = time.perf_counter()
    return end - start, end - audio_done, " ".join(words)


async def main(workers: int) -> None:
    pcm, text = call_audio()
    seconds = len(pcm) / ENGINE_RATE
    engine = CpuEngine(capacity=64, workers=workers)
    await engine.start()
    print(
        f"CPU engine, {workers} decoder processes, {os.cpu_count()} cores; "
        f"call audio {seconds:.1f} s (hibari test sentences)\n"
    )

    wall, _, words = await run(engine, pcm, pace=False)
    print(
        f"one stream as fast as possible: RTF {wall / seconds:.3f} "
        f"({seconds / wall:.1f}x real time), WER {word_error_rate(text, words):.2f}\n"
    )

    print("| streams | audio s / wall s (= real-time streams held) |")
    print("|---------|----------------------------------------------|")
    for k in (1, 2, 4, 8):
        start = time.perf_counter()
        await asyncio.gather(*(run(engine, pcm, pace=False) for _ in range(k)))
        print(f"| {k:>7} | {k * seconds / (time.perf_counter() - start):>44.1f} |")

    print("\n| real-time streams | lag to last word p50 (s) | max (s) | keeps up |")
    print("|-------------------|--------------------------|---------|----------|")
    for k in (4, 8, 16, 24):
        results = await asyncio.gather(*(run(engine, pcm, pace=True) for _ in range(k)))
        lags = [lag for _, lag, _ in results]
        ok = max(lags) < 3.0
        print(
            f"| {k:>17} | {statistics.median(lags):>24.2f} | {max(lags):>7.2f} | "
            f"{'yes' if ok else 'no':>8} |"
        )
        if not ok:
            break
    await engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="decoder processes")
    asyncio.run(main(parser.parse_args().workers))
