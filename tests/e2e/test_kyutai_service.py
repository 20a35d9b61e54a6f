"""The service on the Kyutai engine (a tiny random-weight checkpoint folder as `engine.model`):
what /info says, a phone call over /v1/stream, moshi-server's protocol, a full batch.

Random weights make no sense of speech, but they are deterministic: the words a live call gets
must be exactly the words the same audio gets offline through the same engine.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest

from api.app import EXIT_ENGINE_FAILED, Service, serve
from api.store import Store
from api.transcribe import transcribe_pcm
from engine.random_checkpoint import write_checkpoint
from telephony.audio import AudioDecoder, Encoding, float_to_pcm16, ulaw_encode
from tests.conftest import ServiceFactory, make_config

pytestmark = pytest.mark.xdist_group("kyutai")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("stt-tiny"), "tiny", seed=3)


@pytest.fixture
async def service(start_service: ServiceFactory, checkpoint: Path) -> Service:
    return await start_service(name="kyutai", model=str(checkpoint), batch_size=2)


def call_audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * 8000)) * 5000).astype(np.int16)


async def test_info_says_kyutai_and_why(service: Service, checkpoint: Path) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/info") as response:
            info = await response.json()
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/metrics") as response:
            metrics = await response.text()
    assert info["engine"]["name"] == "kyutai"
    assert "engine = 'kyutai'" in info["engine"]["reason"]
    assert info["engine"]["model"] == str(checkpoint)
    assert info["engine"]["device"] == "cpu" and info["engine"]["capacity"] == 2
    assert info["engine"]["batch_size"] == 2 and info["engine"]["delay_s"] == 0.5
    assert "stt_bridge_engine_step_seconds_count" in metrics


async def test_a_phone_call_gets_the_words_the_same_audio_gets_offline(service: Service) -> None:
    pcm8k = call_audio(3.0, seed=5)
    ulaw = ulaw_encode(pcm8k)
    url = f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?encoding=mulaw&sample_rate=8000"
    messages: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for i in range(0, len(ulaw), 160):  # 20 ms frames, paced faster than real time
            await ws.send_bytes(ulaw[i : i + 160])
            if i % 1600 == 0:
                await asyncio.sleep(0.01)
        await ws.send_str(json.dumps({"type": "stop"}))
        async for msg in ws:
            messages.append(json.loads(msg.data))
            if messages[-1]["type"] == "closed":
                break
    live = [(m["text"], m["start"], m["end"]) for m in messages if m["type"] == "word"]
    assert live, messages
    assert messages[-1] == {"type": "closed", "reason": "flushed"}

    decoder = AudioDecoder(Encoding.MULAW, 8000, service.bridge.hub.engine.sample_rate)
    pcm24k = np.concatenate([decoder.feed(ulaw), decoder.flush()])
    offline = await transcribe_pcm(service.bridge.hub, pcm24k, "reference")
    assert live == [(w.text, w.start_s, w.end_s) for w in offline.words]
    assert service.bridge.engine.free_slots == 2


async def test_moshi_server_clients_get_words_and_their_marker(service: Service) -> None:
    url = f"ws://127.0.0.1:{service.ports['audio']}/api/asr-streaming"
    rng = np.random.default_rng(9)
    speech = (rng.standard_normal(24000 * 2) * 0.2).astype(np.float32)
    silence = np.zeros(1920, dtype=np.float32)
    received: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for i in range(0, len(speech), 1920):
            await ws.send_bytes(
                msgpack.packb({"type": "Audio", "pcm": speech[i : i + 1920].tolist()})
            )
        await ws.send_bytes(msgpack.packb({"type": "Marker", "id": 42}))

        async def keep_sending_silence() -> None:  # a slot without audio does not step
            while True:
                await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": silence.tolist()}))
                await asyncio.sleep(0.02)

        sender = asyncio.create_task(keep_sending_silence())
        try:
            async with asyncio.timeout(30):
                async for msg in ws:
                    received.append(msgpack.unpackb(msg.data))
                    if received[-1]["type"] == "Marker":
                        break
        finally:
            sender.cancel()
    kinds = [m["type"] for m in received]
    assert kinds[0] == "Ready" and kinds[-1] == "Marker" and received[-1]["id"] == 42
    starts = [m["start_time"] for m in received if m["type"] == "Word"]
    stops = [m["stop_time"] for m in received if m["type"] == "EndWord"]
    assert starts and len(stops) == len(starts)
    assert all(a <= b for a, b in zip(starts, stops, strict=True))
    # The marker means every word of the audio before it is out: all that the same audio
    # (and the silence after it) gives offline and that ends within those 2 s came first.
    texts = [m["text"] for m in received if m["type"] == "Word"]
    pcm = np.concatenate([float_to_pcm16(speech), np.zeros(24000 * 3, dtype=np.int16)])
    offline = await transcribe_pcm(service.bridge.hub, pcm, "reference")
    within = [(w.text, w.start_s) for w in offline.words if w.end_s <= 2.0]
    assert within and list(zip(texts, starts, strict=True))[: len(within)] == within
    # The tiny model has VAD heads: a `Step` per model step, as moshi-server sends them.
    steps = [m for m in received if m["type"] == "Step"]
    assert len(steps) >= 2.0 * 12.5
    assert all(len(m["prs"]) == 4 and all(0.0 <= p <= 1.0 for p in m["prs"]) for m in steps)
    indices = [m["step_idx"] for m in steps]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    assert all(m["buffered_pcm"] >= 0 for m in steps)


async def test_a_full_batch_turns_the_next_call_away_with_1013(service: Service) -> None:
    base = f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?encoding=pcm16&sample_rate=24000"
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(base + "&call_id=a")
        second = await http.ws_connect(base + "&call_id=b")
        await first.send_bytes(bytes(3840))
        await second.send_bytes(bytes(3840))
        third = await http.ws_connect(base + "&call_id=c")
        msg = await third.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and third.close_code == 1013
        for ws in (first, second):
            await ws.send_str(json.dumps({"type": "stop"}))
            async for reply in ws:
                if json.loads(reply.data)["type"] == "closed":
                    break
            await ws.close()


async def test_a_failing_step_loop_ends_live_calls_with_their_words_then_exits_70(
    checkpoint: Path,
) -> None:
    """The model raises in the step loop (a CUDA error, say; the one fake: a real model cannot
    be made to fail on demand): the live call ends with the words it had, reason `engine error`,
    stored; the service stops and tells its supervisor to restart it (exit status 70)."""
    config = make_config(name="kyutai", model=str(checkpoint), batch_size=2)
    service = Service(config)
    await service.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(service, stop, poll_s=0.05))
    url = f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?call_id=doomed&sample_rate=8000"
    pcm = call_audio(6.0, seed=11).tobytes()
    told: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for i in range(0, len(pcm) // 2, 3200):
            await ws.send_bytes(pcm[i : i + 3200])
        async with asyncio.timeout(30):
            while not [m for m in told if m["type"] == "word"]:
                told.append(await ws.receive_json())
        model = service.bridge.engine.model  # type: ignore[attr-defined]

        def broken(*args: object) -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        model.step = broken
        await ws.send_bytes(pcm[len(pcm) // 2 :])
        async with asyncio.timeout(30):
            while told[-1]["type"] != "closed":
                told.append(await ws.receive_json())
    assert await asyncio.wait_for(serving, 30) == EXIT_ENGINE_FAILED
    assert told[-1] == {"type": "closed", "reason": "engine error"}
    store = Store(Path(config.data.dir) / "stt-bridge.sqlite3")
    try:
        call = store.get_call("doomed")
        words = store.get_events("doomed", ("word",))
    finally:
        store.close()
    assert call is not None and call.status == "ended" and call.reason == "engine error"
    assert [w.text for w in words] == [m["text"] for m in told if m["type"] == "word"]
