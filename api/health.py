"""The health port: `/health` (the seed's JSON), `/ready` (load balancers), `/info`."""

from __future__ import annotations

import datetime
import os
import time

from aiohttp import web

from api.bridge import BRIDGE, Bridge
from telephony.sip import backend as sip

SERVICE_NAME = "stt-bridge"


async def handle_health(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    return web.json_response(
        {
            "status": "healthy" if bridge.accepting else "draining",
            "websocket_available": bridge.accepting,
            "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
            "service": SERVICE_NAME,
        }
    )


def _sip_line(bridge: Bridge) -> str:
    """SIP in one line for `/ready`'s body; readiness itself does not depend on it."""
    config = bridge.config.sip
    if not config.enabled:
        return "disabled"
    if bridge.sip_problem:
        return f"not listening: {bridge.sip_problem}"
    return f"listening on {bridge.ports.get('sip', config.port)}"


def _audiosocket(bridge: Bridge) -> dict[str, object]:
    config = bridge.config.audiosocket
    problem = bridge.audiosocket_problem
    return {
        "enabled": config.enabled,
        "listening": config.enabled and not problem,
        "port": bridge.ports.get("audiosocket", config.port),
        **({"reason": problem} if problem else {}),
    }


async def handle_ready(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    free = bridge.engine.free_slots
    sip_line = _sip_line(bridge)
    if not bridge.accepting or bridge.hub.draining:
        return web.json_response(
            {"ready": False, "reason": "draining", "sip": sip_line}, status=503
        )
    if free <= 0:
        return web.json_response(
            {"ready": False, "reason": "no free engine slot", "free_slots": 0, "sip": sip_line},
            status=503,
        )
    if bridge.store.problem:  # calls would go on, but their events only wait in memory
        return web.json_response(
            {
                "ready": False,
                "reason": f"store unavailable: {bridge.store.problem}",
                "sip": sip_line,
            },
            status=503,
        )
    return web.json_response({"ready": True, "free_slots": free, "sip": sip_line})


async def handle_info(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    info = bridge.engine.info()
    return web.json_response(
        {
            "service": SERVICE_NAME,
            "version": bridge.version,
            "engine": {
                "name": info.name,
                "reason": bridge.choice.reason,
                "model": info.model,
                "device": info.device,
                "capacity": info.capacity,
                "free_slots": bridge.engine.free_slots,
                **info.extra,
            },
            "sip": sip.describe(bridge.config.sip, bridge.sip, bridge.sip_problem),
            "audiosocket": _audiosocket(bridge),
            "calls_live": len(bridge.hub.calls),  # this process's (with workers: this worker's)
            "node": bridge.store.node_id,  # with workers, `<node_id>/w<k>`: the one answering
            "pid": os.getpid(),
            "uptime_s": round(time.time() - bridge.started_at, 3),
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", handle_health)
    app.router.add_get("/ready", handle_ready)
    app.router.add_get("/info", handle_info)
