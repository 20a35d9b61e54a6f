"""Asterisk AudioSocket (TCP, :9092): Asterisk connects, sends a UUID, then audio and DTMF.

Each message is a 3-byte header (kind, big-endian payload length) and the payload. Kinds:
0x00 hangup, 0x01 UUID (16 bytes), 0x03 DTMF (1 ASCII byte), 0x10-0x18 signed 16-bit LE
mono audio at 8/12/16/24/32/44.1/48/96/192 kHz, 0xFF error. One bad header ends the session:
the protocol has no way to resync. See ../shared/protocols/audiosocket.md.

`AudioSocketCodec` is the protocol without I/O; `serve_connection` is the asyncio adapter and
`audiosocket_server` the cleanup context that listens while the service runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from engine.base import BridgeError
from telephony.audio import AudioDecoder, Encoding, PcmArray
from telephony.config import LimitsConfig
from telephony.errors import ProtocolError
from telephony.limits import ConnectionGate, SourceLog
from telephony.session import Call, CallHub

log = logging.getLogger(__name__)

FRONT_END: Final = "audiosocket"

KIND_HANGUP: Final = 0x00
KIND_UUID: Final = 0x01
KIND_DTMF: Final = 0x03
KIND_ERROR: Final = 0xFF
AUDIO_KINDS: Final = {
    0x10: 8000,
    0x11: 12000,
    0x12: 16000,
    0x13: 24000,
    0x14: 32000,
    0x15: 44100,
    0x16: 48000,
    0x17: 96000,
    0x18: 192000,
}
HEADER: Final = struct.Struct(">BH")
# 20 ms at 192 kHz is 7680 bytes; a frame far beyond any ptime is a broken peer, not audio.
MAX_PAYLOAD: Final = 32768
DTMF_DIGITS: Final = frozenset("0123456789*#ABCD")


class AudioSocketError(ProtocolError):
    """A message the protocol does not allow; the session ends (there is no resync)."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identified:
    call_id: uuid.UUID


@dataclass(frozen=True)
class Audio:
    sample_rate: int
    payload: bytes  # int16 little-endian mono


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Hangup:
    """The peer asked to end (kind 0x00); Asterisk itself never sends it, but a peer may."""


@dataclass(frozen=True)
class PeerError:
    code: int | None  # bit flags: 0x01 caller hung up, 0x02 forwarding, 0x04 memory


AudioSocketEvent = Identified | Audio | Dtmf | Hangup | PeerError


# --- codec ------------------------------------------------------------------------------------


class AudioSocketCodec:
    """Bytes from Asterisk in, events out; the messages we send, as bytes."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload
        self.call_id: uuid.UUID | None = None

    def feed(self, data: bytes) -> list[AudioSocketEvent]:
        self._buffer += data
        events: list[AudioSocketEvent] = []
        while len(self._buffer) >= HEADER.size:
            kind, length = HEADER.unpack_from(self._buffer)
            if length > self._max_payload:
                raise AudioSocketError(f"payload of {length} bytes (kind {kind:#04x}) is too long")
            if kind not in AUDIO_KINDS and kind not in (
                KIND_HANGUP,
                KIND_UUID,
                KIND_DTMF,
                KIND_ERROR,
            ):
                raise AudioSocketError(f"unknown message kind {kind:#04x}")
            if len(self._buffer) < HEADER.size + length:
                break
            payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
            del self._buffer[: HEADER.size + length]
            events.append(self._message(kind, payload))
        return events

    def end_of_stream(self) -> None:
        """The peer closed the connection: fine at a message boundary, an error mid-message."""
        if self._buffer:
            raise AudioSocketError(
                f"connection closed inside a message ({len(self._buffer)} bytes)"
            )

    def _message(self, kind: int, payload: bytes) -> AudioSocketEvent:
        if kind == KIND_UUID:
            if self.call_id is not None:
                raise AudioSocketError("a second UUID message")
            if len(payload) != 16:
                raise AudioSocketError(f"UUID payload of {len(payload)} bytes, expected 16")
            self.call_id = uuid.UUID(bytes=payload)
            return Identified(self.call_id)
        if kind == KIND_HANGUP:
            return Hangup()
        if kind == KIND_ERROR:
            return PeerError(payload[0] if payload else None)
        if self.call_id is None:
            raise AudioSocketError(f"kind {kind:#04x} before the UUID message")
        if kind == KIND_DTMF:
            digit = payload[:1].decode("ascii", errors="replace")
            if len(payload) != 1 or digit not in DTMF_DIGITS:
                raise AudioSocketError(f"bad DTMF payload {payload!r}")
            return Dtmf(digit)
        if not payload or len(payload) % 2:
            raise AudioSocketError(f"audio payload of {len(payload)} bytes (must be even, > 0)")
        return Audio(AUDIO_KINDS[kind], payload)

    @staticmethod
    def encode_hangup() -> bytes:
        return HEADER.pack(KIND_HANGUP, 0)

    @staticmethod
    def encode_uuid(call_id: uuid.UUID) -> bytes:
        return HEADER.pack(KIND_UUID, 16) + call_id.bytes

    @staticmethod
    def encode_audio(payload: bytes, sample_rate: int = 8000) -> bytes:
        kind = next(k for k, rate in AUDIO_KINDS.items() if rate == sample_rate)
        return HEADER.pack(kind, len(payload)) + payload

    @staticmethod
    def encode_dtmf(digit: str) -> bytes:
        return HEADER.pack(KIND_DTMF, 1) + digit.encode("ascii")


# --- asyncio adapter --------------------------------------------------------------------------


class _Leg:
    """The call's one leg: audio at whatever rate the kind byte says, the engine's rate out."""

    def __init__(self, call: Call) -> None:
        self.session = call.leg("caller")
        self._decoder: AudioDecoder | None = None
        self._done_s = 0.0  # audio of decoders before a rate change

    def audio(self, event: Audio) -> None:
        if self._decoder is None or self._decoder.sample_rate != event.sample_rate:
            self.flush()  # a rate change mid-call: finish the old resampler's tail first
            self._done_s = self.session.audio_s
            self._decoder = AudioDecoder(
                Encoding.PCM16, event.sample_rate, self.session.call.sample_rate
            )
        self.session.push(self._decoder.feed(event.payload))

    def dtmf(self, digit: str) -> None:
        wire_s = self._decoder.seconds_in if self._decoder is not None else 0.0
        self.session.dtmf(digit, self._done_s + wire_s)

    def flush(self) -> None:
        if self._decoder is not None:
            tail: PcmArray = self._decoder.flush()
            self.session.push(tail)


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hub: CallHub,
    limits: LimitsConfig | None = None,
) -> None:
    """One Asterisk connection: one call, until either side hangs up. A peer that sends no
    UUID within `handshake_timeout_s`, or nothing for `idle_timeout_s`, is hung up on."""
    limits = limits or LimitsConfig()
    peer = writer.get_extra_info("peername")
    remote = f"{peer[0]}:{peer[1]}" if peer else "unknown"
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    codec = AudioSocketCodec(limits.audiosocket_max_payload_bytes)
    call: Call | None = None
    leg: _Leg | None = None
    reason = "caller hung up"
    loop = asyncio.get_running_loop()
    last = loop.time()

    async def watch() -> None:
        """One watchdog per connection, not a timeout around every read: `wait_for` made a
        task per 20 ms frame, a fifth of the server's time (py-spy, 200 calls)."""
        while True:
            limit = limits.handshake_timeout_s if call is None else limits.idle_timeout_s
            if limit <= 0:  # no limit
                await asyncio.sleep(1.0)
                continue
            wait = last + limit - loop.time()
            if wait <= 0:
                reader.set_exception(AudioSocketError(f"nothing received for {limit:g} s"))
                return
            await asyncio.sleep(wait)

    watchdog = loop.create_task(watch())
    try:
        while True:
            data = await reader.read(65536)
            last = loop.time()
            if not data:
                codec.end_of_stream()
                break
            for event in codec.feed(data):
                if isinstance(event, Identified):
                    call = hub.open_call(
                        FRONT_END,
                        call_id=str(event.call_id),
                        labels={"uuid": str(event.call_id), "remote": remote},
                    )
                    leg = _Leg(call)
                elif isinstance(event, Audio) and leg is not None:
                    leg.audio(event)
                elif isinstance(event, Dtmf) and leg is not None:
                    leg.dtmf(event.digit)
                elif isinstance(event, Hangup | PeerError):
                    reason = (
                        "peer hangup" if isinstance(event, Hangup) else f"peer error {event.code}"
                    )
                    raise _Done
    except _Done:
        pass
    except BridgeError as exc:
        # Full, draining, or bad framing: hang up this call only (the protocol has no codes).
        log.warning(
            "audiosocket call refused: %s", exc, extra={"front_end": FRONT_END, "remote": remote}
        )
        reason = f"rejected: {exc}"
        writer.write(codec.encode_hangup())
    except ConnectionError as exc:
        reason = f"connection lost: {exc}"
    finally:
        watchdog.cancel()
        if leg is not None:
            leg.flush()
        if call is not None:
            await asyncio.shield(call.end(reason))
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class _Done(Exception):
    """The peer ended the call on purpose."""


def audiosocket_server(
    host: str,
    port: int,
    hub: CallHub,
    ports: dict[str, int],
    limits: LimitsConfig | None = None,
    reuse_port: bool = False,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: listen for Asterisk while the application runs. Connections over
    `limits.connections_per_ip` / `connections_total` get a hangup message and are closed.
    `reuse_port`: SO_REUSEPORT, the port shared by a node's worker processes."""
    limits = limits or LimitsConfig()
    gate = ConnectionGate(limits.connections_per_ip, limits.connections_total)
    refusals = SourceLog(log)

    async def context(app: web.Application) -> AsyncIterator[None]:
        connections: set[asyncio.Task[None]] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            source = str(peer[0]) if peer else "unknown"
            if not gate.admit(source):
                refusals.warning(source, "audiosocket connection from %s refused (limits)", source)
                writer.write(AudioSocketCodec.encode_hangup())
                writer.close()
                return
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await serve_connection(reader, writer, hub, limits)
            finally:
                connections.discard(task)
                gate.release(source)

        server = await asyncio.start_server(on_connect, host, port, reuse_port=reuse_port or None)
        ports[FRONT_END] = server.sockets[0].getsockname()[1]
        log.info("audiosocket listening", extra={"port": ports[FRONT_END]})
        try:
            yield
        finally:
            server.close()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            await server.wait_closed()

    return context
