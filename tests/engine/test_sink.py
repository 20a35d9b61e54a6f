"""The sink engine keeps the engine contract while it discards audio."""

from __future__ import annotations

import numpy as np
import pytest

from engine.base import Closed, EngineFull
from engine.sink import SinkEngine


async def test_sink_admits_up_to_capacity_and_flushes_to_closed() -> None:
    engine = SinkEngine(capacity=2)
    await engine.start()
    a, b = engine.open("a"), engine.open("b")
    with pytest.raises(EngineFull):
        engine.open("c")
    for _ in range(1000):  # far more than its buffer: consumed, never dropped
        a.push(np.ones(2400, dtype=np.int16))
    assert a.stats.samples_dropped == 0 and a.pending_samples == 0
    a.close()
    assert [e async for e in a.events()] == [Closed("flushed")]
    assert engine.free_slots == 1
    b.close()
    assert engine.free_slots == 2
