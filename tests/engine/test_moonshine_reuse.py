"""Moonshine decodes that reuse the previous hypothesis (a draft read in one pass) against the
plain step-by-step decode, on real speech through 8 kHz μ-law: the same tokens, the same
probabilities (to float tolerance; a little wider in int8, whose products round differently
for a pass of many rows and a step of one, so that a near-tie can go the other way on
other sentences: engine/moonshine_graph.py), with and without keyterms."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from engine.moonshine_model import SAMPLE_RATE, MoonshineModel, load
from telephony.audio import resample_whole, ulaw_decode
from tests.conftest import MODEL_CACHE
from tests.speech import SENTENCES, phone_bytes

FloatAudio = npt.NDArray[np.float32]
# Rare words the model misspells through the phone path without their keyterms (as in
# test_moonshine_keyterms.py): the bias changes these decodes, so its walk is exercised.
RARE = (
    "The pharmacy switched me to Eliquis last week.",
    "He takes Brilinta after his heart surgery.",
)
TERMS = ("Eliquis", "Brilinta", "Quillon", "Tremfya")


@pytest.fixture(scope="module")
def model() -> MoonshineModel:
    return load("", MODEL_CACHE)


def audio_of(text: str) -> FloatAudio:
    pcm = resample_whole(ulaw_decode(phone_bytes(text)), 8000, SAMPLE_RATE)
    return (pcm.astype(np.float32) / 32768.0).astype(np.float32)


def grown(audio: FloatAudio) -> list[FloatAudio]:
    """What a partial and a final see of one utterance: its first half, 3/4, then the whole."""
    return [audio[: len(audio) // 2], audio[: len(audio) * 3 // 4], audio]


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# int8 quantizes each row of a product's input on its own (engine/moonshine_graph.py), but a
# pass of many rows sums in another order than a step of one (measured: at most 0.011).
TOLERANCE = {"int8": 0.03, "float32": 2e-3}


@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_each_decode_from_the_last_ones_tokens_equals_the_plain_decode(precision: str) -> None:
    model = load("", MODEL_CACHE, "int8" if precision == "int8" else "float32")
    reused_steps = 0
    for text in SENTENCES[:3]:
        draft: tuple[int, ...] = ()
        for audio in grown(audio_of(text)):
            plain = model.decode(audio)
            reused = model.decode(audio, draft=draft)
            assert reused.tokens == plain.tokens, (text, len(audio))
            assert reused.text == plain.text
            np.testing.assert_allclose(
                reused.probabilities, plain.probabilities, atol=TOLERANCE[precision]
            )
            reused_steps += common_prefix(draft, plain.tokens)
            draft = reused.tokens
    # The drafts were used, not dropped: most tokens of a grown utterance come from its last.
    assert reused_steps > 20


def test_a_wrong_or_overlong_draft_changes_nothing(model: MoonshineModel) -> None:
    audio = audio_of(SENTENCES[1])
    plain = model.decode(audio)
    wrong = (plain.tokens[0], *(t + 1 for t in plain.tokens[1:]))  # diverges after one token
    long = (*plain.tokens, *plain.tokens, *plain.tokens, *plain.tokens)  # past the end token
    for draft in (wrong, long, (5000,) * 3):
        assert model.decode(audio, draft=draft).tokens == plain.tokens


def test_keyterm_bias_walks_the_draft_as_it_walks_the_steps(model: MoonshineModel) -> None:
    index = model.keyterm_index(TERMS)
    for text in RARE:
        audio = audio_of(text)
        first = model.decode(audio[: len(audio) * 2 // 3], index)
        plain = model.decode(audio, index)
        reused = model.decode(audio, index, draft=first.tokens)
        assert reused.tokens == plain.tokens, text
        assert reused.text == plain.text
