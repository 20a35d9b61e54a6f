"""Vonage Voice API WebSocket (NCCO `connect` to a `websocket` endpoint), sans I/O.

The first frame is text, `websocket:connected`, with the NCCO's `content-type` and every NCCO
`headers` field flattened beside it (Vonage sends no call id of its own: the application copies
the call's `uuid` there). Then binary frames of 16-bit little-endian PCM, mono, 20 ms each, with
JSON text events between them (`websocket:dtmf`). The socket is a conference participant: it
hears the mix of everyone else, one leg. The call ends when Vonage closes the socket.
"""

from __future__ import annotations

import re
from typing import Final

from telephony.audio import Encoding
from telephony.carriers.events import (
    AudioFormat,
    CarrierEvent,
    CarrierStreamError,
    Media,
    Skipped,
    Started,
    dtmf_of,
)
from telephony.carriers.json_streams import flat_labels, json_object, rate_of

CONNECTED: Final = "websocket:connected"
CONTENT_TYPE: Final = re.compile(r"\s*audio/l16\s*;\s*rate\s*=\s*(\d+)\s*$", re.IGNORECASE)
LEG: Final = "caller"  # the mix of everyone else on the conversation


class VonageCodec:
    def __init__(self) -> None:
        self.started: Started | None = None

    def receive(self, text: str) -> CarrierEvent:
        message = json_object(text)
        if isinstance(message, Skipped):
            return message
        kind = message.get("event")
        if kind == CONNECTED:
            if self.started is not None:
                raise CarrierStreamError("a second websocket:connected")
            self.started = self._connected(message)
            return self.started
        if self.started is None:
            raise CarrierStreamError(f"{str(kind)[:40]} before websocket:connected")
        if kind == "websocket:dtmf":
            # The digit at the top level (Voice API) or under `dtmf` (the Audio Connector).
            nested = message.get("dtmf")
            return dtmf_of(
                nested.get("digit") if isinstance(nested, dict) else message.get("digit")
            )
        return Skipped(f"{str(kind)[:40]} event")

    def receive_binary(self, data: bytes) -> CarrierEvent:
        if self.started is None:
            raise CarrierStreamError("audio before websocket:connected")
        return Media(LEG, data)

    @staticmethod
    def _connected(message: dict[str, object]) -> Started:
        content_type = str(message.get("content-type", "audio/l16;rate=16000"))
        matched = CONTENT_TYPE.match(content_type)
        if matched is None:
            raise CarrierStreamError(f"unsupported content-type {content_type[:40]!r}")
        # Every header the NCCO set is kept: the uuid, conversation_uuid, from, to, custom.
        headers = flat_labels({k: v for k, v in message.items() if k not in ("event",)})
        return Started(
            call_id=headers.get("uuid", ""),
            legs=(LEG,),
            audio=AudioFormat(Encoding.PCM16, rate_of(matched.group(1))),
            labels=headers,
            parameters=headers,
        )
