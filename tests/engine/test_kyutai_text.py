"""Text tokens to timed words and turns: the decoding rules on scripted token sequences.

The tokenizer is a real sentencepiece model (the one the tiny checkpoint ships); the token
sequences are what a Kyutai model emits: 0 before a word, its pieces, padding (3) between.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from engine.base import Word
from engine.kyutai import PADDING_ID, WORD_START_ID, ModelTiming, TextDecoder, TurnDetector
from engine.random_checkpoint import TOKENIZER_NAME, write_checkpoint

TIMING = ModelTiming(delay_s=0.5, prefix_frames=1, flush_frames=19)  # the 1b model's


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> sentencepiece.SentencePieceProcessor:
    folder = write_checkpoint(tmp_path_factory.mktemp("tok"), "tiny")
    return sentencepiece.SentencePieceProcessor(str(folder / TOKENIZER_NAME))


def script(tokenizer: sentencepiece.SentencePieceProcessor, spec: list[str | int]) -> list[int]:
    """Ints stay as they are; a string becomes its pieces (one token per step)."""
    tokens: list[int] = []
    for item in spec:
        tokens += [item] if isinstance(item, int) else list(tokenizer.encode(item))
    return tokens


def decode(decoder: TextDecoder, tokens: list[int]) -> list[Word]:
    out: list[Word] = []
    for step, token in enumerate(tokens):
        out += decoder.feed(step, token)
    return out + decoder.finish(len(tokens))


def seconds(step: int) -> float:
    return round(max(0.0, step / 12.5 - 0.5 - 0.08), 3)


def test_words_are_timed_by_their_steps_minus_delay_and_prefix(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pad, start = PADDING_ID, WORD_START_ID
    tokens = script(tokenizer, [pad] * 9 + [start, "please", pad, pad, start, "hold", pad])
    words = decode(TextDecoder(tokenizer, TIMING), tokens)
    assert [w.text for w in words] == ["please", "hold"]
    please_at = 10
    please_end = please_at + len(tokenizer.encode("please"))
    assert (words[0].start_s, words[0].end_s) == (seconds(please_at), seconds(please_end))
    hold_at = please_end + 3
    assert words[1].start_s == seconds(hold_at)


def test_a_new_word_piece_inside_a_run_starts_a_new_word(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokens = script(tokenizer, [0, "thank", "you", 3, 3])  # no 0 between the two words
    words = decode(TextDecoder(tokenizer, TIMING), tokens)
    assert [w.text for w in words] == ["thank", "you"]
    assert words[0].end_s == words[1].start_s


def test_multi_piece_words_and_out_of_vocabulary_ids(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pieces = list(tokenizer.encode("wednesday"))
    assert len(pieces) > 1, "the test needs a word of several pieces"
    vocab = tokenizer.vocab_size()
    tokens = [3, 0, pieces[0], vocab + 5, *pieces[1:], 3, 3]
    words = decode(TextDecoder(tokenizer, TIMING), tokens)
    assert [w.text for w in words] == ["wednesday"]


def test_a_word_still_open_is_finished_by_the_flush(tokenizer) -> None:  # type: ignore[no-untyped-def]
    decoder = TextDecoder(tokenizer, TIMING)
    out: list[Word] = []
    for step, token in enumerate(script(tokenizer, [3, 0, "goodbye"])):
        out += decoder.feed(step, token)
    assert out == [] and decoder.open_word_start == 2
    assert [w.text for w in decoder.finish(20)] == ["goodbye"]
    assert decoder.open_word_start is None


def test_unstepped_slots_give_no_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    decoder = TextDecoder(tokenizer, TIMING)
    assert decoder.feed(0, -2) == []
    assert decoder.open_word_start is None


def test_the_vad_head_ends_a_turn_once_its_words_are_out(tokenizer) -> None:  # type: ignore[no-untyped-def]
    detector = TurnDetector(TIMING, threshold=0.5, silence_s=1.2)
    decoder = TextDecoder(tokenizer, TIMING)

    def probs(p: float) -> np.ndarray:
        return np.array([0.0, 0.0, p, 0.0], dtype=np.float32)

    # Leading silence: the pause head is high, but there is no word: no turn.
    for step in range(20):
        assert detector.ended(step, probs(0.99), decoder, words_in_turn=False) is None
    # Speech from step 20, then the head sees a pause at step 30; the text is `delay` steps
    # behind, so the turn ends when step 30 + delay is stepped, with the time of step 30.
    fired = None
    for step in range(20, 45):
        p = 0.9 if step >= 30 else 0.05
        text_seen = step >= 20 + TIMING.delay_frames  # the words of audio 20+ come out later
        fired = detector.ended(step, probs(p), decoder, words_in_turn=text_seen)
        if fired is not None:
            assert step == 30 + TIMING.delay_frames
            break
    assert fired == (30, pytest.approx(0.9))


def test_without_a_vad_head_a_silence_in_the_text_ends_the_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    detector = TurnDetector(TIMING, threshold=0.5, silence_s=1.2)
    decoder = TextDecoder(tokenizer, TIMING)
    tokens = script(tokenizer, [0, "hello", 3])
    for step, token in enumerate(tokens):
        decoder.feed(step, token)
    last_text = decoder.last_text_step
    silence = round(1.2 * 12.5)
    for step in range(len(tokens), last_text + silence):
        assert detector.ended(step, None, decoder, words_in_turn=True) is None
    assert detector.ended(last_text + silence, None, decoder, True) == (last_text + 1, 1.0)


def test_tiny_checkpoint_tokenizer_is_the_one_shipped(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path, "tiny")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            "config.json",
            "mimi_config.json",
            "model.safetensors",
            "mimi-pytorch-random@125.safetensors",
            TOKENIZER_NAME,
        ]
    )
