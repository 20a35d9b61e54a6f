"""Keyterm lists: what a stream may ask for, and the error a front end turns into its 400."""

from __future__ import annotations

import pytest

from engine.base import Segment, Word, event_to_json
from engine.keyterms import (
    MAX_KEYTERM_CHARS,
    MAX_KEYTERM_WORDS,
    MAX_KEYTERMS,
    InvalidKeyterms,
    check_keyterms,
    merge_keyterms,
    parse_keywords,
)


def test_terms_are_cleaned_and_repeats_dropped_in_order() -> None:
    terms = ["  Xarelto ", "", "Siobhan   Nguyen", "xarelto", "   ", "Zyntrix"]
    assert check_keyterms(terms) == ("Xarelto", "Siobhan Nguyen", "Zyntrix")


def test_the_limits_are_enforced_with_a_message_naming_them() -> None:
    assert len(check_keyterms(f"term{i}" for i in range(MAX_KEYTERMS))) == MAX_KEYTERMS
    with pytest.raises(InvalidKeyterms, match=f"at most {MAX_KEYTERMS}"):
        check_keyterms(f"term{i}" for i in range(MAX_KEYTERMS + 1))
    assert check_keyterms(["x" * MAX_KEYTERM_CHARS]) == ("x" * MAX_KEYTERM_CHARS,)
    with pytest.raises(InvalidKeyterms, match=f"at most {MAX_KEYTERM_CHARS}"):
        check_keyterms(["x" * (MAX_KEYTERM_CHARS + 1)])
    with pytest.raises(InvalidKeyterms, match=f"at most {MAX_KEYTERM_WORDS}"):
        check_keyterms([" ".join(["a"] * (MAX_KEYTERM_WORDS + 1))])
    with pytest.raises(InvalidKeyterms, match="control character"):
        check_keyterms(["Xarel\x00to"])
    with pytest.raises(InvalidKeyterms, match="control character"):
        check_keyterms(["two\nlines"])


def test_repeats_do_not_count_against_the_limit() -> None:
    assert check_keyterms(["Zyntrix"] * (MAX_KEYTERMS * 3)) == ("Zyntrix",)


def test_deepgram_keywords_with_and_without_boost() -> None:
    assert parse_keywords(["Xarelto:2", "Zyntrix", "Nguyen:0.5"]) == (
        "Xarelto",
        "Zyntrix",
        "Nguyen",
    )
    assert parse_keywords(["um:-5", "Xarelto:0"]) == ()  # suppressions: accepted, not biased
    with pytest.raises(InvalidKeyterms, match="number"):
        parse_keywords(["Xarelto:lots"])
    with pytest.raises(InvalidKeyterms, match="finite"):
        parse_keywords(["Xarelto:nan"])


def test_server_terms_come_first_and_repeats_merge() -> None:
    assert merge_keyterms(("Acme", "Zyntrix"), ("zyntrix", "Xarelto")) == (
        "Acme",
        "Zyntrix",
        "Xarelto",
    )


def test_confidence_reaches_the_json_of_words_and_segments_only_when_known() -> None:
    sure = Word("Xarelto", 0.5, 1.0, 0.91234)
    unsure = Word("Zyntrix", 1.0, 1.5)
    assert event_to_json(sure)["confidence"] == 0.912
    assert "confidence" not in event_to_json(unsure)
    segment = event_to_json(Segment("Xarelto Zyntrix", 0.5, 1.5, (sure, unsure), 0.4567))
    assert segment["confidence"] == 0.457
    assert segment["words"][0]["confidence"] == 0.912
    assert "confidence" not in segment["words"][1]
    assert "confidence" not in event_to_json(Segment("Zyntrix", 1.0, 1.5, (unsure,)))
