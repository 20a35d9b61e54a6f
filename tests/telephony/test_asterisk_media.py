"""chan_websocket codec: MEDIA_START and events byte for byte as Asterisk prints them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from telephony.asterisk_media import (
    FORMATS,
    AsteriskMediaCodec,
    AsteriskMediaError,
    DtmfEnd,
    MediaStart,
    Notice,
    parse_event,
)
from telephony.audio import Encoding, alaw_encode, pcm16_encode, ulaw_encode

# Seen from a genuine Asterisk 22.10.1 (../shared/protocols/asterisk-websocket.md, section 9).
PLAIN_START = (
    "MEDIA_START connection_id:stt channel:WebSocket/stt/0x7f1cc000a6d0 "
    "channel_id:1796276893.2 format:slin16 optimal_frame_size:640 ptime:20"
)
JSON_START = (
    '{"event":"MEDIA_START","connection_id":"stt","channel":"WebSocket/stt/0x7f1cc000a6d0",'
    '"channel_id":"1796276893.2","format":"ulaw","optimal_frame_size":160,"ptime":20,'
    '"channel_variables":{"MEDIA_WEBSOCKET_CONNECTION_ID":"stt",'
    '"MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE":"160","DIALEDPEERNUMBER":"stt/c(ulaw)f(json)"}}'
)


def test_plain_media_start_and_commands() -> None:
    codec = AsteriskMediaCodec(16000)
    start = codec.receive_text(PLAIN_START)
    assert start == MediaStart(
        "stt", "WebSocket/stt/0x7f1cc000a6d0", "1796276893.2", "slin16", 640, 20
    )
    assert isinstance(start, MediaStart)
    assert (start.encoding, start.sample_rate) == (Encoding.PCM16, 16000)
    assert codec.encode_command("ANSWER") == "ANSWER"
    assert codec.encode_command("HANGUP") == "HANGUP"
    assert codec.receive_text("DTMF_END digit:5 channel_id:1796276893.2") == DtmfEnd("5")
    assert codec.receive_text("MEDIA_XOFF") == Notice("MEDIA_XOFF", {})
    error = codec.receive_text(
        "ERROR channel_id:1796276893.2 error_text:SET_MEDIA_DIRECTION only supports JSON format."
    )
    assert error == Notice(
        "ERROR",
        {
            "channel_id": "1796276893.2",
            "error_text": "SET_MEDIA_DIRECTION only supports JSON format.",
        },
    )
    assert parse_event("MEDIA_MARK_PROCESSED mark-7")[1] == {"id": "mark-7"}


def test_json_media_start_labels_and_commands() -> None:
    codec = AsteriskMediaCodec(16000)
    start = codec.receive_text(JSON_START)
    assert isinstance(start, MediaStart) and start.json_format
    assert start.channel_variables["DIALEDPEERNUMBER"] == "stt/c(ulaw)f(json)"
    assert codec.encode_command("ANSWER") == '{"command":"ANSWER"}'
    labels = codec.labels({"tenant": "acme", "channel_id": "spoofed"})
    assert labels["channel_id"] == "1796276893.2" and labels["tenant"] == "acme"
    assert labels["MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE"] == "160" and labels["format"] == "ulaw"
    dtmf = json.dumps({"event": "DTMF_END", "channel_id": "1796276893.2", "digit": "#"})
    assert codec.receive_text(dtmf) == DtmfEnd("#")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_decodes_20_ms_frames_to_the_engine_rate(fmt: str) -> None:
    encoding, rate = FORMATS[fmt]
    codec = AsteriskMediaCodec(16000)
    codec.receive_text(PLAIN_START.replace("slin16", fmt))
    tone = (np.sin(np.arange(rate) * 2 * np.pi * 440 / rate) * 8000).astype(np.int16)
    wire = {
        Encoding.MULAW: ulaw_encode, Encoding.ALAW: alaw_encode, Encoding.PCM16: pcm16_encode
    }[encoding](tone)  # fmt: skip
    frame = rate // 50 * encoding.bytes_per_sample
    out = [codec.receive_audio(wire[i : i + frame]) for i in range(0, len(wire), frame)]
    total = sum(len(o) for o in out) + len(codec.end_of_audio())
    assert abs(total - 16000) <= 2  # one second in, one second out


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        (["DTMF_END digit:1 channel_id:1"], "before MEDIA_START"),
        ([PLAIN_START.replace("slin16", "opus")], "format 'opus' is not served"),
        ([PLAIN_START.replace("slin16", "sln16")], "format 'sln16'"),
        ([PLAIN_START, PLAIN_START], "a second MEDIA_START"),
        (['{"event": 5}'], "without an 'event'"),
        (["{not json"], "neither an event nor JSON"),
        ([PLAIN_START.replace("channel_id:1796276893.2 ", "")], "channel_id"),
    ],
)
def test_what_asterisk_never_sends_is_refused(messages: list[str], complaint: str) -> None:
    codec = AsteriskMediaCodec(16000)
    with pytest.raises(AsteriskMediaError, match=complaint):
        for text in messages:
            codec.receive_text(text)


def test_audio_before_media_start_is_refused_and_hangup_follows_the_format() -> None:
    codec = AsteriskMediaCodec(16000)
    with pytest.raises(AsteriskMediaError, match="audio before MEDIA_START"):
        codec.receive_audio(b"\xff" * 160)
    with pytest.raises(AsteriskMediaError):
        codec.receive_text(JSON_START.replace('"ulaw"', '"g722"'))
    assert codec.encode_command("HANGUP") == '{"command":"HANGUP"}'
