"""Security review (issue 17), against the real service on loopback: every audio or transcript
route needs the API key, static files cannot be walked out of, no secret reaches `/info`, an
error or the log, SIP digest answers cannot be replayed, TLS below 1.2 is refused, and Twilio's
signature guards both of its routes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from twilio.request_validator import RequestValidator

from api.app import WEB_DIR, Service, build_audio_app, build_web_app
from api.config import ApiConfig, Config, TlsConfig, TwilioConfig
from tests.conftest import ServiceFactory, make_config
from tests.e2e.server_process import CLI, ServerProcess

KEY = "sec-key-4f1c9a"
TWILIO_TOKEN = "twilio-token-8d2e"
# Routes open by design: the page, its static files and client config (nothing of a call), and
# Twilio's, which Twilio's signature guards instead (see the last test).
OPEN_ROUTES = {"/", "/config.json", "/static", "/twilio/voice", "/twilio/media"}
# What the issue names: each must be among the routes found, so none is missed by a rename.
MUST_GUARD = {
    "/v1/listen",
    "/v1/audio/transcriptions",
    "/asterisk/media",
    "/asterisk/aeap",
    "/freeswitch",
    "/freeswitch/{call_id}",
    "/v1/stream",
    "/api/asr-streaming",
    "/telnyx/media",
    "/plivo/media",
    "/vonage/media",
    "/exotel/media",
    "/signalwire/media",
    "/jambonz/listen",
    "/audiohook",
    "/v1/calls",
    "/v1/calls/{call_id}",
    "/v1/calls/{call_id}/transcript",
    "/v1/calls/{call_id}/events",
    "/v1/events",
    "/v1/webhooks",
    "/v1/webhooks/{id}",
    "/v1/webhooks/{id}/retry",
    "/v1/webhooks/retry",
}


def sink_config(**sections: Any) -> Config:
    return dataclasses.replace(make_config(name="sink"), **sections)


def routes(service: Service) -> list[tuple[str, str]]:
    """(method, path template) of every route the audio port serves, from the app itself."""
    app = build_audio_app(service.bridge)
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or info.get("prefix")
        if route.method != "HEAD":
            found.add((route.method, str(path).rstrip("/") or "/"))
    return sorted(found)


def concrete(template: str) -> str:
    return re.sub(r"\{[^}]*\}", "x", template).replace("x/v1/listen", "dg/v1/listen")


async def test_every_audio_and_transcript_route_refuses_a_request_without_the_key(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(sink_config(api=ApiConfig(keys=(KEY,))))
    found = routes(service)
    templates = {path for _, path in found}
    assert templates >= MUST_GUARD, MUST_GUARD - templates
    guarded = [(m, p) for m, p in found if p not in OPEN_ROUTES]
    base = f"127.0.0.1:{service.ports['audio']}"
    refused: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:
        for method, template in guarded:
            url = f"http://{base}{concrete(template)}"
            async with http.request(method, url, data=b"x" if method == "POST" else None) as r:
                assert r.status == 401, (method, template, r.status)
            if method == "GET":  # and as a WebSocket: refused before any audio is taken
                try:
                    ws = await http.ws_connect(url.replace("http", "ws", 1))
                    message = await ws.receive(timeout=5)
                    refused[template] = message.data
                    assert message.type is aiohttp.WSMsgType.CLOSE, (template, message)
                    assert message.data == 1008 and "unauthorized" in str(message.extra), template
                except aiohttp.WSServerHandshakeError as exc:
                    refused[template] = exc.status
                    assert exc.status == 401, (template, exc.status)
        # The root's WebSocket protocol too (its page stays open).
        ws = await http.ws_connect(f"ws://{base}/")
        assert (await ws.receive(timeout=5)).data == 1008
        # With the key, a route answers.
        async with http.get(f"http://{base}/v1/calls?token={KEY}") as r:
            assert r.status == 200
    assert refused["/v1/listen"] == 401 and refused["/api/asr-streaming"] == 401
    assert refused["/audiohook"] == 401  # Genesys reads the handshake's status
    # The web port serves the page and nothing of a call.
    web_routes = {
        (r.method, (r.resource.canonical if r.resource else ""))
        for r in build_web_app(service.bridge).router.routes()
    }
    assert {p for _, p in web_routes} <= {"/", "/config.json", "/static"}, web_routes


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """One HTTP/1.1 GET with the request target exactly as given (no client normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


TRAVERSALS = (
    "/static/../app.py",
    "/static/%2e%2e/app.py",
    "/static/%2E%2E/app.py",
    "/static/..%2fapp.py",
    "/static/%2e%2e%2fapp.py",
    "/static/....//app.py",
    "/static/..\\app.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/../../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/%00/../app.py",
    "/../api/app.py",
    "/%2e%2e/api/app.py",
)
# Dot segments must not walk from an open prefix onto a guarded route either.
BYPASSES = (
    "/static/../v1/calls",
    "/static/%2e%2e/v1/calls",
    "/twilio/../v1/calls",
    "/twilio/%2e%2e/v1/calls",
    "/config.json/../v1/calls",
)


async def test_static_files_cannot_be_walked_out_of_and_open_prefixes_open_nothing_else(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(sink_config(api=ApiConfig(keys=(KEY,))))
    secret_text = (WEB_DIR.parent / "app.py").read_text()[:60].encode()
    for port in (service.ports["web"], service.ports["audio"]):
        status, body = await asyncio.to_thread(raw_get, port, "/static/app.js")
        assert status == 200 and body  # the real static files are served
        for target in TRAVERSALS:
            status, body = await asyncio.to_thread(raw_get, port, target)
            assert status in (400, 401, 403, 404), (port, target, status)  # 401: not /static/
            assert secret_text not in body and b"root:x:" not in body, (port, target)
    for target in BYPASSES:
        status, body = await asyncio.to_thread(raw_get, service.ports["audio"], target)
        assert status in (400, 401, 403, 404), (target, status)
        assert b'"calls"' not in body, target


SECRETS = {
    "api_key": "key-sec-1a2b3c",
    "webhook_secret": "whsec-sec-9f8e",
    "twilio_token": "twtok-sec-7d6c",
    "sip_password": "sippass-sec-5b4a",
    "sip_register_password": "regpass-sec-3c2d",
    "db_password": "dbpass-sec-1e0f",
}


async def test_no_secret_in_info_errors_or_the_log(tmp_path: Path) -> None:
    """Every secret set at once, the service exercised (refusals, a failing database URL); none
    of them in `/info`, `/ready`, `/metrics`, an error answer or any log line."""
    log_file = tmp_path / "server.log"
    env = {
        "STT_BRIDGE_LOG_LEVEL": "debug",
        "STT_BRIDGE_API_KEYS": SECRETS["api_key"],
        "STT_BRIDGE_WEBHOOK_URL": "http://127.0.0.1:9/hook",
        "STT_BRIDGE_WEBHOOK_SECRET": SECRETS["webhook_secret"],
        "STT_BRIDGE_TWILIO_AUTH_TOKEN": SECRETS["twilio_token"],
        "STT_BRIDGE_SIP_ENABLED": "true",
        "STT_BRIDGE_SIP_HOST": "127.0.0.1",
        "STT_BRIDGE_SIP_PORT": "0",
        "STT_BRIDGE_SIP_AUTH_USER": "pbx",
        "STT_BRIDGE_SIP_AUTH_PASSWORD": SECRETS["sip_password"],
        "STT_BRIDGE_SIP_REGISTER_URI": "sip:127.0.0.1:9",
        "STT_BRIDGE_SIP_REGISTER_USER": "bridge",
        "STT_BRIDGE_SIP_REGISTER_PASSWORD": SECRETS["sip_register_password"],
        "STT_BRIDGE_ENGINE_NAME": "sink",
    }
    server = ServerProcess(tmp_path / "data", **env)
    server.log_to = log_file
    server.start()
    answers: list[str] = []
    try:
        health = f"http://127.0.0.1:{server.ports['health']}"
        async with aiohttp.ClientSession() as http:
            for path in ("/info", "/ready", "/metrics", "/health"):
                async with http.get(health + path) as r:
                    answers.append(await r.text())
            for url, headers in (
                (server.url("/v1/calls", "http"), {"Authorization": "Bearer wrong"}),
                (
                    server.url("/v1/calls/nope", "http"),
                    {"Authorization": f"Bearer {SECRETS['api_key']}"},
                ),
                (server.url("/twilio/voice", "http"), {}),
            ):
                async with http.post(url, headers=headers, data=b"CallSid=1") as r:
                    answers.append(await r.text())
        await asyncio.sleep(1.0)  # the registration attempt and a webhook-less start logged
        assert await asyncio.to_thread(server.terminate) == 0
    finally:
        server.cleanup()
    # A database URL with a password that cannot be reached: the start fails, saying why.
    url = f"postgresql://bridge:{SECRETS['db_password']}@127.0.0.1:9/calls"
    failed = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "serve"],
        env={**server.env, "STT_BRIDGE_DATA_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode != 0
    text = log_file.read_text() + failed.stdout + failed.stderr + "".join(answers)
    assert "port 9 failed" in failed.stderr, failed.stderr  # it says why, not with what
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} leaked"
    info = json.loads(answers[0])
    assert info["sip"]["enabled"] is True


# -- SIP digest: nonces expire, answers cannot be replayed ----------------------------------------


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def invite(port: int, call_id: str, cseq: int, authorization: str = "") -> str:
    sdp = (
        b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        b"m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
        head = (
            "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK-{call_id}-{cseq}\r\n"
            f"From: <sip:t@127.0.0.1>;tag={call_id}\r\nTo: <sip:bridge@127.0.0.1>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} INVITE\r\n"
            f"Contact: <sip:t@127.0.0.1:{local}>\r\n{auth}"
            f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n"
        )
        s.sendto(head.encode() + sdp, ("127.0.0.1", port))
        while True:
            reply = s.recv(4096).decode(errors="replace")
            if not reply.startswith("SIP/2.0 1"):
                return reply


def answer(challenge: str, nc: str, password: str = "s3cret") -> str:
    nonce = re.search(r'nonce="([^"]+)"', challenge)
    assert nonce is not None, challenge
    uri = "sip:bridge@127.0.0.1"
    ha1, ha2 = md5(f"pbx:stt-bridge:{password}"), md5(f"INVITE:{uri}")
    response = md5(f"{ha1}:{nonce[1]}:{nc}:c0ffee:auth:{ha2}")
    return (
        f'Digest username="pbx", realm="stt-bridge", nonce="{nonce[1]}", uri="{uri}", '
        f'response="{response}", qop=auth, nc={nc}, cnonce="c0ffee", algorithm=MD5'
    )


async def test_a_replayed_sip_digest_answer_is_challenged_again(
    start_service: ServiceFactory,
) -> None:
    from tests.e2e.sip_peers import sip_config

    config = sip_config({"name": "sink"}, auth_user="pbx", auth_password="s3cret")
    service = await start_service(config)
    port = service.ports["sip"]
    challenged = await asyncio.to_thread(invite, port, "first", 1)
    assert challenged.startswith("SIP/2.0 401"), challenged
    credentials = answer(challenged, "00000001")
    taken = await asyncio.to_thread(invite, port, "first", 2, credentials)
    assert taken.startswith("SIP/2.0 200"), taken
    # Someone who saw that INVITE sends its credentials again, as a call of their own.
    replayed = await asyncio.to_thread(invite, port, "replayed", 1, credentials)
    assert replayed.startswith("SIP/2.0 401"), replayed
    # The same nonce counted on (nc=2), as a real client reusing it does: accepted.
    again = await asyncio.to_thread(invite, port, "second", 1, answer(challenged, "00000002"))
    assert again.startswith("SIP/2.0 200"), again


def test_digest_nonces_expire_and_each_count_answers_once() -> None:
    from telephony.sip import digest

    nonces = digest.NonceBook(ttl_s=60)
    nonce = nonces.issue(now=1000.0)
    assert nonces.valid(nonce, now=1059.0) and not nonces.valid(nonce, now=1061.0)
    assert nonces.first_use(nonce, "00000001", now=1001.0)
    assert not nonces.first_use(nonce, "00000001", now=1002.0)  # the replay
    assert nonces.first_use(nonce, "00000002", now=1003.0)
    assert nonces.first_use(nonce, "", now=1004.0) and not nonces.first_use(nonce, "", now=1005.0)


# -- TLS ------------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def handshake(port: int, cafile: Path, version: ssl.TLSVersion) -> str:
    """The protocol a client limited to `version` gets, or the error that refused it."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client would offer old protocols
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return str(tls.version())
    except (ssl.SSLError, ConnectionError) as exc:
        return f"refused: {exc}"


async def test_tls_below_1_2_is_refused_on_both_ports(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    service = await start_service(sink_config(tls=TlsConfig(cert=str(cert), key=str(key))))
    for name in ("audio", "health"):
        port = service.ports[name]
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            got = await asyncio.to_thread(handshake, port, cert, old)
            assert got.startswith("refused"), (name, old, got)
        assert await asyncio.to_thread(handshake, port, cert, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert await asyncio.to_thread(handshake, port, cert, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


# -- Twilio's signature -----------------------------------------------------------------------


async def test_twilio_signature_is_checked_on_every_request_when_a_token_is_set(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(
        sink_config(twilio=TwilioConfig(auth_token=TWILIO_TOKEN, public_url="http://bridge.test"))
    )
    base = f"127.0.0.1:{service.ports['audio']}"
    form = {"CallSid": "CA1", "From": "+15550001"}
    validator = RequestValidator(TWILIO_TOKEN)
    good = validator.compute_signature("http://bridge.test/twilio/voice", form)
    media_url = "wss://bridge.test/twilio/media"
    media_good = validator.compute_signature(media_url, {})
    async with aiohttp.ClientSession() as http:
        for signature in (None, "", "bm90IGl0", good[:-2] + "AA"):
            headers = {} if signature is None else {"X-Twilio-Signature": signature}
            async with http.post(f"http://{base}/twilio/voice", data=form, headers=headers) as r:
                assert r.status == 403, signature
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"ws://{base}/twilio/media", headers=headers)
            assert refused.value.status == 403
        signed = {"X-Twilio-Signature": good}
        async with http.post(f"http://{base}/twilio/voice", data=form, headers=signed) as r:
            assert r.status == 200 and "<Stream" in await r.text()
        # The signature covers the form: the same header over another body is refused.
        changed = {**form, "From": "+15559999"}
        async with http.post(f"http://{base}/twilio/voice", data=changed, headers=signed) as r:
            assert r.status == 403
        ws = await http.ws_connect(
            f"ws://{base}/twilio/media", headers={"X-Twilio-Signature": media_good}
        )
        await ws.close()
