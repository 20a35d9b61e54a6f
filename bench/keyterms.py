"""Keyterms and word confidence on the CPU engine (Moonshine base-en), through the phone path.

    python bench/keyterms.py              # every table below (about 2-3 minutes on 2 cores)
    python bench/keyterms.py rare controls wer cost confidence   # some of them

Speech: hibari-tts through 8 kHz μ-law (bench/cpu_engine.py `phone_audio`). rare, controls
and wer go through the engine as a call does (VAD, utterances, finals; `engine.open(...,
keyterms=...)`); cost and confidence time `MoonshineModel.decode`, which the finals call.
- rare: sentences with names, drugs, products and streets made for this (RARE); a rare word is
  right when its words appear in the transcript (case and punctuation aside), without and
  with the sentence's own keyterms.
- controls: the call-centre set (no rare word) with every rare keyterm boosted: how often a
  term appears that was not said (false insertions), and words changed.
- wer: the call-centre set, clean and noisy, with 20 unrelated keyterms against none.
- cost: decode time with 0, 20 and 100 keyterms; the softmax for confidence per token.
- confidence: a noisy set (10 dB and 3 dB SNR); each transcript word marked right or wrong by
  aligning it to the reference; how often words are wrong per confidence band, for three ways
  of combining a word's token probabilities (min, mean, geometric mean).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_engine import CALL_CENTRE, VOICES, phone_audio
from engine.base import Segment
from engine.confidence import Combine, word_confidences
from engine.keyterm_bias import KeytermBias, KeytermIndex
from engine.moonshine import MoonshineEngine
from engine.moonshine_model import (
    FIRST_TEXT_TOKEN,
    SAMPLE_RATE,
    MoonshineModel,
    Transcript,
    token_probability,
)
from telephony.audio import PcmArray, resample_whole, ulaw_decode, ulaw_encode
from tests.conftest import MODEL_CACHE
from tests.speech import (
    normalize,
    read_pcm,
    sox_convert,
    speech_wav,
    word_error_rate,
    words_right,
)

# (sentence, its rare words): made-up or rare names, drugs, products and streets
RARE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Please take your Xarelto twice a day with food.", ("Xarelto",)),
    ("My name is Siobhan Nguyen and I am calling about my order.", ("Siobhan Nguyen",)),
    ("The new Zyntrix router keeps dropping the connection.", ("Zyntrix",)),
    ("I live at forty two Brannock Street.", ("Brannock Street",)),
    ("My doctor prescribed Ozempic last month.", ("Ozempic",)),
    ("I bought the Quillon speaker from your store.", ("Quillon",)),
    ("The pharmacy switched me to Eliquis last week.", ("Eliquis",)),
    ("Our Veltrana plan includes unlimited calls.", ("Veltrana",)),
    ("I am calling for my father, Rhiannon Okafor.", ("Rhiannon Okafor",)),
    ("The Corvexa app will not let me log in.", ("Corvexa",)),
    ("Is the Lumora heater still under warranty?", ("Lumora",)),
    ("He takes Brilinta after his heart surgery.", ("Brilinta",)),
    ("Deliver it to Farquhar Road by Friday.", ("Farquhar Road",)),
    ("My account is under Priyanka Venkataraman.", ("Priyanka Venkataraman",)),
    ("Please reset my Nexilo password.", ("Nexilo",)),
    ("The Tremfya injection arrived damaged.", ("Tremfya",)),
)
RARE_TERMS: tuple[str, ...] = tuple(t for _, terms in RARE for t in terms)
# Twenty terms none of the call-centre sentences says
UNRELATED_20: tuple[str, ...] = (*RARE_TERMS, "Kestrel Avenue", "Norvana", "Dupixent", "Obinna")
SYLLABLES = ("ka", "zor", "vel", "tri", "mon", "qua", "rix", "len", "dra", "phi", "sto", "ny")


def hundred_terms() -> tuple[str, ...]:
    """100 made-up product names (the per-stream limit), for the worst-case cost."""
    rng = np.random.default_rng(7)
    return tuple("".join(rng.choice(SYLLABLES, size=3)).capitalize() + f" {n}" for n in range(100))


def noisy_audio(text: str, voice: str, snr_db: float, seed: int) -> PcmArray:
    """Band-passed phone speech with white noise at `snr_db`, through μ-law, at 16 kHz."""
    wav = sox_convert(
        speech_wav(text),
        "-r",
        "8000",
        "-c",
        "1",
        "-b",
        "16",
        effects=(*VOICES[voice], "sinc", "300-3400"),
    )
    pcm, _ = read_pcm(wav)
    x = pcm.astype(np.float64)
    noise = np.random.default_rng(seed).standard_normal(len(x))
    x += noise * np.sqrt(np.mean(x**2) / 10 ** (snr_db / 10))
    pcm = np.clip(x, -32768, 32767).astype(np.int16)
    return resample_whole(ulaw_decode(ulaw_encode(pcm)), 8000, SAMPLE_RATE)


def as_float(pcm: PcmArray) -> npt.NDArray[np.float32]:
    return pcm.astype(np.float32) / 32768.0


def says(text: str, term: str) -> bool:
    """Whether the words of `term` appear in `text` in a row (case, punctuation aside)."""
    words, wanted = normalize(text), normalize(term)
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words)))


def decode(
    model: MoonshineModel, pcm: PcmArray, index: KeytermIndex | None
) -> tuple[Transcript, float]:
    began = time.perf_counter()
    transcript = model.decode(as_float(pcm), index)
    return transcript, time.perf_counter() - began


async def engine_text(engine: MoonshineEngine, pcm: PcmArray, terms: tuple[str, ...]) -> str:
    """The finals of `pcm` through an engine stream with `terms` as its keyterms."""
    stream = engine.open("bench", keyterms=terms)
    quiet = np.zeros(SAMPLE_RATE // 2, dtype=np.int16)
    await stream.write(np.concatenate([quiet, pcm, quiet, quiet]))
    stream.close()
    return " ".join([e.text async for e in stream.events() if isinstance(e, Segment)])


async def rare(engine: MoonshineEngine) -> None:
    print("## Rare words through 8 kHz μ-law, right without and with keyterms\n")
    print("(own: the sentence's own term; all: every rare term at once, competing)\n")
    print(
        f"| {'voice':<7} | {'rare words':>10} | {'right, none':>11} "
        f"| {'right, own':>10} | {'right, all':>10} |"
    )
    print(f"|{'-' * 9}|{'-' * 12}|{'-' * 13}|{'-' * 12}|{'-' * 12}|")
    examples: list[str] = []
    for voice in ("hibari", "lower"):
        total = right_without = right_own = right_all = 0
        for n, (text, terms) in enumerate(RARE):
            pcm = phone_audio(text, voice, "1.0x", False, seed=n)
            plain = await engine_text(engine, pcm, ())
            own = await engine_text(engine, pcm, terms)
            competing = await engine_text(engine, pcm, RARE_TERMS)
            for term in terms:
                total += 1
                right_without += says(plain, term)
                right_own += says(own, term)
                right_all += says(competing, term)
            if voice == "hibari":
                examples.append(f"  {plain!r} -> {own!r} / {competing!r}")
        print(
            f"| {voice:<7} | {total:>10} | {right_without:>11} | {right_own:>10} "
            f"| {right_all:>10} |"
        )
    print("\nhibari, without -> own term / all terms:\n" + "\n".join(examples) + "\n")


async def controls(engine: MoonshineEngine) -> None:
    print(f"## Controls: call-centre sentences with all {len(RARE_TERMS)} rare terms boosted\n")
    print(f"| {'set':<12} | {'sentences':>9} | {'false insertions':>16} | {'changed':>7} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 18}|{'-' * 9}|")
    for label, noisy in (("clean", False), ("noisy 10 dB", True)):
        inserted = changed = 0
        for n, text in enumerate(CALL_CENTRE):
            pcm = phone_audio(text, "hibari", "1.0x", noisy, seed=n)
            plain = await engine_text(engine, pcm, ())
            biased = await engine_text(engine, pcm, RARE_TERMS)
            inserted += sum(says(biased, t) and not says(text, t) for t in RARE_TERMS)
            if normalize(plain) != normalize(biased):
                changed += 1
                print(f"  changed: {plain!r} -> {biased!r}")
        print(f"| {label:<12} | {len(CALL_CENTRE):>9} | {inserted:>16} | {changed:>7} |")
    print()


async def wer(engine: MoonshineEngine) -> None:
    print("## WER of the call-centre set (hibari, 1.0x), 20 unrelated keyterms vs none\n")
    print(f"| {'set':<12} | {'words':>5} | {'WER, none':>9} | {'WER, 20 keyterms':>16} |")
    print(f"|{'-' * 14}|{'-' * 7}|{'-' * 11}|{'-' * 18}|")
    for label, noisy in (("clean", False), ("noisy 10 dB", True)):
        words = wrong_plain = wrong_biased = 0
        for n, text in enumerate(CALL_CENTRE):
            pcm = phone_audio(text, "hibari", "1.0x", noisy, seed=n)
            count = len(normalize(text))
            words += count
            plain = await engine_text(engine, pcm, ())
            biased = await engine_text(engine, pcm, UNRELATED_20)
            wrong_plain += round(word_error_rate(text, plain) * count)
            wrong_biased += round(word_error_rate(text, biased) * count)
        print(
            f"| {label:<12} | {words:>5} | {wrong_plain / words:>9.3f} "
            f"| {wrong_biased / words:>16.3f} |"
        )
    print()


async def cost(engine: MoonshineEngine) -> None:
    model = engine_model(engine)
    print("## Decode cost (call-centre set, hibari, clean; one thread)\n")
    audio = [phone_audio(t, "hibari", "1.0x", False, seed=n) for n, t in enumerate(CALL_CENTRE)]
    seconds = sum(len(a) for a in audio) / SAMPLE_RATE
    lists = {"none": (), "20": UNRELATED_20, "100": hundred_terms()}
    indexes: dict[str, KeytermIndex | None] = {}
    builds: dict[str, float] = {}
    for label, terms in lists.items():
        began = time.perf_counter()
        indexes[label] = KeytermIndex(model.vocabulary, terms, FIRST_TEXT_TOKEN) if terms else None
        builds[label] = (time.perf_counter() - began) * 1000
    # Time inside the bias itself, apart from the decoder (whose time the other processes on
    # the machine make vary more than the bias costs).
    in_bias = [0.0]
    choose = KeytermBias.choose

    def timed(self: KeytermBias, logits: npt.NDArray[np.float32]) -> int:
        began = time.perf_counter()
        token = choose(self, logits)
        in_bias[0] += time.perf_counter() - began
        return token

    KeytermBias.choose = timed  # type: ignore[method-assign]
    best: dict[str, list[float]] = {label: [float("inf")] * len(audio) for label in lists}
    bias_s = dict.fromkeys(lists, 0.0)
    steps = 0
    try:
        for run in range(3):  # interleaved, the fastest of three per sentence
            for n, pcm in enumerate(audio):
                for label, index in indexes.items():
                    in_bias[0] = 0.0
                    transcript, took = decode(model, pcm, index)
                    best[label][n] = min(best[label][n], took)
                    if run == 0:
                        bias_s[label] += in_bias[0]
                        steps += (len(transcript.pieces) + 1) * (label == "none")
    finally:
        KeytermBias.choose = choose  # type: ignore[method-assign]
    print(
        f"| {'keyterms':<8} | {'decode ms per audio s':>21} | {'in the bias, ms per audio s':>27} "
        f"| {'index build ms':>14} |"
    )
    print(f"|{'-' * 10}|{'-' * 23}|{'-' * 29}|{'-' * 16}|")
    for label in lists:
        print(
            f"| {label:<8} | {sum(best[label]) / seconds * 1000:>21.1f} "
            f"| {bias_s[label] / seconds * 1000:>27.2f} | {builds[label]:>14.1f} |"
        )
    logits = np.random.default_rng(0).standard_normal(len(model.vocabulary)).astype(np.float32)
    began = time.perf_counter()
    for _ in range(2000):
        token_probability(logits, 5)
    per_token = (time.perf_counter() - began) / 2000 * 1e6
    per_audio_s = per_token * steps / seconds / 1000  # ms of softmax per second of audio
    decode_ms = sum(best["none"]) / seconds * 1000
    print(
        f"\nconfidence: the softmax for one token's probability takes {per_token:.0f} µs; "
        f"{steps / seconds:.1f} tokens per second of audio make {per_audio_s:.2f} ms per "
        f"second of audio, {per_audio_s / decode_ms:.2%} of the decode\n"
    )


async def confidence(engine: MoonshineEngine) -> None:
    model = engine_model(engine)
    how: tuple[Combine, ...] = ("min", "mean", "geometric")
    marked: dict[Combine, list[tuple[float, bool]]] = {h: [] for h in how}
    for snr in (10.0, 3.0):
        for voice in VOICES:
            for n, text in enumerate(CALL_CENTRE):
                transcript, _ = decode(model, noisy_audio(text, voice, snr, seed=n), None)
                words = transcript.text.split()
                right = words_right(text, words)
                for h in how:
                    scores = word_confidences(transcript.pieces, transcript.probabilities, h)
                    marked[h].extend(zip(scores, right, strict=True))
    count = len(marked["min"])
    wrong = sum(not ok for _, ok in marked["min"])
    print(
        f"## Confidence on a noisy set: 16 sentences x 3 voices x (10 dB, 3 dB SNR), "
        f"{count} words, {wrong} wrong\n"
    )
    print(f"| {'word score':<10} | {'band':<8} | {'words':>5} | {'wrong':>5} | {'wrong %':>7} |")
    print(f"|{'-' * 12}|{'-' * 10}|{'-' * 7}|{'-' * 7}|{'-' * 9}|")
    for h in how:
        for label, low, high in (("< 0.5", 0.0, 0.5), ("0.5-0.9", 0.5, 0.9), ("> 0.9", 0.9, 1.1)):
            band = [ok for c, ok in marked[h] if low <= c < high]
            errs = sum(not ok for ok in band)
            share = f"{errs / len(band):.0%}" if band else "-"
            print(f"| {h:<10} | {label:<8} | {len(band):>5} | {errs:>5} | {share:>7} |")
    print(f"\n| {'word score':<10} | {'mean, right':>11} | {'mean, wrong':>11} | {'AUC':>5} |")
    print(f"|{'-' * 12}|{'-' * 13}|{'-' * 13}|{'-' * 7}|")
    for h in how:
        good = [c for c, ok in marked[h] if ok]
        bad = [c for c, ok in marked[h] if not ok]
        # AUC: the chance a right word scores above a wrong one (ties count half)
        pairs = sum((g > b) + 0.5 * (g == b) for g in good for b in bad)
        auc = pairs / max(1, len(good) * len(bad))
        print(
            f"| {h:<10} | {statistics.fmean(good):>11.3f} "
            f"| {statistics.fmean(bad) if bad else float('nan'):>11.3f} | {auc:>5.3f} |"
        )
    print()


def engine_model(engine: MoonshineEngine) -> MoonshineModel:
    assert engine.model is not None
    return engine.model


async def run(tables: list[str]) -> None:
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=4, partial_interval_s=0)
    await engine.start()
    steps = {"rare": rare, "controls": controls, "wer": wer, "cost": cost}
    try:
        for table in tables:
            await {**steps, "confidence": confidence}[table](engine)
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    tables = ["rare", "controls", "wer", "cost", "confidence"]
    parser.add_argument("tables", nargs="*", help=f"any of {', '.join(tables)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.tables) - set(tables)
    if unknown:
        parser.error(f"unknown table(s): {', '.join(sorted(unknown))}")
    asyncio.run(run(args.tables or tables))


if __name__ == "__main__":
    main()
