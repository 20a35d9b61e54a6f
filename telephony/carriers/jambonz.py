"""jambonz's `listen` verb (subprotocol audio.jambonz.org), sans I/O.

The first frame is text: the call's metadata (`sampleRate`, `mixType`, `callSid`, `from`, `to`,
... and the verb's own `metadata` keys merged at the top level). Then binary 16-bit
little-endian PCM at `sampleRate`: `mono` is the caller, `mixed` both parties in one channel,
`stereo` two channels interleaved, the caller's first. With `passDtmf`, DTMF comes as text
frames between the audio. A graceful end sends a zero-length binary frame and waits for the
server to close.
"""

from __future__ import annotations

from typing import Final

from telephony.audio import Encoding
from telephony.carriers.events import (
    STEREO_LEGS,
    AudioFormat,
    CarrierEvent,
    CarrierStreamError,
    Media,
    Skipped,
    Started,
    Stopped,
    dtmf_of,
)
from telephony.carriers.json_streams import flat_labels, json_object, rate_of

SUBPROTOCOL: Final = "audio.jambonz.org"
MIX_TYPES: Final = ("mono", "mixed", "stereo")


class JambonzCodec:
    def __init__(self) -> None:
        self.started: Started | None = None

    def receive(self, text: str) -> CarrierEvent:
        message = json_object(text)
        if isinstance(message, Skipped):
            if self.started is None:
                raise CarrierStreamError(f"the metadata frame is {message.reason}")
            return message
        if self.started is None:
            self.started = self._metadata(message)
            return self.started
        if message.get("event") == "dtmf":
            return dtmf_of(message.get("dtmf"))
        return Skipped(f"{str(message.get('event') or message.get('type'))[:40]} message")

    def receive_binary(self, data: bytes) -> CarrierEvent:
        if self.started is None:
            raise CarrierStreamError("audio before the metadata frame")
        if not data:  # mod_audio_fork's graceful shutdown: it waits for us to close
            return Stopped("graceful shutdown")
        if self.started.audio.channels == 2:
            return Media(None, data)
        return Media("caller", data)

    @staticmethod
    def _metadata(message: dict[str, object]) -> Started:
        mix = str(message.get("mixType", "mono")).lower()
        if mix not in MIX_TYPES:
            raise CarrierStreamError(f"mixType must be one of {', '.join(MIX_TYPES)}")
        stereo = mix == "stereo"
        labels = flat_labels(message)
        return Started(
            call_id=labels.get("callSid", ""),
            legs=STEREO_LEGS if stereo else ("caller",),
            audio=AudioFormat(
                Encoding.PCM16, rate_of(message.get("sampleRate", 8000)), 2 if stereo else 1
            ),
            labels=labels,
            parameters=labels,
        )
