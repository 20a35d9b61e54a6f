"""SDP offer/answer (RFC 3264) for a receive-only transcriber, and SIPREC bodies (RFC 7866).

We answer every audio stream we can decode with one G.711 payload type (PCMU or PCMA, the
caller's first choice) plus telephone-event when offered, `recvonly` since we never send
audio; streams we cannot use get port 0. An offer with no usable audio stream is refused
(488). A SIPREC INVITE carries multipart/mixed: the SDP with one stream per recorded party
and the recording metadata XML, which names the participant behind each stream's label.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Final

from telephony.audio import Encoding
from telephony.errors import ProtocolError

G711: Final = {"PCMU": (0, Encoding.MULAW), "PCMA": (8, Encoding.ALAW)}
_STATIC_NAMES: Final = {0: "PCMU", 8: "PCMA"}
_DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")


class SdpError(ProtocolError):
    """An SDP body we cannot parse (400)."""


class NoCommonCodec(ProtocolError):
    """A well-formed offer with no PCMU/PCMA audio stream (488 Not Acceptable Here)."""


@dataclass(frozen=True)
class MediaOffer:
    kind: str
    port: int
    proto: str
    formats: tuple[str, ...]
    rtpmap: dict[int, str] = field(default_factory=dict)  # pt -> "name/rate", names upper-case
    connection: str | None = None
    direction: str | None = None
    label: str | None = None  # a=label (SIPREC names its streams by it)

    def codec(self) -> tuple[int, Encoding] | None:
        """The first offered payload type that is G.711 at 8 kHz."""
        if self.kind != "audio" or self.port == 0 or "RTP/AVP" not in self.proto:
            return None
        for fmt in self.formats:
            if not fmt.isdigit():
                continue
            pt = int(fmt)
            name, _, rate = self.rtpmap.get(pt, _STATIC_NAMES.get(pt, "") + "/8000").partition("/")
            if name in G711 and rate.split("/")[0] == "8000":
                return pt, G711[name][1]
        return None

    def telephone_event(self) -> int | None:
        for pt, name in self.rtpmap.items():
            if name.startswith("TELEPHONE-EVENT/8000") and str(pt) in self.formats:
                return pt
        return None


@dataclass(frozen=True)
class SessionOffer:
    connection: str | None
    direction: str
    media: tuple[MediaOffer, ...]

    def address(self, media: MediaOffer) -> str | None:
        return media.connection or self.connection

    def on_hold(self, media: MediaOffer) -> bool:
        """No audio will come: the caller only receives, or nothing, or the 0.0.0.0 hold."""
        direction = media.direction or self.direction
        return direction in ("recvonly", "inactive") or self.address(media) == "0.0.0.0"


def parse_sdp(text: str) -> SessionOffer:
    connection: str | None = None
    session_direction = "sendrecv"
    media: list[dict[str, object]] = []
    lines = [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or not lines[0].startswith("v="):
        raise SdpError("SDP must start with v=")
    for line in lines:
        if len(line) < 2 or line[1] != "=":
            raise SdpError(f"not an SDP line: {line[:40]!r}")
        kind, value = line[0], line[2:]
        current = media[-1] if media else None
        if kind == "m":
            parts = value.split()
            if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
                raise SdpError(f"bad m= line: {value[:60]!r}")
            media.append(
                {
                    "kind": parts[0],
                    "port": int(parts[1].split("/")[0]),
                    "proto": parts[2],
                    "formats": tuple(parts[3:]),
                    "rtpmap": {},
                }
            )
        elif kind == "c":
            parts = value.split()
            if len(parts) != 3 or parts[0] != "IN":
                raise SdpError(f"bad c= line: {value[:60]!r}")
            address = parts[2].split("/")[0]
            if current is None:
                connection = address
            else:
                current["connection"] = address
        elif kind == "a":
            name, _, arg = value.partition(":")
            if name in _DIRECTIONS:
                if current is None:
                    session_direction = name
                else:
                    current["direction"] = name
            elif name == "rtpmap" and current is not None:
                match = re.fullmatch(r"(\d+)\s+(\S+)", arg.strip())
                if match is None:
                    raise SdpError(f"bad rtpmap: {arg[:60]!r}")
                rtpmap = current["rtpmap"]
                assert isinstance(rtpmap, dict)
                rtpmap[int(match[1])] = match[2].upper()
            elif name == "label" and current is not None:
                current["label"] = arg.strip()
    return SessionOffer(
        connection,
        session_direction,
        tuple(MediaOffer(**m) for m in media),  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class StreamAnswer:
    """What we take from one offered m= line (port None: refused with port 0)."""

    port: int | None
    payload_type: int | None = None
    encoding: Encoding | None = None
    dtmf_payload_type: int | None = None


def plan_answer(offer: SessionOffer) -> list[StreamAnswer | None]:
    """Per offered m= line: the codec we take, or None. Raises NoCommonCodec."""
    plan: list[StreamAnswer | None] = []
    for media in offer.media:
        codec = media.codec()
        if codec is None:
            plan.append(None)
        else:
            plan.append(StreamAnswer(None, codec[0], codec[1], media.telephone_event()))
    if not any(plan):
        offered = "; ".join(f"{m.kind} {' '.join(m.formats)}" for m in offer.media) or "nothing"
        raise NoCommonCodec(f"no PCMU/PCMA audio stream offered ({offered})")
    return plan


def build_answer(
    offer: SessionOffer, streams: list[StreamAnswer | None], local_ip: str, session_id: int
) -> str:
    """The SDP answer: one m= line per offered one, in order (RFC 3264 §6)."""
    family = "IP6" if ":" in local_ip else "IP4"
    lines = [
        "v=0",
        f"o=stt-bridge {session_id} {session_id} IN {family} {local_ip}",
        "s=stt-bridge",
        f"c=IN {family} {local_ip}",
        "t=0 0",
    ]
    for media, stream in zip(offer.media, streams, strict=True):
        if stream is None or stream.port is None or stream.payload_type is None:
            lines.append(f"m={media.kind} 0 {media.proto} {media.formats[0]}")
            continue
        pts = [stream.payload_type]
        if stream.dtmf_payload_type is not None:
            pts.append(stream.dtmf_payload_type)
        lines.append(f"m=audio {stream.port} RTP/AVP {' '.join(map(str, pts))}")
        name = "PCMU" if stream.encoding is Encoding.MULAW else "PCMA"
        lines.append(f"a=rtpmap:{stream.payload_type} {name}/8000")
        if stream.dtmf_payload_type is not None:
            lines.append(f"a=rtpmap:{stream.dtmf_payload_type} telephone-event/8000")
            lines.append(f"a=fmtp:{stream.dtmf_payload_type} 0-15")
        if media.label is not None:
            lines.append(f"a=label:{media.label}")
        lines.append("a=ptime:20")
        lines.append("a=inactive" if offer.on_hold(media) else "a=recvonly")
    return "\r\n".join(lines) + "\r\n"


# --- SIPREC (RFC 7865 metadata, RFC 7866 protocol) -------------------------------------------

_RS_NS: Final = "{urn:ietf:params:xml:ns:recording:1}"


@dataclass(frozen=True)
class MultipartBody:
    sdp: str
    metadata: str | None


def split_multipart(content_type: str, body: bytes) -> MultipartBody:
    """The SDP and rs-metadata parts of a multipart/mixed SIPREC body."""
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if match is None:
        raise SdpError("multipart body without a boundary")
    delimiter = b"--" + match[1].encode()
    sdp: str | None = None
    metadata: str | None = None
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, sep, content = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = part.lstrip(b"\n").partition(b"\n\n")
        kind = ""
        for line in head.decode("utf-8", "replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                kind = value.strip().lower()
        text = content.decode("utf-8", "replace").rstrip("\r\n")
        if kind.startswith("application/sdp"):
            sdp = text
        elif kind.startswith("application/rs-metadata"):
            metadata = text
    if sdp is None:
        raise SdpError("multipart body without an application/sdp part")
    return MultipartBody(sdp, metadata)


def recording_participants(metadata: str) -> dict[str, str]:
    """Stream label -> the AoR (or name) of the participant who sends that stream."""
    try:
        root = ET.fromstring(metadata)
    except ET.ParseError as exc:
        raise SdpError(f"recording metadata is not XML: {exc}") from exc
    names: dict[str, str] = {}
    for participant in root.iter(f"{_RS_NS}participant"):
        pid = participant.get("participant_id") or participant.get("id") or ""
        name_id = participant.find(f"{_RS_NS}nameID")
        if name_id is not None:
            names[pid] = name_id.get("aor") or (name_id.findtext(f"{_RS_NS}name") or "")
    labels: dict[str, str] = {}
    for stream in root.iter(f"{_RS_NS}stream"):
        label = stream.findtext(f"{_RS_NS}label")
        sid = stream.get("stream_id") or stream.get("id") or ""
        if label:
            labels[sid] = label.strip()
    out: dict[str, str] = {}
    for assoc in root.iter(f"{_RS_NS}participantstreamassoc"):
        pid = assoc.get("participant_id") or ""
        for send in assoc.iter(f"{_RS_NS}send"):
            label = labels.get((send.text or "").strip())
            if label and pid in names:
                out[label] = names[pid]
    return out
