"""AEAP codec: res_speech_aeap's JSON requests in, the answers it accepts out."""

from __future__ import annotations

import json

import pytest

from engine.base import Partial, Segment
from telephony.aeap import (
    SCORE_FINAL,
    SCORE_PARTIAL,
    AeapCodec,
    AeapError,
    Get,
    Recognition,
    Response,
    Set,
    Setup,
    Unknown,
    digits_of,
)

# As a genuine Asterisk 22.10.1 sent it (../shared/protocols/asterisk-aeap.md, section 8).
SETUP = (
    '{"request":"setup","version":"0.1.0","codecs":[{"name":"ulaw"}],'
    '"params":{"language":"en-US"},"id":"4532a1b0-7d4e-4c1f-9a55-0f3b2c1d9e8f"}'
)


def ready(codec_name: str = "ulaw", **params: str) -> AeapCodec:
    codec = AeapCodec(16000)
    setup = codec.receive_text(SETUP.replace('"ulaw"', json.dumps(codec_name)))
    assert isinstance(setup, Setup)
    codec.accept_setup(Setup(setup.id, setup.version, setup.codecs, {**setup.params, **params}))
    return codec


def test_setup_is_answered_with_exactly_the_offered_codec() -> None:
    codec = AeapCodec(16000)
    setup = codec.receive_text(SETUP)
    assert setup == Setup(
        "4532a1b0-7d4e-4c1f-9a55-0f3b2c1d9e8f", "0.1.0", ("ulaw",), {"language": "en-US"}
    )
    assert isinstance(setup, Setup)
    assert json.loads(codec.accept_setup(setup)) == {
        "response": "setup",
        "id": "4532a1b0-7d4e-4c1f-9a55-0f3b2c1d9e8f",
        "codecs": [{"name": "ulaw"}],
    }
    assert codec.settings.extra == {"language": "en-US"}


@pytest.mark.parametrize("name", ["opus", "g722", ""])
def test_codecs_we_do_not_take_fail_the_setup(name: str) -> None:
    codec = AeapCodec(16000)
    setup = codec.receive_text(SETUP.replace('"ulaw"', json.dumps(name)))
    assert isinstance(setup, Setup)
    with pytest.raises(AeapError, match="is not served"):
        codec.accept_setup(setup)


def test_slin_rate_from_params_or_from_the_first_frame() -> None:
    assert ready("slin", sample_rate="48000").decoder(b"\0" * 640).sample_rate == 48000
    inferred = ready("slin")
    assert inferred.decoder(b"\0" * 640).sample_rate == 16000
    assert inferred.decoder(b"\0" * 320).sample_rate == 16000  # told once, then kept
    assert ready("alaw").decoder(b"\0" * 160).sample_rate == 8000
    with pytest.raises(AeapError, match="set @sample_rate"):
        ready("slin").decoder(b"\0" * 100)
    with pytest.raises(AeapError, match="sample_rate must be one of"):
        ready("slin", sample_rate="11025")


def test_requests_and_responses_are_told_apart() -> None:
    codec = ready()
    assert codec.receive_text('{"request":"get","params":["results"],"id":"g1"}') == Get(
        "g1", ("results",)
    )
    assert codec.receive_text('{"request":"set","params":{"dtmf":"12"},"id":"s1"}') == Set(
        "s1", {"dtmf": "12"}
    )
    assert codec.receive_text('{"response":"set","id":"ours"}') == Response("set", "ours")
    assert codec.receive_text('{"request":"hangup","id":"h"}') == Unknown("hangup", "h")
    for bad in ("{", "[]", '{"request":"get"}', '{"id":"x"}', '{"request":"set","id":"x"}'):
        with pytest.raises(AeapError):
            codec.receive_text(bad)
    with pytest.raises(AeapError, match="before setup"):
        AeapCodec(16000).receive_text('{"request":"get","params":["results"],"id":"g1"}')


def test_results_are_pushed_as_asterisk_reads_them() -> None:
    codec = ready()
    recognition = Recognition(1)
    assert not recognition.hear(Partial("My account", 0.1, 0.8))
    assert recognition.hear(Segment("My account number is 4567.", 0.1, 2.4))
    message = json.loads(codec.encode_results(codec.results_of(recognition, final=True)))
    assert message["request"] == "set" and message["id"]
    assert message["params"] == {
        "results": [
            {"text": "My account number is 4567.", "score": SCORE_FINAL, "grammar": "default",
             "best": 0}
        ]
    }  # fmt: skip


def test_get_gives_the_best_hypothesis_so_far_and_settings() -> None:
    codec = ready(grammar="digits")
    recognition = Recognition(1)
    recognition.hear(Partial("four five six", 0.1, 0.8))
    answer = json.loads(codec.answer_get(Get("g1", ("results",)), recognition))
    assert answer == {
        "response": "get",
        "id": "g1",
        "params": {
            "results": [{"text": "456", "score": SCORE_PARTIAL, "grammar": "digits", "best": 0}]
        },
    }
    assert json.loads(codec.answer_get(Get("g2", ("digits",)), None))["params"] == {"digits": "456"}
    assert json.loads(codec.answer_get(Get("g3", ("language",)), None)) == {
        "response": "get", "id": "g3", "params": {"language": "en-US"}
    }  # fmt: skip
    assert "error_msg" in json.loads(codec.answer_get(Get("g4", ("nothing",)), None))
    empty = json.loads(codec.answer_get(Get("g5", ("results",)), Recognition(2)))
    assert empty["params"] == {"results": []}  # SPEECH(results) = 0


def test_settings_from_speech_engine() -> None:
    codec = ready()
    codec.settings.update({"No-Input-Timeout": "3000", "recognition_timeout": "8000"})
    assert codec.settings.no_input_timeout_ms == 3000
    assert codec.settings.recognition_timeout_ms == 8000
    with pytest.raises(AeapError, match="whole number"):
        codec.settings.update({"no_input_timeout": "soon"})


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        ("My account number is four five six seven.", "4567"),
        ("30319.", "30319"),
        ("Oh two, nine 8!", "0298"),
        ("billing please", ""),
    ],
)
def test_digits_of_spoken_numbers(text: str, digits: str) -> None:
    assert digits_of(text) == digits


def test_scores_are_the_segments_confidence_where_the_engine_gives_one() -> None:
    recognition = Recognition(1)
    recognition.hear(Segment("Xarelto twice a day.", 0.0, 1.0, (), 0.8125))
    recognition.hear(Segment("With food.", 1.2, 2.0, (), 0.9))
    assert recognition.score(final=True) == 856  # 1000 x the mean of 0.8125 and 0.9
    recognition.hear(Partial("and", 2.1, 2.4))
    assert recognition.score(final=True) == SCORE_PARTIAL  # words still being spoken
    unknown = Recognition(2)
    unknown.hear(Segment("Hello.", 0.0, 1.0))  # an engine without confidences
    assert unknown.score(final=True) == SCORE_FINAL
    assert unknown.score(final=False) == SCORE_PARTIAL
