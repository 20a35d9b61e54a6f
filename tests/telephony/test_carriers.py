"""The carriers' codecs, byte for byte with the messages of ../shared/protocols/carriers.md
(payloads made whole: the note shortens them)."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from telephony.audio import AudioDecoder, Encoding, alaw_encode, ulaw_encode
from telephony.carriers.events import (
    AudioFormat,
    CarrierStreamError,
    Dtmf,
    Media,
    Skipped,
    Started,
    Stopped,
)
from telephony.carriers.jambonz import JambonzCodec
from telephony.carriers.json_streams import (
    EXOTEL,
    PLIVO,
    SIGNALWIRE,
    TELNYX,
    Dialect,
    JsonStreamCodec,
    encoding_of,
)
from telephony.carriers.vonage import VonageCodec
from tests.telephony.media_road import media_variants, outcome

TONE = (np.sin(np.arange(160) * 0.3) * 8000).astype(np.int16)
B64_ULAW = base64.b64encode(ulaw_encode(TONE)).decode()
B64_L16_LE = base64.b64encode(TONE.astype("<i2").tobytes()).decode()

TELNYX_CONNECTED = '{"event":"connected","version":"1.0.0"}'
TELNYX_START = (
    '{"event":"start","sequence_number":"1","start":{"user_id":"3E6F995F-85F7-4705-9741-53B116D28237",'
    '"call_control_id":"v3:Zq0mT1kXcA7d9vYQy2Jb3sR8uW5eLnHp4oGiVfBtKx6MzDa","call_session_id":'
    '"9b0c6f4e-1d2a-11f1-8c3e-02420a0f0b45","from":"+13125550143","to":"+13125550177","tags":'
    '["support"],"client_state":"eyJ0ZW5hbnQiOiJhY21lIn0=","custom_parameters":{"ticket":"T4411"},'
    '"media_format":{"encoding":"PCMU","sample_rate":8000,"channels":1}},"stream_id":'
    '"6B1F2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D"}'
)
TELNYX_MEDIA = (
    '{"event":"media","sequence_number":"4","media":{"track":"inbound","chunk":"3","timestamp":'
    '"40","payload":"' + B64_ULAW + '"},"stream_id":"6B1F2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D"}'
)
TELNYX_DTMF = (
    '{"event":"dtmf","stream_id":"6B1F2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D","occurred_at":'
    '"2026-11-02T14:03:11.482910Z","sequence_number":"212","dtmf":{"digit":"5"}}'
)
TELNYX_MARK = (
    '{"event":"mark","stream_id":"6B1F2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D","sequence_number":"230",'
    '"mark":{"name":"greeting-done"}}'
)
TELNYX_ERROR = (
    '{"event":"error","payload":{"code":100003,"title":"malformed_frame","detail":"Received '
    'frame was not formed correctly"},"stream_id":"6B1F2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D"}'
)
TELNYX_STOP = (
    '{"event":"stop","sequence_number":"245","stop":{"user_id":"3E6F995F-85F7-4705-9741-'
    '53B116D28237","call_control_id":"v3:Zq0mT1kXcA7d9vYQy2Jb3sR8uW5eLnHp4oGiVfBtKx6MzDa"},'
    '"stream_id":"6B1F2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D"}'
)


def codec(dialect: Dialect, text: str, **query: str) -> tuple[JsonStreamCodec, Started]:
    c = JsonStreamCodec(dialect, query)
    started = c.receive(text)
    assert isinstance(started, Started)
    return c, started


def test_telnyx_stream_from_connected_to_stop() -> None:
    c = JsonStreamCodec(TELNYX, {})
    assert isinstance(c.receive(TELNYX_CONNECTED), Skipped)
    started = c.receive(TELNYX_START)
    assert started == Started(
        call_id="v3:Zq0mT1kXcA7d9vYQy2Jb3sR8uW5eLnHp4oGiVfBtKx6MzDa",
        legs=("caller",),
        audio=AudioFormat(Encoding.MULAW, 8000),
        labels={
            "ticket": "T4411",
            "call_control_id": "v3:Zq0mT1kXcA7d9vYQy2Jb3sR8uW5eLnHp4oGiVfBtKx6MzDa",
            "call_session_id": "9b0c6f4e-1d2a-11f1-8c3e-02420a0f0b45",
            "stream_id": "6B1F2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D",
            "user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
            "from": "+13125550143",
            "to": "+13125550177",
            "client_state": "eyJ0ZW5hbnQiOiJhY21lIn0=",
            "tags": "support",
        },
        parameters={"ticket": "T4411"},
    )
    assert c.receive(TELNYX_MEDIA) == Media("caller", ulaw_encode(TONE), 40)
    assert c.receive(TELNYX_DTMF) == Dtmf("5")
    assert isinstance(c.receive(TELNYX_MARK), Skipped)
    error = c.receive(TELNYX_ERROR)
    assert isinstance(error, Skipped) and "malformed_frame" in error.reason
    assert c.receive(TELNYX_STOP) == Stopped("stop")


def test_telnyx_tracks_come_from_the_stream_url_and_l16_is_network_order() -> None:
    start = json.loads(TELNYX_START)
    start["start"]["media_format"] = {"encoding": "L16", "sample_rate": 16000, "channels": 1}
    c, started = codec(TELNYX, json.dumps(start), track="both_tracks")
    assert started.legs == ("caller", "agent")
    assert started.audio == AudioFormat(Encoding.PCM16_BE, 16000)
    outbound = TELNYX_MEDIA.replace('"inbound"', '"outbound"')
    assert c.receive(outbound) == Media("agent", ulaw_encode(TONE), 40)
    # Big-endian samples decode to the same numbers as the little-endian ones.
    decoder = AudioDecoder(Encoding.PCM16_BE, 16000, 16000)
    np.testing.assert_array_equal(decoder.feed(TONE.astype(">i2").tobytes()), TONE)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("PCMU", Encoding.MULAW),
        ("audio/x-mulaw", Encoding.MULAW),
        ("PCMA", Encoding.ALAW),
        ("audio/x-alaw", Encoding.ALAW),
        ("audio/x-L16", Encoding.PCM16),
        ("audio/x-l16;rate=16000", Encoding.PCM16),
        ("L16", Encoding.PCM16),
    ],
)
def test_encoding_names(name: str, expected: Encoding) -> None:
    assert encoding_of(name) is expected


@pytest.mark.parametrize("name", ["G722", "OPUS", "AMR-WB", "audio/x-flac"])
def test_codecs_without_a_decoder_refuse_the_stream(name: str) -> None:
    start = json.loads(TELNYX_START)
    start["start"]["media_format"]["encoding"] = name
    with pytest.raises(CarrierStreamError, match="unsupported media encoding"):
        JsonStreamCodec(TELNYX, {}).receive(json.dumps(start))


SIGNALWIRE_START = (
    '{"event":"start","sequenceNumber":"1","start":{"streamSid":"7d56cc11-536d-4a45-b4fb-'
    'ed3d55be843b","accountSid":"b08dacad-2f6c-4de1-93d6-cc732e0c69c5","callSid":"76ac3c36-'
    '56da-4a3e-a0d6-b5f8df6da9ad","tracks":["inbound"],"customParameters":{"ticket":"T4411"},'
    '"mediaFormat":{"encoding":"audio/x-L16","sampleRate":16000,"channels":1}}}'
)


def test_signalwire_l16_at_16_and_24_khz_and_its_bare_stop() -> None:
    c = JsonStreamCodec(SIGNALWIRE, {})
    assert isinstance(
        c.receive('{"event":"connected","protocol":"Call","version":"0.2.0"}'), Skipped
    )
    started = c.receive(SIGNALWIRE_START)
    assert isinstance(started, Started)
    assert started.call_id == "76ac3c36-56da-4a3e-a0d6-b5f8df6da9ad"
    assert started.audio == AudioFormat(Encoding.PCM16, 16000)
    assert started.labels["stream_sid"] == "7d56cc11-536d-4a45-b4fb-ed3d55be843b"
    assert started.labels["ticket"] == "T4411"
    media = (
        '{"event":"media","sequenceNumber":"2","media":{"track":"inbound","chunk":"1",'
        '"timestamp":"0","payload":"' + B64_L16_LE + '"}}'
    )
    assert c.receive(media) == Media("caller", TONE.astype("<i2").tobytes(), 0)
    dtmf = (
        '{"event":"dtmf","streamSid":"7d56cc11-536d-4a45-b4fb-ed3d55be843b","sequenceNumber":'
        '"25","dtmf":{"duration":2700,"digit":"8"}}'
    )
    assert c.receive(dtmf) == Dtmf("8")
    assert isinstance(c.receive('{"event":"clear","streamSid":"7d56cc11"}'), Skipped)
    assert c.receive('{"event":"stop","sequenceNumber":"1002"}') == Stopped("stop")
    _, at24 = codec(SIGNALWIRE, SIGNALWIRE_START.replace("16000", "24000"))
    assert at24.audio == AudioFormat(Encoding.PCM16, 24000)
    _, pcmu = codec(SIGNALWIRE, SIGNALWIRE_START.replace("audio/x-L16", "audio/x-mulaw"))
    assert pcmu.audio == AudioFormat(Encoding.MULAW, 16000)


EXOTEL_START = (
    '{"event":"start","sequence_number":1,"stream_sid":"a4f3c2b1d0e9f8a7b6c5d4e3f2a1b0c9","start":'
    '{"stream_sid":"a4f3c2b1d0e9f8a7b6c5d4e3f2a1b0c9","call_sid":"7c1e9f0b2d3a4c5e6f708192a3b4c5d6",'
    '"account_sid":"acmeindia1","from":"+919876543210","to":"+918047491899","custom_parameters":'
    '{"ticket":"T4411"},"media_format":{"encoding":"raw","sample_rate":"8000","bit_rate":"128"}}}'
)


def test_exotel_slin_with_string_rate_dtmf_and_stop_reason() -> None:
    c = JsonStreamCodec(EXOTEL, {})
    assert isinstance(c.receive('{"event":"connected"}'), Skipped)
    started = c.receive(EXOTEL_START)
    assert isinstance(started, Started)
    assert started.call_id == "7c1e9f0b2d3a4c5e6f708192a3b4c5d6"
    assert started.audio == AudioFormat(Encoding.PCM16, 8000)
    assert started.labels == {
        "ticket": "T4411",
        "call_sid": "7c1e9f0b2d3a4c5e6f708192a3b4c5d6",
        "stream_sid": "a4f3c2b1d0e9f8a7b6c5d4e3f2a1b0c9",
        "account_sid": "acmeindia1",
        "from": "+919876543210",
        "to": "+918047491899",
    }
    media = (
        '{"event":"media","sequence_number":3,"stream_sid":"a4f3c2b1d0e9f8a7b6c5d4e3f2a1b0c9",'
        '"media":{"chunk":2,"timestamp":"100","payload":"' + B64_L16_LE + '"}}'
    )
    assert c.receive(media) == Media("caller", TONE.astype("<i2").tobytes(), 100)
    dtmf = (
        '{"event":"dtmf","sequence_number":7,"stream_sid":"a4f3c2b1d0e9f8a7b6c5d4e3f2a1b0c9",'
        '"dtmf":{"duration":"200","digit":"5"}}'
    )
    assert c.receive(dtmf) == Dtmf("5")
    stop = (
        '{"event":"stop","sequence_number":20,"stream_sid":"a4f3c2b1d0e9f8a7b6c5d4e3f2a1b0c9",'
        '"stop":{"call_sid":"7c1e9f0b2d3a4c5e6f708192a3b4c5d6","account_sid":"acmeindia1",'
        '"reason":"callended"}}'
    )
    assert c.receive(stop) == Stopped("stop: callended")


def test_exotel_camel_case_names_query_rate_and_beta_mulaw() -> None:
    start = json.loads(EXOTEL_START)
    inner = start["start"]
    inner["callSid"] = inner.pop("call_sid")
    inner["streamSid"] = inner.pop("stream_sid")
    del inner["media_format"]
    _, started = codec(EXOTEL, json.dumps(start), **{"sample-rate": "16000"})
    assert started.call_id == "7c1e9f0b2d3a4c5e6f708192a3b4c5d6"
    assert started.audio == AudioFormat(Encoding.PCM16, 16000)
    inner["media_format"] = {"encoding": "audio/x-mulaw;rate=8000", "sample_rate": "8000"}
    _, beta = codec(EXOTEL, json.dumps(start))
    assert beta.audio == AudioFormat(Encoding.MULAW, 8000)


PLIVO_START = (
    '{"event":"start","sequenceNumber":1,"start":{"callId":"4f7c2a8e-6b1d-4e0a-9c55-2d8e1f3a7b90",'
    '"streamId":"b2e9d4c1-7a3f-4c8e-8d21-5f6a0e9c3b17","accountId":"MAZDQ1ZJE2NTK1YTY5ZT",'
    '"tracks":["inbound"],"mediaFormat":{"encoding":"audio/x-l16","sampleRate":8000}},'
    '"extra_headers":"ticket=T4411"}'
)


def test_plivo_l16_extra_headers_and_unix_timestamps() -> None:
    c = JsonStreamCodec(PLIVO, {})
    started = c.receive(PLIVO_START)
    assert isinstance(started, Started)
    assert started.call_id == "4f7c2a8e-6b1d-4e0a-9c55-2d8e1f3a7b90"
    assert started.audio == AudioFormat(Encoding.PCM16, 8000)
    assert started.parameters == {"ticket": "T4411"}
    assert started.labels["stream_id"] == "b2e9d4c1-7a3f-4c8e-8d21-5f6a0e9c3b17"
    assert started.labels["account_id"] == "MAZDQ1ZJE2NTK1YTY5ZT"
    media = (
        '{"event":"media","sequenceNumber":42,"streamId":"b2e9d4c1-7a3f-4c8e-8d21-5f6a0e9c3b17",'
        '"media":{"track":"inbound","timestamp":"1793714591820","chunk":41,"payload":"'
        + B64_L16_LE
        + '"},"extra_headers":"ticket=T4411"}'
    )
    assert c.receive(media) == Media("caller", TONE.astype("<i2").tobytes(), 1793714591820)
    dtmf = (
        '{"event":"dtmf","sequenceNumber":50,"streamId":"b2e9d4c1-7a3f-4c8e-8d21-5f6a0e9c3b17",'
        '"dtmf":{"track":"inbound","digit":"5","timestamp":"1793714592980"}}'
    )
    assert c.receive(dtmf) == Dtmf("5")
    for other in (
        '{"event":"playedStream","sequenceNumber":75,"streamId":"b2e9","name":"greeting-done"}',
        '{"event":"clearedAudio","sequenceNumber":80,"streamId":"b2e9"}',
    ):
        assert isinstance(c.receive(other), Skipped)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("userId=12345;sessionId=abc-xyz", {"userId": "12345", "sessionId": "abc-xyz"}),
        ("a=1,b=2", {"a": "1", "b": "2"}),
        ({"redact": "pci", "keyterm": "Xarelto"}, {"redact": "pci", "keyterm": "Xarelto"}),
    ],
)
def test_plivo_extra_headers_in_every_shape(extra: Any, expected: dict[str, str]) -> None:
    start = json.loads(PLIVO_START)
    start["extra_headers"] = extra
    _, started = codec(PLIVO, json.dumps(start))
    assert started.parameters == expected


def test_plivo_both_tracks_and_a_mulaw_stream() -> None:
    start = json.loads(PLIVO_START)
    start["start"]["tracks"] = ["inbound", "outbound"]
    start["start"]["mediaFormat"] = {"encoding": "audio/x-mulaw", "sampleRate": 8000}
    _, started = codec(PLIVO, json.dumps(start))
    assert started.legs == ("caller", "agent")
    assert started.audio.encoding is Encoding.MULAW


@pytest.mark.parametrize("dialect", [TELNYX, SIGNALWIRE, EXOTEL, PLIVO])
def test_bad_input_twilio_shaped(dialect: Dialect) -> None:
    c = JsonStreamCodec(dialect, {})
    with pytest.raises(CarrierStreamError, match="before start"):
        c.receive('{"event":"media","media":{"payload":""}}')
    assert isinstance(c.receive("not json"), Skipped)
    assert isinstance(c.receive("[1,2]"), Skipped)
    with pytest.raises(CarrierStreamError, match=r"malformed start|start has no"):
        c.receive('{"event":"start","start":{}}')
    start = {"PLIVO": PLIVO_START, "TELNYX": TELNYX_START, "EXOTEL": EXOTEL_START}
    c.receive(start.get(dialect.front_end.upper(), SIGNALWIRE_START))
    with pytest.raises(CarrierStreamError, match="second start"):
        c.receive(start.get(dialect.front_end.upper(), SIGNALWIRE_START))
    bad_b64 = '{"event":"media","media":{"track":"inbound","payload":"***"}}'
    assert isinstance(c.receive(bad_b64), Skipped)
    odd_track = '{"event":"media","media":{"track":"sideways","payload":""}}'
    assert isinstance(c.receive(odd_track), Skipped)
    assert isinstance(c.receive('{"event":"dtmf","dtmf":{"digit":"Z"}}'), Skipped)
    assert isinstance(c.receive('{"event":"media","media":{"track":"inbound"}}'), Skipped)
    assert isinstance(c.receive_binary(b"\x00\x01"), Skipped)
    for stamp in ('"1e999"', '"inf"', "1e999", '"nan"', "[]"):
        hostile = '{"event":"media","media":{"payload":"","timestamp":' + stamp + "}}"
        assert isinstance(c.receive(hostile), Skipped), stamp


# --- the media message's short road ---------------------------------------------------------------
# `receive` against `read`, the full reading: tests/telephony/media_road.py.

STARTS: dict[str, str] = {
    "telnyx": TELNYX_START,
    "signalwire": SIGNALWIRE_START,
    "exotel": EXOTEL_START,
    "plivo": PLIVO_START,
}
GOOD_MEDIA = {"track": "inbound", "chunk": "2", "timestamp": "40", "payload": B64_ULAW}


def carrier_media(media: object, **extra: object) -> str:
    return json.dumps({"event": "media", "sequence_number": "4", "media": media, **extra})


def carrier_media_variants() -> list[str]:
    """Media messages as the carriers send them, and every way one can be off."""
    odd: dict[str, list[object]] = {
        "track": ["outbound", "sideways", "", None, 0, 5, ["inbound"], {"a": 1}],
        "timestamp": [
            *("0", 40, 40.7, "40.7", "1e3", "1793714591820", " 7 ", "abc", "inf", "1e999"),
            *("nan", True, False, None, [], {}),
        ],
        "payload": [*("", "%%%", "***", "AAAA====", "AA==AA", "\u00ff"), *(5, None, [], {})],
    }
    untracked = {k: v for k, v in GOOD_MEDIA.items() if k != "track"}
    good = json.dumps(GOOD_MEDIA)
    return [
        TELNYX_MEDIA,
        carrier_media(GOOD_MEDIA, streamSid="MZ1"),
        *media_variants(carrier_media, GOOD_MEDIA, odd),
        carrier_media(untracked, track="outbound"),  # Exotel's beta: the track beside media
        carrier_media(untracked, track=5),
        carrier_media({**GOOD_MEDIA, "track": ""}, track="outbound"),
        '{"event":"media","media":' + good + ',"event":"dtmf","dtmf":{"digit":"1"}}',
        '{"event":"media","media":' + good + ',"tags":["a"]}',
    ]


@pytest.mark.parametrize("dialect", [TELNYX, SIGNALWIRE, EXOTEL, PLIVO])
def test_media_short_road_answers_as_the_full_read(dialect: Dialect) -> None:
    for text in carrier_media_variants():
        fast, full = (JsonStreamCodec(dialect, {}) for _ in range(2))
        assert outcome(fast.receive, text) == outcome(full.read, text), text
        for c in (fast, full):
            c.receive(STARTS[dialect.front_end])
        assert outcome(fast.receive, text) == outcome(full.read, text), text


def test_media_takes_the_short_road() -> None:
    class Reads(JsonStreamCodec):
        count = 0

        def read(self, text: str) -> Any:
            self.count += 1
            return super().read(text)

    c = Reads(TELNYX, {})
    c.receive(TELNYX_START)
    assert c.receive(TELNYX_MEDIA) == Media("caller", ulaw_encode(TONE), 40)
    untracked = carrier_media({"timestamp": 100, "payload": B64_ULAW}, track="outbound")
    assert c.receive(untracked) == Media("agent", ulaw_encode(TONE), 100)
    assert c.count == 1
    bad = carrier_media({**GOOD_MEDIA, "payload": "***"})
    assert c.receive(bad) == Skipped("media payload is not base64")
    assert c.count == 2


VONAGE_CONNECTED = (
    '{"event":"websocket:connected","content-type":"audio/l16;rate=16000","uuid":'
    '"aaaaaaaa-bbbb-cccc-dddd-0123456789ab","conversation_uuid":"CON-aaaaaaaa-bbbb-cccc-dddd-'
    '0123456789ab","from":"447700900001","ticket":"T4411"}'
)


def test_vonage_connected_keeps_every_header_then_binary_audio() -> None:
    c = VonageCodec()
    with pytest.raises(CarrierStreamError, match="before websocket:connected"):
        c.receive_binary(b"\0" * 640)
    started = c.receive(VONAGE_CONNECTED)
    assert started == Started(
        call_id="aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        legs=("caller",),
        audio=AudioFormat(Encoding.PCM16, 16000),
        labels={
            "content-type": "audio/l16;rate=16000",
            "uuid": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
            "conversation_uuid": "CON-aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
            "from": "447700900001",
            "ticket": "T4411",
        },
        parameters=started.labels if isinstance(started, Started) else {},
    )
    frame = TONE.astype("<i2").tobytes() * 2
    assert c.receive_binary(frame) == Media("caller", frame)
    assert c.receive('{"event":"websocket:dtmf","digit":"5","duration":260}') == Dtmf("5")
    assert c.receive('{"event":"websocket:dtmf","dtmf":{"digit":"#"}}') == Dtmf("#")
    assert isinstance(c.receive('{"event":"websocket:cleared"}'), Skipped)
    notify = '{"event":"websocket:notify","payload":{"name":"greeting-done"}}'
    assert isinstance(c.receive(notify), Skipped)
    with pytest.raises(CarrierStreamError, match="second"):
        c.receive(VONAGE_CONNECTED)


def test_vonage_rates_and_bad_content_type() -> None:
    at8 = VonageCodec().receive(VONAGE_CONNECTED.replace("16000", "8000"))
    assert isinstance(at8, Started) and at8.audio.rate == 8000
    at24 = VonageCodec().receive(VONAGE_CONNECTED.replace("16000", "24000"))
    assert isinstance(at24, Started) and at24.audio.rate == 24000
    no_uuid = VonageCodec().receive(
        '{"event":"websocket:connected","content-type":"audio/l16;rate=8000"}'
    )
    assert isinstance(no_uuid, Started) and no_uuid.call_id == ""
    with pytest.raises(CarrierStreamError, match="content-type"):
        VonageCodec().receive(VONAGE_CONNECTED.replace("audio/l16", "audio/opus"))
    with pytest.raises(CarrierStreamError, match="sample rate"):
        VonageCodec().receive(VONAGE_CONNECTED.replace("16000", "11025"))
    with pytest.raises(CarrierStreamError, match="before websocket:connected"):
        VonageCodec().receive('{"event":"websocket:dtmf","digit":"5"}')


JAMBONZ_METADATA = (
    '{"sampleRate":8000,"mixType":"mono","callSid":"863a97df-bd4e-42cd-ba51-20772d8f3616",'
    '"direction":"inbound","from":"+15083084809","to":"+15082139445","callId":'
    '"b9d55ecf6bb47f88@10.0.1.5","sbcCallid":"a0e294cd-ae55-44e9-a221-db171cc628f9","sipStatus":'
    '200,"sipReason":"OK","callStatus":"in-progress","accountSid":"60e02265-d582-4aad-8ae0-'
    'ace88f0ccb11","traceId":"cc464d76b6f2f531071e93b8aa5df7f2","applicationSid":"0dd02dc1-9986-'
    '4875-be85-43798fe1ee51","fsSipAddress":"10.0.1.5:5060","ticket":"T4411"}'
)


def test_jambonz_metadata_audio_dtmf_and_the_flush_frame() -> None:
    c = JambonzCodec()
    with pytest.raises(CarrierStreamError, match="before the metadata"):
        c.receive_binary(b"\0\0")
    started = c.receive(JAMBONZ_METADATA)
    assert isinstance(started, Started)
    assert started.call_id == "863a97df-bd4e-42cd-ba51-20772d8f3616"
    assert started.legs == ("caller",)
    assert started.audio == AudioFormat(Encoding.PCM16, 8000)
    assert started.labels["ticket"] == "T4411" and started.labels["sipStatus"] == "200"
    assert started.labels["callId"] == "b9d55ecf6bb47f88@10.0.1.5"
    frame = TONE.astype("<i2").tobytes()
    assert c.receive_binary(frame) == Media("caller", frame)
    assert c.receive('{"event":"dtmf","dtmf":"5","duration":"1600"}') == Dtmf("5")
    for other in (
        '{"type":"playDone","data":{"id":"prompt-7"}}',
        '{"type":"mark","data":{"name":"greeting-done","event":"playout"}}',
        "not json",
    ):
        assert isinstance(c.receive(other), Skipped)
    assert c.receive_binary(b"") == Stopped("graceful shutdown")


def test_jambonz_stereo_is_two_legs_and_mixtype_is_checked() -> None:
    stereo = JambonzCodec().receive(
        JAMBONZ_METADATA.replace('"mono"', '"stereo"').replace("8000", "16000")
    )
    assert isinstance(stereo, Started)
    assert stereo.legs == ("caller", "agent")
    assert stereo.audio == AudioFormat(Encoding.PCM16, 16000, 2)
    mixed = JambonzCodec().receive(JAMBONZ_METADATA.replace('"mono"', '"mixed"'))
    assert isinstance(mixed, Started) and mixed.legs == ("caller",)
    at64 = JambonzCodec().receive(JAMBONZ_METADATA.replace("8000", "64000"))
    assert isinstance(at64, Started) and at64.audio.rate == 64000
    with pytest.raises(CarrierStreamError, match="mixType"):
        JambonzCodec().receive(JAMBONZ_METADATA.replace('"mono"', '"quad"'))
    with pytest.raises(CarrierStreamError, match="not JSON"):
        JambonzCodec().receive("hello")


def test_alaw_encoding_round_trip_sanity() -> None:
    # PCMA from Telnyx or SignalWire decodes through audio.py's A-law table.
    decoder = AudioDecoder(encoding_of("PCMA"), 8000, 8000)
    decoded = decoder.feed(alaw_encode(TONE))
    assert np.max(np.abs(decoded.astype(np.int32) - TONE)) < 300
