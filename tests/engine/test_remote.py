"""The remote engine's protocol side without sockets: the frames it sends are those Kyutai's
client sends, the frames it reads are those moshi-server and our `/api/asr-streaming` write,
node times map back past the silence it adds, and words become turns.

Sockets, nodes and speech: tests/e2e/test_remote_engine.py."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from engine import moshi_wire as wire
from engine.base import EndOfTurn, ModelStep, Segment, Word
from engine.config import EngineConfig
from engine.registry import build_engine
from engine.remote import (
    DEFAULT_PATH,
    FRAME_SIZE,
    LEAD_SILENCE_S,
    RemoteEngine,
    RemoteNode,
    Timeline,
    Turns,
    parse_node,
)
from engine.sink import SinkEngine
from telephony.moshi_asr import MoshiAsrCodec

RATE = 24000


@pytest.mark.parametrize("samples", [0, 5, 16, FRAME_SIZE, 70000])
def test_audio_is_byte_for_byte_what_kyutais_client_sends(samples: int) -> None:
    pcm = (np.random.default_rng(samples).standard_normal(samples) * 4000).astype(np.int16)
    # scripts/stt_from_file_rust_server.py: msgpack.packb({...}, use_single_float=True)
    kyutai = msgpack.packb(
        {"type": "Audio", "pcm": [float(x) for x in pcm.astype(np.float32) / 32768]},
        use_single_float=True,
    )
    assert wire.encode_audio(pcm) == kyutai
    # ... and our own /api/asr-streaming reads back the same samples.
    [audio] = MoshiAsrCodec().receive(wire.encode_audio(pcm))
    assert np.array_equal(audio.pcm, pcm)  # type: ignore[union-attr]


def test_marker_is_what_kyutais_client_sends() -> None:
    assert wire.encode(wire.Marker(0)) == msgpack.packb(
        {"type": "Marker", "id": 0}, use_single_float=True
    )
    assert MoshiAsrCodec().receive(wire.encode(wire.Marker(7)))[0].id == 7  # type: ignore[union-attr]


def test_reads_what_moshi_server_writes() -> None:
    decode = wire.decode_server
    for message in (
        wire.Ready(),
        wire.Word("hello", 1.5),
        wire.EndWord(1.9),
        wire.Marker(3),
        wire.Error("no free channels"),
    ):
        assert decode(wire.encode(message)) == message
    # ... and what a moshi-server with VAD heads sends per step, as our server sends it
    step = msgpack.packb({"type": "Step", "step_idx": 4, "prs": [0.1, 0.9], "buffered_pcm": 0})
    assert decode(step) == wire.Step(4, (0.1, 0.9), 0)
    ours = MoshiAsrCodec.encode_step(ModelStep(4, (0.1, 0.9), 0))
    assert decode(ours) == wire.Step(4, (0.1, 0.9), 0)
    assert decode(msgpack.packb({"type": "Something", "x": 1})) is None  # a newer server
    with pytest.raises(wire.WireError):
        decode(b"\xc1")
    with pytest.raises(wire.WireError):
        decode(msgpack.packb({"type": "Word", "start_time": 1.0}))


def test_node_times_skip_the_silence_we_added() -> None:
    timeline = Timeline()
    timeline.add_silence(RATE)  # lead
    timeline.add_ours(2 * RATE)
    timeline.add_silence(FRAME_SIZE)  # a flush, in two pieces: one stretch
    timeline.add_silence(FRAME_SIZE)
    timeline.add_ours(RATE)
    assert timeline.our_seconds(0.5) == 0.0  # inside the lead: where it was added
    assert timeline.our_seconds(1.5) == 0.5
    assert timeline.our_seconds(3.0) == 2.0
    assert timeline.our_seconds(3.1) == 2.0  # inside the flush silence
    assert timeline.our_seconds(3.16 + 0.5) == 2.5
    assert (timeline.node_samples, timeline.our_samples) == (4 * RATE + 2 * FRAME_SIZE, 3 * RATE)


def test_node_times_count_the_audio_our_buffer_dropped() -> None:
    """A phone leg whose node is behind: seconds our buffer dropped never reach the node, and
    node times after them are that much later in our audio (times are the leg's audio)."""
    timeline = Timeline()
    timeline.add_silence(RATE)  # lead
    timeline.add_ours(2 * RATE)
    timeline.skip_ours(3 * RATE)  # dropped
    timeline.add_ours(RATE)
    timeline.add_silence(FRAME_SIZE)  # a flush
    timeline.add_ours(RATE)
    assert timeline.our_seconds(2.5) == 1.5  # before the loss: as ever
    assert timeline.our_seconds(3.5) == 5.5  # after it: 3 s later
    assert timeline.our_seconds(4.0 + 0.05) == 6.0  # inside the flush silence
    assert timeline.our_seconds(4.08 + 0.5) == 6.5
    assert (timeline.node_samples, timeline.our_samples) == (5 * RATE + FRAME_SIZE, 7 * RATE)


def test_words_wait_for_their_end_then_turns_end_at_pauses() -> None:
    timeline = Timeline()
    timeline.add_ours(10 * RATE)
    turns = Turns(timeline, silence_s=1.0)
    # stt-bridge: EndWord right after Word.
    assert turns.on_word(wire.Word("hello", 0.5)) == []
    assert turns.on_end_word(wire.EndWord(0.9)) == [Word("hello", 0.5, 0.9)]
    assert turns.on_word(wire.Word("there", 1.0)) == []
    assert turns.on_end_word(wire.EndWord(1.3)) == [Word("there", 1.0, 1.3)]
    # A pause under the threshold, told by an echo: the turn goes on.
    assert turns.on_progress(2.0) == []
    # moshi-server: a word before a pause gets its EndWord only with the next word; the
    # next echo lets it go, its end unknown (= its start).
    assert turns.on_word(wire.Word("friend", 1.4)) == []
    assert turns.on_progress(1.9) == [Word("friend", 1.4, 1.4)]
    words = (Word("hello", 0.5, 0.9), Word("there", 1.0, 1.3), Word("friend", 1.4, 1.4))
    assert turns.on_progress(2.5) == [
        Segment("hello there friend", 0.5, 1.4, words),
        EndOfTurn(1.4),
    ]
    assert turns.on_end_word(wire.EndWord(4.0)) == []  # that late EndWord: nothing open
    # A word after a long pause ends the turn before it.
    assert turns.on_word(wire.Word("again", 5.0)) == []
    assert turns.on_end_word(wire.EndWord(5.4)) == [Word("again", 5.0, 5.4)]
    out = turns.on_word(wire.Word("later", 7.0))
    assert out == [Segment("again", 5.0, 5.4, (Word("again", 5.0, 5.4),)), EndOfTurn(5.4)]
    assert turns.flush() == [
        Word("later", 7.0, 7.0),
        Segment("later", 7.0, 7.0, (Word("later", 7.0, 7.0),)),
        EndOfTurn(7.0),
    ]


def test_node_entries() -> None:
    assert parse_node("ws://gpu1:8080") == (f"ws://gpu1:8080{DEFAULT_PATH}", "")
    assert parse_node("wss://gpu1/asr?x=1 health=http://gpu1:8001") == (
        "wss://gpu1/asr?x=1",
        "http://gpu1:8001/info",
    )
    assert parse_node("ws://a:1/ health=http://a:2/info")[1] == "http://a:2/info"
    for bad in ("http://gpu1:8080", "", "ws://a:1 info=http://a:2", "ws://a:1 health=a:2"):
        with pytest.raises(ValueError):
            parse_node(bad)


def test_placement_most_free_slots_first_ties_in_turn() -> None:
    engine = RemoteEngine(["ws://a:1", "ws://b:1", "ws://c:1"], node_capacity=4)
    a, b, c = engine.nodes_
    a.ours, b.ours, c.ours = 1, 3, 1
    firsts = {engine.candidates()[0].url for _ in range(4)}
    assert firsts == {a.url, c.url}  # equal free slots: in turn; b has fewest
    assert engine.candidates()[-1] is b
    # Reported by /info: its free slots less what we opened since.
    b.reported_free, b.ours_at_report, b.ours = 10, 0, 2
    assert engine.candidates()[0] is b and b.free(0.0) == 8
    c.reachable = False
    assert c not in engine.candidates()
    for node in (a, b):
        node.full_until = float("inf")  # said "no free channels"
    assert engine.candidates() == []
    assert engine.free_slots == 0


def test_registry_builds_a_remote_engine() -> None:
    config = EngineConfig(name="remote", urls=("ws://a:1 health=http://a:2",), capacity=8)
    engine, choice = build_engine(config)
    assert isinstance(engine, RemoteEngine) and choice.name == "remote"
    assert engine.sample_rate == 24000
    node: RemoteNode = engine.nodes_[0]
    assert (node.url, node.info_url, node.capacity) == (
        f"ws://a:1{DEFAULT_PATH}",
        "http://a:2/info",
        8,
    )
    with pytest.raises(ValueError, match="urls"):
        build_engine(EngineConfig(name="remote"))
    assert LEAD_SILENCE_S * RATE % FRAME_SIZE == 0  # whole model frames
    assert SinkEngine().nodes() == []
