"""Keyterms and word confidence on the Moonshine engine, on real speech through 8 kHz μ-law.

Rare words are checked without and with keyterms in the same test, so a test cannot pass on a
word the model already knew; bench/keyterms.py measures the same things on more sentences.
"""

from __future__ import annotations

import asyncio
import statistics

import numpy as np
import pytest

from engine.base import EngineEvent, Partial, Segment, Word
from engine.moonshine import MoonshineEngine
from telephony.audio import PcmArray, resample_whole, ulaw_decode, ulaw_encode
from tests.conftest import MODEL_CACHE
from tests.speech import (
    SENTENCES,
    normalize,
    phone_bytes,
    read_pcm,
    sox_convert,
    speech_wav,
    word_error_rate,
    words_right,
)

RATE = 16000
# Rare words the model misspells through the phone path (measured: "quill and", "a liquis",
# "Berlinta", "Trimphia"), each with the keyterm that names it; all four are boosted at once.
RARE = (
    ("I bought the Quillon speaker from your store.", "Quillon"),
    ("The pharmacy switched me to Eliquis last week.", "Eliquis"),
    ("He takes Brilinta after his heart surgery.", "Brilinta"),
    ("The Tremfya injection arrived damaged.", "Tremfya"),
)
TERMS = tuple(term for _, term in RARE)


def phone_pcm(text: str) -> PcmArray:
    speech = resample_whole(ulaw_decode(phone_bytes(text)), 8000, RATE)
    quiet = np.zeros(RATE // 2, dtype=np.int16)
    return np.concatenate([quiet, speech, quiet, quiet])


def noisy_pcm(text: str, snr_db: float, seed: int) -> PcmArray:
    """Band-passed phone speech with white noise at `snr_db`, through μ-law, at 16 kHz."""
    wav = sox_convert(
        speech_wav(text), "-r", "8000", "-c", "1", "-b", "16", effects=("sinc", "300-3400")
    )
    pcm, _ = read_pcm(wav)
    x = np.concatenate([np.zeros(4000), pcm.astype(np.float64), np.zeros(8000)])
    power = np.mean(pcm.astype(np.float64) ** 2)
    x += np.random.default_rng(seed).standard_normal(len(x)) * np.sqrt(power / 10 ** (snr_db / 10))
    noisy = np.clip(x, -32768, 32767).astype(np.int16)
    return resample_whole(ulaw_decode(ulaw_encode(noisy)), 8000, RATE)


def says(text: str, term: str) -> bool:
    words, wanted = normalize(text), normalize(term)
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words)))


async def transcribe(
    engine: MoonshineEngine, pcm: PcmArray, keyterms: tuple[str, ...] = ()
) -> list[EngineEvent]:
    stream = engine.open("call", "caller", keyterms=keyterms)
    await stream.write(pcm)
    stream.close()
    return [event async for event in stream.events()]


def text_of(events: list[EngineEvent]) -> str:
    return " ".join(e.text for e in events if isinstance(e, Segment))


@pytest.fixture
async def engine() -> MoonshineEngine:
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=4, partial_interval_s=0)
    await engine.start()
    yield engine  # type: ignore[misc]
    await engine.stop()


async def test_rare_words_are_right_with_keyterms_and_not_without(
    engine: MoonshineEngine,
) -> None:
    for text, term in RARE:
        without = text_of(await transcribe(engine, phone_pcm(text)))
        with_terms = text_of(await transcribe(engine, phone_pcm(text), TERMS))
        assert not says(without, term), without  # the model alone gets it wrong
        assert says(with_terms, term), with_terms
        assert word_error_rate(text, with_terms) < word_error_rate(text, without), with_terms


async def test_server_wide_keyterms_apply_to_every_stream() -> None:
    engine = MoonshineEngine(
        cache_dir=MODEL_CACHE, capacity=1, partial_interval_s=0, keyterms=("Tremfya",)
    )
    await engine.start()
    try:
        text = text_of(await transcribe(engine, phone_pcm(RARE[3][0])))
    finally:
        await engine.stop()
    assert says(text, "Tremfya"), text


async def test_boosted_terms_are_not_put_where_they_were_not_said(
    engine: MoonshineEngine,
) -> None:
    for text in SENTENCES:
        plain = text_of(await transcribe(engine, phone_pcm(text)))
        boosted = text_of(await transcribe(engine, phone_pcm(text), TERMS))
        assert not [t for t in TERMS if says(boosted, t)], boosted
        assert normalize(boosted) == normalize(plain), boosted


async def partials_of(pcm: PcmArray, keyterms: tuple[str, ...]) -> list[str]:
    """The partials of `pcm` spoken in real time (20 ms frames), as a caller's."""
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=1, partial_interval_s=0.5)
    await engine.start()
    try:
        stream = engine.open("partials", keyterms=keyterms)
        for frame in np.split(pcm, range(320, len(pcm), 320)):
            stream.push(frame)
            await asyncio.sleep(0.02)
        stream.close()
        return [e.text async for e in stream.events() if isinstance(e, Partial)]
    finally:
        await engine.stop()


async def test_partials_use_the_keyterms_too() -> None:
    # The rare word, then more speech without a pause: the partials decoded after it hold it
    # in the middle of an utterance still going on.
    speech = [
        resample_whole(ulaw_decode(phone_bytes(text)), 8000, RATE)
        for text in (RARE[2][0], SENTENCES[1])
    ]
    pcm = np.concatenate([np.zeros(RATE // 2, dtype=np.int16), *speech])
    without = await partials_of(pcm, ())
    with_term = await partials_of(pcm, TERMS)
    assert len(without) >= 2 and not [p for p in without if says(p, "Brilinta")], without
    assert [p for p in with_term if says(p, "Brilinta")], with_term


async def test_wrong_words_have_lower_confidence_than_right_ones(
    engine: MoonshineEngine,
) -> None:
    right: list[float] = []
    wrong: list[float] = []
    for n, text in enumerate(SENTENCES):
        events = await transcribe(engine, noisy_pcm(text, snr_db=0.0, seed=n))
        words = [e for e in events if isinstance(e, Word)]
        for word, ok in zip(words, words_right(text, [w.text for w in words]), strict=True):
            assert word.confidence is not None and 0.0 <= word.confidence <= 1.0
            (right if ok else wrong).append(word.confidence)
        for segment in (e for e in events if isinstance(e, Segment)):
            assert segment.confidence == pytest.approx(
                statistics.fmean(w.confidence or 0.0 for w in segment.words), abs=1e-3
            )
    assert len(wrong) >= 5, (right, wrong)  # the noise makes the model err
    assert statistics.fmean(wrong) < statistics.fmean(right) - 0.2, (right, wrong)
