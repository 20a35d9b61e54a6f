"""`engine.devices`: one engine process per device, every worker's calls spread over them.

`stt-bridge serve` as a real process with the Kyutai engine on a tiny random-weight checkpoint,
`engine.devices = ["cpu", "cpu"]` and one worker: the supervisor runs anyway, the startup line
and `/info` say which engine process runs on which device, two calls at once go one to each
engine process, and an engine process killed by its PID is started again and takes calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import pytest

from api.config import load_config
from engine.random_checkpoint import write_checkpoint
from tests.e2e.server_process import CLI, ServerProcess, alive
from tests.e2e.test_workers import get_json, until

pytestmark = [pytest.mark.solo, pytest.mark.timeout(120)]

RATE = 24000
FRAME = 1920  # 80 ms
STEPS = "stt_bridge_engine_step_seconds_count "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("stt-tiny"), "tiny", seed=3)


@pytest.fixture
def server(tmp_path: Path, checkpoint: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path / "data",
        STT_BRIDGE_SERVER_WORKERS="1",
        STT_BRIDGE_ENGINE_NAME="kyutai",
        STT_BRIDGE_ENGINE_MODEL=str(checkpoint),
        STT_BRIDGE_ENGINE_BATCH_SIZE="2",
        STT_BRIDGE_ENGINE_DEVICE="cuda",  # each process takes its entry of devices instead
        STT_BRIDGE_ENGINE_DEVICES="cpu,cpu",
    )
    process.log_to = tmp_path / "server.log"
    process.start()
    yield process
    children = process.children()
    process.cleanup()
    for pid in children:  # they end with it (SIGTERM on its death); never leave one
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def noise(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 5000).astype(np.int16).tobytes()


async def engine_nodes(server: ServerProcess) -> list[dict[str, Any]]:
    body = await get_json(f"http://127.0.0.1:{server.ports['health']}/info")
    nodes: list[dict[str, Any]] = body["engine"]["nodes"]
    return nodes


async def engine_process_info(node: dict[str, Any]) -> dict[str, Any]:
    """The engine process's own /info (its health URL is its stream URL's port)."""
    port = urlsplit(node["url"]).port
    info: dict[str, Any] = await get_json(f"http://127.0.0.1:{port}/info")
    return info


async def two_calls_at_once(server: ServerProcess, tag: str) -> list[int]:
    """Two /v1/stream calls, both live while /info is read: how many streams each engine
    process has then. Each call then ends with its words, flushed."""
    url = server.url(f"/v1/stream?sample_rate={RATE}&call_id=")
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(f"{url}{tag}-{i}") for i in range(2)]
        audio = [noise(2.0, seed=i) for i in range(2)]
        for ws, pcm in zip(sockets, audio, strict=True):
            await ws.send_bytes(pcm[: len(pcm) // 2])

        async def both_placed() -> bool:
            return sum(int(n["streams"]) for n in await engine_nodes(server)) == 2

        await until(both_placed, 15)
        streams = [n["streams"] for n in await engine_nodes(server)]
        for ws, pcm in zip(sockets, audio, strict=True):
            for offset in range(len(pcm) // 2, len(pcm), FRAME * 2):
                await ws.send_bytes(pcm[offset : offset + FRAME * 2])
            await ws.send_str(json.dumps({"type": "stop"}))
        for ws in sockets:
            messages = []
            async with asyncio.timeout(30):
                async for msg in ws:
                    messages.append(json.loads(msg.data))
                    if messages[-1]["type"] == "closed":
                        break
            assert messages[-1] == {"type": "closed", "reason": "flushed"}, messages
            assert any(m["type"] == "word" for m in messages), messages
            await ws.close()
    return streams


async def test_an_engine_process_per_device_each_takes_calls_and_restarts(
    server: ServerProcess,
) -> None:
    # The startup line: one worker, two engine processes, each with its device and pid.
    pids = server.children()
    assert "1 worker, engine kyutai in 2 processes: [0] cpu (pid " in server.banner, server.banner
    # /info (the worker's): its remote engine has both engine processes as nodes, by device.
    nodes = await engine_nodes(server)
    assert [urlsplit(n["url"]).query for n in nodes] == ["device=cpu", "device=cpu"]
    assert all(n["reachable"] and n["capacity"] == 2 for n in nodes), nodes
    engines = [await engine_process_info(n) for n in nodes]
    assert [e["engine_process"] for e in engines] == [0, 1]
    assert all(e["engine"]["name"] == "kyutai" and e["engine"]["device"] == "cpu" for e in engines)
    for e, node in zip(engines, nodes, strict=True):
        assert e["pid"] in pids
        port = urlsplit(node["url"]).port
        assert f"cpu (pid {e['pid']}, :{port})" in server.banner
    # Two calls at once: one on each engine process (the one with the most free slots).
    assert await two_calls_at_once(server, "a") == [1, 1]
    # The node's /metrics has the engine processes' batched steps.
    metrics_url = f"http://127.0.0.1:{server.ports['health']}/metrics"
    async with aiohttp.ClientSession() as http, http.get(metrics_url) as response:
        metrics = await response.text()
    (steps,) = [line for line in metrics.splitlines() if line.startswith(STEPS)]
    assert float(steps.split()[1]) > 0, steps

    # Engine process 0 killed: it is started again on its port, with a new pid.
    victim = engines[0]["pid"]
    os.kill(victim, signal.SIGKILL)

    async def restarted() -> bool:
        try:
            again = await engine_process_info(nodes[0])
        except (aiohttp.ClientError, OSError):
            return False
        return bool(again["pid"] != victim)

    await until(restarted, 30)
    new_pid = (await engine_process_info(nodes[0]))["pid"]
    assert new_pid in server.children() and not alive(victim)

    async def both_reachable() -> bool:
        return all(n["reachable"] for n in await engine_nodes(server))

    await until(both_reachable, 15)
    # New calls work, and again one goes to each engine process, the restarted one included.
    assert await two_calls_at_once(server, "b") == [1, 1]
    assert server.terminate() == 0


def test_devices_without_a_model_to_place_is_a_config_error(tmp_path: Path) -> None:
    """Moonshine (one CPU process) and the in-worker engines take no devices: a one-line reason,
    exit status 2, nothing started."""
    for name in ("moonshine", "sink"):
        server = ServerProcess(
            tmp_path / "data", STT_BRIDGE_ENGINE_NAME=name, STT_BRIDGE_ENGINE_DEVICES="cpu,cpu"
        )
        done = subprocess.run(
            [*CLI, "serve"], env=server.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done
        assert done.stderr.startswith("stt-bridge: config: engine.devices: "), done.stderr
        assert name.capitalize() in done.stderr or name in done.stderr


def test_devices_is_a_list_in_toml_and_comma_separated_in_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "gpus.toml"
    path.write_text('[engine]\nname = "kyutai"\ndevices = ["cuda:0", "cuda:1"]\n')
    assert load_config(path, environ={}).engine.devices == ("cuda:0", "cuda:1")
    environ = {"STT_BRIDGE_ENGINE_DEVICES": "cuda:0, cuda:1,cuda:2"}
    assert load_config(path, environ=environ).engine.devices == ("cuda:0", "cuda:1", "cuda:2")
