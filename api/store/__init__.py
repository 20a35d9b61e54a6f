"""The store: every call, its legs and labels, its words and segments: one SQLite file, or
PostgreSQL shared by a cluster of nodes (`data.url = "postgresql://..."`).

`Store` puts together what these modules do, each over a `Database` (db.py, the SQL dialect):
the schema's versions (migrations.py); what the API hands out (records.py); the writer thread
that applies recorded events in batches (writer.py, batches.py); the webhook outbox, written
with the event that caused it (outbox.py); the cluster's lease and live feed (lease.py); and
the API's reads (queries.py, with api/search.py's full-text index). A call the process never
saw end (kill -9, power loss) is marked `interrupted` at the next start, with every word that
had been written.

PostgreSQL going away (a restart, `kill -9`, a failover): events wait in the bounded queue and
`problem` says why (`/ready` and SIP OPTIONS answer 503); the writer tries again, backing off.
API reads take a connection of a small pool (`ReadPool`), never the writer's, so a slow reader
neither stalls the writer nor other readers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from api.store import lease, outbox, queries
from api.store.db import DB_ERRORS, EVENTS_CHANNEL, UNAVAILABLE, Database, ReadPool, is_postgres
from api.store.lease import Lease
from api.store.migrations import MIGRATIONS, PerBackend
from api.store.outbox import CLAIM_S
from api.store.records import (
    WEBHOOK_STATUS_SQL,
    CallRecord,
    Line,
    SearchResult,
    StoredEvent,
    WebhookRecord,
    transcript_lines,
)
from api.store.writer import INTERRUPTED_REASON, MAX_QUEUE, PURGE_EVERY_S, Writer
from telephony.bus import BusEvent, CallEnded

__all__ = [
    "DB_ERRORS",
    "EVENTS_CHANNEL",
    "INTERRUPTED_REASON",
    "MIGRATIONS",
    "UNAVAILABLE",
    "WEBHOOK_STATUS_SQL",
    "CallRecord",
    "Database",
    "Line",
    "PerBackend",
    "SearchResult",
    "Store",
    "StoredEvent",
    "WebhookRecord",
    "transcript_lines",
]

log = logging.getLogger(__name__)


class Store:
    def __init__(
        self,
        location: Path | str,
        webhook_urls: Sequence[str] = (),
        retention_s: float = 0.0,
        max_queue: int = MAX_QUEUE,
        purge_every_s: float = PURGE_EVERY_S,
        node_id: str = "",
        lease_s: float = 10.0,
        own_calls_only: bool = False,
    ) -> None:
        """`location`: the SQLite file, or a `postgresql://` URL (the cluster's shared store).
        `node_id` (default: the host name) is recorded with every call this node takes.
        `own_calls_only`: several processes share the SQLite file (a node's workers,
        api/workers.py): at start, only calls this `node_id` left live are marked interrupted."""
        if not is_postgres(location):
            location = Path(location)
            location.parent.mkdir(parents=True, exist_ok=True)
        self.location = location
        self.postgres = is_postgres(location)
        self.own_calls_only = own_calls_only or self.postgres
        self.node_id = node_id or socket.gethostname()
        self.lease_s = lease_s
        self.webhook_urls = tuple(webhook_urls)
        self.retention_s = retention_s
        self.purge_every_s = purge_every_s
        self._writer = Writer(
            location, self.node_id, self.webhook_urls, retention_s, purge_every_s, max_queue
        )
        self._readers = ReadPool(location)
        self._lease = Lease(location, self.node_id, lease_s, self.webhook_urls)
        self.interrupted = self._writer.mark_interrupted(self.own_calls_only)
        self._writer.purge_due()
        if self.postgres:
            self.heartbeat()  # this node is in the cluster before it takes a call
        self._writer.start()

    # -- writing (any thread → the writer thread) --

    def record(self, event: BusEvent) -> None:
        """An EventBus sink: never blocks. Beyond `max_queue` unwritten events (a disk that
        stopped answering) the event is dropped and counted, so memory stays bounded."""
        self._writer.record(event)

    @property
    def dropped(self) -> int:
        """Events lost because the queue was full (the disk stalled)."""
        return self._writer.dropped

    @property
    def failed(self) -> int:
        """Events the writer could not write (skipped; the writer goes on)."""
        return self._writer.failed

    @property
    def unavailable_errors(self) -> int:
        """Write attempts that failed because the database took no writes."""
        return self._writer.unavailable_errors

    @property
    def queue_depth(self) -> int:
        return self._writer.queue_depth

    @property
    def unwritten(self) -> int:
        """Events recorded and not yet written: the queue and the batch the writer holds (the
        one it retries while the database is away)."""
        return self._writer.unwritten

    @property
    def write_problem(self) -> str:
        """Why the database takes no writes now ("" while it does): events wait in the queue."""
        return self._writer.problem

    @property
    def lease_problem(self) -> str:
        """Why the lease could not be renewed (PostgreSQL away)."""
        return self._lease.problem

    @property
    def problem(self) -> str:
        """Why the store takes no writes now ("" while it does): the writer's last failure, or
        the lease thread's (it asks every `lease_s / 4`, so an outage shows while no call
        speaks)."""
        return self.write_problem or self.lease_problem

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything recorded so far is on disk."""
        return self._writer.flush(timeout)

    def close(self) -> None:
        if not self.flush(timeout=1.0 if self.problem else 30.0):
            log.error("store closing with %d events unwritten: %s", self.unwritten, self.problem)
        self._writer.stop()
        self._readers.close()
        self._lease.close()  # the lease thread has stopped (api/cluster.py)

    # -- the cluster's lease (PostgreSQL; called by api/cluster.py every lease_s / 4) --

    def heartbeat(self, sweep: bool = True) -> list[CallEnded]:
        """Renew this node's lease; then (`sweep`), for every node whose lease ran out, mark
        its live calls `interrupted` (their words stay), queue their `call.ended` webhooks,
        and tell every node. Returns those ends, for this node's own live view."""
        return self._lease.heartbeat(sweep)

    def live_calls_elsewhere(self) -> list[CallRecord]:
        """Live calls other nodes took (PostgreSQL): the cluster's `/v1/events` snapshot."""
        with self._reading() as db:
            return lease.live_calls_elsewhere(db, self.node_id)

    def calls_elsewhere_since(self, since: float) -> list[CallRecord]:
        """Other nodes' calls live now or ended since `since`: what a relay that lost its
        channel at `since` may have missed (api/cluster.py)."""
        with self._reading() as db:
            return lease.calls_elsewhere_since(db, self.node_id, since)

    def rows_after(self, call_id: str, after: int) -> list[tuple[int, str, dict[str, Any]]]:
        """A call's stored events past `events.id` `after`, in the order written: (id, leg,
        payload)."""
        with self._reading() as db:
            return lease.rows_after(db, call_id, after)

    # -- reading (event loop, via run_in_executor) --

    def _reading(self) -> contextlib.AbstractContextManager[Database]:
        """A reader connection of the pool, never the writer's."""
        return self._readers.connection()

    def get_call(self, call_id: str) -> CallRecord | None:
        with self._reading() as db:
            return queries.get_call(db, call_id)

    def get_events(self, call_id: str, types: Sequence[str]) -> list[StoredEvent]:
        with self._reading() as db:
            return queries.get_events(db, call_id, types)

    def list_calls(
        self,
        front_end: str | None = None,
        status: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[CallRecord], int]:
        with self._reading() as db, db.snapshot():
            return queries.list_calls(db, front_end, status, since, until, limit, offset)

    def search_calls(
        self,
        terms: Sequence[str],
        front_end: str | None = None,
        status: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> SearchResult:
        """Calls whose transcript holds every term (api/search.py), with the filters of
        `list_calls`, newest first, each with a snippet of its best-matching segment."""
        with self._reading() as db, db.snapshot():
            return queries.search_calls(db, terms, front_end, status, since, until, limit, offset)

    def delete_call(self, call_id: str) -> str:
        """ "deleted", "missing", or "live" (a live call is not deleted: its words still come)."""
        with self._reading() as db:
            return queries.delete_call(db, call_id)

    # -- outbox (the webhook sender) --

    def due_webhooks(
        self, now: float, limit: int = 50, claim_s: float = CLAIM_S
    ) -> list[tuple[int, str, str, int]]:
        """Claim up to `limit` due webhooks: their `next_at` moves `claim_s` ahead, so no other
        sender (another node) takes them meanwhile; a sender that dies leaves them due again
        then. Rows another node is claiming are skipped, not waited for."""
        with self._reading() as db:  # a connection PostgreSQL dropped is opened again there
            return outbox.claim_due(db, now, limit, claim_s)

    def webhook_done(self, row_id: int, now: float) -> None:
        with self._reading() as db:
            outbox.delivered(db, row_id, now, self.node_id)

    def webhook_failed(self, row_id: int, next_at: float, error: str) -> None:
        with self._reading() as db:
            outbox.failed(db, row_id, next_at, error)

    def webhook_dead(self, row_id: int, now: float, error: str) -> None:
        """Its last attempt failed too: dead-lettered, not sent again until retried by hand."""
        with self._reading() as db:
            outbox.dead(db, row_id, now, error)

    def pending_webhooks(self) -> int:
        return self.count_webhooks("pending")

    def count_webhooks(self, status: str) -> int:
        with self._reading() as db:
            return outbox.count(db, status)

    def list_webhooks(
        self, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[WebhookRecord], int]:
        """Newest first; `status` one of `WEBHOOK_STATUS_SQL` (None: every row)."""
        with self._reading() as db, db.snapshot():
            return outbox.page(db, status, limit, offset)

    def get_webhook(self, row_id: int) -> WebhookRecord | None:
        with self._reading() as db:
            return outbox.get(db, row_id)

    def retry_webhook(self, row_id: int, now: float) -> bool:
        """A dead letter is pending again, due now, with every attempt ahead of it. Only a
        failed row: a pending one may be in flight on some node, and must not go out twice."""
        with self._reading() as db:
            return outbox.retry(db, row_id, now)

    def retry_failed_webhooks(self, now: float, url: str | None = None) -> int:
        """Every dead letter (or those for one receiver `url`) pending again, due now."""
        with self._reading() as db:
            return outbox.retry_failed(db, now, url)
