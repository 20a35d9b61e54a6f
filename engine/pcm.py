"""PCM at the bottom of the stack: the sample type every layer passes around, and the float
conversions moshi-server's protocol and Mimi use. The engine needs them without looking up
at the front ends; telephony/audio.py (codecs, resampling) re-exports them."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PcmArray = npt.NDArray[np.int16]
"""Mono int16 samples."""


def float_to_pcm16(samples: npt.ArrayLike) -> PcmArray:
    """Float samples in [-1, 1] (moshi-server's `Audio.pcm`) to int16: x * 32768, rounded.

    Out-of-range values clip and NaN becomes 0, so no client input can wrap around.
    """
    x = np.nan_to_num(np.asarray(samples, dtype=np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def pcm16_to_float(pcm: PcmArray) -> npt.NDArray[np.float32]:
    """The inverse of `float_to_pcm16` for every int16 value: x / 32768 (what Mimi takes)."""
    return pcm.astype(np.float32) / np.float32(32768.0)
