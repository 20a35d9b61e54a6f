"""Decoding threads shared by every stream, finals first.

onnxruntime releases the GIL for each model run, so N threads decode N utterances at once on N
cores with one copy of the model. Work is taken by priority, then by rank (lowest first),
then in order of arrival: a stream's audio and its final decodes (`FINAL`) always go first,
then finals decoded ahead in a pause (`AHEAD`, most of which become the final), then partial
hypotheses (`PARTIAL`), so under load partials come later or not at all, while finals keep
their pace.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Final, TypeVar

T = TypeVar("T")

FINAL: Final = 0
AHEAD: Final = 1
PARTIAL: Final = 2


class DecodePool:
    def __init__(self, threads: int, name: str = "decode") -> None:
        self._queue: list[tuple[int, float, int, Future[Any], Callable[[], Any]]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> int:
        return len(self._threads)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, priority: int, fn: Callable[[], T], rank: float = 0.0) -> Future[T]:
        future: Future[T] = Future()
        with self._ready:
            if self._stopping:
                raise RuntimeError("the decode pool is shut down")
            heapq.heappush(self._queue, (priority, rank, next(self._order), future, fn))
            self._ready.notify()
        return future

    def shutdown(self) -> None:
        """Finish the queued work, then stop the threads."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if not self._queue:
                    return
                *_, future, fn = heapq.heappop(self._queue)
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to whoever awaits the future
                    future.set_exception(exc)
