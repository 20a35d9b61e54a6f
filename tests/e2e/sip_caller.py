"""A SIP caller written out by hand, for dialog states sipp's scenarios do not stop in.

Each request is built here as a caller's stack would send it and goes over a real loopback
socket (UDP, or one TCP connection framed by Content-Length); every message that comes back,
responses and the bridge's own requests (BYE), is read as it comes.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Message:
    """One SIP message from the bridge: a response (`status`) or a request (`method`)."""

    first_line: str
    headers: dict[str, str]  # lower-case name: its first value
    body: str

    @property
    def status(self) -> int | None:
        if not self.first_line.startswith("SIP/2.0 "):
            return None
        return int(self.first_line.split()[1])

    @property
    def method(self) -> str | None:
        return None if self.status is not None else self.first_line.split()[0]

    @property
    def cseq_method(self) -> str:
        return self.headers.get("cseq", " ").split()[-1]

    @property
    def rtp_port(self) -> int:
        """The audio port of the SDP answer."""
        found = re.search(r"^m=audio (\d+) ", self.body, re.MULTILINE)
        assert found, self.body
        return int(found.group(1))


def parse(raw: bytes) -> Message:
    head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    return Message(lines[0], headers, body)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, inbox: asyncio.Queue[Message]) -> None:
        self.inbox = inbox

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inbox.put_nowait(parse(data))


class Caller:
    """One call from 127.0.0.1 to the bridge's SIP port, over `udp` or `tcp`."""

    def __init__(self, sip_port: int, transport: Literal["udp", "tcp"]) -> None:
        self.sip_port = sip_port
        self.transport = transport
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.call_id = f"raw-{uuid.uuid4().hex[:12]}@127.0.0.1"
        self.tag = uuid.uuid4().hex[:8]
        self.to_tag = ""
        self.invite_branch = ""
        self.cseq = 1
        self.local_port = 0
        self._last = ""
        self._udp: asyncio.DatagramTransport | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Caller:
        loop = asyncio.get_running_loop()
        if self.transport == "udp":
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(self.inbox), local_addr=("127.0.0.1", 0)
            )
            self.local_port = self._udp.get_extra_info("sockname")[1]
        else:
            reader, self._writer = await asyncio.open_connection("127.0.0.1", self.sip_port)
            self.local_port = self._writer.get_extra_info("sockname")[1]
            self._reader_task = loop.create_task(self._read(reader))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    def close(self) -> None:
        """Gone without a word: the socket (the TCP connection) closes."""
        if self._udp is not None:
            self._udp.close()
        if self._writer is not None:
            self._writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = re.search(rb"\r\nContent-Length:\s*(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            self.inbox.put_nowait(parse(head + body))

    def _send(self, text: str) -> None:
        self._last = text
        data = text.encode()
        if self._udp is not None:
            self._udp.sendto(data, ("127.0.0.1", self.sip_port))
        else:
            assert self._writer is not None
            self._writer.write(data)

    def _request(
        self, method: str, cseq: int, branch: str, body: str = "", extra: str = ""
    ) -> None:
        to = f";tag={self.to_tag}" if self.to_tag and method != "CANCEL" else ""
        content = "Content-Type: application/sdp\r\n" if body else ""
        self._send(
            f"{method} sip:bridge@127.0.0.1:{self.sip_port} SIP/2.0\r\n"
            f"Via: SIP/2.0/{self.transport.upper()} 127.0.0.1:{self.local_port}"
            f";branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:raw@127.0.0.1>;tag={self.tag}\r\n"
            f"To: <sip:bridge@127.0.0.1>{to}\r\n"
            f"Call-ID: {self.call_id}\r\n"
            f"CSeq: {cseq} {method}\r\n"
            f"Contact: <sip:raw@127.0.0.1:{self.local_port};transport={self.transport}>\r\n"
            f"{extra}{content}Content-Length: {len(body.encode())}\r\n\r\n{body}"
        )

    @staticmethod
    def offer(rtp_port: int, direction: str = "sendrecv") -> str:
        return (
            "v=0\r\no=raw 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=rtpmap:101 telephone-event/8000\r\na={direction}\r\n"
        )

    def invite(self, rtp_port: int, direction: str = "sendrecv") -> None:
        """The first INVITE, or (once answered) a re-INVITE: `inactive` puts the call on hold."""
        if self.to_tag:
            self.cseq += 1
        branch = f"z9hG4bK-{uuid.uuid4().hex[:10]}"
        if not self.to_tag:
            self.invite_branch = branch
        self._request("INVITE", self.cseq, branch, self.offer(rtp_port, direction))

    def resend(self) -> None:
        """The last request again, byte for byte: what a caller's UDP transaction sends when
        no answer came within T1 (RFC 3261 §17.1.1.2)."""
        self._send(self._last)

    def ack(self) -> None:
        """ACK for a 2xx: the INVITE's CSeq number, a new branch (RFC 3261 §13.2.2.4)."""
        self._request("ACK", self.cseq, f"z9hG4bK-{uuid.uuid4().hex[:10]}")

    def cancel(self) -> None:
        """CANCEL of the first INVITE: its branch and CSeq number (RFC 3261 §9.1)."""
        self._request("CANCEL", 1, self.invite_branch)

    def bye(self) -> None:
        self.cseq += 1
        self._request("BYE", self.cseq, f"z9hG4bK-{uuid.uuid4().hex[:10]}")

    def answer_ok(self, request: Message) -> None:
        """200 to the bridge's request (its BYE)."""
        headers = "".join(
            f"{name}: {request.headers[name.lower()]}\r\n"
            for name in ("Via", "From", "To", "Call-ID", "CSeq")
        )
        self._send(f"SIP/2.0 200 OK\r\n{headers}Content-Length: 0\r\n\r\n")

    async def receive(self, timeout_s: float = 5.0) -> Message:
        message = await asyncio.wait_for(self.inbox.get(), timeout_s)
        if message.status is not None and 200 <= message.status < 300 and not self.to_tag:
            found = re.search(r";tag=([^;>\s]+)", message.headers.get("to", ""))
            self.to_tag = found.group(1) if found else ""
        return message

    async def expect(self, status: int, cseq_method: str, timeout_s: float = 5.0) -> Message:
        """The next response `status` to `cseq_method`; provisional ones before it are skipped."""
        while True:
            message = await self.receive(timeout_s)
            if message.status == status and message.cseq_method == cseq_method:
                return message
            assert message.status is not None and message.status < 200, message

    async def until_bye(self, timeout_s: float) -> tuple[Message, list[Message]]:
        """Everything until the bridge's BYE (answered 200): the BYE and what came before."""
        before: list[Message] = []
        while True:
            message = await self.receive(timeout_s)
            if message.method == "BYE":
                self.answer_ok(message)
                return message, before
            before.append(message)
