"""Fuzz campaign against the live server process (issue 17).

    python -m bench.fuzz --count 200 --seed 17

Starts `stt-bridge serve` (sink engine, SIP on) on free loopback ports, then per protocol sends
`--count` random or mutated inputs, each on its own connection: garbage bytes, truncated and
oversized length fields, invalid UTF-8/JSON/msgpack/base64, 100 000 nested brackets, thousands
of tiny frames, RST mid-frame, slowloris; plus 10 MB frames and 500 simultaneous connections.
The wires: AudioSocket, HTTP, SIP, the generic WebSocket, Twilio, moshi, mod_audio_fork,
mod_audio_stream, Deepgram, Asterisk chan_websocket and AEAP (their captured valid messages
mutated: bytes flipped, cut, repeated, or an escaped lone surrogate, NaN, 1e999 put in).
A legitimate stream runs beside them throughout. Afterwards: the process is alive, /health
answers, a new call works, RSS and open fds are compared with the start (fds once fuzzed SIP
calls that were answered and never ACKed are given up, 32 s at most), and the server's log
is searched for tracebacks. Every input must get a protocol-level answer (close code, HTTP
status, SIP response, AudioSocket hangup, or the connection closed by the server), not a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import aiohttp
import msgpack

from tests.e2e.server_process import ServerProcess, free_port

ANSWER_S = 15.0  # an input not answered in this long is a hang
FORK = ("audio.drachtio.org",)  # mod_audio_fork; without it /freeswitch is mod_audio_stream
MEDIA = ("media",)  # Asterisk chan_websocket's subprotocol
AEAP = ("speech_to_text",)  # Asterisk res_aeap's subprotocol
# Valid messages of the newer wires, as their byte-level tests hold them: mutated below.
DEEPGRAM_VALID = (
    '{"type":"KeepAlive"}',
    '{"type":"Finalize","channel":0}',
    '{"type":"Configure","processors":{"keyterms":["x"]}}',
)
DEEPGRAM_QUERIES = (
    "encoding=linear16&sample_rate=16000",
    "encoding=mulaw&sample_rate=8000&channels=2&multichannel=true",
    "encoding=alaw&sample_rate=8000&interim_results=true&vad_events=true",
    "encoding=opus",
    "sample_rate=x",
    "encoding=linear16&sample_rate=16000&channels=999",
    "encoding=linear16&sample_rate=16000&extra=nocolon&utterance_end_ms=-1",
)
ASTERISK_VALID = (
    "MEDIA_START connection_id:stt channel:WebSocket/stt/0x7f1cc000a6d0 "
    "channel_id:1796276893.2 format:slin16 optimal_frame_size:640 ptime:20",
    '{"event":"MEDIA_START","connection_id":"stt","channel":"WebSocket/stt/0x7f1c",'
    '"channel_id":"1796276893.2","format":"ulaw","optimal_frame_size":160,"ptime":20,'
    '"channel_variables":{"DIALEDPEERNUMBER":"stt/c(ulaw)f(json)"}}',
    "DTMF_END digit:1 channel_id:1796276893.2",
)
AEAP_VALID = (
    '{"request":"setup","version":"0.1.0","codecs":[{"name":"ulaw"}],'
    '"params":{"language":"en-US"},"id":"4532a1b0"}',
    '{"request":"setup","codecs":[{"name":"slin"}],"params":{"sample_rate":"16000"},"id":"s"}',
    '{"request":"get","params":["results"],"id":"g1"}',
    '{"request":"set","params":{"dtmf":"12","grammar":"digits"},"id":"s1"}',
)
AUDIO_STREAM_METADATA = (
    '{"callId":"5d8f6c1e","rate":16000,"mix":"stereo"}',
    '{"uuid":"abc","rate":"8000"}',
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def fd_kinds(pid: int) -> Counter[str]:
    """Open fds by what they are: socket, pipe, anon_inode:[eventfd], or the file's name."""
    kinds: Counter[str] = Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            kinds[target.split(":")[0] if ":[" in target else Path(target).name] += 1
    return kinds


def garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 2000))
    if kind == 1:
        return b"\xff\xfe" + rng.randbytes(rng.randrange(50))  # invalid UTF-8
    if kind == 2:
        return b"[" * rng.choice((10, 1000, 100_000))
    if kind == 3:
        return json.dumps({"event": rng.choice(["start", "media", "x"]), "v": "\ud800"}).encode()
    if kind == 4:
        return b'{"a": ' + str(rng.choice(["NaN", "Infinity", "1e999", "-0"])).encode() + b"}"
    return b"\x00" * rng.randrange(1, 5000)


def mutate(rng: random.Random, text: str) -> str:
    """Flip, cut, repeat or insert bytes of a valid message; or put a lone surrogate, NaN or a
    huge number into it."""
    data = text.encode()
    at = rng.randrange(len(data))
    kind = rng.randrange(6)
    if kind == 0:
        data = data[:at] + bytes([data[at] ^ rng.randrange(1, 256)]) + data[at + 1 :]
    elif kind == 1:
        data = data[:at]
    elif kind == 2:
        data = data[:at] + data[at:] * rng.randrange(2, 5)
    elif kind == 3:
        data = data[:at] + rng.randbytes(rng.randrange(1, 9)) + data[at:]
    else:
        quotes = [i for i, c in enumerate(text) if c == '"'] or [0]
        at = rng.choice(quotes)
        spice = rng.choice(["\\ud800", "NaN", "1e999", "[" * 1000, "\\u0000", "x" * 5000])
        return text[:at] + spice + text[at:]
    return data.decode("utf-8", "replace")


def twilio_message(rng: random.Random) -> str:
    valid = [
        {
            "event": "start",
            "start": {"callSid": f"CA{rng.randrange(10**6)}", "tracks": ["inbound"]},
        },
        {"event": "media", "media": {"track": "inbound", "timestamp": "20", "payload": "//8="}},
        {"event": "dtmf", "dtmf": {"digit": "1"}},
    ]
    message: dict[str, object] = dict(rng.choice(valid))
    key = rng.choice(list(message))
    message[key] = rng.choice(
        [None, "x", [], 1e308, {"payload": "!!notbase64"}, {"timestamp": 1e15}]
    )
    return json.dumps(message)


def moshi_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 500))
    if kind == 1:
        return bytes(msgpack.packb({"type": "Audio", "pcm": [[0.1], [0.2, 0.3]]}))
    if kind == 2:
        return bytes(msgpack.packb({"type": "OggOpus", "data": rng.randbytes(100)}))
    return bytes(msgpack.packb({"type": rng.choice(["Marker", "Nope"]), "id": "x"}))


class Campaign:
    def __init__(self, server: ServerProcess, rng: random.Random) -> None:
        self.server = server
        self.rng = rng
        self.sent: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.hangs: Counter[str] = Counter()

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.server.ports['audio']}{path}"

    async def one(self, protocol: str, attempt: Callable[[], Awaitable[bool]]) -> None:
        self.sent[protocol] += 1
        try:
            answered = await asyncio.wait_for(attempt(), ANSWER_S)
        except TimeoutError:
            answered = False
        except (aiohttp.ClientError, ConnectionError, OSError):
            answered = True  # refused or reset by the server: an answer at the transport level
        (self.answered if answered else self.hangs)[protocol] += 1

    async def websocket(
        self, path: str, frames: list[bytes | str], protocols: tuple[str, ...] = ()
    ) -> bool:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(self.ws(path), protocols=protocols, max_msg_size=0) as ws:
                for frame in frames:
                    if ws.closed:
                        break
                    if isinstance(frame, str):
                        await ws.send_str(frame)
                    else:
                        await ws.send_bytes(frame)
                while True:  # the server must answer: an error, a close
                    msg = await ws.receive()
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        return True
                    if msg.type == aiohttp.WSMsgType.ERROR:
                        return True
                    if msg.type == aiohttp.WSMsgType.TEXT and '"error' in msg.data.lower():
                        return True  # our error, Deepgram's Error, AEAP's error_msg
                    if msg.type == aiohttp.WSMsgType.BINARY and b"Error" in msg.data:
                        return True

    async def tcp(self, port: int, data: bytes, rst: bool = False) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        await writer.drain()
        if rst:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return True
        try:
            await reader.read()  # until the server closes (a reply, a hangup or a timeout)
        finally:
            writer.close()
        return True

    async def sip(self, data: bytes) -> bool:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.bind(("127.0.0.1", 0))
            await loop.sock_sendto(s, data, ("127.0.0.1", self.server.ports["sip"]))
            # garbage without a Via cannot be answered: counted as handled
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(loop.sock_recv(s, 65536), 1.0)
        return True

    def inputs(self, count: int) -> list[tuple[str, Callable[[], Awaitable[bool]]]]:
        rng = self.rng
        ports = self.server.ports
        ws, tcp, sip = self.websocket, self.tcp, self.sip
        work: list[tuple[str, Callable[[], Awaitable[bool]]]] = []
        for _ in range(count):
            g = garbage(rng)
            text = g.decode("utf-8", "replace")
            tiny: list[bytes | str] = [b"\x00"] * rng.choice((1, 10, 3000))
            twilio: list[bytes | str] = [twilio_message(rng) for _ in range(3)]
            post = b"POST /api/asr-streaming HTTP/1.1\r\nContent-Length: 99999\r\n\r\nRIFF"
            work += [
                ("websocket", partial(ws, "/v1/stream", [g, text])),
                ("websocket", partial(ws, "/v1/stream", [*tiny, "x"])),
                ("audio_fork", partial(ws, "/freeswitch", [text, g[:999], "x"], FORK)),
                ("audio_stream", partial(ws, "/freeswitch?rate=x", [g[:999], text, "x"])),
                (
                    "audio_stream",
                    partial(
                        ws,
                        "/freeswitch",
                        [mutate(rng, rng.choice(AUDIO_STREAM_METADATA)), g[:999], "x"],
                    ),
                ),
                (
                    "deepgram",
                    partial(
                        ws,
                        f"/v1/listen?{rng.choice(DEEPGRAM_QUERIES)}",
                        [g[:4000], mutate(rng, rng.choice(DEEPGRAM_VALID)), "x"],
                    ),
                ),
                ("deepgram", partial(ws, "/v1/listen?encoding=mulaw&sample_rate=8000", [text])),
                (
                    "asterisk_media",
                    partial(
                        ws,
                        "/asterisk/media",
                        [mutate(rng, rng.choice(ASTERISK_VALID)), g[:1000], "x"],
                        MEDIA,
                    ),
                ),
                (
                    "asterisk_media",
                    partial(ws, "/asterisk/media", [ASTERISK_VALID[0], g[:2000], text], MEDIA),
                ),
                (
                    "aeap",
                    partial(ws, "/asterisk/aeap", [mutate(rng, rng.choice(AEAP_VALID)), "x"], AEAP),
                ),
                ("aeap", partial(ws, "/asterisk/aeap", [AEAP_VALID[0], g[:2000], text, "x"], AEAP)),
                ("twilio", partial(ws, "/twilio/media", [*twilio, "{}", "x"])),
                ("moshi", partial(ws, "/api/asr-streaming", [moshi_frame(rng)])),
                ("audiosocket", partial(tcp, ports["audiosocket"], g[:3000])),
                ("audiosocket", partial(tcp, ports["audiosocket"], b"\x10\xff\xff" + bytes(10))),
                ("audiosocket", partial(tcp, ports["audiosocket"], b"\x01\x00\x10", True)),
                ("http", partial(tcp, ports["audio"], b"GET /" + g[:200] + b" HTTP/1.1\r\n\r\n")),
                ("http", partial(tcp, ports["health"], g[:500])),
                ("http", partial(tcp, ports["audio"], post, True)),
                ("sip", partial(sip, g[:1400])),
                ("sip", partial(sip, sip_mutation(rng))),
            ]
        work += [
            ("websocket", partial(ws, "/v1/stream", [bytes(10_000_000)])),
            ("moshi", partial(ws, "/api/asr-streaming", [bytes(20_000_000)])),
            ("slowloris", partial(tcp, ports["audio"], b"GET / HTTP/1.1\r\nX-a: ")),
            ("slowloris", partial(tcp, ports["audiosocket"], b"")),
            ("slowloris", partial(tcp, ports["sip"], b"")),
        ]
        rng.shuffle(work)
        return work


def sip_mutation(rng: random.Random) -> bytes:
    sdp = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 0\r\n"
    )
    sdp = sdp.replace(
        rng.choice(["4000", "t=0 0", "RTP/AVP 0", "IN IP4"]), rng.choice(["x", "", "99999999999"])
    )
    n = rng.randrange(10**9)
    head = (
        f"INVITE sip:b@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK{n}\r\n"
        f"From: <sip:a@x>;tag={n}\r\nTo: <sip:b@x>\r\nCall-ID: f{n}\r\nCSeq: 1 INVITE\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n"
    )
    return (head + sdp).encode()


async def legit_call(server: ServerProcess, stop: asyncio.Event) -> str:
    """A well-behaved stream beside the campaign: 20 ms frames in real time until `stop`."""
    url = f"ws://127.0.0.1:{server.ports['audio']}/v1/stream?encoding=pcm16&sample_rate=16000"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        while not stop.is_set():
            await ws.send_bytes(b"\x00\x01" * 320)
            await asyncio.sleep(0.02)
        await ws.send_str('{"type": "stop"}')
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("type") == "closed":
                return "closed normally"
    return "no closed message"


async def flood(server: ServerProcess, n: int) -> str:
    """n connections at once to the audio port; each must get an answer or be closed."""

    async def one() -> int:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["audio"])
            writer.write(b"GET /config.json HTTP/1.1\r\nHost: x\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), ANSWER_S)
            writer.close()
            return int(line.split()[1]) if line else 0
        except (OSError, TimeoutError, IndexError, ValueError):
            return -1

    codes = Counter(await asyncio.gather(*(one() for _ in range(n))))
    return ", ".join(f"{code}: {count}" for code, count in sorted(codes.items()))


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100, help="rounds: ~13 inputs each")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="stt-bridge-fuzz-"))
    server = ServerProcess(
        data,
        STT_BRIDGE_ENGINE_NAME="sink",
        STT_BRIDGE_SIP_ENABLED="true",
        STT_BRIDGE_SIP_HOST="127.0.0.1",
        STT_BRIDGE_SIP_PORT=str(free_port()),
        STT_BRIDGE_LIMITS_HANDSHAKE_TIMEOUT_S="2",
        STT_BRIDGE_LIMITS_IDLE_TIMEOUT_S="3",
        STT_BRIDGE_LIMITS_SIP_REQUESTS_PER_S="1000",
    )
    server.log_to = data / "server.log"
    server.start()
    assert server.process is not None
    pid = server.process.pid
    server.ports["sip"] = int(server.env["STT_BRIDGE_SIP_PORT"])
    await asyncio.sleep(1)
    rss0, fds0, kinds0 = rss_mb(pid), fds(pid), fd_kinds(pid)
    campaign = Campaign(server, random.Random(args.seed))
    stop = asyncio.Event()
    legit = asyncio.create_task(legit_call(server, stop))
    started = time.monotonic()
    gate = asyncio.Semaphore(args.concurrency)

    async def run(protocol: str, attempt: Callable[[], Awaitable[bool]]) -> None:
        async with gate:
            await campaign.one(protocol, attempt)

    await asyncio.gather(*(run(p, a) for p, a in campaign.inputs(args.count)))
    flooded = await flood(server, 500)
    stop.set()
    legit_result = await legit
    await asyncio.sleep(5)  # idle timeouts close what is left
    alive = server.process.poll() is None
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.ports['health']}/health") as r:
            health = r.status
    new_call = await legit_call(server, _set_event())
    rss1, fds1, kinds1 = rss_mb(pid), fds(pid), fd_kinds(pid)
    # Fuzzed INVITEs whose SDP was still good were answered 200 and never ACKed: their RTP
    # sockets are held until SIP's Timer H (32 s) gives the call up. Wait for that.
    settled_s = 0
    while fds(pid) > fds0 + 2 and settled_s < 45:
        await asyncio.sleep(1)
        settled_s += 1
    rss2, fds2 = rss_mb(pid), fds(pid)
    server.terminate()
    log = server.log_to.read_text(errors="replace")
    tracebacks = log.count("Traceback")
    print(
        f"fuzz campaign: seed {args.seed}, {args.count} rounds, {time.monotonic() - started:.0f} s"
    )
    print(f"{'protocol':<12} {'inputs':>7} {'answered':>9} {'hangs':>6}")
    for protocol in sorted(campaign.sent):
        print(
            f"{protocol:<12} {campaign.sent[protocol]:>7} {campaign.answered[protocol]:>9} "
            f"{campaign.hangs[protocol]:>6}"
        )
    print(f"500 simultaneous connections: {flooded}")
    print(f"legitimate stream beside: {legit_result}; new call after: {new_call}")
    print(
        f"alive: {alive}, /health: {health}, unhandled exceptions (tracebacks in log): {tracebacks}"
    )
    print(f"RSS {rss0:.0f} -> {rss1:.0f} MB, fds {fds0} -> {fds1}")
    grown = {k: f"{kinds0[k]} -> {kinds1[k]}" for k in kinds1 | kinds0 if kinds1[k] != kinds0[k]}
    print(f"fds that changed: {grown or 'none'}")
    print(f"{settled_s} s later (unACKed SIP calls given up): RSS {rss2:.0f} MB, fds {fds2}")
    ok = alive and health == 200 and not tracebacks and not sum(campaign.hangs.values())
    ok = ok and fds2 <= fds0 + 2
    return 0 if ok else 1


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
