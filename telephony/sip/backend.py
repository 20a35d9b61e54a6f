"""The one small interface both SIP backends offer, and how the service starts the chosen one."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from aiohttp import web

from telephony.call import CallHub
from telephony.config import LimitsConfig
from telephony.limits import LIMITS
from telephony.sip.config import PJSUA2_CALL_CAP, SipConfig

log = logging.getLogger(__name__)


class SipBackend(Protocol):
    name: str
    call_cap: int | None  # calls one process can carry; None = only the engine limits
    siprec: bool  # answers RFC 7866 recording INVITEs (two legs); else 488

    async def start(self) -> int:
        """Listen; returns the bound SIP port."""

    async def stop(self) -> None:
        """Hang up live calls (flushing their transcripts) and close every socket."""

    @property
    def live_calls(self) -> int: ...

    def status(self) -> dict[str, Any]:
        """Live details for `/info` (the pjsua2 agent's pid and restarts)."""


def build_backend(
    config: SipConfig, hub: CallHub, limits: LimitsConfig | None = None
) -> SipBackend:
    if config.backend == "asyncio":
        from telephony.sip.asyncio_backend import AsyncioBackend

        return AsyncioBackend(config, hub, limits)
    if config.backend == "pjsua2":
        from telephony.sip.pjsua2_backend import Pjsua2Backend

        return Pjsua2Backend(config, hub)
    raise ValueError(f"unknown sip.backend {config.backend!r} (choose asyncio or pjsua2)")


def describe(config: SipConfig, backend: SipBackend | None, problem: str = "") -> dict[str, Any]:
    """What `/info` says about SIP; `problem`: why it is not listening though enabled."""
    if not config.enabled:
        return {"enabled": False}
    pjsua2 = config.backend == "pjsua2"
    return {
        "enabled": True,
        "listening": not problem,
        **({"reason": problem} if problem else {}),
        **(backend.status() if backend is not None else {}),
        "backend": config.backend,
        "call_cap": PJSUA2_CALL_CAP if pjsua2 else None,
        "siprec": not pjsua2,
        "transports": ["udp", "tcp"] if config.tcp else ["udp"],
        "notes": (
            [
                f"pjsua2-python's build carries at most {PJSUA2_CALL_CAP} calls per process; "
                "more get 486 Busy Here",
                "PJSIP runs in its own agent process: if it fails, its calls end (transcripts "
                "kept) and a new agent takes the port",
                "no SIPREC: multipart recording INVITEs get 488 Not Acceptable Here",
            ]
            if pjsua2
            else []
        ),
    }


def port_problem(host: str, port: int, tcp: bool) -> str:
    """Why the SIP port cannot be had ("" when it can): bind it the way the user agent will,
    UDP and (with `tcp`) TCP, then let it go at once."""
    if port == 0:
        return ""
    kinds = [("UDP", socket.SOCK_DGRAM)] + ([("TCP", socket.SOCK_STREAM)] if tcp else [])
    for name, kind in kinds:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:  # as asyncio's server does: TIME_WAIT is no obstacle
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"{name} port {port} on {host} is taken by another program"
                return f"{name} port {port} on {host} cannot be bound ({exc.strerror})"
    return ""


def cleanup_context(
    config: SipConfig,
    hub: CallHub,
    ports: dict[str, int],
    keep: Callable[[SipBackend | None, str], None],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """For `app.cleanup_ctx`: the user agent runs while the audio app does; `keep` is told
    the running backend (for `/info`), and None once it has stopped. When its port cannot be
    had, the service goes on without SIP: one clear log line, and `keep(None, why)`."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        if config.backend == "asyncio":
            # The aiosipua internals the backend touches, checked against the installed release.
            from telephony.sip.aiosipua_check import mismatch

            problem = mismatch()
            if problem:
                log.error("SIP is off: %s", problem)
                keep(None, problem)
                yield
                return
        problem = port_problem(config.host, config.port, config.tcp)
        if problem:
            log.error("SIP is off: %s; the other front ends carry on (sip.port moves it)", problem)
            keep(None, problem)
            yield
            return
        backend = build_backend(config, hub, app.get(LIMITS))
        ports["sip"] = await backend.start()
        keep(backend, "")
        try:
            yield
        finally:
            keep(None, "")
            await backend.stop()

    return run
