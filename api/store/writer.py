"""The writer: the event loop never waits on the disk. `record()` (an EventBus sink) queues the
event and one thread applies the queue in batches (api/store/batches.py), and runs retention.

The database going away (PostgreSQL restarting, `kill -9`, a failover; a full or read-only
disk): events wait in the bounded queue and `problem` says why; the writer tries again, backing
off, with the batch it holds."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from api.store.batches import BatchWriter
from api.store.db import DB_ERRORS, UNAVAILABLE, Database
from api.store.migrations import migrate
from api.store.outbox import purge as purge_outbox
from api.store.queries import purge_calls
from telephony.bus import BusEvent

log = logging.getLogger(__package__)  # the store's one logger, "api.store"

MAX_QUEUE: Final = 100_000  # unwritten events held in memory at most
# Events in one batch (one transaction) at most. The writer never waits to fill one: it takes
# what is queued, so a batch grows only while events come faster than they are written, and
# then fewer COMMITs (an fsync each) and round trips carry them.
MAX_BATCH: Final = 5000
PURGE_EVERY_S: Final = 3600.0  # retention runs at start and then this often
INTERRUPTED_REASON: Final = "bridge stopped mid-call"  # a call its process never saw end
RETRY_MIN_S: Final = 0.2
# At most a second between tries: a database back from a restart is written to within a second
# (a try is one connection attempt, or one batch on SQLite: cheap).
RETRY_MAX_S: Final = 1.0
MARKS_KEEP_S: Final = 86400.0  # a writer's last batch mark is kept a day after its last batch


class Writer:
    """Opens (and migrates) the store's writing connection; `start()` starts its thread."""

    def __init__(
        self,
        location: Path | str,
        node_id: str,
        webhook_urls: Sequence[str],
        retention_s: float,
        purge_every_s: float,
        max_queue: int,
    ) -> None:
        self.location = location
        self.node_id = node_id
        self.retention_s = retention_s
        self.purge_every_s = purge_every_s
        self._db = Database(location)
        migrate(self._db)
        self._batches = BatchWriter(node_id, webhook_urls)
        self._batch_no = 0
        self._queue: queue.Queue[BusEvent | None] = queue.Queue(max(1, max_queue))  # 0: unbounded
        self._written = threading.Condition()
        self._pending = 0
        self.dropped = 0  # events lost because the queue was full (the disk stalled)
        self.failed = 0  # events the writer could not write (skipped; the writer goes on)
        # Why the database takes no writes now ("" while it does): events wait in the queue.
        self.problem = ""
        self.unavailable_errors = 0  # write attempts that failed because of it
        self._stopping = threading.Event()
        self._next_purge = 0.0
        self._thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)

    def mark_interrupted(self, own_calls_only: bool) -> int:
        """This node's calls left live by its last run (on SQLite alone: every live call)."""
        mine = " AND node = ?" if own_calls_only else ""
        cursor = self._db.execute(
            f"UPDATE calls SET status = 'interrupted', reason = '{INTERRUPTED_REASON}', "
            f"ended_at = ? WHERE status = 'live'{mine}",
            (time.time(), self.node_id) if own_calls_only else (time.time(),),
        )
        if cursor.rowcount:
            log.warning("calls interrupted by the last shutdown", extra={"calls": cursor.rowcount})
        return cursor.rowcount

    def purge_due(self) -> None:
        """Retention, on the writer's connection: at start, then every `purge_every_s`."""
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + self.purge_every_s
        try:
            calls = purge_calls(self._db, now - self.retention_s) if self.retention_s else 0
            purge_outbox(self._db, now)
            self._db.execute("DELETE FROM writer_marks WHERE at < ?", (now - MARKS_KEEP_S,))
        except DB_ERRORS:
            log.exception("retention purge failed")
            return
        if calls:
            log.info("retention: %d calls deleted", calls)

    def start(self) -> None:
        self._thread.start()

    # -- any thread → the writer thread --

    def record(self, event: BusEvent) -> None:
        with self._written:
            self._pending += 1
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._written:
                self._pending -= 1
                self.dropped += 1
                self._written.notify_all()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("store queue full: %d events dropped so far", self.dropped)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def unwritten(self) -> int:
        with self._written:
            return self._pending

    def flush(self, timeout: float) -> bool:
        with self._written:
            return self._written.wait_for(lambda: self._pending == 0, timeout)

    def stop(self) -> None:
        """Write what is queued, then end the thread and close the connection."""
        self._stopping.set()  # a writer waiting for the database gives up: it will not come back
        self._queue.put(None)  # blocks only while the queue is full: the writer drains it
        self._thread.join(timeout=30)
        self._db.close()

    # -- the writer thread --

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.purge_every_s)
            except queue.Empty:
                self.purge_due()
                continue
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            self._write_or_split(batch)
            with self._written:
                self._pending -= len(batch)
                self._written.notify_all()
            self.purge_due()

    def _write_or_split(self, batch: list[BusEvent]) -> None:
        """Write the batch; if an event in it fails, write its halves (in order), and so on
        down to the event, which alone is skipped: a bad event costs a few transactions, not
        one per event of the batch."""
        try:
            self._write_when_available(batch)
        except Exception as exc:
            self._rollback()
            if len(batch) > 1:
                half = len(batch) // 2
                self._write_or_split(batch[:half])
                self._write_or_split(batch[half:])
                return
            self.failed += 1
            log.error(
                "store write failed, event skipped: %s",
                type(exc).__name__,
                extra={"call_id": getattr(batch[0], "call_id", None)},
            )

    def _write_when_available(self, batch: list[BusEvent]) -> None:
        """Write the batch in one transaction; while the database takes no writes (disk full or
        read-only, connection lost) roll back and try again, backing off, so the events wait
        in the bounded queue and nothing is half-written. Once the store is closing with the
        database still away, the batch is dropped (counted) so shutdown ends."""
        delay = RETRY_MIN_S
        self._batch_no += 1
        retried = False
        while True:
            try:
                if retried and self._batches.committed(self._db, self._batch_no):
                    log.warning("store: a batch whose COMMIT answer was lost had been written")
                else:
                    self._batches.write(self._db, batch, self._batch_no)
            except UNAVAILABLE as exc:
                self._rollback()
                retried = True
                self.unavailable_errors += 1
                if not self.problem:
                    log.error("store unavailable, events wait in memory: %s", exc)
                self.problem = str(exc)[:200] or type(exc).__name__
                if self._stopping.is_set():
                    with self._written:
                        self.dropped += len(batch)
                    return
                self._stopping.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                self._reconnect()
                continue
            if self.problem:
                log.warning("store available again: waiting events written")
                self.problem = ""
            return

    def _reconnect(self) -> None:
        """PostgreSQL: a connection the server dropped is opened again (SQLite's stays)."""
        if self._db.broken:
            with contextlib.suppress(*DB_ERRORS):
                self._db = Database(self.location)

    def _rollback(self) -> None:
        with contextlib.suppress(*DB_ERRORS):  # no transaction was open (BEGIN itself failed)
            self._db.execute("ROLLBACK")
