"""The `[sip]` section of the configuration, beside the SIP code that reads it; composed by
api/config.py."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from engine import config_checks as check

BACKENDS = ("asyncio", "pjsua2")
PJSUA2_CALL_CAP = 4  # the pjsua2-python wheel's compiled-in PJSUA_MAX_CALLS (see sip/backend.py)


@dataclass(frozen=True)
class SipConfig:
    enabled: bool = True  # on: answers calls on 5060; a taken port logs one line, SIP stays off
    backend: str = "asyncio"  # asyncio (aiosipua, scales) | pjsua2 (PJSIP, capped per process)
    host: str = "0.0.0.0"
    port: int = 5060  # UDP, and TCP on the same port (sip.tcp)
    tcp: bool = True
    advertised_host: str = ""  # address for SDP/Contact behind NAT; "" = the one peers reach
    rtp_port_min: int = 20000
    rtp_port_max: int = 20999
    allow: tuple[str, ...] = ("0.0.0.0/0", "::/0")  # source CIDRs; others get 403
    auth_user: str = ""  # set with auth_password to digest-challenge INVITEs
    auth_password: str = ""
    auth_realm: str = "stt-bridge"
    register_uri: str = ""  # e.g. sip:pbx.example.com:5060; "" = no registration
    register_user: str = ""
    register_password: str = ""
    register_expires_s: int = 300
    answer_delay_s: float = 0.0  # ring this long before answering
    rtp_timeout_s: float = 30.0  # no RTP for this long: hang up (callers vanish without BYE)
    max_call_s: float = 14400.0  # hang up calls longer than this
    hold_timeout_s: float = 3600.0  # on hold (no RTP expected) this long: hang up
    timer_t1_s: float = 0.5  # SIP T1: our 200 is resent T1, 2T1, .. 4 s; no ACK in 64*T1: BYE
    retry_after_s: int = 30  # Retry-After on 503 while draining
    user_agent: str = "stt-bridge"

    def __post_init__(self) -> None:
        check.no_negative_numbers("sip", self)
        check.choice("sip.backend", self.backend, BACKENDS)
        check.port("sip.port", self.port)
        check.port("sip.rtp_port_min", self.rtp_port_min, lowest=1)
        check.port("sip.rtp_port_max", self.rtp_port_max, lowest=1)
        if self.rtp_port_min > self.rtp_port_max:
            raise check.fail(
                "sip.rtp_port_max", self.rtp_port_max, "must be sip.rtp_port_min or more"
            )
        for network in self.allow:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise check.fail(
                    "sip.allow", network, "a CIDR like 10.0.0.0/8, 192.0.2.7 or ::/0"
                ) from None
        for name in ("rtp_timeout_s", "max_call_s", "hold_timeout_s", "timer_t1_s"):
            check.positive(f"sip.{name}", getattr(self, name))
