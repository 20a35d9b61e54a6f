"""Optional REGISTER to a PBX or registrar, so stt-bridge can be an extension calls go to.

aiosipua's `Registration` sends REGISTER, answers the 401/407 digest challenge, refreshes at
90 % of the granted interval and unregisters at stop; this wires it to our UDP listener.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from aiosipua import SipUAC, SipUAS
from aiosipua.auth import SipDigestAuth
from aiosipua.headers import parse_uri
from aiosipua.registration import Registration, RegistrationState

from telephony.sip.config import SipConfig

log = logging.getLogger(__name__)


class Registrar:
    def __init__(self, config: SipConfig, uas: SipUAS, port: int) -> None:
        from telephony.sip.core import local_ip_for

        uri = parse_uri(config.register_uri)
        host = socket.gethostbyname(uri.host)
        self.target = (host, uri.port or 5060)
        self.uac = SipUAC(uas.transport, advertised_addr=(local_ip_for(host, config), port))
        uas.uac = self.uac  # responses to our REGISTERs reach the UAC through the UAS
        auth = (
            SipDigestAuth(config.register_user, config.register_password)
            if config.register_password
            else None
        )
        self.registration = Registration(
            self.uac,
            f"sip:{config.register_user or 'stt-bridge'}@{uri.host}",
            self.target,
            expires=config.register_expires_s,
            auth=auth,
            user_agent=config.user_agent,
        )
        self.registration.on_registered = lambda r: log.info(
            "registered at %s for %d s", config.register_uri, r.granted_expires
        )
        self.registration.on_failed = lambda r, status, reason: log.warning(
            "registration at %s failed: %d %s", config.register_uri, status, reason
        )

    @property
    def state(self) -> RegistrationState:
        return self.registration.state

    def start(self) -> None:
        self.registration.register()

    async def stop(self) -> None:
        if self.registration.state is RegistrationState.REGISTERED:
            self.registration.unregister()
            await asyncio.sleep(0.05)  # let the datagram leave before the socket closes
        self.uac.close()
