"""Load harness: N concurrent real-time calls against the real server process.

Starts `stt-bridge serve` as a subprocess (pinned to one core with `--server-core`; engine =
sink by default: it consumes audio and emits nothing, so this measures the bridge alone), then
places N calls over one front end from this process (pinned to another core). Every call sends
a 20 ms frame every 20 ms like a phone; calls are spread evenly over the 20 ms, as real calls
are. The client is a few lines of raw WebSocket/TCP on asyncio (frames encoded once, one timer
for every call), so it stays far below the bridge's cost per frame and the figures are the
bridge's.

What it reports, per run:

- added latency, frame → engine push: every call sends a WebSocket ping after every 50th audio
  frame (1/s; the calls' pings spread evenly over the second, as their frames are over the
  20 ms). The bridge answers a ping in order, after the frames before it have been read
  and pushed to the engine (with the sink engine the push is synchronous), so the round trip is
  the delay a frame sees in the bridge, plus two loopback hops. p50/p99 over all pings.
- late frames: the share of those pings that came back more than one frame (20 ms) late: the
  bridge was behind by more than a frame. `client late` counts frames this client itself sent
  more than 20 ms after their due time (if not 0, the figure says more about the client).
- engine event → client: after the last frame each call says stop (the calls hang up one
  after another over 5 s); the bridge flushes the stream, the engine emits `Closed` and the
  bridge sends it back (or closes the socket). The time from stop to that answer, p50/p99.
- dropped: audio the engine buffers dropped (from /metrics), and calls that failed.
- server CPU: share of one core the bridge used (and the kernel's part of it: socket reads,
  epoll), and per call, while every call was live;
  `waited for CPU`: the share of that time the bridge's event loop was ready to run but the core
  was busy with another process (noise from a shared machine: with it above a few %, the
  latency columns measure the neighbours, not the bridge).
- client CPU: share of one core this client used meanwhile (what the calls' senders cost: on
  a machine of two cores, the bridge has what the client leaves).
- memory: RSS growth per call once every call is up, and its growth per call over the rest of
  the run (flat = no leak; run long with `--seconds 300`).
- server loop lag p99: the bridge's own event-loop lag histogram (`/metrics`), bucket bound.

    python bench/load.py --front-end stream --calls 100 500 1000 --seconds 30
    python bench/load.py --find-max --calls 1000 --seconds 20   # most calls, zero late frames
    python bench/load.py --workers 2 --server-cores 0,1 --client-cores 1 --find-max \
        --max-late-pct 0.1   # server.workers = 2; CPU and waits summed over every process

- CPU per frame: the bridge's CPU time (every process of it) over the 20 ms frames the calls
  sent meanwhile, in µs: on a shared machine the steady figure, when late frames are noise.

front ends: ws (raw 24 kHz on /), stream (μ-law 8 kHz on /v1/stream), deepgram (μ-law 8 kHz
on /v1/listen), audiosocket, twilio, freeswitch, and the carriers telnyx, signalwire, plivo,
exotel, vonage, jambonz (each its default codec), and Genesys AudioHook (PCMU mono, 20 ms
binary frames for comparison, where Genesys sends 200 ms; unsigned: the bench's bridge has no
keys). AudioSocket has no ping: its latency columns
are empty; loop lag still applies, and `--find-max` takes a loop lag p99 of at most half a
frame (10 ms) as on time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ (its engine.py): the repository's packages

from tests.e2e.server_process import loopback_env, loopback_ports  # noqa: E402

FRAME_S = 0.02
SLOTS = 20  # the 20 ms frame period in 1 ms slots; each call sends in one of them
PING_EVERY = 50  # frames: one ping per second per call
BATCH_FRAMES = 4  # 20 ms frames in the bridge's 80 ms batch
END_SPREAD_S = 5.0  # calls hang up one after another over this long
LAG_OK_MS = 1000 * FRAME_S / 2  # --find-max without pings: the loop's lag p99 bucket bound
MAX_STARVED_PCT = 5.0  # --find-max repeats a probe when the bridge waited for its core longer


class Server:
    def __init__(self, engine: str, cores: str | None, calls: int, workers: int = 1) -> None:
        self.ports = loopback_ports()
        self.data_dir = tempfile.mkdtemp(prefix="stt-bench-")
        env = {
            **os.environ,
            **loopback_env(self.ports),
            "STT_BRIDGE_ENGINE_NAME": engine,
            "STT_BRIDGE_ENGINE_CAPACITY": str(max(16, calls + 10)),
            "STT_BRIDGE_SERVER_DRAIN_TIMEOUT_S": "1",
            "STT_BRIDGE_LOG_LEVEL": "warning",
            "STT_BRIDGE_DATA_DIR": self.data_dir,
            "STT_BRIDGE_SERVER_WORKERS": str(workers),
            "STT_BRIDGE_LIMITS_CONNECTIONS_PER_IP": str(calls + 100),  # every call from here
            "STT_BRIDGE_LIMITS_CONNECTIONS_TOTAL": str(calls + 100),
        }
        command = [sys.executable, "-m", "api.cli", "serve"]
        if cores is not None:
            command = ["taskset", "-c", cores, *command]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.process.stdout.readline()  # the banner: every port listens

    def cpu_seconds(self) -> float:
        user, kernel = self.cpu_split()
        return user + kernel

    def pids(self) -> list[int]:
        """The server and every process under it (workers, the engine process)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[1])
        found = [self.process.pid]
        for pid in found:
            found += [child for child, parent in parents.items() if parent == pid]
        return found

    def cpu_split(self) -> tuple[float, float]:
        """Seconds of CPU the bridge used in user space and in the kernel (sockets, epoll), all
        its processes together."""
        tick = os.sysconf("SC_CLK_TCK")
        user = kernel = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            user += int(fields[11]) / tick
            kernel += int(fields[12]) / tick
        return user, kernel

    def run_queue_wait_s(self) -> float:
        """Time the event loops' threads were ready to run but another process had the core."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
        return total

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports['health']}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text: str = response.read().decode()
            return text

    def stop(self) -> None:
        self.process.terminate()  # the process this harness started, by its PID
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --- a minimal WebSocket client: RFC 6455 frames, masked with a zero key (legal, and free) ----


def ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + b"\0\0\0\0" + payload  # XOR with a zero key leaves the payload as it is


TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class Results:
    client_late: int = 0
    sent: int = 0
    failed: int = 0
    pings: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)


class CallConnection(asyncio.Protocol):
    """One call's socket: sends what the ticker gives it, times pongs and the end."""

    def __init__(self, results: Results, websocket: bool) -> None:
        self.results = results
        self.websocket = websocket
        self.transport: asyncio.Transport | None = None
        self.ready = asyncio.get_running_loop().create_future()
        self.done = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.upgraded = not websocket
        self.ping_sent: dict[int, float] = {}
        self.stop_sent_at: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.websocket:
            self.ready.set_result(None)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def ping(self, seq: int) -> None:
        self.ping_sent[seq] = time.perf_counter()
        self.write(ws_frame(PING, struct.pack("!Q", seq)))

    def stop(self, message: bytes) -> None:
        self.stop_sent_at = time.perf_counter()
        self.write(message)

    def _ended(self) -> None:
        if self.stop_sent_at is not None and not self.done.done():
            self.results.ends.append(time.perf_counter() - self.stop_sent_at)
        if not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            del self.buffer[: end + 4]
            if b" 101 " not in status:
                self.ready.set_exception(ConnectionError(status.decode(errors="replace")))
                return
            self.upgraded = True
            self.ready.set_result(None)
        if not self.websocket:
            self.buffer.clear()  # AudioSocket: the bridge only ever says hangup
            return
        while len(self.buffer) >= 2:
            opcode, length, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                length, start = struct.unpack_from("!H", self.buffer, 2)[0], 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                length, start = struct.unpack_from("!Q", self.buffer, 2)[0], 10
            if len(self.buffer) < start + length:
                return
            payload = bytes(self.buffer[start : start + length])
            del self.buffer[: start + length]
            if opcode == PONG and len(payload) == 8:
                sent = self.ping_sent.pop(struct.unpack("!Q", payload)[0], None)
                if sent is not None:
                    self.results.pings.append(time.perf_counter() - sent)
            elif opcode == TEXT and b'"closed"' in payload:
                self._ended()
            elif opcode == CLOSE:
                self._ended()
                self.write(ws_frame(CLOSE, payload[:2]))
                if self.transport is not None:
                    self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the upgrade"))


@dataclass
class FrontEnd:
    """How one front end is reached, what a 20 ms frame is, and how a call ends."""

    port: str
    path: str
    frame: bytes  # one 20 ms frame on the wire (WebSocket: already framed)
    stop: bytes
    protocol: str = ""
    numbered: Callable[[int], bytes] | None = None  # a frame that carries its number

    def frame_at(self, n: int) -> bytes:
        return self.frame if self.numbered is None else self.numbered(n)

    @property
    def websocket(self) -> bool:
        return bool(self.path)


def front_end(name: str) -> FrontEnd:
    if name == "ws":
        return FrontEnd(
            "audio", "/", ws_frame(BINARY, bytes(960)), ws_frame(TEXT, b'{"type":"stop"}')
        )
    if name == "stream":
        return FrontEnd(
            "audio",
            "/v1/stream?encoding=mulaw&sample_rate=8000",
            ws_frame(BINARY, b"\xff" * 160),
            ws_frame(TEXT, b'{"type":"stop"}'),
        )
    if name == "deepgram":
        return FrontEnd(
            "audio",
            "/v1/listen?encoding=mulaw&sample_rate=8000",
            ws_frame(BINARY, b"\xff" * 160),
            ws_frame(TEXT, b'{"type":"CloseStream"}'),
        )
    if name == "twilio":
        payload = base64.b64encode(b"\xff" * 160).decode()

        def media(n: int) -> bytes:
            message = (
                f'{{"event":"media","media":{{"track":"inbound","timestamp":"{n * 20}",'
                f'"payload":"{payload}"}}}}'
            )
            return ws_frame(TEXT, message.encode())

        return FrontEnd(
            "audio", "/twilio/media", media(0), ws_frame(TEXT, b'{"event":"stop"}'), numbered=media
        )
    if name == "freeswitch":
        return FrontEnd(
            "audio",
            "/freeswitch/{id}?mix=mono&rate=8000",
            ws_frame(BINARY, bytes(320)),
            ws_frame(BINARY, b""),  # mod_audio_fork's graceful shutdown
            protocol="audio.drachtio.org",
        )
    if name == "audiosocket":
        return FrontEnd("audiosocket", "", b"\x10\x01\x40" + bytes(320), b"\x00\x00\x00")
    if name in CARRIER_FRAMES:
        return carrier_front_end(name)
    if name == "audiohook":  # the call ends by a close frame: `close` carries the session id
        close = ws_frame(CLOSE, struct.pack("!H", 1000))
        return FrontEnd("audio", "/audiohook", ws_frame(BINARY, b"\xff" * 160), close)
    raise ValueError(name)


# The carriers' media messages as each sends 20 ms of its default codec (carriers.md): {n} is
# the frame's number. Exotel sends ~100 ms per message; 20 ms here, so the CPU per 20 ms frame
# compares with the others'.
_ULAW = base64.b64encode(b"\xff" * 160).decode()
_L16_8K = base64.b64encode(bytes(320)).decode()
CARRIER_FRAMES: dict[str, tuple[str, int, str]] = {
    "telnyx": (
        "/telnyx/media",
        TEXT,
        '{{"event":"media","sequence_number":"{n}","media":{{"track":"inbound","chunk":"{n}",'
        '"timestamp":"{ms}","payload":"' + _ULAW + '"}},"stream_id":"6B1F2C3D-4E5F-4A6B"}}',
    ),
    "signalwire": (
        "/signalwire/media",
        TEXT,
        '{{"event":"media","sequenceNumber":"{n}","media":{{"track":"inbound","chunk":"{n}",'
        '"timestamp":"{ms}","payload":"' + _ULAW + '"}}}}',
    ),
    "plivo": (
        "/plivo/media",
        TEXT,
        '{{"event":"media","sequenceNumber":{n},"streamId":"b2e9d4c1-7a3f","media":{{"track":'
        '"inbound","timestamp":"{ms}","chunk":{n},"payload":"' + _L16_8K + '"}},'
        '"extra_headers":"ticket=T4411"}}',
    ),
    "exotel": (
        "/exotel/media",
        TEXT,
        '{{"event":"media","sequence_number":{n},"stream_sid":"a4f3c2b1d0e9","media":{{"chunk":'
        '{n},"timestamp":"{ms}","payload":"' + _L16_8K + '"}}}}',
    ),
    "vonage": ("/vonage/media", BINARY, ""),  # 640 B: 20 ms of L16 at 16 kHz
    "jambonz": ("/jambonz/listen", BINARY, ""),  # 320 B: 20 ms of L16 at 8 kHz, mono
}
CARRIER_STOPS: dict[str, bytes] = {
    "telnyx": ws_frame(TEXT, b'{"event":"stop","stop":{}}'),
    "signalwire": ws_frame(TEXT, b'{"event":"stop","sequenceNumber":"1"}'),
    "exotel": ws_frame(TEXT, b'{"event":"stop","stop":{"reason":"callended"}}'),
    "plivo": ws_frame(CLOSE, struct.pack("!H", 1000)),  # Plivo and Vonage just close
    "vonage": ws_frame(CLOSE, struct.pack("!H", 1000)),
    "jambonz": ws_frame(BINARY, b""),  # mod_audio_fork's graceful shutdown
}


def carrier_front_end(name: str) -> FrontEnd:
    path, opcode, template = CARRIER_FRAMES[name]
    if opcode == BINARY:
        frame = ws_frame(BINARY, bytes(640 if name == "vonage" else 320))
        protocol = "audio.jambonz.org" if name == "jambonz" else ""
        return FrontEnd("audio", path, frame, CARRIER_STOPS[name], protocol=protocol)

    def media(n: int) -> bytes:
        return ws_frame(TEXT, template.format(n=n + 2, ms=n * 20).encode())

    return FrontEnd("audio", path, media(0), CARRIER_STOPS[name], numbered=media)


def carrier_start(name: str, call_id: uuid.UUID) -> str:
    """Each carrier's first message (carriers.md), with the call's own id."""
    hex_id = call_id.hex
    if name == "telnyx":
        return (
            '{"event":"start","sequence_number":"1","start":{"call_control_id":"v3:' + hex_id + '",'
            '"from":"+13125550143","to":"+13125550177","custom_parameters":{"ticket":"T4411"},'
            '"media_format":{"encoding":"PCMU","sample_rate":8000,"channels":1}},'
            '"stream_id":"6B1F2C3D-4E5F-4A6B"}'
        )
    if name == "signalwire":
        return (
            '{"event":"start","sequenceNumber":"1","start":{"streamSid":"' + hex_id + '",'
            '"callSid":"' + str(call_id) + '","tracks":["inbound"],"customParameters":'
            '{"ticket":"T4411"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000}}}'
        )
    if name == "plivo":
        return (
            '{"event":"start","sequenceNumber":1,"start":{"callId":"' + str(call_id) + '",'
            '"streamId":"b2e9d4c1-7a3f","tracks":["inbound"],"mediaFormat":{"encoding":'
            '"audio/x-l16","sampleRate":8000}},"extra_headers":"ticket=T4411"}'
        )
    if name == "exotel":
        return (
            '{"event":"start","sequence_number":1,"stream_sid":"a4f3c2b1d0e9","start":'
            '{"stream_sid":"a4f3c2b1d0e9","call_sid":"' + hex_id + '","from":"+919876543210",'
            '"custom_parameters":{"ticket":"T4411"},"media_format":{"encoding":"raw",'
            '"sample_rate":"8000","bit_rate":"128"}}}'
        )
    if name == "vonage":
        return (
            '{"event":"websocket:connected","content-type":"audio/l16;rate=16000","uuid":"'
            + str(call_id)
            + '","from":"447700900001","ticket":"T4411"}'
        )
    return (
        '{"sampleRate":8000,"mixType":"mono","callSid":"' + str(call_id) + '","direction":'
        '"inbound","from":"+15083084809","to":"+15082139445","ticket":"T4411"}'
    )


FRONT_ENDS = (
    "ws",
    "stream",
    "deepgram",
    "audiosocket",
    "twilio",
    "freeswitch",
    *CARRIER_FRAMES,
    "audiohook",
)
AUDIOHOOK_ORG = "d7934305-0972-4844-938e-9060eef73d05"


def hello(fe: FrontEnd, name: str, port: int) -> tuple[bytes, bytes]:
    """What opens a call: the upgrade (or AudioSocket's UUID), then a first message, if any."""
    call_id = uuid.uuid4()
    if not fe.websocket:
        return b"\x01\x00\x10" + call_id.bytes, b""
    path = fe.path.replace("{id}", str(call_id))
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: " + base64.b64encode(call_id.bytes).decode(),
        "Sec-WebSocket-Version: 13",
    ]
    if fe.protocol:
        lines.append(f"Sec-WebSocket-Protocol: {fe.protocol}")
    if name == "audiohook":
        lines += [
            f"Audiohook-Session-Id: {call_id}",
            f"Audiohook-Organization-Id: {AUDIOHOOK_ORG}",
            f"Audiohook-Correlation-Id: {uuid.uuid4()}",
        ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    if name == "twilio":
        sid = f"CA{call_id.hex}"
        start = (
            f'{{"event":"start","start":{{"callSid":"{sid}","streamSid":"MZ{call_id.hex}",'
            '"tracks":["inbound"]}}'
        )
        return request, start.encode()
    if name in CARRIER_FRAMES:
        return request, carrier_start(name, call_id).encode()
    if name == "audiohook":
        return request, audiohook_open(call_id).encode()
    return request, b""


def audiohook_open(call_id: uuid.UUID) -> str:
    """Genesys's `open` (audiohook.md): one PCMU channel, the customer."""
    return (
        '{"version":"2","id":"' + str(call_id) + '","type":"open","seq":1,"serverseq":0,'
        '"position":"PT0S","parameters":{"organizationId":"' + AUDIOHOOK_ORG + '",'
        '"conversationId":"'
        + str(uuid.uuid4())
        + '","participant":{"id":"'
        + str(uuid.uuid4())
        + '","ani":"+13125550143"},"media":[{"type":"audio","format":"PCMU",'
        '"channels":["external"],"rate":8000}],"language":"en-US"}}'
    )


@dataclass
class Call:
    connection: CallConnection
    slot: int
    frames_left: int
    sent: int = 0
    ping_phase: int = 0  # which frame of every PING_EVERY is followed by a ping
    wait: int = 0  # frame periods to wait before the first frame


async def open_call(
    fe: FrontEnd,
    name: str,
    server: Server,
    results: Results,
    frames: int,
    n: int,
    mass_start: bool = False,
) -> Call | None:
    loop = asyncio.get_running_loop()
    port = server.ports[fe.port]
    try:
        _, connection = await loop.create_connection(
            lambda: CallConnection(results, fe.websocket), "127.0.0.1", port
        )
        request, first = hello(fe, name, port)
        connection.write(request)
        await asyncio.wait_for(connection.ready, 30)
        if first:
            connection.write(ws_frame(TEXT, first))
    except (OSError, ConnectionError, TimeoutError):
        results.failed += 1
        return None
    # Real calls start at random times, so each has its own phase in every period the bridge
    # works in. Call n sends in 1 ms slot n % SLOTS of the 20 ms; it starts 0-3 frames late, so
    # its 80 ms batches (one resampling per call: ResampleStream.BATCH_S) are spread like real
    # calls' instead of every call's falling in the same 20 ms (at 625 calls, 30 ms of work
    # every 80 ms in one 20 ms window: late frames at 60 % of a core); and it pings after frame
    # n // SLOTS of every PING_EVERY, not all calls in the same 20 ms of each second.
    # --mass-start: every call's first frame in the same 20 ms (a mass reconnect after a
    # network blip), so only the bridge's own batch phase (telephony/audio.py batch_phase)
    # keeps their 80 ms batches apart.
    phase = n // SLOTS
    wait = 0 if mass_start else phase % BATCH_FRAMES
    return Call(connection, n % SLOTS, frames, ping_phase=phase % PING_EVERY, wait=wait)


async def ticker(calls: list[Call], fe: FrontEnd, results: Results) -> None:
    """One timer for every call: each 1 ms slot sends the frame of the calls in that slot."""
    loop = asyncio.get_running_loop()
    by_slot: list[list[Call]] = [[] for _ in range(SLOTS)]
    for call in calls:
        by_slot[call.slot].append(call)
    start = loop.time()
    tick = 0
    while any(by_slot):
        due = start + tick * FRAME_S / SLOTS
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late = -delay > FRAME_S
        live = by_slot[tick % SLOTS]
        for call in list(live):
            if call.wait:
                call.wait -= 1
                continue
            connection = call.connection
            connection.write(fe.frame_at(call.sent))
            call.sent += 1
            results.sent += 1
            results.client_late += late
            if fe.websocket and call.sent % PING_EVERY == call.ping_phase:
                connection.ping(call.sent)
            if call.sent >= call.frames_left:
                connection.stop(fe.stop)
                live.remove(call)
        tick += 1


def histogram_quantile(metrics: str, name: str, q: float) -> float | None:
    """The upper bound of the bucket holding quantile q of a Prometheus histogram."""
    buckets = [
        (float(sample.labels["le"]), float(sample.value))
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == f"{name}_bucket"
    ]
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return None


def metric_value(metrics: str, name: str) -> float:
    """An unlabelled sample's value in Prometheus text (0 where there is none yet)."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return 0.0


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def start_profiler(server: Server, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on the server (every process of it), sampling for `seconds`: collapsed stacks
    ("raw") in `out`, summarised by `print_profile`."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("--profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return None
    command = [py_spy, "record", "--pid", str(server.process.pid), "--subprocesses"]
    command += ["--duration", str(max(1, int(seconds))), "--rate", "200", "--nonblocking"]
    command += ["--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def print_profile(path: Path, top: int = 25) -> None:
    """The profile's top lines: share of the samples in each function itself, and under it."""
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")[1:]  # the first is the process
        if not frames:
            continue
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            under[frame] = under.get(frame, 0) + n
    print(f"\nprofile: {total} samples while busy ({path})")
    for title, table in (("self", own), ("inclusive", under)):
        print(f"\n| {title} % | function |\n|---|---|")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"| {100 * n / max(1, total):.1f} | {frame} |")


async def run(
    name: str,
    calls: int,
    seconds: float,
    engine: str,
    cores: str | None,
    workers: int = 1,
    profile: Path | None = None,
    mass_start: bool = False,
) -> dict[str, float | None]:
    server = Server(engine, cores, calls, workers)
    fe = front_end(name)
    results = Results()
    frames = int(seconds / FRAME_S)
    try:
        await asyncio.sleep(0.5)
        rss_idle = server.rss_kib()
        # Calls end spread over END_SPREAD_S after `seconds` (real calls do not hang up
        # together), so "engine event → client" is not one burst of N flushes.
        extra = int(END_SPREAD_S / FRAME_S)
        opened = await asyncio.gather(
            *(
                open_call(fe, name, server, results, frames + n * extra // calls, n, mass_start)
                for n in range(calls)
            )
        )
        live = [c for c in opened if c is not None]
        await asyncio.sleep(0.5)  # every call started on the bridge
        rss_up = server.rss_kib()
        cpu0, wall0, wait0 = server.cpu_seconds(), time.monotonic(), server.run_queue_wait_s()
        client0 = time.process_time()
        kernel0 = server.cpu_split()[1]
        rss_samples: list[int] = []

        async def sample() -> None:  # RSS at a quarter and near the end of the calls
            await asyncio.sleep(seconds / 4)
            rss_samples.append(server.rss_kib())
            await asyncio.sleep(seconds * 0.7)
            rss_samples.append(server.rss_kib())

        # The client's own cyclic GC pauses (40-90 ms with a thousand connections) would read as
        # the bridge's latency: collect now, then not during the calls.
        gc.collect()
        gc.disable()
        sampler = asyncio.create_task(sample())
        profiler = None if profile is None else start_profiler(server, seconds * 0.8, profile)
        steady = asyncio.create_task(asyncio.sleep(seconds * 0.95))
        sending = asyncio.create_task(ticker(live, fe, results))
        await steady
        wall = time.monotonic() - wall0
        cpu = (server.cpu_seconds() - cpu0) / wall
        client_cpu = (time.process_time() - client0) / wall
        kernel = (server.cpu_split()[1] - kernel0) / wall
        starved = (server.run_queue_wait_s() - wait0) / wall
        await sending
        await sampler
        if profiler is not None:
            await asyncio.to_thread(profiler.wait)
        ends = [c.connection.done for c in live]
        if ends:
            _, pending = await asyncio.wait(ends, timeout=60)
            results.failed += len(pending)
        metrics = await asyncio.to_thread(server.metrics)
        for call in live:
            if call.connection.transport is not None:
                call.connection.transport.close()
    finally:
        gc.enable()
        server.stop()
    late = sum(1 for p in results.pings if p > FRAME_S)
    ping_p50 = quantile(results.pings, 0.5)
    return {
        "calls": calls,
        "late_pct": 100 * late / len(results.pings) if results.pings else None,
        "client_late_pct": 100 * results.client_late / max(1, results.sent),
        "dropped_s": metric_value(metrics, "stt_bridge_audio_dropped_seconds_total"),
        "failed": results.failed,
        "cpu_pct": 100 * cpu,
        "cpu_per_call_pct": 100 * cpu / calls,
        "us_per_frame": 1e6 * cpu * FRAME_S / calls,
        "kernel_pct": 100 * kernel,
        "starved_pct": 100 * starved,
        "client_cpu_pct": 100 * client_cpu,
        "kib_per_call": (rss_up - rss_idle) / calls,
        "growth_kib_per_call": (rss_samples[1] - rss_samples[0]) / calls,
        "push_p50_ms": None if ping_p50 is None else 1000 * ping_p50,
        "push_p99_ms": _ms(quantile(results.pings, 0.99)),
        "event_p50_ms": _ms(quantile(results.ends, 0.5)),
        "event_p99_ms": _ms(quantile(results.ends, 0.99)),
        "loop_lag_p99_ms": _ms(
            histogram_quantile(metrics, "stt_bridge_event_loop_lag_seconds", 0.99)
        ),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else 1000 * value


COLUMNS = (
    ("calls", "calls", "{:.0f}"),
    ("late_pct", "late %", "{:.2f}"),
    ("client_late_pct", "client late %", "{:.2f}"),
    ("dropped_s", "dropped s", "{:.1f}"),
    ("failed", "failed", "{:.0f}"),
    ("cpu_pct", "server CPU %", "{:.1f}"),
    ("kernel_pct", "of it kernel %", "{:.1f}"),
    ("cpu_per_call_pct", "CPU %/call", "{:.3f}"),
    ("us_per_frame", "CPU µs/frame", "{:.1f}"),
    ("starved_pct", "waited for CPU %", "{:.1f}"),
    ("client_cpu_pct", "client CPU %", "{:.1f}"),
    ("kib_per_call", "KiB/call", "{:.1f}"),
    ("growth_kib_per_call", "growth KiB/call", "{:.2f}"),
    ("push_p50_ms", "frame→push p50 ms", "{:.2f}"),
    ("push_p99_ms", "p99 ms", "{:.2f}"),
    ("event_p50_ms", "event→client p50 ms", "{:.2f}"),
    ("event_p99_ms", "p99 ms", "{:.2f}"),
    ("loop_lag_p99_ms", "loop lag p99 ≤ ms", "{:.0f}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--front-end", choices=FRONT_ENDS, default="stream")
    parser.add_argument("--calls", type=int, nargs="+", default=[100, 200, 500])
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per call")
    parser.add_argument("--engine", default="sink", help="sink (bridge alone) or cpu")
    parser.add_argument("--server-core", type=int, default=0, help="-1: do not pin")
    parser.add_argument("--client-core", type=int, default=1, help="-1: do not pin")
    parser.add_argument(
        "--server-cores", help='cores for the server and its workers, "0,1" (over --server-core)'
    )
    parser.add_argument("--client-cores", help='cores for this client, "1" or "0,1"')
    parser.add_argument("--workers", type=int, default=1, help="server.workers (0: per core)")
    parser.add_argument(
        "--max-late-pct", type=float, default=0.0, help="--find-max: late frames allowed, %%"
    )
    parser.add_argument(
        "--find-max",
        action="store_true",
        help="bisect for the most calls with zero late frames, up to max(--calls)",
    )
    parser.add_argument("--step", type=int, default=25, help="--find-max resolution (calls)")
    parser.add_argument(
        "--mass-start",
        action="store_true",
        help="every call starts in the same 20 ms (a mass reconnect), not 0-3 frames apart",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the server during each run into this file (collapsed stacks) and print "
        "its top lines (the last run's)",
    )
    args = parser.parse_args()
    client = (
        {int(c) for c in args.client_cores.split(",")}
        if args.client_cores
        else ({args.client_core} if args.client_core >= 0 else None)
    )
    if client is not None:
        os.sched_setaffinity(0, client)
    core = args.server_cores or (None if args.server_core < 0 else str(args.server_core))
    load = os.getloadavg()[0]
    print(
        f"front end {args.front_end}, engine {args.engine}, {args.seconds:.0f} s per call, "
        f"{args.workers} worker(s), server on cores {core}, client on cores {client}, "
        f"load average {load:.2f} on {os.cpu_count()} cores at start\n"
    )
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "|".join("-" * (len(title) + 2) for _, title, _ in COLUMNS) + "|")

    def measure(calls: int) -> dict[str, float | None]:
        r = asyncio.run(
            run(
                args.front_end,
                calls,
                args.seconds,
                args.engine,
                core,
                args.workers,
                args.profile,
                args.mass_start,
            )
        )
        cells = ["-" if r[key] is None else fmt.format(r[key]) for key, _, fmt in COLUMNS]
        print("| " + " | ".join(cells) + " |", flush=True)
        return r

    if not args.find_max:
        for calls in args.calls:
            measure(calls)
        if args.profile is not None and args.profile.exists():
            print_profile(args.profile)
        return
    # Bisect, in steps of --step calls, for the most calls with no late frame at all.
    low, high = 0, max(args.calls) // args.step
    while low < high:
        middle = (low + high + 1) // 2
        # A probe during which a neighbour had the bridge's core measures the neighbour:
        # repeat it (up to 3 times) and keep the least disturbed.
        tries = [measure(middle * args.step)]
        while len(tries) < 3 and (tries[-1]["starved_pct"] or 0) > MAX_STARVED_PCT:
            tries.append(measure(middle * args.step))
        r = min(tries, key=lambda t: t["starved_pct"] or 0)
        if r["late_pct"] is not None:
            late_ok = r["late_pct"] <= args.max_late_pct
        else:  # AudioSocket has no ping: the loop's own lag, p99 within half a frame
            late_ok = r["loop_lag_p99_ms"] is not None and r["loop_lag_p99_ms"] <= LAG_OK_MS
        on_time = late_ok and r["client_late_pct"] == 0 and not r["failed"]
        if on_time:
            low = middle
        else:
            high = middle - 1
    print(
        f"\nmost calls within --max-late-pct late frames: {low * args.step} (searched up to "
        f"{max(args.calls)} in steps of {args.step})"
    )


if __name__ == "__main__":
    main()
