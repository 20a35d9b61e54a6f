"""Webhook delivery from the durable outbox (see api/store.py).

Each body is JSON (`{"event": "call.started" | "segment" | "call.ended", "sent_at", ...}`),
POSTed with `X-STT-Bridge-Signature: sha256=<hex HMAC-SHA256 of the raw body>` when a secret is
configured. Anything but a 2xx is retried with exponential backoff (1 s, 2 s, 4 s, ... capped at
5 minutes), for ever, across restarts: the outbox row stays until it is delivered. Logs name a
webhook by scheme, host and path only (its query or user info may hold a token). An attempt
lasts at most `timeout_s`, reads the answer's status and never its body, and follows no
redirect (a 3xx is a failure like any other).

Verify on the receiving side:

    expected = "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, request.headers["X-STT-Bridge-Signature"])
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import Final

import aiohttp

from api.store import DB_ERRORS, Store

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-STT-Bridge-Signature"
MAX_BACKOFF_S: Final = 300.0
STORE_RETRY_S: Final = 5.0  # the outbox's database took no writes: look again after this


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def redacted(url: str) -> str:
    """A webhook URL fit for a log line: no user:password, no query (either may hold a token)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def backoff_s(attempts: int) -> float:
    return float(min(MAX_BACKOFF_S, 2.0 ** max(0, attempts)))


class WebhookSender:
    """Polls the outbox and delivers; never touches the audio path."""

    def __init__(
        self,
        store: Store,
        secret: str = "",
        timeout_s: float = 10.0,
        poll_s: float = 0.2,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self._store = store
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # A claimed webhook is this sender's until then: longer than one delivery may take, so
        # no other node sends it meanwhile; if this node dies, another sends it after that.
        self._claim_s = timeout_s + 5.0
        self._poll_s = poll_s
        self._on_result = on_result
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, deliver_for_s: float = 0.0) -> None:
        """Try to deliver what is pending for a while; the rest waits in the outbox."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deliver_for_s
        while deliver_for_s and loop.time() < deadline:
            if not await loop.run_in_executor(None, self._store.pending_webhooks):
                break
            await asyncio.sleep(self._poll_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=self._timeout) as http:
            while True:
                try:
                    due = await loop.run_in_executor(
                        None, self._store.due_webhooks, time.time(), 50, self._claim_s
                    )
                    if due:
                        await asyncio.gather(*(self._deliver(http, *row) for row in due))
                        continue
                except DB_ERRORS as exc:  # the store's disk is away: the outbox waits for it
                    log.warning("webhook outbox unavailable: %s", type(exc).__name__)
                    await asyncio.sleep(STORE_RETRY_S)
                await asyncio.sleep(self._poll_s)

    async def _deliver(
        self, http: aiohttp.ClientSession, row_id: int, url: str, body: str, attempts: int
    ) -> None:
        loop = asyncio.get_running_loop()
        data = body.encode()
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, data)
        try:
            # The answer's status is all that counts: its body is never read (a receiver that
            # sends 100 MB costs nothing), and a redirect is not followed (a 3xx is a failure,
            # retried: the signed body goes only where it was configured to).
            async with http.post(
                url, data=data, headers=headers, allow_redirects=False
            ) as response:
                ok, error = 200 <= response.status < 300, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if ok:
            await loop.run_in_executor(None, self._store.webhook_done, row_id, time.time())
        else:
            retry_at = time.time() + backoff_s(attempts)
            await loop.run_in_executor(None, self._store.webhook_failed, row_id, retry_at, error)
            log.warning(
                "webhook failed (attempt %d): %s",
                attempts + 1,
                error.replace(url, redacted(url)),
                extra={"url": redacted(url)},
            )
        if self._on_result is not None:
            self._on_result(ok)
