"""Word times for a model that gives text without them (Moonshine), from the audio itself.

An utterance's sound comes in islands: stretches of voice between pauses. The words, in order,
are shared out among the islands so that each island's share of the spoken length (estimated
from the words' letters, digits read out) matches its share of the voiced time, by dynamic
programming; an island may take no word (a breath, a click). Within an island, words follow
one another in proportion to their length. Where a speaker pauses between words the times are
close to exact; within a fluent run they are interpolated. docs/engines.md's Accuracy section
has the measured error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

FRAME_S: Final = 0.01
MIN_GAP_S: Final = 0.12  # a quieter stretch this long separates two islands (stop closures are
# shorter); shorter dips stay inside an island
FLOOR_DB: Final = 12.0  # voiced: this far above the utterance's noise floor ...
PEAK_DB: Final = 35.0  # ... and no further than this below its loud frames
_DIGIT_LENGTH: Final = 4  # "4567" is read "four five six seven"


def spoken_length(word: str) -> float:
    letters = sum(c.isalpha() for c in word)
    digits = sum(c.isdigit() for c in word)
    return max(1, letters + _DIGIT_LENGTH * digits) + 1.0  # +1: the transition between words


def voiced_islands(audio: npt.NDArray[np.float32], rate: int) -> list[tuple[float, float]]:
    """(start, end) seconds of each stretch of voice in `audio`, in order."""
    frame = int(rate * FRAME_S)
    count = len(audio) // frame
    if count == 0:
        return [(0.0, len(audio) / rate)]
    frames = audio[: count * frame].reshape(count, frame).astype(np.float64)
    level = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-10)
    floor, peak = np.percentile(level, 10), np.percentile(level, 95)
    voiced = level > max(floor + FLOOR_DB, peak - PEAK_DB)
    islands: list[tuple[float, float]] = []
    gap_frames = int(MIN_GAP_S / FRAME_S)
    start, last = -1, -gap_frames - 1
    for i in np.flatnonzero(voiced):
        if start < 0:
            start = int(i)
        elif i - last > gap_frames:
            islands.append((start * FRAME_S, (last + 1) * FRAME_S))
            start = int(i)
        last = int(i)
    if start >= 0:
        islands.append((start * FRAME_S, (last + 1) * FRAME_S))
    return islands or [(0.0, len(audio) / rate)]


def share_out(weights: Sequence[float], durations: Sequence[float]) -> list[int]:
    """The island of each word: a monotone assignment whose per-island share of the weight best
    matches the island's share of the time (least squares)."""
    n, m = len(weights), len(durations)
    cum = np.concatenate([[0.0], np.cumsum(weights)]) / max(sum(weights), 1e-9)
    share = np.asarray(durations, dtype=np.float64) / max(sum(durations), 1e-9)
    inf = float("inf")
    # cost[j][i]: best cost of the first i words over the first j islands
    cost = np.full((m + 1, n + 1), inf)
    choice = np.zeros((m + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    upper = np.triu(np.ones((n + 1, n + 1), dtype=bool))  # k <= i
    for j in range(1, m + 1):
        # words k..i-1 go to island j: total[k, i] = cost[j-1, k] + (cum[i]-cum[k]-share)^2
        total = cost[j - 1][:, None] + (cum[None, :] - cum[:, None] - share[j - 1]) ** 2
        total = np.where(upper, total, inf)
        choice[j] = np.argmin(total, axis=0)
        cost[j] = total[choice[j], np.arange(n + 1)]
    owner = [0] * n
    i = n
    for j in range(m, 0, -1):
        k = int(choice[j, i])
        for w in range(k, i):
            owner[w] = j - 1
        i = k
    return owner


def word_times(
    words: Sequence[str], audio: npt.NDArray[np.float32], rate: int
) -> list[tuple[float, float]]:
    """(start, end) seconds, from the start of `audio`, of each word spoken in it."""
    if not words:
        return []
    islands = voiced_islands(audio, rate)
    weights = [spoken_length(w) for w in words]
    owner = share_out(weights, [end - start for start, end in islands])
    times: list[tuple[float, float]] = []
    for j, (start, end) in enumerate(islands):
        members = [i for i, o in enumerate(owner) if o == j]
        total = sum(weights[i] for i in members)
        at = start
        for i in members:
            length = (end - start) * weights[i] / total
            times.append((round(at, 3), round(at + length, 3)))
            at += length
    return times
