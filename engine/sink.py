"""An engine that takes audio and says nothing: a benchmarking aid, not for production.

It keeps the whole contract (slots, EngineFull, bounded buffer, flush and `Closed`) so load
tests measure the bridge alone: front ends, decoding, resampling, sessions, fan-out.
Select it with `engine.name = "sink"` (or STT_BRIDGE_ENGINE_NAME=sink).
"""

from __future__ import annotations

from typing import Final

from engine.base import Closed, Engine, EngineFull, EngineInfo, EngineStream

SINK_RATE: Final = 24000  # Kyutai's, the production path a load test stands in for


class SinkEngine(Engine):
    name = "sink"
    sample_rate = SINK_RATE

    def __init__(self, capacity: int = 1000, max_buffer_s: float = 10.0) -> None:
        self._capacity = capacity
        self._max_buffer_s = max_buffer_s
        self._streams: set[SinkStream] = set()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def free_slots(self) -> int:
        return self._capacity - len(self._streams)

    def open(self, call_id: str, leg: str = "caller", keyterms: tuple[str, ...] = ()) -> SinkStream:
        if len(self._streams) >= self._capacity:
            raise EngineFull(f"all {self._capacity} sink engine streams are busy")
        stream = SinkStream(self, call_id, leg, self._max_buffer_s)
        self._streams.add(stream)
        return stream

    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.name,
            model="none: consumes audio, emits no words (benchmarking aid)",
            capacity=self._capacity,
            device="none",
        )


class SinkStream(EngineStream):
    def __init__(self, engine: SinkEngine, call_id: str, leg: str, max_buffer_s: float) -> None:
        super().__init__(call_id, leg, max_buffer_s, SINK_RATE)
        self._engine = engine

    def _on_audio(self) -> None:
        self._take_pending()  # consumed at once: the buffer never fills

    def _on_close(self) -> None:
        self._take_pending()
        self._engine._streams.discard(self)
        self._emit(Closed("flushed"))
