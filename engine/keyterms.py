"""Keyterms: words a stream asks the engine to favour (names, drugs, products, streets).

Front ends read them from the wire (Deepgram's `keyterm=` and `keywords=word:boost`, Twilio
parameters, ...), check them here, and pass the result to `Engine.open(..., keyterms=...)`.
The engine adds the server-wide `[engine] keyterms` (`merge_keyterms`) and biases its decoder
towards them (engine/keyterm_bias.py). The limits bound the work a stream can ask for: every
term is a path in a prefix tree walked at each decoder step.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable
from typing import Final

MAX_KEYTERMS: Final = 100  # terms per stream (server-wide ones count apart)
MAX_KEYTERM_CHARS: Final = 60  # characters of one term
MAX_KEYTERM_WORDS: Final = 6  # words of one term ("Siobhan Nguyen" is two)


class InvalidKeyterms(ValueError):
    """A keyterm list the engine will not take; the message says what is wrong and the limit.

    Front ends answer it with their protocol's own error (HTTP 400 before the upgrade)."""


def check_keyterms(terms: Iterable[str]) -> tuple[str, ...]:
    """The terms stripped, inner runs of spaces made one, empties and repeats dropped (first
    kept, compared without case), in order; `InvalidKeyterms` past a limit or on a control
    character."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in terms:
        for ch in raw:
            if unicodedata.category(ch).startswith("C") and ch not in " \t":
                raise InvalidKeyterms(f"keyterm {raw[:MAX_KEYTERM_CHARS]!r}: control character")
        term = " ".join(raw.split())
        if not term or term.casefold() in seen:
            continue
        if len(term) > MAX_KEYTERM_CHARS:
            raise InvalidKeyterms(
                f"keyterm {term[:MAX_KEYTERM_CHARS]!r}...: {len(term)} characters "
                f"(at most {MAX_KEYTERM_CHARS})"
            )
        words = len(term.split())
        if words > MAX_KEYTERM_WORDS:
            raise InvalidKeyterms(f"keyterm {term!r}: {words} words (at most {MAX_KEYTERM_WORDS})")
        seen.add(term.casefold())
        out.append(term)
        if len(out) > MAX_KEYTERMS:
            raise InvalidKeyterms(f"more than {MAX_KEYTERMS} keyterms (at most {MAX_KEYTERMS})")
    return tuple(out)


def parse_keywords(values: Iterable[str]) -> tuple[str, ...]:
    """Deepgram's `keywords=`: each `word` or `word:boost`, checked like keyterms.

    The boost must be a finite number. Our bias has one strength (a bounded boost with a guard
    against forcing, engine/keyterm_bias.py), so a positive boost just makes the word a
    keyterm; zero or a negative boost (Deepgram's "suppress") is accepted and the word left
    out rather than refused, so a client written for Deepgram still connects.
    """
    terms: list[str] = []
    for value in values:
        word, sep, boost = value.rpartition(":")
        if not sep:
            word, boost = value, "1"
        try:
            factor = float(boost)
        except ValueError:
            raise InvalidKeyterms(f"keywords {value!r}: the boost must be a number") from None
        if not math.isfinite(factor):
            raise InvalidKeyterms(f"keywords {value!r}: the boost must be a finite number")
        if factor > 0:
            terms.append(word)
    return check_keyterms(terms)


def merge_keyterms(server: Iterable[str], stream: Iterable[str]) -> tuple[str, ...]:
    """The server-wide terms then the stream's, repeats dropped (compared without case)."""
    out: list[str] = []
    seen: set[str] = set()
    for term in (*server, *stream):
        if term.casefold() not in seen:
            seen.add(term.casefold())
            out.append(term)
    return tuple(out)
