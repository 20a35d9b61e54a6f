"""The minimum request body rate ([limits] min_body_bytes_per_s after body_rate_grace_s): a
trickled upload is answered 408 and its connection closed, on a real socket; an upload that
keeps up, however slowly, is served; other requests meanwhile are not disturbed."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from typing import Any

import aiohttp

from api.app import Service, build_audio_app
from api.config import LimitsConfig
from tests.conftest import ServiceFactory, make_config

GRACE_S = 1.0
RATE = 500.0


def config(**limits: Any) -> Any:
    base = make_config(name="sink")
    fields = {"min_body_bytes_per_s": RATE, "body_rate_grace_s": GRACE_S, **limits}
    return dataclasses.replace(base, limits=dataclasses.replace(LimitsConfig(), **fields))


def head(path: str, length: int, content_type: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def upload(
    port: int,
    path: str,
    body: bytes,
    every_s: float,
    chunk: int,
    content_type: str,
    wait_s: float,
    close_wait_s: float = 2.0,
) -> tuple[bytes, float, bool]:
    """Send the body `chunk` bytes every `every_s` until the server answers (or it is all sent);
    return the answer's first bytes, when they came (seconds after the headers), and whether
    the server closed the connection after answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        # Timed from before the headers go: the server's clock starts when it has read them,
        # which may be before this thread runs again (CI saw a 3 s limit "take" 2.9991 s).
        started = time.monotonic()
        s.sendall(head(path, len(body), content_type))
        s.settimeout(every_s)
        answer = b""
        sent = 0
        while not answer and time.monotonic() - started < wait_s:
            if sent < len(body):
                s.sendall(body[sent : sent + chunk])
                sent += chunk
            try:
                answer = s.recv(65536)
            except TimeoutError:
                continue
            if not answer:
                return b"", time.monotonic() - started, True  # closed without a word
        took = time.monotonic() - started
        s.settimeout(close_wait_s)
        try:
            while s.recv(65536):
                pass
            closed = True
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
    return answer, took, closed


async def trickle(service: Service, path: str, content_type: str) -> tuple[bytes, float, bool]:
    """The issue's upload: 100 kB announced, a few bytes a second."""
    return await asyncio.to_thread(
        upload, service.ports["audio"], path, bytes(100_000), 0.2, 1, content_type, 10.0
    )


async def test_a_trickled_audio_upload_is_answered_408_and_closed(
    start_service: ServiceFactory,
) -> None:
    """POST /api/asr-streaming announcing 100 kB, sent at 5 bytes/s: 408 once the grace and
    the bytes' worth of time are over, and the connection ends; a request on another
    connection meanwhile is served at once."""
    grace_s = 2.0
    service = await start_service(config(body_rate_grace_s=grace_s))
    uploading = asyncio.create_task(trickle(service, "/api/asr-streaming", "audio/wav"))
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['audio']}/v1/calls") as r:
            assert r.status == 200
    assert not uploading.done()  # served while the trickle was still held
    answer, took, closed = await uploading
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_too_slow" in answer
    # 5 bytes/s earn 10 ms a second: the answer comes just after the grace.
    assert grace_s <= took < grace_s + 1.5
    assert closed


async def test_every_route_that_takes_a_body_answers_a_trickle(
    start_service: ServiceFactory,
) -> None:
    """Every POST route of the audio/API port (there is no PUT or PATCH), trickled: none holds
    the connection unanswered past the grace. The routes that read a body, each sent the kind
    of body it reads, answer 408 and close; the others answer without waiting for it."""
    service = await start_service(config())
    app = build_audio_app(service.bridge)
    methods = {route.method for route in app.router.routes()}
    assert not methods & {"PUT", "PATCH"}, "trickle those too"
    paths = sorted(
        {
            route.resource.canonical.replace("{id}", "1").replace("{prefix}", "dg")
            for route in app.router.routes()
            if route.method == "POST" and route.resource is not None
        }
    )
    body_routes = {
        "/api/asr-streaming": "audio/wav",  # moshi-server's file
        "/twilio/voice": "application/x-www-form-urlencoded",
        "/v1/listen": "audio/wav",  # Deepgram pre-recorded, and behind a base-URL prefix
        "/dg/v1/listen": "audio/wav",
        "/v1/audio/transcriptions": "multipart/form-data; boundary=b0undary",  # OpenAI's
    }
    assert set(body_routes) <= set(paths), set(body_routes) - set(paths)
    for path in paths:
        kind = body_routes.get(path, "application/x-www-form-urlencoded")
        answer, took, closed = await trickle(service, path, kind)
        assert answer.startswith(b"HTTP/1.1 "), (path, answer[:200])
        assert took < GRACE_S + 1.5, (path, took)
        if path in body_routes:
            assert answer.startswith(b"HTTP/1.1 408") and closed, (path, answer[:200])


async def test_a_slow_upload_that_keeps_up_is_served(start_service: ServiceFactory) -> None:
    """A 4 kB form sent over 4 s (1 kB/s: slow, but above 500 bytes/s) and one that waits 0.8 s
    (inside the grace) before sending it all: both are answered with their TwiML."""
    service = await start_service(config())
    form = b"CallSid=CA0001&From=%2B15550100&Pad=" + b"x" * 4000
    for every_s, chunk in ((0.1, 100), (0.8, len(form))):
        answer, _, _ = await asyncio.to_thread(
            upload,
            service.ports["audio"],
            "/twilio/voice",
            form,
            every_s,
            chunk,
            "application/x-www-form-urlencoded",
            10.0,
            0.1,
        )
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"<Stream" in answer or b"<Response" in answer


async def test_the_rule_is_off_at_zero(start_service: ServiceFactory) -> None:
    """min_body_bytes_per_s = 0: a trickled upload is left to http_request_timeout_s (here
    3 s: 504), as before this limit existed."""
    service = await start_service(config(min_body_bytes_per_s=0, http_request_timeout_s=3.0))
    answer, took, _ = await asyncio.to_thread(
        upload,
        service.ports["audio"],
        "/twilio/voice",
        bytes(100_000),
        0.2,
        1,
        "application/x-www-form-urlencoded",
        10.0,
        0.1,
    )
    assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
    assert took >= 3.0
