"""How a batch of bus events becomes rows, in one transaction on the writer's connection: the
calls, their words, segments, turns and DTMF in `events`, each segment's search row, the
webhooks they cause, the NOTIFY payloads other nodes read (PostgreSQL), and the batch's own
number in `writer_marks`: a COMMIT whose answer was lost (the connection cut after the server
committed) is found there on the next try and not written twice.

A batch is written a phase at a time (`_phases`): the phase's calls started, then all its
events in one COPY (or multi-row INSERTs on SQLite), then its calls ended; the statements of
each step go to PostgreSQL in one pipeline (`Database.pipeline`), so a batch of thousands of
events is a handful of round trips, not several per call."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Final, NamedTuple

import orjson

from api import search
from api.store.db import DB_ERRORS, UNAVAILABLE, Cursor, Database
from api.store.lease import notify_payloads
from api.store.outbox import add_webhooks
from api.store.queries import TRANSCRIPT_SQL, transcript_from_rows
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


Hook = tuple[str, dict[str, Any]]  # a webhook: its name and data (outbox.add_webhooks)


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
        notices: list[str] = []  # NOTIFY payloads (PostgreSQL)
        hooks: list[Hook] = []
        for n, phase in enumerate(_phases(batch)):
            written = self._write_phase(db, phase, begin=n == 0)
            notices += written.notices
            hooks += written.hooks
        add_webhooks(db, self.webhook_urls, self.node_id, hooks)  # by COPY: not in a pipeline
        with db.pipeline():  # one round trip: NOTIFY is delivered at COMMIT, after the rows
            db.execute(
                "INSERT INTO writer_marks (writer, batch, at) VALUES (?, ?, ?) "
                "ON CONFLICT (writer) DO UPDATE SET batch = excluded.batch, at = excluded.at",
                (self.writer_id, batch_no, time.time()),
            )
            if db.postgres:  # other nodes show these live
                db.notify(notices)
            db.execute("COMMIT")

    def _write_phase(self, db: Database, phase: list[BusEvent], begin: bool) -> _Written:
        """One phase (`_phases`): its calls started, its events, its calls ended."""
        count = sum(1 for e in phase if _stored_event(e))
        notices: list[str] = []
        with db.pipeline():  # the calls and the events' ids: one round trip
            if begin:
                db.execute("BEGIN")
            started = {
                n: _start_call(db, e, self.node_id)
                for n, e in enumerate(phase)
                if isinstance(e, CallStarted)
            }
            take_ids = db.next_ids("events", count) if db.postgres and count else None
            # The rows are built while PostgreSQL starts the calls and takes their ids.
            stored = {n: _event_row(e) for n, e in enumerate(phase) if _stored_event(e)}
            ids = take_ids() if take_ids else []
        values = [row for row, _ in stored.values()]
        if db.postgres:
            # COPY under ids taken first, in order (a multi-row INSERT of thousands of
            # placeholders cost psycopg more to convert and PostgreSQL more to parse than the
            # rows' writing); the NOTIFY payloads are cut while PostgreSQL writes the rows.
            row_ids = dict(zip(stored, ids, strict=True))
            db.copy_in(
                "events",
                EVENT_COLUMNS,
                ((i, *v) for i, v in zip(ids, values, strict=True)),
                meanwhile=lambda: notices.extend(self._notices(phase, row_ids, stored)),
            )
        else:
            row_ids = dict(zip(stored, _insert_rows(db, values), strict=True))
        segments = {  # (call id, leg, text)
            n: (e.call_id, e.leg, e.event.text)
            for n, e in enumerate(phase)
            if isinstance(e, LegEvent) and isinstance(e.event, Segment)
        }
        with db.pipeline():  # the search rows and the calls ended: one round trip
            search.index_segments(db, list(segments.values()))
            ended = {n: _end_call(db, e) for n, e in enumerate(phase) if isinstance(e, CallEnded)}
        _merge_search_rows(db, [e.call_id for e in phase if isinstance(e, CallEnded)])
        hooks: list[Hook] = []
        for n in range(len(phase)):
            if n in started:
                call = call_record(started[n].fetchone()).to_json()
                hooks.append(("call.started", {"call": call}))
            elif n in ended:
                hooks.append(("call.ended", ended[n].webhook_data()))
            elif n in segments:
                call_id, leg, _ = segments[n]
                segment = stored[n][1]  # the payload stored with it
                hooks.append(("segment", {"call_id": call_id, "leg": leg, "segment": segment}))
        return _Written(notices, hooks)

    def _notices(
        self,
        phase: list[BusEvent],
        row_ids: dict[int, int],
        stored: dict[int, tuple[tuple[Any, ...], dict[str, Any]]],
    ) -> Iterator[str]:
        """The phase's events as NOTIFY payloads (lease.notify_payloads), each with its row."""
        for n, event in enumerate(phase):
            self._notify_seq += 1
            data = None  # a leg's event on the bus is its stored payload, with call and leg
            if isinstance(event, LegEvent) and n in stored:
                data = {"call_id": event.call_id, "leg": event.leg, **stored[n][1]}
            row = row_ids.get(n)
            yield from notify_payloads(self.node_id, self._notify_seq, event, row, data)


class _Written(NamedTuple):
    """A phase as written: its NOTIFY payloads (PostgreSQL) and the webhooks it causes, in
    order."""

    notices: list[str]
    hooks: list[Hook]


def _phases(batch: list[BusEvent]) -> Iterator[list[BusEvent]]:
    """The batch, cut where a call that ended in it comes up again (its id reused, an event
    after its end): within a phase, calls are started first, events written next and calls
    ended last, and that is what writing its events one by one does only while no call's
    events come after its end. A busy node's batch is one phase."""
    phase: list[BusEvent] = []
    ended: set[str] = set()
    for event in batch:
        if event.call_id in ended:
            yield phase
            phase, ended = [], set()
        phase.append(event)
        if isinstance(event, CallEnded):
            ended.add(event.call_id)
    if phase:
        yield phase


def _start_call(db: Database, event: BusEvent, node_id: str) -> Cursor:
    """The call's row, live (its `RETURNING` row read once the pipeline has it). A call id seen
    before (a second stream of one Twilio call, a client reusing its id) is live again and
    keeps what it said before: nothing stored is lost."""
    assert isinstance(event, CallStarted)
    return db.execute_later(
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
            node_id,
            ",".join(event.redaction),
        ),
    )


class _Ended:
    """A call's end as written: its row (`RETURNING`) and its transcript, read once the
    pipeline has them."""

    def __init__(self, call: Cursor, transcript: Cursor) -> None:
        self.call = call
        self.transcript = transcript

    def webhook_data(self) -> dict[str, Any]:
        row = self.call.fetchone()
        return {
            "call": call_record(row).to_json() if row else None,
            "transcript": transcript_from_rows(self.transcript.fetchall()),
        }


def _end_call(db: Database, event: CallEnded) -> _Ended:
    # A call its engine node dropped is cut off like one a node took down with it.
    status = "interrupted" if event.reason == ENGINE_LOST else "ended"
    call = db.execute_later(
        "UPDATE calls SET status = ?, reason = ?, ended_at = ?, dropped_s = ? WHERE id = ? "
        f"RETURNING {CALL_COLUMNS}",
        (status, event.reason, event.at, round(event.dropped_s, 3), event.call_id),
    )
    return _Ended(call, db.execute_later(TRANSCRIPT_SQL, (event.call_id,)))


def _event_row(event: BusEvent) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An event's `events` row, less its id (call_id, leg, type, text, start_s, end_s,
    payload), and its payload."""
    if isinstance(event, DtmfPressed):
        dtmf = {"type": "dtmf", "digit": event.digit, "at": event.at_s}
        row = (event.call_id, event.leg, "dtmf", event.digit, event.at_s, event.at_s)
        return (*row, json.dumps(dtmf)), dtmf
    assert isinstance(event, LegEvent)
    inner = event.event
    text, start, end = None, None, None
    if isinstance(inner, Word | Segment):
        text, start, end = inner.text, inner.start_s, inner.end_s
    elif isinstance(inner, EndOfTurn):
        start = end = inner.at_s
    payload = event_to_json(inner)
    return (event.call_id, event.leg, payload["type"], text, start, end, _json(payload)), payload


def _insert_rows(db: Database, values: Sequence[tuple[Any, ...]]) -> list[int]:
    """The events' rows on SQLite, in multi-row INSERTs of `INSERT_ROWS`; their ids, in
    order."""
    rows: list[int] = []
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
    return rows


def _merge_search_rows(db: Database, call_ids: Sequence[str]) -> None:
    """Each ended call's search rows become one (api/search.py), in one round trip. Only an
    optimisation: if one fails, the calls' ends are written all the same, the rows of the
    phase's ended calls left as they were."""
    if not call_ids:
        return
    try:
        with db.pipeline():
            db.execute("SAVEPOINT search_merge")
            for call_id in call_ids:
                search.call_ended(db, call_id)
            db.execute("RELEASE SAVEPOINT search_merge")
    except UNAVAILABLE:
        raise  # the whole batch waits for the database, as every write does
    except DB_ERRORS:
        db.execute("ROLLBACK TO SAVEPOINT search_merge")
        db.execute("RELEASE SAVEPOINT search_merge")
        log.exception("search rows of ended calls not merged", extra={"call_ids": call_ids})


def _stored_event(event: BusEvent) -> bool:
    """What the events table keeps: a leg's words, segments, turns (not partials, not the
    stream's end), and DTMF."""
    if isinstance(event, LegEvent):
        return not isinstance(event.event, (Closed, Partial))
    return isinstance(event, DtmfPressed)
