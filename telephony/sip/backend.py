"""The one small interface both SIP backends offer, and how the service starts the chosen one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from aiohttp import web

from api.config import SipConfig
from telephony.session import CallHub

PJSUA2_CALL_CAP = 4  # the pjsua2-python wheel's compiled-in PJSUA_MAX_CALLS (see the note)


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


def build_backend(config: SipConfig, hub: CallHub) -> SipBackend:
    if config.backend == "asyncio":
        from telephony.sip.asyncio_backend import AsyncioBackend

        return AsyncioBackend(config, hub)
    if config.backend == "pjsua2":
        from telephony.sip.pjsua2_backend import Pjsua2Backend

        return Pjsua2Backend(config, hub)
    raise ValueError(f"unknown sip.backend {config.backend!r} (choose asyncio or pjsua2)")


def describe(config: SipConfig, backend: SipBackend | None) -> dict[str, Any]:
    """What `/info` says about SIP."""
    if not config.enabled:
        return {"enabled": False}
    pjsua2 = config.backend == "pjsua2"
    return {
        "enabled": True,
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


def cleanup_context(
    config: SipConfig,
    hub: CallHub,
    ports: dict[str, int],
    keep: Callable[[SipBackend | None], None],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """For `app.cleanup_ctx`: the user agent runs while the audio app does; `keep` is told
    the running backend (for `/info`), and None once it has stopped."""

    async def run(app: web.Application) -> AsyncIterator[None]:
        backend = build_backend(config, hub)
        ports["sip"] = await backend.start()
        keep(backend)
        try:
            yield
        finally:
            keep(None)
            await backend.stop()

    return run
