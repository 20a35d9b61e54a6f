"""`/metrics` with `server.workers = 2` is the node's, whichever worker the kernel gives the
connection: calls started per front end, calls live, engine slots and live subscribers add up
over both workers; a worker killed -9 leaves its calls counted and its live ones no longer live.

Every check reads `/metrics` many times over new connections while both workers hold calls: a
worker answering for itself alone would show less than the node's total.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server_process import ServerProcess, alive
from tests.e2e.test_workers import stored_calls, stream_call, until, worker_pid, workers_of

pytestmark = [pytest.mark.solo, pytest.mark.timeout(120)]

NODE = "box"
CAPACITY = 10  # sink streams per worker
SCRAPES = 12
RATE = 24000


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path / "data",
        STT_BRIDGE_SERVER_WORKERS="2",
        STT_BRIDGE_SERVER_NODE_ID=NODE,
        STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S="5",
        STT_BRIDGE_ENGINE_NAME="sink",
        STT_BRIDGE_ENGINE_CAPACITY=str(CAPACITY),
    )
    process.log_to = tmp_path / "server.log"
    process.start()
    yield process
    pids = workers_of(process)
    process.cleanup()
    for pid in pids:  # they end with it (SIGTERM on its death); never leave one
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(server: ServerProcess) -> Samples:
    """One GET /metrics on a new connection (SO_REUSEPORT places connections, not requests)."""
    url = f"http://127.0.0.1:{server.ports['health']}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def figure(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def every_answer(server: ServerProcess, expected: dict[str, float]) -> list[Samples]:
    """`SCRAPES` answers, each with every `expected` figure (name or name{front_end=...})."""
    answers = [await scrape(server) for _ in range(SCRAPES)]
    for samples in answers:
        got = {key: _figure(samples, key) for key in expected}
        assert got == expected
    return answers


def _figure(samples: Samples, key: str) -> float:
    name, _, front_end = key.partition("/")
    return figure(samples, name, **({"front_end": front_end} if front_end else {}))


async def settled(server: ServerProcess, expected: dict[str, float]) -> None:
    """Until a run of answers all show `expected` (figures copied every 0.5 s), then check it."""

    async def all_show() -> bool:
        for _ in range(4):
            samples = await scrape(server)
            if any(_figure(samples, key) != value for key, value in expected.items()):
                return False
        return True

    await until(all_show, 15)
    await every_answer(server, expected)


async def deepgram_call(server: ServerProcess, pcm: np.ndarray[Any, Any]) -> None:
    url = server.url(f"/v1/listen?encoding=linear16&sample_rate={RATE}")
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_bytes(pcm.tobytes())
        await ws.send_str(json.dumps({"type": "CloseStream"}))
        async with asyncio.timeout(30):
            async for _ in ws:
                pass


async def test_metrics_answer_for_the_whole_node_whichever_worker_answers(
    server: ServerProcess,
) -> None:
    pcm = np.zeros(RATE // 2, dtype=np.int16)
    placed = {"websocket": 0, "deepgram": 0}
    for batch in range(6):  # until calls have landed on both workers (the kernel spreads them)
        for i in range(3):
            messages = await stream_call(server, f"m-{batch}-{i}", pcm)
            assert messages[-1]["type"] == "closed"
            placed["websocket"] += 1
        await deepgram_call(server, pcm)
        placed["deepgram"] += 1

        async def stored() -> bool:
            return len(await stored_calls(server)) == sum(placed.values())

        await until(stored)
        if {c["node"] for c in await stored_calls(server)} == {f"{NODE}/w0", f"{NODE}/w1"}:
            break
    nodes = {c["node"] for c in await stored_calls(server)}
    assert nodes == {f"{NODE}/w0", f"{NODE}/w1"}
    # Calls started, per front end: every answer says all of them, none live.
    await every_answer(
        server,
        {
            "stt_bridge_calls_total/websocket": placed["websocket"],
            "stt_bridge_calls_total/deepgram": placed["deepgram"],
            "stt_bridge_calls_active/websocket": 0,
            "stt_bridge_slots_used": 0,
            "stt_bridge_slots_free": 2 * CAPACITY,  # a sink in each worker: their slots add up
        },
    )

    # Calls held open and /v1/events watchers, on both workers: live figures add up too.
    async with aiohttp.ClientSession() as http:
        held: dict[str, aiohttp.ClientWebSocketResponse] = {}
        watchers = [await http.ws_connect(server.url("/v1/events")) for _ in range(4)]

        async def live_on() -> dict[str, str]:
            return {c["id"]: c["node"] for c in await stored_calls(server) if c["id"] in held}

        async def all_live() -> bool:
            return len(await live_on()) == len(held)

        # SO_REUSEPORT places a connection by a hash of its addresses: calls until both workers
        # hold some (six at least; more one time in 32).
        where: dict[str, str] = {}
        while len(held) < 6 or len(set(where.values())) < 2:
            assert len(held) < 16, where
            i = len(held)
            ws = await http.ws_connect(server.url(f"/v1/stream?sample_rate={RATE}&call_id=h-{i}"))
            await ws.send_bytes(pcm[:480].tobytes())
            held[f"h-{i}"] = ws
            await until(all_live)
            where = await live_on()
        on_w0 = [c for c, node in where.items() if node == f"{NODE}/w0"]
        await settled(
            server,
            {
                "stt_bridge_calls_total/websocket": placed["websocket"] + len(held),
                "stt_bridge_calls_active/websocket": len(held),
                "stt_bridge_slots_used": len(held),
                "stt_bridge_slots_free": 2 * CAPACITY - len(held),
                "stt_bridge_live_subscribers": len(watchers),
            },
        )

        # Worker 0 killed -9 with its calls live: restarted; its calls still count as started,
        # no longer as live.
        victim = worker_pid(server, 0)
        os.kill(victim, signal.SIGKILL)

        async def restarted() -> bool:
            pids = [p for p in workers_of(server) if p != victim]
            return len(pids) == 2 and not alive(victim)

        await until(restarted)
        survivors = len(held) - len(on_w0)
        await settled(
            server,
            {
                "stt_bridge_calls_total/websocket": placed["websocket"] + len(held),
                "stt_bridge_calls_active/websocket": survivors,
                "stt_bridge_slots_used": survivors,
                "stt_bridge_slots_free": 2 * CAPACITY - survivors,
            },
        )
        for ws in [*held.values(), *watchers]:
            await ws.close()
    await settled(
        server,
        {
            "stt_bridge_calls_total/websocket": placed["websocket"] + len(held),
            "stt_bridge_calls_total/deepgram": placed["deepgram"],
            "stt_bridge_calls_active/websocket": 0,
            "stt_bridge_slots_used": 0,
            "stt_bridge_live_subscribers": 0,
        },
    )
    assert server.terminate() == 0
