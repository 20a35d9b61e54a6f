"""The Kyutai engine on tiny random-weight checkpoints, loaded like a hub repo.

Random weights say nothing useful, but they say it deterministically (greedy decoding), so a
stream's events are a fingerprint of the model state it saw: equal events mean the batcher fed
it exactly its own audio, no more, no less, whatever the other slots did.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from engine.base import (
    Closed,
    EndOfTurn,
    EngineEvent,
    EngineFull,
    EngineUnavailable,
    Segment,
    Word,
)
from engine.config import EngineConfig
from engine.kyutai import (
    FRAME_SIZE,
    CheckpointError,
    KyutaiEngine,
    KyutaiStream,
    load_checkpoint,
)
from engine.random_checkpoint import write_checkpoint
from engine.registry import build_engine

pytestmark = pytest.mark.xdist_group("kyutai")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("stt-tiny"), "tiny", seed=1)


def noise_call(seconds: float, seed: int) -> np.ndarray:
    """Loud, varied audio: random weights turn it into many tokens."""
    rng = np.random.default_rng(seed)
    envelope = np.repeat(rng.uniform(0.1, 1.0, int(seconds * 10) + 1), 2400)
    n = int(seconds * 24000)
    return (rng.standard_normal(n) * 6000 * envelope[:n]).astype(np.int16)


@pytest.fixture
async def engine_factory(tiny_checkpoint: Path) -> AsyncIterator[object]:
    engines: list[KyutaiEngine] = []

    async def make(batch_size: int, **kwargs: object) -> KyutaiEngine:
        engine = KyutaiEngine(str(tiny_checkpoint), batch_size=batch_size, **kwargs)  # type: ignore[arg-type]
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.stop()


async def collect(stream: KyutaiStream) -> list[EngineEvent]:
    return [event async for event in stream.events()]


async def run_alone(engine: KyutaiEngine, call_id: str, pcm: np.ndarray) -> list[EngineEvent]:
    stream = engine.open(call_id)
    stream.push(pcm)
    stream.close()
    return await collect(stream)


def watch(stream: KyutaiStream) -> tuple[list[EngineEvent], asyncio.Task[None]]:
    """Events as they come (the list grows while the test goes on), and the task reading them."""
    seen: list[EngineEvent] = []

    async def consume() -> None:
        async for event in stream.events():
            seen.append(event)

    return seen, asyncio.create_task(consume())


def words(events: list[EngineEvent]) -> list[Word]:
    return [e for e in events if isinstance(e, Word)]


# --- loading ----------------------------------------------------------------------------------


def test_a_checkpoint_folder_loads_with_its_own_file_names(tiny_checkpoint: Path) -> None:
    info = load_checkpoint(str(tiny_checkpoint))
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert Path(info.moshi_weights) == tiny_checkpoint / config["moshi_name"]
    assert Path(info.mimi_weights) == tiny_checkpoint / config["mimi_name"]
    assert Path(info.tokenizer) == tiny_checkpoint / config["tokenizer_name"]
    assert info.stt_config["audio_delay_seconds"] == 0.5
    assert info.model_type == "stt"


def test_a_bad_model_setting_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither a folder nor"):
        load_checkpoint("not-a-repo-id")


def test_a_hub_repo_id_loads_through_huggingface_hub_from_its_cache(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`STT_MODEL=org/name` takes the real download path: hf_hub_download and its cache (here
    filled beforehand, as a machine that downloaded the repo once has it; offline)."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--kyutai-test--stt-tiny"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from engine.kyutai import load_checkpoint\n"
        "info = load_checkpoint('kyutai-test/stt-tiny')\n"
        "print(info.moshi_weights)\n"
        "print(info.get_text_tokenizer().vocab_size())\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    weights, vocab = done.stdout.split()
    assert Path(weights).resolve() == (repo / "snapshots" / commit / "model.safetensors").resolve()
    assert int(vocab) == 128
    # A repo that is not in the cache fails loudly rather than running without a model.
    code = "from engine.kyutai import load_checkpoint\nload_checkpoint('kyutai-test/absent')\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert "absent" in done.stderr


async def test_registry_builds_the_kyutai_engine_from_config(tiny_checkpoint: Path) -> None:
    engine, choice = build_engine(
        EngineConfig(name="kyutai", model=str(tiny_checkpoint), batch_size=3)
    )
    assert isinstance(engine, KyutaiEngine) and choice.name == "kyutai"
    await engine.start()
    try:
        info = engine.info()
        assert (info.name, info.device, info.capacity) == ("kyutai", "cpu", 3)
        assert info.extra["dtype"] == "float32" and info.extra["cuda_graphs"] is False
        assert info.extra["end_of_turn"] == "semantic VAD head"
        assert engine.free_slots == 3
    finally:
        await engine.stop()


# --- the batcher ------------------------------------------------------------------------------


async def test_a_stream_gives_the_same_events_alone_or_in_a_busy_batch(engine_factory) -> None:  # type: ignore[no-untyped-def]
    pcm = noise_call(4.0, seed=7)
    alone = await run_alone(await engine_factory(1), "alone", pcm)
    assert len(words(alone)) >= 5, "the fingerprint needs words"

    engine: KyutaiEngine = await engine_factory(8)
    others: list[tuple[KyutaiStream, asyncio.Task[list[EngineEvent]]]] = []

    def start_other(i: int) -> None:
        other = engine.open(f"other-{i}")
        other.push(noise_call(0.5 + 0.37 * i, seed=100 + i))
        others.append((other, asyncio.create_task(collect(other))))

    for i in range(3):
        start_other(i)
    target = engine.open("target")
    events = asyncio.create_task(collect(target))
    # Its audio arrives in odd pieces with pauses, so other slots step while it has no frame.
    pieces = np.array_split(pcm, [1000, 1920 * 3 + 17, 30000, 30001, 70000])
    for n, piece in enumerate(pieces):
        target.push(piece)
        if n == 2:
            for i in range(3, 7):
                start_other(i)
        if n == 3:
            others[0][0].close()
            others[4][0].close()
        await asyncio.sleep(0.25)
    target.close()
    for other, _ in others:
        other.close()
    assert await events == alone
    for _, task in others:
        assert isinstance((await task)[-1], Closed)
    assert engine.free_slots == 8


async def test_a_reused_slot_gives_what_a_fresh_engine_gives(engine_factory) -> None:  # type: ignore[no-untyped-def]
    pcm = noise_call(3.0, seed=11)
    fresh = await run_alone(await engine_factory(2), "fresh", pcm)

    engine: KyutaiEngine = await engine_factory(2)
    before = engine.open("before")
    neighbour = engine.open("neighbour")
    neighbour_events = asyncio.create_task(collect(neighbour))
    neighbour.push(noise_call(6.0, seed=12))
    before.push(noise_call(2.0, seed=13))
    before.close()
    await collect(before)
    reused = engine.open("reused")
    assert reused.slot == before.slot, "the freed slot is the one taken again"
    reused.push(pcm)
    reused.close()
    assert await collect(reused) == fresh
    neighbour.close()
    assert isinstance((await neighbour_events)[-1], Closed)


async def test_chunking_of_pushed_audio_does_not_change_the_result(engine_factory) -> None:  # type: ignore[no-untyped-def]
    pcm = noise_call(3.0, seed=21)
    engine: KyutaiEngine = await engine_factory(2)
    whole = await run_alone(engine, "whole", pcm)
    stream = engine.open("chunked")
    events = asyncio.create_task(collect(stream))
    rng = np.random.default_rng(5)
    start = 0
    while start < len(pcm):
        size = int(rng.choice([1, 3, 160, 1919, 1920, 1921, 4800]))
        stream.push(pcm[start : start + size])
        start += size
        if rng.random() < 0.05:
            await asyncio.sleep(0.01)
    stream.close()
    assert await events == whole


async def test_close_flushes_the_last_words_and_frees_the_slot(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine: KyutaiEngine = await engine_factory(2)
    pcm = noise_call(3.0, seed=31)
    stream = engine.open("flush")
    seen, task = watch(stream)
    stream.push(pcm)
    whole_frames = engine.timing.prefix_frames + len(pcm) // FRAME_SIZE
    async with asyncio.timeout(30):
        while engine.batcher.steps < whole_frames:  # every whole frame of the call is stepped
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    before_close = len(seen)
    assert engine.free_slots == 1
    stream.close()
    await task
    after = seen[before_close:]
    # The text of the last half second (the model's delay) comes out only after close.
    audio_end = len(pcm) / 24000
    late = [w for w in words(after) if w.end_s > audio_end - engine.timing.delay_s]
    assert late, after
    assert isinstance(seen[-1], Closed) and seen[-1].reason == "flushed"
    last_part = 1 if len(pcm) % FRAME_SIZE else 0
    assert engine.batcher.steps == whole_frames + last_part + engine.timing.flush_frames
    assert engine.free_slots == 2
    # Every word lies in the call's audio, in order.
    times = [(w.start_s, w.end_s) for w in words(seen)]
    assert all(0 <= s <= e <= audio_end + 1e-6 for s, e in times)
    assert times == sorted(times)


async def test_segments_and_end_of_turn_close_the_words_of_the_turn(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine: KyutaiEngine = await engine_factory(1)
    events = await run_alone(engine, "turns", noise_call(3.0, seed=41))
    segments = [e for e in events if isinstance(e, Segment)]
    assert segments, "close ends the turn that is open"
    assert isinstance(events[-2], EndOfTurn) and isinstance(events[-3], Segment)
    assert [w for s in segments for w in s.words] == words(events)
    for segment in segments:
        assert segment.text == " ".join(w.text for w in segment.words)


async def test_a_full_engine_says_so_and_a_closed_slot_is_free_again(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine: KyutaiEngine = await engine_factory(2)
    a, b = engine.open("a"), engine.open("b")
    with pytest.raises(EngineFull):
        engine.open("c")
    a.close()  # no audio: closed at once, nothing to step
    assert await collect(a) == [Closed("flushed")]
    c = engine.open("c")
    assert c.slot == a.slot
    b.close()
    c.close()
    await collect(b)
    await collect(c)
    assert engine.free_slots == 2


async def test_settled_audio_follows_the_text_and_ends_at_close(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine: KyutaiEngine = await engine_factory(1)
    stream = engine.open("settle")
    task = asyncio.create_task(collect(stream))
    pcm = noise_call(2.0, seed=51)
    stream.push(pcm)
    stream.push(np.zeros(24000 * 2, dtype=np.int16))  # the caller goes quiet
    # 55 model steps: ~3 s alone, over 10 s with both cores busy (as in CI)
    assert await asyncio.wait_for(stream.wait_settled(len(pcm)), 30)
    assert stream.settled_samples <= stream.stats.samples_in
    stream.close()
    await task
    assert stream.settled_samples == stream.stats.samples_in


async def test_real_time_calls_share_one_step_per_frame(engine_factory) -> None:  # type: ignore[no-untyped-def]
    """Four phone-paced calls (20 ms packets, each its own phase) are stepped together: about
    one step per 80 ms frame for all of them, not one per call."""
    engine: KyutaiEngine = await engine_factory(4)
    steps: list[int] = []
    engine.on_step = lambda seconds, streams: steps.append(streams)
    seconds = 2.0
    packet = 480  # 20 ms at 24 kHz

    async def call(i: int) -> list[EngineEvent]:
        stream = engine.open(f"rt-{i}")
        pcm = noise_call(seconds, seed=60 + i)
        events = asyncio.create_task(collect(stream))
        await asyncio.sleep(0.017 * i)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(0, len(pcm), packet):
            await asyncio.sleep(max(0.0, start + n / 24000 - loop.time()))
            stream.push(pcm[n : n + packet])
        stream.close()
        return await events

    results = await asyncio.gather(*(call(i) for i in range(4)))
    assert all(isinstance(r[-1], Closed) for r in results)
    frames = int(seconds * 12.5)
    live_steps = len(steps) - engine.timing.flush_frames  # the flushes run together at the end
    assert live_steps <= frames * 1.5, steps  # 4 calls alone would take 4 * frames steps
    assert sum(steps) >= 4 * frames  # every frame of every call was stepped


async def test_a_failing_model_closes_its_calls_with_their_words_and_admits_no_more(
    engine_factory,  # type: ignore[no-untyped-def]
) -> None:
    engine: KyutaiEngine = await engine_factory(2)
    stream = engine.open("doomed")
    seen, task = watch(stream)
    stream.push(noise_call(2.0, seed=71))
    async with asyncio.timeout(30):
        while not words(seen):
            await asyncio.sleep(0.01)
    model = engine.model
    assert model is not None
    heard = list(seen)

    def broken(*args: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    model.step = broken  # type: ignore[method-assign,assignment]
    stream.push(noise_call(1.0, seed=72))
    await asyncio.wait_for(task, 30)
    assert seen[: len(heard)] == heard, "what was decoded before the failure is kept"
    assert seen[-1] == Closed("engine error")
    assert engine.free_slots == 0
    with pytest.raises(EngineUnavailable, match="illegal memory access"):
        engine.open("next")


def shifted(events: list[EngineEvent], seconds: float) -> list[EngineEvent]:
    """The events, `seconds` later."""

    def word(w: Word) -> Word:
        return Word(
            w.text, round(w.start_s + seconds, 3), round(w.end_s + seconds, 3), w.confidence
        )

    out: list[EngineEvent] = []
    for e in events:
        if isinstance(e, Word):
            out.append(word(e))
        elif isinstance(e, Segment):
            words = tuple(word(w) for w in e.words)
            out.append(Segment(e.text, words[0].start_s, words[-1].end_s, words, e.confidence))
        elif isinstance(e, EndOfTurn):
            out.append(EndOfTurn(round(e.at_s + seconds, 3), e.probability))
        else:
            out.append(e)
    return out


async def test_audio_the_buffer_dropped_counts_in_the_times(engine_factory) -> None:  # type: ignore[no-untyped-def]
    """A phone leg whose engine is behind: its 2 s buffer keeps the last 2 s of 6 s pushed at
    once. The model hears exactly those (the same events as a stream of them alone), stamped
    4 s later: times are the leg's audio, the lost seconds included."""
    pcm = noise_call(6.0, seed=31)
    kept = pcm[4 * 24000 :]
    engine: KyutaiEngine = await engine_factory(2, max_buffer_s=2.0)
    alone = await run_alone(engine, "kept", kept)
    assert len(words(alone)) >= 2, "the fingerprint needs words"
    stream = engine.open("behind")
    for piece in np.array_split(pcm, 12):  # 0.5 s each, before the engine takes any
        stream.push(piece)
    assert stream.stats.samples_dropped == 4 * 24000
    stream.close()
    assert await collect(stream) == shifted(alone, 4.0)
