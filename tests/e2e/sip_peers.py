"""Helpers for the SIP end-to-end tests: RTP pcaps for sipp, sipp runs, a SIP-enabled service."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import struct
import time
from pathlib import Path
from typing import Any, Final

import aiohttp

from api.app import Service
from api.config import Config, SipConfig
from telephony.sip.rtp import RtpPacket
from tests.conftest import make_config

SCENARIOS: Final = Path(__file__).resolve().parent / "sipp"
SIP_TESTER: Final = Path("/usr/share/sip-tester")


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def free_baresip_port() -> int:
    """A port free for UDP and TCP whose successor is free for TCP: baresip 1.0 listens on all
    three (SIP over UDP and TCP on the port, TLS on the next) and has no switch to leave TLS out;
    one taken port fails its start with "Address already in use"."""
    for _ in range(100):
        port = free_port(socket.SOCK_STREAM)
        if port >= 65535:
            continue
        held: list[socket.socket] = []
        try:
            for number, kind in ((port, socket.SOCK_DGRAM), (port + 1, socket.SOCK_STREAM)):
                held.append(socket.socket(socket.AF_INET, kind))
                held[-1].bind(("127.0.0.1", number))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return port
    raise RuntimeError("no free port pair for baresip")


def sip_config(engine: dict[str, Any] | None = None, **sip: Any) -> Config:
    """The test config with the SIP UA on 127.0.0.1, an ephemeral port and its own RTP range."""
    base = make_config(**(engine or {}))
    low = 30000 + (os.getpid() * 97 % 300) * 100  # parallel test processes: separate ranges
    fields: dict[str, Any] = {
        "enabled": True,
        "host": "127.0.0.1",
        "port": 0,
        "rtp_port_min": low,
        "rtp_port_max": low + 99,
        **sip,
    }
    return dataclasses.replace(base, sip=SipConfig(**fields))


def write_rtp_pcap(
    path: Path,
    wire: bytes,
    payload_type: int,
    ptime_ms: int = 20,
    lost: frozenset[int] = frozenset(),
    swapped: frozenset[int] = frozenset(),
    held: range = range(0),
) -> Path:
    """G.711 bytes as an Ethernet/IPv4/UDP/RTP pcap (sipp rewrites the addresses). Packet
    numbers in `lost` are left out; a number n in `swapped` is sent after packet n + 1; the
    packets in `held` are sent in one burst with the packet after them (network jitter)."""
    step = 8 * ptime_ms
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    order = list(range(len(range(0, len(wire), step))))
    for n in sorted(swapped):
        order[n], order[n + 1] = order[n + 1], order[n]
    for slot, index in enumerate(order):
        if index in lost:
            continue
        start = index * step
        rtp = RtpPacket(
            payload_type, index & 0xFFFF, start, 0x5EED, index == 0, wire[start : start + step]
        ).serialize()
        udp = struct.pack("!HHHH", 40000, 40000, 8 + len(rtp), 0) + rtp
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            index,
            0,
            64,
            17,
            0,
            b"\x7f\0\0\1",
            b"\x7f\0\0\1",
        )
        frame = b"\0" * 12 + b"\x08\x00" + ip + udp
        # send time: the slot, not the packet's own place
        micros = (held.stop if slot in held else slot) * ptime_ms * 1000
        out.append(
            struct.pack("<IIII", micros // 1_000_000, micros % 1_000_000, len(frame), len(frame))
        )
        out.append(frame)
    path.write_bytes(b"".join(out))
    return path


async def send_rtp(
    port: int, wire: bytes, payload_type: int = 0, ssrc: int = 0x5EED, ptime_ms: int = 20
) -> None:
    """G.711 bytes as real-time RTP from a loopback socket to 127.0.0.1:port, like a phone."""
    step = 8 * ptime_ms
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", port)
    )
    try:
        start = loop.time()
        for index, offset in enumerate(range(0, len(wire), step)):
            delay = start + index * ptime_ms / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            packet = RtpPacket(
                payload_type, index & 0xFFFF, offset, ssrc, index == 0, wire[offset : offset + step]
            )
            transport.sendto(packet.serialize())
    finally:
        transport.close()


def read_rtp_pcap(path: Path) -> list[RtpPacket]:
    data = path.read_bytes()
    offset, packets = 24, []
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset + 8)
        frame = data[offset + 16 : offset + 16 + length]
        offset += 16 + length
        ihl = (frame[14] & 0x0F) * 4
        packets.append(RtpPacket.parse(frame[14 + ihl + 8 :]))
    return packets


def sipp_dir(tmp: Path) -> Path:
    """A working directory where scenarios find `pcap/...` (sip-tester's and our own)."""
    pcap = tmp / "pcap"
    pcap.mkdir(exist_ok=True)
    for name in ("g711a.pcap", "dtmf_2833_1.pcap"):
        if not (pcap / name).exists():
            (pcap / name).symlink_to(SIP_TESTER / name)
    return tmp


@dataclasses.dataclass
class SippResult:
    returncode: int
    errors: str
    stdout: str


async def sipp(
    service: Service,
    cwd: Path,
    *args: str,
    scenario: str | None = None,
    timeout_s: float = 60,
    service_name: str = "service",
    cpus: set[int] | None = None,
) -> SippResult:
    """Run sipp against the service's SIP port; `scenario` is a file under tests/e2e/sipp;
    `cpus` pins it (a benchmark keeps it off the service's core)."""
    cmd = ["sipp"]
    if scenario is not None:
        source = SCENARIOS / scenario
        target = cwd / scenario
        if not target.exists():
            shutil.copy(source, target)
        cmd += ["-sf", str(target)]
    cmd += [
        f"127.0.0.1:{service.ports['sip']}",
        "-i", "127.0.0.1",
        "-p", str(free_port()),
        "-mp", str(free_port()),
        "-s", service_name,
        "-nostdin",
        "-trace_err",
        "-error_file", str(cwd / "errors.log"),
        *args,
    ]  # fmt: skip
    return await _run_sipp(cmd, cwd, cwd / "errors.log", timeout_s, cpus)


async def sipp_server(
    cwd: Path,
    scenario: str,
    port: int,
    *args: str,
    fill: dict[str, str] | None = None,
    timeout_s: float = 30,
) -> SippResult:
    """Run sipp as a server (a registrar, say) on 127.0.0.1:port until its scenario ends;
    `fill` replaces @NAME@ placeholders of the scenario file."""
    text = (SCENARIOS / scenario).read_text()
    for name, value in (fill or {}).items():
        text = text.replace(f"@{name}@", value)
    target = cwd / scenario
    target.write_text(text)
    cmd = [
        "sipp", "-sf", str(target), "-i", "127.0.0.1", "-p", str(port), "-m", "1",
        "-nostdin", "-trace_err", "-error_file", str(cwd / "server_errors.log"), *args,
    ]  # fmt: skip
    return await _run_sipp(cmd, cwd, cwd / "server_errors.log", timeout_s)


async def _run_sipp(
    cmd: list[str], cwd: Path, errors: Path, timeout_s: float, cpus: set[int] | None = None
) -> SippResult:
    """Run one sipp to its end (killed, by its own PID, past `timeout_s`); collect its errors."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        if cpus:
            os.sched_setaffinity(proc.pid, cpus)
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except BaseException:  # past the timeout, or the test cancelled it: never leave it running
        proc.kill()
        await proc.wait()
        raise
    text = errors.read_text(errors="replace") if errors.exists() else ""
    return SippResult(proc.returncode or 0, text, stdout.decode(errors="replace")[-3000:])


BARESIP_CONFIG: Final = """\
poll_method epoll
sip_listen 127.0.0.1:{sip_port}
audio_player aufile,/dev/null
audio_source aufile,{wav}
audio_alert aufile,/dev/null
rtp_ports {rtp_low}-{rtp_high}
module_path /usr/lib/baresip/modules
module g711.so
module aufile.so
module_app account.so
module_app menu.so
"""


class Baresip:
    """baresip (Debian's package, a second SIP stack) as a caller: it dials `uri`, plays `wav`
    (8 kHz mono) as its microphone over PCMU, and hangs up at the file's end."""

    def __init__(self, cwd: Path, wav: Path) -> None:
        self.dir = cwd / "baresip"
        self.dir.mkdir(exist_ok=True)
        self.wav = wav
        (self.dir / "accounts").write_text("<sip:baresip@127.0.0.1>;regint=0;audio_codecs=PCMU\n")
        self.proc: asyncio.subprocess.Process | None = None
        self.output = b""

    def _write_config(self) -> None:
        low = min(free_port() & ~1, 65000)
        (self.dir / "config").write_text(
            BARESIP_CONFIG.format(
                sip_port=free_baresip_port(), wav=self.wav, rtp_low=low, rtp_high=low + 19
            )
        )

    async def dial(self, uri: str) -> None:
        """Start baresip dialling `uri`. Its ports are picked free just before, but another
        process can take one in between: a start that fails on a taken port is retried."""
        for _ in range(3):
            self._write_config()
            self.output = b""
            self.proc = await asyncio.create_subprocess_exec(
                "baresip", "-f", str(self.dir), "-e", f"/dial {uri}", "-t", "60",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), 1.0)
            except TimeoutError:
                return  # running: it has bound its ports and is calling
            self.output, _ = await self.proc.communicate()
            if b"Address already in use" not in self.output:
                return  # ended for another reason: stop() reports what it said

    async def stop(self) -> str:
        """End this baresip (by its PID) and return what it printed."""
        if self.proc is not None and not self.output:
            if self.proc.returncode is None:
                self.proc.terminate()
            self.output, _ = await self.proc.communicate()
        return self.output.decode(errors="replace")


async def events_until_ended(
    ws: aiohttp.ClientWebSocketResponse, calls: int = 1, timeout_s: float = 60
) -> list[dict[str, Any]]:
    """Every /v1/events message until `calls` calls have ended."""
    seen: list[dict[str, Any]] = []
    ended = 0
    while ended < calls:
        event = await asyncio.wait_for(ws.receive_json(), timeout_s)
        seen.append(event)
        ended += event["type"] == "call_ended"
    return seen


def words(events: list[dict[str, Any]], call_id: str | None = None) -> list[dict[str, Any]]:
    return [
        {k: e[k] for k in ("text", "start", "end")}
        for e in events
        if e.get("type") == "word" and (call_id is None or e["call_id"] == call_id)
    ]


async def sip_options(port: int) -> str:
    """A proxy's SIP OPTIONS probe over UDP (Kamailio's ds_ping): the whole answer."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Peer(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not answer.done():
                answer.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(
        Peer, local_addr=("127.0.0.1", 0), remote_addr=("127.0.0.1", port)
    )
    local = transport.get_extra_info("sockname")[1]
    transport.sendto(
        (
            f"OPTIONS sip:bridge@127.0.0.1:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{time.time_ns()}\r\n"
            f"From: <sip:probe@127.0.0.1>;tag=p1\r\nTo: <sip:bridge@127.0.0.1:{port}>\r\n"
            f"Call-ID: probe-{time.time_ns()}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    try:
        return (await asyncio.wait_for(answer, 5)).decode()
    finally:
        transport.close()
