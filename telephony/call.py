"""Calls and their legs: what sits between every front end and the engine.

A front end opens a `Call` on the `CallHub` with the legs it carries (one for a mono stream,
"caller" and "agent" for stereo), its labels from the wire, and optionally a callback that
replies on its own connection. Each `Leg` owns one engine stream and a pump task that fans the
stream's events out: to that callback and onto the `EventBus` (telephony/bus.py), where live
subscribers (`WS /v1/events`), the store and webhooks read them. `Call.end()` closes every
leg, waits for the flush so no word is lost, then announces the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from engine.base import (
    BridgeError,
    Closed,
    Engine,
    EngineEvent,
    EngineStream,
)
from telephony.audio import PcmArray, ResampleStream
from telephony.bus import (
    DROP_NOTICE_EVERY_S,
    AudioDropped,
    CallEnded,
    CallStarted,
    DtmfPressed,
    EventBus,
    LegEvent,
)
from telephony.limits import CALL_ID_MAX_CHARS, clean_label, clean_labels
from telephony.redaction import NameBook
from telephony.transcript import HOLD_S, NO_OPTIONS, TranscriptOptions, TranscriptStage

log = logging.getLogger(__name__)


class Draining(BridgeError):
    """The service is shutting down and admits no new calls (SIP 503, WS close 1013)."""


class DuplicateCall(BridgeError):
    """A live call already has this id."""


ReplyCallback = Callable[[str, EngineEvent], Awaitable[None]]
FLUSH_STALL_S = 60.0
HOLD_POLL_S = 0.1  # how often a leg holding a number run checks whether it is over


class Leg:
    """One leg of a call: audio in, the engine's events fanned out."""

    def __init__(
        self, call: Call, leg: str, stream: EngineStream, stage: TranscriptStage | None = None
    ) -> None:
        self.call = call
        self.leg = leg
        self.stream = stream
        self.stage = stage  # redaction: every event of the leg passes it before going out
        self._release_held = False  # wait_settled asks the pump to let held words go
        self.samples_in = 0
        self._drop_noticed_at = -DROP_NOTICE_EVERY_S
        self._pump = asyncio.get_running_loop().create_task(self._fan_out())

    @property
    def audio_s(self) -> float:
        return self.samples_in / self.stream.sample_rate

    def push(self, pcm: PcmArray) -> None:
        """int16 audio of this leg at the engine's rate (`Call.sample_rate`), any length; never
        blocks."""
        if len(pcm):  # decoders gather 80 ms batches: three packets in four give nothing
            self.samples_in += len(pcm)
            stats = self.stream.stats
            dropped = stats.samples_dropped
            self.stream.push(pcm)
            if stats.samples_dropped != dropped:
                self._dropped()

    def _dropped(self) -> None:
        """The engine's buffer overflowed: tell the bus (and the front end, where its protocol
        has a way), at most once per `DROP_NOTICE_EVERY_S` while it goes on."""
        now = asyncio.get_running_loop().time()
        if now < self._drop_noticed_at + DROP_NOTICE_EVERY_S:
            return
        self._drop_noticed_at = now
        rate = self.stream.sample_rate
        notice = AudioDropped(
            self.call.id, self.leg, self.audio_s, self.stream.stats.samples_dropped / rate
        )
        self.call.hub.bus.publish(notice)
        if self.call.on_audio_dropped is not None:
            self.call.on_audio_dropped(notice)

    def dtmf(self, digit: str, at_s: float | None = None) -> None:
        """Announce a key press at `at_s` of this leg's audio: where the front end's wire is
        (`ResampleStream.seconds_in`), which the engine's count trails by what the resampler
        still holds (90 ms from 8 to 16 kHz); by default the audio pushed so far."""
        at = self.audio_s if at_s is None else at_s
        self.call.hub.bus.publish(DtmfPressed(self.call.id, self.leg, digit, at))

    @property
    def has_room(self) -> bool:
        """The engine's buffer is under its high-water mark: a push now drops nothing."""
        return self.stream.has_room

    async def write(self, pcm: PcmArray) -> None:
        """Like push, but waits for the engine when it is behind (offline transcription, and
        WebSocket clients that can wait: they are slowed by not reading their socket)."""
        self.samples_in += len(pcm)
        await self.stream.write(pcm)

    async def finish(self, stall_s: float = FLUSH_STALL_S) -> None:
        """Close the engine stream and wait until its last event is out.

        A busy engine may take long to flush a backlog, and its words must not be lost to a
        timer, so the wait gives up only when the stream has made no progress (no audio taken,
        no event) for `stall_s`: an engine that never finishes must not hold the call (or a
        drain) forever.
        """
        self.stream.close()
        progress = -1
        while self.stream.progress != progress:
            progress = self.stream.progress
            try:
                await asyncio.wait_for(asyncio.shield(self._pump), stall_s)
                return
            except TimeoutError:
                pass
        log.error(
            "engine stalled: no progress in %.0f s of its flush",
            stall_s,
            extra={"call_id": self.call.id, "leg": self.leg},
        )
        self._pump.cancel()

    async def wait_settled(self, samples: int) -> bool:
        """Wait until every word of the leg's first `samples` samples is out (a client's
        Finalize, moshi-server's marker): settled in the engine, and not held by redaction
        for a number run that might go on (it is judged now, as the stream's end would)."""
        if not await self.stream.wait_settled(samples):
            return False
        while self.stage is not None and self.stage.holding and not self._pump.done():
            self._release_held = True
            await asyncio.sleep(HOLD_POLL_S / 4)
        return True

    async def _fan_out(self) -> None:
        events = aiter(self.stream.events())
        stage = self.stage
        upcoming: asyncio.Task[EngineEvent] | None = None
        try:
            while True:
                if upcoming is None:
                    upcoming = asyncio.ensure_future(anext(events))
                if stage is not None and stage.holding:
                    # Words held for a number run go out once the engine has settled far
                    # enough past it with nothing more (or a client asks for its finals).
                    await asyncio.wait((upcoming,), timeout=HOLD_POLL_S)
                    if not upcoming.done():
                        if self._release_held:
                            self._release_held = False
                            released = stage.flush()
                        else:
                            settled = self.stream.settled_samples / self.stream.sample_rate
                            released = stage.expire(settled)
                        for event in released:
                            await self._send(event)
                        continue
                try:
                    event = await upcoming
                except StopAsyncIteration:
                    return
                upcoming = None
                # Ended by the engine (not asked to close), or not flushed (ENGINE_LOST, an
                # engine error): that is why the call ended, whatever the front end says.
                if isinstance(event, Closed) and (
                    not self.stream.closing or event.reason != "flushed"
                ):
                    self.call.engine_ended(event.reason)
                for out in stage.feed(event) if stage is not None else (event,):
                    await self._send(out)
        finally:
            if upcoming is not None and not upcoming.done():
                upcoming.cancel()

    async def _send(self, event: EngineEvent) -> None:
        self.call.hub.bus.publish(LegEvent(self.call.id, self.leg, event))
        if self.call.reply is not None:
            try:
                await self.call.reply(self.leg, event)
            except Exception as exc:  # the connection is gone; the transcript is not
                log.info(
                    "reply failed: %s",
                    exc,
                    extra={"call_id": self.call.id, "leg": self.leg},
                )
                self.call.reply = None


@dataclass(eq=False)
class Call:
    id: str
    front_end: str
    labels: dict[str, str]
    hub: CallHub
    reply: ReplyCallback | None = None
    legs: dict[str, Leg] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    ended: bool = False
    engine_reason: str = ""  # why the engine ended a leg itself (engine_lost): the call's reason
    # Told of each `AudioDropped` notice: a front end whose protocol can say so to its client.
    on_audio_dropped: Callable[[AudioDropped], None] | None = None
    _announced: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _ending: asyncio.Task[None] | None = field(default=None, repr=False)

    def leg(self, name: str) -> Leg:
        return self.legs[name]

    async def end_flushing(self, resamplers: Mapping[str, ResampleStream], reason: str) -> None:
        """Push what each leg's resampler still holds, then end the call. Shielded: a
        cancelled handler (server shutdown) must still flush the transcript."""
        for leg, resampler in resamplers.items():
            self.leg(leg).push(resampler.flush())
        await asyncio.shield(self.end(reason))

    @property
    def sample_rate(self) -> int:
        """The rate every leg's audio is pushed at: the engine's own, reached in one resampling."""
        return self.hub.engine.sample_rate

    def engine_ended(self, reason: str) -> None:
        """The engine ended a leg by itself (a remote engine node died): the call ends with its
        reason, words so far kept; the front end sees `call.ended` and the `closed` event."""
        if not self.engine_reason:
            self.engine_reason = reason
        if not self.ended:
            self._ending = asyncio.get_running_loop().create_task(self.end(reason))

    async def end(self, reason: str = "hangup") -> None:
        """Flush every leg, then announce the end.

        Safe to call more than once: a later call returns once the first has announced the
        end, so a drain that ends the calls left at its deadline also waits for those a front
        end is already ending (the service must not close the store under their transcripts).
        """
        if self.ended:
            await self._announced.wait()
            return
        self.ended = True
        try:
            await asyncio.gather(*(leg.finish() for leg in self.legs.values()))
        finally:
            self.hub._forget(self)
            self.hub.bus.publish(
                CallEnded(
                    self.id,
                    self.front_end,
                    self.engine_reason or reason,
                    time.time(),
                    {name: round(leg.audio_s, 3) for name, leg in self.legs.items()},
                    sum(
                        leg.stream.stats.samples_dropped / leg.stream.sample_rate
                        for leg in self.legs.values()
                    ),
                )
            )
            self._announced.set()


class CallHub:
    """Admission and the registry of live calls."""

    def __init__(
        self,
        engine: Engine,
        bus: EventBus | None = None,
        redact: frozenset[str] = frozenset(),
        hold_s: float = HOLD_S,
    ) -> None:
        self.engine = engine
        self.bus = bus or EventBus()
        self.redact = redact  # `[privacy] redact`: every call's, whatever its stream asks
        self.hold_s = hold_s
        # People's names (pii; telephony/names.py), filled by api/app.py at start: until then
        # names are found by their cues alone ("my name is ...").
        self.names = NameBook()
        self.calls: dict[str, Call] = {}
        self.draining = False
        # A drain announced but not begun: health checks and SIP OPTIONS fail, so load balancers
        # and proxies stop sending here, while calls already on their way are still admitted.
        self.leaving = False
        self._ended = asyncio.Event()
        # Told of every refused call (front end, reason): metrics count them.
        self.on_reject: Callable[[str, str], None] | None = None
        # Why proxies should send this node no new calls though it would take them ("": no
        # reason), set by the api layer: its store is away, so events only wait in memory.
        # SIP OPTIONS answers 503 meanwhile; calls are still admitted and live ones go on.
        self.unavailable: Callable[[], str] = lambda: ""

    def open_call(
        self,
        front_end: str,
        legs: tuple[str, ...] = ("caller",),
        call_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        reply: ReplyCallback | None = None,
        options: TranscriptOptions = NO_OPTIONS,
    ) -> Call:
        """Admit a call with all its legs, or raise (`EngineFull`, `Draining`, `DuplicateCall`).

        `options` are the stream's own: its redaction kinds add to the hub's (a stream can
        never remove one), its keyterms go to the engine."""
        try:
            if self.draining:
                raise Draining("the service is draining")
            # The one place labels and ids from the wire enter: made safe for the store (no
            # lone surrogate, no NUL), the logs and every later reader.
            call_id = clean_label(call_id, CALL_ID_MAX_CHARS) if call_id else uuid.uuid4().hex
            if call_id in self.calls:
                raise DuplicateCall(f"call {call_id} is already live")
            streams: list[EngineStream] = []
            try:
                for leg in legs:
                    streams.append(self.engine.open(call_id, leg, keyterms=options.keyterms))
            except BridgeError:
                for stream in streams:
                    stream.close()
                raise
        except BridgeError as exc:
            if self.on_reject is not None:
                self.on_reject(front_end, type(exc).__name__)
            raise
        call = Call(call_id, front_end, clean_labels(labels or {}), self, reply)
        kinds = self.redact | options.redact
        for leg, stream in zip(legs, streams, strict=True):
            stage = TranscriptStage(kinds, self.hold_s, self.names) if kinds else None
            call.legs[leg] = Leg(call, leg, stream, stage)
        self.calls[call_id] = call
        self._ended.clear()
        self.bus.publish(
            CallStarted(
                call_id, front_end, legs, dict(call.labels), call.started_at, tuple(sorted(kinds))
            )
        )
        log.info("call started", extra={"call_id": call_id, "front_end": front_end})
        return call

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.id, None)
        if not self.calls:
            self._ended.set()
        log.info("call ended", extra={"call_id": call.id, "front_end": call.front_end})

    async def drain(self, deadline_s: float) -> None:
        """Stop admitting; wait for live calls to end, then end the rest (flushing them)."""
        self.draining = True
        if self.calls:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), deadline_s)
        await asyncio.gather(*(call.end("shutdown") for call in list(self.calls.values())))
