"""`WS /v1/events`: every call's events, live, as JSON text frames.

One message per event: `call_started` (front end, legs, labels), then each leg's `word`,
`segment`, `end_of_turn` and `closed` (with `call_id` and `leg`), then `call_ended`.
A subscriber that reads too slowly loses its own oldest-pending events, never the calls'.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from telephony.session import Subscription, bus_event_to_json
from telephony.websocket import HUB


async def handle_events(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    subscription = request.app[HUB].bus.subscribe(maxsize=10_000)
    forward = asyncio.create_task(_forward(subscription, ws))
    try:
        async for _ in ws:  # the client says nothing; this waits for it to leave
            pass
    finally:
        subscription.close()
        forward.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forward
    return ws


async def _forward(subscription: Subscription, ws: web.WebSocketResponse) -> None:
    async for event in subscription:
        if ws.closed:
            return
        await ws.send_json(bus_event_to_json(event))
