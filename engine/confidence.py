"""Word and segment confidence from a decoder's own token probabilities.

A decoder gives each token it chose the probability its softmax gave that token (before any
keyterm bias: a boosted token keeps the model's own, lower, belief). A word's confidence comes
from the tokens that spell it, a segment's from its words. bench/keyterms.py measured which
way of combining a word's tokens best separates right from wrong words (docs/engines.md,
Confidence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, Literal

Combine = Literal["min", "mean", "geometric"]
WORD_COMBINE: Final[Combine] = "min"


def combine(probabilities: Sequence[float], how: Combine = WORD_COMBINE) -> float:
    """One number in 0..1 for a word of these token probabilities (1.0 for none)."""
    if not probabilities:
        return 1.0
    if how == "min":
        return min(probabilities)
    if how == "mean":
        return sum(probabilities) / len(probabilities)
    return math.exp(sum(math.log(max(p, 1e-12)) for p in probabilities) / len(probabilities))


def word_confidences(
    pieces: Sequence[str], probabilities: Sequence[float], how: Combine = WORD_COMBINE
) -> list[float]:
    """The confidence of each whitespace-separated word of `"".join(pieces).split()`.

    Each character of the text belongs to the piece (token) that wrote it; a word's tokens are
    those that wrote any of its characters (a token written across two words, rare, counts
    for both), its punctuation-only tokens left out."""
    words: list[list[int]] = []  # the tokens of each word, by index
    in_word = False
    for n, piece in enumerate(pieces):
        for ch in piece:
            if ch.isspace():
                in_word = False
                continue
            if not in_word:
                words.append([])
                in_word = True
            if not words[-1] or words[-1][-1] != n:
                words[-1].append(n)
    if len(pieces) != len(probabilities):
        raise ValueError("one probability per piece")
    out = []
    for tokens in words:
        # Punctuation is the model's guess at the writing, not at what was said: "day." with
        # a hesitant "." is no less sure a "day". It counts only for a word of nothing else.
        spoken = [n for n in tokens if any(ch.isalnum() for ch in pieces[n])] or tokens
        out.append(combine([probabilities[n] for n in spoken], how))
    return out


def segment_confidence(words: Sequence[float]) -> float | None:
    """A segment's: the mean of its words' (Deepgram's transcript confidence is an average
    too), None for no words."""
    return sum(words) / len(words) if words else None
