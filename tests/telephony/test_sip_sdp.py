"""SDP offer/answer and SIPREC bodies, byte level."""

from __future__ import annotations

import pytest

from telephony.audio import Encoding
from telephony.sip.sdp import (
    NoCommonCodec,
    SdpError,
    StreamAnswer,
    build_answer,
    parse_sdp,
    plan_answer,
    recording_participants,
    split_multipart,
)

SIPP_OFFER = (
    "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\nm=audio 6000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-11,16\r\n"
)


def answer_for(offer_text: str, port: int = 20000) -> str:
    offer = parse_sdp(offer_text)
    plan = [
        None if s is None else StreamAnswer(port, s.payload_type, s.encoding, s.dtmf_payload_type)
        for s in plan_answer(offer)
    ]
    return build_answer(offer, plan, "127.0.0.1", 7)


def test_answer_to_sipps_offer() -> None:
    assert answer_for(SIPP_OFFER) == (
        "v=0\r\no=stt-bridge 7 7 IN IP4 127.0.0.1\r\ns=stt-bridge\r\nc=IN IP4 127.0.0.1\r\n"
        "t=0 0\r\nm=audio 20000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\na=ptime:20\r\na=recvonly\r\n"
    )


def test_first_offered_g711_wins_and_static_types_need_no_rtpmap() -> None:
    offer = parse_sdp("v=0\nc=IN IP4 10.0.0.1\nm=audio 4000 RTP/AVP 18 0 8\n")
    assert offer.media[0].codec() == (0, Encoding.MULAW)
    assert offer.address(offer.media[0]) == "10.0.0.1"


def test_other_streams_are_refused_in_place() -> None:
    text = SIPP_OFFER + "m=video 6002 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
    assert answer_for(text).endswith("m=video 0 RTP/AVP 96\r\n")


@pytest.mark.parametrize(
    "media",
    [
        "m=audio 6000 RTP/AVP 18\r\na=rtpmap:18 G729/8000",
        "m=audio 6000 RTP/AVP 9",
        "m=audio 0 RTP/AVP 0",
    ],
)
def test_no_g711_means_488(media: str) -> None:
    with pytest.raises(NoCommonCodec):
        plan_answer(parse_sdp(f"v=0\r\nc=IN IP4 1.2.3.4\r\n{media}\r\n"))


@pytest.mark.parametrize("text", ["", "hello", "v=0\r\nm=audio x RTP/AVP 0", "v=0\r\nc=IN\r\n"])
def test_unparseable_sdp(text: str) -> None:
    with pytest.raises(SdpError):
        parse_sdp(text)


@pytest.mark.parametrize(
    ("extra", "held"),
    [("a=sendonly", False), ("a=inactive", True), ("a=recvonly", True), ("", False)],
)
def test_hold_detection(extra: str, held: bool) -> None:
    offer = parse_sdp(SIPP_OFFER + extra)
    assert offer.on_hold(offer.media[0]) is held
    assert answer_for(SIPP_OFFER + extra).endswith("a=inactive\r\n" if held else "a=recvonly\r\n")


def test_zero_address_hold() -> None:
    offer = parse_sdp(SIPP_OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0"))
    assert offer.on_hold(offer.media[0])


METADATA = """<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns='urn:ietf:params:xml:ns:recording:1'>
  <datamode>complete</datamode>
  <session session_id="s1"><sipSessionID>abc</sipSessionID></session>
  <participant participant_id="p1"><nameID aor="sip:alice@example.com"/></participant>
  <participant participant_id="p2"><nameID aor="sip:bob@example.com"/></participant>
  <stream stream_id="st1" session_id="s1"><label>1</label></stream>
  <stream stream_id="st2" session_id="s1"><label>2</label></stream>
  <participantstreamassoc participant_id="p1">
    <send>st1</send><recv>st2</recv>
  </participantstreamassoc>
  <participantstreamassoc participant_id="p2">
    <send>st2</send><recv>st1</recv>
  </participantstreamassoc>
</recording>"""

SIPREC_SDP = (
    "v=0\r\no=SRC 1 1 IN IP4 10.0.0.5\r\ns=-\r\nc=IN IP4 10.0.0.5\r\nt=0 0\r\n"
    "m=audio 7000 RTP/AVP 0\r\na=label:1\r\na=sendonly\r\n"
    "m=audio 7002 RTP/AVP 0\r\na=label:2\r\na=sendonly\r\n"
)


def test_siprec_multipart_two_streams_and_participants() -> None:
    body = (
        "--XyZ\r\nContent-Type: application/sdp\r\n\r\n" + SIPREC_SDP + "\r\n--XyZ\r\n"
        "Content-Type: application/rs-metadata+xml\r\nContent-Disposition: recording-session\r\n"
        "\r\n" + METADATA + "\r\n--XyZ--\r\n"
    ).encode()
    parts = split_multipart('multipart/mixed;boundary="XyZ"', body)
    offer = parse_sdp(parts.sdp)
    assert [m.label for m in offer.media] == ["1", "2"]
    assert parts.metadata is not None
    assert recording_participants(parts.metadata) == {
        "1": "sip:alice@example.com",
        "2": "sip:bob@example.com",
    }
    answer = answer_for(parts.sdp)
    assert answer.count("m=audio 20000") == 2 and "a=label:2" in answer
    assert answer.count("a=recvonly") == 2


def test_multipart_without_sdp() -> None:
    with pytest.raises(SdpError):
        split_multipart(
            "multipart/mixed;boundary=b", b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--"
        )
