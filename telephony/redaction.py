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
from collections.abc import Iterable, Sequence
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


def placeholder(label: str, last_word: str = "") -> str:
    """`[LABEL]`, with the closing punctuation of the last word it replaces: "[CARD_NUMBER]."
    ends the sentence its digits ended."""
    return f"[{label}]" + last_word[len(last_word.rstrip(".,;:!?")) :]


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
    """The digits a run of number words says, read as a caller means them: "four two four two"
    → "4242" (digits one by one), "double four" → "44", "oh four twenty six" → "0426",
    "forty one eleven" → "4111" (in pairs), "one hundred twenty three" → "123" and "thirty
    thousand three hundred nineteen" → "30319" (cardinals), "4242-4242" → "42424242"."""
    out: list[str] = []
    total = 0  # thousands of the cardinal being read
    value: int | None = None  # the cardinal below a thousand; None: no number open
    last = ""  # what the last word was: unit, teen, tens, hundred, thousand
    repeat = 1

    def flush() -> None:
        nonlocal total, value, last
        if value is not None or total:
            out.append(str(total + (value or 0)))
        total, value, last = 0, None, ""

    for word in words:
        name = core(word)
        if name in REPEATS:
            repeat = REPEATS[name]
            continue
        if name in JOINERS:
            flush()
            continue
        if _NUMERAL.match(name):
            flush()
            digits = re.sub(r"\D", "", name)
            out.append(digits[:1] * repeat + digits[1:] if digits else "")
            repeat = 1
            continue
        if name == "hundred":
            value = (value or 1) * 100 if last != "hundred" else (value or 1)
            last = "hundred"
            continue
        if name == "thousand":
            total, value, last = total + (value or 1) * 1000, 0, "thousand"
            continue
        spoken = _number_word_digits(name)
        if spoken is None:
            continue
        number = int(spoken)
        kind = "unit" if name in UNITS else "tens" if name in TENS else "teen"
        if "-" in name:
            kind = "unit"  # "twenty-six": a whole pair
        if repeat > 1 and kind == "unit":
            flush()
            out.append(spoken * repeat)
            repeat = 1
            continue
        joins = value is not None and (
            (last in ("hundred", "thousand") and number < 100)
            or (last == "tens" and kind == "unit" and value % 10 == 0 and 0 < number < 10)
        )
        if joins:
            value = (value or 0) + number
        elif number == 0:  # "oh" and "zero" are digits: "oh four" is "04", not 4
            flush()
            out.append("0")
            continue
        else:
            flush()
            value = number
        last = kind
    flush()
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


CARD_BEFORE: Final = re.compile(r"\bcard_number\b")  # the placeholder of a card's first groups
CONTEXTS: Final = {
    "card": CARD_CONTEXT,
    "card_before": CARD_BEFORE,
    "code": CODE_CONTEXT,
    "expiry": EXPIRY_CONTEXT,
    "ssn": SSN_CONTEXT,
}


def nearest_context(context: str) -> str | None:
    """Which kind of number the words just before a run name, the nearest one winning
    ("my card ... and the security code is": code)."""
    best, at = None, -1
    for name, pattern in CONTEXTS.items():
        for match in pattern.finditer(context):
            if match.end() > at or (match.end() == at and name != "card"):
                best, at = name, match.end()
    return best


def classify_run(digits: int, context: str, kinds: frozenset[str]) -> str | None:
    """The label a closed number run of `digits` digits gets under `kinds`, else None.

    After the words that name them, numbers are taken generously: recognition loses and adds
    digits ("5500 0000" heard as "fifty five hundred zero"), and a leak costs more than a
    harmless number hidden."""
    named = nearest_context(context)
    card = bool(kinds & {PCI, PII})
    if PCI in kinds and named == "code" and 3 <= digits <= 4:
        return CARD_SECURITY_CODE
    if PCI in kinds and named == "expiry" and 3 <= digits <= 6:
        return CARD_EXPIRY
    if kinds & {SSN, PII} and named == "ssn" and 4 <= digits <= 11:
        return SSN_LABEL
    if card and (
        digits >= 12
        or (named == "card" and digits >= 5)
        or (named == "card_before" and digits >= 2)  # a group read after the card's first
    ):
        return CARD_NUMBER
    if kinds & {SSN, PII} and digits == 9:
        return SSN_LABEL
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


class NameBook:
    """The people's names `pii` knows (lower-cased): first names, and surnames. Filled in
    place once loaded (telephony/names.py, at start), so streams opened before see them."""

    def __init__(
        self, first: frozenset[str] = frozenset(), last: frozenset[str] = frozenset()
    ) -> None:
        self.fill(first, last)

    def fill(self, first: frozenset[str], last: frozenset[str]) -> None:
        self.first, self.last = first, last


def find_spans(
    words: Sequence[str],
    kinds: frozenset[str],
    before: Sequence[str] = (),
    names: NameBook | None = None,
) -> list[Span]:
    """Sensitive spans among `words`, every number run in them taken as closed.

    `before` are the leg's words just before these (already out): context for the first
    run. `names` tells a name from another capitalised word (pii only).
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
        spans.extend(_name_spans(words, history, names or NO_NAMES))
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
    if min_digits <= 1:
        return i  # mid-utterance even "oh" or "double" may start a number
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


NO_NAMES: Final = NameBook()
# A capitalised word after these is a place more often than a person ("a flight to Austin").
PLACE_WORDS: Final = frozenset({"in", "to", "from", "at", "near", "of", "via", "into", "across"})


def _capitalised(word: str) -> bool:
    stripped = word.strip(_EDGE)
    return bool(stripped) and stripped[0].isupper() and core(word) not in NOT_NAMES


def _name_spans(words: Sequence[str], before: Sequence[str], names: NameBook) -> list[Span]:
    """A capitalised word after a cue ("my name is", "speaking with"), or a first name
    mid-sentence (not after "to", "in", ...), with the capitalised words that follow it;
    at a sentence's start only a first name followed by a surname ("Jennifer Walsh said")."""
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
        name = core(words[i])
        listed = _capitalised(words[i]) and name in names.first
        if listed and sentence_start:
            after = words[i + 1] if i + 1 < len(words) else ""
            listed = _capitalised(after) and core(after) in names.last
        elif listed:
            listed = core(previous) not in PLACE_WORDS
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


def mask_partial(text: str, kinds: frozenset[str], names: NameBook | None = None) -> str:
    """A partial hypothesis with what could be sensitive masked: every number run of two or
    more digits (it may be the start of a card), and the spans `find_spans` finds."""
    if not kinds:
        return text
    words = text.split()
    spans = find_spans(words, kinds, names=names)
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
        out.append(placeholder(span.label, words[span.last]))
        i = span.last + 1
    out.extend(words[i:])
    return out
