"""`EngineStream.settled_samples`: audio is settled only once every word from it is out."""

from __future__ import annotations

import asyncio

import numpy as np

from engine.base import Closed, EngineEvent, EngineStream, Word
from engine.moonshine import MoonshineEngine
from engine.sink import SinkEngine
from telephony.audio import resample_whole
from tests.speech import SENTENCES, read_pcm, speech_wav

RATE = 16000


async def consume(stream: EngineStream, seen: list[tuple[EngineEvent, int]]) -> None:
    """Read events like a Leg does, noting `settled_samples` as each one arrives."""
    async for event in stream.events():
        seen.append((event, stream.settled_samples))


async def test_sink_settles_what_it_consumes() -> None:
    engine = SinkEngine(capacity=1)
    stream = engine.open("a")
    seen: list[tuple[EngineEvent, int]] = []
    reader = asyncio.create_task(consume(stream, seen))
    stream.push(np.ones(1920, dtype=np.int16))
    stream.push(np.ones(4000, dtype=np.int16))
    assert await asyncio.wait_for(stream.wait_settled(5920), 5)
    assert stream.settled_samples == 5920
    stream.close()
    await asyncio.wait_for(reader, 5)
    assert [e for e, _ in seen] == [Closed("flushed")]
    # Nothing more can settle once the stream has ended.
    assert not await asyncio.wait_for(stream.wait_settled(5921), 5)


async def test_moonshine_settles_an_utterance_only_after_its_words(
    moonshine_engine: MoonshineEngine,
) -> None:
    speech = resample_whole(*read_pcm(speech_wav(SENTENCES[0])), RATE)
    lead = np.zeros(RATE, dtype=np.int16)
    tail = np.zeros(2 * RATE, dtype=np.int16)
    stream = moonshine_engine.open("settle")
    seen: list[tuple[EngineEvent, int]] = []
    reader = asyncio.create_task(consume(stream, seen))
    end_of_speech = len(lead) + len(speech)

    await stream.write(lead)
    # Leading silence settles (but for the pad an utterance may start with) before any speech.
    assert await asyncio.wait_for(stream.wait_settled(RATE // 2), 10)
    assert stream.settled_samples <= RATE - int(0.2 * RATE)

    await stream.write(speech)
    await asyncio.sleep(1.0)  # the engine has heard all of it, but the utterance is open
    assert stream.settled_samples < end_of_speech

    await stream.write(tail)
    # Once 2 s of silence follow, the speech is settled...
    assert await asyncio.wait_for(stream.wait_settled(end_of_speech), 30)
    words_when_settled = [e for e, _ in seen if isinstance(e, Word)]
    stream.close()
    await asyncio.wait_for(reader, 30)
    # ...and settled meant it: no word came out after that.
    words = [e for e, _ in seen if isinstance(e, Word)]
    assert words and words == words_when_settled
    # Every word arrived while its own audio was still unsettled.
    for event, settled in seen:
        if isinstance(event, Word):
            assert event.start_s * RATE >= settled, (event, settled)
    assert stream.settled_samples == len(lead) + len(speech) + len(tail)
