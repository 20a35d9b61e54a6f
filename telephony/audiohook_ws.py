"""Genesys AudioHook at `/audiohook`: the aiohttp adapter around `AudioHookCodec`.

The upgrade request is checked first: `X-API-KEY` (an `[api] keys` key; api/auth.py reads it
from that header on this route) and the HTTP Message Signature under that key's client secret
(`[audiohook] client_secrets`). A bad, stale or missing signature gets 401 before the upgrade,
no sooner than 500 ms after the request came in (Genesys's reference server does both, the delay
against timing probes). Then one call per session, its id the session id: mono is one leg named
for its channel (`external`, the customer), stereo two (`external`, `internal`: the agent).
The Transcription Connector sends each leg's phrases back as final `transcript` events.

`AudioHookFront` is the session for the WebSocket adapter (telephony/ws_front.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import WSMessage, WSMsgType, web

from engine.base import BridgeError, EngineEvent, Segment
from telephony.audio import Encoding
from telephony.audiohook import (
    RATE,
    AudioHookCodec,
    AudioHookConfig,
    AudioHookError,
    ClientError,
    Close,
    Discarded,
    Ignored,
    Open,
    Paused,
    PhraseCutter,
    Ping,
    Resumed,
    Update,
    transcript_entity,
)
from telephony.audiohook_signature import SignatureCheck, verify_request
from telephony.call import Call, CallHub
from telephony.transcript import InvalidOptions, TranscriptOptions, transcript_options
from telephony.ws_front import (
    HUB,
    AudioFormat,
    FrontEvent,
    Media,
    OpenCall,
    Received,
    Reply,
    Skipped,
    Stopped,
    WsCodec,
    run_stream,
)

log = logging.getLogger(__name__)

FRONT_END: Final = "audiohook"
PATH: Final = "/audiohook"
MIN_FAILURE_S: Final = 0.5  # a refused signature is answered no sooner (upstream's 500 ms)
ENCODINGS: Final = {"PCMU": Encoding.MULAW, "L16": Encoding.PCM16}

CONFIG: Final = web.AppKey("audiohook_config", AudioHookConfig)
KEYS_ON: Final = web.AppKey("audiohook_keys_on", bool)


def secret_lookup(config: AudioHookConfig, keys_on: bool) -> dict[str, bytes] | None:
    """The secrets to check signatures against, or None when the route is open (no API keys
    and no client secrets: like every audio route without keys)."""
    secrets = config.secrets()
    if not secrets and not keys_on:
        return None
    return secrets


def check_request(request: web.Request) -> SignatureCheck:
    secrets = secret_lookup(request.app[CONFIG], request.app[KEYS_ON])
    if secrets is None:
        return SignatureCheck("VERIFIED")
    keys_on = request.app[KEYS_ON]

    def secret_for(key: str) -> bytes | None:
        # A key the API-key check admitted but with no client secret: an empty one, as the
        # reference server treats it (an unsigned request passes, a signed one cannot).
        return secrets.get(key, b"" if keys_on else None)

    return verify_request(request.headers, request.raw_path, secret_for)


async def handle(request: web.Request) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    began = loop.time()
    session_id = request.headers.get("Audiohook-Session-Id", "")
    try:
        session_id = str(uuid.UUID(session_id))
    except ValueError:
        return web.json_response(
            {"error": "bad_request", "reason": 'missing or invalid "audiohook-session-id"'},
            status=400,
        )
    check = check_request(request)
    if not check.verified:
        log.warning(
            "audiohook: signature refused: %s",
            check.code,
            extra={"front_end": FRONT_END, "remote": request.remote, "session_id": session_id},
        )
        await asyncio.sleep(max(0.0, began + MIN_FAILURE_S - loop.time()))
        return web.json_response(
            {"error": "unauthorized", "reason": f"signature verification failed: {check.code}"},
            status=401,
        )
    return await run_stream(request, AudioHookFront(request, session_id))


class AudioHookFront(WsCodec):
    """A session for the WebSocket adapter (telephony/ws_front.py): the codec, its open, each
    leg's phrase cutter. AudioHook answers errors in-band: a `disconnect` (once), after which
    the client sends `close` and gets `closed`; the socket itself is never refused."""

    front_end = FRONT_END
    closed_reason = "socket closed without close"

    def __init__(self, request: web.Request, session_id: str) -> None:
        self.codec = AudioHookCodec(session_id)
        self.headers = request.headers
        self.organization_id = request.headers.get("Audiohook-Organization-Id", "")
        self.languages = request.app[CONFIG].languages
        self.cutters: dict[str, PhraseCutter] = {}
        self._open: Open | None = None
        self._closing = False  # the client's `close` came: `closed` follows the call's end

    def refuse(self, info: str) -> FrontEvent:
        """A client error: `disconnect(error)`; later errors are not signalled (upstream's
        SIGNALED-ERROR state), and the client's `close` still gets `closed`."""
        if self.codec.state in ("disconnected", "closing", "closed"):
            return Skipped(f"{info} (not signalled again)")
        log.warning("audiohook: %s", info, extra=self._extra())
        return Reply(self.codec.disconnect("error", info))

    def receive(self, msg: WSMessage) -> Received:
        if msg.type == WSMsgType.BINARY:
            try:
                frame = self.codec.receive_audio(msg.data)
            except AudioHookError as exc:
                return self.refuse(f"Client Error: {exc}")
            media = tuple(Media(leg, payload) for leg, payload in frame.channels.items())
            return media[0] if len(media) == 1 else media
        if msg.type != WSMsgType.TEXT:
            return None
        try:
            event = self.codec.receive_text(msg.data)
        except AudioHookError as exc:
            return self.refuse(f"Client Error: {exc}")
        if isinstance(event, Open):
            return self.open(event)
        if isinstance(event, Ping):
            return Reply(self.codec.pong())
        if isinstance(event, Paused | Update):
            # The open phrase ends here: words after it go in a new event.
            for cutter in self.cutters.values():
                cutter.cut_at(event.position / RATE)
        elif isinstance(event, Close):
            if event.received != round(event.position * RATE):
                log.info(
                    "audiohook: close at %.3f s, %.3f s received",
                    event.position,
                    event.received / RATE,
                    extra=self._extra(),
                )
            self._closing = True
            return Stopped("close" + (f": {event.reason}" if event.reason else ""))
        elif isinstance(event, ClientError):
            log.warning(
                "audiohook: client error %d: %s",
                event.code,
                event.message[:200],
                extra=self._extra(),
            )
        elif isinstance(event, Ignored | Discarded | Resumed):
            log.debug("audiohook: %s", event, extra=self._extra())
        return None

    def open(self, event: Open) -> FrontEvent:
        if event.organization_id != self.organization_id.strip():
            log.warning("audiohook: organization id mismatch", extra=self._extra())
            return Reply(
                self.codec.disconnect(
                    "unauthorized",
                    'Mismatch between "organizationId" open parameter and '
                    '"audiohook-organization-id" header field',
                )
            )
        media = event.media
        if media is None:
            return self.refuse("No offered media format is supported (PCMU or L16 at 8000 Hz)")
        try:
            options = _options(event.custom_config)
        except InvalidOptions as exc:
            return self.refuse(str(exc))
        self._open = event
        audio = AudioFormat(ENCODINGS[media.format], RATE)
        return OpenCall(media.channels, audio, self.codec.id, self._labels(event), options)

    def call_opened(self, call: Call) -> Received:
        event = self._open
        assert event is not None and event.media is not None
        for index, leg in enumerate(event.media.channels):
            self.cutters[leg] = PhraseCutter(index)
        languages = self.languages if event.wants_languages else None
        return Reply(self.codec.opened(event.media, languages))

    def refused(self, exc: BridgeError) -> Received:
        return self.refuse(str(exc))

    def engine_ended(self, call: Call) -> Received:
        return self.refuse(f"Server error: transcription ended ({call.engine_reason})")

    def may_be_media(self, msg: WSMessage) -> bool:
        return msg.type == WSMsgType.BINARY

    def encode_event(self, call: Call, leg: str, event: EngineEvent) -> list[str] | None:
        """The Transcription Connector: a final event per phrase of each engine segment."""
        if not isinstance(event, Segment) or not event.words or leg not in self.cutters:
            return None
        texts = []
        for phrase in self.cutters[leg].phrases(event.words):
            if not self.codec.can_send_events:
                break
            texts.append(self.codec.event([transcript_entity(phrase, self.codec.language)]))
        return texts

    def encode_farewell(self) -> str | None:
        return self.codec.closed() if self._closing else None

    def _labels(self, event: Open) -> dict[str, str]:
        labels: dict[str, str] = {}
        for key, value in event.custom_config.items():  # customConfig: the integration's own
            if key not in ("redact", "keyterm"):
                labels[str(key)] = value if isinstance(value, str) else json.dumps(value)
        labels.update(
            {
                "organization_id": event.organization_id,
                "conversation_id": event.conversation_id,
                "participant_id": event.participant.id,
                "session_id": self.codec.id,
                "correlation_id": self.headers.get("Audiohook-Correlation-Id", ""),
                "ani": event.participant.ani,
                "dnis": event.participant.dnis,
            }
        )
        if event.language:
            labels["language"] = event.language
        return {k: v for k, v in labels.items() if v}

    def _extra(self) -> dict[str, str]:
        return {"front_end": FRONT_END, "call_id": self.codec.id}


def _options(custom: Mapping[str, Any]) -> TranscriptOptions:
    """customConfig `redact` ("pci,ssn" or a list) and `keyterm` ("Xarelto, Siobhan" or a
    list), as Twilio's <Parameter>s give them."""

    def items(value: Any) -> list[str]:
        if isinstance(value, list):
            return [str(v) for v in value]
        return str(value or "").split(",")

    return transcript_options(items(custom.get("redact")), items(custom.get("keyterm")))


def add_routes(
    app: web.Application, hub: CallHub, config: AudioHookConfig, keys_on: bool = False
) -> None:
    """`keys_on`: `[api] keys` is set, so the middleware has checked X-API-KEY already."""
    app[HUB] = hub
    app[CONFIG] = config
    app[KEYS_ON] = keys_on
    app.router.add_get(PATH, handle)
