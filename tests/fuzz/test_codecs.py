"""Property tests of every sans-I/O codec (issue 17): arbitrary bytes and structured mutations
of valid messages raise nothing but the codec's own protocol error, and what a codec encodes
it decodes back. Budgeted to stay within seconds: `make test` runs them."""

from __future__ import annotations

import contextlib
import json
import struct
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from engine import moshi_wire as wire
from telephony.audio_fork import AudioForkCodec, AudioForkError, StreamFormat, stream_format
from telephony.audiosocket import (
    AUDIO_KINDS,
    Audio,
    AudioSocketCodec,
    AudioSocketError,
    Dtmf,
    Hangup,
    Identified,
)
from telephony.limits import JsonTooDeep, clean_label, parse_json
from telephony.moshi_asr import Audio as MoshiAudio
from telephony.moshi_asr import MoshiAsrCodec, MoshiProtocolError
from telephony.sip.core import bad_request, request_problem
from telephony.sip.rtp import RtpError, RtpPacket, RtpReceiver
from telephony.sip.sdp import NoCommonCodec, SdpError, parse_sdp, plan_answer
from telephony.transcript import InvalidOptions
from telephony.twilio import TwilioMediaCodec, TwilioStreamError
from telephony.websocket import BadParameters, ListenCodec, ListenParams, parse_listen_params

FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def mutate(data: bytes, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """Flip, cut or repeat a part of valid bytes."""
    if not data:
        return data
    kind = draw(st.sampled_from(["flip", "cut", "repeat", "insert"]))
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if kind == "cut":
        return data[:at]
    if kind == "repeat":
        times: int = draw(st.integers(2, 4))
        return data[:at] + data[at:] * times
    extra: bytes = draw(st.binary(max_size=8))
    return data[:at] + extra + data[at:]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    return mutate(data, draw)


# --- AudioSocket --------------------------------------------------------------------------------


@FAST
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_audiosocket_arbitrary_bytes(chunks: list[bytes]) -> None:
    codec = AudioSocketCodec()
    try:
        for chunk in chunks:
            codec.feed(chunk)
        codec.end_of_stream()
    except AudioSocketError:
        pass


audiosocket_messages = st.one_of(
    st.builds(Dtmf, st.sampled_from("0123456789*#ABCD")),
    st.builds(
        Audio,
        st.sampled_from(sorted(set(AUDIO_KINDS.values()))),
        st.binary(min_size=2, max_size=400).map(lambda b: b[: len(b) // 2 * 2]),
    ),
)


def encode_audiosocket(event: Any) -> bytes:
    if isinstance(event, Dtmf):
        return AudioSocketCodec.encode_dtmf(event.digit)
    return AudioSocketCodec.encode_audio(event.payload, event.sample_rate)


@FAST
@given(st.uuids(), st.lists(audiosocket_messages, max_size=6), st.integers(1, 50), st.data())
def test_audiosocket_round_trip_in_any_split(
    call_id: uuid.UUID, events: list[Any], step: int, data: st.DataObject
) -> None:
    wire = AudioSocketCodec.encode_uuid(call_id)
    wire += b"".join(encode_audiosocket(e) for e in events) + AudioSocketCodec.encode_hangup()
    codec = AudioSocketCodec()
    got: list[Any] = []
    for i in range(0, len(wire), step):
        got += codec.feed(wire[i : i + step])
    codec.end_of_stream()
    assert got == [Identified(call_id), *events, Hangup()]
    try:  # and a mutation of it fails only as the protocol's error
        mutated = AudioSocketCodec()
        mutated.feed(mutate(wire, data.draw))
        mutated.end_of_stream()
    except AudioSocketError:
        pass


# --- mod_audio_fork -----------------------------------------------------------------------------


@FAST
@given(st.one_of(st.none(), st.text(max_size=200), json_values.map(json.dumps)), st.data())
def test_audio_fork_metadata(metadata: str | None, data: st.DataObject) -> None:
    query = data.draw(st.dictionaries(st.sampled_from(["rate", "mix", "x"]), st.text(max_size=8)))
    try:
        fmt = stream_format(metadata, query)
    except AudioForkError:
        return
    assert fmt.channels in (1, 2)


@FAST
@given(st.sampled_from(["mono", "stereo"]), st.lists(st.binary(max_size=101), max_size=8))
def test_audio_fork_frames_keep_every_whole_sample(mix: str, chunks: list[bytes]) -> None:
    codec = AudioForkCodec(StreamFormat(mix, 8000))
    per_leg = [0] * codec.format.channels
    for chunk in chunks:
        for leg, pcm in enumerate(codec.receive_audio(chunk)):
            per_leg[leg] += len(pcm)
    total = sum(len(c) for c in chunks)
    assert per_leg == [total // (2 * codec.format.channels)] * codec.format.channels


# --- Twilio -------------------------------------------------------------------------------------

TWILIO_VALID = [
    {"event": "connected", "protocol": "Call", "version": "1.0.0"},
    {
        "event": "start",
        "start": {
            "streamSid": "MZ1",
            "callSid": "CA1",
            "tracks": ["inbound", "outbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"From": "+1"},
        },
    },
    {"event": "media", "media": {"track": "inbound", "timestamp": "20", "payload": "//8="}},
    {"event": "dtmf", "dtmf": {"digit": "1", "track": "inbound_track"}},
    {"event": "mark", "mark": {"name": "m"}},
    {"event": "stop"},
]


def replace_somewhere(value: Any, replacement: Any, path: list[int]) -> Any:
    """`value` with one member (chosen by `path`) replaced."""
    if isinstance(value, dict) and value and path:
        key = sorted(value)[path[0] % len(value)]
        return {**value, key: replace_somewhere(value[key], replacement, path[1:])}
    if isinstance(value, list) and value and path:
        i = path[0] % len(value)
        return [*value[:i], replace_somewhere(value[i], replacement, path[1:]), *value[i + 1 :]]
    return replacement


@FAST
@given(st.lists(st.one_of(st.text(max_size=200), json_values.map(json.dumps)), max_size=6))
def test_twilio_arbitrary_text(texts: list[str]) -> None:
    codec = TwilioMediaCodec()
    for text in texts:
        with contextlib.suppress(TwilioStreamError):
            codec.receive(text)


@FAST
@given(st.lists(st.tuples(json_values, st.lists(st.integers(0, 9), max_size=4)), max_size=6))
def test_twilio_mutated_messages(mutations: list[tuple[Any, list[int]]]) -> None:
    codec = TwilioMediaCodec()
    for message, (replacement, path) in zip(TWILIO_VALID, mutations, strict=False):
        text = json.dumps(replace_somewhere(message, replacement, [0, *path]))
        with contextlib.suppress(TwilioStreamError):
            codec.receive(text)


@FAST
@given(st.binary(max_size=400), st.integers(0, 10**6))
def test_twilio_media_round_trip(payload: bytes, timestamp: int) -> None:
    import base64

    codec = TwilioMediaCodec()
    codec.receive(json.dumps(TWILIO_VALID[1]))
    body = {"track": "outbound", "timestamp": str(timestamp)}
    body["payload"] = base64.b64encode(payload).decode()
    event: Any = codec.receive(json.dumps({"event": "media", "media": body}))
    assert (event.leg, event.timestamp_ms, event.payload) == ("agent", timestamp, payload)


# --- moshi msgpack ------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def packb(value: Any) -> bytes:
    try:
        return bytes(msgpack.packb(value, use_bin_type=True))
    except (OverflowError, ValueError):  # an integer msgpack cannot carry
        return b"\xc1"


@FAST
@given(st.one_of(st.binary(max_size=300), msgpack_values.map(packb)))
def test_moshi_arbitrary_frames(frame: bytes) -> None:
    with contextlib.suppress(MoshiProtocolError):
        MoshiAsrCodec().receive(frame)


@FAST
@given(
    st.sampled_from(["Audio", "Marker", "OggOpus", "Init", "Nope"]),
    st.dictionaries(st.sampled_from(["pcm", "id", "data", "x"]), msgpack_values, max_size=3),
    st.data(),
)
def test_moshi_mutated_messages(kind: str, fields: dict[str, Any], data: st.DataObject) -> None:
    frame = packb({"type": kind, **fields})
    for candidate in (frame, mutate(frame, data.draw)):
        with contextlib.suppress(MoshiProtocolError):
            MoshiAsrCodec().receive(candidate)


@FAST
@given(st.integers(-(2**63), 2**63 - 1), st.lists(st.floats(-1, 1), max_size=200))
def test_moshi_round_trip(marker: int, pcm: list[float]) -> None:
    codec = MoshiAsrCodec()
    assert codec.receive(packb({"type": "Marker", "id": marker})) == [wire.Marker(marker)]
    (audio,) = codec.receive(packb({"type": "Audio", "pcm": pcm}))
    assert isinstance(audio, MoshiAudio) and len(audio.pcm) == len(pcm)
    assert np.array_equal(audio.pcm, np.clip(np.rint(np.array(pcm) * 32768), -32768, 32767))


# --- generic WebSocket --------------------------------------------------------------------------


@FAST
@given(st.lists(st.one_of(st.text(max_size=100), json_values.map(json.dumps)), max_size=5))
def test_websocket_text_frames(texts: list[str]) -> None:
    codec = ListenCodec(ListenParams(), 24000)
    for text in texts:
        codec.receive_text(text)  # never raises: a bad frame is a BadMessage


@FAST
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["encoding", "sample_rate", "call_id", "redact", "keyterm", "customer"]
            ),
            st.text(max_size=200),
        ),
        max_size=8,
    ),
    st.lists(st.binary(max_size=200), max_size=5),
)
def test_websocket_params_and_audio(query: list[tuple[str, str]], chunks: list[bytes]) -> None:
    try:
        params = parse_listen_params(MultiDict(query))
    except (BadParameters, InvalidOptions):
        return
    codec = ListenCodec(params, 16000)
    for chunk in chunks:
        codec.receive_bytes(chunk)
    codec.end_of_audio()


@FAST
@given(st.integers(1, 200_000))
def test_deep_json_is_a_value_error(depth: int) -> None:
    text = "[" * depth + "]" * depth
    try:
        assert parse_json(text) is not None
    except JsonTooDeep:
        assert depth > 64


# Any JSON a peer may send, escaped lone surrogates and integers up to 64 bits included.
json_texts = st.text() | st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_texts,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(json_texts, inner, max_size=5),
    max_leaves=20,
)


@FAST
@given(json_values)
@example({"callId": "\ud800", "n": 2**63 - 1})
def test_wire_json_reads_as_the_standard_library_does(value: Any) -> None:
    """parse_json (orjson, the standard library for what orjson refuses) gives what json.loads
    gives, lone surrogates included (orjson refuses them, the fallback reads them)."""
    text = json.dumps(value)
    assert parse_json(text) == json.loads(text)
    assert parse_json(text.encode()) == json.loads(text)


def test_wire_json_refuses_nan_and_infinity() -> None:
    for text in ('{"a": NaN}', "[Infinity]", "-Infinity"):
        with contextlib.suppress(ValueError):
            parse_json(text)
            raise AssertionError(f"{text} was read")


@FAST
@given(st.text())
def test_clean_label_is_storable(text: str) -> None:
    cleaned = clean_label(text)
    cleaned.encode("utf-8")  # no lone surrogate
    assert "\x00" not in cleaned and len(cleaned) <= 1024


# --- SIP, SDP, RTP ------------------------------------------------------------------------------

SIP_VALID = (
    b"INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\r\n"
    b"From: <sip:t@127.0.0.1>;tag=a\r\nTo: <sip:bridge@127.0.0.1>\r\n"
    b"Call-ID: c1@127.0.0.1\r\nCSeq: 1 INVITE\r\nContact: <sip:t@127.0.0.1:5070>\r\n"
    b"Content-Type: application/sdp\r\nContent-Length: 118\r\n\r\n"
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
)


@FAST
@given(st.one_of(st.binary(max_size=400), mutated(SIP_VALID)))
def test_sip_messages_get_a_verdict(data: bytes) -> None:
    problem = request_problem(data)  # never raises
    if problem is not None:
        reply = bad_request(data, problem)
        assert reply is None or reply.startswith(b"SIP/2.0 400")


SDP_VALID = SIP_VALID.split(b"\r\n\r\n", 1)[1].decode()


@FAST
@given(
    st.one_of(
        st.text(max_size=300),
        mutated(SDP_VALID.encode()).map(lambda b: b.decode("utf-8", "replace")),
    )
)
def test_sdp_parse_and_plan(text: str) -> None:
    with contextlib.suppress(SdpError, NoCommonCodec):
        plan_answer(parse_sdp(text))


@FAST
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_rtp_arbitrary_datagrams(datagrams: list[bytes]) -> None:
    receiver = RtpReceiver()
    for datagram in datagrams:
        with contextlib.suppress(RtpError):
            RtpPacket.parse(datagram)
        receiver.feed(datagram)  # a bad datagram is counted and dropped, never raised
    receiver.flush()


@FAST
@given(
    st.integers(0, 127),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.booleans(),
    st.binary(max_size=200),
)
def test_rtp_round_trip(pt: int, seq: int, ts: int, ssrc: int, marker: bool, body: bytes) -> None:
    packet = RtpPacket(pt, seq, ts, ssrc, marker, body)
    assert RtpPacket.parse(packet.serialize()) == packet
    assert struct.unpack_from("!B", packet.serialize())[0] >> 6 == 2
