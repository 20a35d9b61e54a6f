"""The CPU engine: Moonshine base (English) on onnxruntime, cut into utterances by Silero VAD.

Each stream takes 16 kHz audio (the front ends resample once, straight to it). A VAD cuts it
into utterances at pauses (engine/endpointing.py); each utterance is decoded whole when it
ends, giving its words (times from the audio: engine/word_timing.py), a `Segment` with the
model's cased, punctuated text, and an `EndOfTurn`. While the caller speaks, the open utterance
is decoded again every `partial_interval_s` of its audio, as a `Partial` that the next one or
the `Segment` replaces.

One model and one VAD session per process, shared by a pool of decoding threads (one per core
by default): finals go before partials, so a busy machine gives fewer partials, not late
finals. `capacity` is how many streams the machine keeps real time, measured at start unless
set: admission, `/ready` and `/info` use it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Final

from engine.base import (
    Closed,
    EndOfTurn,
    Engine,
    EngineFull,
    EngineInfo,
    EngineStream,
    EngineUnavailable,
    Partial,
    Segment,
    Word,
)
from engine.confidence import segment_confidence
from engine.config import Precision, user_dir
from engine.decode_pool import AHEAD, FINAL, PARTIAL, DecodePool
from engine.endpointing import Cut, EndpointConfig, OpenUtterance, Utterances
from engine.keyterms import check_keyterms, merge_keyterms
from engine.moonshine_model import SAMPLE_RATE, FloatAudio, MoonshineModel, Transcript, load
from engine.vad import SileroVad, VadJob, VadThread
from engine.vad import load as load_vad
from engine.word_timing import word_times

log = logging.getLogger(__name__)

VAD_COST: Final = 0.005  # share of a core the VAD takes per stream (measured: 0.16 ms / 32 ms)
# Admit streams up to this share of the decoding threads' time, as the probe counts a caller
# (a partial and the final of each sentence). Measured (bench/cpu_engine.py realtime, int8,
# callers who talk without stopping, each starting at its own point of a sentence's cycle):
# finals p95 0.71-0.76 s, p99 under 0.82 s from 24 to 48 callers (partials thin out first:
# finals decoded ahead go before them); the fewest partials any caller got, per 2 s of
# speech, 1.71-1.83 at 24, 1.28-1.59 at 32, 1.04 at 40, 0.73 at 48. The probe counts more than
# that load costs (its partial is decoded, where the final decoded ahead is the partial that
# load mostly shows), so 0.9 says 25-30 here: under the 40 that kept a partial per 2 s for
# everyone, for a busier machine's sake.
TARGET_LOAD: Final = 0.9
JOB_SAMPLES: Final = SAMPLE_RATE // 10  # audio that starts a VAD job: 100 ms
# The calibration's caller talks without stopping: 3 s sentences 1.2 s apart (issue 26's
# measure of capacity), each a partial 2 s in (the fewest a caller is promised: one per 2 s of
# speech) and its final, which reads the partial's tokens as a draft where that is exact.
CALIBRATION_SENTENCE_S: Final = 3.0
CALIBRATION_PAUSE_S: Final = 1.2
CALIBRATION_TOKENS: Final = 20  # what 3 s of speech decodes to, about (6.5 per second)
ENGINE_ERROR: Final = "engine error"  # `Closed` reason of a stream whose decode raised


class MoonshineEngine(Engine):
    name = "moonshine"
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model: str = "",
        cache_dir: Path | None = None,  # None: the user's cache folder
        capacity: int = 0,
        threads: int = 0,
        precision: Precision = "int8",
        max_buffer_s: float = 10.0,
        partial_interval_s: float = 1.0,
        endpoint: EndpointConfig | None = None,
        keyterms: tuple[str, ...] = (),
    ) -> None:
        self._model_name = model
        self.keyterms = check_keyterms(keyterms)  # every stream's, besides its own
        self._cache_dir = cache_dir or user_dir("cache")
        self._capacity = capacity
        self._threads = threads or os.cpu_count() or 1
        self.precision: Precision = precision
        self._max_buffer_s = max_buffer_s
        self.partial_interval_s = partial_interval_s
        self.endpoint = endpoint or EndpointConfig()
        self.model: MoonshineModel | None = None
        self.pool: DecodePool | None = None
        self.vad_thread: VadThread | None = None
        self._streams: set[MoonshineStream] = set()
        self._rtf = 0.0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def free_slots(self) -> int:
        return max(0, self._capacity - len(self._streams))

    async def start(self) -> None:
        """Prepare (first start only) and load the model, then decode once so that a broken
        model fails here and not in a call; measure the capacity unless it is set."""
        loop = asyncio.get_running_loop()
        self.model = await loop.run_in_executor(
            None, load, self._model_name, self._cache_dir, self.precision
        )
        await loop.run_in_executor(None, load_vad)
        self._rtf = await loop.run_in_executor(None, self._calibrate, self.model)
        if self._capacity <= 0:
            self._capacity = max(1, int(self._threads * TARGET_LOAD / (self._rtf + VAD_COST)))
        self.pool = DecodePool(self._threads, "moonshine")
        # Pauses are found on a thread of their own, so a stream's end of utterance is seen
        # on time even while every decoding thread is busy (0.5 % of a core per stream).
        self.vad_thread = VadThread("moonshine-vad")
        log.info(
            "moonshine engine: real-time factor %.3f per core, %d threads, capacity %d streams",
            self._rtf,
            self._threads,
            self._capacity,
        )

    @staticmethod
    def _calibrate(model: MoonshineModel) -> float:
        """Seconds of one core per second of a caller who talks without stopping: a partial
        and the final of each sentence, as the engine decodes them. The faster of two runs (the
        first also warms onnxruntime up). Wall time: a machine busy with other work has less
        room for calls, and the capacity says so."""
        partial_s = CALIBRATION_SENTENCE_S * 2 / 3
        partial_tokens = int(CALIBRATION_TOKENS * 2 / 3)
        runs = []
        for _ in range(2):
            began = time.perf_counter()
            model.cost_probe(partial_s, partial_tokens)
            drafted = partial_tokens if model.exact_drafts else 0  # as `_redecode` does
            model.cost_probe(CALIBRATION_SENTENCE_S, CALIBRATION_TOKENS, drafted=drafted)
            runs.append(time.perf_counter() - began)
        return min(runs) / (CALIBRATION_SENTENCE_S + CALIBRATION_PAUSE_S)

    async def stop(self) -> None:
        for pool in (self.vad_thread, self.pool):
            if pool is not None:
                await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)
        self.pool = self.vad_thread = None

    def open(
        self, call_id: str, leg: str = "caller", keyterms: tuple[str, ...] = ()
    ) -> MoonshineStream:
        if self.pool is None or self.vad_thread is None or self.model is None:
            raise EngineUnavailable("the moonshine engine is not running")
        if len(self._streams) >= self._capacity:
            raise EngineFull(f"all {self._capacity} moonshine engine streams are busy")
        stream = MoonshineStream(self, call_id, leg, merge_keyterms(self.keyterms, keyterms))
        self._streams.add(stream)
        return stream

    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.name,
            model=self.model.name if self.model else "moonshine (not loaded)",
            capacity=self._capacity,
            device="cpu",
            extra={
                "sample_rate": self.sample_rate,
                "threads": self._threads,
                "precision": self.precision,
                "real_time_factor": round(self._rtf, 4),
                "partial_interval_s": self.partial_interval_s,
                "vad": "silero-vad (shipped in the silero-vad wheel)",
                "max_utterance_s": self.endpoint.max_utterance_s,
            },
        )

    def _release(self, stream: MoonshineStream) -> None:
        self._streams.discard(stream)


class MoonshineStream(EngineStream):
    """One leg: its VAD state and open utterance, advanced one job at a time: the VAD on the
    engine's VAD thread, then the decodes of the utterances it ended on the decoding pool."""

    settles_on_take = False  # words come out per utterance: `_settle` says how far

    def __init__(
        self,
        engine: MoonshineEngine,
        call_id: str,
        leg: str,
        keyterms: tuple[str, ...] = (),
    ) -> None:
        super().__init__(call_id, leg, engine._max_buffer_s, engine.sample_rate)
        self.keyterms = keyterms
        assert engine.model is not None
        # Finals, partials and the final decoded ahead all take the same bias.
        self._keyterms = engine.model.keyterm_index(keyterms) if keyterms else None
        assert engine.model is not None and engine.pool is not None
        assert engine.vad_thread is not None
        self._engine = engine
        self._model = engine.model
        self._pool = engine.pool
        self._vad_thread = engine.vad_thread
        self._vad_state = SileroVad()
        self._utterances = Utterances(self._vad_state, engine.endpoint)
        self._utterances.on_pause = self._speculate
        # A final decoded ahead, while a pause is confirmed: (start, length, its text to come).
        self._ahead: tuple[int, int, Future[Transcript]] | None = None
        # The latest decode of the open utterance: (its start sample, its tokens), the draft
        # the next decode of it reads in one pass (MoonshineModel.decode).
        self._last_decode: tuple[int, tuple[int, ...]] = (-1, ())
        self._partial_every = int(engine.partial_interval_s * SAMPLE_RATE)
        self._partial_at = (0, 0)  # (utterance number, its length) at the last partial
        self._partial_wanted: OpenUtterance | None = None  # the audio the next one decodes
        self._partial_pending = False  # a partial of this stream is queued or running
        self._emitting = threading.Lock()  # partial vs. final of one utterance: final wins
        self._finalize = False
        self._failed = False  # a decode raised: the stream has ended, nothing more is decoded
        self._worker: asyncio.Task[None] | None = None

    def _on_audio(self) -> None:
        # 100 ms at a time, not every 20 ms packet: each job costs two thread hand-offs on
        # the event loop, and the VAD decides per 32 ms anyway.
        if self.pending_samples >= JOB_SAMPLES:
            self._ensure_worker()

    def _on_close(self) -> None:
        self._ensure_worker()

    def finalize(self) -> None:
        if not self.closing:
            self._finalize = True
            self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._failed:
            return
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        try:
            while self.pending_samples or self._finalize:
                if self.pending_samples:
                    # Taken together: audio the buffer dropped came just before this second.
                    gap = self._take_gap()
                    pcm = self._take_pending(SAMPLE_RATE)  # a second at a time: partials keep up
                    if gap:  # times stay in the leg's audio: the clock counts the lost seconds
                        await self._decode(await self._vad(partial(self._utterances.skip, gap)))
                    feed = partial(self._utterances.feed, pcm)
                    await self._decode(
                        await self._vad(feed, partial(self._utterances.windows_of, pcm))
                    )
                else:  # Finalize: once the audio before it is in
                    self._finalize = False
                    await self._decode(await self._vad(self._utterances.cut_now))
                self._maybe_partial()
            if self.closing:
                await self._decode(await self._vad(self._utterances.cut_now))
                self._engine._release(self)
                self._emit(Closed("flushed"))
        except Exception:
            # This stream ends here with the words it gave (its call ends with this reason:
            # telephony/call.py); the pool and the other streams go on, and audio still
            # pushed to it is not decoded.
            log.exception("moonshine engine failed", extra={"call_id": self.call_id})
            self._failed = True
            self._engine._release(self)
            self._emit(Closed(ENGINE_ERROR))

    async def _vad(
        self,
        job: Callable[[], list[Cut]],
        windows: Callable[[], Sequence[FloatAudio]] = tuple,
    ) -> list[Cut]:
        """Run `job` on the VAD thread, which judges `windows` (those it will judge) together
        with other streams' first."""
        future = self._vad_thread.submit(VadJob(self._vad_state, job, windows))
        return await asyncio.wrap_future(future)

    async def _decode(self, cuts: list[Cut]) -> None:
        for cut in cuts:
            # In order of arrival (measured: the shortest first kept long finals waiting, and
            # the p95 of 6 callers on a loaded machine went from 3.7 s to 6-14 s).
            job = partial(self._decode_final, cut)
            await asyncio.wrap_future(self._pool.submit(FINAL, job))
        self._settle(self._utterances.settled)

    # -- on a pool thread --

    def _speculate(self, utterance: OpenUtterance) -> None:
        """`pad_s` into a pause: decode what the final will be if the pause lasts, so the
        final is out when the pause is confirmed (0.3 s sooner), not a decode after it.
        Behind finals, before partials: a busy machine may not start it before the cut,
        which then decodes as without it."""
        if self._ahead is not None:
            self._ahead[2].cancel()  # an earlier pause that did not end the utterance
        future = self._pool.submit(AHEAD, partial(self._decode_ahead, utterance))
        self._ahead = (utterance.start, len(utterance.audio), future)

    def _decode_ahead(self, utterance: OpenUtterance) -> Transcript:
        """The final decoded ahead, shown as a partial while the pause is not yet confirmed:
        the utterance's words so far, 0.3 s before its final, for no decode of its own (no
        partial is asked for in a pause decoded ahead: `_maybe_partial`)."""
        transcript = self._redecode(utterance.start, utterance.audio, final=True)
        if self._partial_every > 0:
            self._partial_at = (utterance.number, len(utterance.audio))
            self._emit_partial(utterance, transcript.text)
        return transcript

    def _redecode(self, start: int, audio: FloatAudio, final: bool = False) -> Transcript:
        """Decode the utterance that starts at sample `start`, from its last decode's tokens
        (the same tokens as a decode from scratch, for the cost of what is new).

        A `final` reads them only where that is exact (float32). In int8 a draft can tip a
        near-tie, and whether a final has one depends on timing (a partial, a pause decoded
        ahead): the words kept would then depend on the machine's load, not on the audio."""
        last_start, tokens = self._last_decode
        reuse = last_start == start and (self._model.exact_drafts or not final)
        transcript = self._model.decode(audio, self._keyterms, tokens if reuse else ())
        self._last_decode = (start, transcript.tokens)
        return transcript

    def _final_text(self, cut: Cut) -> Transcript:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (cut.start, len(cut.audio)):
            future = ahead[2]
            if not future.cancel():  # running or done: the same audio, the same text
                return future.result()
        elif ahead is not None:
            ahead[2].cancel()  # speech went on: that guess is void
        return self._redecode(cut.start, cut.audio, final=True)

    def _decode_final(self, cut: Cut) -> None:
        transcript = self._final_text(cut)
        text = transcript.text
        written = text.split()
        confidences = transcript.word_confidences()
        offset = cut.start / SAMPLE_RATE
        words = tuple(
            Word(w, round(offset + start, 3), round(offset + end, 3), round(confidence, 4))
            for w, (start, end), confidence in zip(
                written, word_times(written, cut.audio, SAMPLE_RATE), confidences, strict=True
            )
        )
        with self._emitting:
            for word in words:
                self._emit(word)
            if words:  # noise that decodes to nothing is no turn
                confidence = segment_confidence([w.confidence or 0.0 for w in words])
                self._emit(Segment(text, words[0].start_s, words[-1].end_s, words, confidence))
                if cut.ends_turn:
                    self._emit(EndOfTurn(round(cut.end / SAMPLE_RATE, 3)))

    def _maybe_partial(self) -> None:
        """Ask for a partial once the open utterance has grown by `partial_interval_s` since
        the last. Partials wait behind every final and final decoded ahead, the stream that
        has waited longest for one first (so under load every caller's come less often, not
        some callers' never); a request still waiting decodes the newest audio when it runs."""
        if self._partial_every <= 0 or self.closing or self.pending_samples > SAMPLE_RATE // 2:
            return  # off, ending, or behind: its audio is still to be judged
        if self._utterances.pausing:
            return  # decoded ahead: that decode is the partial (`_decode_ahead`)
        utterance = self._utterances.open_utterance()
        if utterance is None:
            return
        number, length = self._partial_at
        grown = len(utterance.audio) - (length if number == utterance.number else 0)
        if grown < self._partial_every:
            return
        self._partial_wanted = utterance
        if not self._partial_pending:
            self._partial_pending = True
            waiting_since = time.monotonic() - grown / SAMPLE_RATE
            self._pool.submit(PARTIAL, self._decode_partial, rank=waiting_since)

    def _decode_partial(self) -> None:
        try:
            utterance = self._partial_wanted
            state = self._utterances
            if utterance is None or not state.in_speech or state.number != utterance.number:
                return  # its final came first
            if state.pausing:
                return  # the pause is decoded ahead, and that decode shows as the partial
            self._partial_at = (utterance.number, len(utterance.audio))
            self._emit_partial(utterance, self._redecode(utterance.start, utterance.audio).text)
        finally:
            self._partial_pending = False

    def _emit_partial(self, utterance: OpenUtterance, text: str) -> None:
        state = self._utterances
        with self._emitting:  # unless the final of this utterance has come out:
            if text and state.in_speech and state.number == utterance.number:
                start = utterance.start / SAMPLE_RATE
                end = start + len(utterance.audio) / SAMPLE_RATE
                self._emit(Partial(text, round(start, 3), round(end, 3)))
