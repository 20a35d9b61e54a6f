"""A WebSocket client that sends exactly the bytes a PBX's own client sends.

aiohttp's client adds headers (User-Agent, extensions) that Asterisk's `res_http_websocket`
and FreeSWITCH's libwsc never send, so the peers of the Asterisk and mod_audio_stream tests
speak RFC 6455 themselves: the handshake verbatim as the PBX writes it, masked frames out,
unmasked frames in, PINGs answered, a Close answered with a Close.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from dataclasses import dataclass, field
from typing import Final

import numpy as np

GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def asterisk_request(path: str, host: str, key: str, protocol: str | None) -> bytes:
    """`res_http_websocket.c` (websocket_client_handshake): these headers, in this order."""
    lines = [
        f"GET {path} HTTP/1.1",
        "Sec-WebSocket-Version: 13",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Host: {host}",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines.append(f"Sec-WebSocket-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def libwsc_request(path: str, host: str, key: str, extra: dict[str, str] | None = None) -> bytes:
    """libwsc's WebSocketContext handshake (mod_audio_stream): no space after the colons,
    permessage-deflate offered, an Origin, then STREAM_EXTRA_HEADERS."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host:{host}",
        "Upgrade:websocket",
        "Connection:upgrade",
        f"Sec-WebSocket-Key:{key}",
        "Sec-WebSocket-Version:13",
        "Sec-WebSocket-Extensions:permessage-deflate; client_no_context_takeover; "
        "server_no_context_takeover; client_max_window_bits=9",
        f"Origin:http://{host}",
        *(f"{name}:{value}" for name, value in (extra or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, masked frame (a client always masks), as bytes."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    masked = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), length)
    return head + mask + masked.tobytes()


class HandshakeRefused(Exception):
    def __init__(self, status: int, head: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.head = head


@dataclass
class RawWebSocket:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    headers: dict[str, str]
    close_code: int | None = None
    close_reason: str = ""
    closed: bool = False
    _sent_close: bool = field(default=False, repr=False)

    @classmethod
    async def connect(
        cls, port: int, request: bytes, key: str, pipelined: bytes = b""
    ) -> RawWebSocket:
        """Upgrade; `pipelined` (frames from `client_frame`) goes in the same write as the
        request, before any answer, as embedded clients and proxies may send it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request + pipelined)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *header_lines = head.strip().split("\r\n")
        status = int(status_line.split(" ")[1])
        if status != 101:
            writer.close()
            raise HandshakeRefused(status, head)
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        assert headers.get("sec-websocket-accept") == expected, head
        assert headers.get("upgrade", "").lower() == "websocket", head  # strcasecmp in Asterisk
        assert headers.get("connection", "").lower() == "upgrade", head
        return cls(reader, writer, headers)

    @staticmethod
    def new_key() -> str:
        return base64.b64encode(os.urandom(16)).decode()

    def send(self, opcode: int, payload: bytes) -> None:
        """One unfragmented, masked frame (a client always masks)."""
        self.writer.write(client_frame(opcode, payload))

    def send_text(self, text: str) -> None:
        self.send(TEXT, text.encode())

    def send_binary(self, data: bytes) -> None:
        self.send(BINARY, data)

    def close(self, code: int = 1000) -> None:
        if not self._sent_close:
            self._sent_close = True
            self.send(CLOSE, struct.pack("!H", code))

    async def receive(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next TEXT or BINARY message; (CLOSE, b"") once the server closed."""
        while True:
            async with asyncio.timeout(timeout):
                first, second = await self.reader.readexactly(2)
                assert not second & 0x80, "a server must not mask its frames"
                length = second & 0x7F
                if length == 126:
                    (length,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif length == 127:
                    (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(length)
            opcode = first & 0x0F
            assert first & 0x80, "fragmented messages are not expected"
            if opcode == PING:
                self.send(PONG, payload)
                continue
            if opcode == PONG:
                continue
            if opcode == CLOSE:
                self.closed = True
                if len(payload) >= 2:
                    (self.close_code,) = struct.unpack("!H", payload[:2])
                    self.close_reason = payload[2:].decode("utf-8", "replace")
                self.close(self.close_code or 1000)
                return CLOSE, b""
            return opcode, payload

    async def receive_text(self, timeout: float = 10.0) -> str:
        opcode, payload = await self.receive(timeout)
        assert opcode == TEXT, (opcode, payload[:80], self.close_code, self.close_reason)
        return payload.decode()

    def pending(self) -> bool:
        """Whether the server has sent something not yet read (without waiting)."""
        return bool(self.reader._buffer)  # type: ignore[attr-defined]

    async def drain_and_close(self, code: int = 1000) -> None:
        """Close (the caller hung up), then read until the server's Close and EOF."""
        self.close(code)
        await self.writer.drain()
        try:
            while not self.closed:
                await self.receive(timeout=10)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.writer.close()
