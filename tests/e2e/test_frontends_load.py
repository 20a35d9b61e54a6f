"""20 calls at once across AudioSocket, Twilio and FreeSWITCH; one sends garbage mid-call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from telephony.audio import ulaw_decode
from tests.conftest import ServiceFactory
from tests.e2e.frontends import (
    asterisk_call,
    freeswitch_call,
    offline_words,
    twilio_call,
    watch_events,
)
from tests.speech import SENTENCES, phone_bytes

pytestmark = pytest.mark.solo  # twenty real-time calls: alone on the machine (see Makefile)


async def test_twenty_mixed_calls_while_one_sends_garbage(start_service: ServiceFactory) -> None:
    service = await start_service(capacity=24)
    port = service.ports["audiosocket"]
    base_ws = f"ws://127.0.0.1:{service.ports['audio']}"
    slin = {n: phone_bytes(SENTENCES[n], "pcm16", 8000) for n in (0, 2, 3)}
    ulaw = {n: phone_bytes(SENTENCES[n], "mulaw", 8000) for n in (1, 4, 5)}
    # call id → (its 8 kHz audio, the peer that places it)
    calls: dict[str, tuple[np.ndarray, Coroutine[Any, Any, Any]]] = {}
    for i in range(7):
        cid = uuid.uuid4()
        audio = slin[(0, 2, 3)[i % 3]]
        calls[str(cid)] = (np.frombuffer(audio, "<i2"), asterisk_call(port, cid, audio))
    for i in range(6):
        sid = f"CA{i:032x}"
        audio = ulaw[(1, 4, 5)[i % 3]]
        calls[sid] = (ulaw_decode(audio), twilio_call(base_ws, sid, audio))
    for i in range(6):
        cid = f"fs-{i}"
        audio = slin[(3, 0, 2)[i % 3]]
        calls[cid] = (np.frombuffer(audio, "<i2"), freeswitch_call(base_ws, cid, audio))
    garbage = uuid.uuid4()
    async with watch_events(service) as events:
        peers = [peer for _, peer in calls.values()]
        peers.append(asterisk_call(port, garbage, slin[0], garbage_after=60))
        await asyncio.gather(*peers)
        ended = await events.wait_ended(20, timeout=120)
    assert ended[str(garbage)]["reason"].startswith("rejected")
    for call_id, (audio, _) in calls.items():
        expected = await offline_words(service, audio.astype(np.int16), 8000)
        assert expected, call_id
        assert events.words(call_id) == expected, call_id
        assert ended[call_id]["reason"] != "shutdown"
