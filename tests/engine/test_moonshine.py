"""The Moonshine CPU engine on real speech (hibari-tts through the phone path), via the engine
contract: words, their times, partials, endpointing, finalize, flush, capacity, model loading."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.base import Closed, EndOfTurn, EngineEvent, EngineFull, Partial, Segment, Word
from engine.endpointing import EndpointConfig
from engine.moonshine import TARGET_LOAD, VAD_COST, MoonshineEngine
from engine.moonshine_model import ModelFiles, ModelLoadError, load, prepare
from telephony.audio import PcmArray, resample_whole, ulaw_decode
from tests.conftest import MODEL_CACHE
from tests.speech import SENTENCES, phone_bytes, read_pcm, speech_wav, word_error_rate

RATE = 16000
# Measured here on SENTENCES through 8 kHz μ-law: every sentence exact (WER 0.000).
MEAN_WER_BOUND = 0.02


def phone_pcm(text: str, lead_s: float = 0.3, tail_s: float = 0.8) -> PcmArray:
    """`text` as a caller sends it (8 kHz μ-law), at the engine's 16 kHz, with silence around."""
    speech = resample_whole(ulaw_decode(phone_bytes(text)), 8000, RATE)
    return np.concatenate([silence(lead_s), speech, silence(tail_s)])


def silence(seconds: float) -> PcmArray:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


async def transcribe(
    engine: MoonshineEngine, pcm: PcmArray, chunk: int | list[int] = 320
) -> list[EngineEvent]:
    stream = engine.open("call", "caller")
    sizes = [chunk] * (len(pcm) // chunk + 1) if isinstance(chunk, int) else chunk
    start = 0
    for size in sizes:
        await stream.write(pcm[start : start + size])
        start += size
    await stream.write(pcm[start:])
    stream.close()
    return [event async for event in stream.events()]


def words(events: list[EngineEvent]) -> list[Word]:
    return [e for e in events if isinstance(e, Word)]


def text_of(events: list[EngineEvent]) -> str:
    return " ".join(e.text for e in events if isinstance(e, Segment))


@pytest.fixture
async def finals_only() -> MoonshineEngine:
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=4, partial_interval_s=0)
    await engine.start()
    yield engine  # type: ignore[misc]
    await engine.stop()


async def test_phone_sentences_are_transcribed_exactly(finals_only: MoonshineEngine) -> None:
    rates = []
    for text in SENTENCES:
        got = text_of(await transcribe(finals_only, phone_pcm(text)))
        rates.append(word_error_rate(text, got))
    assert float(np.mean(rates)) <= MEAN_WER_BOUND, rates


async def test_text_is_cased_and_punctuated_and_words_carry_it(
    finals_only: MoonshineEngine,
) -> None:
    events = await transcribe(finals_only, phone_pcm(SENTENCES[1]))
    segments = [e for e in events if isinstance(e, Segment)]
    assert [s.text for s in segments] == [
        "I would like to check the status of my order from last week."
    ]
    # Word events carry the words as written in the segment, punctuation included.
    assert " ".join(w.text for w in words(events)) == segments[0].text
    assert segments[0].words == tuple(words(events))


async def test_events_are_ordered_and_timed(finals_only: MoonshineEngine) -> None:
    pcm = phone_pcm(SENTENCES[4], lead_s=1.0, tail_s=1.0)
    events = await transcribe(finals_only, pcm)
    assert isinstance(events[-1], Closed)
    ws = words(events)
    starts = [w.start_s for w in ws]
    assert ws and starts == sorted(starts)
    assert all(w.end_s > w.start_s for w in ws)
    # The first word starts where the sound does (within the 0.25 s the timing promises).
    assert abs(ws[0].start_s - first_audible_s(pcm)) <= 0.25
    assert ws[-1].end_s <= len(pcm) / RATE - 0.8
    segments = [e for e in events if isinstance(e, Segment)]
    turns = [e for e in events if isinstance(e, EndOfTurn)]
    assert len(turns) == len(segments) == 1
    assert segments[0].end_s <= turns[0].at_s <= segments[0].end_s + 0.5


async def test_word_starts_within_a_quarter_second_of_the_truth(
    finals_only: MoonshineEngine,
) -> None:
    """Words spoken one at a time, with known silences between them (0.25-0.45 s, shorter
    than a pause that ends the utterance): each word's start against where it was put."""
    rng = np.random.default_rng(3)
    errors = []
    for sentence in (
        "please check my account balance today",
        "the billing department will call you back",
    ):
        parts, truth, at = [silence(0.5)], [], 0.5
        for word in sentence.split():
            spoken = trimmed_word(word)
            truth.append(at)
            gap = silence(float(rng.uniform(0.25, 0.45)))
            parts += [spoken, gap]
            at += (len(spoken) + len(gap)) / RATE
        events = await transcribe(finals_only, np.concatenate(parts))
        assert len([e for e in events if isinstance(e, Segment)]) == 1  # one utterance
        got = words(events)
        assert len(got) == len(truth), [w.text for w in got]
        errors += [abs(w.start_s - t) for w, t in zip(got, truth, strict=True)]
    # Measured: at most 7 ms. The bound is 0.25 s.
    assert max(errors) <= 0.25, errors


def audible(pcm: PcmArray) -> tuple[int, int]:
    """First and last audible sample: the 10 ms envelope over 2 % of its peak."""
    envelope = np.convolve(np.abs(pcm.astype(np.float64)), np.ones(160) / 160, "same")
    loud = np.flatnonzero(envelope > envelope.max() * 0.02)
    return int(loud[0]), int(loud[-1])


def first_audible_s(pcm: PcmArray) -> float:
    return audible(pcm)[0] / RATE


def trimmed_word(word: str) -> PcmArray:
    """`word` alone, from its first to its last audible sample."""
    pcm = resample_whole(*read_pcm(speech_wav(word)), RATE)
    first, last = audible(pcm)
    return pcm[first : last + 1]


async def test_chunking_does_not_change_the_words(finals_only: MoonshineEngine) -> None:
    pcm = phone_pcm(SENTENCES[2])
    rng = np.random.default_rng(7)
    big = words(await transcribe(finals_only, pcm, 16000))
    tiny = words(await transcribe(finals_only, pcm, [int(n) for n in rng.integers(1, 700, 500)]))
    assert big and big == tiny


async def test_a_pause_ends_an_utterance_and_each_gets_its_own_segment(
    finals_only: MoonshineEngine,
) -> None:
    pcm = np.concatenate([phone_pcm(SENTENCES[1], tail_s=1.0), phone_pcm(SENTENCES[4])])
    events = await transcribe(finals_only, pcm)
    segments = [e for e in events if isinstance(e, Segment)]
    assert len(segments) == 2 and segments[0].end_s < segments[1].start_s
    said = (SENTENCES[1], SENTENCES[4])
    assert [word_error_rate(t, s.text) for t, s in zip(said, segments, strict=True)] == [0, 0]


async def test_close_flushes_words_still_being_spoken(finals_only: MoonshineEngine) -> None:
    """Audio that stops mid-speech (a hang-up) still gives its words."""
    pcm = phone_pcm(SENTENCES[4], tail_s=0.0)
    events = await transcribe(finals_only, pcm[: len(pcm) * 3 // 4])
    assert isinstance(events[-1], Closed)
    assert text_of(events).startswith("I want to cancel my")


async def test_finalize_cuts_the_utterance_without_a_pause(finals_only: MoonshineEngine) -> None:
    stream = finals_only.open("finalize")
    events: list[EngineEvent] = []

    async def read() -> None:
        async for event in stream.events():
            events.append(event)

    reader = asyncio.create_task(read())
    speech = phone_pcm(SENTENCES[1], tail_s=0.0)
    await stream.write(speech)
    stream.finalize()
    assert await asyncio.wait_for(stream.wait_settled(len(speech)), 20)
    segments = [e for e in events if isinstance(e, Segment)]  # before the stream's end
    stream.close()
    await reader
    assert [s.text for s in segments] == [
        "I would like to check the status of my order from last week."
    ]


async def test_a_monologue_is_cut_at_its_limit_between_words_and_keeps_them_all() -> None:
    """Three sentences with no pause, cut at most every 6 s: every word is kept."""
    engine = MoonshineEngine(
        cache_dir=MODEL_CACHE,
        capacity=1,
        partial_interval_s=0,
        endpoint=EndpointConfig(max_utterance_s=6.0),
    )
    await engine.start()
    try:
        texts = SENTENCES[0], SENTENCES[1], SENTENCES[4]
        pcm = np.concatenate([phone_pcm(t, lead_s=0.0, tail_s=0.0) for t in texts])
        events = await transcribe(engine, np.concatenate([silence(0.3), pcm, silence(1)]))
    finally:
        await engine.stop()
    segments = [e for e in events if isinstance(e, Segment)]
    assert len(segments) >= 3
    assert all(s.end_s - s.start_s <= 6.0 for s in segments)
    assert word_error_rate(" ".join(texts), text_of(events)) <= 0.05, text_of(events)


async def test_partials_come_while_speaking_and_the_segment_replaces_them() -> None:
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=1, partial_interval_s=1.0)
    await engine.start()
    try:
        stream = engine.open("partials")
        for frame in np.split(phone_pcm(SENTENCES[1]), range(320, 100 * RATE, 320)):
            stream.push(frame)  # 20 ms frames in real time, as a caller speaks
            await asyncio.sleep(0.02)
        stream.close()
        events = [event async for event in stream.events()]
    finally:
        await engine.stop()
    partials = [e for e in events if isinstance(e, Partial)]
    segments = [e for e in events if isinstance(e, Segment)]
    assert len(segments) == 1 and len(partials) >= 2, partials  # a 3.6 s utterance
    # Every partial comes before the segment that replaces it, covering more and more of it.
    assert events.index(partials[-1]) < events.index(segments[0])
    ends = [p.end_s for p in partials]
    assert ends == sorted(ends) and ends[-1] <= segments[0].end_s + 0.5
    assert all(p.start_s <= segments[0].start_s for p in partials)
    # The hypothesis grows towards the final text: its first words are already right.
    assert all(p.text.split()[:2] == segments[0].text.split()[:2] for p in partials)
    # The last is the final decoded ahead in the pause (before the pause is long enough to
    # end the utterance): the whole sentence, as the segment will have it.
    assert partials[-1].text == segments[0].text, (partials[-1], segments[0].text)


async def test_without_partial_interval_no_partials(finals_only: MoonshineEngine) -> None:
    events = await transcribe(finals_only, phone_pcm(SENTENCES[0]))
    assert not [e for e in events if isinstance(e, Partial)]


async def test_silence_and_noise_give_no_words(finals_only: MoonshineEngine) -> None:
    rng = np.random.default_rng(1)
    hiss = (rng.standard_normal(3 * RATE) * 300).astype(np.int16)
    t = np.arange(3 * RATE) / RATE
    hum = (np.sin(2 * np.pi * 50 * t) * 3000).astype(np.int16)
    events = await transcribe(finals_only, np.concatenate([silence(2), hiss, hum]))
    assert events == [Closed("flushed")]


async def test_full_engine_refuses_and_a_closed_stream_frees_its_slot(
    finals_only: MoonshineEngine,
) -> None:
    streams = [finals_only.open(f"c{i}") for i in range(4)]
    assert finals_only.free_slots == 0
    with pytest.raises(EngineFull):
        finals_only.open("one too many")
    streams[0].close()
    assert [e async for e in streams[0].events()] == [Closed("flushed")]
    assert finals_only.free_slots == 1
    for stream in streams[1:]:
        stream.close()


async def test_capacity_zero_is_measured_from_the_machine() -> None:
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=0, threads=2)
    await engine.start()
    try:
        info = engine.info()
    finally:
        await engine.stop()
    rtf = info.extra["real_time_factor"]
    assert 0 < rtf < 1
    # Streams of continuous speech that two threads keep at the target load.
    assert info.capacity == max(1, int(2 * TARGET_LOAD / (rtf + VAD_COST)))


async def test_one_model_in_memory_for_every_engine_of_the_process() -> None:
    assert load("", MODEL_CACHE) is load("", MODEL_CACHE)


# --- model preparation and loading errors --------------------------------------------------


def test_an_unwritable_cache_dir_is_a_clear_error_at_start(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocked = Path("/proc/stt-bridge-cache")  # not even root can create folders here
    else:
        blocked = tmp_path / "ro"
        blocked.mkdir(mode=0o500)
    with pytest.raises(ModelLoadError, match=r"engine\.cache_dir"):
        prepare(ModelFiles.locate(""), blocked)


def test_a_corrupt_model_file_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for part in ("encoder_model", "decoder_model_merged"):
        (folder / f"{part}.ort").write_bytes(b"not a model" * 100)
    with pytest.raises(ModelLoadError, match="not a usable model file"):
        prepare(ModelFiles.locate(str(folder)), tmp_path / "cache")


def test_a_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such folder"):
        ModelFiles.locate(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"encoder_model\.ort or encoder_model\.onnx"):
        prepare(ModelFiles.locate(str(tmp_path / "empty")), tmp_path / "cache")


def test_a_damaged_prepared_model_is_prepared_again(tmp_path: Path) -> None:
    """A cache cut short (disk full, a kill mid-write) is noticed and rebuilt, never loaded."""
    files = ModelFiles.locate("")
    first = prepare(files, tmp_path)
    original = first["encoder_model"].read_bytes()
    first["encoder_model"].write_bytes(original[: len(original) // 2])
    again = prepare(files, tmp_path)
    assert again == first and again["encoder_model"].read_bytes() == original


def test_a_prepared_cache_moved_elsewhere_is_used_as_it_is(tmp_path: Path) -> None:
    """Prepared in one place and mounted in another (an image built with it, a volume): its
    files are checked against their digests and loaded, not prepared again."""
    files = ModelFiles.locate("")
    built = prepare(files, tmp_path / "built")
    (tmp_path / "built").rename(tmp_path / "mounted")
    moved = {
        part: tmp_path / "mounted" / path.relative_to(tmp_path / "built")
        for part, path in built.items()
    }
    written = {path: path.stat().st_mtime_ns for path in moved.values()}
    assert prepare(files, tmp_path / "mounted") == moved
    assert {path: path.stat().st_mtime_ns for path in moved.values()} == written


def test_processes_starting_together_prepare_the_model_once(tmp_path: Path) -> None:
    """Workers or a test run starting at once on a new machine: one converts, the others
    wait for it and load the same files (none reads a half-written one)."""
    script = (
        "import sys; from pathlib import Path;"
        "from engine.moonshine_model import ModelFiles, prepare;"
        "paths = prepare(ModelFiles.locate(''), Path(sys.argv[1]));"
        "print(sum(p.stat().st_size for p in paths.values()))"
    )
    root = Path(__file__).resolve().parents[2]
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], cwd=root, stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    sizes = {run.communicate(timeout=120)[0].strip() for run in runs}
    assert [run.returncode for run in runs] == [0, 0, 0]
    assert len(sizes) == 1
    assert len(list(tmp_path.glob("moonshine-*/*.onnx"))) == 3  # encoder, two decoders
