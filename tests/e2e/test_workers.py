"""`server.workers = 2` as real processes on loopback: `stt-bridge serve` supervising an engine
process (Moonshine on the CPU) and two workers sharing every port (SO_REUSEPORT); SIP in worker
0. Calls land on both workers, words equal the offline transcript, every `/v1/events` sees every
call, the store has each call once, a webhook goes out once, a sipp call keeps its dialog in
one process; a worker killed -9 mid-call is restarted, its call interrupted with its words,
the other worker's calls go on; SIGTERM drains every call and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from api.app import Service
from tests.api.test_cluster import Hooks
from tests.conftest import ServiceFactory
from tests.e2e.server_process import ServerProcess, alive, child_pids
from tests.e2e.sip_peers import _run_sipp, free_port, sipp_dir
from tests.e2e.test_remote_engine import (
    RATE,
    assert_same_words,
    offline_on,
    sentence,
    words,
)
from tests.e2e.test_sip import speech_pcap
from tests.speech import SENTENCES

pytestmark = [pytest.mark.solo, pytest.mark.timeout(120)]

NODE = "box"
FRAME = 480  # 20 ms at 24 kHz


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    async with Hooks() as receiver:
        yield receiver


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def make(**env: str) -> ServerProcess:
        low = 32000 + (os.getpid() * 97 % 200) * 100
        server = ServerProcess(
            tmp_path / "data",
            STT_BRIDGE_SERVER_WORKERS="2",
            STT_BRIDGE_SERVER_NODE_ID=NODE,
            STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S="20",
            STT_BRIDGE_ENGINE_THREADS="2",
            **env,
        )
        server.env.update(
            STT_BRIDGE_SIP_ENABLED="true",
            STT_BRIDGE_SIP_HOST="127.0.0.1",
            STT_BRIDGE_SIP_PORT=str(free_port()),
            STT_BRIDGE_SIP_RTP_PORT_MIN=str(low),
            STT_BRIDGE_SIP_RTP_PORT_MAX=str(low + 99),
        )
        server.log_to = tmp_path / "server.log"
        started.append(server.start())
        return server

    yield make
    for server in started:
        pids = workers_of(server) + engine_of(server)
        server.cleanup()
        for pid in pids:  # the children end with it (they drain on its death); never leave one
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def reference(start_service: ServiceFactory) -> Service:
    """An in-process Moonshine service: the offline transcripts."""
    return await start_service()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def workers_of(server: ServerProcess) -> list[int]:
    return [p for p in server.children() if "worker" in _cmdline(p)]


def engine_of(server: ServerProcess) -> list[int]:
    return [p for p in server.children() if "engine" in _cmdline(p)]


def worker_pid(server: ServerProcess, k: int) -> int:
    (pid,) = [p for p in workers_of(server) if _cmdline(p)[5:6] == [str(k)]]
    return pid


async def get_json(url: str) -> Any:
    # A new connection each time: SO_REUSEPORT places each connection, not each request.
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return await response.json()


async def stored_calls(server: ServerProcess) -> list[dict[str, Any]]:
    body = await get_json(server.url("/v1/calls?limit=100", "http"))
    calls: list[dict[str, Any]] = body["calls"]
    return calls


async def until(check: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


async def stream_call(
    server: ServerProcess,
    call_id: str,
    pcm: np.ndarray[Any, Any],
    pace_s: float = 0.0,
    spoke: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """/v1/stream at 24 kHz in 20 ms frames, then stop: every message until `closed` (or until
    the connection drops: a killed worker)."""
    url = server.url(f"/v1/stream?sample_rate={RATE}&call_id={call_id}")
    messages: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:

        async def receive() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    return
                messages.append(json.loads(msg.data))
                if messages[-1]["type"] == "word" and spoke is not None:
                    spoke.set()
                if messages[-1]["type"] == "closed":
                    return

        receiver = asyncio.create_task(receive())
        try:
            for offset in range(0, len(pcm), FRAME):
                if receiver.done():
                    break
                await ws.send_bytes(pcm[offset : offset + FRAME].tobytes())
                await asyncio.sleep(pace_s)
            if not receiver.done():
                await ws.send_str(json.dumps({"type": "stop"}))
        except (ConnectionError, RuntimeError):
            pass
        await asyncio.wait_for(receiver, 60)
    return messages


async def watch(server: ServerProcess, http: aiohttp.ClientSession) -> Any:
    return await http.ws_connect(server.url("/v1/events"))


async def drain_events(ws: Any, into: list[dict[str, Any]], until_ended: set[str]) -> bool:
    """/v1/events messages into `into` until every call in `until_ended` has ended (True), or
    the connection ends (False: its worker was killed)."""
    async with asyncio.timeout(60):
        while not until_ended <= {e["call_id"] for e in into if e["type"] == "call_ended"}:
            msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                return False
            into.append(json.loads(msg.data))
    return True


async def test_calls_spread_over_workers_seen_everywhere_stored_and_sent_once(
    make_server: Any, hooks: Hooks, reference: Service, tmp_path: Path
) -> None:
    server = make_server(STT_BRIDGE_WEBHOOK_URL=hooks.url)
    assert len(workers_of(server)) == 2 and len(engine_of(server)) == 1
    pcms = [sentence(i) for i in (0, 1, 3)]  # 2: Moonshine reads its digits apart live
    offline = [await offline_on(reference, pcm) for pcm in pcms]
    got: dict[str, list[dict[str, Any]]] = {}
    views: list[list[dict[str, Any]]] = [[] for _ in range(4)]
    async with aiohttp.ClientSession() as http:
        sockets = [await watch(server, http) for _ in views]
        batch = 0
        while batch < 4:  # until calls have landed on both workers (the kernel spreads them)
            ids = [f"wk-{batch}-{i}" for i in range(4)]
            results = [await stream_call(server, c, pcms[i % 3]) for i, c in enumerate(ids)]
            got.update(zip(ids, results, strict=True))
            batch += 1
            nodes = {c["node"] for c in await stored_calls(server)}
            if nodes == {f"{NODE}/w0", f"{NODE}/w1"}:
                break
        assert nodes == {f"{NODE}/w0", f"{NODE}/w1"}
        for i, call_id in enumerate(got):
            assert_same_words(words(got[call_id]), offline[int(call_id.rsplit("-", 1)[1]) % 3])
            assert got[call_id][-1] == {"type": "closed", "reason": "flushed"} or (
                got[call_id][-1]["type"] == "closed"
            ), i
        # Every /v1/events connection, whichever worker took it, saw every call and its words.
        for ws, view in zip(sockets, views, strict=True):
            assert await drain_events(ws, view, set(got))
            for call_id, messages in got.items():
                seen = [e for e in view if e.get("call_id") == call_id]
                assert seen[0]["type"] == "call_started" and seen[-1]["type"] == "call_ended"
                assert [e["text"] for e in seen if e["type"] == "word"] == [
                    w["text"] for w in words(messages)
                ]
            await ws.close()
        # A SIP call: its dialog (INVITE, ACK, RTP, BYE) in worker 0, the only one on SIP.
        (tmp_path / "sipp").mkdir()
        cwd = sipp_dir(tmp_path / "sipp")
        (cwd / "uac_pcmu.xml").write_text(
            (Path(__file__).parent / "sipp" / "uac_pcmu.xml").read_text()
        )
        _, ms = speech_pcap(cwd, SENTENCES[1])
        cmd = [
            "sipp", f"127.0.0.1:{server.env['STT_BRIDGE_SIP_PORT']}", "-sf", "uac_pcmu.xml",
            "-i", "127.0.0.1", "-p", str(free_port()), "-mp", str(free_port()), "-s", "service",
            "-m", "1", "-d", str(ms + 500), "-nostdin", "-trace_err",
            "-error_file", str(cwd / "errors.log"),
        ]  # fmt: skip
        result = await _run_sipp(cmd, cwd, cwd / "errors.log", 60)
        assert result.returncode == 0, result.errors + result.stdout

    async def sip_ended() -> bool:
        sip = [c for c in await stored_calls(server) if c["front_end"] == "sip"]
        return bool(sip) and sip[0]["status"] == "ended"

    await until(sip_ended)
    calls = await stored_calls(server)
    (sip_call,) = [c for c in calls if c["front_end"] == "sip"]
    assert sip_call["node"] == f"{NODE}/w0" and sip_call["reason"] == "remote hangup"
    transcript = await get_json(server.url(f"/v1/calls/{sip_call['id']}/transcript", "http"))
    assert transcript["words"], transcript
    # The store: each call once.
    assert sorted(c["id"] for c in calls if c["front_end"] != "sip") == sorted(got)
    assert all(c["status"] == "ended" for c in calls)
    # /info: two processes answer the health port, each with its pid and node.
    answered: dict[str, int] = {}
    for _ in range(40):
        body = await get_json(f"http://127.0.0.1:{server.ports['health']}/info")
        answered[body["node"]] = body["pid"]
        if len(answered) == 2:
            break
    assert answered == {f"{NODE}/w{k}": worker_pid(server, k) for k in (0, 1)}
    # Webhooks: each call's call.ended exactly once, whichever worker's sender took it.
    every = {*got, sip_call["id"]}

    async def delivered() -> bool:
        return {b["call"]["id"] for b in hooks.bodies if b["event"] == "call.ended"} >= every

    await until(delivered)
    await asyncio.sleep(2.5)  # a second sender would have claimed it by now
    ended = [b["call"]["id"] for b in hooks.bodies if b["event"] == "call.ended"]
    assert sorted(ended) == sorted(every)
    assert server.terminate() == 0


async def test_a_killed_worker_is_restarted_and_sigterm_drains_every_worker(
    make_server: Any, reference: Service, tmp_path: Path
) -> None:
    server = make_server()
    pcm = np.concatenate([sentence(0), sentence(3)])  # ~6 s, paced at real time
    offline = await offline_on(reference, pcm)
    calls: dict[str, asyncio.Task[list[dict[str, Any]]]] = {}
    spoke: dict[str, asyncio.Event] = {}
    placed: dict[str, str] = {}  # call → the worker (node id) that took it
    async with aiohttp.ClientSession() as http:
        # The kernel places each view on a worker by a hash of its addresses: twelve, so that
        # all of them on the worker killed below is 1 in 4096 (six were: 1 in 64, and it came).
        sockets = [await watch(server, http) for _ in range(12)]
        # SO_REUSEPORT places a connection by a hash of its addresses: calls, one at a time,
        # until both workers carry some (four at least; a fifth is needed one time in eight).
        while len(calls) < 4 or len(set(placed.values())) < 2:
            assert len(calls) < 12, placed
            call_id = f"k-{len(calls)}"
            spoke[call_id] = asyncio.Event()
            calls[call_id] = asyncio.create_task(
                stream_call(server, call_id, pcm, 0.02, spoke[call_id])
            )

            async def is_stored(call_id: str = call_id) -> bool:
                stored = await stored_calls(server)
                placed.update({c["id"]: c["node"] for c in stored if c["id"] in calls})
                return call_id in placed

            await until(is_stored)
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in spoke.values())), 30)
        victim_node = placed["k-0"]
        k = int(victim_node[-1])
        victim = worker_pid(server, k)
        os.kill(victim, signal.SIGKILL)
        results = {c: await t for c, t in calls.items()}
        # The other worker's calls went on, every word.
        for call_id, node in placed.items():
            if node != victim_node:
                assert_same_words(words(results[call_id]), offline)
                assert results[call_id][-1]["type"] == "closed"
        # It is restarted; its calls are interrupted, with the words they had.

        async def restarted() -> bool:
            pids = [p for p in workers_of(server) if _cmdline(p)[5:6] == [str(k)]]
            return bool(pids) and pids[0] != victim

        await until(restarted)
        lost = [c for c, n in placed.items() if n == victim_node]

        async def marked() -> bool:
            stored = {c["id"]: c for c in await stored_calls(server)}
            return all(stored[c]["status"] == "interrupted" for c in lost)

        await until(marked)
        for call_id in lost:
            heard = [w["text"] for w in words(results[call_id])]
            assert heard, call_id
            transcript = await get_json(server.url(f"/v1/calls/{call_id}/transcript", "http"))
            kept = [w["text"] for w in transcript["words"]]
            # What its writer had committed when it died: all but words of its last instants.
            assert kept and kept == heard[: len(kept)], (kept, heard)
        # Views on the worker left heard the lost calls end.
        views_left = 0
        for ws in sockets:
            view: list[dict[str, Any]] = []
            if not await drain_events(ws, view, set(placed)):
                continue  # it was on the killed worker
            views_left += 1
            ends = {e["call_id"]: e["reason"] for e in view if e["type"] == "call_ended"}
            for call_id in lost:
                assert ends[call_id] == "bridge stopped mid-call"
        assert views_left > 0
        # SIGTERM mid-call: both workers drain, then the engine process stops; exit 0.
        children = workers_of(server) + engine_of(server)
        spoke = {f"d-{i}": asyncio.Event() for i in range(3)}
        calls = {
            call_id: asyncio.create_task(stream_call(server, call_id, pcm, 0.02, event))
            for call_id, event in spoke.items()
        }
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in spoke.values())), 30)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        results = {c: await t for c, t in calls.items()}
        for call_id, messages in results.items():
            assert_same_words(words(messages), offline)
            assert messages[-1] == {"type": "closed", "reason": "flushed"}, call_id
        code = await asyncio.get_running_loop().run_in_executor(None, server.process.wait, 60)
    assert code == 0
    assert not any(alive(p) for p in children)
    db = sqlite3.connect(tmp_path / "data" / "stt-bridge.sqlite3")
    rows = dict(db.execute("SELECT id, status FROM calls WHERE id LIKE 'd-%'").fetchall())
    assert rows == {c: "ended" for c in results}
    assert server.process.poll() == 0 and not child_pids(server.process.pid)
