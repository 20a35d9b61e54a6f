"""Twilio Media Streams codec, TwiML and signatures, with the note's messages and vectors."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from api.config import TwilioConfig
from telephony.twilio import (
    Connected,
    DtmfDigit,
    MarkEcho,
    Skipped,
    StreamStarted,
    StreamStopped,
    TwilioMediaCodec,
    TwilioStreamError,
    stream_url,
    voice_twiml,
)
from telephony.ws_front import Media
from tests.telephony.media_road import media_variants, outcome

SID = "MZ" + "0" * 32
START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": "AC" + "1" * 32,
        "streamSid": SID,
        "callSid": "CA" + "2" * 32,
        "tracks": ["inbound", "outbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"From": "+15005550006", "To": "+15005550001"},
    },
    "streamSid": SID,
}


def media(track: str, payload: bytes, timestamp: int = 0) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": "4",
            "media": {
                "track": track,
                "chunk": "2",
                "timestamp": str(timestamp),
                "payload": base64.b64encode(payload).decode(),
            },
            "streamSid": SID,
        }
    )


def started() -> TwilioMediaCodec:
    codec = TwilioMediaCodec()
    event = codec.receive(json.dumps(START))
    assert event == StreamStarted(
        SID,
        "CA" + "2" * 32,
        "AC" + "1" * 32,
        ("inbound", "outbound"),
        {"From": "+15005550006", "To": "+15005550001"},
    )
    return codec


def test_connected_start_media_dtmf_mark_stop() -> None:
    codec = TwilioMediaCodec()
    assert codec.receive('{"event": "connected", "protocol": "Call", "version": "1.0.0"}') == (
        Connected("Call", "1.0.0")
    )
    codec = started()
    assert codec.receive(media("outbound", b"\xff\x7f", 40)) == Media("agent", b"\xff\x7f", 40)
    dtmf = {"event": "dtmf", "streamSid": SID, "dtmf": {"track": "inbound_track", "digit": "1"}}
    assert codec.receive(json.dumps(dtmf)) == DtmfDigit("1")
    mark = {"event": "mark", "streamSid": SID, "mark": {"name": "my label"}}
    assert codec.receive(json.dumps(mark)) == MarkEcho("my label")
    assert codec.receive(json.dumps({"event": "stop", "streamSid": SID})) == StreamStopped()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"event": "hello"}', "unknown event"),
        ('{"event": "media", "media": {"track": "inbound", "payload": "%%%"}}', "not base64"),
        ('{"event": "media", "media": {"track": "sideways", "payload": ""}}', "unknown track"),
        ('{"event": "media", "media": {"track": "inbound"}}', "malformed media"),
    ],
)
def test_bad_messages_are_skipped(text: str, reason: str) -> None:
    event = started().receive(text)
    assert isinstance(event, Skipped) and reason in event.reason


def test_media_before_start_ends_the_stream() -> None:
    with pytest.raises(TwilioStreamError, match="media before start"):
        TwilioMediaCodec().receive(media("inbound", b"\xff"))


def test_second_start_ends_the_stream() -> None:
    with pytest.raises(TwilioStreamError, match="second start"):
        started().receive(json.dumps(START))


# --- the media message's short road ---------------------------------------------------------------
# `receive` against `read`, the full reading: tests/telephony/media_road.py.

AUDIO = bytes(range(96, 256))  # 160 bytes whose base64 has "/" and "+"
PAYLOAD = base64.b64encode(AUDIO).decode()
GOOD = {"track": "inbound", "chunk": "2", "timestamp": "40", "payload": PAYLOAD}


def with_media(media: object, **extra: object) -> str:
    return json.dumps({"event": "media", "sequenceNumber": "4", "media": media, **extra})


def twilio_media_variants() -> list[str]:
    """Media messages as Twilio sends them, and every way one can be off."""
    odd: dict[str, list[object]] = {
        "track": ["outbound", "sideways", "", None, 5, ["inbound"], {"a": 1}],
        "timestamp": [
            *("0", 40, 40.7, "40.7", "1e3", "-20", " 7 ", "abc", "inf", "1e999", "nan"),
            *(True, None, [], {}),
        ],
        "payload": [
            *("", "%%%", "AAAA====", "AA==AA", "AAA", "A\nAAA", "\u00ff\u00ff"),
            *(5, None, [], {}),
        ],
    }
    good = json.dumps(GOOD)
    return [
        with_media(GOOD, streamSid=SID),
        media("outbound", b"", 0),
        *media_variants(with_media, GOOD, odd),
        '{"event":"media","media":' + good + ',"event":"mark","mark":{"name":"m"}}',
        '{"event":"media","media":' + good + ',"x":[[{"a":[]}]]}',
        '{"event":"media","media":' + good + ',"x":"' + "{" * 70 + '"}',  # brackets in a string
        '{"event":"media","media":' + good + ',"n":NaN}',
        ' { "event" : "media" ,\n "media" : ' + good + " } ",
        '{"event":"Media","media":' + good + "}",
        "[" + with_media(GOOD) + "]",
    ]


@pytest.mark.parametrize("text", twilio_media_variants())
def test_media_short_road_answers_as_the_full_read(text: str) -> None:
    assert outcome(started().receive, text) == outcome(started().read, text)
    fresh = TwilioMediaCodec()
    assert outcome(fresh.receive, text) == outcome(TwilioMediaCodec().read, text)


def test_media_answers_byte_for_byte() -> None:
    codec = started()
    assert codec.receive(with_media(GOOD, streamSid=SID)) == Media("caller", AUDIO, 40)
    escaped = with_media(GOOD).replace("/", "\\/")
    assert escaped != with_media(GOOD) and codec.receive(escaped) == Media("caller", AUDIO, 40)
    for stamp, at in (("40.7", 40), ("1e3", 1000), ("-20", -20), (40.7, 40), (7, 7)):
        assert codec.receive(with_media({**GOOD, "timestamp": stamp})) == Media("caller", AUDIO, at)
    assert codec.receive(with_media({**GOOD, "payload": "AAAA===="})) == Media(
        "caller", b"\0\0\0", 40
    )
    for payload in ("%%%", "AA==AA", "\u00ff"):
        bad = with_media({**GOOD, "payload": payload})
        assert codec.receive(bad) == Skipped("media payload is not base64")
    assert codec.receive(with_media({**GOOD, "payload": 5})) == Skipped(
        "malformed media message: TypeError("
        "\"argument should be a bytes-like object or ASCII string, not 'int'\")"
    )
    deep = '{"event":"media","media":' + json.dumps(GOOD) + ',"x":' + "[" * 70 + "]" * 70 + "}"
    assert codec.receive(deep) == Skipped("not JSON")


def test_media_of_the_note_takes_the_short_road() -> None:
    class Reads(TwilioMediaCodec):
        count = 0

        def read(self, text: str) -> Any:
            self.count += 1
            return super().read(text)

    codec = Reads()
    codec.receive(json.dumps(START))
    assert codec.count == 1
    # The note's message (section 2), its payload made whole.
    text = (
        '{"event": "media", "sequenceNumber": "4",\n "media": {"track": "inbound", "chunk": "2", '
        '"timestamp": "5", "payload": "' + PAYLOAD + '"},\n "streamSid": "' + SID + '"}'
    )
    assert codec.receive(text) == Media("caller", AUDIO, 5)
    assert codec.receive(media("outbound", b"\xff", 20)) == Media("agent", b"\xff", 20)
    assert codec.count == 1


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["inbound", "outbound", PAYLOAD, "40", "1e999", "AAAA====", "%%"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.text(), SCALARS))


@settings(max_examples=300, deadline=None, database=None)
@given(
    fields=st.dictionaries(st.sampled_from(["track", "timestamp", "payload", "chunk"]), VALUES),
    extra=st.dictionaries(st.sampled_from(["streamSid", "x", "event"]), VALUES, max_size=2),
)
def test_media_short_road_answers_as_the_full_read_generated(
    fields: dict[str, Any], extra: dict[str, Any]
) -> None:
    text = json.dumps({"event": "media", "media": {**GOOD, **fields}, **extra})
    assert outcome(started().receive, text) == outcome(started().read, text)


def test_twiml_starts_a_both_tracks_stream_then_dials() -> None:
    form = {"CallSid": "CA" + "2" * 32, "From": "+15005550006", "To": "+15005550001"}
    config = TwilioConfig(dial="+15005550002")
    root = ET.fromstring(voice_twiml("https://bridge.example.com", form, config))
    stream = root.find("Start/Stream")
    assert stream is not None
    assert stream.get("url") == "wss://bridge.example.com/twilio/media"
    assert stream.get("track") == "both_tracks"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == form
    assert [child.tag for child in root] == ["Start", "Dial"]
    assert root.find("Dial").text == "+15005550002"  # type: ignore[union-attr]


def test_twiml_pauses_when_nothing_to_dial() -> None:
    root = ET.fromstring(voice_twiml("https://b.example.com/", {}, TwilioConfig(pause_s=60)))
    assert [child.tag for child in root] == ["Start", "Pause"]
    assert root.find("Pause").get("length") == "60"  # type: ignore[union-attr]


def test_stream_url_signature_vector() -> None:
    # Vector 3 of the note: the upgrade request is signed as wss://host/path, no params.
    url = stream_url("https://bridge.example.com")
    validator = RequestValidator("0123456789abcdef0123456789abcdef")
    assert validator.validate(url, {}, "nPw+nZIzNlb4/A2jsIh3MO8SVBE=")
