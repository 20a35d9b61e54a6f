"""The remote engine path against the engine in-process: added latency per word, CPU per call.

Starts two `stt-bridge serve` processes: an engine node (Moonshine on the CPU) and a front end
with `engine.name = "remote"` pointed at it. The same calls (phone speech, μ-law 8 kHz on
`/v1/stream`, paced like a phone, `--calls` at once) go first straight to the node (its engine
in-process), then through the front end (front end → `/api/asr-streaming` → node).

- latency per word: when the word reached the client, less when its last audio was sent
  (`start of the call + word end`). Added latency is the remote word's less the same word's
  (same call, same position and text) on the direct run: p50/p99 over every word.
- CPU per call: each process's CPU (its threads and child processes) over the run, divided by
  the calls and their audio: share of a core per call, and µs per 20 ms frame.

    python bench/remote.py --calls 4 --sentences 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.remote import LEAD_SILENCE_S  # noqa: E402
from tests.e2e.server_process import loopback_env, loopback_ports  # noqa: E402
from tests.speech import SENTENCES, phone_bytes  # noqa: E402

FRAME_S = 0.02
FRAME_BYTES = 160  # μ-law 8 kHz, 20 ms
GAP_S = 1.5  # silence between sentences


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


class Server:
    """`stt-bridge serve` as a process; CPU counted with its children (decoder processes)."""

    def __init__(self, **env: str) -> None:
        self.ports = loopback_ports()
        self.data_dir = tempfile.mkdtemp(prefix="stt-bench-remote-")
        environ = {
            **os.environ,
            **loopback_env(self.ports),
            "STT_BRIDGE_SIP_ENABLED": "false",
            "STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S": "1",
            "STT_BRIDGE_LOG_LEVEL": "warning",
            "STT_BRIDGE_DATA_DIR": self.data_dir,
            "STT_BRIDGE_ENGINE_CACHE_DIR": str(ROOT / ".cache" / "models"),
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve"],
            cwd=ROOT,
            env=environ,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.process.stdout.readline()  # the banner: every port listens

    def cpu_seconds(self) -> float:
        """User + system seconds of the process, its threads, and its live children."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        pids = [self.process.pid]
        for entry in Path("/proc").glob("[0-9]*"):
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == self.process.pid:
                pids.append(int(entry.name))
        for pid in pids:
            fields = _stat(pid)
            if fields is not None:
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self) -> None:
        self.process.terminate()  # the process this bench started, by its PID
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class CallResult:
    words: list[tuple[str, float, float]] = field(default_factory=list)  # text, end, latency s
    arrivals: list[float] = field(default_factory=list)  # loop time each word arrived
    reason: str = ""


async def one_call(port: int, audio: bytes, offset_s: float) -> CallResult:
    """A phone call on /v1/stream: paced μ-law, then stop; each word's latency."""
    await asyncio.sleep(offset_s)
    result = CallResult()
    url = f"ws://127.0.0.1:{port}/v1/stream?encoding=mulaw&sample_rate=8000"
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        began = loop.time()

        async def receive() -> None:
            async for msg in ws:
                event = json.loads(msg.data)
                if event["type"] == "word":
                    now = loop.time()
                    result.words.append((event["text"], event["end"], now - (began + event["end"])))
                    result.arrivals.append(now)
                elif event["type"] == "closed":
                    result.reason = event["reason"]
                    return

        receiver = asyncio.create_task(receive())
        try:
            for n, start in enumerate(range(0, len(audio), FRAME_BYTES)):
                delay = began + n * FRAME_S - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send_bytes(audio[start : start + FRAME_BYTES])
            await ws.send_str(json.dumps({"type": "stop"}))
            await asyncio.wait_for(receiver, 120)
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.reason = f"client: {type(exc).__name__}: {exc} (close {ws.close_code})"
    return result


async def watch_words(port: int, seen: list[tuple[str, float, float]]) -> None:
    """The node's own words as its `/v1/events` gives them: (text, end, loop time)."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://127.0.0.1:{port}/v1/events") as ws:
            async for msg in ws:
                event = json.loads(msg.data)
                if event.get("type") == "word":
                    seen.append((event["text"], event["end"], loop.time()))


async def run(port: int, audios: list[bytes], watch: int | None = None) -> Any:
    """The calls at once, spread over one frame as real calls are; with `watch`, that node's
    own words from its `/v1/events` meanwhile: (text, end, loop time)."""
    seen: list[tuple[str, float, float]] = []
    watcher = None if watch is None else asyncio.create_task(watch_words(watch, seen))
    await asyncio.sleep(0.5)
    share = FRAME_S / len(audios)
    results = await asyncio.gather(
        *(one_call(port, audio, i * share) for i, audio in enumerate(audios))
    )
    if watcher is not None:
        watcher.cancel()
    return results, seen


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=4, help="calls at once")
    parser.add_argument("--sentences", type=int, default=3, help="sentences per call")
    parser.add_argument("--threads", type=int, default=1, help="the node's decoding threads")
    args = parser.parse_args()

    gap = b"\xff" * int(GAP_S * 8000)  # μ-law silence
    spoken = [phone_bytes(s) for s in SENTENCES[: args.sentences]]
    audios = [
        gap.join(spoken[(i + k) % len(spoken)] for k in range(len(spoken))) + gap
        for i in range(args.calls)
    ]
    audio_s = len(audios[0]) / 8000
    node = Server(
        STT_BRIDGE_ENGINE_NAME="moonshine",
        STT_BRIDGE_ENGINE_CAPACITY=str(2 * args.calls + 2),
        STT_BRIDGE_ENGINE_THREADS=str(args.threads),
    )
    entry = f"ws://127.0.0.1:{node.ports['audio']} health=http://127.0.0.1:{node.ports['health']}"
    front = Server(STT_BRIDGE_ENGINE_NAME="remote", STT_BRIDGE_ENGINE_URLS=entry)
    cpu: dict[str, tuple[float, float]] = {}
    try:
        print(f"{args.calls} calls at once, {audio_s:.1f} s of μ-law 8 kHz each", flush=True)
        # Each path alone, the same calls. Side by side, the node's decoding threads would
        # serve whichever twin paused first (the direct call, a few ms ahead) and the remote
        # word would wait a whole decode (0.25 s with one thread): the bench, not the path.
        runs: dict[str, Any] = {}
        for name, port in (("direct", node.ports["audio"]), ("remote", front.ports["audio"])):
            node_cpu, front_cpu = node.cpu_seconds(), front.cpu_seconds()
            watch = node.ports["audio"] if name == "remote" else None
            runs[name] = asyncio.run(run(port, audios, watch))
            cpu[name] = (node.cpu_seconds() - node_cpu, front.cpu_seconds() - front_cpu)
    finally:
        front.stop()
        node.stop()

    (direct, _), (remote, seen) = runs["direct"], runs["remote"]
    for name, results in (("direct", direct), ("remote", remote)):
        bad = [r.reason for r in results if r.reason != "flushed"]
        if bad:
            print(f"{name}: calls ended {bad}")
    added: list[float] = []
    matched = total = 0
    for d, r in zip(direct, remote, strict=True):
        total += len(r.words)
        for (dt, _, dl), (rt, _, rl) in zip(d.words, r.words, strict=False):
            if dt == rt:
                matched += 1
                added.append(rl - dl)
    # The way back: a remote word reaches the client this long after the node emitted it,
    # against the node's own /v1/events subscriber (same clock, this process).
    hops: list[float] = []
    for r in remote:
        for (text, end, _), arrived in zip(r.words, r.arrivals, strict=True):
            node_end = end + LEAD_SILENCE_S
            times = [t for w, e, t in seen if w == text and abs(e - node_end) < 0.005]
            if len(times) == 1:
                hops.append(arrived - times[0])
    lat = {
        "direct": [w[2] for res in direct for w in res.words],
        "remote": [w[2] for res in remote for w in res.words],
    }
    print(f"words: {total} remote, {matched} matched the direct call's word for word")
    print(f"{len(hops)} remote words told apart among the node's own words")
    print()
    print("| latency per word (s)                      | p50    | p99    |")
    print("|-------------------------------------------|--------|--------|")
    for name in ("direct", "remote"):
        label = f"{name}: end of the word's audio → client"
        print(f"| {label:41} | {pct(lat[name], 50):6.3f} | {pct(lat[name], 99):6.3f} |")
    p50 = pct(lat["remote"], 50) - pct(lat["direct"], 50)
    p99 = pct(lat["remote"], 99) - pct(lat["direct"], 99)
    print(f"| {'added: remote less direct, all words':41} | {p50:6.3f} | {p99:6.3f} |")
    rows = [
        ("added: remote less direct, same word", added),
        ("added on the way back: node → client", hops),
    ]
    for label, values in rows:
        print(f"| {label:41} | {pct(values, 50):6.3f} | {pct(values, 99):6.3f} |")
    print()
    frames = args.calls * audio_s / FRAME_S
    print("| CPU per call                     | share of a core | µs per 20 ms frame |")
    print("|----------------------------------|-----------------|--------------------|")
    rows_cpu = [
        ("node, direct (engine in-process)", cpu["direct"][0]),
        ("node, serving the remote path", cpu["remote"][0]),
        ("front end, remote engine", cpu["remote"][1]),
    ]
    for label, seconds in rows_cpu:
        share = seconds / args.calls / audio_s * 100
        print(f"| {label:32} | {share:14.2f}% | {seconds / frames * 1e6:18.0f} |")


if __name__ == "__main__":
    main()
