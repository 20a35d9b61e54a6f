"""Live events over WebSocket: `WS /v1/events` (every call) and `WS /v1/calls/{id}/events`.

One JSON text frame per event. First, a `call_started` for each call already live (so a view
opened mid-call knows what is going on), then as they happen: `call_started` (front end, legs,
labels), each leg's `word`, `segment`, `end_of_turn`, `dtmf` and `closed` (with `call_id` and
`leg`), then `call_ended`. In a cluster (api/cluster.py) every node's calls are here, the
snapshot included. The subscription's queue is bounded: a subscriber that reads too
slowly loses its own oldest-pending events (counted in `stt_bridge_live_events_dropped_total`),
never the calls'.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from aiohttp import WSCloseCode, web

from telephony.bus import CallStarted, Subscription, bus_event_to_json
from telephony.call import CallHub
from telephony.limits import limits_of
from telephony.ws_front import HUB

ALL_CALLS_QUEUE: Final = 10_000
ONE_CALL_QUEUE: Final = 1_000
# Calls live on other nodes of a cluster, by id (api/cluster.py keeps it).
REMOTE_CALLS: Final = web.AppKey("remote_calls", dict[str, CallStarted])


async def stream_events(
    request: web.Request, hub: CallHub, call_id: str | None
) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30.0)
    await ws.prepare(request)
    if hub.bus.subscriber_count >= limits_of(request).event_subscribers:
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too many event subscribers")
        return ws
    # Subscribe and take the snapshot in one step of the loop: no event falls in between.
    subscription = hub.bus.subscribe(
        maxsize=ALL_CALLS_QUEUE if call_id is None else ONE_CALL_QUEUE, call_id=call_id
    )
    live = [
        CallStarted(c.id, c.front_end, tuple(c.legs), dict(c.labels), c.started_at)
        for c in hub.calls.values()
        if call_id is None or c.id == call_id
    ]
    remote = request.app.get(REMOTE_CALLS, {})
    live += [c for c in remote.values() if call_id is None or c.call_id == call_id]
    forward = asyncio.create_task(_forward(live, subscription, ws))
    try:
        async for _ in ws:  # the client says nothing; this waits for it to leave
            pass
    finally:
        subscription.close()
        forward.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await forward
    return ws


async def handle_events(request: web.Request) -> web.StreamResponse:
    return await stream_events(request, request.app[HUB], None)


async def _forward(
    live: list[CallStarted], subscription: Subscription, ws: web.WebSocketResponse
) -> None:
    for started in live:
        await ws.send_json(bus_event_to_json(started))
    async for event in subscription:
        if ws.closed:
            return
        await ws.send_json(bus_event_to_json(event))
