"""Property tests of the newer wires' codecs (issue 17): Deepgram's live protocol, Asterisk
chan_websocket, Asterisk AEAP and FreeSWITCH mod_audio_stream. Arbitrary bytes and text, and
mutations of the valid messages their byte-level tests hold, raise nothing but the codec's own
protocol error; audio keeps every whole sample; what goes out is strict JSON."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from engine.base import Closed, EndOfTurn, EngineEvent, Partial, Segment, Word
from telephony.aeap import AeapCodec, AeapError, Get, Setup
from telephony.asterisk_media import FORMATS, AsteriskMediaCodec, AsteriskMediaError, MediaStart
from telephony.audio import WIRE_RATES
from telephony.audio_stream import (
    AudioStreamCodec,
    AudioStreamError,
    parse_metadata,
    stream_format,
)
from telephony.deepgram import (
    ENCODINGS,
    DeepgramCodec,
    DeepgramError,
    ModelInfo,
    parse_client_message,
    parse_params,
)
from tests.fuzz.test_codecs import FAST, json_values, mutated

ENGINE_RATE = 16000


def strict_json(text: str) -> Any:
    """What a client's strict parser makes of our message (no NaN, no Infinity); and it can go
    out as a text frame at all (UTF-8: no lone surrogate echoed from the input)."""
    text.encode()

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in {text[:80]}")

    return json.loads(text, parse_constant=refuse)


surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1)
escaped = surrogates.map(lambda t: json.dumps(t)[1:-1])  # "\\ud800": valid JSON text
texts = st.text(max_size=300) | json_values.map(json.dumps)


def with_escapes(valid: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Valid messages whose string values hold escaped lone surrogates (`"\\ud800"`)."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        text = draw(st.sampled_from(valid))
        quoted = [i for i, c in enumerate(text) if c == '"']
        if len(quoted) < 2:
            return text
        at = draw(st.sampled_from(quoted[1:]))
        return text[:at] + draw(escaped) + text[at:]

    return build()


def around(valid: tuple[str, ...]) -> st.SearchStrategy[str]:
    """Arbitrary text, or a valid message mutated (bytes flipped, cut, repeated) or holding an
    escaped lone surrogate."""
    bytewise = st.sampled_from(valid).flatmap(lambda t: mutated(t.encode()))
    return texts | with_escapes(valid) | bytewise.map(lambda b: b.decode("utf-8", "replace"))


finite = st.floats(min_value=0, max_value=1e5, allow_nan=False)
words = st.builds(Word, st.text(max_size=20), finite, finite)
engine_events: st.SearchStrategy[EngineEvent] = st.one_of(
    words,
    st.builds(Partial, st.text(max_size=40), finite, finite),
    st.builds(EndOfTurn, finite, st.floats(0, 1)),
    st.builds(
        Segment, st.text(max_size=40), finite, finite, st.lists(words, max_size=4).map(tuple)
    ),
    st.builds(Closed, st.text(max_size=20)),
)


# --- Deepgram (/v1/listen) ----------------------------------------------------------------------

DEEPGRAM_KEYS = (
    "encoding",
    "sample_rate",
    "channels",
    "multichannel",
    "interim_results",
    "punctuate",
    "smart_format",
    "vad_events",
    "endpointing",
    "utterance_end_ms",
    "model",
    "language",
    "extra",
    "tag",
)
query_values = st.one_of(
    st.sampled_from(["linear16", "mulaw", "alaw", "opus", "true", "false", "8000", "16000", "2"]),
    st.integers(-10, 200000).map(str),
    st.text(max_size=12),
)


@FAST
@given(st.lists(st.tuples(st.sampled_from(DEEPGRAM_KEYS) | st.text(max_size=8), query_values)))
def test_deepgram_parameters(query: list[tuple[str, str]]) -> None:
    try:
        params = parse_params(query)
    except DeepgramError:
        return
    assert params.sample_rate > 0 and params.channels >= 1
    assert all(isinstance(v, str) for v in params.labels().values())


DEEPGRAM_VALID = (
    '{"type":"KeepAlive"}',
    '{"type":"Finalize"}',
    '{"type":"Finalize","channel":1}',
    '{"type":"CloseStream"}',
    '{"type":"Configure","processors":{"keyterms":["x"]}}',
)


@FAST
@given(around(DEEPGRAM_VALID))
def test_deepgram_client_messages(text: str) -> None:
    try:
        parse_client_message(text)
    except DeepgramError as exc:
        str(exc).encode()  # it goes out in Deepgram's Error message and the close reason


@st.composite
def deepgram_codecs(draw: st.DrawFn) -> DeepgramCodec:
    channels = draw(st.integers(1, 3))
    query = [
        ("encoding", draw(st.sampled_from(sorted(ENCODINGS)))),
        ("sample_rate", str(draw(st.sampled_from(sorted(WIRE_RATES))))),
        ("channels", str(channels)),
        ("multichannel", draw(st.sampled_from(["true", "false"]))),
        ("interim_results", draw(st.sampled_from(["true", "false"]))),
        ("vad_events", draw(st.sampled_from(["true", "false"]))),
    ]
    return DeepgramCodec(parse_params(query), ENGINE_RATE, "req", ModelInfo("m", "1"))


@FAST
@given(deepgram_codecs(), st.lists(st.binary(max_size=700), max_size=8), st.data())
def test_deepgram_audio_and_events(
    codec: DeepgramCodec, chunks: list[bytes], data: st.DataObject
) -> None:
    got = [0] * len(codec.legs)
    for chunk in chunks:
        for n, pcm in enumerate(codec.receive_audio(chunk)):
            got[n] += len(pcm)
    for n, pcm in enumerate(codec.end_of_audio()):
        got[n] += len(pcm)
    frame = codec.params.encoding.bytes_per_sample * codec.params.channels
    whole_s = sum(len(c) for c in chunks) // frame / codec.params.sample_rate
    assert math.isclose(
        codec.audio_s, sum(len(c) for c in chunks) / frame / codec.params.sample_rate
    )
    assert len(set(got)) == 1  # every leg the same length
    assert abs(got[0] - whole_s * ENGINE_RATE) <= 2  # whole frames only, a partial one carried
    for event in data.draw(st.lists(engine_events, max_size=6)):
        for text in codec.on_event(data.draw(st.sampled_from(codec.legs)), event):
            assert isinstance(strict_json(text), dict)
    assert strict_json(codec.metadata())["type"] == "Metadata"


# --- Asterisk chan_websocket (/asterisk/media) --------------------------------------------------

ASTERISK_VALID = (
    "MEDIA_START connection_id:stt channel:WebSocket/stt/0x7f1cc000a6d0 "
    "channel_id:1796276893.2 format:slin16 optimal_frame_size:640 ptime:20",
    '{"event":"MEDIA_START","connection_id":"stt","channel":"WebSocket/stt/0x7f1cc000a6d0",'
    '"channel_id":"1796276893.2","format":"ulaw","optimal_frame_size":160,"ptime":20,'
    '"channel_variables":{"MEDIA_WEBSOCKET_CONNECTION_ID":"stt",'
    '"MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE":"160","DIALEDPEERNUMBER":"stt/c(ulaw)f(json)"}}',
    "DTMF_END digit:1 channel_id:1796276893.2",
    '{"event":"DTMF_END","digit":"#"}',
    "MEDIA_XOFF channel_id:1",
    '{"event":"MEDIA_BUFFERING_COMPLETED","correlation_id":"x"}',
)
asterisk_texts = around(ASTERISK_VALID)
asterisk_messages = st.lists(asterisk_texts | st.binary(max_size=400), max_size=8)


@FAST
@given(st.sampled_from(ASTERISK_VALID[:2]) | asterisk_texts, asterisk_messages)
def test_asterisk_media_any_messages(first: str, rest: list[str | bytes]) -> None:
    codec = AsteriskMediaCodec(ENGINE_RATE)
    for message in [first, *rest]:
        try:
            if isinstance(message, str):
                event = codec.receive_text(message)
                if isinstance(event, MediaStart):
                    labels = codec.labels({"v": "1"})
                    assert all(isinstance(v, str) for v in labels.values())
            else:
                codec.receive_audio(message)
        except AsteriskMediaError as exc:
            str(exc).encode()  # it goes out as the close reason
    codec.end_of_audio()
    for command in ("ANSWER", "HANGUP"):
        codec.encode_command(command)


@FAST
@given(st.sampled_from(sorted(FORMATS)), st.lists(st.binary(max_size=700), max_size=8))
def test_asterisk_media_audio_keeps_every_whole_sample(fmt: str, chunks: list[bytes]) -> None:
    codec = AsteriskMediaCodec(ENGINE_RATE)
    codec.receive_text(f"MEDIA_START channel_id:c1 format:{fmt} optimal_frame_size:160")
    encoding, rate = FORMATS[fmt]
    got = sum(len(codec.receive_audio(c)) for c in chunks) + len(codec.end_of_audio())
    samples = sum(len(c) for c in chunks) // encoding.bytes_per_sample
    assert abs(got - samples * ENGINE_RATE / rate) <= 2


# --- Asterisk AEAP (/asterisk/aeap) -------------------------------------------------------------

AEAP_VALID = (
    '{"request":"setup","version":"0.1.0","codecs":[{"name":"ulaw"}],'
    '"params":{"language":"en-US"},"id":"4532a1b0-7d4e-4c1f-9a55-0f3b2c1d9e8f"}',
    '{"request":"setup","codecs":[{"name":"slin"}],"params":{"sample_rate":"16000"},"id":"s"}',
    '{"request":"get","params":["results"],"id":"g1"}',
    '{"request":"set","params":{"dtmf":"12","grammar":"digits"},"id":"s1"}',
    '{"response":"set","id":"x"}',
    '{"request":"hangup","id":"h"}',
)
aeap_texts = around(AEAP_VALID)


@FAST
@given(
    st.dictionaries(st.text(max_size=12), st.text(max_size=8), max_size=3),
    st.lists(aeap_texts | st.sampled_from(AEAP_VALID), max_size=8),
    st.binary(max_size=1000) | st.none(),
    st.binary(max_size=700),
)
def test_aeap_any_messages(
    query: dict[str, str], messages: list[str], first_frame: bytes | None, more: bytes
) -> None:
    try:
        codec = AeapCodec(ENGINE_RATE, query)
    except AeapError:
        return
    for text in messages:
        try:
            message = codec.receive_text(text)
            if isinstance(message, Setup):
                strict_json(codec.accept_setup(message))
            elif isinstance(message, Get):
                strict_json(codec.answer_get(message, None))
        except AeapError as exc:
            strict_json(AeapCodec.encode_error("x", "1", str(exc)))  # as it goes back
            str(exc).encode()  # and as the close reason
    try:
        decoder = codec.decoder(first_frame)
    except AeapError:
        return
    decoder.feed(first_frame or b"")
    decoder.feed(more)
    decoder.flush()


@FAST
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=4))
def test_aeap_settings(params: dict[str, Any]) -> None:
    codec = AeapCodec(ENGINE_RATE)
    try:
        codec.settings.update(params)
    except AeapError:
        return
    for name in ("results", "language", "sample_rate", "grammar", "x"):
        value = codec.settings.get(name)
        assert value is None or isinstance(value, str)


# --- FreeSWITCH mod_audio_stream (/freeswitch) --------------------------------------------------

AUDIO_STREAM_METADATA = (
    '{"callId":"5d8f6c1e","rate":16000,"mix":"stereo"}',
    '{"uuid":"abc","rate":"8000"}',
    "plain text metadata",
)


@FAST
@given(
    around(AUDIO_STREAM_METADATA),
    st.dictionaries(st.sampled_from(["rate", "mix", "x"]), st.text(max_size=8), max_size=3),
    st.lists(st.binary(max_size=500), max_size=6),
)
def test_audio_stream_metadata_query_and_audio(
    metadata: str, query: dict[str, str], chunks: list[bytes]
) -> None:
    meta = parse_metadata(metadata)
    assert isinstance(meta, dict)
    try:
        fmt = stream_format(query, meta)
    except AudioStreamError:
        return
    codec = AudioStreamCodec(fmt)
    got = [0] * fmt.channels
    for chunk in chunks:
        for n, pcm in enumerate(codec.receive_audio(chunk)):
            got[n] += len(pcm)
    assert got == [sum(len(c) for c in chunks) // (2 * fmt.channels)] * fmt.channels


@FAST
@given(st.text(max_size=40), st.sampled_from(["caller", "callee", "agent"]), engine_events)
def test_audio_stream_events_are_strict_json(call_id: str, leg: str, event: EngineEvent) -> None:
    body = strict_json(AudioStreamCodec.encode_event(call_id, leg, event))
    assert body["call_id"] == call_id and body["leg"] == leg
    assert strict_json(AudioStreamCodec.encode_error(call_id))["type"] == "error"
