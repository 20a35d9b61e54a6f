"""Keyterm lists: what a stream may ask for, and the error a front end turns into its 400."""

from __future__ import annotations

import numpy as np
import pytest

from engine.base import Segment, Word, event_to_json
from engine.config import EngineConfig
from engine.keyterm_bias import BiasSettings, KeytermBias, KeytermIndex
from engine.keyterms import (
    MAX_KEYTERM_CHARS,
    MAX_KEYTERM_WORDS,
    MAX_KEYTERMS,
    InvalidKeyterms,
    check_keyterms,
    merge_keyterms,
    parse_keywords,
)
from engine.kyutai import KyutaiEngine
from engine.moonshine import MoonshineEngine
from engine.registry import build_engine


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


# --- the bias itself, on a small made-up vocabulary -------------------------------------------

VOCAB = ["<pad>", "<s>", "</s>", " the", " X", " Xa", "rel", "to", " Z", "ero", " S", "i", " N"]
PAD, XA, REL, TO, THE = 0, 5, 6, 7, 3


def logits(best: int, **near: float) -> np.ndarray:
    """Logits where `best` leads by 10 and each named token (by text) is `gap` below it."""
    row = np.zeros(len(VOCAB), dtype=np.float32)
    row[best] = 10.0
    for text, gap in near.items():
        row[VOCAB.index(" " + text[1:] if text.startswith("_") else text)] = 10.0 - gap
    return row


def test_a_term_starts_only_within_its_margin_and_then_continues() -> None:
    index = KeytermIndex(VOCAB, ["Xarelto"], first_text_id=3)
    settings = BiasSettings()
    bias = KeytermBias(index, settings)
    # " Xa" 1 below " the": boosted past it
    assert bias.choose(logits(THE, _Xa=1.0)) == XA
    # once started, a wider margin: "rel" 7 below is still taken, then "to"
    assert bias.choose(logits(PAD, rel=7.0)) == REL
    assert bias.choose(logits(PAD, to=2.0)) == TO
    # the term is complete: its last piece is not pushed again
    assert bias.choose(logits(PAD, to=2.0)) == PAD
    # a start too far from the best is left alone: the audio does not support it
    fresh = KeytermBias(index, settings)
    assert fresh.choose(logits(THE, _Xa=settings.start_margin + 0.5)) == THE
    assert fresh.boosted_steps == 0


def test_a_term_whose_path_collapses_is_dropped() -> None:
    index = KeytermIndex(VOCAB, ["Xarelto"], first_text_id=3)
    bias = KeytermBias(index, BiasSettings(max_deficit=6.0))
    assert bias.choose(logits(THE, _Xa=4.0)) == XA  # 4 spent
    assert bias.choose(logits(PAD, rel=3.0)) == PAD  # 7 > 6: backed off, not forced


def test_single_letter_starts_are_pushed_only_when_nearly_best() -> None:
    index = KeytermIndex(VOCAB, ["Zero"], first_text_id=3)
    settings = BiasSettings()
    far = KeytermBias(index, settings)
    # " Z" spells one letter, the start of too many words: pushed only from close to the best
    assert far.choose(logits(THE, _Z=settings.short_start_margin + 0.5)) == THE
    near = KeytermBias(index, settings)
    assert near.choose(logits(THE, _Z=settings.short_start_margin - 0.5)) == 8
    # one letter is weak evidence: the term goes on only within the start margin, not wider
    assert near.choose(logits(PAD, ero=settings.start_margin + 1.0)) == PAD
    own = KeytermBias(index, settings)
    assert own.choose(logits(8)) == 8  # the model's own " Z"
    assert own.choose(logits(PAD, ero=settings.start_margin - 1.0)) == VOCAB.index("ero")


def test_of_two_continuations_the_one_spelling_more_of_the_term_wins_a_near_tie() -> None:
    vocab = ["<pad>", "<s>", "</s>", " El", "iqu", "ie", "i", "is", "'", "s"]
    index = KeytermIndex(vocab, ["Eliquis"], first_text_id=3)

    def row(**logit: float) -> np.ndarray:
        values = np.zeros(len(vocab), dtype=np.float32)
        for text, value in logit.items():
            values[vocab.index(" El" if text == "El" else text)] = value
        return values

    def decode(settings: BiasSettings) -> list[str]:
        bias = KeytermBias(index, settings)
        taken = [bias.choose(row(El=20.0)), bias.choose(row(iqu=20.0))]
        # What int8 Moonshine gave after "iqu" on a test sentence: "ie" best, then "i" a
        # hair above "is"; after "i" it wrote an apostrophe, with "s" out of the margin.
        taken.append(bias.choose(row(ie=19.5, i=14.9, **{"is": 14.8})))
        if vocab[taken[-1]] == "i":
            taken.append(bias.choose(row(**{"'": 18.3, "s": 9.0})))
        return [vocab[t] for t in taken]

    assert decode(BiasSettings()) == [" El", "iqu", "is"]
    assert decode(BiasSettings(continue_boost_per_char=0.0)) == [" El", "iqu", "i", "'"]


def test_padding_between_the_words_of_a_term_keeps_it_going() -> None:
    index = KeytermIndex(VOCAB, ["Si N"], first_text_id=3)
    with_pad = KeytermBias(index, separators=frozenset({PAD}))
    assert with_pad.choose(logits(10, i=1.0)) == 10  # " S" is the model's own pick
    assert with_pad.choose(logits(PAD, i=1.0)) == VOCAB.index("i")
    assert with_pad.choose(logits(PAD, _N=9.0)) == PAD  # a pause before the next word...
    assert with_pad.choose(logits(PAD, _N=7.0)) == VOCAB.index(" N")  # ...which continues it
    without = KeytermBias(index)  # padding that is not a separator ends the term
    for row in (logits(10), logits(PAD, i=1.0), logits(PAD, _N=9.0)):
        without.choose(row)
    assert without.choose(logits(PAD, _N=7.0)) == PAD


def test_server_wide_keyterms_are_checked_when_the_engine_is_built() -> None:
    too_long = "x" * (MAX_KEYTERM_CHARS + 1)
    with pytest.raises(ValueError, match=f"engine.keyterms: .*at most {MAX_KEYTERM_CHARS}"):
        EngineConfig(name="moonshine", keyterms=(too_long,))
    for engine_type in (MoonshineEngine, KyutaiEngine):  # built directly, not from a config
        with pytest.raises(InvalidKeyterms, match=f"at most {MAX_KEYTERM_CHARS}"):
            engine_type(keyterms=(too_long,))
    engine, _ = build_engine(EngineConfig(name="moonshine", keyterms=(" Xarelto ", "xarelto")))
    assert isinstance(engine, MoonshineEngine) and engine.keyterms == ("Xarelto",)


def test_a_bad_server_wide_keyterm_is_a_config_error_naming_its_setting() -> None:
    from api.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"engine\.keyterms: .*at most 60.*KEYTERMS"):
        load_config(environ={"STT_BRIDGE_ENGINE_KEYTERMS": "Xarelto," + "x" * 61})
    config = load_config(environ={"STT_BRIDGE_ENGINE_KEYTERMS": "Xarelto, Siobhan Nguyen"})
    assert config.engine.keyterms == ("Xarelto", "Siobhan Nguyen")
