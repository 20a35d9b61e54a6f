"""What the store holds, as the API hands it out: a call, a webhook, a stored event, a
transcript line; and how a row of `calls` or `outbox` becomes one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from api import search

CALL_COLUMNS: Final = (
    "id, front_end, status, reason, started_at, ended_at, labels, legs, node, redaction, dropped_s"
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
    node: str = ""  # the node that took the call (`server.node_id`)
    redaction: tuple[str, ...] = ()  # kinds redacted from its transcript (telephony/redaction.py)
    dropped_s: float = 0.0  # audio its engine buffers dropped (a phone leg, engine behind)

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
            "node": self.node,
            "redaction": list(self.redaction),
            "dropped_s": self.dropped_s,
        }


def call_record(row: Sequence[Any]) -> CallRecord:
    return CallRecord(
        id=row[0],
        front_end=row[1],
        status=row[2],
        reason=row[3],
        started_at=row[4],
        ended_at=row[5],
        labels=json.loads(row[6]),
        legs=json.loads(row[7]),
        node=row[8],
        redaction=tuple(k for k in row[9].split(",") if k),
        dropped_s=row[10],
    )


class SearchResult(NamedTuple):
    """A page of `search_calls`: the calls with their snippets, and how many calls match in
    all: exactly, or at least `total` where `exact` is false (counting stops there)."""

    calls: list[tuple[CallRecord, search.Snippet | None]]
    total: int
    exact: bool


# A webhook's state, as `GET /v1/webhooks?status=` names it: the outbox's columns that say it.
WEBHOOK_STATUS_SQL: Final = {
    "pending": "delivered_at IS NULL AND failed_at IS NULL",
    "delivered": "delivered_at IS NOT NULL",
    "failed": "delivered_at IS NULL AND failed_at IS NOT NULL",
}
WEBHOOK_COLUMNS: Final = (
    "id, url, body, attempts, next_at, delivered_at, failed_at, last_error, node, delivered_by"
)


@dataclass(frozen=True)
class WebhookRecord:
    """One outbox row, as the API lists it (its body is summed up by its event and call)."""

    id: int
    url: str
    event: str
    call_id: str | None
    status: str  # pending | delivered | failed
    attempts: int
    next_at: float | None  # pending: when the next attempt is due
    delivered_at: float | None
    failed_at: float | None  # when it was dead-lettered
    last_error: str | None
    node: str  # the node that wrote it
    delivered_by: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def webhook_record(row: Sequence[Any]) -> WebhookRecord:
    try:
        body = json.loads(row[2])
    except ValueError:
        body = {}
    call = body.get("call") if isinstance(body.get("call"), dict) else {}
    call_id = body.get("call_id") or call.get("id")
    if row[5] is not None:
        status = "delivered"
    elif row[6] is not None:
        status = "failed"
    else:
        status = "pending"
    return WebhookRecord(
        id=int(row[0]),
        url=row[1],
        event=str(body.get("event", "")),
        call_id=str(call_id) if call_id is not None else None,
        status=status,
        attempts=int(row[3]),
        next_at=row[4] if status == "pending" else None,
        delivered_at=row[5],
        failed_at=row[6],
        last_error=row[7],
        node=row[8],
        delivered_by=row[9],
    )


@dataclass(frozen=True)
class StoredEvent:
    leg: str
    type: str
    text: str | None
    start_s: float | None
    end_s: float | None
    payload: dict[str, Any]


@dataclass(frozen=True)
class Line:
    leg: str
    start: float
    end: float
    text: str


def transcript_lines(events: list[StoredEvent]) -> list[Line]:
    """Segments of every leg by start time; words after a leg's last segment (a call cut off
    mid-utterance) become one more line, so nothing said is missing."""
    lines: list[Line] = []
    last_end: dict[str, float] = {}
    words: dict[str, list[StoredEvent]] = {}
    for e in events:
        if e.type == "segment":
            lines.append(Line(e.leg, e.start_s or 0.0, e.end_s or 0.0, e.text or ""))
            last_end[e.leg] = max(last_end.get(e.leg, 0.0), e.end_s or 0.0)
        elif e.type == "word":
            words.setdefault(e.leg, []).append(e)
    for leg, leg_words in words.items():
        tail = [w for w in leg_words if (w.start_s or 0.0) >= last_end.get(leg, -1.0)]
        if tail:
            text = " ".join(w.text or "" for w in tail)
            lines.append(Line(leg, tail[0].start_s or 0.0, tail[-1].end_s or 0.0, text))
    return sorted(lines, key=lambda line: (line.start, line.leg))
