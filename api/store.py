"""The store: every call, its legs and labels, its words and segments, in one SQLite file.

SQLite in WAL mode; the schema is plain SQL that ports to PostgreSQL (TEXT/REAL/INTEGER, no
SQLite-only types) and is versioned by `MIGRATIONS`. The event loop never waits on the disk:
`record()` (an EventBus sink) queues the event and one writer thread applies the queue in
batches. A call the process never saw end (kill -9, power loss) is marked `interrupted` at the
next start, with every word that had been written.

The webhook outbox lives here too, so a webhook is written in the same transaction as the event
that caused it and survives a restart.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from engine.base import Closed, EndOfTurn, Segment, Word, event_to_json
from telephony.session import BusEvent, CallEnded, CallStarted, DtmfPressed, LegEvent

log = logging.getLogger(__name__)

MIGRATIONS: Final[Sequence[str]] = (
    """
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,
        front_end TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        started_at REAL NOT NULL,
        ended_at REAL,
        labels TEXT NOT NULL,
        legs TEXT NOT NULL
    );
    CREATE INDEX calls_started ON calls (started_at);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id TEXT NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
        leg TEXT NOT NULL,
        type TEXT NOT NULL,
        text TEXT,
        start_s REAL,
        end_s REAL,
        payload TEXT NOT NULL
    );
    CREATE INDEX events_call ON events (call_id, start_s);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        url TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        delivered_at REAL,
        last_error TEXT
    );
    CREATE INDEX outbox_due ON outbox (delivered_at, next_at);
    """,
)


@dataclass(frozen=True)
class CallRecord:
    id: str
    front_end: str
    status: str  # live | ended | interrupted
    reason: str | None
    started_at: float
    ended_at: float | None
    labels: dict[str, str]
    legs: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "front_end": self.front_end,
            "status": self.status,
            "reason": self.reason,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "labels": self.labels,
            "legs": self.legs,
        }


@dataclass(frozen=True)
class StoredEvent:
    leg: str
    type: str
    text: str | None
    start_s: float | None
    end_s: float | None
    payload: dict[str, Any]


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def migrate(db: sqlite3.Connection) -> int:
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT version FROM schema_version").fetchone()
    version = row[0] if row else 0
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        db.executescript(
            f"BEGIN; {script}; DELETE FROM schema_version; "
            f"INSERT INTO schema_version VALUES ({number}); COMMIT;"
        )
    return len(MIGRATIONS)


class Store:
    def __init__(self, path: Path, webhook_urls: Sequence[str] = ()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.webhook_urls = tuple(webhook_urls)
        self._writer_db = _connect(path)
        migrate(self._writer_db)
        self._reader_db = _connect(path)
        self._read_lock = threading.Lock()
        self._queue: queue.Queue[BusEvent | None] = queue.Queue()
        self._written = threading.Condition()
        self._pending = 0
        self.interrupted = self._mark_interrupted()
        self._thread = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._thread.start()

    # -- writing (any thread → the writer thread) --

    def record(self, event: BusEvent) -> None:
        """An EventBus sink: never blocks."""
        with self._written:
            self._pending += 1
        self._queue.put(event)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything recorded so far is on disk."""
        with self._written:
            return self._written.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._writer_db.close()
        self._reader_db.close()

    def _mark_interrupted(self) -> int:
        cursor = self._writer_db.execute(
            "UPDATE calls SET status = 'interrupted', reason = 'bridge stopped mid-call', "
            "ended_at = ? WHERE status = 'live'",
            (time.time(),),
        )
        if cursor.rowcount:
            log.warning("calls interrupted by the last shutdown", extra={"calls": cursor.rowcount})
        return cursor.rowcount

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < 500:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                self._writer_db.execute("BEGIN")
                for event in batch:
                    self._apply(event)
                self._writer_db.execute("COMMIT")
            except sqlite3.Error:
                log.exception("store write failed; %d events lost", len(batch))
                self._writer_db.execute("ROLLBACK")
            with self._written:
                self._pending -= len(batch)
                self._written.notify_all()

    def _apply(self, event: BusEvent) -> None:
        db = self._writer_db
        if isinstance(event, CallStarted):
            db.execute(
                "INSERT OR REPLACE INTO calls (id, front_end, status, started_at, labels, legs) "
                "VALUES (?, ?, 'live', ?, ?, ?)",
                (
                    event.call_id,
                    event.front_end,
                    event.at,
                    json.dumps(dict(event.labels)),
                    json.dumps(list(event.legs)),
                ),
            )
            self._webhook("call.started", {"call": self._call_json(event.call_id)})
        elif isinstance(event, CallEnded):
            db.execute(
                "UPDATE calls SET status = 'ended', reason = ?, ended_at = ? WHERE id = ?",
                (event.reason, event.at, event.call_id),
            )
            self._webhook(
                "call.ended",
                {
                    "call": self._call_json(event.call_id),
                    "transcript": self._transcript_json(event.call_id),
                },
            )
        elif isinstance(event, DtmfPressed):
            payload = {"type": "dtmf", "digit": event.digit, "at": event.at_s}
            db.execute(
                "INSERT INTO events (call_id, leg, type, text, start_s, end_s, payload) "
                "VALUES (?, ?, 'dtmf', ?, ?, ?, ?)",
                (
                    event.call_id,
                    event.leg,
                    event.digit,
                    event.at_s,
                    event.at_s,
                    json.dumps(payload),
                ),
            )
        elif isinstance(event, LegEvent) and not isinstance(event.event, Closed):
            inner = event.event
            text, start, end = None, None, None
            if isinstance(inner, Word | Segment):
                text, start, end = inner.text, inner.start_s, inner.end_s
            elif isinstance(inner, EndOfTurn):
                start = end = inner.at_s
            payload = event_to_json(inner)
            db.execute(
                "INSERT INTO events (call_id, leg, type, text, start_s, end_s, payload) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event.call_id, event.leg, payload["type"], text, start, end, json.dumps(payload)),
            )
            if isinstance(inner, Segment):
                self._webhook(
                    "segment", {"call_id": event.call_id, "leg": event.leg, "segment": payload}
                )

    def _webhook(self, name: str, data: dict[str, Any]) -> None:
        if not self.webhook_urls:
            return
        body = json.dumps({"event": name, "sent_at": time.time(), **data})
        for url in self.webhook_urls:
            self._writer_db.execute(
                "INSERT INTO outbox (url, body, next_at) VALUES (?, ?, ?)", (url, body, time.time())
            )

    def _call_json(self, call_id: str) -> dict[str, Any] | None:
        record = self._call(self._writer_db, call_id)
        return record.to_json() if record else None

    def _transcript_json(self, call_id: str) -> list[dict[str, Any]]:
        return [
            {"leg": e.leg, "text": e.text, "start": e.start_s, "end": e.end_s}
            for e in self._events(self._writer_db, call_id, ("segment",))
        ]

    # -- reading (event loop, via run_in_executor) --

    @staticmethod
    def _call(db: sqlite3.Connection, call_id: str) -> CallRecord | None:
        row = db.execute(
            "SELECT id, front_end, status, reason, started_at, ended_at, labels, legs "
            "FROM calls WHERE id = ?",
            (call_id,),
        ).fetchone()
        return _call_record(row) if row else None

    @staticmethod
    def _events(db: sqlite3.Connection, call_id: str, types: Sequence[str]) -> list[StoredEvent]:
        marks = ",".join("?" * len(types))
        rows = db.execute(
            f"SELECT leg, type, text, start_s, end_s, payload FROM events "
            f"WHERE call_id = ? AND type IN ({marks}) ORDER BY start_s, id",
            (call_id, *types),
        ).fetchall()
        return [StoredEvent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]

    def get_call(self, call_id: str) -> CallRecord | None:
        with self._read_lock:
            return self._call(self._reader_db, call_id)

    def get_events(self, call_id: str, types: Sequence[str]) -> list[StoredEvent]:
        with self._read_lock:
            return self._events(self._reader_db, call_id, types)

    def list_calls(
        self,
        front_end: str | None = None,
        status: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[CallRecord], int]:
        where: list[str] = []
        args: list[Any] = []
        for clause, value in (
            ("front_end = ?", front_end),
            ("status = ?", status),
            ("started_at >= ?", since),
            ("started_at < ?", until),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql_where = f"WHERE {' AND '.join(where)}" if where else ""
        with self._read_lock:
            total = self._reader_db.execute(
                f"SELECT COUNT(*) FROM calls {sql_where}", args
            ).fetchone()[0]
            rows = self._reader_db.execute(
                "SELECT id, front_end, status, reason, started_at, ended_at, labels, legs "
                f"FROM calls {sql_where} ORDER BY started_at DESC, id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
        return [_call_record(r) for r in rows], int(total)

    def delete_call(self, call_id: str) -> bool:
        with self._read_lock:
            self._reader_db.execute("DELETE FROM events WHERE call_id = ?", (call_id,))
            cursor = self._reader_db.execute("DELETE FROM calls WHERE id = ?", (call_id,))
        return cursor.rowcount > 0

    def purge_older_than(self, cutoff: float) -> int:
        """Retention: drop calls (and their events) that started before `cutoff`."""
        with self._read_lock:
            self._reader_db.execute(
                "DELETE FROM events WHERE call_id IN (SELECT id FROM calls WHERE started_at < ?)",
                (cutoff,),
            )
            cursor = self._reader_db.execute(
                "DELETE FROM calls WHERE started_at < ? AND status != 'live'", (cutoff,)
            )
        return cursor.rowcount

    # -- outbox (the webhook sender) --

    def due_webhooks(self, now: float, limit: int = 50) -> list[tuple[int, str, str, int]]:
        with self._read_lock:
            return self._reader_db.execute(
                "SELECT id, url, body, attempts FROM outbox "
                "WHERE delivered_at IS NULL AND next_at <= ? ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()

    def webhook_done(self, row_id: int, now: float) -> None:
        with self._read_lock:
            self._reader_db.execute(
                "UPDATE outbox SET delivered_at = ?, attempts = attempts + 1 WHERE id = ?",
                (now, row_id),
            )

    def webhook_failed(self, row_id: int, next_at: float, error: str) -> None:
        with self._read_lock:
            self._reader_db.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? "
                "WHERE id = ?",
                (next_at, error[:500], row_id),
            )

    def pending_webhooks(self) -> int:
        with self._read_lock:
            row = self._reader_db.execute(
                "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL"
            ).fetchone()
        return int(row[0])


def _call_record(row: Sequence[Any]) -> CallRecord:
    return CallRecord(
        id=row[0],
        front_end=row[1],
        status=row[2],
        reason=row[3],
        started_at=row[4],
        ended_at=row[5],
        labels=json.loads(row[6]),
        legs=json.loads(row[7]),
    )
