"""A streaming engine for machines without a GPU: PocketSphinx 5 and its endpointer.

The English acoustic model, language model and dictionary ship inside the `pocketsphinx`
wheel, so this engine works offline with no download. Each slot owns one `Decoder` (made
once, reused for later calls); audio is resampled 24 → 16 kHz, cut into the endpointer's
frames, and every utterance the endpointer closes becomes Word events, one Segment and one
EndOfTurn. Decoding runs in a thread pool, one chunk at a time per stream, so the event loop
never waits and several streams decode at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import numpy as np
from pocketsphinx import Decoder, Endpointer

from engine.base import (
    Closed,
    EndOfTurn,
    Engine,
    EngineFull,
    EngineInfo,
    EngineStream,
    EngineUnavailable,
    Segment,
    Word,
)
from telephony.audio import ENGINE_RATE, PcmArray, ResampleStream

log = logging.getLogger(__name__)

DECODER_RATE: Final = 16000
FRAME_S: Final = 0.01  # PocketSphinx's feature frame: segment times count these
_FILLER = re.compile(r"^(<s>|</s>|<sil>|\[.*\]|\+.*\+)$")
_ALT_PRONUNCIATION = re.compile(r"\(\d+\)$")


class CpuEngine(Engine):
    name = "cpu"

    def __init__(
        self,
        capacity: int = 8,
        workers: int = 2,
        max_buffer_s: float = 10.0,
        vad_window_s: float = 0.3,
        vad_ratio: float = 0.9,
        vad_mode: int = 1,
    ) -> None:
        self._capacity = capacity
        self._max_buffer_s = max_buffer_s
        self._vad = (vad_window_s, vad_ratio, vad_mode)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpu-engine")
        self._idle_decoders: list[Decoder] = []
        self._decoders_lock = threading.Lock()
        self._streams: set[CpuStream] = set()
        self._started = False

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def free_slots(self) -> int:
        return self._capacity - len(self._streams)

    async def start(self) -> None:
        # Load one decoder now so a broken model install fails at start-up, not on a call.
        decoder = await asyncio.get_running_loop().run_in_executor(self._executor, Decoder)
        self._idle_decoders.append(decoder)
        self._started = True

    async def stop(self) -> None:
        self._started = False
        self._executor.shutdown(wait=True, cancel_futures=False)

    def open(self, call_id: str, leg: str = "caller") -> CpuStream:
        if not self._started:
            raise EngineUnavailable("cpu engine is not running")
        if len(self._streams) >= self._capacity:
            raise EngineFull(f"all {self._capacity} cpu engine streams are busy")
        stream = CpuStream(self, call_id, leg, self._max_buffer_s)
        self._streams.add(stream)
        return stream

    def info(self) -> EngineInfo:
        return EngineInfo(
            name=self.name,
            model="pocketsphinx en-us (shipped in the pocketsphinx wheel)",
            capacity=self._capacity,
            device="cpu",
        )

    # -- used by streams --

    def _checkout_decoder(self) -> Decoder:
        with self._decoders_lock:
            if self._idle_decoders:
                return self._idle_decoders.pop()
        return Decoder()

    def _return_decoder(self, decoder: Decoder) -> None:
        with self._decoders_lock:
            self._idle_decoders.append(decoder)

    def _new_endpointer(self) -> Endpointer:
        window, ratio, mode = self._vad
        return Endpointer(window=window, ratio=ratio, vad_mode=mode, sample_rate=DECODER_RATE)

    def _release(self, stream: CpuStream) -> None:
        self._streams.discard(stream)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class CpuStream(EngineStream):
    """One slot: the decoding state of one leg, advanced by at most one worker at a time."""

    def __init__(self, engine: CpuEngine, call_id: str, leg: str, max_buffer_s: float) -> None:
        super().__init__(call_id, leg, max_buffer_s)
        self._engine = engine
        self._recognizer = _Recognizer(engine, self._emit)
        self._worker: asyncio.Task[None] | None = None

    def _on_audio(self) -> None:
        self._ensure_worker()

    def _on_close(self) -> None:
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        try:
            while self.pending_samples:
                await self._engine._run(self._recognizer.feed, self._take_pending())
            if self.closing and not self._recognizer.finished:
                await self._engine._run(self._recognizer.finish)
                self._engine._release(self)
                self._emit(Closed("flushed"))
        except Exception:
            log.exception("cpu engine failed", extra={"call_id": self.call_id, "leg": self.leg})
            self._recognizer.abandon()
            self._engine._release(self)
            self._emit(Closed("engine error"))


class _Recognizer:
    """The per-stream decoding state; every method runs on a worker thread."""

    def __init__(self, engine: CpuEngine, emit: Any) -> None:
        self._engine = engine
        self._emit = emit
        self._decoder: Decoder | None = None
        self._endpointer = engine._new_endpointer()
        self._resampler = ResampleStream(ENGINE_RATE, DECODER_RATE)
        self._frame_samples = self._endpointer.frame_bytes // 2
        self._carry = np.zeros(0, dtype=np.int16)
        self._utterance_start: float | None = None
        self.finished = False

    def feed(self, pcm24k: PcmArray) -> None:
        self._feed16k(self._resampler.process(pcm24k))

    def finish(self) -> None:
        self._feed16k(self._resampler.flush())
        tail = self._carry.tobytes()
        self._carry = np.zeros(0, dtype=np.int16)
        speech = self._endpointer.end_stream(tail) if tail else None
        if speech and self._utterance_start is None:
            self._begin_utterance()
        if self._utterance_start is not None:
            if speech:
                self._decoder_in_use().process_raw(speech)
            self._end_utterance(self._endpointer.speech_end)
        self.abandon()

    def abandon(self) -> None:
        self.finished = True
        if self._decoder is not None:
            if self._utterance_start is not None:
                self._decoder.end_utt()
                self._utterance_start = None
            self._engine._return_decoder(self._decoder)
            self._decoder = None

    def _decoder_in_use(self) -> Decoder:
        if self._decoder is None:
            self._decoder = self._engine._checkout_decoder()
        return self._decoder

    def _feed16k(self, pcm: PcmArray) -> None:
        if len(self._carry):
            pcm = np.concatenate([self._carry, pcm])
        whole = len(pcm) - len(pcm) % self._frame_samples
        self._carry = pcm[whole:]
        for start in range(0, whole, self._frame_samples):
            was_in_speech = self._endpointer.in_speech
            speech = self._endpointer.process(pcm[start : start + self._frame_samples].tobytes())
            if speech is None:
                continue
            if not was_in_speech:
                self._begin_utterance()
            self._decoder_in_use().process_raw(speech)
            if not self._endpointer.in_speech:
                self._end_utterance(self._endpointer.speech_end)

    def _begin_utterance(self) -> None:
        self._utterance_start = float(self._endpointer.speech_start)
        self._decoder_in_use().start_utt()

    def _end_utterance(self, speech_end: float) -> None:
        decoder = self._decoder_in_use()
        decoder.end_utt()
        offset = self._utterance_start or 0.0
        self._utterance_start = None
        words = tuple(
            Word(
                _ALT_PRONUNCIATION.sub("", seg.word),
                round(offset + seg.start_frame * FRAME_S, 3),
                round(offset + (seg.end_frame + 1) * FRAME_S, 3),
            )
            for seg in decoder.seg()
            if not _FILLER.match(seg.word)
        )
        for word in words:
            self._emit(word)
        if words:  # an utterance of noise alone is no turn
            text = " ".join(w.text for w in words)
            self._emit(Segment(text, words[0].start_s, words[-1].end_s, words))
            self._emit(EndOfTurn(round(float(speech_end), 3)))
