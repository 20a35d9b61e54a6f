"""How many real-time SIP calls the asyncio backend carries on one core (engine stubbed).

sipp places N concurrent `uac_pcap` calls (7.08 s of 30 ms PCMA RTP each, then DTMF, BYE)
against an in-process service with the sink engine. Measured in the service's process: CPU
seconds per call-second of audio, the worst event-loop lag (a 20 ms ticker: how late RTP
would be handled), and the audio each call delivered (short = packets lost or dropped).

    python bench/sip.py [N ...]       (default: 10 30 60 100)
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.app import Service
from api.config import EngineConfig, ServerConfig, SipConfig, load_config
from tests.e2e.sip_peers import events_until_ended, sipp, sipp_dir

AUDIO_S = 7.08


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(calls: int) -> tuple[float, float, float, int]:
    base = load_config(environ={})
    config = dataclasses.replace(
        base,
        server=ServerConfig(host="127.0.0.1", port=0, health_port=0, web_port=0),
        engine=EngineConfig(name="sink", capacity=calls + 10),
        sip=SipConfig(
            enabled=True, host="127.0.0.1", port=0, rtp_port_min=36000, rtp_port_max=37999
        ),
    )
    service = Service(config)
    await service.start()
    lag = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.02)
            lag = max(lag, time.perf_counter() - before - 0.02)

    tick = asyncio.create_task(ticker())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with aiohttp.ClientSession() as http:
                url = f"ws://127.0.0.1:{service.ports['audio']}/v1/events"
                async with http.ws_connect(url) as ws:
                    start = cpu_s()
                    result = await sipp(
                        service, sipp_dir(Path(tmp)), "-sn", "uac_pcap",
                        "-m", str(calls), "-l", str(calls), "-r", str(calls),
                        timeout_s=120,
                    )  # fmt: skip
                    events = await events_until_ended(ws, calls=calls, timeout_s=60)
                    used = cpu_s() - start
    finally:
        stop.set()
        await tick
        await service.stop(drain_timeout_s=0)
    ended = [e for e in events if e["type"] == "call_ended"]
    worst_audio = min(e["audio_s"]["caller"] for e in ended)
    failed = calls - len(ended) + (1 if result.returncode else 0)
    return used / (calls * AUDIO_S), lag * 1000, worst_audio, failed


async def main(sizes: list[int]) -> None:
    print("| calls | CPU per call (% of a core) | worst loop lag (ms) | min audio (s) | failed |")
    print("|---:|---:|---:|---:|---:|")
    for calls in sizes:
        per_call, lag_ms, worst, failed = await run(calls)
        print(f"| {calls} | {per_call * 100:.2f} | {lag_ms:.1f} | {worst:.2f} | {failed} |")
    print(f"\n(each call: {AUDIO_S} s of PCMA at 30 ms packets; sipp runs on the same machine)")


if __name__ == "__main__":
    asyncio.run(main([int(a) for a in sys.argv[1:]] or [10, 30, 60, 100]))
