"""What a carrier codec yields: frozen events (the adapter's Media aside, built once per frame:
telephony/ws_front.py), one error type, and the wire format of a stream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from telephony.audio import WIRE_RATES
from telephony.dtmf import DTMF_DIGITS
from telephony.errors import ProtocolError
from telephony.ws_front import AudioFormat as WireFormat

# The adapter's own events, as the carriers' codecs yield them.
from telephony.ws_front import Dtmf as Dtmf
from telephony.ws_front import Media as Media
from telephony.ws_front import Skipped as Skipped
from telephony.ws_front import Stopped as Stopped

LEG_OF_TRACK: Final = {"inbound": "caller", "outbound": "agent"}
STEREO_LEGS: Final = ("caller", "agent")  # jambonz stereo: the caller's channel first


class CarrierStreamError(ProtocolError):
    """A message that makes the stream unusable: media before start, a codec we cannot decode,
    a second start. Closed with 1007 and the message as the reason."""


@dataclass(frozen=True)
class AudioFormat(WireFormat):
    """The adapter's wire format, refused at once when no decoder takes its rate."""

    def __post_init__(self) -> None:
        if self.rate not in WIRE_RATES:
            raise CarrierStreamError(f"unsupported sample rate {self.rate}")


@dataclass(frozen=True)
class Started:
    """The stream's first message: who the call is and how its audio comes."""

    call_id: str  # "" when the carrier sends none (a Vonage NCCO without the uuid header)
    legs: tuple[str, ...]
    audio: AudioFormat
    labels: Mapping[str, str] = field(default_factory=dict)
    # Custom parameters as the application set them: `redact` and `keyterm` are read here.
    parameters: Mapping[str, str] = field(default_factory=dict)


CarrierEvent = Started | Media | Dtmf | Stopped | Skipped


def dtmf_of(digit: object) -> Dtmf | Skipped:
    """A key as a carrier names it; anything but the sixteen DTMF keys is skipped."""
    text = str(digit)
    return Dtmf(text) if text in DTMF_DIGITS else Skipped(f"unknown DTMF digit {text[:8]!r}")


def legs_of(tracks: object, default: tuple[str, ...] = ("caller",)) -> tuple[str, ...]:
    """Legs for a track list (`["inbound", "outbound"]`) or a track setting (`both_tracks`,
    `both`, `inbound_track`); `default` for anything else."""
    names = tracks if isinstance(tracks, list) else str(tracks or "").split(",")
    found: list[str] = []
    for name in names:
        text = str(name).strip().lower().removesuffix("_track").removesuffix("_tracks")
        wanted = ["inbound", "outbound"] if text == "both" else [text]
        found += [LEG_OF_TRACK[t] for t in wanted if t in LEG_OF_TRACK]
    return tuple(leg for leg in STEREO_LEGS if leg in found) or default
