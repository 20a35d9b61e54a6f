"""The floor under every WebSocket front end: aiohttp (on uvloop) receiving 20 ms frames and
doing nothing with them.

Starts a bare aiohttp server (one route: accept the WebSocket, read every message, drop it)
pinned to one core, places N connections from this process on another core, each sending a
160-byte binary frame every 20 ms (spread over the 20 ms like bench/load.py's calls), and
prints the server's CPU per frame. bench/load.py's figure for `/v1/stream` minus this one is
what the bridge itself adds per frame (decode, resample, session, engine hand-off).

    python bench/ws_floor.py [--calls 200 500] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ (its engine.py): the repository's packages

from tests.e2e.server_process import free_port  # noqa: E402

SERVER = """
import sys
import uvloop
from aiohttp import web

async def discard(request):
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    await ws.prepare(request)
    async for _ in ws:
        pass
    return ws

app = web.Application()
app.router.add_get("/", discard)
uvloop.install()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *_: print("up", flush=True))
"""
HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
FRAME = bytes([0x82, 0x80 | 126]) + (160).to_bytes(2, "big") + bytes(4) + b"\xff" * 160
SLOTS = 20  # 1 ms slots in the 20 ms frame period


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(calls: int, seconds: float, server_core: int) -> float:
    """Server CPU µs per frame."""
    port = free_port()
    command = ["taskset", "-c", str(server_core), sys.executable, "-c", SERVER, str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        server.stdout.readline()
        writers = []
        for _ in range(calls):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HANDSHAKE)
            await reader.readuntil(b"\r\n\r\n")
            writers.append(writer)
        await asyncio.sleep(1.0)
        groups = [writers[k::SLOTS] for k in range(SLOTS)]
        cpu0, start = cpu_seconds(server.pid), time.monotonic()
        due, frames = start, 0
        while time.monotonic() - start < seconds:
            for group in groups:
                for writer in group:
                    writer.write(FRAME)
                frames += len(group)
                due += 0.02 / SLOTS
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        return 1e6 * (cpu_seconds(server.pid) - cpu0) / frames
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[200])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.client_core})
    print("| calls | bare aiohttp CPU µs/frame |\n|-------|---------------------------|")
    for calls in args.calls:
        us = asyncio.run(measure(calls, args.seconds, args.server_core))
        print(f"| {calls} | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
