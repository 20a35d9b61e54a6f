"""The store's side of the cluster (PostgreSQL; api/cluster.py drives it): each call records
the node that took it; the writer NOTIFYs every event it commits on `EVENTS_CHANNEL` (in the
payloads `notify_payloads` cuts), so other nodes show it live; each node renews a lease in
`nodes`, and `Lease.heartbeat()` marks the live calls of a node whose lease ran out
`interrupted`, keeping their words. A relay that lost the channel reads back what it missed
(`calls_elsewhere_since`, `rows_after`)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from api.store.db import DB_ERRORS, UNAVAILABLE, Database, json_text
from api.store.outbox import add_webhook
from api.store.queries import call_json, transcript_json
from api.store.records import CALL_COLUMNS, CallRecord, call_record
from telephony.bus import BusEvent, CallEnded, bus_event_to_json

log = logging.getLogger(__package__)  # the store's one logger, "api.store"

NOTIFY_CHUNK: Final = 7000  # NOTIFY payloads must stay under 8000 bytes: longer ones are chunked


def notify_payloads(
    sender: str,
    seq: int,
    event: BusEvent,
    row: int | None = None,
    data: dict[str, Any] | None = None,
) -> list[str]:
    """One bus event as NOTIFY payloads: `sender seq index count chunk`, the chunks of its JSON
    (ASCII, so characters are bytes) short enough for PostgreSQL's 8000-byte limit. `row`: its
    `events.id`, so a node that missed notifications reads what follows from the store.
    `data`: the event's `bus_event_to_json`, where the caller has it already (the writer)."""
    data = dict(data) if data is not None else bus_event_to_json(event)
    if row is not None:
        data["row"] = row
    text = json_text(data)
    if len(text) <= NOTIFY_CHUNK and text.isascii():  # nearly every event: one payload
        return [f"{sender} {seq} 0 1 {text}"]
    if not text.isascii():  # chunks are cut by characters: bytes only when ASCII
        text = json.dumps(data)
    chunks = [text[i : i + NOTIFY_CHUNK] for i in range(0, len(text), NOTIFY_CHUNK)] or [""]
    return [f"{sender} {seq} {i} {len(chunks)} {c}" for i, c in enumerate(chunks)]


class Lease:
    """This node's lease in `nodes`, renewed on a connection of its own (api/cluster.py's
    lease thread calls `heartbeat` every `lease_s / 4`)."""

    def __init__(
        self, location: Path | str, node_id: str, lease_s: float, webhook_urls: Sequence[str]
    ) -> None:
        self.location = location
        self.node_id = node_id
        self.lease_s = lease_s
        self.webhook_urls = webhook_urls
        self.problem = ""  # why the lease could not be renewed (PostgreSQL away)
        self._db: Database | None = None
        self._ok_since = 0.0  # monotonic: since when the lease is renewed without a gap

    def heartbeat(self, sweep: bool = True) -> list[CallEnded]:
        # A connection the server dropped (PostgreSQL restarted, a proxy cut it) is opened
        # again here: a node whose lease thread kept the dead one would be declared dead.
        try:
            if self._db is None or self._db.broken:
                self._db = Database(self.location)
            ended = self._renew(self._db, sweep)
        except UNAVAILABLE as exc:
            self._ok_since = 0.0
            self.problem = str(exc)[:200] or type(exc).__name__
            raise
        self.problem = ""
        return ended

    def _renew(self, db: Database, sweep: bool) -> list[CallEnded]:
        now_sql = "EXTRACT(EPOCH FROM clock_timestamp())::float8"  # one clock: the database's
        ended: list[CallEnded] = []
        # After a gap in this node's own renewals (the database was away), no other node is
        # declared dead for one lease: they could not renew meanwhile either, and their calls
        # are live. Only a lease that ran out while this node's renewed is evidence.
        if not self._ok_since:
            self._ok_since = time.monotonic()
        if time.monotonic() - self._ok_since < self.lease_s:
            sweep = False
        with db.transaction():
            db.execute(
                f"INSERT INTO nodes (id, heartbeat_at, lease_s) VALUES (?, {now_sql}, ?) "
                f"ON CONFLICT (id) DO UPDATE SET heartbeat_at = {now_sql}, lease_s = ?",
                (self.node_id, self.lease_s, self.lease_s),
            )
            dead: list[Any] = []
            if sweep:
                dead = db.execute(
                    f"SELECT id FROM nodes WHERE id <> ? AND heartbeat_at + lease_s < {now_sql} "
                    "FOR UPDATE SKIP LOCKED",
                    (self.node_id,),
                ).fetchall()
            for (node,) in dead:
                reason = f"node {node} stopped mid-call"
                now = time.time()
                rows = db.execute(
                    "UPDATE calls SET status = 'interrupted', reason = ?, ended_at = ? "
                    "WHERE node = ? AND status = 'live' RETURNING id, front_end",
                    (reason, now, node),
                ).fetchall()
                for call_id, front_end in rows:
                    ended.append(CallEnded(call_id, front_end, reason, now, {}))
                    add_webhook(
                        db,
                        self.webhook_urls,
                        self.node_id,
                        "call.ended",
                        {
                            "call": call_json(db, call_id),
                            "transcript": transcript_json(db, call_id),
                        },
                    )
                db.execute("DELETE FROM nodes WHERE id = ?", (node,))
                log.warning(
                    "node lease ran out: its live calls marked interrupted",
                    extra={"node": node, "calls": len(rows)},
                )
            db.notify(self._payloads(ended))
        return ended

    def _payloads(self, ended: list[CallEnded]) -> Iterator[str]:
        for n, event in enumerate(ended):
            yield from notify_payloads(f"{self.node_id}/lease", n, event)

    def close(self) -> None:
        """Leave the cluster (the lease thread has stopped): this node's row goes."""
        if self._db is not None:
            with contextlib.suppress(*DB_ERRORS):  # the database is away: the lease runs out
                self._db.execute("DELETE FROM nodes WHERE id = ?", (self.node_id,))
            self._db.close()


def live_calls_elsewhere(db: Database, node_id: str) -> list[CallRecord]:
    rows = db.execute(
        f"SELECT {CALL_COLUMNS} FROM calls WHERE status = 'live' AND node <> ?", (node_id,)
    ).fetchall()
    return [call_record(r) for r in rows]


def calls_elsewhere_since(db: Database, node_id: str, since: float) -> list[CallRecord]:
    rows = db.execute(
        f"SELECT {CALL_COLUMNS} FROM calls WHERE node <> ? AND "
        "(status = 'live' OR ended_at >= ?) ORDER BY started_at, id",
        (node_id, since),
    ).fetchall()
    return [call_record(r) for r in rows]


def rows_after(db: Database, call_id: str, after: int) -> list[tuple[int, str, dict[str, Any]]]:
    rows = db.execute(
        "SELECT id, leg, payload FROM events WHERE call_id = ? AND id > ? ORDER BY id",
        (call_id, after),
    ).fetchall()
    return [(int(r[0]), r[1], json.loads(r[2])) for r in rows]
