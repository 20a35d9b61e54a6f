"""Soak: N calls at a time for H hours through several front ends, on the real engine.

Starts `stt-bridge serve` (Moonshine by default, SQLite store in a temporary data directory)
and keeps `--calls` calls live for `--hours`: each call slot places one call after another,
taking the front ends in turn (`/v1/stream` μ-law, Twilio media streams, Asterisk AudioSocket,
FreeSWITCH mod_audio_fork), each call one spoken sentence (tests/speech.py: hibari-tts + sox)
sent at real time in 20 ms frames. After each call its stored transcript is read back through
`GET /v1/calls/{id}/transcript`. Every `--interval-min` minutes it prints one row:

- calls: ended so far, failed (refused, cut off, or never stored as ended), and mismatched:
  calls whose words differ from the first call of the same sentence on the same front end
  (drift over time);
- words: words stored for the calls that ended in the interval;
- RSS (MiB, every process of the server) and RSS per live call above the idle server;
- fds and threads, every process of the server;
- late: event-loop lag samples above one 20 ms frame in the interval, and their share of the
  samples (the server's own `stt_bridge_event_loop_lag_seconds`, probed every 10 ms: a frame
  that arrived meanwhile waited that long, so it was late), and the audio
  seconds the engine's buffers dropped (`stt_bridge_audio_dropped_seconds_total`);
- store: MiB of the data directory (SQLite database and its WAL).

Flat is the goal: RSS per call, fds, threads and store growth per call the same at the end as
at the start, no late frames, no failed or mismatched calls.

    python bench/soak.py --hours 2                       # at the engine's capacity
    python bench/soak.py --calls 3 --hours 0.1 --interval-min 1   # a short trial
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ (its engine.py): the repository's packages

from telephony.audio import ulaw_decode  # noqa: E402
from tests.e2e.frontends import asterisk_call, freeswitch_call, paced  # noqa: E402
from tests.e2e.server_process import loopback_env, loopback_ports  # noqa: E402
from tests.speech import SENTENCES, phone_bytes  # noqa: E402

FRAME_BYTES = 160  # 20 ms of 8 kHz μ-law
LATE_S = 0.02  # one frame


class Server:
    """`stt-bridge serve` as a child process (ended by its PID), its /proc figures."""

    def __init__(self, engine: str, capacity: int | None) -> None:
        self.ports = loopback_ports()
        self.data_dir = Path(tempfile.mkdtemp(prefix="stt-soak-"))
        env = {
            **os.environ,
            **loopback_env(self.ports),
            "STT_BRIDGE_ENGINE_NAME": engine,
            "STT_BRIDGE_DATA_DIR": str(self.data_dir),
            "STT_BRIDGE_SIP_ENABLED": "false",
            "STT_BRIDGE_LOG_LEVEL": "warning",
            "STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S": "5",
        }
        if capacity is not None:
            env["STT_BRIDGE_ENGINE_CAPACITY"] = str(capacity)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()  # printed once every port listens
        if "stt-bridge" not in banner:
            raise SystemExit(f"the server did not start: {banner!r}")

    def pids(self) -> list[int]:
        """The server and every process under it (decoder workers)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
        found = [self.process.pid]
        for pid in found:
            found += [child for child, parent in parents.items() if parent == pid]
        return found

    def status_sum(self, key: str) -> int:
        """A /proc/PID/status field (VmRSS in KiB, Threads) summed over every process."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(f"{key}:"):
                        total += int(line.split()[1])
        return total

    def fds(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def store_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data_dir.rglob("*") if p.is_file())

    def metrics(self) -> dict[str, float]:
        """The figures this harness reads from /metrics (sums over labels)."""
        url = f"http://127.0.0.1:{self.ports['health']}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
        found = {"late": 0.0, "lag_samples": 0.0, "dropped_s": 0.0, "slots": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "stt_bridge_event_loop_lag_seconds_count":
                    found["late"] += sample.value
                    found["lag_samples"] += sample.value
                elif (
                    sample.name == "stt_bridge_event_loop_lag_seconds_bucket"
                    and sample.labels.get("le") == str(LATE_S)
                ):
                    found["late"] -= sample.value  # samples at or under one frame
                elif sample.name == "stt_bridge_audio_dropped_seconds_total":
                    found["dropped_s"] += sample.value
                elif sample.name in ("stt_bridge_slots_used", "stt_bridge_slots_free"):
                    found["slots"] += sample.value
        return found

    def stop(self) -> None:
        self.process.terminate()  # the process this harness started, by its PID
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class Tally:
    ended: int = 0
    failed: int = 0
    mismatched: int = 0
    words: int = 0  # in the current interval
    reference: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


async def stream_call(server: Server, call_id: str, ulaw: bytes) -> None:
    """A client of `/v1/stream`: μ-law frames at real time, then stop, then read to the end."""
    url = (
        f"ws://127.0.0.1:{server.ports['audio']}/v1/stream"
        f"?call_id={call_id}&encoding=mulaw&sample_rate=8000"
    )
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        frames = [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]
        async for frame in paced(frames):
            await ws.send_bytes(frame)
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass


async def twilio_media_call(server: Server, call_sid: str, ulaw: bytes) -> None:
    """Twilio's media stream: start, paced media, stop (tests/e2e/frontends.py's, any SID)."""
    start = {
        "event": "start",
        "start": {
            "streamSid": "MZ" + call_sid,
            "accountSid": "AC" + "1" * 32,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {},
        },
    }
    url = f"ws://127.0.0.1:{server.ports['audio']}/twilio/media"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_str(json.dumps(start))
        async for offset in paced(range(0, len(ulaw), FRAME_BYTES)):
            payload = base64.b64encode(ulaw[offset : offset + FRAME_BYTES]).decode()
            media = {"track": "inbound", "timestamp": str(offset // 8), "payload": payload}
            await ws.send_str(json.dumps({"event": "media", "media": media}))
        await ws.send_str(json.dumps({"event": "stop"}))
        async for _ in ws:
            pass


def slin(ulaw: bytes) -> bytes:
    return ulaw_decode(ulaw).astype("<i2").tobytes()


# front end -> (call id for the n-th call, the call itself)
FrontEnd = tuple[Callable[[int], str], Callable[[Server, str, bytes], Awaitable[object]]]
FRONT_ENDS: dict[str, FrontEnd] = {
    "stream": (lambda n: f"soak-stream-{n}", stream_call),
    "twilio": (lambda n: f"CA{uuid.uuid4().hex}", twilio_media_call),
    "audiosocket": (
        lambda n: str(uuid.uuid4()),
        lambda s, i, a: asterisk_call(s.ports["audiosocket"], uuid.UUID(i), slin(a)),
    ),
    "freeswitch": (
        lambda n: f"soak-fs-{n}",
        lambda s, i, a: freeswitch_call(f"ws://127.0.0.1:{s.ports['audio']}", i, slin(a)),
    ),
}


async def stored_words(server: Server, call_id: str, timeout_s: float = 30.0) -> list[str]:
    """The call's words once the store has it ended (the writer is a batch behind)."""
    url = f"http://127.0.0.1:{server.ports['audio']}/v1/calls/{call_id}/transcript"
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while True:
            async with http.get(url) as response:
                if response.status == 200:
                    body = await response.json()
                    if body["call"]["status"] != "live":
                        return [w["text"] for w in body["words"]]
            await asyncio.sleep(0.2)


async def call_slot(
    server: Server,
    slot: int,
    front_ends: list[str],
    audio: list[bytes],
    until: float,
    tally: Tally,
) -> None:
    """One call after another until `until`, the front ends in turn (offset by the slot)."""
    n = slot
    while time.monotonic() < until:
        name = front_ends[n % len(front_ends)]
        sentence = n % len(audio)
        make_id, place = FRONT_ENDS[name]
        call_id = make_id(n)
        try:
            await place(server, call_id, audio[sentence])
            words = await stored_words(server, call_id)
        except Exception as exc:  # counted and reported, the soak goes on
            tally.failed += 1
            tally.errors.append(f"{name} {call_id}: {exc!r}")
        else:
            tally.ended += 1
            tally.words += len(words)
            expected = tally.reference.setdefault((name, sentence), words)
            if not words or words != expected:
                tally.mismatched += 1
                tally.errors.append(f"{name} {call_id}: {' '.join(words)!r}")
        n += len(front_ends) * 1000 + 1  # distinct ids across slots, front ends still in turn


def late_pct(before: dict[str, float], now: dict[str, float]) -> float:
    samples = now["lag_samples"] - before["lag_samples"]
    return 100 * (now["late"] - before["late"]) / samples if samples else 0.0


def row(cells: list[str]) -> str:
    return " | ".join(f"{c:>9}" for c in cells)


async def soak(args: argparse.Namespace) -> int:
    audio = [phone_bytes(text, "mulaw", 8000) for text in SENTENCES[: args.sentences]]
    server = Server(args.engine, args.capacity)
    try:
        first = server.metrics()
        calls = args.calls or int(first["slots"])  # at capacity unless told
        idle_rss = server.status_sum("VmRSS")
        print(
            f"soak: {calls} calls at a time for {args.hours} h through "
            f"{', '.join(args.front_ends)}; engine {args.engine}, capacity {int(first['slots'])}; "
            f"idle RSS {idle_rss / 1024:.0f} MiB",
            flush=True,
        )
        header = [
            "min", "ended", "failed", "mismatch", "words", "RSS MiB", "MiB/call", "fds",
            "threads", "late", "dropped s", "store MiB",
        ]  # fmt: skip
        print(row(header), flush=True)
        tally = Tally()
        start = time.monotonic()
        until = start + args.hours * 3600
        slots = [
            asyncio.create_task(call_slot(server, n, args.front_ends, audio, until, tally))
            for n in range(calls)
        ]
        before = first
        tick = start
        while not all(s.done() for s in slots):
            tick += args.interval_min * 60
            await asyncio.wait(slots, timeout=max(0.0, tick - time.monotonic()))
            now = server.metrics()
            rss = server.status_sum("VmRSS")
            print(
                row(
                    [
                        f"{(time.monotonic() - start) / 60:.1f}",
                        str(tally.ended),
                        str(tally.failed),
                        str(tally.mismatched),
                        str(tally.words),
                        f"{rss / 1024:.0f}",
                        f"{(rss - idle_rss) / 1024 / calls:.1f}",
                        str(server.fds()),
                        str(server.status_sum("Threads")),
                        f"{now['late'] - before['late']:.0f} ({late_pct(before, now):.1f}%)",
                        f"{now['dropped_s'] - before['dropped_s']:.1f}",
                        f"{server.store_bytes() / 2**20:.2f}",
                    ]
                ),
                flush=True,
            )
            tally.words = 0
            before = now
        for line in tally.errors[:20]:
            print(f"  {line}")
        return 1 if tally.failed or tally.mismatched else 0
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=0, help="at a time (0: engine capacity)")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--interval-min", type=float, default=10.0, help="minutes per row")
    parser.add_argument(
        "--front-ends", nargs="+", default=list(FRONT_ENDS), choices=list(FRONT_ENDS)
    )
    parser.add_argument("--engine", default="moonshine")
    parser.add_argument("--capacity", type=int, default=None, help="engine.capacity to set")
    parser.add_argument("--sentences", type=int, default=3, help="distinct sentences, 1-6")
    sys.exit(asyncio.run(soak(parser.parse_args())))


if __name__ == "__main__":
    main()
