"""Silero VAD (MIT; its ONNX model ships in the `silero-vad` wheel) over a stream, 32 ms at a time.

The model takes 512 new samples at 16 kHz plus the 64 samples before them, with a recurrent
state per stream, and gives P(speech) for that window. One session serves every stream of the
process (onnxruntime sessions are thread-safe); each stream keeps its own state and context.
About 0.16 ms of one core per window: 0.5 % of a core per stream.
"""

from __future__ import annotations

import importlib.resources
import threading
from typing import Final

import numpy as np
import numpy.typing as npt

from engine.moonshine_model import ModelLoadError

SAMPLE_RATE: Final = 16000
WINDOW: Final = 512  # samples per decision: 32 ms
CONTEXT: Final = 64  # samples of the previous window the model sees again
WINDOW_S: Final = WINDOW / SAMPLE_RATE

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
        self._rate = np.array(SAMPLE_RATE, dtype=np.int64)

    def process(self, window: npt.NDArray[np.float32]) -> float:
        """`window`: exactly `WINDOW` float samples in [-1, 1]."""
        x = np.concatenate([self._context, window])[None, :]
        out, self._state = self._session.run(  # type: ignore[attr-defined]
            None, {"input": x, "state": self._state, "sr": self._rate}
        )
        self._context = window[-CONTEXT:]
        return float(out[0, 0])
