"""The transcript stage: a leg's events in, redacted events out, in order."""

from __future__ import annotations

from engine.base import Closed, EndOfTurn, EngineEvent, Partial, Segment, Word
from telephony.transcript import TranscriptStage

PCI = frozenset({"pci"})


def utterance(text: str, start: float) -> list[EngineEvent]:
    """Words 0.4 s apart, their segment and an end of turn, as Moonshine emits them."""
    words = [
        Word(w, round(start + i * 0.4, 3), round(start + i * 0.4 + 0.3, 3))
        for i, w in enumerate(text.split())
    ]
    return [*words, Segment(text, words[0].start_s, words[-1].end_s, tuple(words)),
            EndOfTurn(words[-1].end_s)]  # fmt: skip


def feed(stage: TranscriptStage, events: list[EngineEvent]) -> list[EngineEvent]:
    return [out for event in events for out in stage.feed(event)]


def segments(events: list[EngineEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, Segment)]


def test_a_card_read_in_two_groups_over_a_pause_is_one_span() -> None:
    stage = TranscriptStage(PCI, hold_s=3.0)
    first = feed(stage, utterance("My card number is 4242 4242", 0.0))
    # The words before the run go out; the run, its segment and the turn wait.
    assert [e.text for e in first if isinstance(e, Word)] == ["My", "card", "number", "is"]
    assert segments(first) == [] and stage.holding
    second = feed(stage, utterance("4242 4242.", 4.0))  # 1.7 s after the first group
    assert segments(second) == []  # still a run: it may go on
    third = feed(stage, utterance("Thank you.", 6.5))
    assert segments(third) == ["My card number is [CARD_NUMBER]", "[CARD_NUMBER].", "Thank you."]
    placeholders = [e for e in third if isinstance(e, Word) and e.text.startswith("[")]
    assert [(w.start_s, w.end_s) for w in placeholders] == [(1.6, 2.3), (4.0, 4.7)]
    texts = [e.text for e in first + second + third if isinstance(e, (Word, Segment))]
    assert not any(ch.isdigit() for text in texts for ch in text)
    assert not stage.holding


def test_a_run_is_over_when_the_engine_settles_past_the_pause() -> None:
    stage = TranscriptStage(PCI, hold_s=3.0)
    held = feed(stage, utterance("My zip code is 30319.", 0.0))
    assert segments(held) == []
    assert stage.expire(settled_s=3.0) == []  # 1.3 s after the run: the caller may go on
    out = stage.expire(settled_s=5.0)
    assert segments(out) == ["My zip code is 30319."]  # five digits: no card
    assert isinstance(out[-1], EndOfTurn)


def test_a_number_after_a_long_pause_starts_a_new_run() -> None:
    stage = TranscriptStage(PCI, hold_s=3.0)
    out = feed(stage, utterance("Order 4242 4242", 0.0))
    out += feed(stage, utterance("4242 4242", 10.0))  # 8.9 s later: another number
    out += stage.feed(Closed("flushed"))
    assert segments(out) == ["Order 4242 4242", "4242 4242"]
    assert isinstance(out[-1], Closed)


def test_flush_releases_at_once_and_partials_are_masked() -> None:
    stage = TranscriptStage(PCI, hold_s=3.0)
    feed(stage, utterance("card 4242 4242 4242 4242", 0.0))
    assert segments(stage.flush()) == ["card [CARD_NUMBER]"]
    (partial,) = stage.feed(Partial("so the number is 42", 9.0, 10.0))
    assert isinstance(partial, Partial) and partial.text == "so the number is [REDACTED]"


def test_without_number_kinds_nothing_is_held() -> None:
    stage = TranscriptStage(frozenset({"pii"}) - {"pii"}, hold_s=3.0)
    out = feed(stage, utterance("card 4242 4242", 0.0))
    assert segments(out) == ["card 4242 4242"]


def test_a_group_read_after_a_long_pause_still_belongs_to_the_card() -> None:
    stage = TranscriptStage(PCI, hold_s=3.0)
    out = feed(stage, utterance("My card number is 4111 1111 1111", 0.0))
    out += feed(stage, utterance("1111.", 8.0))  # 5.5 s later: a run of its own
    out += stage.feed(Closed("flushed"))
    assert segments(out) == ["My card number is [CARD_NUMBER]", "[CARD_NUMBER]."]


def test_digits_that_come_one_word_at_a_time_are_one_run() -> None:
    """Word events come one by one (Kyutai streams them, Moonshine sends an utterance's words
    before its segment): a run is not judged on its first digit."""
    stage = TranscriptStage(PCI, hold_s=3.0)
    out = feed(stage, utterance("My card number is four, one, one, one, one, one, one.", 0.0))
    out += feed(stage, utterance("One, one, one, one, one, one, one.", 6.0))
    out += feed(stage, utterance("Thanks.", 10.0))
    assert segments(out) == ["My card number is [CARD_NUMBER].", "[CARD_NUMBER].", "Thanks."]


def test_the_nearest_words_say_what_a_number_is() -> None:
    stage = TranscriptStage(frozenset({"pci", "ssn"}), hold_s=3.0)
    out = feed(stage, utterance("My card number is 4111 1111 1111 1111.", 0.0))
    out += feed(stage, utterance("The security code is 731.", 8.0))
    out += feed(stage, utterance("My social is 123 45 6789.", 12.0))
    out += stage.feed(Closed("flushed"))
    assert segments(out) == [
        "My card number is [CARD_NUMBER].",
        "The security code is [CARD_SECURITY_CODE].",
        "My social is [SSN].",
    ]
