"""mod_audio_fork end to end: stereo L16 over a real WebSocket, as FreeSWITCH sends it."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import numpy as np

from tests.conftest import ServiceFactory
from tests.e2e.frontends import offline_words, paced, watch_events
from tests.speech import SENTENCES, phone_bytes


def stereo(left: bytes, right: bytes) -> bytes:
    a, b = np.frombuffer(left, "<i2"), np.frombuffer(right, "<i2")
    n = max(len(a), len(b))
    frames = np.zeros((n, 2), dtype="<i2")
    frames[: len(a), 0], frames[: len(b), 1] = a, b
    return frames.tobytes()


async def test_stereo_fork_gives_caller_and_callee_legs_and_replies(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    caller = phone_bytes(SENTENCES[2], "pcm16", 16000)
    callee = phone_bytes(SENTENCES[4], "pcm16", 16000)
    audio = stereo(caller, callee)
    frame = 16000 // 50 * 4  # 20 ms of 16 kHz stereo: 1280 bytes
    meta = {"event": "start", "uuid": "fs-uuid-1", "from": "1001", "mix": "stereo", "rate": 16000}
    url = f"ws://127.0.0.1:{service.ports['audio']}/freeswitch/fs-uuid-1"
    replies: list[dict[str, Any]] = []
    async with watch_events(service) as events, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, protocols=("audio.drachtio.org",))
        assert ws.protocol == "audio.drachtio.org"
        await ws.send_str(json.dumps(meta, separators=(",", ":")))
        async for chunk in paced([audio[i : i + frame] for i in range(0, len(audio), frame)]):
            await ws.send_bytes(chunk)
        await ws.send_bytes(b"")  # graceful-shutdown: FreeSWITCH waits for us to close
        async for msg in ws:
            replies.append(json.loads(msg.data))
        await events.wait_ended(1)
    channels = np.frombuffer(audio, "<i2").reshape(-1, 2)
    for channel, leg in enumerate(("caller", "callee")):
        # The channel exactly as sent: the shorter sentence with the silence that pads it.
        pcm = channels[:, channel].astype(np.int16)
        expected = await offline_words(service, pcm, 16000)
        assert expected and events.words("fs-uuid-1", leg) == expected
        replied = [
            {k: r["data"][k] for k in ("text", "start", "end")}
            for r in replies
            if r["data"]["leg"] == leg and r["data"]["type"] == "word"
        ]
        assert replied == expected
    assert all(r["type"] == "transcription" for r in replies)
    started = events.of("fs-uuid-1")[0]
    assert started["front_end"] == "freeswitch" and started["labels"]["from"] == "1001"
    assert started["legs"] == ["caller", "callee"]


async def test_lost_metadata_falls_back_to_url_and_bad_rate_is_refused(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    mono = phone_bytes(SENTENCES[0], "pcm16", 8000)
    base = f"ws://127.0.0.1:{service.ports['audio']}/freeswitch"
    async with watch_events(service) as events, aiohttp.ClientSession() as http:
        bad = await http.ws_connect(f"{base}/x", protocols=("audio.drachtio.org",))
        await bad.send_str('{"rate": 11025}')
        error = await bad.receive_json(timeout=5)
        assert error["type"] == "error" and "rate" in error["data"]["reason"]
        assert (await bad.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert bad.close_code == 1007

        ws = await http.ws_connect(f"{base}?rate=8000&mix=mono", protocols=("audio.drachtio.org",))
        for i in range(0, len(mono), 320):  # audio with no metadata frame first
            await ws.send_bytes(mono[i : i + 320])
        await ws.close()  # hangup: a normal close, no final text
        ended = await events.wait_ended(1)
    (call_id,) = ended
    expected = await offline_words(service, np.frombuffer(mono, "<i2").astype(np.int16), 8000)
    assert events.words(call_id) == expected
