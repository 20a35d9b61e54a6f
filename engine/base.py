"""The engine contract every speech-to-text engine implements.

`Engine.open(call_id, leg, keyterms)` gives an `EngineStream` or raises `EngineFull`. The stream
takes mono int16 at the engine's own rate (`Engine.sample_rate`), any length, with `push` (never
blocks the event loop; a bounded buffer drops the oldest audio on overflow and counts it) or
`write` (waits for room: offline use).
`close()` flushes: the engine finishes every word spoken so far, emits it, then `Closed`.
Events are frozen dataclasses; times are seconds of that leg's audio.
`settled_samples` says how much of the pushed audio is finished: every word from it is out
(moshi-server's `Marker` acknowledgement waits on it).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import numpy as np

from engine.pcm import PcmArray

log = logging.getLogger(__name__)

DROP_LOG_EVERY_S: Final = 60.0  # "audio dropped" is logged at most this often per stream


# --- errors -----------------------------------------------------------------------------------


class BridgeError(Exception):
    """Root of every error stt-bridge maps to a protocol-level rejection."""


class EngineFull(BridgeError):
    """No free slot: the front end rejects the call (SIP 486, WS close 1013, AudioSocket hangup)."""


class EngineUnavailable(BridgeError):
    """The engine is stopped or draining and admits no new streams."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    text: str
    start_s: float
    end_s: float
    confidence: float | None = None  # 0..1 from the model's token probabilities; None: unknown


@dataclass(frozen=True)
class EndOfTurn:
    at_s: float
    probability: float = 1.0


@dataclass(frozen=True)
class Segment:
    """A finished utterance."""

    text: str
    start_s: float
    end_s: float
    words: tuple[Word, ...] = ()
    confidence: float | None = None  # 0..1 from its words' (engine/confidence.py); None: unknown


@dataclass(frozen=True)
class Partial:
    """The current hypothesis of the utterance still being spoken: its words may change.

    A later `Partial` of the same utterance replaces it; the utterance's `Segment` ends it.
    Live only: the store and webhooks keep finals.
    """

    text: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Closed:
    reason: str = "closed"


ENGINE_LOST: Final = "engine_lost"
"""`Closed` reason of a stream whose engine went away mid-call (a remote engine node died): the
words before it are kept, and the call ends with this reason (telephony/call.py)."""

ENGINE_FULL: Final = "engine_full"
"""`Closed` reason of a stream no engine node would take after all (a remote engine: every
node it tried said "no free channels", though their last probe showed room). The front end
answers as it answers a full engine at the start (telephony/errors.py)."""


EngineEvent = Word | Partial | EndOfTurn | Segment | Closed


@dataclass(frozen=True)
class ModelStep:
    """One batched model step as one stream saw it: not a transcript event, a diagnostic for
    protocols that expose it (moshi-server's `Step`). Only engines with VAD heads give it."""

    step_idx: int  # the model's step counter (all slots share it, as in moshi-server)
    pause_probs: tuple[float, ...]  # P(pause) of each VAD head
    buffered_samples: int  # this stream's audio still queued: how far it lags


@dataclass(frozen=True)
class _Settled:
    """Internal queue item: input samples [0, samples) have all their words emitted before it."""

    samples: int


def _word_json(word: Word) -> dict[str, Any]:
    out: dict[str, Any] = {"text": word.text, "start": word.start_s, "end": word.end_s}
    if word.confidence is not None:
        out["confidence"] = round(word.confidence, 3)
    return out


def event_to_json(event: EngineEvent) -> dict[str, Any]:
    """The wire form shared by every JSON front end and `/v1/events`: `confidence` (0..1, three
    places) on words and segments only when the engine gives one."""
    if isinstance(event, Word):
        return {"type": "word", **_word_json(event)}
    if isinstance(event, Segment):
        segment: dict[str, Any] = {
            "type": "segment",
            "text": event.text,
            "start": event.start_s,
            "end": event.end_s,
            "words": [_word_json(w) for w in event.words],
        }
        if event.confidence is not None:
            segment["confidence"] = round(event.confidence, 3)
        return segment
    if isinstance(event, Partial):
        return {"type": "partial", "text": event.text, "start": event.start_s, "end": event.end_s}
    if isinstance(event, EndOfTurn):
        return {"type": "end_of_turn", "at": event.at_s, "probability": event.probability}
    return {"type": "closed", "reason": event.reason}


# --- stream and engine ------------------------------------------------------------------------


@dataclass
class StreamStats:
    samples_in: int = 0
    samples_dropped: int = 0


class EngineStream(abc.ABC):
    """One leg's audio in, its events out.

    Subclasses implement `_on_audio` (called on the event loop when audio is queued) and
    `_on_close`; they report results with `_emit`, which any thread may call.

    Settled audio: `settled_samples` is how many input samples (counted from the stream's start
    like `stats.samples_in`, dropped ones included) are finished, meaning every word the engine
    will ever give for them has already come out of `events()`. An engine whose words lag its
    input (a model delay, whole-utterance decoding) sets `settles_on_take = False` and calls
    `_settle(n)` right after emitting the words of the first n samples; see `_settle`.
    """

    on_model_step: Callable[[ModelStep], None] | None = None
    """Told of each model step of this stream where the engine has VAD heads (event loop)."""

    settles_on_take: ClassVar[bool] = True
    """Default: audio is settled as soon as `_take_pending` hands it to the engine. Exact only
    for an engine that gives no words (the sink); any engine with words sets this False and
    reports with `_settle` instead."""

    def __init__(self, call_id: str, leg: str, max_buffer_s: float, sample_rate: int) -> None:
        self.call_id = call_id
        self.leg = leg
        self.sample_rate = sample_rate
        self.stats = StreamStats()
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[EngineEvent | _Settled] = asyncio.Queue()
        self._consumer_waiting = False  # events() waits on an empty queue: all handled
        self._pending: deque[PcmArray] = deque()
        self._pending_samples = 0
        self._max_pending = int(max_buffer_s * sample_rate)
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._closed = False
        self._settled = 0  # as seen by the consumer of events()
        self._settled_reported = 0  # as reported by the engine (any thread)
        self._settled_changed = asyncio.Event()
        self.progress = 0  # counts audio taken and events delivered: a stalled engine stops it
        self._drop_logged_at = -DROP_LOG_EVERY_S
        self._gap = 0  # samples dropped since the engine last took audio (`_take_gap`)

    # -- producer side (event loop) --

    def push(self, pcm: PcmArray) -> None:
        """Queue audio; never blocks. Overflow drops the oldest audio and counts it."""
        if self._closing or len(pcm) == 0:
            return
        self.stats.samples_in += len(pcm)
        self._pending.append(pcm)
        self._pending_samples += len(pcm)
        dropped_before = self.stats.samples_dropped
        while self._pending_samples > self._max_pending and len(self._pending) > 1:
            dropped = self._pending.popleft()
            self._pending_samples -= len(dropped)
            self.stats.samples_dropped += len(dropped)
            self._gap += len(dropped)
        if self.stats.samples_dropped > dropped_before:
            # A client sending faster than real time drops audio with every frame: one line
            # per stream per minute, so it cannot fill the disk through the log.
            now = self._loop.time()
            if now >= self._drop_logged_at + DROP_LOG_EVERY_S:
                self._drop_logged_at = now
                log.warning(
                    "audio dropped: engine behind",
                    extra={
                        "call_id": self.call_id,
                        "leg": self.leg,
                        "dropped_s": round(self.stats.samples_dropped / self.sample_rate, 3),
                    },
                )
        if self._pending_samples >= self._max_pending // 2:
            self._room.clear()
        self._on_audio()

    @property
    def has_room(self) -> bool:
        """The buffer is under its high-water mark (half full): `push` drops nothing now, and
        `write` would not wait. A sender that can wait stops reading its socket otherwise."""
        return self._room.is_set()

    async def write(self, pcm: PcmArray) -> None:
        """Queue audio, waiting while the buffer is over half full (offline transcription, and
        clients that can wait: never drops)."""
        step = max(1, self._max_pending // 4)
        for start in range(0, len(pcm), step):
            await self._room.wait()
            if self._closing:
                return  # it takes no more audio (push drops it): nothing to wait for
            self.push(pcm[start : start + step])

    def finalize(self) -> None:  # noqa: B027 (optional hook)
        """End the utterance in progress now, as a pause would (Deepgram's `Finalize`).

        Its words and `Segment` come out without waiting for the caller to pause; the stream
        stays open. Audio pushed so far is then settled once they are out (`wait_settled`).
        Engines whose words need no endpoint (Kyutai) keep the default: nothing to cut.
        """

    def close(self) -> None:
        """Stop taking audio and flush; `Closed` is the last event. Idempotent."""
        if self._closing:
            return
        self._closing = True
        # A writer waiting for room goes on: a stream whose engine failed with a full buffer
        # would hold it (and its client's socket) for good.
        self._room.set()
        self._on_close()

    @property
    def closing(self) -> bool:
        return self._closing

    async def events(self) -> AsyncIterator[EngineEvent]:
        """Every event of this stream, ending after `Closed`.

        The consumer asks for the next event only once it has handled the last one, so when
        `settled_samples` moves, every event before that point has been handled.
        """
        while True:
            self._consumer_waiting = True
            try:
                item = await self._events.get()
            finally:
                self._consumer_waiting = False
            if isinstance(item, _Settled):
                self._advance_settled(item.samples)
                continue
            if isinstance(item, Closed):
                self._advance_settled(self.stats.samples_in)  # nothing more will come
            yield item
            if isinstance(item, Closed):
                return

    @property
    def settled_samples(self) -> int:
        """Input samples whose words have all been yielded by `events()` (see the class doc).

        Counted like `stats.samples_in`; after `Closed` it equals `stats.samples_in`.
        """
        return self._settled

    async def wait_settled(self, samples: int) -> bool:
        """Wait until `settled_samples >= samples`; False if the stream ended first."""
        while self._settled < samples:
            if self._closed and self._events.empty():
                return False
            self._settled_changed.clear()
            await self._settled_changed.wait()
        return True

    def _advance_settled(self, samples: int) -> None:
        if samples > self._settled:
            self._settled = samples
            self._settled_changed.set()

    # -- engine side --

    def _take_pending(self, max_samples: int | None = None) -> PcmArray:
        """Remove queued audio (all of it, or at most max_samples) for processing."""
        if not self._pending:
            return np.zeros(0, dtype=np.int16)
        if max_samples is None or self._pending_samples <= max_samples:
            pending = self._pending
            out = pending[0] if len(pending) == 1 else np.concatenate(pending)
            pending.clear()
        else:
            parts: list[PcmArray] = []
            need = max_samples
            while need > 0:
                head = self._pending[0]
                if len(head) <= need:
                    parts.append(self._pending.popleft())
                    need -= len(head)
                else:
                    parts.append(head[:need])
                    self._pending[0] = head[need:]
                    need = 0
            out = np.concatenate(parts)
        self._pending_samples -= len(out)
        self.progress += 1
        if self._pending_samples < self._max_pending // 2:
            self._room.set()
        if self.settles_on_take:
            self._settle(self._taken)
        return out

    def _take_gap(self) -> int:
        """Samples the buffer dropped since the last call, all of them just before the audio
        `_take_pending` gives next: call both together, with no await between. Times are
        seconds of the leg's audio, dropped audio included, so an engine adds the gap to its
        clock (and ends the utterance it was hearing: its audio is cut there)."""
        gap, self._gap = self._gap, 0
        return gap

    @property
    def pending_samples(self) -> int:
        return self._pending_samples

    @property
    def _taken(self) -> int:
        """Samples the engine has taken or the buffer dropped: all pushed but those pending."""
        return self.stats.samples_in - self._pending_samples

    def _settle(self, samples: int) -> None:
        """Engine side, any thread: every word from input samples [0, samples) is emitted.

        The hook behind moshi-server's `Marker` (telephony/moshi_asr.py): a marker sent after
        n samples is echoed once `settled_samples >= n`. Call it right after `_emit`ting the
        last word that comes from those samples (it travels through the same queue, so the
        consumer sees it after those words), and also when audio turns out to hold no word
        (silence), or markers wait for the next word. `samples` counts input samples as pushed
        (`stats.samples_in`, dropped ones included), never more than were pushed; smaller
        values than before are ignored. Examples: a streaming model with a text delay of d
        frames of f samples settles `(k - d) * f` after emitting the words of step k; an
        engine that decodes whole utterances settles up to the start of the utterance still
        open (or to the end of what its endpointer has classified as silence). `Closed`
        settles everything, so `close()` needs no call.
        """
        if samples <= self._settled_reported:
            return
        self._settled_reported = samples
        self._emit(_Settled(samples))

    def _emit(self, event: EngineEvent | _Settled) -> None:
        """Deliver an event to the consumer; safe from any thread."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._deliver(event)
        else:
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: EngineEvent | _Settled) -> None:
        if self._closed:
            return
        self.progress += 1
        if isinstance(event, _Settled) and self._consumer_waiting and self._events.empty():
            # Every event before it has been handled: no need to wake the consumer for it
            # (engines settle every step, 12.5 times a second per stream).
            self._advance_settled(event.samples)
            return
        if isinstance(event, Closed):
            self._closed = True
        self._events.put_nowait(event)

    @abc.abstractmethod
    def _on_audio(self) -> None: ...

    @abc.abstractmethod
    def _on_close(self) -> None: ...


@dataclass(frozen=True)
class EngineInfo:
    name: str
    model: str
    capacity: int
    device: str
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineNode:
    """One engine node a remote engine spreads its streams over (`/info`, `/metrics`)."""

    url: str
    reachable: bool
    capacity: int
    free_slots: int
    streams: int  # this service's streams on it now
    error: str = ""  # why it is unreachable, or its last refusal until the next probe
    refusals: int = 0  # streams it refused ("no free channels"), since start


class Engine(abc.ABC):
    """Owns the model and the slots; streams are opened on the event loop thread."""

    name: str = "engine"
    sample_rate: int
    """The rate, in Hz, of the mono int16 audio its streams take: front ends resample to it."""
    on_step: Callable[[float, int], None] | None = None
    """Told (seconds, streams advanced) after each batched model step, e.g. by metrics."""

    @property
    @abc.abstractmethod
    def capacity(self) -> int: ...

    @property
    @abc.abstractmethod
    def free_slots(self) -> int: ...

    @abc.abstractmethod
    def open(
        self, call_id: str, leg: str = "caller", keyterms: tuple[str, ...] = ()
    ) -> EngineStream:
        """A stream in a free slot, or `EngineFull`.

        `keyterms`: words this stream's decoder should favour, already checked
        (engine/keyterms.py `check_keyterms`); the engine adds its server-wide ones. Engines
        that cannot bias their decoder accept and ignore them."""

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @property
    def failure(self) -> BaseException | None:
        """Why the engine can serve no stream any more (its model failed for good), else None.
        The service then exits for its supervisor to restart it (api/app.py `serve`)."""
        return None

    def nodes(self) -> list[EngineNode]:
        """The engine nodes behind it, for an engine that runs elsewhere; none by default."""
        return []

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Load the model; called once before the first `open`."""

    async def stop(self) -> None:  # noqa: B027 (optional hook)
        """Release the model; live streams should be closed before."""
