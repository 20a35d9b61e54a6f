"""The front ends' sections of the configuration (`[audiosocket]`, `[twilio]`, `[limits]`),
beside the code that reads them; api/config.py composes them (SIP's: telephony/sip/config.py)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from engine import config_checks as check
from telephony.redaction import InvalidRedaction, parse_kinds


@dataclass(frozen=True)
class AudioSocketConfig:
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 9092  # Asterisk AudioSocket() / Dial(AudioSocket/...) connect here
    # Source CIDRs that may connect (the protocol carries no credential); others: hung up on.
    allow: tuple[str, ...] = ("0.0.0.0/0", "::/0")

    def __post_init__(self) -> None:
        check.port("audiosocket.port", self.port)
        for network in self.allow:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise check.fail(
                    "audiosocket.allow", network, "a CIDR like 10.0.0.0/8, 192.0.2.7 or ::/0"
                ) from None


@dataclass(frozen=True)
class TwilioConfig:
    auth_token: str = ""  # set it to check X-Twilio-Signature on the webhook and the stream
    public_url: str = ""  # e.g. https://stt.example.com: what Twilio reaches us at
    dial: str = ""  # after starting the stream, <Dial> this number; "" = <Pause>
    pause_s: int = 3600  # when not dialling: how long the call stays up

    def __post_init__(self) -> None:
        check.no_negative_numbers("twilio", self)
        if self.public_url and not self.public_url.startswith(("https://", "http://")):
            raise check.fail("twilio.public_url", self.public_url, "an https:// URL, or empty")


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may hold or send; over a limit it gets its protocol's rejection."""

    handshake_timeout_s: float = 10.0  # connected, no request/UUID/SIP message yet: closed
    idle_timeout_s: float = 60.0  # an open stream that sends nothing (or trickles a frame)
    http_request_timeout_s: float = 300.0  # one plain HTTP request, body and answer included
    connections_per_ip: int = 200  # open TCP connections from one address, per listener
    connections_total: int = 5000  # open TCP connections, per listener
    websocket_max_message_bytes: int = 4 * 1024 * 1024  # one WebSocket message (close 1009)
    moshi_max_message_bytes: int = 16 * 1024 * 1024  # one /api/asr-streaming message
    http_max_body_bytes: int = 1024 * 1024  # a plain request body (413); POST audio has its own
    min_body_bytes_per_s: float = 500.0  # a request body slower than this after the grace: 408
    body_rate_grace_s: float = 10.0  # seconds a body may take before its rate counts
    audiosocket_max_payload_bytes: int = 32768  # one AudioSocket message
    sip_requests_per_s: float = 50.0  # SIP messages from one address (beyond: 503)
    event_subscribers: int = 64  # open /v1/events and /v1/calls/{id}/events streams (1013)

    def __post_init__(self) -> None:
        check.no_negative_numbers("limits", self)


@dataclass(frozen=True)
class PrivacyConfig:
    """`[privacy]`: what every call's transcript is cleaned of before it leaves the engine
    (telephony/transcript.py); a stream's own `redact=` adds kinds, never removes one."""

    redact: tuple[str, ...] = ()  # pci | ssn | numbers (true) | pii; [] = nothing redacted
    hold_s: float = 4.0  # a number run may go on after a pause this long (a card read in groups)

    def __post_init__(self) -> None:
        try:
            parse_kinds(self.redact)
        except InvalidRedaction as exc:
            raise ValueError(f"privacy.redact: {exc}") from exc
        if not 0 <= self.hold_s <= 30:
            raise ValueError(f"privacy.hold_s = {self.hold_s}: between 0 and 30 seconds")

    @property
    def kinds(self) -> frozenset[str]:
        return parse_kinds(self.redact)
