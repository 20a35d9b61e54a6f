"""Keyterm biasing of a greedy decoder: favour the tokens that spell a keyterm, never force one.

`KeytermIndex` is built once per keyterm list and vocabulary: for each term (as the text
" Xarelto", a leading space since a term starts a word) and each character offset in it, the
vocabulary tokens that spell exactly the next characters. That is a prefix tree over every
tokenisation of the term at once, so the bias follows whichever split the model prefers
(" X" "arel" "to" or " Xa" "rel" "to"), not only the one a tokenizer would pick.

`KeytermBias` walks it during one decode. At each step (`choose`), a token that starts a term
(or continues a term already begun) gets a bounded boost, but only when the model already
rates it within a margin of its best token: the guard that keeps a term out where the audio
does not support it. A term once started has a wider margin and a larger boost (the audio
said its first letters), and the walk backs off (drops the term) once the tokens taken for it
have cost more, in total, than `max_deficit` of the model's own log-probability: a path whose
probability collapsed is not followed further. Byte and special tokens are never boosted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

MAX_TOKEN_CHARS: Final = 24  # no vocabulary piece we use is longer (Moonshine's: 16)


@dataclass(frozen=True)
class BiasSettings:
    """Logit margins and boosts (natural-log units: a margin of 5 is a probability ratio of
    e^5 = 150 against the model's best token). Tuned on bench/keyterms.py's sentences: rare
    words right out of 32 for start margins 3 / 5 / 6 / 8: 24 / 25 / 26 / 27, with no control
    sentence changed up to 6, while at 8 two control sentences turned into repeated terms."""

    start_margin: float = 5.0  # a term's first token is boosted only this close to the best
    start_boost: float = 5.0
    continue_margin: float = 8.0  # its next tokens, once it has started
    continue_boost: float = 8.0
    max_deficit: float = 14.0  # sum of (best - chosen) logits over a term's tokens: back off past
    # Per letter a continuation spells past its first: of two pieces that go on with a term,
    # the one that spells more of it ("is" of "Eliquis" over "i", which leaves the "s" to a
    # next step where the audio can pull the word away: int8 Moonshine wrote "Eliqui's").
    continue_boost_per_char: float = 0.5
    # A first token spelling fewer letters of the term (" X" of "Xarelto") starts so many
    # words that it is boosted only this close to the best ("oak" is not to become "Ozempic")
    min_start_chars: int = 2
    short_start_margin: float = 1.5


DEFAULT_SETTINGS: Final = BiasSettings()


class KeytermIndex:
    """Every way to spell each term with the vocabulary's tokens, by character offset."""

    def __init__(
        self, vocabulary: Sequence[str], terms: Sequence[str], first_text_id: int = 0
    ) -> None:
        ids: dict[str, int] = {}
        for token_id in range(first_text_id, len(vocabulary)):
            piece = vocabulary[token_id]
            if piece and len(piece) <= MAX_TOKEN_CHARS:
                ids.setdefault(piece, token_id)
        self.terms = tuple(terms)
        # steps[term][offset]: (token, the offset after it) for each token spelling term text
        self.steps: list[list[list[tuple[int, int]]]] = []
        for term in self.terms:
            text = " " + term
            per_offset: list[list[tuple[int, int]]] = []
            for offset in range(len(text)):
                found = []
                for end in range(offset + 1, min(len(text), offset + MAX_TOKEN_CHARS) + 1):
                    spelled = ids.get(text[offset:end])
                    if spelled is not None:
                        found.append((spelled, end))
                per_offset.append(found)
            self.steps.append(per_offset)
        self._texts = tuple(" " + term for term in self.terms)
        self.lengths = tuple(len(text) for text in self._texts)
        # Every (token, term, end) that starts a term, as arrays: each step looks them all up.
        starts = [(t, term, end) for term, steps in enumerate(self.steps) for t, end in steps[0]]
        self.start_tokens = np.array([t for t, _, _ in starts], dtype=np.int64)
        self.start_terms = tuple(term for _, term, _ in starts)
        self.start_ends = tuple(end for _, _, end in starts)

    def text_at(self, term: int, offset: int) -> str:
        """The character of term `term` (as " " + term) at `offset`."""
        return self._texts[term][offset]

    def __bool__(self) -> bool:
        return bool(self.terms)


@dataclass
class _Walk:
    """A term begun: where in its text the tokens so far have led, and what they cost."""

    term: int
    offset: int
    deficit: float


class KeytermBias:
    """The bias over one greedy decode: call `choose` with each step's logits, in order."""

    def __init__(
        self,
        index: KeytermIndex,
        settings: BiasSettings = DEFAULT_SETTINGS,
        separators: frozenset[int] = frozenset(),
    ) -> None:
        self._index = index
        self._settings = settings
        # Tokens that may stand between two words of a term without ending it (Kyutai's text
        # stream writes padding between words, each starting with a space piece).
        self._separators = separators
        self._walks: list[_Walk] = []
        self.boosted_steps = 0  # steps where the bias changed the chosen token

    def choose(self, logits: npt.NDArray[np.float32]) -> int:
        """The token to take: the best one after the bias (the logits are not changed)."""
        best_token = int(np.argmax(logits))
        best = float(logits[best_token])
        s = self._settings
        # token -> (its biased logit, the walks it would make)
        offers: dict[int, tuple[float, list[_Walk]]] = {}

        def offer(
            token: int, term: int, end: int, deficit: float, start: bool, letters: int = 1
        ) -> None:
            gap = best - float(logits[token])
            if gap > (s.start_margin if start else s.continue_margin):
                return
            walk = _Walk(term, end, deficit + gap)
            if walk.deficit > s.max_deficit:
                return  # the path's probability collapsed: back off this term
            boost = (
                s.start_boost
                if start
                else (s.continue_boost + s.continue_boost_per_char * (letters - 1))
            )
            value = float(logits[token]) + boost
            current = offers.get(token)
            if current is None:
                offers[token] = (value, [walk])
            else:
                offers[token] = (max(current[0], value), [*current[1], walk])

        for walk in self._walks:
            for token, end in self._index.steps[walk.term][walk.offset]:
                # A term begun on one letter is weak evidence: it goes on as a start would.
                start = walk.offset - 1 < s.min_start_chars
                offer(token, walk.term, end, walk.deficit, start, end - walk.offset)
        index = self._index
        near = np.flatnonzero(logits[index.start_tokens] >= best - s.start_margin)
        for i in near.tolist():
            token, end = int(index.start_tokens[i]), index.start_ends[i]
            if end - 1 < s.min_start_chars and best - float(logits[token]) > s.short_start_margin:
                continue  # " O" is the start of too many words to be pushed for "Ozempic"
            offer(token, index.start_terms[i], end, 0.0, True)

        chosen = best_token
        if best_token in self._separators:
            # Between words: keep the walks that wait for the space starting the next word.
            waiting = [w for w in self._walks if self._index.text_at(w.term, w.offset) == " "]
            offers.setdefault(best_token, (best, []))[1].extend(waiting)
        if offers:
            token, (value, _) = max(offers.items(), key=lambda item: item[1][0])
            if value > best:
                chosen = token
        if chosen != best_token:
            self.boosted_steps += 1
        self._advance(chosen, offers.get(chosen, (0.0, []))[1])
        return chosen

    def _advance(self, token: int, walks: list[_Walk]) -> None:
        """Keep the walks the chosen token continues (a finished term ends its walk); a token
        off every term ends them all, and a term may start again at the next word."""
        lengths = self._index.lengths
        self._walks = [w for w in walks if w.offset < lengths[w.term]]
