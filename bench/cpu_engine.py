"""The CPU engine (Moonshine base-en + Silero VAD), measured the way a contact centre uses it.

    python bench/cpu_engine.py wer        # WER on 8 kHz μ-law phone speech, PocketSphinx beside
    python bench/cpu_engine.py rtf        # real-time factor per core, with and without partials
    python bench/cpu_engine.py realtime --streams 4 8 12 16   # concurrent real-time callers
    python bench/cpu_engine.py realtime --streams 24 --talk 0.5 --partials 1   # callers who pause
    python bench/cpu_engine.py memory     # resident size with 1 and with 8 streams
    python bench/cpu_engine.py cost       # CPU per talking caller, decodes from scratch vs. reused
    python bench/cpu_engine.py --precision float32 realtime   # the decoder as shipped (not int8)

Speech: 16 call-centre sentences by hibari-tts (its one voice, plus two pitch-shifted
"voices" made with sox), at three speeds, through 8 kHz μ-law, clean and with a 300-3400 Hz
band-pass plus white noise at 10 dB SNR. WER: lower-cased words without punctuation, numbers
as digits and each digit its own word (tests/speech.py `normalize`), over all words of a set.
PocketSphinx is measured where it is installed (`pip install pocketsphinx`), on the same audio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.base import Partial, Segment
from engine.config import PRECISIONS
from engine.moonshine import TARGET_LOAD, MoonshineEngine, MoonshineStream
from telephony.audio import PcmArray, resample_whole, ulaw_decode, ulaw_encode
from tests.conftest import MODEL_CACHE
from tests.speech import (
    SENTENCES,
    normalize,
    read_pcm,
    sox_convert,
    speech_wav,
    word_error_rate,
)

RATE = 16000
CALL_CENTRE = (
    *SENTENCES,  # the tests' six, then ten more with numbers, an address and a date
    "My zip code is three zero three one nine.",
    "I was charged twice for the same order on my credit card.",
    "Could you give me the tracking number for my package?",
    "I live at twelve Oak Street, apartment four.",
    "My date of birth is the fifth of March nineteen eighty two.",
    "The internet has been down since yesterday morning.",
    "I need to update the email address on my account.",
    "Is there a fee for changing my flight to Friday?",
    "Please send the invoice to my office instead of my home.",
    "Can I speak to a supervisor about this complaint?",
)
VOICES = {"hibari": (), "lower": ("pitch", "-250"), "higher": ("pitch", "250")}
SPEEDS = {"0.9x": ("tempo", "0.9"), "1.0x": (), "1.2x": ("tempo", "1.2")}


def phone_audio(text: str, voice: str, speed: str, noisy: bool, seed: int) -> PcmArray:
    """`text` as a phone line carries it (8 kHz μ-law), decoded and resampled to 16 kHz."""
    effects = (*VOICES[voice], *SPEEDS[speed])
    if noisy:
        effects = (*effects, "sinc", "300-3400")
    wav = sox_convert(speech_wav(text), "-r", "8000", "-c", "1", "-b", "16", effects=effects)
    pcm, _ = read_pcm(wav)
    if noisy:
        x = pcm.astype(np.float64)
        noise = np.random.default_rng(seed).standard_normal(len(x))
        x += noise * np.sqrt(np.mean(x**2) / 10.0)  # 10 dB SNR
        pcm = np.clip(x, -32768, 32767).astype(np.int16)
    return resample_whole(ulaw_decode(ulaw_encode(pcm)), 8000, RATE)


async def start(
    args: argparse.Namespace, partial_interval_s: float = 0.0, capacity: int = 64
) -> MoonshineEngine:
    engine = MoonshineEngine(
        cache_dir=MODEL_CACHE,
        capacity=capacity,
        partial_interval_s=partial_interval_s,
        precision=args.precision,
    )
    await engine.start()
    return engine


async def transcribe(engine: MoonshineEngine, pcm: PcmArray) -> str:
    stream = engine.open("bench")
    lead = np.zeros(RATE // 4, dtype=np.int16)
    await stream.write(np.concatenate([lead, pcm, np.zeros(RATE, dtype=np.int16)]))
    stream.close()
    return " ".join([e.text async for e in stream.events() if isinstance(e, Segment)])


def errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Word errors and reference words (so sets are scored over all their words)."""
    words = len(normalize(reference))
    return round(word_error_rate(reference, hypothesis) * words), words


def pocketsphinx_decoder() -> object | None:
    try:
        from pocketsphinx import Decoder
    except ImportError:
        return None
    return Decoder()


def sphinx_text(decoder: object, pcm: PcmArray) -> str:
    decoder.start_utt()  # type: ignore[attr-defined]
    decoder.process_raw(pcm.tobytes(), full_utt=True)  # type: ignore[attr-defined]
    decoder.end_utt()  # type: ignore[attr-defined]
    hyp = decoder.hyp()  # type: ignore[attr-defined]
    return str(hyp.hypstr) if hyp is not None else ""


async def wer(args: argparse.Namespace) -> None:
    engine = await start(args)
    sphinx = pocketsphinx_decoder()
    totals: dict[tuple[str, str], list[int]] = {}
    for noisy in (False, True):
        for voice in VOICES:
            for speed in SPEEDS:
                cell = "noisy" if noisy else "clean"
                for n, text in enumerate(CALL_CENTRE):
                    pcm = phone_audio(text, voice, speed, noisy, seed=n)
                    for name, hypothesis in (
                        ("moonshine", await transcribe(engine, pcm)),
                        ("pocketsphinx", sphinx_text(sphinx, pcm) if sphinx else None),
                    ):
                        if hypothesis is None:
                            continue
                        wrong, count = errors(text, hypothesis)
                        for key in ((name, cell), (name, f"{cell} {voice} {speed}")):
                            total = totals.setdefault(key, [0, 0])
                            total[0] += wrong
                            total[1] += count
    await engine.stop()
    print("WER on 8 kHz μ-law call-centre speech (16 sentences per cell)\n")
    print(f"| {'set':<24} | {'moonshine':>9} | {'pocketsphinx':>12} |")
    print(f"|{'-' * 26}|{'-' * 11}|{'-' * 14}|")
    cells = sorted({cell for _, cell in totals}, key=lambda c: (len(c.split()), c))
    for cell in cells:
        row = []
        for name in ("moonshine", "pocketsphinx"):
            wrong, count = totals.get((name, cell), [0, 0])
            row.append(f"{wrong / count:.3f}" if count else "n/a")
        print(f"| {cell:<24} | {row[0]:>9} | {row[1]:>12} |")


def call_audio(first: int = 0, talk: float = 0.0) -> tuple[PcmArray, int]:
    """A caller: eight sentences, 1.2 s apart, starting at sentence `first` (so that callers
    do not all pause at once); and how many utterances that is. `talk` (0 < talk < 1): the
    pause after each sentence makes the caller speak that share of the time instead."""
    parts: list[PcmArray] = [np.zeros(int(1.2 * RATE), dtype=np.int16)]
    for k in range(8):
        n = (first + k) % 8
        speech = phone_audio(CALL_CENTRE[n], "hibari", "1.0x", False, seed=n)
        pause = len(speech) * (1 - talk) / talk if talk else 1.2 * RATE
        parts += [speech, np.zeros(int(pause), dtype=np.int16)]
    return np.concatenate(parts), 8


async def rtf(args: argparse.Namespace) -> None:
    pcm, _ = call_audio()
    seconds = len(pcm) / RATE
    print(
        f"real-time factor, one stream fed in 20 ms frames at 4x real time ({seconds:.0f} s "
        "of a call: partials need a stream that is not behind)\n"
    )
    print(f"| {'partials':<10} | {'CPU s per audio s':>17} | {'partials':>8} |")
    print(f"|{'-' * 12}|{'-' * 19}|{'-' * 10}|")
    for interval in (0.0, 1.0):
        engine = await start(args, partial_interval_s=interval)
        stream = engine.open("rtf")
        cpu, wall = time.process_time(), time.perf_counter()
        frame = RATE // 50
        for i, at in enumerate(range(0, len(pcm), frame)):
            stream.push(pcm[at : at + frame])
            delay = wall + (i + 1) * 0.005 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        stream.close()
        count_partials = sum([isinstance(e, Partial) async for e in stream.events()])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await engine.stop()
        label = f"every {interval:.0f} s" if interval else "off"
        print(f"| {label:<10} | {cpu / seconds:>17.3f} | {count_partials:>8} |")


async def realtime(args: argparse.Namespace) -> None:
    pcm, _ = call_audio(talk=args.talk)
    print(
        f"concurrent callers in real time (20 ms frames), {len(pcm) / RATE:.0f} s each, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; "
        "latency: end of the last word (its time) → the segment; partials per 2 s of speech "
        "(mean over callers, and the fewest any caller got); CPU: this process; VAD batch: "
        "windows judged per Silero call (streams whose audio waited together)\n"
    )
    print(
        f"| {'streams':>7} | {'partials':<8} | {'final p50':>9} | {'final p95':>9} "
        f"| {'final p99':>9} | {'> 1 s':>6} | {'part./2 s':>9} | {'fewest':>6} | {'CPU %':>6} "
        f"| {'VAD batch':>9} |"
    )
    print("|" + "|".join("-" * n for n in (9, 10, 11, 11, 11, 8, 11, 8, 8, 11)) + "|")
    intervals = {"both": (0.0, 1.0), "0": (0.0,), "1": (1.0,)}[args.partials]
    for interval in intervals:
        for count in args.streams:
            engine = await start(args, partial_interval_s=interval, capacity=count)
            latencies, partials, speech_s = await _callers(engine, count, args.talk)
            assert engine.vad_thread is not None
            vad_batch = engine.vad_thread.windows / max(1, engine.vad_thread.calls)
            await engine.stop()
            cpu = _cpu_share()
            late = sum(x > 1.0 for x in latencies) / max(1, len(latencies))
            nan = float("nan")
            p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if latencies else (nan,) * 3
            rates = [2 * n / speech_s for n in partials]
            print(
                f"| {count:>7} | {'1 s' if interval else 'off':<8} | {p50:>8.2f}s | {p95:>8.2f}s "
                f"| {p99:>8.2f}s | {late:>6.1%} | {np.mean(rates):>9.2f} | {min(rates):>6.2f} "
                f"| {cpu:>5.0f}% | {vad_batch:>9.1f} |"
            )


_last_cpu = [time.process_time(), time.perf_counter()]


def _cpu_share() -> float:
    cpu, wall = time.process_time(), time.perf_counter()
    share = (cpu - _last_cpu[0]) / max(1e-9, wall - _last_cpu[1]) * 100
    _last_cpu[:] = [cpu, wall]
    return share


async def _callers(
    engine: MoonshineEngine, count: int, talk: float = 0.0
) -> tuple[list[float], list[int], float]:
    """`count` callers, each a 20 ms frame every 20 ms from one timer (as a phone system's
    media server would send them): the finals' latencies, each caller's partials, and the
    seconds of speech per caller.

    Callers are not in step: caller n starts n/count of a sentence's cycle later than the
    first (as tests/engine/test_moonshine_capacity.py's do), so their sentences end at their
    own moments. In step, every caller's last sentence ended in the same 20 ms (their audio is
    the same eight sentences and pauses, rotated), and a tenth of the finals at 24 callers was
    that one mass end (bench/load.py --mass-start measures the mass start)."""
    frame = RATE // 50
    latencies: list[float] = []
    partials = [0] * count
    streams = [engine.open(f"caller-{n}") for n in range(count)]
    cycle = len(call_audio(talk=talk)[0]) / 8  # a sentence and its pause, on average
    audio = [  # each from another sentence, after its own lead
        np.concatenate([np.zeros(int(n * cycle / count), np.int16), call_audio(n, talk)[0]])
        for n in range(count)
    ]
    audio = [np.pad(pcm, (0, max(map(len, audio)) - len(pcm))) for pcm in audio]
    speech_s = (
        sum(len(phone_audio(CALL_CENTRE[n], "hibari", "1.0x", False, seed=n)) for n in range(8))
        / RATE
    )
    length = len(audio[0])
    began = time.perf_counter() + 0.2
    _cpu_share()

    async def read(n: int, stream: MoonshineStream) -> None:
        async for event in stream.events():
            if isinstance(event, Segment):  # its last word's end: where the speech stopped
                latencies.append(time.perf_counter() - (began + event.end_s))
            elif isinstance(event, Partial):
                partials[n] += 1

    readers = [asyncio.create_task(read(n, stream)) for n, stream in enumerate(streams)]
    for i, at in enumerate(range(0, length, frame)):
        delay = began + (i + 1) * 0.02 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        for stream, pcm in zip(streams, audio, strict=True):
            stream.push(pcm[at : at + frame])
    for stream in streams:
        stream.close()
    await asyncio.gather(*readers)
    return latencies, partials, speech_s


async def cost(args: argparse.Namespace) -> None:
    """The decodes of a caller who talks without stopping, as the engine schedules them (a
    partial every second of each sentence, then its final), timed in CPU seconds of this
    process: each decode from scratch, and each reading the last one's tokens (the engine's
    way now). CPU time, not wall time, so a machine shared with other work measures the same."""
    from engine.moonshine_model import load

    model = load("", MODEL_CACHE, args.precision)
    sentences = [
        (phone_audio(CALL_CENTRE[n], "hibari", "1.0x", False, seed=n) / 32768).astype(np.float32)
        for n in range(len(CALL_CENTRE))
    ]
    pause = np.zeros(RATE // 5, dtype=np.float32)  # the 0.2 s an utterance starts before speech
    call_s = sum(len(x) / RATE + 1.2 for x in sentences)  # 1.2 s between sentences
    model.decode(sentences[0])  # warm up
    print(
        f"CPU per second of a talking caller ({len(sentences)} sentences, 1.2 s apart, "
        f"{call_s:.0f} s), partials every {args.every:.1f} s of speech; load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    streams = f"streams on 2 cores at {TARGET_LOAD:.0%}"
    print(f"| {'decodes':<22} | {'CPU s / call s':>14} | {streams:>26} |")
    print(f"|{'-' * 24}|{'-' * 16}|{'-' * 28}|")
    finals: dict[bool, list[tuple[int, ...]]] = {}
    for reuse in (False, True, False, True):
        finals[reuse] = []
        cpu = time.process_time()
        for speech in sentences:
            audio = np.concatenate([pause, speech, pause])
            draft: tuple[int, ...] = ()
            step = int(args.every * RATE)
            for end in range(step, len(audio), step) if step else ():
                draft = model.decode(audio[:end], draft=draft if reuse else ()).tokens
            finals[reuse].append(model.decode(audio, draft=draft if reuse else ()).tokens)
        share = (time.process_time() - cpu) / call_s
        label = "from the last's tokens" if reuse else "each from scratch"
        print(f"| {label:<22} | {share:>14.3f} | {2 * TARGET_LOAD / share:>26.1f} |")
    same = sum(a == b for a, b in zip(finals[False], finals[True], strict=True))
    print(f"\nfinals with the same tokens both ways: {same} of {len(sentences)}")
    for a, b in zip(finals[False], finals[True], strict=True):
        if a != b:
            print(f"  from scratch: {model.detokenize(list(a))!r}")
            print(f"  reused:       {model.detokenize(list(b))!r}")


async def memory(args: argparse.Namespace) -> None:
    pcm, _ = call_audio()
    base = _rss_mb()
    engine = await start(args, partial_interval_s=1.0, capacity=8)
    loaded = _rss_mb()
    print("resident memory (MB)\n")
    print(f"| {'state':<28} | {'RSS MB':>7} |\n|{'-' * 30}|{'-' * 9}|")
    print(f"| {'before the engine':<28} | {base:>7.0f} |")
    print(f"| {'model loaded, no stream':<28} | {loaded:>7.0f} |")
    for count in (1, 8):
        streams = [engine.open(f"m{n}") for n in range(count)]
        for stream in streams:
            await stream.write(pcm[: 20 * RATE])
        await asyncio.sleep(2)
        print(f"| {f'{count} stream(s), 20 s each':<28} | {_rss_mb():>7.0f} |")
        for stream in streams:
            stream.close()
            async for _ in stream.events():
                pass
    await engine.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {'peak':<28} | {peak:>7.0f} |")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="int8", help="the model's (engine.precision)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("wer")
    sub.add_parser("rtf")
    rt = sub.add_parser("realtime")
    rt.add_argument("--streams", type=int, nargs="+", default=[4, 8, 12])
    rt.add_argument(
        "--talk", type=float, default=0.0, help="share of time spoken (0: 1.2 s pauses)"
    )
    rt.add_argument("--partials", choices=("both", "0", "1"), default="both")
    sub.add_parser("memory")
    co = sub.add_parser("cost")
    co.add_argument("--every", type=float, default=1.0, help="partials every ... s (0: none)")
    args = parser.parse_args()
    commands = {"wer": wer, "rtf": rtf, "realtime": realtime, "memory": memory, "cost": cost}
    run = commands[args.command]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
