"""`/api/asr-streaming` end to end, against a client that speaks moshi-server's protocol the
way Kyutai's own `scripts/stt_from_file_rust_server.py` does: websockets + msgpack, the
`kyutai-api-key` header, 1 s of silence first, 1920-sample f32 chunks at 1.01x real time,
5 s of silence, `Marker{id: 0}`, then silence until the marker comes back."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
import soundfile
import sphn
import websockets
from websockets.asyncio.client import ClientConnection

from api.app import Service
from api.config import ApiConfig
from telephony.audio import PcmArray, float_to_pcm16, pcm16_to_float
from tests.conftest import ServiceFactory, make_config
from tests.e2e import frontends
from tests.e2e.frontends import EventLog, offline_words
from tests.speech import SENTENCES, read_pcm, speech_wav, word_error_rate

SAMPLE_RATE = 24000
FRAME_SIZE = 1920
KEY = "public_token"  # moshi-server's default authorized id
# Measured: clean 24 kHz hibari sentences through the Moonshine engine, WER 0.00 each.
CLEAN_WER_BOUND = 0.05


@pytest.fixture
async def keyed(start_service: ServiceFactory) -> Service:
    config = dataclasses.replace(
        make_config(), api=ApiConfig(keys=(KEY,), max_streams_per_key=10, requests_per_minute=600)
    )
    return await start_service(config)


def watch_events(service: Service) -> AbstractAsyncContextManager[EventLog]:
    """`WS /v1/events` while the block runs, with the key (the service has keys)."""
    return frontends.watch_events(service, headers={"kyutai-api-key": KEY})


def ws_url(service: Service, query: str = "") -> str:
    return f"ws://127.0.0.1:{service.ports['audio']}/api/asr-streaming{query}"


def http_url(service: Service, path: str = "/api/asr-streaming") -> str:
    return f"http://127.0.0.1:{service.ports['audio']}{path}"


def sentence_f32(text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The sentence as the script loads a file: 24 kHz mono float32."""
    pcm, rate = read_pcm(speech_wav(text))
    assert rate == SAMPLE_RATE
    return pcm16_to_float(pcm)


async def send_audio(
    websocket: ClientConnection, audio: Sequence[float] | np.ndarray[Any, np.dtype[np.float32]]
) -> None:
    await websocket.send(
        msgpack.packb({"type": "Audio", "pcm": [float(x) for x in audio]}, use_single_float=True)
    )


async def send_like_kyutai(
    websocket: ClientConnection, audio: np.ndarray[Any, np.dtype[np.float32]], rtf: float
) -> None:
    """What the script sends: 1 s of silence in one message, the file in 1920-sample chunks
    paced at `rtf` x real time (yielding 1 ms when late), 5 s of silence, Marker 0, 35 s more."""
    second = [0.0] * SAMPLE_RATE
    await send_audio(websocket, second)
    began = time.time()
    for offset in range(0, len(audio), FRAME_SIZE):
        await send_audio(websocket, audio[offset : offset + FRAME_SIZE])
        ahead = began + (offset + 1) / SAMPLE_RATE / rtf - time.time()
        await asyncio.sleep(ahead if ahead > 0 else 0.001)
    for _ in range(5):
        await send_audio(websocket, second)
    await websocket.send(msgpack.packb({"type": "Marker", "id": 0}, use_single_float=True))
    for _ in range(35):
        await send_audio(websocket, second)


async def receive_until_marker(websocket: ClientConnection) -> list[dict[str, Any]]:
    """Every message up to and including the Marker (the script stops reading there)."""
    messages: list[dict[str, Any]] = []
    while not messages or messages[-1]["type"] != "Marker":
        frame = await websocket.recv()
        assert isinstance(frame, bytes), "moshi-server sends binary frames only"
        messages.append(msgpack.unpackb(frame, raw=False))
    return messages


def transcript(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Words as the script keeps them: Word opens [start, start], the next EndWord sets the end."""
    words: list[dict[str, Any]] = []
    for message in messages:
        if message["type"] == "Word":
            words.append({"text": message["text"], "timestamp": [message["start_time"]] * 2})
        elif message["type"] == "EndWord" and words:
            words[-1]["timestamp"][1] = message["stop_time"]
    return words


async def kyutai_file_client(
    url: str, audio: np.ndarray[Any, np.dtype[np.float32]], rtf: float = 1.01, api_key: str = KEY
) -> list[dict[str, Any]]:
    async with asyncio.timeout(120):
        async with websockets.connect(url, additional_headers={"kyutai-api-key": api_key}) as ws:
            send = asyncio.create_task(send_like_kyutai(ws, audio, rtf))
            messages = await receive_until_marker(ws)
            await send
    return messages


def as_engine_audio(audio: np.ndarray[Any, np.dtype[np.float32]], tail_s: float = 5.0) -> PcmArray:
    """What the bridge's engine hears before the Marker: 1 s silence, the audio, 5 s silence."""
    lead = np.zeros(SAMPLE_RATE, dtype=np.int16)
    tail = np.zeros(int(tail_s * SAMPLE_RATE), dtype=np.int16)
    return np.concatenate([lead, float_to_pcm16(audio), tail])


def as_offline(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"text": w["text"], "start": w["timestamp"][0], "end": w["timestamp"][1]} for w in words
    ]


async def test_kyutai_file_client_gets_the_sentence_back(keyed: Service) -> None:
    service = keyed
    audio = sentence_f32(SENTENCES[0])
    async with watch_events(service) as events:
        messages = await kyutai_file_client(ws_url(service), audio)
        ended = await events.wait_ended(1)
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "Ready" and kinds[-1] == "Marker" and messages[-1]["id"] == 0
    assert set(kinds) == {"Ready", "Word", "EndWord", "Marker"}
    # Each Word is followed by its EndWord; times go forward and each word has a length.
    assert kinds[1:-1] == ["Word", "EndWord"] * (len(kinds[1:-1]) // 2)
    times = [float(m.get("start_time", m.get("stop_time", -1))) for m in messages[1:-1]]
    assert times == sorted(times)
    words = transcript(messages)
    assert all(w["timestamp"][0] < w["timestamp"][1] for w in words)
    # The same words, at the same times, as the same audio transcribed offline.
    expected = await offline_words(service, as_engine_audio(audio), SAMPLE_RATE)
    assert expected and as_offline(words) == expected
    text = " ".join(w["text"] for w in words)
    assert word_error_rate(SENTENCES[0], text) <= CLEAN_WER_BOUND, text
    # Times count from the stream's start: the speech begins after the 1 s of silence.
    assert words[0]["timestamp"][0] >= 1.0
    # The call went through the hub like any other: events feed, store.
    (call_id,) = ended
    started = events.of(call_id)[0]
    assert started["type"] == "call_started" and started["front_end"] == "moshi"
    assert started["labels"]["mode"] == "stream"
    assert events.words(call_id) == expected
    async with aiohttp.ClientSession(headers={"kyutai-api-key": KEY}) as http:
        async with http.get(http_url(service, f"/v1/calls/{call_id}")) as r:
            assert r.status == 200
            assert (await r.json())["front_end"] == "moshi"


async def test_auth_header_or_auth_id_else_401_before_upgrade(keyed: Service) -> None:
    service = keyed
    for headers in ({}, {"kyutai-api-key": "wrong"}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url(service), additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url(service, "?auth_id=wrong")):
            pass
    assert refused.value.response.status_code == 401
    assert service.bridge.engine.free_slots == service.bridge.engine.capacity  # none was opened
    # "Instead of using the header, you can authenticate by adding ?auth_id={api_key}"
    async with websockets.connect(ws_url(service, f"?auth_id={KEY}")) as ws:
        assert msgpack.unpackb(await ws.recv(), raw=False) == {"type": "Ready"}
    async with aiohttp.ClientSession() as http:
        async with http.post(http_url(service), data=b"x") as r:
            assert r.status == 401


async def test_malformed_msgpack_gets_an_error_and_other_calls_go_on(keyed: Service) -> None:
    service = keyed
    audio = sentence_f32(SENTENCES[3])
    headers = {"kyutai-api-key": KEY}

    async def garbage_client() -> tuple[list[dict[str, Any]], int | None]:
        async with websockets.connect(ws_url(service), additional_headers=headers) as ws:
            got = [msgpack.unpackb(await ws.recv(), raw=False)]
            await send_audio(ws, [0.0] * FRAME_SIZE)
            await asyncio.sleep(1.0)  # while the other call is mid-sentence
            await ws.send(b"\x82\xa4type\xa5Audio\xa3pcm\xdc\xff")  # cut short
            with pytest.raises(websockets.ConnectionClosedError):  # closed with an error code
                while True:
                    got.append(msgpack.unpackb(await ws.recv(), raw=False))
            return got, ws.close_code

    good = asyncio.create_task(kyutai_file_client(ws_url(service), audio, rtf=2.0))
    bad, code = await garbage_client()
    messages = await good
    assert bad[0] == {"type": "Ready"}
    assert bad[1]["type"] == "Error" and "MessagePack" in bad[1]["message"]
    assert len(bad) == 2 and code == 1007
    expected = await offline_words(service, as_engine_audio(audio), SAMPLE_RATE)
    assert expected and as_offline(transcript(messages)) == expected


async def test_full_engine_says_no_free_channels_and_closes(start_service: ServiceFactory) -> None:
    service = await start_service(capacity=1)
    async with websockets.connect(ws_url(service)) as first:
        assert msgpack.unpackb(await first.recv(), raw=False) == {"type": "Ready"}
        async with websockets.connect(ws_url(service)) as second:
            error = msgpack.unpackb(await second.recv(), raw=False)
            assert error == {"type": "Error", "message": "no free channels"}
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await second.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        # The admitted stream still works after the refusal.
        await send_audio(first, [0.0] * FRAME_SIZE)
        await first.send(msgpack.packb({"type": "Marker", "id": 42}))
        for _ in range(3):
            await send_audio(first, [0.0] * SAMPLE_RATE)
        assert msgpack.unpackb(await first.recv(), raw=False) == {"type": "Marker", "id": 42}
    # Its slot is free again once it has gone.
    async with asyncio.timeout(10):
        while service.bridge.engine.free_slots < 1:
            await asyncio.sleep(0.05)
    async with websockets.connect(ws_url(service)) as third:
        assert msgpack.unpackb(await third.recv(), raw=False) == {"type": "Ready"}


async def test_markers_come_back_in_order_after_their_audio(start_service: ServiceFactory) -> None:
    service = await start_service()
    audio = sentence_f32(SENTENCES[1])
    async with websockets.connect(ws_url(service)) as ws:
        await ws.recv()  # Ready
        await send_audio(ws, [0.0] * SAMPLE_RATE)
        await ws.send(msgpack.packb({"type": "Marker", "id": 1}))
        for i in range(0, len(audio), FRAME_SIZE):
            await send_audio(ws, audio[i : i + FRAME_SIZE])
        await ws.send(msgpack.packb({"type": "Marker", "id": 2}))
        for _ in range(5):
            await send_audio(ws, [0.0] * SAMPLE_RATE)
        messages: list[dict[str, Any]] = []
        async with asyncio.timeout(60):
            while not messages or messages[-1] != {"type": "Marker", "id": 2}:
                messages.append(msgpack.unpackb(await ws.recv(), raw=False))
    markers = [i for i, m in enumerate(messages) if m["type"] == "Marker"]
    assert [messages[i]["id"] for i in markers] == [1, 2]
    # Marker 1 follows only silence: it comes back before any word; every word before marker 2.
    assert markers[0] == 0
    expected = await offline_words(service, as_engine_audio(audio), SAMPLE_RATE)
    assert expected and as_offline(transcript(messages)) == expected


async def test_ogg_opus_stream(start_service: ServiceFactory) -> None:
    service = await start_service()
    audio = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), sentence_f32(SENTENCES[4])])
    audio = np.concatenate([audio, np.zeros(5 * SAMPLE_RATE, np.float32)])
    audio = audio[: len(audio) - len(audio) % FRAME_SIZE]
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    pages = [writer.append_pcm(audio[i : i + FRAME_SIZE]) for i in range(0, len(audio), FRAME_SIZE)]
    reader = sphn.OpusStreamReader(SAMPLE_RATE)  # what the bridge will hear, decoded the same way
    decoded = float_to_pcm16(np.concatenate([reader.append_bytes(p) for p in pages]))
    async with websockets.connect(ws_url(service)) as ws:
        await ws.recv()  # Ready
        for page in pages:
            await ws.send(msgpack.packb({"type": "OggOpus", "data": page}, use_bin_type=True))
        await ws.send(msgpack.packb({"type": "Marker", "id": 0}))
        for _ in range(5):
            await send_audio(ws, [0.0] * SAMPLE_RATE)
        messages = await asyncio.wait_for(receive_until_marker(ws), 60)
    words = transcript(messages)
    silence = np.zeros(5 * SAMPLE_RATE, np.int16)
    expected = await offline_words(service, np.concatenate([decoded, silence]), SAMPLE_RATE)
    assert expected and as_offline(words) == expected
    text = " ".join(w["text"] for w in words)
    assert word_error_rate(SENTENCES[4], text) <= CLEAN_WER_BOUND, text


def wav_bytes(pcm: PcmArray, rate: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, pcm, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def test_post_a_file_gives_word_and_end_word_objects(keyed: Service) -> None:
    service = keyed
    pcm, _ = read_pcm(speech_wav(SENTENCES[2]))
    async with aiohttp.ClientSession(headers={"kyutai-api-key": KEY}) as http:
        async with http.post(http_url(service), data=wav_bytes(pcm, SAMPLE_RATE)) as r:
            assert r.status == 200 and r.content_type == "application/json"
            answer = await r.json()
        async with http.post(http_url(service), data=b"RIFF but not a wav") as r:
            assert r.status == 400 and "audio" in (await r.json())["reason"]
    assert [a["type"] for a in answer] == ["Word", "EndWord"] * (len(answer) // 2)
    words = [
        {"text": w["text"], "start": w["start_time"], "end": e["stop_time"]}
        for w, e in zip(answer[::2], answer[1::2], strict=True)
    ]
    expected = await offline_words(service, pcm, SAMPLE_RATE)
    assert expected and words == expected
    text = " ".join(w["text"] for w in words)
    assert word_error_rate(SENTENCES[2], text) <= CLEAN_WER_BOUND, text


async def test_post_waits_for_a_free_slot_like_moshi_server(start_service: ServiceFactory) -> None:
    service = await start_service(capacity=1)
    pcm, _ = read_pcm(speech_wav(SENTENCES[5]))
    wire = wav_bytes(pcm[::3].copy(), 8000)  # a phone-rate file: the bridge resamples it
    async with aiohttp.ClientSession() as http:
        holder = await http.ws_connect(ws_url(service))
        assert msgpack.unpackb((await holder.receive()).data, raw=False)["type"] == "Ready"
        post = asyncio.create_task(http.post(http_url(service), data=wire))
        await asyncio.sleep(1.0)
        assert not post.done()  # waiting, not refused
        await holder.close()
        async with asyncio.timeout(60):
            response = await post
        assert response.status == 200
        answer = await response.json()
        response.release()
    assert answer and {a["type"] for a in answer} == {"Word", "EndWord"}
