"""Silero VAD (MIT; its ONNX model ships in the `silero-vad` wheel) over a stream, 32 ms at a time.

The model takes 512 new samples at 16 kHz plus the 64 samples before them, with a recurrent
state per stream, and gives P(speech) for that window. One session serves every stream of the
process (onnxruntime sessions are thread-safe); each stream keeps its own state and context.
About 0.16-0.22 ms of one core per window alone: 0.5-0.7 % of a core per stream.

The model takes a batch: `VadThread` judges the windows of every stream whose audio is waiting
in one call per 32 ms window (`judge_together`): 0.06 ms a window at 24 streams, the same
probabilities to the bit (each row's recurrent state is its own).
"""

from __future__ import annotations

import importlib.resources
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from engine.moonshine_model import ModelLoadError

SAMPLE_RATE: Final = 16000
WINDOW: Final = 512  # samples per decision: 32 ms
CONTEXT: Final = 64  # samples of the previous window the model sees again
WINDOW_S: Final = WINDOW / SAMPLE_RATE
_RATE: Final = np.array(SAMPLE_RATE, dtype=np.int64)

FloatAudio = npt.NDArray[np.float32]
T = TypeVar("T")

_session: object | None = None
_lock = threading.Lock()


def _shared_session() -> object:
    global _session
    with _lock:
        if _session is None:
            import onnxruntime as ort

            try:
                path = importlib.resources.files("silero_vad") / "data" / "silero_vad.onnx"
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                _session = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
            except (ModuleNotFoundError, OSError, RuntimeError) as exc:
                raise ModelLoadError(
                    f"Silero VAD (the silero-vad wheel) cannot be loaded: {exc}"
                ) from None
        return _session


def load() -> None:
    """Load the shared session now, so a missing model fails start-up and not a call."""
    _shared_session()


class SileroVad:
    """One stream's voice activity: `process(window)` → P(speech) of those 32 ms."""

    def __init__(self) -> None:
        self._session = _shared_session()
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        # P(speech) of the next windows, judged ahead by `judge_together` (state and context
        # already past them): `process` hands them out in order.
        self._judged: deque[float] = deque()

    def process(self, window: FloatAudio) -> float:
        """`window`: exactly `WINDOW` float samples in [-1, 1]."""
        if self._judged:
            return self._judged.popleft()
        x = np.concatenate([self._context, window])[None, :]
        out, self._state = self._session.run(  # type: ignore[attr-defined]
            None, {"input": x, "state": self._state, "sr": _RATE}
        )
        self._context = window[-CONTEXT:]
        return float(out[0, 0])


def judge_together(work: Sequence[tuple[SileroVad, Sequence[FloatAudio]]]) -> int:
    """Judge each VAD's next windows ahead, the n-th window of every VAD in one model call, so
    that each VAD's `process` then returns their probabilities, for those windows in order.
    Returns the number of model calls."""
    session: Any = _shared_session()
    calls = max((len(windows) for _, windows in work), default=0)
    for n in range(calls):
        rows = [(vad, windows[n]) for vad, windows in work if n < len(windows)]
        x = np.stack([np.concatenate([vad._context, window]) for vad, window in rows])
        state = np.concatenate([vad._state for vad, _ in rows], axis=1)
        out, state = session.run(None, {"input": x, "state": state, "sr": _RATE})
        for row, (vad, window) in enumerate(rows):
            vad._state = np.ascontiguousarray(state[:, row : row + 1])
            vad._context = window[-CONTEXT:]
            vad._judged.append(float(out[row, 0]))
    return calls


@dataclass(frozen=True)
class VadJob(Generic[T]):
    """A stream's turn on the VAD thread: `run` judges the windows `windows` gives (none for
    a job that only cuts), with `vad`, and returns what the stream made of them."""

    vad: SileroVad
    run: Callable[[], T]
    windows: Callable[[], Sequence[FloatAudio]] = tuple


class VadThread:
    """The engine's one VAD thread. Each time it wakes it takes every job waiting, one per
    stream, judges all their windows together (`judge_together`), then runs them in order of
    arrival. Under load many streams' audio waits at once, and one call does for all of them
    what a call per stream did."""

    def __init__(self, name: str = "vad") -> None:
        self._queue: deque[tuple[Future[Any], VadJob[Any]]] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self.windows = 0  # windows judged so far, and the model calls that judged them
        self.calls = 0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: VadJob[T]) -> Future[T]:
        future: Future[T] = Future()
        with self._ready:
            if self._stopping:
                raise RuntimeError("the VAD thread is shut down")
            self._queue.append((future, job))
            self._ready.notify()
        return future

    def shutdown(self) -> None:
        """Finish the queued work, then stop the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join()

    def _take(self) -> list[tuple[Future[Any], VadJob[Any]]] | None:
        """The jobs to run now, at most one per VAD: a stream's next windows are known only
        once its job before has run (they start with what that one left over)."""
        with self._ready:
            while not self._queue and not self._stopping:
                self._ready.wait()
            if not self._queue:
                return None
            taken: list[tuple[Future[Any], VadJob[Any]]] = []
            later: deque[tuple[Future[Any], VadJob[Any]]] = deque()
            seen: set[int] = set()
            for future, job in self._queue:
                if id(job.vad) in seen:
                    later.append((future, job))
                else:
                    seen.add(id(job.vad))
                    taken.append((future, job))
            self._queue = later
        return [(future, job) for future, job in taken if future.set_running_or_notify_cancel()]

    def _serve(self) -> None:
        while (jobs := self._take()) is not None:
            work: list[tuple[SileroVad, Sequence[FloatAudio]]] = []
            for future, job in jobs:
                try:
                    work.append((job.vad, job.windows()))
                except BaseException as exc:  # handed to whoever awaits the future
                    future.set_exception(exc)
            try:
                self.calls += judge_together(work)
                self.windows += sum(len(windows) for _, windows in work)
            except BaseException as exc:
                for future, _ in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for future, job in jobs:
                if future.done():
                    continue
                try:
                    future.set_result(job.run())
                except BaseException as exc:
                    future.set_exception(exc)
