"""A leg's flush waits for a slow engine as long as it makes progress, and not for a stuck one.

The engines here are test doubles of the `EngineStream` contract: an engine that stalls or
crawls on purpose cannot be had from the real ones on demand.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import pytest

from engine.base import Closed, Engine, EngineInfo, EngineStream, Word
from telephony.bus import BusEvent, CallEnded, LegEvent
from telephony.call import CallHub


class ScriptedStream(EngineStream):
    """On close, emits `words` words `interval_s` apart, then `Closed` (unless `stuck`)."""

    def __init__(self, call_id: str, leg: str, words: int, interval_s: float, stuck: bool) -> None:
        super().__init__(call_id, leg, max_buffer_s=10.0, sample_rate=24000)
        self.words, self.interval_s, self.stuck = words, interval_s, stuck
        self.flusher: asyncio.Task[None] | None = None

    def _on_audio(self) -> None:
        self._take_pending()

    def _on_close(self) -> None:
        self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        for n in range(self.words):
            await asyncio.sleep(self.interval_s)
            self._emit(Word(f"w{n}", n * 0.1, n * 0.1 + 0.1))
        if self.stuck:
            await asyncio.Event().wait()
        self._emit(Closed("flushed"))


class ScriptedEngine(Engine):
    sample_rate = 24000
    name = "scripted"

    def __init__(self, words: int, interval_s: float, stuck: bool = False) -> None:
        self.script = (words, interval_s, stuck)
        self.streams: list[ScriptedStream] = []

    @property
    def capacity(self) -> int:
        return 1

    @property
    def free_slots(self) -> int:
        return 1

    def open(
        self, call_id: str, leg: str = "caller", keyterms: tuple[str, ...] = ()
    ) -> EngineStream:
        self.streams.append(ScriptedStream(call_id, leg, *self.script))
        return self.streams[-1]

    def info(self) -> EngineInfo:
        return EngineInfo(self.name, "scripted", 1, "none")


def words_of(events: list[BusEvent]) -> list[str]:
    return [e.event.text for e in events if isinstance(e, LegEvent) and isinstance(e.event, Word)]


async def test_a_slow_flush_keeps_every_word_past_the_stall_limit() -> None:
    engine = ScriptedEngine(words=12, interval_s=0.05)  # 0.6 s of flush, 0.05 s between words
    hub = CallHub(engine)
    events: list[BusEvent] = []
    hub.bus.add_sink(events.append)
    call = hub.open_call("test")
    call.leg("caller").push(np.zeros(2400, dtype=np.int16))
    started = time.monotonic()
    await call.legs["caller"].finish(stall_s=0.2)
    assert time.monotonic() - started >= 0.6
    assert words_of(events) == [f"w{n}" for n in range(12)]


async def test_a_stuck_engine_is_given_up_after_the_stall_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = ScriptedEngine(words=3, interval_s=0.05, stuck=True)
    hub = CallHub(engine)
    events: list[BusEvent] = []
    hub.bus.add_sink(events.append)
    call = hub.open_call("test")
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        await call.legs["caller"].finish(stall_s=0.3)
    waited = time.monotonic() - started
    assert 0.45 <= waited < 2.0, waited  # 3 words (0.15 s), then 0.3 s without progress
    assert words_of(events) == ["w0", "w1", "w2"]  # what came before the stall is kept
    assert "engine stalled" in caplog.text
    flusher = engine.streams[0].flusher
    assert flusher is not None
    flusher.cancel()


async def test_a_drain_waits_for_a_call_its_front_end_is_already_ending() -> None:
    """SIGTERM while a caller's own hang-up is still flushing: the drain must not return (and
    the service close its store) before that call's end, with all its words, is announced."""
    engine = ScriptedEngine(words=8, interval_s=0.05)
    hub = CallHub(engine)
    events: list[BusEvent] = []
    hub.bus.add_sink(events.append)
    call = hub.open_call("test")
    hanging_up = asyncio.create_task(call.end("remote hangup"))  # what the front end does
    await asyncio.sleep(0.1)  # its flush is under way
    await hub.drain(deadline_s=0.0)
    ended = [e for e in events if isinstance(e, CallEnded)]
    assert [e.reason for e in ended] == ["remote hangup"]
    assert words_of(events) == [f"w{n}" for n in range(8)]
    await hanging_up


class StalledStream(EngineStream):
    """Takes no audio (its engine is stuck, its buffer fills); `fail()` ends it as a failed
    decode does (Moonshine's `engine error`)."""

    def __init__(self, call_id: str, leg: str) -> None:
        super().__init__(call_id, leg, max_buffer_s=1.0, sample_rate=24000)

    def _on_audio(self) -> None:
        pass

    def _on_close(self) -> None:
        pass

    def fail(self) -> None:
        self._emit(Closed("engine error"))


class StalledEngine(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(words=0, interval_s=0)
        self.stalled: list[StalledStream] = []

    def open(
        self, call_id: str, leg: str = "caller", keyterms: tuple[str, ...] = ()
    ) -> EngineStream:
        self.stalled.append(StalledStream(call_id, leg))
        return self.stalled[-1]


async def test_a_writer_waiting_for_room_goes_on_when_the_engine_fails() -> None:
    """A client slowed by backpressure (`Leg.write`) on an engine that then fails with its
    buffer full: the call ends and the writer returns, instead of holding the socket."""
    engine = StalledEngine()
    hub = CallHub(engine)
    call = hub.open_call("test")
    writer = asyncio.create_task(call.leg("caller").write(np.zeros(3 * 24000, dtype=np.int16)))
    await asyncio.sleep(0.1)
    assert not writer.done(), "a full buffer makes the writer wait"
    engine.stalled[0].fail()
    await asyncio.wait_for(writer, 2)
    assert call.ended and call.engine_reason == "engine error"
