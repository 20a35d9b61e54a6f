"""The webhook outbox on the audio/API port: what is pending, delivered or dead-lettered.

- `GET /v1/webhooks?status=pending|delivered|failed&limit=&offset=` — newest first, paginated.
- `GET /v1/webhooks/{id}` — one webhook: its event, call, attempts, last error, state.
- `POST /v1/webhooks/{id}/retry` — a dead-lettered (failed) webhook is pending again, due now,
  with every attempt ahead of it; 409 for one that is pending or delivered already.
- `POST /v1/webhooks/retry?url=` — every dead letter (or those for one receiver, its URL as
  configured) pending again: once a broken receiver is fixed; answers how many.

A webhook's URL is shown as its logs show it: scheme, host and path (its query or user info may
hold a token). Delivered rows are kept a day, failed ones a week (api/store/outbox.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Final

from aiohttp import web

from api.store import WEBHOOK_STATUS_SQL, Store, WebhookRecord
from api.webhooks import redacted

OUTBOX: Final = web.AppKey("outbox", Store)
MAX_LIMIT: Final = 500
MAX_ID: Final = 2**63 - 1  # a BIGINT; beyond it no row can match


def _json(record: WebhookRecord) -> dict[str, Any]:
    body = record.to_json()
    body["url"] = redacted(record.url)
    if record.last_error:
        body["last_error"] = record.last_error.replace(record.url, body["url"])
    return body


def _bad(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": "bad_parameters", "reason": reason}),
        content_type="application/json",
    )


def _count(request: web.Request, name: str, default: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    if not value.isdecimal() or len(value) > 9:
        raise _bad(f"{name} must be a whole number")
    return int(value)


def _row_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdecimal() or int(text) > MAX_ID:
        raise web.HTTPNotFound(text='{"error": "not_found"}', content_type="application/json")
    return int(text)


async def list_webhooks(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status is not None and status not in WEBHOOK_STATUS_SQL:
        raise _bad(f"status must be one of {', '.join(WEBHOOK_STATUS_SQL)}")
    limit = max(1, min(MAX_LIMIT, _count(request, "limit", 50)))
    offset = _count(request, "offset", 0)
    store = request.app[OUTBOX]
    records, total = await asyncio.get_running_loop().run_in_executor(
        None, lambda: store.list_webhooks(status, limit, offset)
    )
    body: dict[str, Any] = {
        "webhooks": [_json(r) for r in records],
        "total": total,
        "limit": limit,
        "offset": offset,
    }
    if offset + len(records) < total:
        body["next_offset"] = offset + len(records)
    return web.json_response(body)


async def get_webhook(request: web.Request) -> web.Response:
    store = request.app[OUTBOX]
    record = await asyncio.get_running_loop().run_in_executor(
        None, store.get_webhook, _row_id(request)
    )
    if record is None:
        raise web.HTTPNotFound(text='{"error": "not_found"}', content_type="application/json")
    return web.json_response(_json(record))


async def retry_webhook(request: web.Request) -> web.Response:
    store = request.app[OUTBOX]
    row_id = _row_id(request)
    loop = asyncio.get_running_loop()
    retried = await loop.run_in_executor(None, store.retry_webhook, row_id, time.time())
    record = await loop.run_in_executor(None, store.get_webhook, row_id)
    if record is None:
        raise web.HTTPNotFound(text='{"error": "not_found"}', content_type="application/json")
    if not retried:
        return web.json_response(
            {
                "error": f"webhook_{record.status}",
                "reason": f"the webhook is {record.status}; only a failed one can be retried",
                "webhook": _json(record),
            },
            status=409,
        )
    return web.json_response(_json(record))


async def retry_failed(request: web.Request) -> web.Response:
    store = request.app[OUTBOX]
    url = request.query.get("url")
    retried = await asyncio.get_running_loop().run_in_executor(
        None, store.retry_failed_webhooks, time.time(), url
    )
    return web.json_response({"retried": retried})


def add_routes(app: web.Application, store: Store) -> None:
    app[OUTBOX] = store
    app.router.add_get("/v1/webhooks", list_webhooks)
    app.router.add_get("/v1/webhooks/{id}", get_webhook)
    app.router.add_post("/v1/webhooks/retry", retry_failed)
    app.router.add_post("/v1/webhooks/{id}/retry", retry_webhook)
