"""Offline transcription of audio files through the same engine and call path as live calls.

Files are read with libsndfile (wav, flac, ogg/vorbis/opus, mp3 and more), mixed down to
mono, resampled to the engine's rate by `telephony.audio`, and written into an engine stream as fast
as the engine takes them (waiting instead of dropping). Output: plain text, JSON, WebVTT or
SubRip.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import soundfile

from engine.base import EndOfTurn, EngineEvent, Segment, Word
from telephony.audio import PcmArray, float_to_pcm16, resample_whole
from telephony.call import CallHub
from telephony.transcript import NO_OPTIONS, TranscriptOptions

FRONT_END: Final = "file"
CHUNK_S: Final = 1.0


class AudioFileError(ValueError):
    """A file that cannot be read as audio."""


@dataclass
class Transcript:
    source: str
    duration_s: float
    words: list[Word] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    turns: list[EndOfTurn] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    def add(self, event: EngineEvent) -> None:
        if isinstance(event, Word):
            self.words.append(event)
        elif isinstance(event, Segment):
            self.segments.append(event)
        elif isinstance(event, EndOfTurn):
            self.turns.append(event)


def file_problem(path: Path) -> str:
    """Why `path` cannot be opened at all ("" when it can): said before any model loads, in
    words rather than libsndfile's ("Error opening ...: System error.")."""
    if not path.exists():
        return f"no such file: {path}"
    if path.is_dir():
        return f"a folder, not an audio file: {path}"
    try:
        path.open("rb").close()
    except OSError as exc:
        return f"cannot read {path}: {(exc.strerror or str(exc)).lower()}"
    return ""


def read_audio(path: Path, out_rate: int) -> PcmArray:
    """Any file libsndfile reads, as mono int16 at `out_rate` (the engine's)."""
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        problem = file_problem(path)  # gone since it was checked, or not audio at all
        if not problem:
            reason = str(getattr(exc, "error_string", "") or exc)
            problem = f"{path}: not audio that libsndfile reads ({reason.rstrip('.')})"
        raise AudioFileError(problem) from exc
    return resample_whole(float_to_pcm16(data.mean(axis=1)), int(rate), out_rate)


async def transcribe_pcm(
    hub: CallHub,
    pcm: PcmArray,
    source: str,
    progress: Callable[[float], None] | None = None,
) -> Transcript:
    """Transcribe audio at the engine's rate through an engine stream; `progress` gets seconds
    written."""
    transcripts = await transcribe_legs(hub, {"caller": pcm}, source, progress=progress)
    return transcripts["caller"]


async def transcribe_legs(
    hub: CallHub,
    legs: Mapping[str, PcmArray],
    source: str,
    *,
    progress: Callable[[float], None] | None = None,
    labels: Mapping[str, str] | None = None,
    options: TranscriptOptions = NO_OPTIONS,
    call_id: str | None = None,
) -> dict[str, Transcript]:
    """One call with a leg per channel (audio at the engine's rate), each written as fast as
    the engine takes it; the legs advance together, a second at a time, so a file's channels
    share the engine as a live call's would. Raises what `CallHub.open_call` raises
    (`EngineFull`, `Draining`) before any audio is taken."""
    rate = hub.engine.sample_rate
    transcripts = {leg: Transcript(source, len(pcm) / rate) for leg, pcm in legs.items()}

    async def collect(leg: str, event: EngineEvent) -> None:
        transcripts[leg].add(event)

    call = hub.open_call(
        FRONT_END,
        legs=tuple(legs),
        call_id=call_id,
        labels={"file": source, **(labels or {})},
        reply=collect,
        options=options,
    )
    step = int(CHUNK_S * rate)
    longest = max((len(pcm) for pcm in legs.values()), default=0)
    try:
        for start in range(0, longest, step):
            chunks = {leg: pcm[start : start + step] for leg, pcm in legs.items()}
            await asyncio.gather(
                *(call.leg(leg).write(chunk) for leg, chunk in chunks.items() if len(chunk))
            )
            if progress is not None:
                progress(max(len(chunk) for chunk in chunks.values()) / rate)
    finally:
        # Shielded: a client that hangs up mid-file still leaves a flushed, stored call.
        await asyncio.shield(call.end("end of file"))
    return transcripts


# --- output formats ---------------------------------------------------------------------------


def clock(seconds: float, separator: str = ".") -> str:
    """HH:MM:SS.mmm (WebVTT), or with "," (SubRip)."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subrip(cues: Iterable[tuple[float, float, str]]) -> str:
    """SubRip (.srt): numbered cues of (start, end, text), a blank line between them. The
    transcript route renders stored calls with it too."""
    return "\n".join(
        f"{n}\n{clock(start, ',')} --> {clock(end, ',')}\n{text}\n"
        for n, (start, end, text) in enumerate(cues, start=1)
    )


def format_text(t: Transcript) -> str:
    lines = [f"# {t.source} ({t.duration_s:.2f} s)"]
    lines += [f"{w.start_s:8.2f} {w.end_s:8.2f}  {w.text}" for w in t.words]
    return "\n".join(lines) + "\n"


def format_json(t: Transcript) -> str:
    doc: dict[str, Any] = {
        "source": t.source,
        "duration": round(t.duration_s, 3),
        "text": t.text,
        "words": [{"text": w.text, "start": w.start_s, "end": w.end_s} for w in t.words],
        "segments": [{"text": s.text, "start": s.start_s, "end": s.end_s} for s in t.segments],
    }
    return json.dumps(doc) + "\n"


def format_vtt(t: Transcript) -> str:
    cues = ["WEBVTT", ""]
    for n, seg in enumerate(t.segments, start=1):
        cues += [str(n), f"{clock(seg.start_s)} --> {clock(seg.end_s)}", seg.text, ""]
    return "\n".join(cues)


def format_srt(t: Transcript) -> str:
    return subrip((seg.start_s, seg.end_s, seg.text) for seg in t.segments)


FORMATS: Final[dict[str, Callable[[Transcript], str]]] = {
    "text": format_text,
    "json": format_json,
    "vtt": format_vtt,
    "srt": format_srt,
}
EXTENSIONS: Final = {"text": "txt", "json": "json", "vtt": "vtt", "srt": "srt"}
