"""Helpers for the SIP end-to-end tests: RTP pcaps for sipp, sipp runs, a SIP-enabled service."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import socket
import struct
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


def write_rtp_pcap(path: Path, wire: bytes, payload_type: int, ptime_ms: int = 20) -> Path:
    """G.711 bytes as an Ethernet/IPv4/UDP/RTP pcap (sipp rewrites the addresses)."""
    step = 8 * ptime_ms
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for index, start in enumerate(range(0, len(wire), step)):
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
        micros = index * ptime_ms * 1000
        out.append(
            struct.pack("<IIII", micros // 1_000_000, micros % 1_000_000, len(frame), len(frame))
        )
        out.append(frame)
    path.write_bytes(b"".join(out))
    return path


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
) -> SippResult:
    """Run sipp against the service's SIP port; `scenario` is a file under tests/e2e/sipp."""
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
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    errors = cwd / "errors.log"
    text = errors.read_text(errors="replace") if errors.exists() else ""
    return SippResult(proc.returncode or 0, text, stdout.decode(errors="replace")[-3000:])


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
