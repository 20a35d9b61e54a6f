"""Span finding on words as Moonshine writes them (the forms seen on this repository's speech)."""

from __future__ import annotations

import pytest

from telephony.redaction import (
    InvalidRedaction,
    NameBook,
    apply_spans,
    find_spans,
    mask_partial,
    parse_kinds,
    read_digits,
    trailing_run,
)

PCI = frozenset({"pci"})
ALL = frozenset({"pci", "ssn", "pii"})


def redact(text: str, kinds: frozenset[str], names: NameBook | None = None) -> str:
    words = text.split()
    return " ".join(apply_spans(words, find_spans(words, kinds, names=names)))


def test_kinds_parse_like_deepgram() -> None:
    assert parse_kinds(["pci,ssn", "pii"]) == {"pci", "ssn", "pii"}
    assert parse_kinds(["true"]) == {"numbers"}
    assert parse_kinds(["false"]) == frozenset()
    with pytest.raises(InvalidRedaction, match="unknown redaction kind 'phi'"):
        parse_kinds(["pci,phi"])


@pytest.mark.parametrize(
    ("words", "digits"),
    [
        ("4242-4242-4242-4242.", "4242424242424242"),
        ("four two four two", "4242"),
        ("5500 double 412", "55004412"),
        ("oh four twenty six", "0426"),
        ("twenty-six", "26"),
        ("triple seven", "777"),
        ("one hundred", "100"),
        ("one hundred, twenty, three, forty, five, sixty, seven, eighty nine", "123456789"),
        ("thirty thousand, three hundred nineteen", "30319"),
        ("forty one eleven", "4111"),
        ("double oh seven", "007"),
    ],
)
def test_spoken_numbers_read_as_digits(words: str, digits: str) -> None:
    assert read_digits(words.split()) == digits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "My card number is 424242424242424242 and it expires 1227.",
            "My card number is [CARD_NUMBER] and it expires [CARD_EXPIRY].",
        ),
        ("My card number is 4242-4242-4242-4242.", "My card number is [CARD_NUMBER]."),
        ("The card is 5500 double 412 3333 9876", "The card is [CARD_NUMBER]"),
        (
            "It expires 0426 and the CVV is 731.",
            "It expires [CARD_EXPIRY] and the CVV is [CARD_SECURITY_CODE].",
        ),
        ("The security code is seven three one.", "The security code is [CARD_SECURITY_CODE]."),
        # Harmless numbers stay: a zip code, an amount, a count, a short reference.
        ("My zip code is 30319.", "My zip code is 30319."),
        (
            "My zip code is thirty thousand, three hundred nineteen.",
            "My zip code is thirty thousand, three hundred nineteen.",
        ),
        ("I paid 45 dollars for 3 items.", "I paid 45 dollars for 3 items."),
        ("Oh, I see. Two of them.", "Oh, I see. Two of them."),
    ],
)
def test_pci(text: str, expected: str) -> None:
    assert redact(text, PCI) == expected


def test_ssn_phone_email_and_names_under_pii() -> None:
    assert redact("My social security number is 123456789.", ALL) == (
        "My social security number is [SSN]."
    )
    assert redact("The last four of my social are 6789.", ALL) == (
        "The last four of my social are [SSN]."
    )
    assert redact("Reach me at 555-123-4567 or at johnsmith@example.com.", ALL) == (
        "Reach me at [PHONE_NUMBER] or at [EMAIL]."
    )
    assert redact("write to john at example dot com please", ALL) == "write to [EMAIL] please"
    # A cue finds a name the list does not know (a misheard one); the list finds the rest.
    assert redact("My name is Sia Penangyan and I live at 12 Oak Street.", ALL) == (
        "My name is [NAME] and I live at 12 Oak Street."
    )
    names = NameBook(first=frozenset({"jennifer", "austin"}), last=frozenset({"walsh"}))
    assert redact("Yesterday your colleague Jennifer Walsh helped me.", ALL, names) == (
        "Yesterday your colleague [NAME] helped me."
    )
    assert redact("Jennifer Walsh said so.", ALL, names) == "[NAME] said so."
    # A first name alone at a sentence's start, a place after "to", words not names: kept.
    assert redact("Jennifer called. Please hold.", ALL, names) == "Jennifer called. Please hold."
    assert redact("Then a flight to Austin.", ALL, names) == "Then a flight to Austin."
    # pci alone leaves names and phone numbers.
    assert redact("Call Jennifer at 555-123-4567.", PCI, names) == "Call Jennifer at 555-123-4567."


def test_numbers_kind_takes_every_run_of_three_digits() -> None:
    numbers = frozenset({"numbers"})
    assert redact("Room 12, order 4471, about 3 boxes.", numbers) == (
        "Room 12, order [NUMBER], about 3 boxes."
    )


def test_a_trailing_group_may_go_on_a_single_digit_does_not() -> None:
    assert trailing_run(["My", "card", "is", "4242", "4242"]) == 3
    assert trailing_run(["I", "have", "two"]) is None
    assert trailing_run(["the", "number", "is", "four", "two"]) == 3
    assert trailing_run(["thanks"]) is None


def test_partials_mask_every_number_that_may_be_a_card() -> None:
    assert mask_partial("My card number is 4242 42", PCI) == "My card number is [CARD_NUMBER]"
    assert mask_partial("My card number is 42", PCI) == "My card number is [REDACTED]"
    assert mask_partial("I have two kids", PCI) == "I have two kids"
    assert mask_partial("no numbers here", frozenset()) == "no numbers here"
