"""Lets the web page on the web port read the call API on the audio/API port.

The page (api/web/, the console) is served on `server.web_port`; `/v1/calls` lives on
`server.port`: another origin, so the browser shows the page a response only if it names the
page's origin (CORS). Only that origin is named: same host as the API was reached by, the web
port this service is bound to. Any other site a user visits gets no such header, so it cannot
read transcripts through the user's browser, keys on or off. Only the read routes
(GET `/v1/calls...`) answer, preflight included (`Authorization` is not a simple header); the
preflight is answered here, before the API key check, since browsers send it without the key.
Refusals (401, 403, 429) carry the header too, so the page can tell "a key is needed" from a
network failure.
"""

from __future__ import annotations

from typing import Final

from aiohttp import hdrs, web
from yarl import URL

from api.auth import Handler
from api.bridge import BRIDGE

READ_PREFIX: Final = "/v1/calls"
PREFLIGHT_MAX_AGE_S: Final = 600


def console_origin(request: web.Request) -> str | None:
    """The request's Origin when it is this service's own web page, else None."""
    origin = request.headers.get(hdrs.ORIGIN)
    path = request.path
    if not origin or not (path == READ_PREFIX or path.startswith(READ_PREFIX + "/")):
        return None
    try:
        url = URL(origin)
    except ValueError:
        return None
    web_port = request.app[BRIDGE].ports.get("web")
    if url.scheme not in ("http", "https") or web_port is None or url.port != web_port:
        return None
    return origin if url.host == request.url.host else None


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = console_origin(request)
    if origin is None or request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await handler(request)  # a WebSocket is not CORS's business: the key guards it
    preflight = hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    if request.method == hdrs.METH_OPTIONS and preflight:
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: "GET",
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: "Authorization",
                hdrs.ACCESS_CONTROL_MAX_AGE: str(PREFLIGHT_MAX_AGE_S),
                hdrs.VARY: hdrs.ORIGIN,
            },
        )
    allow = {hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin, hdrs.VARY: hdrs.ORIGIN}
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # a 404 or 400 raised by a route: the page reads it too
        exc.headers.update(allow)
        raise
    if not response.prepared:  # a streamed body's headers are gone already
        response.headers.update(allow)
    return response
