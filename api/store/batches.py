"""How a batch of bus events becomes rows, in one transaction on the writer's connection: the
calls, their words, segments, turns and DTMF in `events`, each segment's search row, the
webhooks they cause, the NOTIFY payloads other nodes read (PostgreSQL), and the batch's own
number in `writer_marks`: a COMMIT whose answer was lost (the connection cut after the server
committed) is found there on the next try and not written twice."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import orjson

from api import search
from api.store.db import DB_ERRORS, UNAVAILABLE, Database
from api.store.lease import notify_payloads
from api.store.outbox import add_webhook, add_webhooks
from api.store.queries import transcript_json
from api.store.records import CALL_COLUMNS, call_record
from engine.base import ENGINE_LOST, Closed, EndOfTurn, Partial, Segment, Word, event_to_json
from telephony.bus import BusEvent, CallEnded, CallStarted, DtmfPressed, LegEvent

log = logging.getLogger(__package__)  # the store's one logger, "api.store"


INSERT_ROWS: Final = 500  # events in one multi-row INSERT (SQLite allows 32766 parameters)
EVENT_COLUMNS: Final = ("id", "call_id", "leg", "type", "text", "start_s", "end_s", "payload")


def _json(value: Any) -> str:
    """JSON text of what the writer stores and sends on (orjson: the writer's time per event
    went mostly to the standard library's encoder)."""
    return orjson.dumps(value).decode()


class BatchWriter:
    """Writes one writer's batches; `node_id` is recorded with every call it starts and every
    webhook it queues."""

    def __init__(self, node_id: str, webhook_urls: Sequence[str]) -> None:
        self.node_id = node_id
        self.webhook_urls = webhook_urls
        # This writer's batches are numbered; each records its number as it commits (7).
        self.writer_id = f"{node_id}/{uuid.uuid4().hex[:12]}"
        self._notify_seq = 0

    def committed(self, db: Database, batch_no: int) -> bool:
        """Whether this writer's batch `batch_no` is in the database already: its COMMIT went
        through but the answer was lost with the connection (retrying would write it twice)."""
        row = db.execute(
            "SELECT batch FROM writer_marks WHERE writer = ?", (self.writer_id,)
        ).fetchone()
        return row is not None and int(row[0]) >= batch_no

    def write(self, db: Database, batch: list[BusEvent], batch_no: int) -> None:
        db.execute("BEGIN")
        rows: list[int | None] = []
        said: list[LegEvent] = []  # a run of words, segments, turns: one INSERT for them all
        for event in batch:
            if _stored_leg_event(event):
                assert isinstance(event, LegEvent)
                said.append(event)
                continue
            rows += self._insert_said(db, said)
            said = []
            rows.append(self._apply(db, event))
        rows += self._insert_said(db, said)
        db.execute(
            "INSERT INTO writer_marks (writer, batch, at) VALUES (?, ?, ?) ON CONFLICT (writer) "
            "DO UPDATE SET batch = excluded.batch, at = excluded.at",
            (self.writer_id, batch_no, time.time()),
        )
        if db.postgres:  # other nodes show these live; NOTIFY is delivered at COMMIT
            db.notify(self._payloads(zip(batch, rows, strict=True)))
        db.execute("COMMIT")

    def _insert_said(self, db: Database, said: Sequence[LegEvent]) -> list[int | None]:
        """Words, segments and turns of a batch, not a statement per event (PostgreSQL's round
        trip per statement was the writer's limit): by COPY on PostgreSQL, in multi-row INSERTs
        of `INSERT_ROWS` on SQLite; their `events.id`s in order; then the segments' index rows
        and webhooks."""
        if not said:
            return []
        rows: list[int | None] = []
        payloads = [event_to_json(e.event) for e in said]
        values: list[tuple[Any, ...]] = []
        for event, payload in zip(said, payloads, strict=True):
            inner = event.event
            text, start, end = None, None, None
            if isinstance(inner, Word | Segment):
                text, start, end = inner.text, inner.start_s, inner.end_s
            elif isinstance(inner, EndOfTurn):
                start = end = inner.at_s
            values.append(
                (event.call_id, event.leg, payload["type"], text, start, end, _json(payload))
            )
        if db.postgres:
            # COPY with ids taken first, in order: a multi-row INSERT of 3500 placeholders
            # cost psycopg more to convert and PostgreSQL more to parse than the rows' writing.
            ids = db.next_ids("events", len(values))
            db.copy_in("events", EVENT_COLUMNS, ((i, *v) for i, v in zip(ids, values, strict=True)))
            rows += ids
        else:
            for first in range(0, len(values), INSERT_ROWS):
                part = values[first : first + INSERT_ROWS]
                cursor = db.execute(
                    f"INSERT INTO events ({', '.join(EVENT_COLUMNS[1:])}) VALUES "
                    + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(part))
                    + " RETURNING id",
                    [value for row in part for value in row],
                )
                # Ids are taken in the order the rows are inserted: sorted, they are the rows'.
                rows += sorted(int(row[0]) for row in cursor.fetchall())
        # Each segment's search row and webhook, a statement for all of them.
        segments = [
            (event.call_id, event.leg, event.event.text, payload)
            for event, payload in zip(said, payloads, strict=True)
            if isinstance(event.event, Segment)
        ]
        search.index_segments(db, [(call, leg, text) for call, leg, text, _ in segments])
        hooks = [
            ("segment", {"call_id": call, "leg": leg, "segment": payload})
            for call, leg, _, payload in segments
        ]
        add_webhooks(db, self.webhook_urls, self.node_id, hooks)
        return rows

    def _payloads(self, events: Iterable[tuple[BusEvent, int | None]]) -> Iterator[str]:
        for event, row in events:
            self._notify_seq += 1
            yield from notify_payloads(self.node_id, self._notify_seq, event, row)

    def _apply(self, db: Database, event: BusEvent) -> int | None:
        """Write one event; the `events.id` of its row, where it has one."""
        if isinstance(event, CallStarted):
            # A call id seen before (a second stream of one Twilio call, a client reusing its
            # id) is live again and keeps what it said before: nothing stored is lost.
            started = db.execute(
                "INSERT INTO calls (id, front_end, status, started_at, labels, legs, node, "
                "redaction) VALUES (?, ?, 'live', ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "front_end = excluded.front_end, status = 'live', reason = NULL, ended_at = NULL, "
                "labels = excluded.labels, legs = excluded.legs, node = excluded.node, "
                f"redaction = excluded.redaction RETURNING {CALL_COLUMNS}",
                (
                    event.call_id,
                    event.front_end,
                    event.at,
                    json.dumps(dict(event.labels)),
                    json.dumps(list(event.legs)),
                    self.node_id,
                    ",".join(event.redaction),
                ),
            )
            # The row as written (RETURNING): not read back in another round trip.
            self._webhook(db, "call.started", {"call": call_record(started.fetchone()).to_json()})
        elif isinstance(event, CallEnded):
            # A call its engine node dropped is cut off like one a node took down with it.
            status = "interrupted" if event.reason == ENGINE_LOST else "ended"
            ended = db.execute(
                "UPDATE calls SET status = ?, reason = ?, ended_at = ?, dropped_s = ? WHERE id = ? "
                f"RETURNING {CALL_COLUMNS}",
                (status, event.reason, event.at, round(event.dropped_s, 3), event.call_id),
            ).fetchone()
            _merge_search_rows(db, event.call_id)
            self._webhook(
                db,
                "call.ended",
                {
                    "call": call_record(ended).to_json() if ended else None,
                    "transcript": transcript_json(db, event.call_id),
                },
            )
        elif isinstance(event, DtmfPressed):
            payload = {"type": "dtmf", "digit": event.digit, "at": event.at_s}
            return _row_id(
                db,
                "INSERT INTO events (call_id, leg, type, text, start_s, end_s, payload) "
                "VALUES (?, ?, 'dtmf', ?, ?, ?, ?) RETURNING id",
                (
                    event.call_id,
                    event.leg,
                    event.digit,
                    event.at_s,
                    event.at_s,
                    json.dumps(payload),
                ),
            )
        elif _stored_leg_event(event):
            assert isinstance(event, LegEvent)
            return self._insert_said(db, [event])[0]
        return None

    def _webhook(self, db: Database, name: str, data: dict[str, Any]) -> None:
        add_webhook(db, self.webhook_urls, self.node_id, name, data)


def _merge_search_rows(db: Database, call_id: str) -> None:
    """The ended call's search rows become one (api/search.py). Only an optimisation: if it
    fails, the call's end is written all the same, its rows left as they were."""
    db.execute("SAVEPOINT search_merge")
    try:
        search.call_ended(db, call_id)
    except UNAVAILABLE:
        raise  # the whole batch waits for the database, as every write does
    except DB_ERRORS:
        db.execute("ROLLBACK TO SAVEPOINT search_merge")
        log.exception("search rows of an ended call not merged", extra={"call_id": call_id})
    db.execute("RELEASE SAVEPOINT search_merge")


def _stored_leg_event(event: BusEvent) -> bool:
    """What the events table keeps of a leg: words, segments, turns (not partials, not the
    stream's end)."""
    return isinstance(event, LegEvent) and not isinstance(event.event, Closed | Partial)


def _row_id(db: Database, sql: str, args: Sequence[Any]) -> int:
    """The id an `INSERT ... RETURNING id` gave its row."""
    row = db.execute(sql, args).fetchone()
    return int(row[0])
