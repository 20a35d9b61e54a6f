"""`engine.name = "remote"` end to end: a front-end service whose engine is other stt-bridge
services (Moonshine on the CPU), reached over their `/api/asr-streaming` (moshi-server's ASR
protocol), with real speech. Nodes run in this process, or as real processes where one is
killed with SIGKILL mid-call."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import WSMsgType

from api.app import Service
from engine.config import EngineConfig
from engine.remote import LEAD_SILENCE_S
from telephony.audio import PcmArray
from telephony.audiosocket import AudioSocketCodec
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import offline_words
from tests.e2e.server_process import ServerProcess
from tests.speech import SENTENCES, read_pcm, speech_wav, write_wav

RATE = 24000
TIME_TOLERANCE_S = 0.002  # rounding: the node's times are ms, less the lead silence
PROBE_S = 0.3


def entry(audio_port: int, health_port: int | None) -> str:
    url = f"ws://127.0.0.1:{audio_port}"
    return url if health_port is None else f"{url} health=http://127.0.0.1:{health_port}"


def entries(nodes: list[Service], health: bool = True) -> tuple[str, ...]:
    return tuple(entry(n.ports["audio"], n.ports["health"] if health else None) for n in nodes)


async def start_front(start_service: ServiceFactory, urls: tuple[str, ...]) -> Service:
    config = make_config()
    engine = EngineConfig(name="remote", urls=urls, probe_interval_s=PROBE_S)
    return await start_service(dataclasses.replace(config, engine=engine))


def sentence(index: int) -> PcmArray:
    pcm, rate = read_pcm(speech_wav(SENTENCES[index]))
    assert rate == RATE
    return pcm


async def call(
    front: Service,
    pcm: PcmArray,
    pace_s: float = 0.0,
    call_id: str | None = None,
    finalize: bool = False,
    close_codes: list[int] | None = None,
) -> list[dict[str, Any]]:
    """`/v1/stream` at 24 kHz in 20 ms frames (then `Finalize`, waiting for `finalized`), then
    stop: every message until `closed` (and the close code the server gave into
    `close_codes`)."""
    query = f"?sample_rate={RATE}" + (f"&call_id={call_id}" if call_id else "")
    url = f"ws://127.0.0.1:{front.ports['audio']}/v1/stream{query}"
    messages: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:

        async def receive() -> None:
            async for msg in ws:
                messages.append(json.loads(msg.data))
                if messages[-1]["type"] == "closed":
                    return

        receiver = asyncio.create_task(receive())
        for offset in range(0, len(pcm), 480):
            if receiver.done():
                break
            await ws.send_bytes(pcm[offset : offset + 480].tobytes())
            if pace_s:
                await asyncio.sleep(pace_s)
        if finalize:
            await ws.send_str(json.dumps({"type": "Finalize"}))
            async with asyncio.timeout(10):
                while not any(m["type"] == "finalized" for m in messages):
                    await asyncio.sleep(0.05)
        if not receiver.done():
            await ws.send_str(json.dumps({"type": "stop"}))
        await asyncio.wait_for(receiver, 60)
        if close_codes is not None:
            closing = await ws.receive(timeout=10)
            while closing.type == WSMsgType.TEXT:
                closing = await ws.receive(timeout=10)
            assert closing.type == WSMsgType.CLOSE, closing
            close_codes.append(closing.data)  # the server's close frame
    return messages


async def audiosocket_until_hung_up(front: Service, pcm: PcmArray) -> uuid.UUID:
    """An AudioSocket call sending `pcm` (24 kHz) in paced 20 ms frames until the bridge
    hangs up; its call id."""
    call_id = uuid.uuid4()
    reader, writer = await asyncio.open_connection("127.0.0.1", front.ports["audiosocket"])
    writer.write(AudioSocketCodec.encode_uuid(call_id))
    answer = asyncio.create_task(reader.read(3))
    for offset in range(0, len(pcm), 480):
        if answer.done():
            break
        writer.write(AudioSocketCodec.encode_audio(pcm[offset : offset + 480].tobytes(), RATE))
        await asyncio.sleep(0.02)
    assert await asyncio.wait_for(answer, 10) == AudioSocketCodec.encode_hangup()
    assert await asyncio.wait_for(reader.read(), 10) == b""  # and the connection closed
    writer.close()
    return call_id


def as_heard(pcm: PcmArray) -> PcmArray:
    """What a node hears of `pcm`: the remote engine's lead silence first."""
    return np.concatenate([np.zeros(round(LEAD_SILENCE_S * RATE), dtype=np.int16), pcm])


def shifted(words: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Node times of `as_heard` audio as times of the audio itself."""
    return [
        {
            **w,
            "start": round(w["start"] - LEAD_SILENCE_S, 3),
            "end": round(w["end"] - LEAD_SILENCE_S, 3),
        }
        for w in words
    ]


async def offline_on(node: Service, pcm: PcmArray) -> list[dict[str, Any]]:
    """The node's offline transcript of what it heard, through its own engine."""
    return shifted(await offline_words(node, as_heard(pcm), RATE))


def words(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: m[k] for k in ("text", "start", "end")} for m in messages if m["type"] == "word"]


def assert_same_words(got: list[dict[str, Any]], offline: list[dict[str, Any]]) -> None:
    assert [w["text"] for w in got] == [w["text"] for w in offline]
    for live, ref in zip(got, offline, strict=True):
        assert abs(live["start"] - ref["start"]) <= TIME_TOLERANCE_S, (live, ref)
        assert abs(live["end"] - ref["end"]) <= TIME_TOLERANCE_S, (live, ref)


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return await response.json()


async def info(service: Service) -> dict[str, Any]:
    body: dict[str, Any] = await get_json(f"http://127.0.0.1:{service.ports['health']}/info")
    return body


async def until(check: Callable[[], Any], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def stored_once_ended(service: Service, call_id: str) -> dict[str, Any]:
    """The call as the store has it once its end is written (or as it stands after 10 s): the
    store writes on its own thread, so the end may land after the client saw the close."""
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/{call_id}"
    stored: dict[str, Any] = {}

    async def ended() -> bool:
        nonlocal stored
        stored = await get_json(url)
        return stored.get("status") == "ended"

    with contextlib.suppress(TimeoutError):
        await until(ended, timeout=10.0)
    return stored


async def calls_on(node: Service) -> int:
    listed = await get_json(f"http://127.0.0.1:{node.ports['audio']}/v1/calls")
    return len(listed["calls"])


async def occupy(http: aiohttp.ClientSession, audio_port: int) -> aiohttp.ClientWebSocketResponse:
    """A moshi client holding one slot of a node (it said Ready)."""
    ws = await http.ws_connect(f"ws://127.0.0.1:{audio_port}/api/asr-streaming")
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.BINARY
    return ws


@pytest.fixture
async def nodes(start_service: ServiceFactory) -> list[Service]:
    """Two engine nodes: 1 and 2 Moonshine slots."""
    return [await start_service(capacity=1, threads=1), await start_service(capacity=2, threads=1)]


async def test_speech_through_a_node_equals_its_offline_transcript(
    start_service: ServiceFactory, nodes: list[Service]
) -> None:
    front = await start_front(start_service, entries(nodes))
    described = (await info(front))["engine"]
    assert described["name"] == "remote" and described["capacity"] == 3
    assert [(n["reachable"], n["capacity"], n["free_slots"]) for n in described["nodes"]] == [
        (True, 1, 1),
        (True, 2, 2),
    ]
    pcm = sentence(0)
    messages = await call(front, pcm, finalize=True)
    # The node with the most free slots took it.
    assert (await calls_on(nodes[0]), await calls_on(nodes[1])) == (0, 1)
    assert_same_words(words(messages), await offline_on(nodes[1], pcm))
    # Finalize: every word and the turn's segment are out before `finalized` (all the audio).
    kinds = [m["type"] for m in messages]
    assert kinds[-4:] == ["segment", "end_of_turn", "finalized", "closed"]
    assert messages[-2]["at"] == round(len(pcm) / RATE, 3)
    assert messages[-1]["reason"] == "flushed"
    segment = messages[-4]
    assert [w["text"] for w in segment["words"]] == [w["text"] for w in words(messages)]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{front.ports['health']}/metrics") as response:
            text = await response.text()
    for node in nodes:
        url = f"ws://127.0.0.1:{node.ports['audio']}/api/asr-streaming"
        assert f'stt_bridge_engine_node_up{{url="{url}"}} 1.0' in text
        assert f'stt_bridge_engine_node_free_slots{{url="{url}"}}' in text


async def test_a_full_node_is_passed_over_and_all_full_is_refused(
    start_service: ServiceFactory, nodes: list[Service]
) -> None:
    small, big = nodes
    front = await start_front(start_service, entries(nodes))
    pcm = sentence(3)
    async with aiohttp.ClientSession() as http:
        busy = [await occupy(http, small.ports["audio"])]
        # Its /info says so: the call goes to the other node.
        await until(lambda: _free_on(front, 0, 0))
        got = words(await call(front, pcm))
        assert await calls_on(big) == 1
        assert_same_words(got, await offline_on(big, pcm))
        busy += [await occupy(http, big.ports["audio"]) for _ in range(2)]
        await until(lambda: _free_total(front, 0))
        # Every node full: refused at protocol level, before any audio.
        url = f"ws://127.0.0.1:{front.ports['audio']}/v1/stream"
        rejected = await http.ws_connect(url)
        msg = await rejected.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and rejected.close_code == 1013
        async with http.get(f"http://127.0.0.1:{front.ports['health']}/ready") as response:
            assert response.status == 503
        for ws in busy:
            await ws.close()


async def _free_on(front: Service, index: int, free: int) -> bool:
    return bool((await info(front))["engine"]["nodes"][index]["free_slots"] == free)


async def _free_total(front: Service, free: int) -> bool:
    return bool((await info(front))["engine"]["free_slots"] == free)


async def test_moshi_server_nodes_refusing_no_free_channels(
    start_service: ServiceFactory, nodes: list[Service]
) -> None:
    """Nodes given without health= (as moshi-server, which has no /info): the front end only
    learns a node is full from its `Error "no free channels"`, then tries the next one."""
    small, big = nodes
    front = await start_front(start_service, entries(nodes, health=False))
    described = (await info(front))["engine"]["nodes"]
    assert [n["capacity"] for n in described] == [64, 64]  # assumed: moshi-server's batch
    pcm = sentence(3)
    async with aiohttp.ClientSession() as http:
        busy = [await occupy(http, small.ports["audio"])]
        # Both nodes look alike: in turn, one of two calls tries the full one first.
        got = [words(await call(front, pcm)) for _ in range(2)]
        assert await calls_on(big) == 2
        offline = await offline_on(big, pcm)
        for live in got:
            assert_same_words(live, offline)
        described = (await info(front))["engine"]["nodes"]
        assert described[0]["refusals"] == 1 and described[0]["reachable"]
        # Both full, unknown to the front end: the call is taken, then ends engine_full.
        busy += [await occupy(http, big.ports["audio"]) for _ in range(2)]
        await asyncio.sleep(PROBE_S * 2)  # the probe clears what refusals taught it
        codes: list[int] = []
        messages = await call(front, pcm[: RATE // 2], call_id="all-full", close_codes=codes)
        assert messages[-1] == {"type": "closed", "reason": "engine_full"}
        assert codes == [1013]  # as a full engine at the start: try again later
        stored = await stored_once_ended(front, "all-full")
        assert (stored["status"], stored["reason"]) == ("ended", "engine_full")
        # AudioSocket has no codes: its call is hung up, with the same reason stored.
        call_id = await audiosocket_until_hung_up(front, pcm)
        stored = await stored_once_ended(front, str(call_id))
        assert (stored["status"], stored["reason"]) == ("ended", "engine_full")
        for ws in busy:
            await ws.close()


# --- real node processes ----------------------------------------------------------------------


@pytest.fixture
def node_processes(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            node = ServerProcess(
                tmp_path / name,
                STT_BRIDGE_ENGINE_CAPACITY="2",
                STT_BRIDGE_ENGINE_THREADS="1",
            )
            node.log_to = tmp_path / f"{name}.log"
            started.append(node.start())
        yield started
    finally:
        for node in started:
            node.cleanup()  # only the processes this fixture started, by their PID


async def offline_of(node: ServerProcess, pcm: PcmArray, tmp: Path) -> list[dict[str, Any]]:
    """The node's own offline transcript of what it heard: POST /api/asr-streaming."""
    wav = write_wav(tmp / "offline.wav", as_heard(pcm), RATE)
    async with aiohttp.ClientSession() as http:
        url = node.url("/api/asr-streaming", scheme="http")
        async with http.post(url, data=wav.read_bytes()) as response:
            objects = await response.json()
    out: list[dict[str, Any]] = []
    for item in objects:
        if item["type"] == "Word":
            out.append({"text": item["text"], "start": item["start_time"]})
        elif item["type"] == "EndWord":
            out[-1]["end"] = item["stop_time"]
    return shifted(out)


async def test_a_node_killed_mid_call(
    start_service: ServiceFactory, node_processes: list[ServerProcess], tmp_path: Path
) -> None:
    """SIGKILL the node carrying a call: the call ends `engine_lost` with the words it had
    (stored, status interrupted); `/info` shows the node unreachable; a new call goes to the
    node left."""
    urls = tuple(entry(n.ports["audio"], n.ports["health"]) for n in node_processes)
    front = await start_front(start_service, urls)
    first, second = sentence(0), sentence(3)
    gap = np.zeros(RATE * 3, dtype=np.int16)
    audio = np.concatenate([first, gap, second])
    codes: list[int] = []
    talking = asyncio.create_task(
        call(front, audio, pace_s=0.02, call_id="doomed", close_codes=codes)
    )
    # Wait for the first sentence's words, then kill the node that carries the call.
    events = f"http://127.0.0.1:{front.ports['audio']}/v1/calls/doomed/transcript"

    async def heard() -> bool:
        try:
            return len((await get_json(events))["words"]) > 0
        except (aiohttp.ContentTypeError, KeyError):
            return False

    await until(heard, timeout=30)
    described = (await info(front))["engine"]["nodes"]
    [carrier] = [i for i, n in enumerate(described) if n["streams"] == 1]
    node_processes[carrier].kill()
    messages = await asyncio.wait_for(talking, 30)
    assert messages[-1] == {"type": "closed", "reason": "engine_lost"}
    assert codes == [1013]  # try again: a new call goes to the node left
    kept = words(messages)  # the utterances the node finished before it died
    offline = await offline_of(node_processes[1 - carrier], first, tmp_path)
    assert 0 < len(kept) < len(offline)
    assert_same_words(kept, offline[: len(kept)])
    stored = await get_json(events)
    assert (stored["call"]["status"], stored["call"]["reason"]) == ("interrupted", "engine_lost")
    assert [w["text"] for w in stored["words"]] == [w["text"] for w in kept]
    described = (await info(front))["engine"]["nodes"]
    assert not described[carrier]["reachable"] and described[1 - carrier]["reachable"]
    # A new call goes to the node left, and gets its words.
    again = await call(front, second)
    assert again[-1]["reason"] == "flushed"
    offline = await offline_of(node_processes[1 - carrier], second, tmp_path)
    assert_same_words(words(again), offline)
