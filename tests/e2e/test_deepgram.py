"""Deepgram's live protocol end to end, with the official `deepgram-sdk` as the client.

The SDK is pointed at the bridge the way a voice platform points it at a self-hosted server:
`DeepgramClientEnvironment(production="ws://127.0.0.1:PORT", ...)`; it opens
`/v1/listen?...` with `Authorization: Token KEY`. Words are checked against the offline
transcript of the same audio through the same service, never against the text we synthesized.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.socket_client import AsyncV1SocketClient
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results

from api.app import Service
from api.config import ApiConfig, LimitsConfig, WebhookConfig
from telephony.audio import ulaw_decode
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import offline_words, paced, watch_events
from tests.e2e.server_process import free_port
from tests.speech import SENTENCES, phone_bytes

KEY = "dg-test-key"
FRAME = 160  # 20 ms of 8 kHz μ-law, one channel


class WebhookReceiver:
    """A loopback webhook endpoint that keeps every body it is sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append(json.loads(await request.read()))
        return web.Response(status=204)

    async def up(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def down(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def of(self, call_id: str) -> list[dict[str, Any]]:
        return [
            body
            for body in self.received
            if (body.get("call_id") or (body.get("call") or {}).get("id")) == call_id
        ]

    async def wait_ended(self, call_id: str, timeout: float = 30) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while not any(b["event"] == "call.ended" for b in self.of(call_id)):
                await asyncio.sleep(0.1)
        return self.of(call_id)


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    hooks = WebhookReceiver()
    await hooks.up()
    yield hooks
    await hooks.down()


async def keyed_service(start_service: ServiceFactory, hooks: WebhookReceiver) -> Service:
    config = dataclasses.replace(
        make_config(), api=ApiConfig(keys=(KEY,)), webhook=WebhookConfig(url=hooks.url)
    )
    return await start_service(config)


def client(service: Service, key: str = KEY, prefix: str = "") -> AsyncDeepgramClient:
    """The SDK pointed at the bridge; `prefix`: a base URL with a path (`ws://HOST:PORT/dg`)."""
    base = f"127.0.0.1:{service.ports['audio']}{prefix}"
    environment = DeepgramClientEnvironment(
        base=f"http://{base}", production=f"ws://{base}", agent=f"ws://{base}",
        agent_rest=f"http://{base}",
    )  # fmt: skip
    return AsyncDeepgramClient(api_key=key, environment=environment)


async def collect(socket: AsyncV1SocketClient) -> list[Any]:
    """Every message until the server closes (the SDK's async iterator)."""
    return [message async for message in socket]


def results(messages: list[Any]) -> list[ListenV1Results]:
    return [m for m in messages if isinstance(m, ListenV1Results)]


def final_words(messages: list[Any], channel: int = 0) -> list[dict[str, Any]]:
    """The words of every final Results of one channel, as written, in order."""
    return [
        {"text": w.punctuated_word, "start": w.start, "end": w.end}
        for r in results(messages)
        if r.is_final and r.channel_index[0] == channel
        for w in r.channel.alternatives[0].words
    ]


def rounded(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**w, "start": round(w["start"], 3), "end": round(w["end"], 3)} for w in words]


def assert_interims_come_first(messages: list[Any], channel: int = 0) -> None:
    """Every final that has words follows at least one interim of its own utterance."""
    interims_since_final = 0
    finals_with_words = 0
    for r in results(messages):
        if r.channel_index[0] != channel:
            continue
        if not r.is_final:
            interims_since_final += 1
        elif r.channel.alternatives[0].words:
            assert interims_since_final > 0, "a final came with no interim before it"
            finals_with_words += 1
            interims_since_final = 0
    assert finals_with_words > 0


def strictly_valid(messages: list[Any]) -> None:
    """What the server sent passes the SDK's strict validation, not only its lenient parse."""
    for message in messages:
        type(message).model_validate(message.model_dump())


async def test_mono_mulaw_8k_with_the_sdk(
    start_service: ServiceFactory, receiver: WebhookReceiver
) -> None:
    service = await keyed_service(start_service, receiver)
    wire = phone_bytes(SENTENCES[1], "mulaw", 8000)
    async with watch_events(service, {"Authorization": f"Token {KEY}"}) as events:
        connect = client(service).listen.v1.connect(
            model="nova-3", encoding="mulaw", sample_rate=8000, interim_results=True,
            punctuate=True, vad_events=True, utterance_end_ms=1000, tag="e2e",
        )  # fmt: skip
        async with connect as socket:
            reader = asyncio.create_task(collect(socket))
            async for offset in paced(range(0, len(wire), FRAME)):
                await socket.send_media(wire[offset : offset + FRAME])
            await socket.send_keep_alive()
            await socket.send_finalize()
            await socket.send_close_stream()
            messages = await asyncio.wait_for(reader, 60)
        ended = await events.wait_ended(1)
    strictly_valid(messages)
    # Finalize was answered, CloseStream ended with Metadata.
    assert any(r.from_finalize for r in results(messages))
    assert isinstance(messages[-1], ListenV1Metadata)
    request_id = messages[-1].request_id
    assert messages[-1].channels == 1 and messages[-1].duration == pytest.approx(len(wire) / 8000)
    assert all(r.metadata.request_id == request_id for r in results(messages))
    assert_interims_come_first(messages)

    expected = await offline_words(service, ulaw_decode(wire).astype(np.int16), 8000)
    got = final_words(messages)
    assert expected and got == rounded(expected)
    for r in results(messages):
        for w in r.channel.alternatives[0].words:
            assert w.word and w.word == w.word.lower() and w.word.isascii()

    # The same call on /v1/events, in the store and in the webhooks.
    assert request_id in ended and ended[request_id]["reason"] == "client CloseStream"
    started = events.of(request_id)[0]
    assert started["front_end"] == "deepgram" and started["legs"] == ["caller"]
    assert started["labels"]["model"] == "nova-3" and started["labels"]["tag"] == "e2e"
    assert events.words(request_id, "caller") == expected
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/{request_id}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Token {KEY}"}) as http:
        async with http.get(url) as response:
            assert response.status == 200
            call = await response.json()
    assert call["front_end"] == "deepgram" and call["status"] == "ended"
    assert call["labels"]["encoding"] == "mulaw"
    hooks = await receiver.wait_ended(request_id)
    kinds = [b["event"] for b in hooks]
    assert kinds[0] == "call.started" and kinds[-1] == "call.ended" and "segment" in kinds


async def test_stereo_two_legs_with_the_sdk(start_service: ServiceFactory) -> None:
    service = await start_service()
    caller = phone_bytes(SENTENCES[0], "mulaw", 8000)
    agent = phone_bytes(SENTENCES[5], "mulaw", 8000)
    length = max(len(caller), len(agent))
    caller, agent = caller.ljust(length, b"\xff"), agent.ljust(length, b"\xff")  # μ-law silence
    wire = bytes(np.stack([np.frombuffer(caller, np.uint8), np.frombuffer(agent, np.uint8)], 1))
    async with watch_events(service) as events:
        # No keys on this service: any key will do. The base URL has a path prefix.
        connect = client(service, "any-key", prefix="/dg").listen.v1.connect(
            model="nova-3", encoding="mulaw", sample_rate=8000, channels=2, multichannel=True,
            interim_results=True, smart_format=True,
        )  # fmt: skip
        async with connect as socket:
            reader = asyncio.create_task(collect(socket))
            async for offset in paced(range(0, len(wire), 2 * FRAME), 0.005):
                await socket.send_media(wire[offset : offset + 2 * FRAME])
            await socket.send_close_stream()
            messages = await asyncio.wait_for(reader, 60)
        await events.wait_ended(1)
    strictly_valid(messages)
    metadata = messages[-1]
    assert isinstance(metadata, ListenV1Metadata) and metadata.channels == 2
    call_id = metadata.request_id
    started = events.of(call_id)[0]
    assert started["front_end"] == "deepgram" and started["legs"] == ["channel_0", "channel_1"]
    for channel, (leg, audio) in enumerate((("channel_0", caller), ("channel_1", agent))):
        expected = await offline_words(service, ulaw_decode(audio).astype(np.int16), 8000)
        assert expected and final_words(messages, channel) == rounded(expected)
        assert events.words(call_id, leg) == expected
        assert_interims_come_first(messages, channel)
    assert {tuple(r.channel_index) for r in results(messages)} == {(0, 2), (1, 2)}


async def test_bad_query_is_400_before_the_upgrade(start_service: ServiceFactory) -> None:
    service = await start_service()
    with pytest.raises(ApiError) as refused:
        connect = client(service).listen.v1.connect(
            model="nova-3", encoding="opus", sample_rate=48000
        )
        async with connect:
            pass
    assert refused.value.status_code == 400
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/listen?encoding=mulaw&sample_rate=11025"
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        assert response.status == 400
        body = await response.json()
        assert "sample_rate" in response.headers["dg-error"]
    assert "sample_rate" in body["err_msg"] and body["request_id"]
    # Good parameters but no upgrade: refused before any call is opened.
    plain = f"http://127.0.0.1:{service.ports['audio']}/v1/listen?encoding=mulaw&sample_rate=8000"
    async with aiohttp.ClientSession() as http, http.get(plain) as response:
        assert response.status == 400 and response.headers["dg-request-id"]
    assert service.bridge.engine.free_slots == service.bridge.engine.capacity
    assert not service.bridge.hub.calls


async def test_wrong_key_is_401_before_the_upgrade(
    start_service: ServiceFactory, receiver: WebhookReceiver
) -> None:
    service = await keyed_service(start_service, receiver)
    with pytest.raises(ApiError) as refused:
        async with client(service, "not-the-key").listen.v1.connect(
            model="nova-3", encoding="mulaw", sample_rate=8000
        ):
            pass
    assert refused.value.status_code == 401


async def test_garbage_text_frame_is_an_error_and_a_close_and_spares_the_other_call(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    steady = phone_bytes(SENTENCES[3], "mulaw", 8000)
    broken = phone_bytes(SENTENCES[4], "mulaw", 8000)
    base = f"ws://127.0.0.1:{service.ports['audio']}/v1/listen?encoding=mulaw&sample_rate=8000"

    async def broken_client() -> tuple[list[dict[str, Any]], int | None]:
        received: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http, http.ws_connect(base) as ws:
            for offset in range(0, len(broken), 1600):
                await ws.send_bytes(broken[offset : offset + 1600])
            await ws.send_str("this is not a client message")
            async for msg in ws:
                received.append(json.loads(msg.data))
            return received, ws.close_code

    async with watch_events(service) as events:
        async with client(service).listen.v1.connect(
            model="nova-3", encoding="mulaw", sample_rate=8000
        ) as socket:
            reader = asyncio.create_task(collect(socket))
            sent = 0
            async for offset in paced(range(0, len(steady), FRAME), 0.005):
                await socket.send_media(steady[offset : offset + FRAME])
                sent += 1
                if sent == 20:
                    received, code = await broken_client()
            await socket.send_close_stream()
            messages = await asyncio.wait_for(reader, 60)
        ended = await events.wait_ended(2)
    assert code == 1008
    error = received[-1]
    assert error["type"] == "Error" and "could not parse" in error["description"]
    steady_id = messages[-1].request_id
    expected = await offline_words(service, ulaw_decode(steady).astype(np.int16), 8000)
    assert final_words(messages) == rounded(expected)
    assert ended[steady_id]["reason"] == "client CloseStream"
    (broken_id,) = set(ended) - {steady_id}
    assert ended[broken_id]["reason"].startswith("bad client message")
    # The broken call's audio was still flushed into its transcript.
    expected_broken = await offline_words(service, ulaw_decode(broken).astype(np.int16), 8000)
    assert events.words(broken_id) == expected_broken


async def test_v1_stream_takes_keepalive_finalize_and_closestream(
    start_service: ServiceFactory,
) -> None:
    """Our own JSON protocol, moved to /v1/stream, takes Deepgram's three control messages."""
    service = await start_service()
    # The sentence, then a second of line silence: its utterance ends by the pause, as the
    # offline transcript's does, and Finalize finds nothing left to cut (a cut in mid-pause
    # hands the model other trailing audio, which may write "4567" as "four, five, six, seven").
    wire = phone_bytes(SENTENCES[2], "mulaw", 8000) + b"\xff" * 8000
    url = f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?encoding=mulaw&sample_rate=8000"
    messages: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str('{"type": "KeepAlive"}')
        for offset in range(0, len(wire), 1600):
            await ws.send_bytes(wire[offset : offset + 1600])
        await ws.send_str('{"type": "Finalize"}')
        while not messages or messages[-1]["type"] != "finalized":
            messages.append(await ws.receive_json(timeout=30))
        await ws.send_str('{"type": "CloseStream"}')
        async for msg in ws:
            messages.append(json.loads(msg.data))
    kinds = [m["type"] for m in messages]
    assert "error" not in kinds and kinds[-1] == "closed"
    assert messages[kinds.index("finalized")]["at"] > 0
    words = [{k: m[k] for k in ("text", "start", "end")} for m in messages if m["type"] == "word"]
    assert words == await offline_words(service, ulaw_decode(wire).astype(np.int16), 8000)


async def test_keepalive_holds_a_silent_stream_open_until_the_idle_limit(
    start_service: ServiceFactory,
) -> None:
    """KeepAlive resets the idle timer; silence past it is closed with 1011 NET-0001 (Deepgram's
    10 s, shortened here by the operator's `limits.idle_timeout_s`)."""
    config = dataclasses.replace(make_config(), limits=LimitsConfig(idle_timeout_s=1.0))
    service = await start_service(config)
    url = f"ws://127.0.0.1:{service.ports['audio']}/v1/listen?encoding=mulaw&sample_rate=8000"
    async with watch_events(service) as events:
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            for _ in range(6):  # 2.4 s, well past the 1 s limit, kept open by KeepAlive
                await ws.send_str('{"type": "KeepAlive"}')
                await asyncio.sleep(0.4)
            assert not ws.closed
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1011 and "NET-0001" in (msg.extra or "")
        ended = await events.wait_ended(1)
    assert [e["reason"] for e in ended.values()] == ["idle timeout"]
