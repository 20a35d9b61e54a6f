"""AudioHookCodec, PhraseCutter, transcript entities and the upgrade signature, byte by byte,
with messages from ../shared/protocols/audiohook.md and Genesys's reference implementation."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from multidict import CIMultiDict

from engine.base import Word
from telephony.audiohook import (
    Audio,
    AudioHookCodec,
    AudioHookConfig,
    AudioHookError,
    Close,
    Ignored,
    MediaFormat,
    Open,
    Paused,
    PhraseCutter,
    Ping,
    Resumed,
    Update,
    duration,
    parse_duration,
    transcript_entity,
)
from telephony.audiohook_signature import sign_request, verify_request

SID = "30b0e395-84d3-4570-ac13-9a62d8f514c0"
ORG = "d7934305-0972-4844-938e-9060eef73d05"
PARTICIPANT = {"id": "883efee8-3d6c-4537-b500-6d7ca4b92fa0", "ani": "+1-555-555-1234"}
STEREO = {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000}
MONO = {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}


def client(seq: int, kind: str, params: dict[str, Any], position: str = "PT0S", **kw: Any) -> str:
    message = {
        "version": "2",
        "id": SID,
        "type": kind,
        "seq": seq,
        "serverseq": kw.get("serverseq", 0),
        "position": position,
        "parameters": params,
    }
    return json.dumps(message)


OPEN = client(
    1,
    "open",
    {
        "organizationId": ORG,
        "conversationId": "090eaa2f-72fa-480a-83e0-8667ff89c0ec",
        "participant": PARTICIPANT,
        "media": [STEREO, MONO],
        "language": "en-US",
        "customConfig": {"queue": "billing"},
        "supportedLanguages": True,
    },
)


def opened_codec(media: dict[str, Any] = STEREO) -> AudioHookCodec:
    codec = AudioHookCodec(SID)
    event = codec.receive_text(OPEN.replace(json.dumps([STEREO, MONO]), json.dumps([media])))
    assert isinstance(event, Open)
    codec.opened(event.media)
    return codec


def test_open_takes_the_first_supported_offer_and_opened_echoes_it() -> None:
    codec = AudioHookCodec(SID)
    event = codec.receive_text(OPEN)
    assert isinstance(event, Open)
    assert event.media == MediaFormat("PCMU", 8000, ("external", "internal"))
    assert event.organization_id == ORG and event.participant.ani == "+1-555-555-1234"
    assert event.wants_languages and event.custom_config == {"queue": "billing"}
    opened = json.loads(codec.opened(event.media, ["en-US"]))
    assert opened == {
        "version": "2",
        "id": SID,
        "type": "opened",
        "seq": 1,
        "clientseq": 1,
        "parameters": {"media": [STEREO], "startPaused": False, "supportedLanguages": ["en-US"]},
    }
    # A second open is ignored, as upstream does.
    assert isinstance(codec.receive_text(client(2, "open", {})), Ignored)


def test_unsupported_offers_leave_no_media() -> None:
    codec = AudioHookCodec(SID)
    l24 = {**MONO, "format": "L24"}
    rate = {**MONO, "rate": 16000}
    event = codec.receive_text(OPEN.replace(json.dumps([STEREO, MONO]), json.dumps([l24, rate])))
    assert isinstance(event, Open) and event.media is None and len(event.offered) == 2


def test_ping_pong_and_sequence_numbers() -> None:
    codec = opened_codec()
    assert codec.receive_text(client(2, "ping", {"rtt": "PT0.05S"}, serverseq=1)) == Ping(0.05)
    pong = json.loads(codec.pong())
    assert (pong["type"], pong["seq"], pong["clientseq"], pong["parameters"]) == ("pong", 2, 2, {})
    with pytest.raises(AudioHookError, match="seq"):
        codec.receive_text(client(4, "ping", {}, serverseq=2))  # skips 3
    with pytest.raises(AudioHookError, match="serverseq"):
        codec.receive_text(client(3, "ping", {}, serverseq=9))
    with pytest.raises(AudioHookError, match="identifier"):
        codec.receive_text(client(4, "ping", {}).replace(SID, ORG))


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        json.dumps({"version": "1", "id": SID, "type": "ping", "seq": 1, "serverseq": 0}),
        client(1, "shout", {}),
        client(1, "ping", {}, "12 seconds"),
    ],
)
def test_malformed_messages_are_protocol_errors(text: str) -> None:
    with pytest.raises(AudioHookError):
        AudioHookCodec(SID).receive_text(text)


def test_stereo_frames_split_into_channels_and_advance_the_position() -> None:
    codec = opened_codec()
    frame = bytes([1, 2, 3, 4, 5, 6])  # external 1 3 5, internal 2 4 6
    audio = codec.receive_audio(frame)
    assert audio == Audio({"external": b"\x01\x03\x05", "internal": b"\x02\x04\x06"}, 3, 0)
    assert codec.receive_audio(frame).position == 3 and codec.position == 6
    with pytest.raises(AudioHookError, match="whole number"):
        codec.receive_audio(b"\x01\x02\x03")


def test_l16_mono_frames_count_two_bytes_a_sample() -> None:
    codec = opened_codec({**MONO, "format": "L16"})
    audio = codec.receive_audio(b"\x01\x00\x02\x00")
    assert audio.samples == 2 and audio.channels == {"external": b"\x01\x00\x02\x00"}


def test_audio_only_while_active_and_paused_audio_is_not_counted() -> None:
    codec = AudioHookCodec(SID)
    with pytest.raises(AudioHookError, match="CONNECTED"):
        codec.receive_audio(b"\xff\xff")
    codec = opened_codec(MONO)
    codec.receive_audio(b"\xff" * 800)
    assert codec.receive_text(client(2, "paused", {}, "PT0.1S")) == Paused(800)
    with pytest.raises(AudioHookError, match="PAUSED"):
        codec.receive_audio(b"\xff" * 800)
    resumed = codec.receive_text(
        client(3, "resumed", {"start": "PT0.1S", "discarded": "PT10S"}, "PT0.1S")
    )
    assert resumed == Resumed(0.1, 10.0)
    assert codec.receive_audio(b"\xff" * 800).position == 800  # the pause counts nothing
    update = codec.receive_text(client(4, "update", {"language": "fr-FR"}, "PT0.2S"))
    assert update == Update("fr-FR", 1600) and codec.language == "fr-FR"


def test_close_then_closed_and_disconnect() -> None:
    codec = opened_codec(MONO)
    codec.receive_audio(b"\xff" * 1600)
    event = codec.receive_text(client(2, "close", {"reason": "end"}, "PT0.2S"))
    assert event == Close("end", 0.2, 1600)
    assert codec.can_send_events  # the last transcripts go out while closing
    closed = json.loads(codec.closed())
    assert (closed["type"], closed["seq"], closed["clientseq"]) == ("closed", 2, 2)
    assert not codec.can_send_events
    other = AudioHookCodec(SID)
    message = json.loads(other.disconnect("unauthorized", "bad signature"))
    assert message["parameters"] == {"reason": "unauthorized", "info": "bad signature"}


def test_durations() -> None:
    assert duration(12.34) == "PT12.34S" and duration(0) == "PT0S" and duration(1.0) == "PT1S"
    assert parse_duration("PT6.3S") == 6.3 and parse_duration("PT.5S") == 0.5
    for bad in ("6.3", "PT6.3", "P1DT2S", 6.3):
        with pytest.raises(AudioHookError):
            parse_duration(bad)


def w(text: str, start: float, end: float, confidence: float = 0.9) -> Word:
    return Word(text, start, end, confidence)


def test_phrases_end_at_a_pause_of_0_4_s_and_at_cuts() -> None:
    cutter = PhraseCutter(1)
    words = [w("my", 0.1, 0.3), w("name", 0.35, 0.6), w("is", 1.1, 1.2), w("ann", 1.25, 1.5)]
    phrases = cutter.phrases(words)
    assert [[x.text for x in p.words] for p in phrases] == [["my", "name"], ["is", "ann"]]
    cutter.cut_at(2.2)  # paused here
    spoken = [w("and", 2.0, 2.15), w("more", 2.2, 2.4), w("words", 2.45, 2.7)]
    phrases = cutter.phrases(spoken)
    assert [[x.text for x in p.words] for p in phrases] == [["and"], ["more", "words"]]
    assert [p.channel_id for p in phrases] == [1, 1]
    # The cut is spent: a later segment is not cut by it again.
    assert len(cutter.phrases([w("a", 3.0, 3.1), w("b", 3.2, 3.3)])) == 1


def test_transcript_entity_fields() -> None:
    (phrase,) = PhraseCutter(0).phrases([w("hello", 1.2, 1.5, 0.8), w("there", 1.5, 1.9, 0.6)])
    entity = transcript_entity(phrase, "en-US")
    data = entity["data"]
    assert entity["type"] == "transcript" and len(data["id"]) == 36
    assert (data["channelId"], data["isFinal"], data["offset"]) == (0, True, "PT1.2S")
    assert data["duration"] == "PT0.7S"
    (alternative,) = data["alternatives"]
    assert alternative["confidence"] == 0.7 and alternative["languages"] == ["en-US"]
    assert alternative["interpretations"] == [
        {
            "type": "display",
            "transcript": "hello there",
            "tokens": [
                {
                    "type": "word",
                    "value": "hello",
                    "confidence": 0.8,
                    "offset": "PT1.2S",
                    "duration": "PT0.3S",
                },
                {
                    "type": "word",
                    "value": "there",
                    "confidence": 0.6,
                    "offset": "PT1.5S",
                    "duration": "PT0.4S",
                },
            ],
        }
    ]


def test_config_reads_client_secrets() -> None:
    config = AudioHookConfig(client_secrets=("key1:c2VjcmV0", "key2:"))
    assert config.secrets() == {"key1": b"secret", "key2": b""}
    for bad in ("no-colon", "key:not base64!"):
        with pytest.raises(ValueError, match="client_secrets"):
            AudioHookConfig(client_secrets=(bad,))


# Genesys's AudioHook documentation example, as upstream's signature-verifier.test.ts has it.
DOC_HEADERS = {
    "host": "audiohook.example.com",
    "audiohook-organization-id": ORG,
    "audiohook-session-id": SID,
    "audiohook-correlation-id": "e160e428-53e2-487c-977d-96989bf5c99d",
    "x-api-key": "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh",
    "signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:",
    "signature-input": 'sig1=("@request-target" "@authority" "audiohook-organization-id" '
    '"audiohook-session-id" "audiohook-correlation-id" "x-api-key");'
    'keyid="SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh";nonce="VGhpc0lzQVVuaXF1ZU5vbmNl";'
    'alg="hmac-sha256";created=1641013200;expires=3282026430',
}
DOC_SECRET = base64.b64decode("TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU=")
DOC_TARGET = "/api/v1/voicebiometrics/ws"


def doc_secret(key: str) -> bytes | None:
    return DOC_SECRET if key == DOC_HEADERS["x-api-key"] else None


def test_genesys_documentation_signature_verifies() -> None:
    headers = CIMultiDict(DOC_HEADERS)
    assert verify_request(headers, DOC_TARGET, doc_secret, now=1641013201).verified


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"audiohook-session-id": "00000000-0000-0000-0000-000000000000"}, "FAILED"),
        ({"host": "evil.example.com"}, "FAILED"),
        ({"signature": "sig1=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:"}, "FAILED"),
        ({"signature": ""}, "INVALID"),
        ({"signature": "", "signature-input": ""}, "UNSIGNED"),
        ({"signature-input": "sig1=(("}, "INVALID"),
        ({"x-api-key": "another-key"}, "PRECONDITION"),  # keyid mismatch
    ],
)
def test_changed_requests_fail(change: dict[str, str], code: str) -> None:
    headers = CIMultiDict({**DOC_HEADERS, **change})
    result = verify_request(headers, DOC_TARGET, doc_secret, now=1641013201)
    assert result.code == code, result


def test_age_and_skew_as_upstream_counts_them() -> None:
    headers = CIMultiDict(DOC_HEADERS)
    assert verify_request(headers, DOC_TARGET, doc_secret, now=1641013206).verified
    assert verify_request(headers, DOC_TARGET, doc_secret, now=1641013208).code == "EXPIRED"
    assert verify_request(headers, DOC_TARGET, doc_secret, now=1641013190).code == "PRECONDITION"
    assert verify_request(headers, "/other", doc_secret, now=1641013201).code == "FAILED"


def test_sign_request_builds_what_the_verifier_takes() -> None:
    components = {
        "@request-target": DOC_TARGET,
        "@authority": DOC_HEADERS["host"],
        "audiohook-organization-id": ORG,
        "audiohook-session-id": SID,
        "audiohook-correlation-id": DOC_HEADERS["audiohook-correlation-id"],
        "x-api-key": DOC_HEADERS["x-api-key"],
    }
    signed = sign_request(
        components, DOC_HEADERS["x-api-key"], DOC_SECRET, "VGhpc0lzQVVuaXF1ZU5vbmNl", 1641013200
    )
    assert signed["Signature-Input"] == DOC_HEADERS["signature-input"].replace(
        "3282026430", "1641013230"
    )
    headers = CIMultiDict({**DOC_HEADERS, **{k.lower(): v for k, v in signed.items()}})
    assert verify_request(headers, DOC_TARGET, doc_secret, now=1641013201).verified
    short_nonce = sign_request(
        components, DOC_HEADERS["x-api-key"], DOC_SECRET, "short", 1641013200
    )
    headers = CIMultiDict({**DOC_HEADERS, **{k.lower(): v for k, v in short_nonce.items()}})
    assert verify_request(headers, DOC_TARGET, doc_secret, now=1641013201).code == "PRECONDITION"
    # An unsigned request passes only for a key whose secret is empty.
    bare = CIMultiDict({k: v for k, v in DOC_HEADERS.items() if not k.startswith("signature")})
    assert verify_request(bare, DOC_TARGET, lambda key: b"", now=1641013201).verified
    assert verify_request(bare, DOC_TARGET, doc_secret, now=1641013201).code == "UNSIGNED"
