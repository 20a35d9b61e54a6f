"""A whole audio file from an HTTP body, as one int16 array per leg at the engine's rate.

Containers (wav, flac, ogg/vorbis/opus, mp3: whatever libsndfile reads) carry their own rate
and channel count; headerless audio (Deepgram's `encoding=linear16|mulaw|alaw` with
`sample_rate=` and `channels=`) is decoded by `telephony.audio`. Either is mixed down to one
leg, or split into a leg per channel (`channel_0`, `channel_1`, ... as on the live Deepgram
route). No I/O: bytes in, arrays out; CPU-bound, so the routes run it off the event loop.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Final

import numpy as np
import soundfile

from api.transcribe import AudioFileError
from telephony.audio import AudioDecoder, Encoding, PcmArray, float_to_pcm16, resample_whole
from telephony.audio import deinterleave as split_channels

MONO_LEG: Final = "caller"
MAX_CHANNELS: Final = 8  # as the live Deepgram route: one engine stream per channel
# Bytes a container starts with: a body that has one is read as that container even when the
# client also said `encoding=linear16` (a WAV file sent with its header, a common mistake).
CONTAINER_MAGIC: Final = (b"RIFF", b"RF64", b"fLaC", b"OggS", b"ID3", b"FORM")


@dataclass(frozen=True, eq=False)
class FileAudio:
    """A decoded file: `legs` in channel order, at the engine's rate."""

    legs: dict[str, PcmArray]
    duration_s: float  # of the file as sent, at its own rate
    channels: int  # in the file (before any mixing down)
    sha256: str  # of the bytes as sent (Deepgram's metadata.sha256)


def leg_names(channels: int, split: bool) -> tuple[str, ...]:
    if split and channels > 1:
        return tuple(f"channel_{n}" for n in range(channels))
    return (MONO_LEG,)


def looks_like_container(data: bytes) -> bool:
    return data.startswith(CONTAINER_MAGIC)


def decode_container(data: bytes, out_rate: int, split: bool) -> FileAudio:
    """Any file libsndfile reads; `split`: a leg per channel, else the channels' mean."""
    if not data:
        raise AudioFileError("the body is empty: send a whole audio file")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        reason = str(getattr(exc, "error_string", "") or exc).rstrip(".")
        raise AudioFileError(f"not audio that libsndfile reads ({reason})") from None
    channels = samples.shape[1]
    if split and channels > MAX_CHANNELS:
        raise AudioFileError(f"{channels} channels: at most {MAX_CHANNELS} with multichannel")
    names = leg_names(channels, split)
    if len(names) == 1:
        columns = [samples.mean(axis=1)]
    else:
        columns = [samples[:, n] for n in range(channels)]
    legs = {
        name: resample_whole(float_to_pcm16(np.ascontiguousarray(column)), int(rate), out_rate)
        for name, column in zip(names, columns, strict=True)
    }
    return FileAudio(legs, len(samples) / rate, channels, hashlib.sha256(data).hexdigest())


def decode_raw(
    data: bytes, encoding: Encoding, rate: int, channels: int, out_rate: int, split: bool
) -> FileAudio:
    """Headerless interleaved samples (a trailing partial frame is dropped)."""
    frame = encoding.bytes_per_sample * channels
    if len(data) < frame:
        raise AudioFileError("the body is empty: send the audio itself")
    pcm = AudioDecoder(encoding, rate, rate).decode(data[: len(data) - len(data) % frame])
    per_channel = split_channels(pcm, channels)
    names = leg_names(channels, split)
    if len(names) == 1 and channels > 1:
        mixed = np.mean(np.stack(per_channel).astype(np.int32), axis=0)
        per_channel = [np.rint(mixed).astype(np.int16)]
    legs = {
        name: resample_whole(channel, rate, out_rate)
        for name, channel in zip(names, per_channel, strict=True)
    }
    duration = len(data) // frame / rate
    return FileAudio(legs, duration, channels, hashlib.sha256(data).hexdigest())
