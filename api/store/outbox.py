"""The webhook outbox: a webhook is written in the same transaction as the event that caused
it (`add_webhook`, on the writer's connection) and survives a restart. A sender claims due rows
before it posts them (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so with many nodes each webhook
goes out once. A row is pending, delivered, or failed (dead-lettered: `failed_at` set once its
attempts ran out); a failed row is not sent again until it is retried by hand (`retry`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final

from api.store.db import Database, json_text
from api.store.records import WEBHOOK_COLUMNS, WEBHOOK_STATUS_SQL, WebhookRecord, webhook_record

CLAIM_S: Final = 60.0  # a claimed webhook goes back to the pool if not settled by then
DELIVERED_KEEP_S: Final = 86400.0  # delivered webhook bodies (transcripts) are kept a day
FAILED_KEEP_S: Final = 7 * 86400.0  # dead letters are kept a week, for a retry by hand


def add_webhook(
    db: Database, urls: Sequence[str], node: str, name: str, data: dict[str, Any]
) -> None:
    """The webhook `name` for every receiver in `urls`, written by `node`."""
    add_webhooks(db, urls, node, [(name, data)])


def add_webhooks(
    db: Database, urls: Sequence[str], node: str, hooks: Sequence[tuple[str, dict[str, Any]]]
) -> None:
    """`add_webhook` for each (name, data), in order: on PostgreSQL by COPY (the rows' ids
    taken in order), not a round trip per webhook; a JSON parameter parsed by the server cost
    twice as much for a batch's webhooks (each `call.ended` carries its transcript)."""
    if not urls or not hooks:
        return
    now = time.time()
    bodies = [json_text({"event": name, "sent_at": now, **data}) for name, data in hooks]
    rows = [(url, body, now, node) for body in bodies for url in urls]
    if db.postgres:
        db.copy_in("outbox", ("url", "body", "next_at", "node"), rows)
        return
    for row in rows:
        db.execute("INSERT INTO outbox (url, body, next_at, node) VALUES (?, ?, ?, ?)", row)


def claim_due(
    db: Database, now: float, limit: int, claim_s: float
) -> list[tuple[int, str, str, int]]:
    skip = " FOR UPDATE SKIP LOCKED" if db.postgres else ""
    rows = db.execute(
        "UPDATE outbox SET next_at = ? WHERE id IN (SELECT id FROM outbox "
        f"WHERE {WEBHOOK_STATUS_SQL['pending']} AND next_at <= ? "
        f"ORDER BY id LIMIT ?{skip}) "
        "RETURNING id, url, body, attempts",
        (now + claim_s, now, limit),
    ).fetchall()
    return sorted((int(r[0]), r[1], r[2], int(r[3])) for r in rows)


def delivered(db: Database, row_id: int, now: float, node: str) -> None:
    db.execute(
        "UPDATE outbox SET delivered_at = ?, attempts = attempts + 1, delivered_by = ? "
        "WHERE id = ?",
        (now, node, row_id),
    )


def failed(db: Database, row_id: int, next_at: float, error: str) -> None:
    db.execute(
        "UPDATE outbox SET attempts = attempts + 1, next_at = ?, last_error = ? WHERE id = ?",
        (next_at, error[:500], row_id),
    )


def dead(db: Database, row_id: int, now: float, error: str) -> None:
    db.execute(
        "UPDATE outbox SET attempts = attempts + 1, failed_at = ?, last_error = ? WHERE id = ?",
        (now, error[:500], row_id),
    )


def count(db: Database, status: str) -> int:
    row = db.execute(f"SELECT COUNT(*) FROM outbox WHERE {WEBHOOK_STATUS_SQL[status]}").fetchone()
    return int(row[0])


def page(
    db: Database, status: str | None, limit: int, offset: int
) -> tuple[list[WebhookRecord], int]:
    where = f"WHERE {WEBHOOK_STATUS_SQL[status]}" if status else ""
    total = db.execute(f"SELECT COUNT(*) FROM outbox {where}").fetchone()[0]
    rows = db.execute(
        f"SELECT {WEBHOOK_COLUMNS} FROM outbox {where} ORDER BY id DESC LIMIT ? OFFSET ?",
        (limit, offset),
    ).fetchall()
    return [webhook_record(r) for r in rows], int(total)


def get(db: Database, row_id: int) -> WebhookRecord | None:
    row = db.execute(f"SELECT {WEBHOOK_COLUMNS} FROM outbox WHERE id = ?", (row_id,)).fetchone()
    return webhook_record(row) if row else None


def retry(db: Database, row_id: int, now: float) -> bool:
    rows = db.execute(
        "UPDATE outbox SET failed_at = NULL, attempts = 0, next_at = ? "
        f"WHERE id = ? AND {WEBHOOK_STATUS_SQL['failed']} RETURNING id",
        (now, row_id),
    ).fetchall()
    return bool(rows)


def retry_failed(db: Database, now: float, url: str | None) -> int:
    where = WEBHOOK_STATUS_SQL["failed"] + (" AND url = ?" if url is not None else "")
    cursor = db.execute(
        f"UPDATE outbox SET failed_at = NULL, attempts = 0, next_at = ? WHERE {where}",
        (now, url) if url is not None else (now,),
    )
    return cursor.rowcount


def purge(db: Database, now: float) -> None:
    """Retention: delivered rows after a day, dead letters after a week."""
    db.execute(
        "DELETE FROM outbox WHERE delivered_at IS NOT NULL AND delivered_at < ?",
        (now - DELIVERED_KEEP_S,),
    )
    db.execute(
        f"DELETE FROM outbox WHERE {WEBHOOK_STATUS_SQL['failed']} AND failed_at < ?",
        (now - FAILED_KEEP_S,),
    )
