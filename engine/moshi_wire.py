"""moshi-server's ASR protocol as bytes and messages, both directions, no I/O.

Its two halves meet here: the server on `/api/asr-streaming` (telephony/moshi_asr.py) reads
what a client says and writes what a server says; the remote engine (engine/remote.py) does
the opposite. Each WebSocket binary frame is one MessagePack map tagged by "type", as
moshi-server writes it (rmp-serde, struct-as-map, "type" first) and Kyutai's Python clients send
it (rust/moshi-server/src/batched_asr.rs, scripts/stt_from_file_rust_server.py;
../shared/protocols/kyutai-stt.md §5):
- client to server: `Audio{pcm}` (f32, 24 kHz mono), `OggOpus{data}`, `Marker{id}`, `Init`;
- server to client: `Ready`, `Word{text,start_time}`, `EndWord{stop_time}`, `Marker{id}`,
  `Step{step_idx,prs,buffered_pcm}`, `Error{message}`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

SAMPLE_RATE: Final = 24000  # the protocol's only rate for Audio.pcm and decoded Ogg/Opus
PATH: Final = "/api/asr-streaming"
NO_FREE_CHANNELS: Final = "no free channels"  # moshi-server's exact words for a full engine

_I64: Final = (-(2**63), 2**63 - 1)


class WireError(ValueError):
    """A frame that is not a moshi-server ASR message."""


# --- client to server -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Audio:
    """`Audio.pcm` as sent: numbers, nominally floats in [-1, 1]."""

    pcm: npt.NDArray[Any]


@dataclass(frozen=True)
class OggOpus:
    data: bytes


@dataclass(frozen=True)
class Marker:
    """Both ways: a client's marker, and the server's echo of it."""

    id: int


@dataclass(frozen=True)
class Init:
    """In moshi-server's enum for its own use (it queues one per connection)."""


ClientMessage = Audio | OggOpus | Marker | Init


# --- server to client -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Word:
    text: str
    start_time: float


@dataclass(frozen=True)
class EndWord:
    stop_time: float


@dataclass(frozen=True)
class Step:
    """Per model step, to clients of a model with VAD heads: pause probabilities."""

    step_idx: int
    prs: tuple[float, ...]
    buffered_pcm: int


@dataclass(frozen=True)
class Error:
    message: str


ServerMessage = Ready | Word | EndWord | Marker | Step | Error


# --- encoding ---------------------------------------------------------------------------------

_AUDIO_HEAD: Final = b"\x82\xa4type\xa5Audio\xa3pcm"  # {"type": "Audio", "pcm": ...
_F32: Final = np.dtype([("marker", "u1"), ("value", ">f4")])  # MessagePack float 32: 0xca + BE


def encode_audio(pcm: npt.NDArray[np.int16]) -> bytes:
    """`{"type": "Audio", "pcm": [f32, ...]}`, the bytes `msgpack.packb(...,
    use_single_float=True)` gives (as Kyutai's clients send), built without a Python list."""
    body = np.empty(len(pcm), dtype=_F32)
    body["marker"] = 0xCA
    body["value"] = pcm.astype(np.float32) / 32768.0
    n = len(pcm)
    if n < 16:
        head = bytes([0x90 | n])
    elif n < 1 << 16:
        head = b"\xdc" + struct.pack(">H", n)
    else:
        head = b"\xdd" + struct.pack(">I", n)
    return _AUDIO_HEAD + head + body.tobytes()


def encode(message: ServerMessage | Marker) -> bytes:
    """A server message (or a client's Marker, the same bytes) as moshi-server writes it."""
    packed: bytes = msgpack.packb(as_map(message), use_bin_type=True)
    return packed


def as_map(message: ServerMessage) -> dict[str, Any]:
    """The message as a map, "type" first: its MessagePack, and its JSON in a POST answer."""
    if isinstance(message, Word):
        return {"type": "Word", "text": message.text, "start_time": float(message.start_time)}
    if isinstance(message, EndWord):
        return {"type": "EndWord", "stop_time": float(message.stop_time)}
    if isinstance(message, Marker):
        return {"type": "Marker", "id": message.id}
    if isinstance(message, Step):
        return {
            "type": "Step",
            "step_idx": message.step_idx,
            "prs": list(message.prs),
            "buffered_pcm": message.buffered_pcm,
        }
    if isinstance(message, Error):
        return {"type": "Error", "message": message.message}
    return {"type": "Ready"}


# --- decoding ---------------------------------------------------------------------------------


def _unpack(frame: bytes) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # ExtraData too
        raise WireError(f"not a MessagePack message: {exc}") from None


def decode_client(frame: bytes) -> ClientMessage:
    """What a client sent; raises `WireError` if it is not a message moshi-server reads.

    The array form serde also reads for an internally tagged enum (`["Marker", 7]`: the tag,
    then the fields in order) is accepted, since moshi-server accepts it. Unknown extra fields
    are ignored, as serde does.
    """
    kind, body = _tag(_unpack(frame))
    if kind == "Audio":
        return Audio(_as_samples(_field(body, "pcm", kind)))
    if kind == "Marker":
        marker_id = _field(body, "id", kind)
        if type(marker_id) is not int or not _I64[0] <= marker_id <= _I64[1]:
            raise WireError("Marker.id must be a 64-bit integer")
        return Marker(marker_id)
    if kind == "OggOpus":
        return OggOpus(_as_bytes(_field(body, "data", kind)))
    if kind == "Init":
        return Init()
    raise WireError(f"unknown message type {kind!r}; expected Audio, OggOpus, Marker or Init")


def decode_server(frame: bytes) -> ServerMessage | None:
    """What a server sent; None for a type a client need not know (a newer server's)."""
    message = _unpack(frame)
    if not isinstance(message, dict):
        raise WireError("a message is a map with a string 'type'")
    kind = message.get("type")
    try:
        if kind == "Word":
            return Word(str(message["text"]), float(message["start_time"]))
        if kind == "EndWord":
            return EndWord(float(message["stop_time"]))
        if kind == "Marker":
            return Marker(int(message["id"]))
        if kind == "Ready":
            return Ready()
        if kind == "Step":
            prs = tuple(float(p) for p in message.get("prs", ()))
            return Step(int(message["step_idx"]), prs, int(message["buffered_pcm"]))
        if kind == "Error":
            return Error(str(message.get("message", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"bad {kind} message: {exc}") from None
    return None


_FIELDS: Final = {"Audio": ("pcm",), "Marker": ("id",), "OggOpus": ("data",)}


def _tag(message: Any) -> tuple[str, Mapping[str, Any]]:
    if isinstance(message, dict):
        kind = message.get("type")
        if not isinstance(kind, str):
            raise WireError('a message is a map with a string "type"')
        return kind, message
    if isinstance(message, list) and message and isinstance(message[0], str):
        kind, values = message[0], message[1:]
        return kind, dict(zip(_FIELDS.get(kind, ()), values, strict=False))
    raise WireError('a message is a map with a string "type"')


def _field(body: Mapping[str, Any], name: str, kind: str) -> Any:
    if name not in body:
        raise WireError(f"{kind} needs a {name!r} field")
    return body[name]


def _as_bytes(value: Any) -> bytes:
    """`Vec<u8>` as serde reads it: MessagePack bin, or an array of integers 0..255."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, list) and all(type(v) is int and 0 <= v <= 255 for v in value):
        return bytes(value)
    raise WireError("OggOpus.data must be bytes")


def _as_samples(value: Any) -> npt.NDArray[Any]:
    """`Vec<f32>`: an array of numbers (integers are accepted, as serde accepts them)."""
    try:
        samples = np.asarray(value) if isinstance(value, list) else None
    except (ValueError, TypeError, OverflowError):  # ragged: [[1, 2], [3]]
        samples = None
    if samples is None or samples.ndim != 1 or (len(samples) and samples.dtype.kind not in "iuf"):
        raise WireError("Audio.pcm must be an array of numbers")
    return samples
