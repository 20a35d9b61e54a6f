"""Moonshine decodes that reuse the previous hypothesis (a draft read in one pass) against the
plain step-by-step decode, on real speech through 8 kHz μ-law.

In float32 a drafted decode is the plain decode: the same tokens, the same probabilities (to
float tolerance), with and without keyterms. In int8 it is not, and the engine relies on that
only for partials: onnxruntime's 8-bit products sum a pass of many rows in another order than
a step of one, and the kernels may differ from one CPU to another, so a near-tie can go the
other way (CI's machine turned "department." and "Eliquis" on this file's sentences; this
machine did not). Finals in int8 never read a draft (`MoonshineModel.exact_drafts`;
tests/e2e/test_sip.py checks live finals against offline decodes), so int8 drafts are held to
what a partial shows: the same words but for at most one per decode."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest

from engine.moonshine_model import SAMPLE_RATE, MoonshineModel, Transcript, load
from telephony.audio import resample_whole, ulaw_decode
from tests.conftest import MODEL_CACHE
from tests.speech import SENTENCES, normalize, phone_bytes, word_error_rate

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


def word_errors(reference: str, hypothesis: str) -> int:
    return round(word_error_rate(reference, hypothesis) * len(normalize(reference)))


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def drafted_decodes(model: MoonshineModel) -> Iterator[tuple[Transcript, Transcript, int]]:
    """For each grown stage of three sentences: the plain decode, the decode reading the last
    stage's tokens as its draft (as the engine's next partial or final does), and how many of
    that draft's tokens it kept."""
    for text in SENTENCES[:3]:
        draft: tuple[int, ...] = ()
        for audio in grown(audio_of(text)):
            reused = model.decode(audio, draft=draft)
            yield model.decode(audio), reused, common_prefix(draft, reused.tokens)
            draft = reused.tokens


def test_each_decode_from_the_last_ones_tokens_equals_the_plain_decode() -> None:
    model = load("", MODEL_CACHE, "float32")
    assert model.exact_drafts
    reused_steps = 0
    for plain, reused, kept in drafted_decodes(model):
        assert reused.tokens == plain.tokens, plain.text
        assert reused.text == plain.text
        np.testing.assert_allclose(reused.probabilities, plain.probabilities, atol=2e-3)
        reused_steps += kept
    # The drafts were used, not dropped: most tokens of a grown utterance come from its last.
    assert reused_steps > 20


def test_an_int8_draft_gives_a_partial_the_plain_decodes_words_but_for_one(
    model: MoonshineModel,
) -> None:
    assert not model.exact_drafts  # so the engine's finals decode from scratch
    reused_steps = 0
    for plain, reused, kept in drafted_decodes(model):
        assert word_errors(plain.text, reused.text) <= 1, (plain.text, reused.text)
        reused_steps += kept
    assert reused_steps > 20


def test_a_wrong_or_overlong_draft_changes_nothing(model: MoonshineModel) -> None:
    audio = audio_of(SENTENCES[1])
    plain = model.decode(audio)
    wrong = (plain.tokens[0], *(t + 1 for t in plain.tokens[1:]))  # diverges after one token
    long = (*plain.tokens, *plain.tokens, *plain.tokens, *plain.tokens)  # past the end token
    for draft in (wrong, long, (5000,) * 3):
        assert model.decode(audio, draft=draft).tokens == plain.tokens


def test_keyterm_bias_walks_the_draft_as_it_walks_the_steps() -> None:
    model = load("", MODEL_CACHE, "float32")  # exact drafts: the walk alone is under test
    index = model.keyterm_index(TERMS)
    for text in RARE:
        audio = audio_of(text)
        first = model.decode(audio[: len(audio) * 2 // 3], index)
        plain = model.decode(audio, index)
        reused = model.decode(audio, index, draft=first.tokens)
        assert reused.tokens == plain.tokens, text
        assert reused.text == plain.text
