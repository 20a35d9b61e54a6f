"""Twilio Media Streams codec, TwiML and signatures, with the note's messages and vectors."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET

import pytest
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
