"""Dead-lettered webhooks, on SQLite and on PostgreSQL: a receiver that answers 4xx gets a
bounded number of attempts per webhook, then the webhook is failed: listed by
`GET /v1/webhooks?status=failed`, counted in /metrics, logged once per receiver per minute, and
sent again (once) by `POST /v1/webhooks/{id}/retry` when the receiver works again."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web

from api.app import Service
from api.config import WebhookConfig, load_config
from tests.conftest import ServiceFactory, make_config
from tests.pg import Postgres, free_port

ATTEMPTS = 3


class Receiver:
    """A webhook endpoint on loopback answering `status`; counts every attempt by its body."""

    def __init__(self) -> None:
        self.port = free_port()
        self.status = 410  # gone: the receiver was removed, a 4xx that no retry will fix
        self.attempts: Counter[str] = Counter()
        self.accepted: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts[json.loads(body)["event"]] += 1
        if self.status < 300:
            self.accepted.append(json.loads(body))
        return web.Response(status=self.status)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def api(service: Service, method: str, path: str, port: str = "audio") -> tuple[int, Any]:
    url = f"http://127.0.0.1:{service.ports[port]}{path}"
    async with aiohttp.ClientSession() as http, http.request(method, url) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def listed(service: Service, status: str) -> list[dict[str, Any]]:
    code, body = await api(service, "GET", f"/v1/webhooks?status={status}")
    assert code == 200, body
    webhooks: list[dict[str, Any]] = body["webhooks"]
    assert body["total"] == len(webhooks)
    return webhooks


async def until(check: Any, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


async def test_a_receiver_answering_4xx_gets_bounded_attempts_then_dead_letters_and_a_retry(
    store_url: str,
    start_service: ServiceFactory,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="api.webhooks")
    base = make_config(data_url=store_url, name="sink")
    config = dataclasses.replace(
        base,
        webhook=WebhookConfig(
            url=receiver.url,
            timeout_s=5.0,
            max_attempts=ATTEMPTS,
            backoff_s=0.05,
            max_backoff_s=0.1,
        ),
    )
    service = await start_service(config)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?call_id=hooked"
        )
        await ws.send_bytes(bytes(9600))
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass

    async def both_failed() -> bool:
        return len(await listed(service, "failed")) == 2

    await until(both_failed)
    await asyncio.sleep(0.5)  # ten poll periods, and many backoffs: no attempt more
    assert receiver.attempts == {"call.started": ATTEMPTS, "call.ended": ATTEMPTS}
    assert receiver.accepted == []
    failed = await listed(service, "failed")
    assert await listed(service, "pending") == []
    assert await listed(service, "delivered") == []
    assert [(w["event"], w["call_id"]) for w in failed] == [
        ("call.ended", "hooked"),
        ("call.started", "hooked"),
    ]  # newest first
    for webhook in failed:
        assert webhook["status"] == "failed" and webhook["attempts"] == ATTEMPTS
        assert webhook["last_error"] == "HTTP 410" and webhook["url"] == receiver.url
        assert webhook["failed_at"] is not None and webhook["next_at"] is None

    # /metrics: two dead letters in the outbox, none pending; each webhook's last attempt
    # counted as dead-lettered, the ones before it as failed.
    code, metrics = await api(service, "GET", "/metrics", port="health")
    assert code == 200
    assert "stt_bridge_webhooks_failed 2.0" in metrics
    assert "stt_bridge_webhooks_pending 0.0" in metrics
    assert 'stt_bridge_webhook_deliveries_total{result="dead_lettered"} 2.0' in metrics
    assert f'stt_bridge_webhook_deliveries_total{{result="failed"}} {2 * (ATTEMPTS - 1)}.0' in (
        metrics
    )
    # Logged: each attempt a WARNING, the dead letters one ERROR for the receiver this minute.
    dead_lines = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(dead_lines) == 1 and dead_lines[0].levelno == logging.ERROR
    assert dead_lines[0].__dict__["url"] == receiver.url

    # The receiver is fixed; one dead letter is retried by hand: delivered once, the other
    # stays failed.
    receiver.status = 204
    started = next(w for w in failed if w["event"] == "call.started")
    code, body = await api(service, "POST", f"/v1/webhooks/{started['id']}/retry")
    assert code == 200 and body["status"] == "pending" and body["attempts"] == 0

    async def delivered() -> bool:
        return len(await listed(service, "delivered")) == 1

    await until(delivered)
    await asyncio.sleep(0.3)
    assert [w["event"] for w in receiver.accepted] == ["call.started"]
    assert receiver.attempts["call.started"] == ATTEMPTS + 1
    assert receiver.attempts["call.ended"] == ATTEMPTS
    (done,) = await listed(service, "delivered")
    assert (done["id"], done["attempts"], done["delivered_at"] is not None) == (
        started["id"],
        1,
        True,
    )
    assert [w["event"] for w in await listed(service, "failed")] == ["call.ended"]
    code, metrics = await api(service, "GET", "/metrics", port="health")
    assert "stt_bridge_webhooks_failed 1.0" in metrics

    # Only a failed webhook is retried: a delivered one is 409, an unknown id 404.
    code, body = await api(service, "POST", f"/v1/webhooks/{started['id']}/retry")
    assert code == 409 and body["error"] == "webhook_delivered"
    assert (await api(service, "POST", "/v1/webhooks/999999/retry"))[0] == 404
    assert (await api(service, "POST", "/v1/webhooks/nope/retry"))[0] == 404
    assert (await api(service, "GET", f"/v1/webhooks/{started['id']}"))[1]["status"] == (
        "delivered"
    )
    code, body = await api(service, "GET", "/v1/webhooks?status=lost")
    assert code == 400 and body["error"] == "bad_parameters"
    code, body = await api(service, "GET", "/v1/webhooks?limit=1")
    assert (code, body["total"], len(body["webhooks"]), body["next_offset"]) == (200, 2, 1, 1)

    # Every dead letter at once, for one receiver: none for another URL, then this one's.
    other = "http://127.0.0.1:1/other"
    assert await api(service, "POST", f"/v1/webhooks/retry?url={other}") == (200, {"retried": 0})
    assert await api(service, "POST", f"/v1/webhooks/retry?url={receiver.url}") == (
        200,
        {"retried": 1},
    )

    async def all_delivered() -> bool:
        return len(await listed(service, "delivered")) == 2

    await until(all_delivered)
    assert sorted(w["event"] for w in receiver.accepted) == ["call.ended", "call.started"]
    assert await api(service, "POST", "/v1/webhooks/retry") == (200, {"retried": 0})


async def test_webhooks_and_reads_come_back_after_postgresql_drops_the_connections(
    postgres: Postgres, start_service: ServiceFactory, receiver: Receiver
) -> None:
    """PostgreSQL drops every connection of the node (as in a restart or a failover): the next
    call's webhooks still go out, each once, and the API lists the call."""
    receiver.status = 204
    url = postgres.fresh_database()
    base = make_config(data_url=url, name="sink")
    hook = WebhookConfig(url=receiver.url)
    service = await start_service(dataclasses.replace(base, webhook=hook))

    async def call(call_id: str) -> None:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?call_id={call_id}"
            )
            await ws.send_bytes(bytes(9600))
            await ws.send_str('{"type": "stop"}')
            async for _ in ws:
                pass

    async def delivered(n: int) -> bool:
        return len(receiver.accepted) >= n

    await call("before")
    await until(lambda: delivered(2))
    with psycopg.connect(url, autocommit=True) as db:
        cut = db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    assert len(cut) >= 2  # the store's writer and reader at least
    await call("after")
    await until(lambda: delivered(4), timeout=30)
    await asyncio.sleep(0.5)
    assert sorted((h["event"], (h.get("call") or {}).get("id")) for h in receiver.accepted) == [
        ("call.ended", "after"),
        ("call.ended", "before"),
        ("call.started", "after"),
        ("call.started", "before"),
    ]
    code, body = await api(service, "GET", "/v1/calls")
    assert code == 200 and {c["id"] for c in body["calls"]} == {"before", "after"}


async def test_zero_attempts_retries_for_ever(
    start_service: ServiceFactory, receiver: Receiver
) -> None:
    """max_attempts = 0: the documented way back to retrying until delivered."""
    base = make_config(name="sink")
    config = dataclasses.replace(
        base,
        webhook=WebhookConfig(url=receiver.url, max_attempts=0, backoff_s=0.02, max_backoff_s=0.02),
    )
    service = await start_service(config)
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/v1/stream")
        await ws.close()

    async def many() -> bool:
        return receiver.attempts["call.started"] > 3 * ATTEMPTS

    await until(many)
    assert await listed(service, "failed") == []
    assert len(await listed(service, "pending")) == 2


def test_max_attempts_and_backoff_from_the_environment() -> None:
    config = load_config(
        environ={
            "STT_BRIDGE_WEBHOOK_MAX_ATTEMPTS": "7",
            "STT_BRIDGE_WEBHOOK_BACKOFF_S": "0.5",
            "STT_BRIDGE_WEBHOOK_MAX_BACKOFF_S": "60",
        }
    )
    assert (config.webhook.max_attempts, config.webhook.backoff_s) == (7, 0.5)
    assert config.webhook.max_backoff_s == 60.0
    assert load_config(environ={}).webhook.max_attempts == 20


def test_the_urls_credentials_and_query_never_reach_the_listing() -> None:
    """The listing shows a URL as the logs do (api/webhooks.py `redacted`)."""
    from api.routes.webhooks import _json
    from api.store import WebhookRecord

    url = "https://user:pw-4417@hooks.example.com:8443/in?token=tk-9921"
    record = WebhookRecord(
        1, url, "segment", "c1", "failed", 20, None, None, 1.0, f"timeout posting {url}", "n", None
    )
    shown = json.dumps(_json(record))
    assert "pw-4417" not in shown and "tk-9921" not in shown
    assert re.search(r"https://hooks\.example\.com:8443/in\b", shown)
