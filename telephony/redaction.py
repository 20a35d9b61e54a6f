"""What to redact in a transcript: kinds, spoken-number reading and span finding. No I/O.

A transcript arrives as words, as the engine writes them ("4242-4242", "four", "1227.",
"double", "johnsmith@example.com."). `find_spans` reads them as a caller speaks: runs of
numbers in any written form (digits, "four two", "oh", "double four", "twenty six"), the
words before a run that say what it is ("security code", "social", "expires"), e-mail
addresses, and people's names (telephony/names.py). Each sensitive span becomes one
placeholder word naming its kind (`[CARD_NUMBER]`); telephony/transcript.py applies them to a
leg's events, holding a number run that the caller may go on reading after a pause.

Kinds (Deepgram's `redact=` values):
- `pci`: card numbers (12 or more digits in one run, 8 or more after a word about a card),
  expiry dates and security codes (a 3-6 / 3-4 digit run after a word that names them);
- `ssn`: nine digits in a run, or 4 to 9 after "social" / "SSN";
- `numbers` (alias `true`): any run of three or more digits;
- `pii`: card numbers and SSNs as above, phone numbers (7 to 11 digits), e-mail addresses and
  people's names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

PCI: Final = "pci"
SSN: Final = "ssn"
NUMBERS: Final = "numbers"
PII: Final = "pii"
KINDS: Final = (PCI, SSN, NUMBERS, PII)
ALIASES: Final = {"true": NUMBERS}
NONE_VALUES: Final = frozenset({"false", "none", ""})
DIGIT_KINDS: Final = frozenset({PCI, SSN, NUMBERS, PII})  # kinds that read number runs

CARD_NUMBER: Final = "CARD_NUMBER"
CARD_EXPIRY: Final = "CARD_EXPIRY"
CARD_SECURITY_CODE: Final = "CARD_SECURITY_CODE"
SSN_LABEL: Final = "SSN"
PHONE_NUMBER: Final = "PHONE_NUMBER"
EMAIL: Final = "EMAIL"
NAME: Final = "NAME"
NUMBER: Final = "NUMBER"

CONTEXT_WORDS: Final = 8  # how far before a run a word may say what it is


class InvalidRedaction(ValueError):
    """A `redact=` value or `[privacy] redact` entry that is not a known kind."""


def parse_kinds(values: Iterable[str]) -> frozenset[str]:
    """Kinds from `redact=` values, repeated or comma-separated; `true` is `numbers`, `false`
    asks for nothing (which never removes a server-wide default: see transcript.py)."""
    kinds: set[str] = set()
    for value in values:
        for item in value.split(","):
            name = item.strip().lower()
            if name in NONE_VALUES:
                continue
            name = ALIASES.get(name, name)
            if name not in KINDS:
                raise InvalidRedaction(
                    f"unknown redaction kind {item.strip()[:40]!r}: use "
                    f"{', '.join(KINDS)} or true (numbers)"
                )
            kinds.add(name)
    return frozenset(kinds)


def placeholder(label: str) -> str:
    return f"[{label}]"


# --- spoken numbers ---------------------------------------------------------------------------

UNITS: Final = {
    "zero": "0", "oh": "0", "o": "0", "nought": "0", "one": "1", "two": "2", "three": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
}  # fmt: skip
TEENS: Final = {
    "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19",
}  # fmt: skip
TENS: Final = {
    "twenty": "2", "thirty": "3", "forty": "4", "fifty": "5", "sixty": "6", "seventy": "7",
    "eighty": "8", "ninety": "9",
}  # fmt: skip
MULTIPLIERS: Final = {"hundred": "00", "thousand": "000"}
REPEATS: Final = {"double": 2, "triple": 3}
JOINERS: Final = frozenset({"dash", "hyphen"})  # "four two dash one one": part of the run
WEAK: Final = frozenset({"oh", "o"})  # zero only beside other numbers ("Oh, I see")

_EDGE = "\"'“”‘’.,;:!?()[]{}<>"
_NUMERAL = re.compile(r"^[#$£€]?\d[\d\-/.,:]*%?(st|nd|rd|th|s)?$")


def core(word: str) -> str:
    return word.strip(_EDGE).lower()


def _number_word_digits(name: str) -> str | None:
    """Digits of one spoken number word ("twenty-six" → "26"), else None."""
    if name in UNITS:
        return UNITS[name]
    if name in TEENS:
        return TEENS[name]
    if name in TENS:
        return TENS[name] + "0"
    if "-" in name:
        tens, _, unit = name.partition("-")
        if tens in TENS and unit in UNITS and UNITS[unit] != "0":
            return TENS[tens] + UNITS[unit]
    return None


def is_number_token(word: str) -> bool:
    """A word that belongs to a spoken or written number run."""
    name = core(word)
    return bool(
        _NUMERAL.match(name)
        or _number_word_digits(name) is not None
        or name in MULTIPLIERS
        or name in REPEATS
        or name in JOINERS
    )


def read_digits(words: Sequence[str]) -> str:
    """The digits a run of number words says: "four two four two" → "4242", "double four"
    → "44", "oh four twenty six" → "0426", "twenty six" → "26", "4242-4242" → "42424242"."""
    out: list[str] = []
    repeat = 1
    open_tens = False  # the last digits came from "twenty": a unit word fills its zero
    for word in words:
        name = core(word)
        if name in REPEATS:
            repeat = REPEATS[name]
            continue
        if name in JOINERS:
            open_tens = False
            continue
        if name in MULTIPLIERS:
            out.append(MULTIPLIERS[name])
            open_tens = False
            continue
        if _NUMERAL.match(name):
            digits = re.sub(r"\D", "", name)
        else:
            spoken = _number_word_digits(name)
            if spoken is None:
                continue
            if open_tens and name in UNITS and spoken != "0":
                out[-1] = out[-1][:-1] + spoken
                open_tens = False
                continue
            digits = spoken
        if repeat > 1 and digits:
            digits = digits[0] * repeat + digits[1:]
            repeat = 1
        out.append(digits)
        open_tens = name in TENS
    return "".join(out)


def run_digits(words: Sequence[str]) -> int:
    return len(read_digits(words))


def is_real_run(words: Sequence[str]) -> bool:
    """A run holds at least one real number, not only "oh", "double" or "dash"."""
    return any(
        core(w) not in WEAK and core(w) not in REPEATS and core(w) not in JOINERS for w in words
    ) and bool(read_digits(words))


# --- context ----------------------------------------------------------------------------------

CARD_CONTEXT: Final = re.compile(
    r"\b(card|credit|debit|visa|mastercard|master card|amex|american express|discover|"
    r"account number|pan)\b"
)
EXPIRY_CONTEXT: Final = re.compile(r"\b(expir\w*|exp|valid (thru|through|until)|good thru)\b")
CODE_CONTEXT: Final = re.compile(
    r"\b(security code|cvv2?|cvc2?|csc|cid|verification (code|number|value)|"
    r"code on the back|back of the card|three digit code|3 digit code)\b"
)
SSN_CONTEXT: Final = re.compile(r"\b(social|ssn|social security( number)?)\b")


def _context(words: Sequence[str]) -> str:
    return " ".join(core(w) for w in words[-CONTEXT_WORDS:])


def classify_run(digits: int, context: str, kinds: frozenset[str]) -> str | None:
    """The label a closed number run of `digits` digits gets under `kinds`, else None."""
    card_words = bool(CARD_CONTEXT.search(context))
    ssn_words = bool(SSN_CONTEXT.search(context)) and not CODE_CONTEXT.search(context)
    card_before = "card_number" in context  # a group read after a card's first groups
    if kinds & {PCI, PII} and (
        digits >= 12 or (digits >= 8 and card_words) or (digits >= 4 and card_before)
    ):
        return CARD_NUMBER
    if kinds & {SSN, PII} and (digits == 9 or (4 <= digits <= 9 and ssn_words)):
        return SSN_LABEL
    if PCI in kinds and 3 <= digits <= 4 and CODE_CONTEXT.search(context):
        return CARD_SECURITY_CODE
    if PCI in kinds and 3 <= digits <= 6 and EXPIRY_CONTEXT.search(context):
        return CARD_EXPIRY
    if PII in kinds and 7 <= digits <= 11:
        return PHONE_NUMBER
    if NUMBERS in kinds and digits >= 3:
        return NUMBER
    return None


# --- spans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Words [first, last] (inclusive indices) become one placeholder `[label]`."""

    first: int
    last: int
    label: str


_EMAIL = re.compile(r"^[^@\s]+@[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z]{2,}$")
_DOMAIN = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)*\.(com|net|org|edu|gov|io|co|uk|us|ca|info|biz)$")
_TLDS: Final = frozenset({"com", "net", "org", "edu", "gov", "io", "co", "uk", "us", "ca"})


def _email_spans(words: Sequence[str]) -> list[Span]:
    spans: list[Span] = []
    for i, word in enumerate(words):
        name = core(word)
        if _EMAIL.match(name):
            spans.append(Span(i, i, EMAIL))
        elif name == "at" and 0 < i < len(words) - 1:
            # Spoken: "john at example.com", "john at example dot com".
            if _DOMAIN.match(core(words[i + 1])):
                spans.append(Span(i - 1, i + 1, EMAIL))
                continue
            end = i + 1
            while end + 2 < len(words) and core(words[end + 1]) == "dot":
                end += 2
            if end > i + 1 and core(words[end]) in _TLDS:
                spans.append(Span(i - 1, end, EMAIL))
    return spans


NameTest = Callable[[str], bool]


def find_spans(
    words: Sequence[str],
    kinds: frozenset[str],
    before: Sequence[str] = (),
    is_name: NameTest | None = None,
) -> list[Span]:
    """Sensitive spans among `words`, every number run in them taken as closed.

    `before` are the leg's words just before these (already out): context for the first
    run. `is_name` tells a name from a capitalised word (pii only).
    """
    spans: list[Span] = []
    history = list(before)
    if kinds & DIGIT_KINDS:
        for first, last in number_runs(words):
            run = words[first : last + 1]
            label = classify_run(run_digits(run), _context(history + list(words[:first])), kinds)
            if label is not None:
                spans.append(Span(first, last, label))
    if PII in kinds:
        spans.extend(_email_spans(words))
        spans.extend(_name_spans(words, history, is_name or _no_list))
    return _merge(spans)


def number_runs(words: Sequence[str]) -> list[tuple[int, int]]:
    """(first, last) of each maximal run of number words that holds a real number."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i, word in enumerate([*words, ""]):
        if word and is_number_token(word):
            if start is None:
                start = i
            continue
        if start is not None:
            first, last = start, i - 1
            # "dash", "double" or "oh" at the edges join nothing.
            while first <= last and core(words[first]) in JOINERS:
                first += 1
            while first <= last and core(words[last]) in JOINERS | REPEATS.keys():
                last -= 1
            if first <= last and is_real_run(words[first : last + 1]):
                runs.append((first, last))
            start = None
    return runs


def trailing_run(words: Sequence[str], min_digits: int = 2) -> int | None:
    """Index where a number run at the very end of `words` starts, if it has `min_digits`
    digits or more (at the end of an utterance, two: a caller who reads a card in groups
    pauses after a group, not after a digit)."""
    i = len(words)
    while i > 0 and is_number_token(words[i - 1]):
        i -= 1
    if i == len(words):
        return None
    run = words[i:]
    return i if is_real_run(run) and run_digits(run) >= min_digits else None


# --- names ------------------------------------------------------------------------------------

NAME_CUES: Final = (
    ("my", "name", "is"),
    ("name", "is"),
    ("name's",),
    ("this", "is"),
    ("i'm",),
    ("i", "am"),
    ("speaking", "with"),
    ("spoke", "with"),
    ("spoke", "to"),
    ("speak", "to"),
    ("speak", "with"),
    ("talking", "to"),
    ("talk", "to"),
    ("ask", "for"),
    ("mr",),
    ("mrs",),
    ("ms",),
    ("miss",),
    ("dr",),
)
NOT_NAMES: Final = frozenset(
    {
        "i",
        "i'm",
        "i'll",
        "i've",
        "i'd",
        "ok",
        "okay",
        "yes",
        "no",
        "hello",
        "hi",
        "thanks",
        "thank",
        "please",
        "sorry",
        "sir",
        "madam",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
        "january",
        "february",
        "march",
        "april",
        "may",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
        "street",
        "st",
        "avenue",
        "ave",
        "road",
        "rd",
        "lane",
        "drive",
        "court",
        "boulevard",
        "way",
        "place",
        "visa",
        "mastercard",
        "amex",
        "american",
        "express",
        "discover",
        "english",
        "spanish",
        "french",
        "god",
        "christmas",
        "easter",
    }
)  # capitalised, yet not people's names


def _no_list(name: str) -> bool:
    return False


def _capitalised(word: str) -> bool:
    stripped = word.strip(_EDGE)
    return bool(stripped) and stripped[0].isupper() and core(word) not in NOT_NAMES


def _name_spans(words: Sequence[str], before: Sequence[str], is_name: NameTest) -> list[Span]:
    spans: list[Span] = []
    context = [core(w) for w in before[-4:]] + [core(w) for w in words]
    offset = len(context) - len(words)
    i = 0
    while i < len(words):
        cued = any(
            tuple(context[offset + i - len(cue) : offset + i]) == cue
            for cue in NAME_CUES
            if offset + i - len(cue) >= 0
        )
        previous = words[i - 1] if i > 0 else (before[-1] if before else "")
        sentence_start = not previous or previous.rstrip()[-1:] in ".?!"
        listed = _capitalised(words[i]) and not sentence_start and is_name(core(words[i]))
        if (cued and _capitalised(words[i])) or listed:
            last = i
            # A name goes on over the capitalised words that follow it ("Siobhan Nguyen").
            while (
                last + 1 < len(words)
                and last - i < 3
                and _capitalised(words[last + 1])
                and words[last].rstrip()[-1:] not in ".?!,"
            ):
                last += 1
            spans.append(Span(i, last, NAME))
            i = last + 1
            continue
        i += 1
    return spans


def _merge(spans: list[Span]) -> list[Span]:
    """Overlapping spans become one, labelled by the first (numbers before e-mail, names)."""
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.first, -s.last)):
        if out and span.first <= out[-1].last:
            prev = out[-1]
            out[-1] = Span(prev.first, max(prev.last, span.last), prev.label)
        else:
            out.append(span)
    return out


# --- partials ---------------------------------------------------------------------------------


def mask_partial(text: str, kinds: frozenset[str], is_name: NameTest | None = None) -> str:
    """A partial hypothesis with what could be sensitive masked: every number run of two or
    more digits (it may be the start of a card), and the spans `find_spans` finds."""
    if not kinds:
        return text
    words = text.split()
    spans = find_spans(words, kinds, is_name=is_name)
    if kinds & DIGIT_KINDS:
        spans = _merge(
            spans
            + [
                Span(first, last, "REDACTED")
                for first, last in number_runs(words)
                if run_digits(words[first : last + 1]) >= 2
            ]
        )
    return " ".join(apply_spans(words, spans))


def apply_spans(words: Sequence[str], spans: Sequence[Span]) -> list[str]:
    """`words` with each span replaced by its placeholder (the span's closing punctuation
    kept: "[CARD_NUMBER]." ends the sentence its digits ended)."""
    out: list[str] = []
    i = 0
    for span in spans:
        out.extend(words[i : span.first])
        last = words[span.last]
        tail = last[len(last.rstrip(".,;:!?")) :]
        out.append(placeholder(span.label) + tail)
        i = span.last + 1
    out.extend(words[i:])
    return out
