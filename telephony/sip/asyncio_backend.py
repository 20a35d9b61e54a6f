"""The default SIP backend: aiosipua (signalling) and our own RTP sockets, in the service's loop.

aiosipua does the SIP parsing and dialogs (100 Trying, CANCEL matching by branch, in-dialog
validation); this module adds what the library leaves to the application (see
../shared/protocols/sip.md, "Gotchas"): no answer after a CANCEL, a re-INVITE handler (hold,
address or codec change), RTP ports released on every end path, a 400 for requests the library
would silently drop, and digest challenges for INVITEs. RTP is received by plain datagram
sockets feeding `SipCall` (reorder window drained at BYE, so the last words stay).

No dialog can be left live by a caller that goes away (docs/sip.md, "When a caller
goes away"): our 200 is resent on T1 doubling (UDP) and a 200 never ACKed ends the call after
64*T1 (Timer H, UDP and TCP: aiosipua's own resending, UDP only and 32 s fixed, is off); a TCP
connection that closes before the caller's ACK ends its call at once; a CANCEL that crosses our 200
gets its 200 and leaves the call to the caller's ACK and BYE (RFC 3261 §9.2); after the ACK,
`SipCall`'s RTP and hold timeouts. aiosipua internals we still touch: aiosipua_check.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiosipua import SipUAS, TcpSipTransport, UdpSipTransport
from aiosipua.dialog import dialog_matches
from aiosipua.incoming_call import IncomingCall
from aiosipua.message import SipRequest, SipResponse
from aiosipua.utils import format_addr

from engine.base import BridgeError
from telephony.call import CallHub
from telephony.config import LimitsConfig
from telephony.limits import ConnectionGate, RateLimit, SourceLog
from telephony.sip import digest
from telephony.sip.config import SipConfig
from telephony.sip.core import (
    FRONT_END,
    AllowList,
    LegPlan,
    NoRtpPort,
    SipCall,
    authorized,
    bad_request,
    call_labels,
    local_ip_for,
    request_problem,
    sip_rejection,
)
from telephony.sip.registration import Registrar
from telephony.sip.sdp import (
    SdpError,
    SessionOffer,
    StreamAnswer,
    build_answer,
    parse_sdp,
    plan_answer,
    recording_participants,
    split_multipart,
)

log = logging.getLogger(__name__)

SIPREC_LEGS: Final = ("caller", "callee")
T2: Final = 4.0  # RFC 3261: the longest interval between two sends of our 200


# --- transports: aiosipua's, plus a 400 for what its parser would drop ------------------------


class _Guard:
    """Before aiosipua sees a message: the per-source rate limit (503), then a 400 for what its
    parser would drop. Over TCP: connections per source, and the handshake/idle timeouts."""

    rate: RateLimit
    notes: SourceLog
    seen: dict[tuple[str, int], float]

    def guard(self, limits: LimitsConfig) -> None:
        self.rate = RateLimit(limits.sip_requests_per_s)
        self.notes = SourceLog(log)
        self.seen = {}

    def _dispatch(self, data: bytes, addr: tuple[str, int]) -> None:
        self._heard(addr)
        if data.strip() == b"":
            return  # CRLF keep-alive (RFC 5626)
        if not self.rate.allow(addr[0]):
            self.notes.warning(addr[0], "SIP from %s over limits.sip_requests_per_s", addr[0])
            busy = bad_request(data, "rate limited", "503 Service Unavailable")
            if busy is not None:
                self._send_raw(busy, addr)
            return
        problem = request_problem(data)
        if problem is not None:
            log.warning("bad SIP message from %s: %s", addr[0], problem)
            reply = bad_request(data, problem)
            if reply is not None:
                self._send_raw(reply, addr)
            return
        super()._dispatch(data, addr)  # type: ignore[misc]

    def _send_raw(self, data: bytes, addr: tuple[str, int]) -> None:
        raise NotImplementedError

    def _heard(self, addr: tuple[str, int]) -> None:
        """A message came from `addr`. Only TCP keeps it (for its idle limit, dropped with the
        connection): kept per UDP source, it would grow with every port a scanner sends from."""


class _UdpProtocol(asyncio.DatagramProtocol):
    """aiosipua's asserts `isinstance(transport, asyncio.DatagramTransport)`, which CPython
    3.11's selector transport fails (a logged traceback per start); this one does not."""

    def __init__(self, owner: _Udp) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int] | Any) -> None:
        self.owner._dispatch(data, (str(addr[0]), int(addr[1])))


class _Udp(_Guard, UdpSipTransport):
    """Its own socket (start, send, stop): the base class's private socket stays unused."""

    datagrams: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        self.datagrams, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=self.local_addr
        )

    def send(self, message: SipRequest | SipResponse, addr: tuple[str, int]) -> None:
        if self.datagrams is None:
            raise RuntimeError("SIP UDP transport not started")
        self.datagrams.sendto(bytes(message), addr)

    async def stop(self) -> None:
        if self.datagrams is not None:
            self.datagrams.close()
            self.datagrams = None

    def _send_raw(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.datagrams is not None:
            self.datagrams.sendto(data, addr)


class _Tcp(_Guard, TcpSipTransport):
    limits: LimitsConfig
    gate: ConnectionGate
    in_call: Callable[[tuple[str, int]], bool]
    closed: Callable[[TcpSipTransport, tuple[str, int]], None]  # a caller's connection ended
    writers: dict[tuple[str, int], asyncio.StreamWriter]

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        addr = (str(peer[0]), int(peer[1])) if peer else ("0.0.0.0", 0)
        if not self.gate.admit(addr[0]):
            self.notes.warning(addr[0], "SIP TCP connection from %s refused (limits)", addr[0])
            writer.close()
            return
        self.writers[addr] = writer
        watchdog = asyncio.get_running_loop().create_task(self._watch(addr, writer))
        try:
            await super()._handle_connection(reader, writer)
        finally:
            watchdog.cancel()
            self.gate.release(addr[0])
            self.seen.pop(addr, None)
            self.writers.pop(addr, None)
            self.closed(self, addr)

    async def _watch(self, addr: tuple[str, int], writer: asyncio.StreamWriter) -> None:
        """Close a connection that sends no message within the handshake timeout, or none for
        `idle_timeout_s` while it carries no call (a PBX's connection stays up during calls)."""
        opened = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, self.limits.handshake_timeout_s / 4))
            now = time.monotonic()
            last = self.seen.get(addr)
            if last is None:
                if now - opened < self.limits.handshake_timeout_s:
                    continue
            elif now - last < self.limits.idle_timeout_s or self.in_call(addr):
                continue
            writer.transport.abort()
            return

    def _heard(self, addr: tuple[str, int]) -> None:
        self.seen[addr] = time.monotonic()

    def _send_raw(self, data: bytes, addr: tuple[str, int]) -> None:
        writer = self.writers.get(addr)
        if writer is not None:
            writer.write(data)


# --- RTP sockets -------------------------------------------------------------------------------


class _RtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, dialog: _Dialog, leg: str) -> None:
        self.dialog = dialog
        self.leg = leg

    def datagram_received(self, data: bytes, addr: tuple[str, int] | Any) -> None:
        if self.dialog.sip_call is not None:
            self.dialog.sip_call.feed_rtp(self.leg, data)


class RtpPorts:
    """Even ports from [low, high]; a port is taken by binding it, so other programs are safe."""

    def __init__(self, host: str, low: int, high: int) -> None:
        self.host = host
        self.ports = list(range(low + low % 2, high + 1, 2))
        self._next = random.randrange(len(self.ports)) if self.ports else 0
        self.in_use: set[int] = set()

    async def open(self, dialog: _Dialog, leg: str) -> tuple[asyncio.DatagramTransport, int]:
        loop = asyncio.get_running_loop()
        for _ in range(len(self.ports)):
            port = self.ports[self._next]
            self._next = (self._next + 1) % len(self.ports)
            if port in self.in_use:
                continue
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _RtpProtocol(dialog, leg), local_addr=(self.host, port)
                )
            except OSError:
                continue
            self.in_use.add(port)
            return transport, port
        raise NoRtpPort(f"no free RTP port in {self.ports[0]}-{self.ports[-1]}")

    def release(self, port: int) -> None:
        self.in_use.discard(port)


# --- one dialog --------------------------------------------------------------------------------


class _CallerGone(Exception):
    """A response could not be sent: the caller's TCP connection is gone."""


def _response(
    incoming: IncomingCall,
    status: int,
    reason: str,
    user_agent: str,
    headers: dict[str, str] | None = None,
    sdp: str = "",
) -> SipResponse:
    """A response to the call's (latest) INVITE, built with aiosipua's public dialog API."""
    transport = incoming.transport
    ours = incoming.advertised_addr or (transport.local_addr if transport else ("0.0.0.0", 5060))
    response = incoming.dialog.create_response(
        incoming.invite, status, reason, contact=f"<sip:{format_addr(*ours)}>"
    )
    if sdp:
        response.text = sdp
        response.headers.set_single("Content-Type", "application/sdp")
    response.headers.set_single("User-Agent", user_agent)
    for name, value in (headers or {}).items():
        response.headers.set_single(name, value)
    return response


def _send(incoming: IncomingCall, response: SipResponse) -> None:
    """Send a response to the caller; `_CallerGone` when its TCP connection has closed."""
    if incoming.transport is None:
        raise _CallerGone("no transport")
    try:
        incoming.transport.send_reply(response)
    except (RuntimeError, OSError) as exc:  # aiosipua: RuntimeError "No TCP connection to ..."
        raise _CallerGone(str(exc)) from exc


@dataclass(eq=False)
class _Dialog:
    backend: AsyncioBackend
    incoming: IncomingCall
    sip_call: SipCall | None = None
    rtp: dict[str, tuple[asyncio.DatagramTransport, int]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    closed: bool = False
    answered: bool = False  # our 200 is out
    ack_timer: asyncio.Task[None] | None = None  # Timer H for the latest 200, until its ACK
    acked_cseq: int = 0  # the CSeq number that ACK must carry
    confirmed: bool = False  # the caller ACKed our first 200
    gone: str = ""  # why it ended while `_answer` was busy, when not a CANCEL

    @property
    def call_id(self) -> str:
        return self.incoming.call_id

    def cancelled(self) -> bool:
        """Ended (CANCEL, the caller's connection closed, ...) while we were busy."""
        uas_call = self.backend.find(self.call_id)
        return (
            self.closed
            or uas_call is not self.incoming
            or self.incoming.dialog.state.name == "TERMINATED"
        )

    def accept(self, sdp: str) -> None:
        """Send our 200 (to the INVITE or a re-INVITE) and wait for its ACK: resent on T1
        doubling over UDP; none within 64*T1 ends the call (RFC 3261 §13.3.1.4)."""
        config = self.backend.config
        response = _response(self.incoming, 200, "OK", config.user_agent, sdp=sdp)
        _send(self.incoming, response)
        self.incoming.dialog.confirm()
        self.answered = True
        cseq = self.incoming.invite.cseq
        self.acked_cseq = cseq.seq if cseq is not None else 0
        if self.ack_timer is not None:
            self.ack_timer.cancel()
        self.ack_timer = asyncio.get_running_loop().create_task(self._wait_ack(response))

    def acked(self, ack: SipRequest) -> None:
        cseq = ack.cseq
        if self.ack_timer is not None and cseq is not None and cseq.seq == self.acked_cseq:
            self.ack_timer.cancel()
            self.ack_timer = None
            self.confirmed = True

    async def _wait_ack(self, response: SipResponse) -> None:
        loop = asyncio.get_running_loop()
        t1 = max(self.backend.config.timer_t1_s, 0.001)
        resend = not getattr(self.incoming.transport, "reliable", False)  # TCP: sent once
        deadline = loop.time() + 64 * t1
        interval = t1
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(interval, left))
            if resend and loop.time() < deadline:
                with contextlib.suppress(_CallerGone):
                    _send(self.incoming, response)
            interval = min(interval * 2, T2)
        self.ack_timer = None
        log.info(
            "no ACK for our 200 within 64*T1 (%.1f s): hanging up",
            64 * t1,
            extra={"call_id": self.call_id, "front_end": FRONT_END},
        )
        self.hangup()
        await self.finish("no ACK")

    def release(self) -> None:
        """Close RTP sockets and forget the dialog; every end path comes through here."""
        if self.closed:
            return
        self.closed = True
        if self.ack_timer is not None and self.ack_timer is not asyncio.current_task():
            self.ack_timer.cancel()
        self.ack_timer = None
        for transport, port in self.rtp.values():
            transport.close()
            self.backend.rtp_ports.release(port)
        self.rtp.clear()
        if self.backend.dialogs.get(self.call_id) is self:
            del self.backend.dialogs[self.call_id]
        # Out of aiosipua's table too (a private dict, see aiosipua_check): nothing public
        # removes a call we ended ourselves (our BYE, a rejection never ACKed), and every
        # such call would stay there. Later requests on it get the library's 481.
        for uas in self.backend.uases:
            if uas.get_call(self.call_id) is self.incoming:
                uas._calls.pop(self.call_id, None)

    def hangup(self) -> None:
        """Our side ends the call: BYE, then release (the SipCall flushes on its own).

        The BYE may have nowhere to go (a TCP caller that dropped its connection without one):
        the call is released all the same."""
        try:
            self.incoming.hangup()
        except Exception as exc:  # aiosipua: RuntimeError "No TCP connection", OSError
            log.info("BYE not sent: %s", exc, extra={"call_id": self.call_id})
        finally:
            self.release()

    async def finish(self, reason: str) -> None:
        self.release()
        if self.sip_call is not None:
            await self.sip_call.end(reason)


# --- the backend -------------------------------------------------------------------------------


class AsyncioBackend:
    name: str = "asyncio"
    call_cap: int | None = None
    siprec: bool = True

    def __init__(self, config: SipConfig, hub: CallHub, limits: LimitsConfig | None = None) -> None:
        self.config = config
        self.hub = hub
        self.limits = limits or LimitsConfig()
        self.allow = AllowList(config.allow)
        self.rtp_ports = RtpPorts(config.host, config.rtp_port_min, config.rtp_port_max)
        self.dialogs: dict[str, _Dialog] = {}
        self.uases: list[SipUAS] = []
        self.port = 0
        self.nonces = digest.NonceBook()
        self.registrar: Registrar | None = None
        self._session_ids = itertools.count(random.randrange(1 << 30))

    # -- life cycle --

    async def start(self) -> int:
        for attempt in range(10):  # port 0: until UDP and TCP get the same number
            udp = _Udp(local_addr=(self.config.host, self.config.port))
            udp.guard(self.limits)
            await self._listen(udp)
            assert udp.datagrams is not None
            self.port = int(udp.datagrams.get_extra_info("sockname")[1])
            udp.local_addr = (self.config.host, self.port)
            if not self.config.tcp:
                break
            tcp = _Tcp(local_addr=(self.config.host, self.port))
            tcp.guard(self.limits)
            tcp.limits = self.limits
            tcp.gate = ConnectionGate(self.limits.connections_per_ip, self.limits.connections_total)
            tcp.in_call = self._in_call
            tcp.closed = self._connection_closed
            tcp.writers = {}
            try:
                await self._listen(tcp)
                break
            except OSError:
                if self.config.port != 0 or attempt == 9:
                    raise
                await self.uases.pop().stop()
        if self.config.register_uri:
            self.registrar = Registrar(self.config, self.uases[0], self.port)
            self.registrar.start()
        log.info("SIP user agent listening", extra={"port": self.port, "backend": self.name})
        return self.port

    async def _listen(self, transport: UdpSipTransport | TcpSipTransport) -> None:
        # Our 200s are resent (and given up) by _Dialog.accept: T1 from the config, a Timer H
        # over TCP too.
        uas = SipUAS(transport, user_agent=self.config.user_agent, retransmit_2xx=False)
        uas.on_invite = self._on_invite
        uas.on_reinvite = self._on_reinvite
        uas.on_bye = self._on_bye
        uas.on_cancel = self._on_cancel
        uas.on_options = lambda request, addr: self._on_options(uas, request)
        await uas.start()
        library = transport.on_message
        assert library is not None

        def on_message(message: SipRequest | SipResponse, addr: tuple[str, int]) -> None:
            """Sees each parsed message around the library (the transport's public hook)."""
            if not isinstance(message, SipRequest):
                library(message, addr)
                return
            method = message.method.upper()
            if method == "CANCEL" and self._late_cancel(uas, message):
                return
            if method == "INVITE" and self._invite_resent(message):
                return
            library(message, addr)
            if method == "ACK":
                self._on_ack(message)

        transport.on_message = on_message
        self.uases.append(uas)

    async def stop(self) -> None:
        if self.registrar is not None:
            await self.registrar.stop()
        for dialog in list(self.dialogs.values()):
            if dialog.task is not None and not dialog.task.done():
                dialog.task.cancel()
            if dialog.incoming.dialog.state.name == "CONFIRMED":
                dialog.hangup()
            await dialog.finish("shutdown")
        for uas in self.uases:
            await uas.stop()
        self.uases.clear()

    def find(self, call_id: str) -> IncomingCall | None:
        for uas in self.uases:
            found = uas.get_call(call_id)
            if found is not None:
                return found
        return None

    def _in_call(self, addr: tuple[str, int]) -> bool:
        return any(d.incoming.source_addr == addr for d in self.dialogs.values())

    @property
    def live_calls(self) -> int:
        return len(self.dialogs)

    def status(self) -> dict[str, Any]:
        """For /info: dialogs held (ours or still in aiosipua's table) and RTP ports bound."""
        held = set(self.dialogs)
        for uas in self.uases:
            held.update(uas.active_calls)
        return {"dialogs": len(held), "rtp_ports_in_use": len(self.rtp_ports.in_use)}

    def _connection_closed(self, transport: TcpSipTransport, addr: tuple[str, int]) -> None:
        """A caller's TCP connection closed before it ACKed our first 200: the call ends now.
        Its 100, 180 and 200 travel on that connection, and a caller that drops it before the
        ACK is gone (a SIP scanner does exactly this; waiting for Timer H would hold a slot and
        a port 32 s per connection). After the ACK the call needs no SIP connection: RTP and
        its timeouts go on, and a BYE may come on a new connection."""
        for dialog in list(self.dialogs.values()):
            incoming = dialog.incoming
            on_it = incoming.transport is transport and incoming.source_addr == addr
            if on_it and not dialog.confirmed and not dialog.closed:
                log.info(
                    "caller's TCP connection closed before its ACK",
                    extra={"call_id": dialog.call_id, "front_end": FRONT_END},
                )
                dialog.gone = "caller gone"
                dialog.release()  # now: an answer under way sees it (`cancelled`)
                asyncio.get_running_loop().create_task(dialog.finish(dialog.gone))

    def _late_cancel(self, uas: SipUAS, cancel: SipRequest) -> bool:
        """A CANCEL that crossed our 200: it gets its own 200 and changes nothing (RFC 3261
        §9.2); the caller ACKs our 200 and sends BYE. Passed to aiosipua it would drop the call
        from its table, and that BYE would get 481 while the call stayed up."""
        dialog = self.dialogs.get(cancel.call_id or "")
        if dialog is None or not dialog.answered:
            return False
        response = dialog.incoming.dialog.create_response(cancel, 200, "OK")
        response.headers.set_single("User-Agent", self.config.user_agent)
        with contextlib.suppress(RuntimeError, OSError):
            uas.transport.send_reply(response)
        log.info("CANCEL after our 200: no effect", extra={"call_id": dialog.call_id})
        return True

    def _invite_resent(self, invite: SipRequest) -> bool:
        """The INVITE of a call we hold, sent again by the caller's transaction: the same top
        Via branch and CSeq (over UDP it resends after T1 without an answer, and a loaded event
        loop can read both copies at once). Its server transaction absorbs it (RFC 3261
        §17.2.1), with a 100 again while we have not answered, which stops the resending.
        Passed on, aiosipua would take it for a new call, and ours would refuse it as the
        same call twice: a 482, on which the caller drops the call we took."""
        dialog = self.dialogs.get(invite.call_id or "")
        if dialog is None or dialog.closed:
            return False
        first = dialog.incoming.invite
        branch = _top_branch(first)
        if branch is None or branch != _top_branch(invite) or _cseq(first) != _cseq(invite):
            return False
        if not dialog.answered:  # after our 200, its own resending (`accept`) answers
            with contextlib.suppress(RuntimeError, OSError):
                dialog.incoming.trying()
        log.info("INVITE resent: absorbed", extra={"call_id": dialog.call_id})
        return True

    def _on_ack(self, ack: SipRequest) -> None:
        dialog = self.dialogs.get(ack.call_id or "")
        if dialog is not None and dialog_matches(dialog.incoming.dialog, ack):
            dialog.acked(ack)

    # -- aiosipua callbacks (synchronous: they start tasks) --

    def _on_options(self, uas: SipUAS, request: SipRequest) -> None:
        """A proxy's probe (Kamailio ds_ping): 200 while a call would be taken, 503 when the
        engine is full, the node is leaving or its store is away (`CallHub.unavailable`), so
        the proxy skips it before callers get 486."""
        full = (
            self.hub.leaving
            or self.hub.draining
            or self.hub.engine.free_slots <= 0
            or bool(self.hub.unavailable())
        )
        response = SipResponse(
            status_code=503 if full else 200,
            reason_phrase="Service Unavailable" if full else "OK",
        )
        for via in request.headers.get("via"):
            response.headers.append("Via", via)
        for name in ("From", "Call-ID", "CSeq"):
            value = request.headers.get_first(name.lower())
            if value:
                response.headers.set_single(name, value)
        to = request.headers.get_first("to") or ""
        response.headers.set_single(
            "To", to if ";tag=" in to else f"{to};tag={uuid.uuid4().hex[:8]}"
        )
        response.headers.set_single("Allow", "INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE, REFER")
        response.headers.set_single("User-Agent", self.config.user_agent)
        if full:
            response.headers.set_single("Retry-After", str(self.config.retry_after_s))
        uas.transport.send_reply(response)

    def _on_invite(self, incoming: IncomingCall) -> None:
        dialog = _Dialog(self, incoming)
        previous = self.dialogs.get(incoming.call_id)
        if previous is not None and not previous.closed:
            # Same Call-ID, not a re-INVITE (e.g. a retry after our 401): start over.
            previous.release()
        self.dialogs[incoming.call_id] = dialog
        dialog.task = asyncio.get_running_loop().create_task(self._answer(dialog))

    def _on_reinvite(self, incoming: IncomingCall) -> None:
        dialog = self.dialogs.get(incoming.call_id)
        if dialog is None or dialog.sip_call is None:
            incoming.reject(481, "Call/Transaction Does Not Exist")
            return
        try:
            offer, _ = self._offer(incoming.invite)
            plan = plan_answer(offer)
        except BridgeError as exc:
            # A refused re-INVITE leaves the call as it was (RFC 3261 §14.2).
            reject = sip_rejection(exc, self.config)
            with contextlib.suppress(_CallerGone):
                _send(
                    incoming,
                    _response(incoming, reject.status, reject.reason, self.config.user_agent),
                )
            return
        legs, streams = self._legs(dialog, offer, plan)
        dialog.sip_call.set_legs(legs)
        dialog.sip_call.set_hold(all(offer.on_hold(m) for m in offer.media if m.codec()))
        local_ip = local_ip_for(incoming.source_addr[0], self.config)
        answer = build_answer(offer, streams, local_ip, next(self._session_ids))
        try:
            dialog.accept(answer)
        except _CallerGone:  # the call goes on as it was; its timers still run
            log.info("re-INVITE not answered: caller gone", extra={"call_id": incoming.call_id})
            return
        log.info(
            "re-INVITE answered",
            extra={"call_id": incoming.call_id, "hold": dialog.sip_call.on_hold},
        )

    def _on_bye(self, incoming: IncomingCall, request: SipRequest) -> None:
        dialog = self.dialogs.get(incoming.call_id)
        if dialog is not None:
            asyncio.get_running_loop().create_task(dialog.finish("remote hangup"))

    def _on_cancel(self, request: SipRequest, addr: tuple[str, int]) -> None:
        dialog = self.dialogs.get(request.call_id or "")
        if dialog is not None and not dialog.answered:  # answered: _late_cancel kept it
            asyncio.get_running_loop().create_task(dialog.finish("cancelled"))

    # -- answering --

    async def _answer(self, dialog: _Dialog) -> None:
        incoming = dialog.incoming
        try:
            self.allow.check(incoming.source_addr[0])
            if self.config.auth_user and not self._authorized(incoming):
                return
            offer, participants = self._offer(incoming.invite)
            plan = plan_answer(offer)
            if (
                offer is not None
                and participants is not None
                and len([p for p in plan if p]) != len(SIPREC_LEGS)
            ):
                raise SdpError("a SIPREC offer must carry exactly two audio streams")
            labels = call_labels(_headers(incoming.invite), incoming.source_addr)
            legs, streams = self._legs(dialog, offer, plan)
            if participants is not None:
                labels["siprec"] = "true"
                for leg, media in zip(legs, [m for m in offer.media if m.codec()], strict=False):
                    if media.label and media.label in participants:
                        labels[f"{leg.name}_participant"] = participants[media.label]
            # Admission before ringing and before any port is taken: a full engine costs
            # nothing but a 486.
            dialog.sip_call = SipCall(
                self.hub, self.config, incoming.call_id, legs, labels, dialog.hangup
            )
            try:
                incoming.ringing()
            except (RuntimeError, OSError) as exc:  # its TCP connection is gone
                raise _CallerGone(str(exc)) from exc
            if self.config.answer_delay_s > 0:
                await asyncio.sleep(self.config.answer_delay_s)
            if dialog.cancelled():
                await dialog.finish(dialog.gone or "cancelled")
                return
            streams = await self._open_rtp(dialog, legs, streams)
            if dialog.cancelled():  # CANCEL arrived while the sockets were being bound
                await dialog.finish(dialog.gone or "cancelled")
                return
            local_ip = local_ip_for(incoming.source_addr[0], self.config)
            incoming.advertised_addr = (local_ip, self.port)
            answer = build_answer(offer, streams, local_ip, next(self._session_ids))
            dialog.accept(answer)
            dialog.sip_call.set_hold(all(offer.on_hold(m) for m in offer.media if m.codec()))
            dialog.sip_call.answered()
            log.info(
                "SIP call answered",
                extra={"call_id": incoming.call_id, "front_end": FRONT_END, "legs": len(legs)},
            )
        except BridgeError as exc:
            reject = sip_rejection(exc, self.config)
            log.info(
                "SIP call rejected %d: %s",
                reject.status,
                exc,
                extra={"call_id": incoming.call_id, "front_end": FRONT_END},
            )
            if not dialog.cancelled():
                response = _response(
                    incoming, reject.status, reject.reason, self.config.user_agent, reject.headers
                )
                with contextlib.suppress(_CallerGone):
                    _send(incoming, response)
                incoming.dialog.terminate()
            await dialog.finish(f"rejected {reject.status}")
        except _CallerGone as exc:
            log.info(
                "caller gone before the answer: %s",
                exc,
                extra={"call_id": incoming.call_id, "front_end": FRONT_END},
            )
            await dialog.finish("caller gone")
        except asyncio.CancelledError:
            await dialog.finish("shutdown")
            raise
        except Exception:  # a bug here must still end the call and free its slot and ports
            log.exception("answering failed", extra={"call_id": incoming.call_id})
            await dialog.finish("failed")

    def _offer(self, request: SipRequest) -> tuple[SessionOffer, dict[str, str] | None]:
        """The SDP offer, and for SIPREC the participant behind each stream label."""
        content_type = (request.content_type or "").lower()
        if content_type.startswith("multipart/"):
            parts = split_multipart(request.headers.get_first("content-type") or "", request.body)
            metadata = recording_participants(parts.metadata) if parts.metadata else {}
            return parse_sdp(parts.sdp), metadata
        if not request.body or not content_type.startswith("application/sdp"):
            # Delayed offer (SDP in the ACK) is not supported: we must know the codec now.
            from telephony.sip.sdp import NoCommonCodec

            raise NoCommonCodec("INVITE without an SDP offer")
        return parse_sdp(request.body.decode("utf-8", "replace")), None

    def _legs(
        self, dialog: _Dialog, offer: SessionOffer, plan: list[StreamAnswer | None]
    ) -> tuple[list[LegPlan], list[StreamAnswer | None]]:
        """Leg names for the usable streams (one: caller; SIPREC: caller, callee), with ports
        already bound on a re-INVITE."""
        usable = [p for p in plan if p is not None]
        names = ["caller"] if len(usable) == 1 else [*SIPREC_LEGS][: len(usable)]
        if len(usable) > len(SIPREC_LEGS):
            names = [f"stream{i}" for i in range(len(usable))]
        legs: list[LegPlan] = []
        streams: list[StreamAnswer | None] = []
        index = 0
        for stream in plan:
            if stream is None:
                streams.append(None)
                continue
            name = names[index]
            index += 1
            assert stream.payload_type is not None and stream.encoding is not None
            legs.append(
                LegPlan(name, {stream.payload_type: stream.encoding}, stream.dtmf_payload_type)
            )
            bound = dialog.rtp.get(name)
            streams.append(
                StreamAnswer(
                    bound[1] if bound else None,
                    stream.payload_type,
                    stream.encoding,
                    stream.dtmf_payload_type,
                )
            )
        return legs, streams

    async def _open_rtp(
        self, dialog: _Dialog, legs: list[LegPlan], streams: list[StreamAnswer | None]
    ) -> list[StreamAnswer | None]:
        out: list[StreamAnswer | None] = []
        legs_left = iter(legs)
        for stream in streams:
            if stream is None:
                out.append(None)
                continue
            leg = next(legs_left)
            transport, port = await self.rtp_ports.open(dialog, leg.name)
            if dialog.closed:  # ended meanwhile: give the port straight back
                transport.close()
                self.rtp_ports.release(port)
            else:
                dialog.rtp[leg.name] = (transport, port)
            out.append(
                StreamAnswer(port, stream.payload_type, stream.encoding, stream.dtmf_payload_type)
            )
        return out

    def _authorized(self, incoming: IncomingCall) -> bool:
        """Digest check (RFC 3261 §22): True, or False once the 401 challenge is sent; wrong
        credentials raise Forbidden (403)."""
        if authorized(incoming.invite.headers.get_first("authorization"), self.config, self.nonces):
            return True
        challenge = digest.challenge(self.config.auth_realm, self.nonces.issue())
        headers = {"WWW-Authenticate": challenge}
        response = _response(incoming, 401, "Unauthorized", self.config.user_agent, headers)
        with contextlib.suppress(_CallerGone):
            _send(incoming, response)
        incoming.dialog.terminate()
        # The dialog object stays until the ACK; the retry is a new INVITE (same Call-ID).
        dialog = self.dialogs.get(incoming.call_id)
        if dialog is not None and dialog.incoming is incoming:
            dialog.release()
        return False


def _headers(request: SipRequest) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, values in request.headers.items():
        out.extend((name, value) for value in values)
    return out


def _top_branch(request: SipRequest) -> str | None:
    vias = request.via
    return vias[0].branch if vias else None


def _cseq(request: SipRequest) -> tuple[int, str] | None:
    cseq = request.cseq
    return (cseq.seq, cseq.method.upper()) if cseq is not None else None
