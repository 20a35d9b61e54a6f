"""The call record API on the audio/API port.

- `GET /v1/calls?front_end=&status=&since=&until=&limit=&offset=` — newest first, paginated;
  with `q=words`, only calls whose transcript holds every word (api/search.py), each with a
  `match`: the leg and a snippet of its best segment, matches in `<mark>`.
- `GET /v1/calls/{id}` — one call, its labels and legs.
- `GET /v1/calls/{id}/transcript?format=json|txt|vtt|srt` — legs interleaved by time, labelled.
- `DELETE /v1/calls/{id}` — a finished call and its transcript (409 while it is live).
- `WS /v1/calls/{id}/events` — that call's events, live (the same messages as `/v1/events`).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Final

from aiohttp import web

from api import search
from api.routes.events import stream_events
from api.store import Line, Store, transcript_lines
from api.transcribe import clock, subrip
from telephony.call import CallHub

STORE: Final = web.AppKey("store", Store)
CALLS_HUB: Final = web.AppKey("calls_hub", CallHub)
MAX_LIMIT: Final = 500


def render(lines: list[Line], fmt: str) -> str:
    if fmt == "txt":
        return "".join(f"[{clock(x.start, '.')}] {x.leg}: {x.text}\n" for x in lines)
    if fmt == "vtt":
        cues = [
            f"{clock(x.start, '.')} --> {clock(x.end, '.')}\n<v {x.leg}>{x.text}\n" for x in lines
        ]
        return "WEBVTT\n\n" + "\n".join(cues)
    return subrip((x.start, x.end, f"{x.leg}: {x.text}") for x in lines)


def _number(request: web.Request, name: str, default: float | None) -> float | None:
    """A finite number within SQLite's 64-bit range (nan, inf, 1e309, 1e30 are 400)."""
    value = request.query.get(name)
    if value is None:
        return default
    try:
        number = float(value)
        if not math.isfinite(number) or abs(number) >= 2**63:
            raise ValueError(value)
        return number
    except ValueError:
        raise web.HTTPBadRequest(
            text=f'{{"error": "bad_parameters", "reason": "{name} must be a number"}}',
            content_type="application/json",
        ) from None


def _bad(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": "bad_parameters", "reason": reason}),
        content_type="application/json",
    )


async def list_calls(request: web.Request) -> web.Response:
    limit = int(_number(request, "limit", 50) or 50)
    offset = int(_number(request, "offset", 0) or 0)
    limit = max(1, min(MAX_LIMIT, limit))
    q = request.query.get("q", "").strip()
    try:
        terms = search.parse_query(q) if q else ()
    except search.BadQuery as exc:
        raise _bad(str(exc)) from None
    filters: dict[str, Any] = {
        "front_end": request.query.get("front_end"),
        "status": request.query.get("status"),
        "since": _number(request, "since", None),
        "until": _number(request, "until", None),
        "limit": limit,
        "offset": offset,
    }
    store = request.app[STORE]
    loop = asyncio.get_running_loop()
    if terms:
        result = await loop.run_in_executor(None, lambda: store.search_calls(terms, **filters))
        listed = [{**c.to_json(), "match": s.to_json() if s else None} for c, s in result.calls]
        total, exact = result.total, result.exact
    else:
        calls, total = await loop.run_in_executor(None, lambda: store.list_calls(**filters))
        listed = [c.to_json() for c in calls]
        exact = True
    body: dict[str, Any] = {
        "calls": listed,
        "total": total,
        "total_exact": exact,  # false: a search counted this many and stopped ("at least")
        "limit": limit,
        "offset": offset,
    }
    if terms:
        body["q"] = list(terms)
    if offset + len(listed) < total or (not exact and len(listed) == limit):
        body["next_offset"] = offset + len(listed)
    return web.json_response(body)


async def get_call(request: web.Request) -> web.Response:
    call = await asyncio.get_running_loop().run_in_executor(
        None, request.app[STORE].get_call, request.match_info["call_id"]
    )
    if call is None:
        raise web.HTTPNotFound(text='{"error": "not_found"}', content_type="application/json")
    return web.json_response(call.to_json())


async def get_transcript(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "txt", "vtt", "srt"):
        return web.json_response(
            {"error": "bad_parameters", "reason": "format must be json, txt, vtt or srt"},
            status=400,
        )
    store = request.app[STORE]
    call_id = request.match_info["call_id"]
    loop = asyncio.get_running_loop()
    call = await loop.run_in_executor(None, store.get_call, call_id)
    if call is None:
        raise web.HTTPNotFound(text='{"error": "not_found"}', content_type="application/json")
    events = await loop.run_in_executor(None, store.get_events, call_id, ("segment", "word"))
    lines = transcript_lines(events)
    if fmt == "json":
        return web.json_response(
            {
                "call": call.to_json(),
                "segments": [x.__dict__ for x in lines],
                "words": [
                    {"leg": e.leg, "text": e.text, "start": e.start_s, "end": e.end_s}
                    # the engine's confidence (0..1) where it gave one
                    | ({"confidence": e.payload["confidence"]} if "confidence" in e.payload else {})
                    for e in events
                    if e.type == "word"
                ],
            }
        )
    types = {"txt": "text/plain", "vtt": "text/vtt", "srt": "application/x-subrip"}
    return web.Response(text=render(lines, fmt), content_type=types[fmt])


async def delete_call(request: web.Request) -> web.Response:
    call_id = request.match_info["call_id"]
    result = await asyncio.get_running_loop().run_in_executor(
        None, request.app[STORE].delete_call, call_id
    )
    if result == "missing":
        raise web.HTTPNotFound(text='{"error": "not_found"}', content_type="application/json")
    if result == "live":
        return web.json_response(
            {"error": "call_live", "reason": "the call is live; delete it once it has ended"},
            status=409,
        )
    return web.json_response({"deleted": call_id})


async def call_events(request: web.Request) -> web.StreamResponse:
    return await stream_events(request, request.app[CALLS_HUB], request.match_info["call_id"])


def add_routes(app: web.Application, store: Store, hub: CallHub) -> None:
    app[STORE] = store
    app[CALLS_HUB] = hub
    app.router.add_get("/v1/calls", list_calls)
    app.router.add_get("/v1/calls/{call_id}", get_call)
    app.router.add_get("/v1/calls/{call_id}/transcript", get_transcript)
    app.router.add_delete("/v1/calls/{call_id}", delete_call)
    app.router.add_get("/v1/calls/{call_id}/events", call_events)
