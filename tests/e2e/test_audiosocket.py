"""Asterisk AudioSocket over real TCP, as Asterisk speaks it, with real speech."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np

from telephony.audiosocket import AudioSocketCodec
from tests.conftest import ServiceFactory
from tests.e2e.frontends import asterisk_call, offline_words, watch_events
from tests.speech import SENTENCES, phone_bytes, word_error_rate

PHONE_WER_BOUND = 0.05  # measured: 8 kHz slin hibari speech through Moonshine, WER 0.00

codec = AudioSocketCodec


async def test_asterisk_call_is_transcribed_live(start_service: ServiceFactory) -> None:
    service = await start_service()
    call_id = uuid.uuid4()
    slin = phone_bytes(SENTENCES[0], "pcm16", 8000)
    async with watch_events(service) as events:
        await asterisk_call(service.ports["audiosocket"], call_id, slin, dtmf="5")
        await events.wait_ended(1)
    cid = str(call_id)
    expected = await offline_words(service, np.frombuffer(slin, "<i2").astype(np.int16), 8000)
    assert events.words(cid) == expected
    assert word_error_rate(SENTENCES[0], " ".join(w["text"] for w in expected)) <= PHONE_WER_BOUND
    started = events.of(cid)[0]
    assert started["type"] == "call_started" and started["front_end"] == "audiosocket"
    assert started["labels"]["uuid"] == cid
    (dtmf,) = [e for e in events.of(cid) if e["type"] == "dtmf"]
    assert dtmf["digit"] == "5" and 0.15 < dtmf["at"] < 0.3  # pressed after 10 frames


async def test_16k_audio_kind(start_service: ServiceFactory) -> None:
    service = await start_service()
    call_id = uuid.uuid4()
    slin = phone_bytes(SENTENCES[3], "pcm16", 16000)
    async with watch_events(service) as events:
        await asterisk_call(service.ports["audiosocket"], call_id, slin, rate=16000)
        await events.wait_ended(1)
    expected = await offline_words(service, np.frombuffer(slin, "<i2").astype(np.int16), 16000)
    assert expected and events.words(str(call_id)) == expected


async def test_full_engine_hangs_up_and_garbage_ends_only_its_call(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(capacity=1)
    port = service.ports["audiosocket"]
    slin = phone_bytes(SENTENCES[5], "pcm16", 8000)
    good = uuid.uuid4()
    async with watch_events(service) as events:
        talking = asyncio.create_task(asterisk_call(port, good, slin))
        await asyncio.sleep(0.3)
        # A second call while the only slot is taken: hangup message, then the socket closes.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(codec.encode_uuid(uuid.uuid4()))
        assert await asyncio.wait_for(reader.read(), 5) == codec.encode_hangup()
        writer.close()
        # Garbage: an unknown kind ends that connection at once (it never got a slot).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x42\x00\x00")
        assert await asyncio.wait_for(reader.read(), 5) == codec.encode_hangup()
        writer.close()
        await talking
        await events.wait_ended(1)
    expected = await offline_words(service, np.frombuffer(slin, "<i2").astype(np.int16), 8000)
    assert events.words(str(good)) == expected
    assert service.bridge.engine.free_slots == 1
