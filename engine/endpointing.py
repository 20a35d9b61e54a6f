"""Cutting one stream into utterances with a VAD, for a model that decodes whole utterances.

Audio goes in at 16 kHz in any split; the VAD judges each 32 ms window. An utterance starts at
the first window with P(speech) >= `threshold`, `pad_s` earlier (the onset of a word is quieter
than its middle); it ends after `min_silence_s` of windows under `threshold - 0.15`, `pad_s`
after the last voiced window. A click shorter than `min_speech_s` is no utterance. One longer
than `max_utterance_s` is cut at its quietest window in the second half (the likeliest pause
between words), the rest going on as the next utterance. Chunking never changes the cuts.

`on_pause` is told, `pad_s` into a pause, of the audio the utterance will have if the pause
goes on to end it: a decoder can start on it while the pause is still being confirmed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from engine.vad import WINDOW

FloatAudio = npt.NDArray[np.float32]
RATE: Final = 16000
_HYSTERESIS: Final = 0.15  # Silero's own: speech goes on until P(speech) < threshold - 0.15


class Vad(Protocol):
    def process(self, window: FloatAudio) -> float: ...


@dataclass(frozen=True)
class Cut:
    """A finished utterance: its audio, where it starts (sample of the stream), and whether a
    pause ended it (an end of turn) rather than the length limit or the stream's end."""

    audio: FloatAudio
    start: int
    ends_turn: bool

    @property
    def end(self) -> int:
        return self.start + len(self.audio)


@dataclass(frozen=True)
class OpenUtterance:
    """The utterance still being spoken, for a partial hypothesis."""

    number: int
    audio: FloatAudio
    start: int


@dataclass(frozen=True)
class EndpointConfig:
    threshold: float = 0.5
    min_silence_s: float = 0.5
    pad_s: float = 0.2
    min_speech_s: float = 0.1
    max_utterance_s: float = 20.0


class Utterances:
    def __init__(self, vad: Vad, config: EndpointConfig) -> None:
        self._vad = vad
        self._config = config
        self._pad = max(1, round(config.pad_s * RATE / WINDOW))
        self._min_silence = max(1, round(config.min_silence_s * RATE / WINDOW))
        self._min_speech = max(1, round(config.min_speech_s * RATE / WINDOW))
        self._max_windows = max(2 * self._pad + 2, int(config.max_utterance_s * RATE / WINDOW))
        self._carry = np.zeros(0, dtype=np.float32)
        # `windows_of`'s last answer: (its pcm, the carry it started from, windows, carry after)
        self._prepared: tuple[object, FloatAudio, list[FloatAudio], FloatAudio] | None = None
        self._fed = 0  # stream samples judged by the VAD (whole windows) or cut
        self._history: deque[FloatAudio] = deque(maxlen=self._pad)  # idle: the last pad_s
        self._windows: list[FloatAudio] = []  # in speech: the utterance so far
        self._probs: list[float] = []
        self._start = 0
        self._silence = 0  # windows under the lower threshold at the end of `_windows`
        self._voiced = 0  # windows over the threshold in this utterance
        self.number = 0  # utterances started so far
        self.on_pause: Callable[[OpenUtterance], None] | None = None

    @property
    def in_speech(self) -> bool:
        return bool(self._windows)

    @property
    def pausing(self) -> bool:
        """`pad_s` or more into a pause of the utterance in progress: `on_pause` was told."""
        return bool(self._windows) and self._silence >= self._pad

    @property
    def settled(self) -> int:
        """Samples before this point will never be part of an utterance not yet cut."""
        if self._windows:
            return self._start
        return max(0, self._fed - len(self._history) * WINDOW)

    def feed(self, pcm: npt.NDArray[np.int16]) -> list[Cut]:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] is pcm and prepared[1] is self._carry:
            windows, self._carry = prepared[2], prepared[3]  # as `windows_of` cut them
        else:
            windows, self._carry = self._windows_and_carry(pcm)
        cuts: list[Cut] = []
        for window in windows:
            cut = self._window(window)
            if cut is not None:
                cuts.append(cut)
        return cuts

    def windows_of(self, pcm: npt.NDArray[np.int16]) -> list[FloatAudio]:
        """The windows `feed(pcm)` will judge, in order, judging none: a VAD thread can judge
        several streams' windows in one model call first (engine/vad.py `judge_together`).
        Kept for that `feed`, which then does not cut them again."""
        windows, carry = self._windows_and_carry(pcm)
        self._prepared = (pcm, self._carry, windows, carry)
        return windows

    def _windows_and_carry(self, pcm: npt.NDArray[np.int16]) -> tuple[list[FloatAudio], FloatAudio]:
        audio = np.concatenate([self._carry, pcm.astype(np.float32) / np.float32(32768.0)])
        whole = len(audio) - len(audio) % WINDOW
        return [audio[at : at + WINDOW] for at in range(0, whole, WINDOW)], audio[whole:]

    def open_utterance(self) -> OpenUtterance | None:
        if not self._windows:
            return None
        return OpenUtterance(self.number, np.concatenate(self._windows), self._start)

    def cut_now(self) -> list[Cut]:
        """End the utterance in progress here (Deepgram's Finalize, or the stream's end),
        with the samples not yet judged; everything fed so far is settled after it."""
        tail, self._carry = self._carry, np.zeros(0, dtype=np.float32)
        if not self._windows:
            self._fed += len(tail)
            self._history.clear()
            return []
        audio = np.concatenate([*self._windows, tail])
        cut = self._cut(audio, ends_turn=True) if self._voiced >= self._min_speech else None
        self._fed += len(tail)
        self._reset_idle()
        return [cut] if cut is not None else []

    def skip(self, samples: int) -> list[Cut]:
        """`samples` of the stream that will never come (a buffer dropped them): the utterance
        in progress ends where its audio does, and the stream's clock moves past the gap, so
        later cuts start where they are in the stream."""
        cuts = self.cut_now()
        self._fed += samples
        return cuts

    # -- one window --

    def _window(self, window: FloatAudio) -> Cut | None:
        prob = self._vad.process(window)
        self._fed += WINDOW
        threshold = self._config.threshold
        if not self._windows:
            if prob < threshold:
                self._history.append(window)
                return None
            self.number += 1
            self._windows = [*self._history, window]
            self._probs = [0.0] * len(self._history) + [prob]
            self._start = self._fed - len(self._windows) * WINDOW
            self._history.clear()
            self._silence, self._voiced = 0, 1
            return None
        self._windows.append(window)
        self._probs.append(prob)
        if prob >= threshold:
            self._voiced += 1
            self._silence = 0
        elif prob < threshold - _HYSTERESIS:
            self._silence += 1
            if self._silence == self._pad < self._min_silence and self._voiced >= self._min_speech:
                self._pausing()
        if self._silence >= self._min_silence:
            return self._end_at_pause()
        if len(self._windows) >= self._max_windows:
            return self._split()
        return None

    def _pausing(self) -> None:
        # What `_end_at_pause` will keep if the pause lasts: the speech, then pad_s of it.
        if self.on_pause is not None:
            self.on_pause(OpenUtterance(self.number, np.concatenate(self._windows), self._start))

    def _end_at_pause(self) -> Cut | None:
        keep = len(self._windows) - self._silence + self._pad  # speech, then pad_s of silence
        audio = np.concatenate(self._windows[:keep])
        trailing = self._windows[keep:]
        cut = self._cut(audio, ends_turn=True) if self._voiced >= self._min_speech else None
        self._reset_idle()
        self._history.extend(trailing)
        return cut

    def _split(self) -> Cut:
        """At the length limit: cut at the quietest window of the second half."""
        half = len(self._windows) // 2
        probs = np.asarray(self._probs[half:])
        levels = np.asarray([float(np.mean(w * w)) for w in self._windows[half:]])
        quietest = np.lexsort((levels, probs))[0]  # lowest P(speech), then lowest energy
        at = half + int(quietest) + 1
        cut = self._cut(np.concatenate(self._windows[:at]), ends_turn=False)
        self._start += at * WINDOW
        self._windows, self._probs = self._windows[at:], self._probs[at:]
        self._voiced = sum(p >= self._config.threshold for p in self._probs)
        self._silence = 0
        self.number += 1
        return cut

    def _cut(self, audio: FloatAudio, ends_turn: bool) -> Cut:
        return Cut(audio, self._start, ends_turn)

    def _reset_idle(self) -> None:
        self._windows, self._probs = [], []
        self._silence = self._voiced = 0
        self._history.clear()
