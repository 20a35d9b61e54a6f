"""A faithful Genesys AudioHook client: the messages of ../shared/protocols/audiohook.md and
Genesys's reference client (purecloudlabs/audiohook-reference-implementation, client/ and
app/audiohook/src/client/clientsessionimpl.ts) over a real loopback WebSocket, signed as its
clientwebsocket.ts signs the upgrade. Genesys's own client cannot run in CI (npm)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from telephony.audiohook import RATE, duration
from telephony.audiohook_signature import sign_request

FRAME_S = 0.2  # Genesys sends 200 ms per binary frame


def signed_headers(
    url: str,
    api_key: str,
    secret: bytes | None,
    organization_id: str,
    session_id: str,
    correlation_id: str,
    created: int | None = None,
) -> dict[str, str]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = {
        "Audiohook-Organization-Id": organization_id,
        "Audiohook-Session-Id": session_id,
        "Audiohook-Correlation-Id": correlation_id,
        "X-API-KEY": api_key,
    }
    if secret is not None:
        components = {
            "@request-target": target,
            "@authority": parts.netloc,
            "audiohook-organization-id": organization_id,
            "audiohook-session-id": session_id,
            "audiohook-correlation-id": correlation_id,
            "x-api-key": api_key,
        }
        nonce = secrets.token_urlsafe(18)  # 24 characters, as randomBytes(18) in base-64
        stamp = int(time.time()) if created is None else created
        headers.update(sign_request(components, api_key, secret, nonce, stamp))
    return headers


class AudioHookPeer:
    """The client side of one session; every server message is checked for seq/clientseq."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self.ws = ws
        self.id = session_id
        self.seq = 0
        self.serverseq = 0
        self.samples = 0  # per channel sent: the position
        self.received: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            # The client aborts on a server seq that is not +1 (clientsessionimpl.ts).
            assert message["seq"] == self.serverseq + 1, message
            assert message["clientseq"] <= self.seq, message
            assert message["version"] == "2" and message["id"] == self.id, message
            self.serverseq = message["seq"]
            self.received.append(message)
            self._changed.set()

    async def send(self, kind: str, parameters: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        message = {
            "version": "2",
            "id": self.id,
            "type": kind,
            "seq": self.seq,
            "serverseq": self.serverseq,
            "position": duration(self.samples / RATE),
            "parameters": parameters,
        }
        await self.ws.send_str(json.dumps(message))
        return message

    async def audio(self, frame: bytes, channels: int = 1, width: int = 1) -> None:
        await self.ws.send_bytes(frame)
        self.samples += len(frame) // (channels * width)

    async def wait_for(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for message in self.received:
                    if message["type"] == kind:
                        return message
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["type"] == kind]

    async def open(
        self,
        organization_id: str,
        media: Sequence[dict[str, Any]],
        custom_config: dict[str, Any] | None = None,
        supported_languages: bool = False,
        conversation_id: str | None = None,
        participant_id: str | None = None,
    ) -> dict[str, Any]:
        await self.send(
            "open",
            {
                "organizationId": organization_id,
                "conversationId": conversation_id or str(uuid.uuid4()),
                "participant": {
                    "id": participant_id or str(uuid.uuid4()),
                    "ani": "+1-555-555-1234",
                    "aniName": "John Doe",
                    "dnis": "+1-800-555-6789",
                },
                "media": list(media),
                "language": "en-US",
                "customConfig": custom_config or {},
                "supportedLanguages": supported_languages,
            },
        )
        return await self.wait_for("opened", timeout=5)  # the client waits 5 s for it

    async def close(self) -> dict[str, Any]:
        await self.send("close", {"reason": "end"})
        return await self.wait_for("closed", timeout=60)

    def transcripts(self) -> list[dict[str, Any]]:
        """The first entity of each event, as Genesys's client keeps it."""
        return [m["parameters"]["entities"][0]["data"] for m in self.of("event")]

    async def stop(self) -> None:
        await self.ws.close()
        await self._reader


def media(*channels: str, fmt: str = "PCMU") -> dict[str, Any]:
    return {"type": "audio", "format": fmt, "channels": list(channels), "rate": RATE}


@asynccontextmanager
async def session(
    url: str,
    api_key: str,
    secret: bytes | None,
    organization_id: str,
    session_id: str | None = None,
) -> AsyncIterator[AudioHookPeer]:
    session_id = session_id or str(uuid.uuid4())
    headers = signed_headers(url, api_key, secret, organization_id, session_id, str(uuid.uuid4()))
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, headers=headers)
        peer = AudioHookPeer(ws, session_id)
        try:
            yield peer
        finally:
            await peer.stop()
