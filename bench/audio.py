"""Cost of the audio path: wire decode + resample to the engine's rate, per second of audio.

Feeds 20 ms frames (as a phone does) through telephony.audio.AudioDecoder for each encoding
and rate, on one core, and prints a table: microseconds per second of audio, and how many
real-time calls one core could convert at that cost.

    python bench/audio.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # before bench/ (engine.py)

from telephony.audio import AudioDecoder, Encoding, alaw_encode, pcm16_encode, ulaw_encode

CASES = [
    (Encoding.MULAW, 8000),
    (Encoding.ALAW, 8000),
    (Encoding.PCM16, 8000),
    (Encoding.PCM16, 16000),
    (Encoding.PCM16, 24000),
    (Encoding.PCM16, 48000),
]


def wire_audio(encoding: Encoding, rate: int, seconds: float) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(0)
    pcm = (np.sin(2 * np.pi * 300 * t) * 6000 + rng.normal(0, 800, len(t))).astype(np.int16)
    if encoding is Encoding.MULAW:
        return ulaw_encode(pcm)
    if encoding is Encoding.ALAW:
        return alaw_encode(pcm)
    return pcm16_encode(pcm)


def measure(encoding: Encoding, rate: int, engine_rate: int, seconds: float) -> float:
    """Seconds of CPU per second of audio."""
    data = wire_audio(encoding, rate, seconds)
    frame = rate // 50 * encoding.bytes_per_sample  # 20 ms
    decoder = AudioDecoder(encoding, rate, engine_rate)
    start = time.process_time()
    for i in range(0, len(data), frame):
        decoder.feed(data[i : i + frame])
    decoder.flush()
    return (time.process_time() - start) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per case")
    parser.add_argument(
        "--engine-rate",
        type=int,
        nargs="+",
        default=[16000, 24000],
        help="engine input rates (Moonshine 16000, Kyutai 24000)",
    )
    args = parser.parse_args()
    print(
        f"audio path: 20 ms frames → engine-rate int16, {args.seconds:.0f} s per case, one core\n"
    )
    print(
        f"| {'encoding':<8} | {'rate':>6} | {'engine':>6} | {'µs per s of audio':>17} "
        f"| {'calls per core':>14} |"
    )
    print(f"|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 19}|{'-' * 16}|")
    for engine_rate in args.engine_rate:
        for encoding, rate in CASES:
            cost = min(measure(encoding, rate, engine_rate, args.seconds) for _ in range(3))
            print(
                f"| {encoding.value:<8} | {rate:>6} | {engine_rate:>6} | {cost * 1e6:>17.0f} "
                f"| {1 / cost:>14.0f} |"
            )


if __name__ == "__main__":
    main()
