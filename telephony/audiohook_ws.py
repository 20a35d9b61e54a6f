"""Genesys AudioHook at `/audiohook`: the aiohttp adapter around `AudioHookCodec`.

The upgrade request is checked first: `X-API-KEY` (an `[api] keys` key; api/auth.py reads it
from that header on this route) and the HTTP Message Signature under that key's client secret
(`[audiohook] client_secrets`). A bad, stale or missing signature gets 401 before the upgrade,
no sooner than 500 ms after the request came in (Genesys's reference server does both, the delay
against timing probes). Then one call per session, its id the session id: mono is one leg named
for its channel (`external`, the customer), stereo two (`external`, `internal`: the agent).
The Transcription Connector sends each leg's phrases back as final `transcript` events.

Written in the style of telephony/twilio.py's handler: telephony/ws_front.py had not landed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Final

from aiohttp import WSMsgType, web

from engine.base import BridgeError, EngineEvent, Segment
from telephony.audio import AudioDecoder, Encoding
from telephony.audiohook import (
    RATE,
    Audio,
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
from telephony.session import Call, CallHub
from telephony.transcript import InvalidOptions, TranscriptOptions, transcript_options
from telephony.ws_front import HUB, messages, open_websocket

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
    ws = open_websocket(request, read_by_messages=True)
    await ws.prepare(request)
    await AudioHookStream(request, ws, session_id).run()
    return ws


class AudioHookStream:
    """One session's state: the codec, its call, each leg's decoder and phrase cutter."""

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, session_id: str) -> None:
        self.request = request
        self.ws = ws
        self.codec = AudioHookCodec(session_id)
        self.organization_id = request.headers.get("Audiohook-Organization-Id", "")
        self.call: Call | None = None
        self.decoders: dict[str, AudioDecoder] = {}
        self.cutters: dict[str, PhraseCutter] = {}
        self.reason = "socket closed without close"
        self._sending = asyncio.Lock()  # seq numbers go out in the order they were given

    async def run(self) -> None:
        try:
            async for msg in messages(self.ws, self.request):
                if msg.type == WSMsgType.TEXT:
                    if await self.text(msg.data):
                        break
                elif msg.type == WSMsgType.BINARY:
                    await self.audio(msg.data)
        finally:
            await self.end()
            if not self.ws.closed:
                await self.ws.close()

    async def send(self, build: Any, *args: Any) -> None:
        async with self._sending:
            await self.ws.send_str(build(*args))

    async def refuse(self, info: str) -> None:
        """A client error: `disconnect(error)`; later errors are not signalled (upstream's
        SIGNALED-ERROR state), and the client's `close` still gets `closed`."""
        if self.codec.state in ("disconnected", "closing", "closed"):
            log.info("audiohook: %s (not signalled again)", info, extra=self._extra())
            return
        log.warning("audiohook: %s", info, extra=self._extra())
        await self.send(self.codec.disconnect, "error", info)

    async def text(self, text: str) -> bool:
        """One text message; True once the session is over (`closed` sent)."""
        try:
            event = self.codec.receive_text(text)
        except AudioHookError as exc:
            await self.refuse(f"Client Error: {exc}")
            return False
        if isinstance(event, Open):
            await self.open(event)
        elif isinstance(event, Ping):
            await self.send(self.codec.pong)
        elif isinstance(event, Paused | Update):
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
            self.reason = "close" + (f": {event.reason}" if event.reason else "")
            await self.end()
            await self.send(self.codec.closed)
            return True
        elif isinstance(event, ClientError):
            log.warning(
                "audiohook: client error %d: %s",
                event.code,
                event.message[:200],
                extra=self._extra(),
            )
        elif isinstance(event, Ignored | Discarded | Resumed):
            log.debug("audiohook: %s", event, extra=self._extra())
        return False

    async def open(self, event: Open) -> None:
        if event.organization_id != self.organization_id.strip():
            log.warning("audiohook: organization id mismatch", extra=self._extra())
            await self.send(
                self.codec.disconnect,
                "unauthorized",
                'Mismatch between "organizationId" open parameter and '
                '"audiohook-organization-id" header field',
            )
            return
        media = event.media
        if media is None:
            await self.refuse("No offered media format is supported (PCMU or L16 at 8000 Hz)")
            return
        try:
            call = self.request.app[HUB].open_call(
                FRONT_END,
                legs=media.channels,
                call_id=self.codec.id,
                labels=self._labels(event),
                reply=self.reply,
                options=_options(event.custom_config),
            )
        except (BridgeError, InvalidOptions) as exc:
            await self.refuse(str(exc))
            return
        self.call = call
        for index, leg in enumerate(media.channels):
            self.decoders[leg] = AudioDecoder(ENCODINGS[media.format], RATE, call.sample_rate)
            self.cutters[leg] = PhraseCutter(index)
        config = self.request.app[CONFIG]
        await self.send(
            self.codec.opened, media, config.languages if event.wants_languages else None
        )

    async def audio(self, data: bytes) -> None:
        try:
            frame = self.codec.receive_audio(data)
        except AudioHookError as exc:
            await self.refuse(f"Client Error: {exc}")
            return
        self.push(frame)
        if self.call is not None and self.call.ended:  # by the engine (a lost engine node)
            await self.refuse(f"Server error: transcription ended ({self.call.engine_reason})")

    def push(self, frame: Audio) -> None:
        call = self.call
        if call is None or call.ended:
            return
        for leg, payload in frame.channels.items():
            pcm = self.decoders[leg].feed(payload)
            if len(pcm):
                call.leg(leg).push(pcm)

    async def reply(self, leg: str, event: EngineEvent) -> None:
        """The Transcription Connector: a final event per phrase of each engine segment."""
        if not isinstance(event, Segment) or not event.words or leg not in self.cutters:
            return
        for phrase in self.cutters[leg].phrases(event.words):
            if not self.codec.can_send_events or self.ws.closed:
                return
            entity = transcript_entity(phrase, self.codec.language)
            await self.send(self.codec.event, [entity])

    async def end(self) -> None:
        """Flush every leg and end the call: its last phrases go out before `closed`."""
        call = self.call
        if call is None or call.ended:
            if call is not None:
                await asyncio.shield(call.end(self.reason))  # returns once announced
            return
        for leg, decoder in self.decoders.items():
            call.leg(leg).push(decoder.flush())
        await asyncio.shield(call.end(self.reason))

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
                "correlation_id": self.request.headers.get("Audiohook-Correlation-Id", ""),
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
