"""Asterisk AudioSocket (TCP, :9092): Asterisk connects, sends a UUID, then audio and DTMF.

Each message is a 3-byte header (kind, big-endian payload length) and the payload. Kinds:
0x00 hangup, 0x01 UUID (16 bytes), 0x03 DTMF (1 ASCII byte), 0x10-0x18 signed 16-bit LE
mono audio at 8/12/16/24/32/44.1/48/96/192 kHz, 0xFF error. One bad header ends the session:
the protocol has no way to resync. See ../shared/protocols/audiosocket.md.

`AudioSocketCodec` is the protocol without I/O; `AudioSocketConnection` is the asyncio adapter
(a protocol, not a stream reader) and `audiosocket_server` the cleanup context that listens while
the service runs.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Final, cast

from aiohttp import web

from engine.base import BridgeError
from telephony.audio import AudioDecoder, Encoding, PcmArray, batch_phase
from telephony.call import Call, CallHub
from telephony.config import LimitsConfig
from telephony.dtmf import DTMF_DIGITS
from telephony.errors import ProtocolError
from telephony.limits import ConnectionGate, SourceLog

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
ALLOW_ALL: Final = ("0.0.0.0/0", "::/0")


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
        self._pending = bytearray()  # the start of a message cut by a read
        self._needed = 0  # how long `_pending` must grow before a message can be complete
        self._max_payload = max_payload
        self.call_id: uuid.UUID | None = None

    def feed(self, data: bytes) -> list[AudioSocketEvent]:
        # Parsed in place at an offset: a read of whole messages (the usual case) is sliced
        # once per payload, not copied into a buffer and cut out of it again.
        if self._pending:
            self._pending += data
            if len(self._pending) < self._needed:  # a trickling peer costs O(bytes), no more
                return []
            buffer = bytes(self._pending)
        else:
            buffer = data
        offset, size = 0, len(buffer)
        self._needed = HEADER.size
        events: list[AudioSocketEvent] = []
        while size - offset >= HEADER.size:
            kind, length = HEADER.unpack_from(buffer, offset)
            if length > self._max_payload:
                raise AudioSocketError(f"payload of {length} bytes (kind {kind:#04x}) is too long")
            if kind not in AUDIO_KINDS and kind not in (
                KIND_HANGUP,
                KIND_UUID,
                KIND_DTMF,
                KIND_ERROR,
            ):
                raise AudioSocketError(f"unknown message kind {kind:#04x}")
            start = offset + HEADER.size
            if size < start + length:
                self._needed = HEADER.size + length
                break
            offset = start + length
            events.append(self._message(kind, buffer[start:offset]))
        self._pending[:] = buffer[offset:]
        return events

    def end_of_stream(self) -> None:
        """The peer closed the connection: fine at a message boundary, an error mid-message."""
        if self._pending:
            raise AudioSocketError(
                f"connection closed inside a message ({len(self._pending)} bytes)"
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
        self.leg = call.leg("caller")
        self._decoder: AudioDecoder | None = None
        self._done_s = 0.0  # audio of decoders before a rate change

    def audio(self, event: Audio) -> None:
        if self._decoder is None or self._decoder.sample_rate != event.sample_rate:
            self.flush()  # a rate change mid-call: finish the old resampler's tail first
            self._done_s = self.leg.audio_s
            self._decoder = AudioDecoder(
                Encoding.PCM16,
                event.sample_rate,
                self.leg.call.sample_rate,
                phase=batch_phase(self.leg.call.id),
            )
        self.leg.push(self._decoder.feed(event.payload))

    def dtmf(self, digit: str) -> None:
        wire_s = self._decoder.seconds_in if self._decoder is not None else 0.0
        self.leg.dtmf(digit, self._done_s + wire_s)

    def flush(self) -> None:
        if self._decoder is not None:
            tail: PcmArray = self._decoder.flush()
            self.leg.push(tail)


class _Done(Exception):
    """The peer ended the call on purpose."""


class SourceAllowList:
    """`audiosocket.allow`: the networks Asterisk may connect from. AudioSocket carries no
    credential, so where it comes from is all there is to check; an IPv4 peer seen on a
    dual-stack socket (`::ffff:10.0.0.5`) is checked as the IPv4 address it is."""

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, source: str) -> bool:
        try:
            address = ipaddress.ip_address(source.split("%", 1)[0])  # no IPv6 zone
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


class _Listener:
    """What the connections of one listening socket share."""

    def __init__(
        self, hub: CallHub, limits: LimitsConfig, allow: Iterable[str] = ALLOW_ALL
    ) -> None:
        self.hub = hub
        self.limits = limits
        self.allow = SourceAllowList(allow)
        self.gate = ConnectionGate(limits.connections_per_ip, limits.connections_total)
        self.refusals = SourceLog(log)
        self.live: set[AudioSocketConnection] = set()
        self.ending: set[asyncio.Task[None]] = set()  # calls whose transcripts are finishing

    async def close(self) -> None:
        """End the calls still up (words kept) and wait until every transcript is finished."""
        for connection in list(self.live):
            connection.end("service stopped")
        await asyncio.gather(*self.ending, return_exceptions=True)


class AudioSocketConnection(asyncio.Protocol):
    """One Asterisk connection: one call, until either side hangs up.

    A protocol rather than a stream reader: each read is decoded and pushed inside
    `data_received`, with no task woken per 20 ms frame (resuming a coroutine per read was a
    third of this front end's cost). A peer that sends no UUID within `handshake_timeout_s`, or
    nothing for `idle_timeout_s`, is hung up on; so is a call the engine ends itself.
    Connections over `limits.connections_per_ip` / `connections_total` get a hangup message.
    """

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._codec = AudioSocketCodec(listener.limits.audiosocket_max_payload_bytes)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._source = "unknown"
        self._remote = "unknown"
        self._admitted = False
        self._call: Call | None = None
        self._leg: _Leg | None = None
        self._last = self._loop.time()
        self._watchdog: asyncio.TimerHandle | None = None
        self._over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is an asyncio.Transport in all but its class.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self._source, self._remote = str(peer[0]), f"{peer[0]}:{peer[1]}"
        listener = self._listener
        if not listener.allow.allows(self._source):
            listener.refusals.warning(
                self._source,
                "audiosocket connection from %s refused: not in audiosocket.allow",
                self._source,
            )
            self._transport.write(AudioSocketCodec.encode_hangup())
            self._transport.close()
            self._over = True
            return
        self._admitted = listener.gate.admit(self._source)
        if not self._admitted:
            listener.refusals.warning(
                self._source, "audiosocket connection from %s refused (limits)", self._source
            )
            self._transport.write(AudioSocketCodec.encode_hangup())
            self._transport.close()
            self._over = True
            return
        listener.live.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self._over:
            return
        self._last = self._loop.time()
        try:
            for event in self._codec.feed(data):
                self._handle(event)
        except _Done:
            return
        except BridgeError as exc:
            self._refuse(exc)
            return
        if self._call is not None and self._call.ended and not self._over:
            # Ended on our side (an engine node lost, a drain's deadline): hanging up is all
            # this protocol can say.
            self._refuse(f"call ended ({self._call.engine_reason or 'by the service'})")

    def eof_received(self) -> bool:
        try:
            self._codec.end_of_stream()
        except AudioSocketError as exc:
            self._refuse(exc)
        self.end("caller hung up")
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.end(f"connection lost: {exc}" if exc else "caller hung up")
        if self._admitted:
            self._admitted = False
            self._listener.live.discard(self)
            self._listener.gate.release(self._source)

    def end(self, reason: str) -> None:
        """Once: flush the leg, close the connection, end the call (its transcript finishes in
        a task the service waits for at shutdown)."""
        if self._over:
            return
        self._over = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._leg is not None:
            self._leg.flush()
        if self._transport is not None:
            self._transport.close()
        if self._call is not None:
            ending = self._listener.ending
            task = self._loop.create_task(self._call.end(reason))
            ending.add(task)
            task.add_done_callback(ending.discard)

    def _handle(self, event: AudioSocketEvent) -> None:
        if isinstance(event, Audio):  # first: nearly every message is audio
            if self._leg is not None:
                self._leg.audio(event)
        elif isinstance(event, Identified):
            self._call = self._listener.hub.open_call(
                FRONT_END,
                call_id=str(event.call_id),
                labels={"uuid": str(event.call_id), "remote": self._remote},
            )
            self._leg = _Leg(self._call)
        elif isinstance(event, Dtmf):
            if self._leg is not None:
                self._leg.dtmf(event.digit)
        else:
            self.end("peer hangup" if isinstance(event, Hangup) else f"peer error {event.code}")
            raise _Done

    def _refuse(self, why: BridgeError | str) -> None:
        """Full, draining, bad framing, silence or an engine gone: hang up this call only
        (the protocol has no codes)."""
        log.warning(
            "audiosocket call refused: %s",
            why,
            extra={"front_end": FRONT_END, "remote": self._remote},
        )
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(AudioSocketCodec.encode_hangup())
        self.end(f"rejected: {why}")

    def _watch(self) -> None:
        """One timer per connection, re-armed for what is left of the limit, not one per read."""
        if self._over:
            return
        limits = self._listener.limits
        limit = limits.handshake_timeout_s if self._call is None else limits.idle_timeout_s
        if limit <= 0:  # no limit
            self._watchdog = self._loop.call_later(1.0, self._watch)
            return
        wait = self._last + limit - self._loop.time()
        if wait <= 0:
            self._refuse(AudioSocketError(f"nothing received for {limit:g} s"))
            return
        self._watchdog = self._loop.call_later(wait, self._watch)


def audiosocket_server(
    host: str,
    port: int,
    hub: CallHub,
    ports: dict[str, int],
    limits: LimitsConfig | None = None,
    reuse_port: bool = False,
    on_problem: Callable[[str], None] | None = None,
    allow: Iterable[str] = ALLOW_ALL,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: listen for Asterisk while the application runs.
    `reuse_port`: SO_REUSEPORT, the port shared by a node's worker processes. When the port
    cannot be had, the service goes on without AudioSocket, as without SIP: one log line that
    names the setting, and `on_problem(why)` (for /info and /ready). `allow`: the source
    networks that may connect (`audiosocket.allow`); any other is sent a hangup at once."""
    listener = _Listener(hub, limits or LimitsConfig(), allow)

    async def context(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: AudioSocketConnection(listener), host, port, reuse_port=reuse_port or None
            )
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            why = "is taken by another program" if taken else f"cannot be bound ({exc.strerror})"
            problem = f"TCP port {port} on {host} {why}"
            log.error(
                "AudioSocket is off: %s; the other front ends carry on (audiosocket.port moves it)",
                problem,
            )
            if on_problem is not None:
                on_problem(problem)
            yield
            return
        ports[FRONT_END] = server.sockets[0].getsockname()[1]
        log.info("audiosocket listening", extra={"port": ports[FRONT_END]})
        try:
            yield
        finally:
            server.close()
            await listener.close()
            await server.wait_closed()

    return context
