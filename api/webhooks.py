"""Webhook delivery from the durable outbox (see api/store/outbox.py).

Each body is JSON (`{"event": "call.started" | "segment" | "call.ended", "sent_at", ...}`),
POSTed with `X-STT-Bridge-Signature: sha256=<hex HMAC-SHA256 of the raw body>` when a secret is
configured. Anything but a 2xx is retried with exponential backoff (`backoff_s`, doubled after
each failure, at most `max_backoff_s` apart), across restarts, up to `max_attempts` attempts:
then the delivery is dead-lettered (the outbox row stays, `failed`, until it is retried by hand
or a week has passed), so one broken receiver cannot grow the outbox's work without end. Logs
name a webhook by scheme, host and path only (its query or user info may hold a token): one
WARNING per failed attempt, and at most one ERROR a minute per receiver whose webhooks are
dead-lettered. An attempt lasts at most `timeout_s`, reads the answer's status
and never its body, and follows no redirect (a 3xx is a failure like any other).

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
from typing import Any, Final

import aiohttp

from api.store import DB_ERRORS, Store
from telephony.limits import SourceLog

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-STT-Bridge-Signature"
MAX_BACKOFF_S: Final = 300.0
MAX_ATTEMPTS: Final = 20  # 1 + 2 + ... + 256 s, then 300 s apart: about an hour
STORE_RETRY_S: Final = 5.0  # the outbox's database took no writes: look again after this
SETTLE_RETRY_S: Final = 0.2  # a delivery's outcome not written (database away): try again


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def redacted(url: str) -> str:
    """A webhook URL fit for a log line: no user:password, no query (either may hold a token)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def backoff_s(attempts: int, first_s: float = 1.0, max_s: float = MAX_BACKOFF_S) -> float:
    """The wait after `attempts + 1` failed attempts: `first_s`, doubled each time, capped."""
    return float(min(max_s, first_s * 2.0 ** min(max(0, attempts), 64)))


class WebhookSender:
    """Polls the outbox and delivers; never touches the audio path."""

    def __init__(
        self,
        store: Store,
        secret: str = "",
        timeout_s: float = 10.0,
        poll_s: float = 0.2,
        on_result: Callable[[str], None] | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        """`on_result` hears each attempt's outcome: "delivered", "failed" (it will be tried
        again) or "dead_lettered" (it failed, and was the last; `max_attempts` 0: never)."""
        self._store = store
        self._max_attempts = max_attempts
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._dead_letters = SourceLog(log)  # per receiver (its redacted URL), once a minute
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
        result = "delivered" if ok else "failed"
        if ok:
            await self._settle(self._store.webhook_done, row_id, time.time())
        elif self._max_attempts and attempts + 1 >= self._max_attempts:
            result = "dead_lettered"
            await self._settle(self._store.webhook_dead, row_id, time.time(), error)
        else:
            delay = backoff_s(attempts, self._first_backoff_s, self._max_backoff_s)
            await self._settle(self._store.webhook_failed, row_id, time.time() + delay, error)
        if not ok:
            self._log_failure(url, attempts + 1, error, result == "dead_lettered")
        if self._on_result is not None:
            self._on_result(result)

    async def _settle(self, outcome: Callable[..., None], row_id: int, *args: Any) -> None:
        """Write a delivery's outcome, trying again while the database is away (PostgreSQL
        restarting): a delivered webhook left claimed would be sent again once its claim ran
        out. Given up on only when the claim has run out (another sender may have it now)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._claim_s
        while True:
            try:
                await loop.run_in_executor(None, outcome, row_id, *args)
                return
            except DB_ERRORS as exc:
                if loop.time() > deadline:
                    log.error("webhook outcome not written: %s", type(exc).__name__)
                    raise
                await asyncio.sleep(SETTLE_RETRY_S)

    def _log_failure(self, url: str, attempt: int, error: str, dead: bool) -> None:
        """Each failed attempt is a WARNING; a webhook given up on is an ERROR at most once a
        minute per receiver (a receiver broken for a day dead-letters every webhook: a line a
        minute says so, with how to list and retry them)."""
        receiver = redacted(url)
        error = error.replace(url, receiver)
        log.warning(
            "webhook failed (attempt %d of %s): %s",
            attempt,
            self._max_attempts or "unlimited",
            error,
            extra={"url": receiver},
        )
        if dead and self._dead_letters.allow(receiver):
            log.error(
                "webhook dead-lettered after %d attempts (GET /v1/webhooks?status=failed lists "
                "them, POST /v1/webhooks/{id}/retry sends one again)",
                attempt,
                extra={"url": receiver},
            )
