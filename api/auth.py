"""API keys on the audio/API port, with per-key limits.

When `[api] keys` is set (STT_BRIDGE_API_KEYS, comma-separated), every audio and API route needs
one of them, as `Authorization: Bearer KEY` or `Authorization: Token KEY` (Deepgram clients; the
scheme in any case), `?token=KEY` (browsers cannot set headers on a WebSocket),
`Sec-WebSocket-Protocol: token, KEY` (Deepgram's browser form), `kyutai-api-key: KEY` or
`?auth_id=KEY` (moshi-server clients), HTTP Basic with the key as password (FreeSWITCH
mod_audio_fork can only send Basic) or, on `/audiohook` only, `X-API-KEY: KEY` (Genesys; its
signature is checked by telephony/audiohook_ws.py). Missing or wrong: 401; a WebSocket is
upgraded, then closed with 1008 and the reason, except on moshi-server's, Deepgram's, Twilio's
and AudioHook's routes
(`HTTP_REFUSAL_PATHS`, `HTTP_REFUSAL_SUFFIXES`), refused with the HTTP status before the upgrade
as those servers do.
Per key: at most `max_streams_per_key` WebSockets at once and `requests_per_minute` requests;
beyond either: 429. The web page and its static files stay open; so do Twilio's routes when
`twilio.auth_token` is set (Twilio signs each request instead). Without a Twilio token they need
a key like every audio route: Twilio's own requests carry none and are refused, so no client
can stream into `/twilio/media` unchecked. Keys are compared in constant time and never logged.

Each key has a scope (api/scopes.py): a key whose scope does not cover the route gets 403 (on a
WebSocket: closed with 1008 `forbidden: ...`, or 403 before the upgrade where 401 comes before
it). `required_scope` says which scope a route needs: sending audio needs `ingest`; reading
calls, transcripts, events and webhooks needs `read`; anything else, DELETE included, and any
route not named here, needs `admin`.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from aiohttp import WSCloseCode, web

from api import openai_files, scopes
from api.scopes import ADMIN, INGEST, READ
from telephony.deepgram import rejection_body

log = logging.getLogger(__name__)

OPEN_PATHS: Final = ("/config.json", "/static/")
TWILIO_PATHS: Final = ("/twilio/",)  # open when Twilio's signature guards them
# Routes that take audio (any method), by their path template; Deepgram's under any prefix too.
AUDIO_ROUTES: Final = frozenset(
    {
        "/",
        "/v1/stream",
        "/v1/listen",
        "/v1/audio/transcriptions",
        "/twilio/voice",
        "/twilio/media",
        "/freeswitch",
        "/freeswitch/{call_id}",
        "/asterisk/media",
        "/asterisk/aeap",
        "/api/asr-streaming",
        "/telnyx/media",
        "/plivo/media",
        "/vonage/media",
        "/exotel/media",
        "/signalwire/media",
        "/jambonz/listen",
        "/audiohook",
    }
)
AUDIO_SUFFIXES: Final = ("/v1/listen",)
# What `read` covers: GET under these (calls, transcripts, search, events, webhooks).
READ_PREFIXES: Final = ("/v1/calls", "/v1/events", "/v1/webhooks")
SCOPE_WORDS: Final = {INGEST: "send audio", READ: "read calls or events", ADMIN: "do this"}
# moshi-server answers 401 before the upgrade, and clients written for it expect that status.
# Twilio reports a refused handshake's status (its own signature check answers 403 there too).
# Genesys AudioHook reports a refused handshake's status too (its reference server: 401).
# Carriers report a refused handshake's status in their own call logs; so refused before it.
CARRIER_PATHS: Final = (
    "/telnyx/media",
    "/plivo/media",
    "/vonage/media",
    "/exotel/media",
    "/signalwire/media",
    "/jambonz/listen",
)
HTTP_REFUSAL_PATHS: Final = (*CARRIER_PATHS, "/api/asr-streaming", "/twilio/", "/audiohook")
# Deepgram's live route, also behind a base-URL prefix; its SDK reports the status as ApiError.
HTTP_REFUSAL_SUFFIXES: Final = ("/v1/listen",)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def presented_key(request: web.Request) -> str | None:
    if request.path == "/audiohook" and "X-API-KEY" in request.headers:
        return request.headers["X-API-KEY"]  # Genesys AudioHook sends its key only there
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() in ("bearer", "token"):
        return credentials.strip()
    if header.lower().startswith("basic "):
        try:
            _, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:  # binascii.Error, UnicodeDecodeError, a non-ASCII header
            return None
        return password
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(offered) == 2 and offered[0].lower() == "token":
        return offered[1]
    return (
        request.headers.get("kyutai-api-key")
        or request.query.get("token")
        or request.query.get("auth_id")  # moshi-server's query parameter
    )


def required_scope(method: str, template: str | None) -> str | None:
    """The scope a route needs, from its method and path template (`/v1/calls/{call_id}`);
    None for a request no route matched (a valid key of any scope gets its 404)."""
    if template is None:
        return None
    if template in AUDIO_ROUTES or template.endswith(AUDIO_SUFFIXES):
        return INGEST
    under_read = any(template == p or template.startswith(p + "/") for p in READ_PREFIXES)
    if under_read and method in ("GET", "HEAD"):
        return READ
    return ADMIN


def twilio_note(keys: Sequence[str], twilio_token: str) -> str:
    """For the start-up line: why Twilio's calls are refused (API keys on, no Twilio token), or
    "" when nothing needs saying."""
    if not any(keys) or twilio_token:
        return ""
    return (
        "Twilio refused: API keys are set and twilio.auth_token is not, so /twilio/* needs a "
        "key and Twilio's own requests (which carry none) get 401; set twilio.auth_token"
    )


def _template(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


class ApiKeys:
    def __init__(
        self,
        keys: Sequence[str],
        max_streams_per_key: int,
        requests_per_minute: int,
        twilio_signed: bool = False,
        signed_paths: Sequence[str] = (),
    ) -> None:
        """`keys`: `[api] keys` entries, each `KEY` or `KEY:scope`. `twilio_signed`: Twilio's
        token is set, so its routes are checked by signature and need no key. `signed_paths`:
        carrier routes checked by the carrier's own credential instead of a key."""
        self._scopes = scopes.key_scopes(keys)
        self._keys = tuple(self._scopes)
        self._open = OPEN_PATHS + (TWILIO_PATHS if twilio_signed else ()) + tuple(signed_paths)
        self._max_streams = max_streams_per_key
        self._per_minute = requests_per_minute
        self._streams: dict[str, int] = defaultdict(int)
        self._recent: dict[str, deque[float]] = defaultdict(deque)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _match(self, key: str | None) -> str | None:
        if key is None:
            return None
        found = None
        # A header that is not UTF-8 reaches us with surrogate escapes: still bytes to compare.
        presented = key.encode("utf-8", "surrogatepass")
        for candidate in self._keys:  # no early exit: the time does not tell which key is close
            if hmac.compare_digest(candidate.encode(), presented):
                found = candidate
        return found

    def _over_rate(self, key: str) -> bool:
        now = time.monotonic()
        recent = self._recent[key]
        while recent and recent[0] < now - 60:
            recent.popleft()
        if len(recent) >= self._per_minute:
            return True
        recent.append(now)
        return False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        is_stream = request.headers.get("Upgrade", "").lower() == "websocket"
        is_page = path == "/" and not is_stream
        if not self.enabled or is_page or path.startswith(self._open):
            return await handler(request)
        key = self._match(presented_key(request))
        if key is None:
            log.warning("unauthorized request", extra={"path": path, "remote": request.remote})
            return await _refuse(
                request, is_stream, 401, "unauthorized", "a valid API key is required"
            )
        if self._over_rate(key):
            return await _refuse(
                request, is_stream, 429, "rate_limited", "too many requests for this key"
            )
        needed = required_scope(request.method, _template(request))
        if needed is not None and not scopes.allows(self._scopes[key], needed):
            held = ",".join(sorted(self._scopes[key]))
            log.warning(
                "request outside the key's scope",
                extra={"path": path, "remote": request.remote, "scope": held, "needed": needed},
            )
            return await _refuse(
                request,
                is_stream,
                403,
                "forbidden",
                f"a {held} key may not {SCOPE_WORDS[needed]}: this needs a {needed} key",
            )
        if not is_stream:
            return await handler(request)
        if self._streams[key] >= self._max_streams:
            return await _refuse(
                request, is_stream, 429, "too_many_streams", "concurrent stream limit for this key"
            )
        self._streams[key] += 1
        try:
            return await handler(request)
        finally:
            self._streams[key] -= 1


async def _refuse(
    request: web.Request, is_stream: bool, status: int, error: str, reason: str
) -> web.StreamResponse:
    http_refusal = request.path.startswith(HTTP_REFUSAL_PATHS) or request.path.endswith(
        HTTP_REFUSAL_SUFFIXES
    )
    if not is_stream or http_refusal:
        headers = {"WWW-Authenticate": 'Bearer realm="stt-bridge"'} if status == 401 else {}
        body = refusal_body(request.path, status, error, reason)
        return web.json_response(body, status=status, headers=headers)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=f"{error}: {reason}".encode())
    return ws


# Where a route speaks another API, its clients read that API's error body: OpenAI's SDK
# shows `error.message`, Deepgram's shows `err_msg`.
OPENAI_CODES: Final = {401: "invalid_api_key", 403: "insufficient_permissions"}
OPENAI_TYPES: Final = {429: "requests"}
DEEPGRAM_CODES: Final = {
    401: "INVALID_AUTH",
    403: "INSUFFICIENT_PERMISSIONS",
    429: "TOO_MANY_REQUESTS",
}


def refusal_body(path: str, status: int, error: str, reason: str) -> dict[str, Any]:
    """The refusal in the error shape of the API the route speaks; ours elsewhere."""
    if path == openai_files.TRANSCRIPTIONS_PATH:
        return openai_files.error_body(
            reason,
            kind=OPENAI_TYPES.get(status, "invalid_request_error"),
            code=OPENAI_CODES.get(status, error),
        )
    if path.endswith("/v1/listen"):
        return rejection_body(DEEPGRAM_CODES.get(status, error), reason, str(uuid.uuid4()))
    return {"error": error, "reason": reason}
