"""Reading calls and their events, and deleting them: the API's reads (on a connection of the
readers' pool), the bodies of the webhooks the writer queues, and retention's purge."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from api import search
from api.store.db import Database
from api.store.records import (
    CALL_COLUMNS,
    CallRecord,
    SearchResult,
    StoredEvent,
    call_record,
    transcript_lines,
)


def get_call(db: Database, call_id: str) -> CallRecord | None:
    row = db.execute(f"SELECT {CALL_COLUMNS} FROM calls WHERE id = ?", (call_id,)).fetchone()
    return call_record(row) if row else None


def get_events(db: Database, call_id: str, types: Sequence[str]) -> list[StoredEvent]:
    marks = ",".join("?" * len(types))
    rows = db.execute(
        f"SELECT leg, type, text, start_s, end_s, payload FROM events "
        f"WHERE call_id = ? AND type IN ({marks}) ORDER BY start_s, id",
        (call_id, *types),
    ).fetchall()
    return [StoredEvent(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in rows]


def call_json(db: Database, call_id: str) -> dict[str, Any] | None:
    record = get_call(db, call_id)
    return record.to_json() if record else None


# A call's words and segments as `transcript_lines` reads them: their payloads are not read
# (parsing them was most of the writer's time per ended call).
TRANSCRIPT_SQL: Final = (
    "SELECT leg, type, text, start_s, end_s FROM events "
    "WHERE call_id = ? AND type IN ('segment', 'word') ORDER BY start_s, id"
)


def transcript_json(db: Database, call_id: str) -> list[dict[str, Any]]:
    return transcript_from_rows(db.execute(TRANSCRIPT_SQL, (call_id,)).fetchall())


def transcript_from_rows(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """The transcript a call.ended webhook carries, from `TRANSCRIPT_SQL`'s rows."""
    events = [StoredEvent(r[0], r[1], r[2], r[3], r[4], {}) for r in rows]
    return [line.__dict__ for line in transcript_lines(events)]


def list_calls(
    db: Database,
    front_end: str | None,
    status: str | None,
    since: float | None,
    until: float | None,
    limit: int,
    offset: int,
) -> tuple[list[CallRecord], int]:
    where, args = _call_filters(front_end, status, since, until)
    sql_where = f"WHERE {' AND '.join(where)}" if where else ""
    total = db.execute(f"SELECT COUNT(*) FROM calls {sql_where}", args).fetchone()[0]
    rows = db.execute(
        f"SELECT {CALL_COLUMNS} "
        f"FROM calls {sql_where} ORDER BY started_at DESC, id LIMIT ? OFFSET ?",
        (*args, limit, offset),
    ).fetchall()
    return [call_record(r) for r in rows], int(total)


def search_calls(
    db: Database,
    terms: Sequence[str],
    front_end: str | None,
    status: str | None,
    since: float | None,
    until: float | None,
    limit: int,
    offset: int,
) -> SearchResult:
    where, args = _call_filters(front_end, status, since, until)
    match = search.matching_calls(db, terms)
    # Counted up to a cap (past the page asked for): past it the total is "at least".
    cap = max(search.EXACT_BELOW, offset + limit)
    # Rows, not DISTINCT ids, are capped: a DISTINCT under a LIMIT made PostgreSQL walk
    # the calls by id (57 ms for a word in 5% of 100k calls, 5 ms this way).
    hit_calls, hit_rows = db.execute(
        f"SELECT COUNT(DISTINCT id), COUNT(*) FROM (SELECT calls.id FROM calls "
        f"{match.count_join} WHERE {' AND '.join([match.count_condition, *where])} "
        "LIMIT ?) AS hits",
        (*match.count_args, *args, cap + 1),
    ).fetchone()
    rows = db.execute(
        f"SELECT {CALL_COLUMNS} FROM calls {match.join} "
        f"WHERE {' AND '.join([match.condition, *where])} "
        "ORDER BY started_at DESC, id LIMIT ? OFFSET ?",
        (*match.args, *args, limit, offset),
    ).fetchall()
    marked = search.snippets(db, [r[0] for r in rows], terms)
    found = [(call_record(r), marked.get(r[0])) for r in rows]
    return SearchResult(found, min(int(hit_calls), cap), int(hit_rows) <= cap)


def delete_call(db: Database, call_id: str) -> str:
    row = db.execute("SELECT status FROM calls WHERE id = ?", (call_id,)).fetchone()
    if row is None:
        return "missing"
    if row[0] == "live":
        return "live"
    db.execute("BEGIN")
    search.unindex(db, "?", (call_id,))
    db.execute("DELETE FROM events WHERE call_id = ?", (call_id,))
    db.execute("DELETE FROM calls WHERE id = ?", (call_id,))
    db.execute("COMMIT")
    return "deleted"


def purge_calls(db: Database, cutoff: float) -> int:
    """Retention: calls started before `cutoff` and no longer live, with their events and
    search rows; how many calls went."""
    old = "SELECT id FROM calls WHERE started_at < ? AND status != 'live'"
    db.execute("BEGIN")
    search.unindex(db, old, (cutoff,))
    db.execute(f"DELETE FROM events WHERE call_id IN ({old})", (cutoff,))
    cursor = db.execute(f"DELETE FROM calls WHERE id IN ({old})", (cutoff,))
    db.execute("COMMIT")
    return cursor.rowcount


def _call_filters(
    front_end: str | None, status: str | None, since: float | None, until: float | None
) -> tuple[list[str], list[Any]]:
    """`GET /v1/calls`' filters as SQL conditions on `calls` and their arguments."""
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
    return where, args
