"""Keyterm bias and word confidence on the Kyutai engine: the mechanism, on the tiny
random-weight checkpoint (engine/random_checkpoint.py; its words mean nothing, but greedy
decoding makes them a deterministic fingerprint of what the model saw and chose)."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from engine.base import EngineEvent, Segment, Word
from engine.keyterm_bias import BiasSettings
from engine.kyutai import KyutaiEngine, KyutaiStream
from engine.random_checkpoint import write_checkpoint

pytestmark = pytest.mark.xdist_group("kyutai")

# Margins and boosts no logit gap can exceed: the term is written whatever the model says, so
# the test sees the bias reach the pick (the guard is tested in tests/engine/test_keyterms.py).
FORCED = BiasSettings(
    start_margin=1e9,
    start_boost=1e9,
    continue_margin=1e9,
    continue_boost=2e9,  # a term begun goes on before another starts, as with the defaults
    max_deficit=1e18,
)
TERM = "account balance"  # two words of the tiny tokenizer's corpus, a piece each


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("stt-tiny-keyterms"), "tiny", seed=1)


@pytest.fixture
async def forced(tiny_checkpoint: Path) -> AsyncIterator[KyutaiEngine]:
    engine = KyutaiEngine(str(tiny_checkpoint), batch_size=2, keyterm_settings=FORCED)
    await engine.start()
    yield engine
    await engine.stop()


def noise_call(seconds: float, seed: int) -> np.ndarray:
    """Loud, varied audio: random weights turn it into many tokens."""
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0.1, 1.0, int(seconds * 10) + 1), 2400)
    n = int(seconds * 24000)
    return (rng.standard_normal(n) * 6000 * envelope[:n]).astype(np.int16)


async def run(stream: KyutaiStream, pcm: np.ndarray) -> list[EngineEvent]:
    stream.push(pcm)
    stream.close()
    return [event async for event in stream.events()]


def words(events: list[EngineEvent]) -> list[Word]:
    return [e for e in events if isinstance(e, Word)]


async def test_words_and_segments_carry_the_models_token_probabilities(
    forced: KyutaiEngine,
) -> None:
    events = await run(forced.open("plain"), noise_call(4.0, seed=3))
    said = words(events)
    assert len(said) >= 5
    for word in said:
        assert word.confidence is not None and 0.0 < word.confidence <= 1.0
    segments = [e for e in events if isinstance(e, Segment)]
    assert segments
    for segment in segments:
        assert segment.confidence == pytest.approx(
            statistics.fmean(w.confidence or 0.0 for w in segment.words), abs=1e-3
        )
    # Random weights are unsure of everything: no word near certain.
    assert max(w.confidence or 0.0 for w in said) < 0.9


async def test_the_bias_writes_a_term_in_its_own_slot_and_leaves_the_other_alone(
    forced: KyutaiEngine,
) -> None:
    pcm = noise_call(3.0, seed=5)
    alone = await run(forced.open("alone"), pcm)
    assert TERM.split()[0] not in [w.text for w in words(alone)]
    biased = forced.open("biased", keyterms=(TERM,))
    beside = forced.open("beside")  # stepped in the same batch, no keyterms
    got, other = await asyncio.gather(run(biased, pcm), run(beside, pcm))
    texts = [w.text for w in words(got)]
    # Both words of the term, in a row: the padding between them did not end it.
    assert any(texts[i : i + 2] == TERM.split() for i in range(len(texts) - 1)), texts
    # The model itself did not want those pieces: their confidence says so.
    forced_words = [w for w in words(got) if w.text in TERM.split()]
    assert all((w.confidence or 0.0) < 0.2 for w in forced_words), forced_words
    assert other == alone  # the neighbour's logits were not touched
