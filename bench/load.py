"""Load harness: N concurrent real-time calls against the real server process.

Starts `stt-bridge serve` as a subprocess (pinned to one core with `--server-core`, engine =
sink by default: it consumes audio and emits nothing, so this measures the bridge alone), then
places N calls over one front end, each sending a 20 ms frame every 20 ms like a phone, from
this process (pinned to another core). Reports, per run:

- late frames: frames this client sent more than 20 ms after their due time (the client could
  not keep up — then the figure says more about the client than the bridge);
- server CPU: share of one core the bridge used, and per call;
- server memory: RSS growth per call, and its growth over the run (flat = no leak);
- loop lag p50/p99: how long a request waits for the bridge's event loop, probed every 50 ms
  on `/health`. With the sink engine a frame is pushed to the engine in the same loop step it
  is read, so this is the added latency per frame (frame received → engine push).

    python bench/load.py --front-end listen --calls 100 200 500 --seconds 20
    front ends: ws (raw 24 kHz on /), listen (μ-law 8 kHz on /v1/listen), audiosocket, twilio,
    freeswitch
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
FRAME_S = 0.02


@dataclass
class Stats:
    late: int = 0
    sent: int = 0
    failed: int = 0
    lags: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    def __init__(self, engine: str, core: int | None) -> None:
        self.ports = {name: free_port() for name in ("audio", "health", "web", "audiosocket")}
        env = {
            **os.environ,
            "STT_BRIDGE_SERVER_HOST": "127.0.0.1",
            "STT_BRIDGE_SERVER_PORT": str(self.ports["audio"]),
            "STT_BRIDGE_SERVER_HEALTH_PORT": str(self.ports["health"]),
            "STT_BRIDGE_SERVER_WEB_PORT": str(self.ports["web"]),
            "STT_BRIDGE_AUDIOSOCKET_HOST": "127.0.0.1",
            "STT_BRIDGE_AUDIOSOCKET_PORT": str(self.ports["audiosocket"]),
            "STT_BRIDGE_ENGINE_NAME": engine,
            "STT_BRIDGE_ENGINE_CAPACITY": "5000",
            "STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S": "1",
            "STT_BRIDGE_LOG_LEVEL": "warning",
        }
        command = [sys.executable, "-m", "api.cli", "serve"]
        if core is not None:
            command = ["taskset", "-c", str(core), *command]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.process.stdout.readline()  # the banner: every port listens

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- one call per front end: open, then send(frame_number) every 20 ms, then close -------------

Caller = Callable[[aiohttp.ClientSession, Server, int, Stats, float], Awaitable[None]]


async def paced(count: int, stats: Stats, send: Callable[[int], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n in range(count):
        due = start + n * FRAME_S
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif -delay > FRAME_S:
            stats.late += 1
        await send(n)
        stats.sent += 1


async def ws_call(
    http: aiohttp.ClientSession, server: Server, n: int, stats: Stats, seconds: float
) -> None:
    frame = bytes(480 * 2)  # 20 ms of 24 kHz int16
    url = f"ws://127.0.0.1:{server.ports['audio']}/"
    async with http.ws_connect(url) as ws:
        await paced(int(seconds / FRAME_S), stats, lambda _: ws.send_bytes(frame))
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass


async def listen_call(
    http: aiohttp.ClientSession, server: Server, n: int, stats: Stats, seconds: float
) -> None:
    frame = b"\xff" * 160  # 20 ms of μ-law 8 kHz
    url = f"ws://127.0.0.1:{server.ports['audio']}/v1/listen?encoding=mulaw&sample_rate=8000"
    async with http.ws_connect(url) as ws:
        await paced(int(seconds / FRAME_S), stats, lambda _: ws.send_bytes(frame))
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass


async def audiosocket_call(
    http: aiohttp.ClientSession, server: Server, n: int, stats: Stats, seconds: float
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["audiosocket"])
    writer.write(b"\x01\x00\x10" + uuid.uuid4().bytes)
    frame = b"\x10\x01\x40" + bytes(320)

    async def send(_: int) -> None:
        writer.write(frame)

    await paced(int(seconds / FRAME_S), stats, send)
    writer.close()
    await reader.read()


async def twilio_call(
    http: aiohttp.ClientSession, server: Server, n: int, stats: Stats, seconds: float
) -> None:
    payload = base64.b64encode(b"\xff" * 160).decode()
    sid = f"CA{uuid.uuid4().hex}"
    start = {
        "event": "start",
        "start": {"callSid": sid, "streamSid": "MZ" + sid[2:], "tracks": ["inbound"]},
    }
    async with http.ws_connect(f"ws://127.0.0.1:{server.ports['audio']}/twilio/media") as ws:
        await ws.send_str(json.dumps(start))

        async def send(i: int) -> None:
            media = {"track": "inbound", "timestamp": str(i * 20), "payload": payload}
            await ws.send_str(json.dumps({"event": "media", "media": media}))

        await paced(int(seconds / FRAME_S), stats, send)
        await ws.send_str('{"event": "stop"}')
        async for _ in ws:
            pass


async def freeswitch_call(
    http: aiohttp.ClientSession, server: Server, n: int, stats: Stats, seconds: float
) -> None:
    frame = bytes(320)  # 20 ms of 8 kHz mono L16
    url = f"ws://127.0.0.1:{server.ports['audio']}/freeswitch/{uuid.uuid4()}?mix=mono&rate=8000"
    async with http.ws_connect(url, protocols=("audio.drachtio.org",)) as ws:
        await paced(int(seconds / FRAME_S), stats, lambda _: ws.send_bytes(frame))


FRONT_ENDS: dict[str, Caller] = {
    "ws": ws_call,
    "listen": listen_call,
    "audiosocket": audiosocket_call,
    "twilio": twilio_call,
    "freeswitch": freeswitch_call,
}


async def probe_loop(server: Server, stats: Stats, until: float) -> None:
    url = f"http://127.0.0.1:{server.ports['health']}/health"
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < until:
            start = time.perf_counter()
            async with http.get(url) as response:
                await response.read()
            stats.lags.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)


async def run(
    front_end: str, calls: int, seconds: float, engine: str, core: int | None
) -> dict[str, float]:
    server = Server(engine, core)
    stats = Stats()
    try:
        rss_before = server.rss_kib()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            caller = FRONT_ENDS[front_end]

            # Ramp up over one second so connection set-up does not count as lateness.
            async def one(n: int) -> None:
                await asyncio.sleep(n / calls)
                try:
                    await caller(http, server, n, stats, seconds)
                except (aiohttp.ClientError, OSError):
                    stats.failed += 1

            cpu_start, wall_start = server.cpu_seconds(), time.monotonic()
            rss_mid: list[int] = []

            async def sample_rss() -> None:
                await asyncio.sleep(1.5 + seconds / 4)
                rss_mid.append(server.rss_kib())
                await asyncio.sleep(seconds / 2)
                rss_mid.append(server.rss_kib())

            await asyncio.gather(
                *(one(n) for n in range(calls)),
                probe_loop(server, stats, time.monotonic() + seconds),
                sample_rss(),
            )
            cpu = (server.cpu_seconds() - cpu_start) / (time.monotonic() - wall_start)
    finally:
        server.stop()
    lags = sorted(stats.lags) or [0.0]
    return {
        "calls": calls,
        "late_pct": 100 * stats.late / max(1, stats.sent),
        "failed": stats.failed,
        "cpu_pct": 100 * cpu,
        "cpu_per_call_pct": 100 * cpu / calls,
        "kib_per_call": (rss_mid[0] - rss_before) / calls if rss_mid else 0.0,
        "growth_kib_per_call": (rss_mid[1] - rss_mid[0]) / calls if len(rss_mid) > 1 else 0.0,
        "lag_p50_ms": 1000 * statistics.median(lags),
        "lag_p99_ms": 1000 * lags[min(len(lags) - 1, int(len(lags) * 0.99))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--front-end", choices=sorted(FRONT_ENDS), default="listen")
    parser.add_argument("--calls", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per call")
    parser.add_argument("--engine", default="sink", help="sink (bridge alone) or cpu")
    parser.add_argument("--server-core", type=int, default=0, help="-1: do not pin")
    parser.add_argument("--client-core", type=int, default=1, help="-1: do not pin")
    args = parser.parse_args()
    if args.client_core >= 0:
        os.sched_setaffinity(0, {args.client_core})
    core = None if args.server_core < 0 else args.server_core
    print(
        f"front end {args.front_end}, engine {args.engine}, {args.seconds:.0f} s per call, "
        f"server on core {core}, client on core {args.client_core}\n"
    )
    header = (
        "calls",
        "late %",
        "failed",
        "server CPU %",
        "CPU %/call",
        "KiB/call",
        "growth KiB/call",
        "loop lag p50 ms",
        "p99 ms",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in header) + "|")
    for calls in args.calls:
        r = asyncio.run(run(args.front_end, calls, args.seconds, args.engine, core))
        print(
            f"| {calls:>5} | {r['late_pct']:>6.2f} | {r['failed']:>6.0f} | {r['cpu_pct']:>12.1f} | "
            f"{r['cpu_per_call_pct']:>10.3f} | {r['kib_per_call']:>8.1f} | "
            f"{r['growth_kib_per_call']:>15.2f} | {r['lag_p50_ms']:>15.2f} | "
            f"{r['lag_p99_ms']:>6.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
