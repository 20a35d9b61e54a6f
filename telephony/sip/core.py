"""The backend-neutral half of the SIP user agent: who may call, labels, and each call's wiring.

Both backends (`asyncio_backend`, `pjsua2_backend`) do only signalling and sockets; what a
call means to the bridge lives here: the source allow-list, the labels that go into the call
record, admission on the `CallHub` (its `EngineFull`/`Draining` become 486/503 through
`telephony.errors`), and `SipCall`, which turns each leg's RTP (or PCM) into audio at the
engine's rate, hangs up when RTP stops or the call runs past `max_call_s`, and flushes every
word at the end.
See ../shared/protocols/sip.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from aiosipua.message import SipMessage, SipRequest
from aiosipua.sdp import parse_sdp as aiosipua_sdp

from engine.base import BridgeError
from telephony.audio import Encoding, PcmArray, ResampleStream, batch_phase
from telephony.call import Call, CallHub, Draining
from telephony.errors import ProtocolError, rejection_for
from telephony.sip import digest
from telephony.sip.config import SipConfig
from telephony.sip.rtp import RTP_RATE, Audio, Dtmf, RtpReceiver
from telephony.sip.sdp import NoCommonCodec

log = logging.getLogger(__name__)

FRONT_END: Final = "sip"
_LABEL_MAX: Final = 256


class Forbidden(ProtocolError):
    """The source is outside the allow-list, or its digest credentials are wrong (403)."""


class NoRtpPort(BridgeError):
    """Every RTP port of the configured range is in use (503)."""


@dataclass(frozen=True)
class SipReject:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)


def sip_rejection(exc: BaseException, config: SipConfig) -> SipReject:
    """The one table of SIP answers to a call we do not take."""
    if isinstance(exc, Forbidden):
        return SipReject(403, "Forbidden")
    if isinstance(exc, NoCommonCodec):
        return SipReject(488, "Not Acceptable Here")
    if isinstance(exc, NoRtpPort):
        return SipReject(503, "Service Unavailable", {"Retry-After": str(config.retry_after_s)})
    rejection = rejection_for(exc)
    headers = {"Retry-After": str(config.retry_after_s)} if isinstance(exc, Draining) else {}
    return SipReject(rejection.sip_status, rejection.sip_reason, headers)


def authorized(authorization: str | None, config: SipConfig, nonces: digest.NonceBook) -> bool:
    """An INVITE's digest credentials (RFC 3261 §22): True when right; False when it is to be
    challenged (401: none yet, or a stale nonce); wrong ones raise Forbidden (403)."""
    verdict = digest.check(
        authorization,
        "INVITE",
        config.auth_user,
        config.auth_password,
        config.auth_realm,
        nonces,
    )
    if verdict is digest.Verdict.FORBIDDEN:
        raise Forbidden("digest authentication failed")
    return verdict is digest.Verdict.OK


class AllowList:
    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def check(self, source_ip: str) -> None:
        try:
            address = ipaddress.ip_address(source_ip)
        except ValueError:
            raise Forbidden(f"source {source_ip!r} is not an IP address") from None
        if not any(address in network for network in self.networks):
            raise Forbidden(f"source {source_ip} is not in sip.allow")


def call_labels(headers: Iterable[tuple[str, str]], source: tuple[str, int]) -> dict[str, str]:
    """Call-ID, From, To, P-Asserted-Identity and every X- header, as the call's labels."""
    wanted = {"call-id": "sip_call_id", "from": "from", "to": "to"}
    wanted["p-asserted-identity"] = "p_asserted_identity"
    labels = {"remote": f"{source[0]}:{source[1]}"}
    for name, value in headers:
        key = name.lower()
        label = wanted.get(key) or (key if key.startswith("x-") else None)
        if label is not None and label not in labels:
            labels[label] = _clean(value)
    return labels


def _clean(value: str) -> str:
    return "".join(c for c in value if c.isprintable())[:_LABEL_MAX]


def local_ip_for(peer_ip: str, config: SipConfig) -> str:
    """The address to put in SDP and Contact: the configured one, else the one the peer reaches."""
    if config.advertised_host:
        return config.advertised_host
    if config.host not in ("", "0.0.0.0", "::"):
        return config.host
    family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer_ip, 9))  # no packet is sent: this only asks the routing table
            address: str = probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
    return address


# --- malformed requests ------------------------------------------------------------------------

_COMPACT: Final = {"v": "via", "f": "from", "t": "to", "i": "call-id"}
_ECHOED: Final = ("via", "from", "to", "call-id", "cseq")


def request_problem(data: bytes) -> str | None:
    """Why a datagram is not a usable SIP message, or None when it is."""
    try:
        message = SipMessage.parse(data)
        if isinstance(message, SipRequest):
            missing = [h for h in _ECHOED if not message.headers.get(h)]
            if missing:
                return f"missing {', '.join(missing)}"
            cseq = message.cseq
            if cseq is None or cseq.method.upper() != message.method.upper():
                return "CSeq method does not match the request"
            _ = message.via
            if message.content_length != len(message.body):
                return "Content-Length does not match the body"
            content_type = (message.content_type or "").lower()
            if message.body and content_type.startswith("application/sdp"):
                # aiosipua parses the offer before any of our code runs; what it cannot parse
                # would get no answer at all.
                aiosipua_sdp(message.text)
    except Exception as exc:  # the parser's errors are ValueError/IndexError/...: all mean 400
        return f"unparseable: {exc}"
    return None


def bad_request(data: bytes, problem: str, status: str = "400 Bad Request") -> bytes | None:
    """A 400 echoing what can be read of the request's headers; None if it cannot be routed
    (no Via) or is not a request at all (a broken response gets no answer)."""
    text = data.decode("utf-8", "replace")
    head = re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]
    lines = re.split(r"\r?\n", head)
    if not lines or lines[0].startswith("SIP/"):
        return None
    echoed: list[str] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        key = _COMPACT.get(name.strip().lower(), name.strip().lower())
        if sep and key in _ECHOED:
            echoed.append(f"{key.title() if key != 'call-id' else 'Call-ID'}: {value.strip()}")
    if not any(line.lower().startswith("via:") for line in echoed):
        return None
    reason = status + " (" + "".join(c for c in problem if c.isprintable())[:80] + ")"
    out = [f"SIP/2.0 {reason}", *echoed, "Content-Length: 0", "", ""]
    return "\r\n".join(out).encode()


# --- one call ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegPlan:
    name: str
    payload_types: dict[int, Encoding]
    dtmf_payload_type: int | None


class SipCall:
    """One answered SIP call on the hub: audio in per leg, watchdogs, flush at the end.

    `hangup` is the backend's way to send BYE (and release its sockets); `end(reason)` is
    called for every way a call ends and is idempotent.
    """

    def __init__(
        self,
        hub: CallHub,
        config: SipConfig,
        call_id: str,
        legs: list[LegPlan],
        labels: dict[str, str],
        hangup: Callable[[], None],
    ) -> None:
        self.config = config
        self.hangup = hangup
        self.call: Call = hub.open_call(
            FRONT_END, legs=tuple(leg.name for leg in legs), call_id=call_id, labels=labels
        )
        self.receivers = {
            leg.name: RtpReceiver(leg.payload_types, leg.dtmf_payload_type) for leg in legs
        }
        self.resamplers = {
            leg.name: ResampleStream(
                RTP_RATE, self.call.sample_rate, phase=batch_phase(self.call.id)
            )
            for leg in legs
        }
        self.digits: list[str] = []
        self.on_hold = False
        self.ended = False
        self._answered_at = time.monotonic()
        self._last_media = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._ending: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.call.id

    def answered(self) -> None:
        """Start the RTP-timeout and call-length watchdog (call it once the 200 is out)."""
        self._answered_at = self._last_media = time.monotonic()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    def set_legs(self, legs: list[LegPlan]) -> None:
        """A re-INVITE may switch codec (PCMU <-> PCMA) or the telephone-event type."""
        for leg in legs:
            receiver = self.receivers.get(leg.name)
            if receiver is not None:
                receiver.payload_types = dict(leg.payload_types)
                receiver.dtmf_payload_type = leg.dtmf_payload_type

    def set_hold(self, on_hold: bool) -> None:
        """On hold no RTP is expected: `hold_timeout_s` applies instead of the RTP timeout,
        and both count from the re-INVITE."""
        self.on_hold = on_hold
        self._last_media = time.monotonic()

    def feed_rtp(self, leg: str, datagram: bytes) -> None:
        if self.ended:
            return
        self._last_media = time.monotonic()
        for out in self.receivers[leg].feed(datagram):
            self._deliver(leg, out)

    def feed_pcm(self, leg: str, pcm8k: PcmArray) -> None:
        """Audio a backend decoded itself (pjsua2's media port), 8 kHz. Such a backend plays
        silence when RTP stops, so it reports RTP itself with `media_seen`."""
        if self.ended:
            return
        self.call.leg(leg).push(self.resamplers[leg].process(pcm8k))

    def media_seen(self) -> None:
        """RTP arrived (for backends that do not hand us the packets)."""
        self._last_media = time.monotonic()

    def _deliver(self, leg: str, out: Audio | Dtmf) -> None:
        if isinstance(out, Audio):
            self.call.leg(leg).push(self.resamplers[leg].process(out.pcm))
        else:
            self.dtmf(leg, out.digit)

    def dtmf(self, leg: str, digit: str) -> None:
        """A key (RFC 4733 or the backend's own detection) becomes a `dtmf` bus event."""
        if self.call.ended:
            return
        self.digits.append(digit)
        self.call.leg(leg).dtmf(digit, self.resamplers[leg].seconds_in)
        log.info("dtmf %s", digit, extra={"call_id": self.id, "leg": leg, "front_end": FRONT_END})

    async def _watch(self) -> None:
        config = self.config
        tick = min(1.0, config.rtp_timeout_s / 4, config.max_call_s / 4, config.hold_timeout_s / 4)
        while True:
            await asyncio.sleep(max(tick, 0.01))
            now = time.monotonic()
            quiet = now - self._last_media
            if now - self._answered_at >= config.max_call_s:
                reason = "max call length"
            elif not self.on_hold and quiet >= config.rtp_timeout_s:
                reason = "rtp timeout"
            elif self.on_hold and quiet >= config.hold_timeout_s:
                # A caller that put us on hold and vanished sends neither RTP nor BYE.
                reason = "hold timeout"
            else:
                continue
            log.info("hanging up: %s", reason, extra={"call_id": self.id})
            try:
                self.hangup()
            except Exception:  # the BYE failed: the call still ends, its slot and port freed
                log.warning("hang-up failed", exc_info=True, extra={"call_id": self.id})
            self._ending = asyncio.get_running_loop().create_task(self.end(reason))
            return

    async def end(self, reason: str) -> None:
        """Play out what the reorder window holds, flush the engine, publish the end."""
        if self.ended:
            return
        self.ended = True
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
        for leg, receiver in self.receivers.items():
            for out in receiver.flush():
                self._deliver(leg, out)
            self.call.leg(leg).push(self.resamplers[leg].flush())
        # Shielded: a backend stopping mid-call must still flush the transcript.
        await asyncio.shield(self.call.end(reason))

    async def wait_ended(self) -> None:
        if self._ending is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ending
