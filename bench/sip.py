"""How many real-time SIP calls the asyncio backend carries on one core (engine stubbed).

sipp places N calls (50 new calls a second) that each stream a hibari sentence three times
over as real-time 20 ms PCMU RTP (sipp's rtp_stream, tests/e2e/sipp/uac_stream.xml), then
hang up, against an in-process service with the sink engine (takes audio, emits no words). The
service process is pinned to one CPU core and sipp to another where there is one. Measured in
the service: CPU seconds per second of call audio (% of a core per call); late frames: how
often a 20 ms ticker on the event loop ran more than one frame (20 ms) late, i.e. RTP waiting
that long to be handled, and the worst such lag; RTP packets handled more than 20 ms behind
the schedule their timestamps set (from each call's earliest packet: sipp's own sending
jitter is in this figure); and the shortest audio any call delivered (short = lost/dropped).

    python bench/sip.py [--no-pin] [N ...]       (default: 10 30 60 100 150 200)
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import struct
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.app import Service
from api.config import DataConfig, ServerConfig, SipConfig, load_config
from engine.config import EngineConfig
from telephony.sip import core
from tests.e2e.frontends import watch_events
from tests.e2e.sip_peers import sipp
from tests.speech import SENTENCES, phone_bytes

LOOPS = 3  # as in uac_stream.xml
RATE = 50  # new calls per second
SPEECH = phone_bytes(SENTENCES[0], "mulaw")
AUDIO_S = LOOPS * (-(-len(SPEECH) // 160) * 160) / 8000  # rtp_stream pads the last packet

LATE_S = 0.020
SERVICE_CORE = 0

# (call id) -> [(handled at, RTP timestamp)], filled while a run lasts.
arrivals: dict[str, list[tuple[float, int]]] = defaultdict(list)
_feed_rtp = core.SipCall.feed_rtp


def timed_feed_rtp(self: core.SipCall, leg: str, datagram: bytes) -> None:
    if len(datagram) >= 12 and datagram[1] & 0x7F != 101:  # audio, not telephone-event
        arrivals[self.id].append((time.perf_counter(), struct.unpack_from("!I", datagram, 4)[0]))
    _feed_rtp(self, leg, datagram)


core.SipCall.feed_rtp = timed_feed_rtp  # type: ignore[method-assign]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def late_packets() -> tuple[int, int, float]:
    """(late packets, all packets, worst lateness in s) over every call of the run."""
    late = total = 0
    worst = 0.0
    for packets in arrivals.values():
        offsets = [at - ts / 8000 for at, ts in packets]
        base = min(offsets)
        for offset in offsets:
            lateness = offset - base
            worst = max(worst, lateness)
            late += lateness > LATE_S
        total += len(packets)
    return late, total, worst


async def run(calls: int, data_dir: str) -> dict[str, Any]:
    base = load_config(environ={})
    low = 36000
    config = dataclasses.replace(
        base,
        server=ServerConfig(host="127.0.0.1", port=0, health_port=0, web_port=0),
        data=DataConfig(dir=data_dir),
        engine=EngineConfig(name="sink", capacity=calls + 10),
        sip=SipConfig(
            enabled=True, host="127.0.0.1", port=0, rtp_port_min=low, rtp_port_max=low + 3999
        ),
    )
    arrivals.clear()
    service = Service(config)
    await service.start()
    lag = 0.0
    ticks = late_ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag, ticks, late_ticks
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.02)
            late = time.perf_counter() - before - 0.02
            lag = max(lag, late)
            ticks += 1
            late_ticks += late > LATE_S

    tick = asyncio.create_task(ticker())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with watch_events(service) as log:
                start = cpu_s()
                (Path(tmp) / "speech.ulaw").write_bytes(SPEECH)
                result = await sipp(
                    service,
                    Path(tmp),
                    "-m", str(calls), "-l", str(calls), "-r", str(RATE),
                    "-d", str(int(AUDIO_S * 1000) + 300),
                    scenario="uac_stream.xml",
                    timeout_s=180,
                    cpus=set(os.sched_getaffinity(0)) - {SERVICE_CORE},
                )  # fmt: skip
                ended = await log.wait_ended(calls, timeout=60)
                used = cpu_s() - start
    finally:
        stop.set()
        await tick
        await service.stop(drain_timeout_s=0)
    late, total, worst_late = late_packets()
    return {
        "calls": calls,
        "cpu_per_call": used / (calls * AUDIO_S),
        "late": late,
        "packets": total,
        "worst_late_ms": worst_late * 1000,
        "lag_ms": lag * 1000,
        "late_ticks": late_ticks,
        "ticks": ticks,
        "min_audio_s": min(e["audio_s"]["caller"] for e in ended.values()),
        "failed": calls - len(ended) + (1 if result.returncode else 0),
    }


async def main(sizes: list[int], pin: bool) -> None:
    if pin and SERVICE_CORE in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {SERVICE_CORE})  # the service: one core (sipp is moved off it)
    print(
        "| calls | CPU per call (% of a core) | late frames: loop > 20 ms late "
        "| worst loop lag (ms) | RTP > 20 ms behind its timestamp (sipp's jitter included) "
        "| worst (ms) | min audio (s) | failed |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as data_dir:
        await run(2, data_dir)  # warm-up, not shown: first-call imports, the store's first write
        for calls in sizes:
            r = await run(calls, data_dir)
            print(
                f"| {r['calls']} | {r['cpu_per_call'] * 100:.2f} "
                f"| {r['late_ticks']} / {r['ticks']} ({r['late_ticks'] / max(r['ticks'], 1):.2%}) "
                f"| {r['lag_ms']:.1f} "
                f"| {r['late']} / {r['packets']} ({r['late'] / max(r['packets'], 1):.2%}) "
                f"| {r['worst_late_ms']:.1f} | {r['min_audio_s']:.2f} | {r['failed']} |",
                flush=True,
            )
    print(
        f"\n(each call: {AUDIO_S:.2f} s of PCMU in 20 ms packets, {RATE} new calls/s; service on "
        + (f"core {SERVICE_CORE}, sipp on the others" if pin else "any core (--no-pin)")
        + f"; {os.cpu_count()} cores on this machine, shared)"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    pin = "--no-pin" not in args  # --no-pin: let the scheduler place the service
    sizes = [int(a) for a in args if a != "--no-pin"] or [10, 30, 60, 100, 150, 200]
    asyncio.run(main(sizes, pin))
