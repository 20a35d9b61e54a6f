"""The slot batcher: many streams, one model, stepped together one frame at a time.

Model-agnostic. A `StepModel` has a fixed batch of `batch_size` slots and steps them all at
once on `frame_size` samples each; slots without a frame this step are masked off and keep their
state exactly as it was (no invented audio that would shift their timeline). The `Batcher`
keeps the slot table, and its step loop, an asyncio task, gathers one frame from every slot
that has one, runs the step on the single thread that owns the model, and hands each slot its
result back on the event loop. So stream bookkeeping never leaves the event loop, and the model
is only ever touched by its own thread.

Pace: a step runs once per frame period (80 ms for Kyutai) for the slots whose frame is in; it
runs at once, back to back, while some slot is behind by more than a frame (a file being
transcribed, a flush, a late burst), the way moshi-server's batched loop runs as fast as its
data allows. A newly taken slot is reset (only that row of the state) before its first step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from engine.base import EngineFull
from engine.keyterm_bias import KeytermBias

log = logging.getLogger(__name__)

FloatFrames = npt.NDArray[np.float32]
BoolMask = npt.NDArray[np.bool_]
T = TypeVar("T")


@dataclass(frozen=True)
class StepResult:
    """One step's output for every slot (rows of masked-off slots are meaningless)."""

    tokens: npt.NDArray[np.int64]  # [batch]
    pause_probs: npt.NDArray[np.float32] | None  # [batch, heads]: P(pause) per VAD head
    # [batch]: the model's probability of each slot's token, before any keyterm bias
    token_probs: npt.NDArray[np.float32] | None = None


class StepModel(Protocol):
    """A batched streaming model; every method runs on the model's own thread."""

    batch_size: int
    frame_size: int

    def step(
        self,
        frames: FloatFrames,
        active: BoolMask,
        reset: BoolMask,
        biases: Mapping[int, KeytermBias] | None = None,
    ) -> StepResult:
        """Reset the `reset` rows, then advance the `active` rows by one frame each; a row in
        `biases` takes its token through that bias (its keyterms)."""
        ...


class SlotClient(Protocol):
    """What a slot's stream gives the batcher; called on the event loop."""

    def frames_ready(self) -> int:
        """How many whole frames this slot could step now (0 = skip it this step)."""
        ...

    def next_frame(self) -> FloatFrames:
        """The next frame (`frame_size` float samples in [-1, 1]); only when frames_ready()."""
        ...

    @property
    def keyterm_bias(self) -> KeytermBias | None:
        """The bias of this slot's text tokens (its stream's keyterms), stepped on the model's
        thread; None for none."""
        ...

    def on_step(
        self,
        token: int,
        pause_probs: npt.NDArray[np.float32] | None,
        probability: float | None = None,
    ) -> None:
        """This slot's result of the step that consumed its frame (`probability`: the model's
        own for `token`, when the model gives it)."""
        ...


class SlotTable:
    """A fixed number of slots; `take` gives the lowest free one or raises `EngineFull`."""

    def __init__(self, size: int) -> None:
        self._clients: list[SlotClient | None] = [None] * size

    @property
    def size(self) -> int:
        return len(self._clients)

    @property
    def free(self) -> int:
        return self._clients.count(None)

    def take(self, client: SlotClient) -> int:
        for index, current in enumerate(self._clients):
            if current is None:
                self._clients[index] = client
                return index
        raise EngineFull(f"all {self.size} engine slots are busy")

    def release(self, index: int) -> None:
        self._clients[index] = None

    def items(self) -> list[tuple[int, SlotClient]]:
        return [(i, c) for i, c in enumerate(self._clients) if c is not None]


class Batcher:
    """Owns the slot table and the step loop of one `StepModel`."""

    def __init__(
        self,
        model: StepModel,
        executor: ThreadPoolExecutor,
        frame_period_s: float,
        on_step: Callable[[float, int], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.model = model
        self.slots = SlotTable(model.batch_size)
        self._executor = executor
        self._period = frame_period_s
        self._on_step = on_step  # (seconds the step took, slots it advanced)
        self._on_failure = on_failure
        self._reset = np.zeros(model.batch_size, dtype=np.bool_)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_step = 0.0
        self.steps = 0
        self.failure: BaseException | None = None

    # -- on the event loop --

    def attach(self, client: SlotClient) -> int:
        index = self.slots.take(client)
        self._reset[index] = True  # a clean state before its first step, others untouched
        return index

    def detach(self, index: int) -> None:
        self.slots.release(index)

    def wake(self) -> None:
        """New audio (or a close) somewhere: an idle loop looks again."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-steps")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _loop(self) -> None:
        try:
            await self._steps()
        except Exception as exc:
            # A model that cannot step serves no one: every stream learns it now, and the
            # engine admits no more (it reads `failure`).
            log.exception("engine step loop failed")
            self.failure = exc
            if self._on_failure is not None:
                self._on_failure(exc)

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            ready = [(i, c, n) for i, c in self.slots.items() if (n := c.frames_ready()) > 0]
            if not ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            behind = any(n > 1 for _, _, n in ready)
            wait = self._last_step + self._period - loop.time()
            if not behind and wait > 0:
                # Real-time streams: let the others' frames come in for this step.
                await asyncio.sleep(wait)
                continue
            await self._step([(i, c) for i, c, _ in ready])

    async def _step(self, ready: list[tuple[int, SlotClient]]) -> None:
        batch, size = self.model.batch_size, self.model.frame_size
        frames = np.zeros((batch, size), dtype=np.float32)
        active = np.zeros(batch, dtype=np.bool_)
        biases: dict[int, KeytermBias] = {}
        for index, client in ready:
            frames[index] = client.next_frame()
            active[index] = True
            if (bias := client.keyterm_bias) is not None:
                biases[index] = bias
        reset = self._reset.copy()
        self._reset[:] = False
        self._last_step = asyncio.get_running_loop().time()
        started = time.perf_counter()
        result = await self.run_on_model_thread(self.model.step, frames, active, reset, biases)
        self.steps += 1
        if self._on_step is not None:
            self._on_step(time.perf_counter() - started, len(ready))
        probs, token_probs = result.pause_probs, result.token_probs
        for index, client in ready:
            client.on_step(
                int(result.tokens[index]),
                None if probs is None else probs[index],
                None if token_probs is None else float(token_probs[index]),
            )
