"""No road in without a credential (issue 25), against the real service on loopback: every
route of the audio port walked with a key of each scope (ingest, read, admin, and a key with no
scope); Twilio's routes with API keys on and no Twilio token; AudioSocket's source allowlist."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from api.config import ApiConfig, AudioSocketConfig, TwilioConfig
from api.store import Store
from telephony.audiosocket import AudioSocketCodec, SourceAllowList
from tests.conftest import ServiceFactory
from tests.e2e.server_process import ServerProcess
from tests.e2e.test_security import OPEN_ROUTES, concrete, routes, sink_config

INGEST, READ, ADMIN, PLAIN = "k-ingest-51c2", "k-read-8e07", "k-admin-3a9d", "k-plain-77f0"
KEYS = (f"{INGEST}:ingest", f"{READ}:read", f"{ADMIN}:admin", PLAIN)
CARRIERS = (  # each carrier's media stream (telephony/carriers), when its own token is unset
    "/telnyx/media",
    "/plivo/media",
    "/vonage/media",
    "/exotel/media",
    "/signalwire/media",
    "/jambonz/listen",
)
# What each scope is for, as the issue says it; a route in none of these needs admin.
AUDIO = {
    "/",
    "/v1/stream",
    "/v1/listen",
    "/{prefix}/v1/listen",
    "/v1/audio/transcriptions",
    "/twilio/voice",
    "/twilio/media",
    "/freeswitch",
    "/freeswitch/{call_id}",
    "/asterisk/media",
    "/asterisk/aeap",
    "/api/asr-streaming",
    *CARRIERS,
    "/audiohook",
}
READ_ROUTES = {
    "/v1/calls",
    "/v1/calls/{call_id}",
    "/v1/calls/{call_id}/transcript",
    "/v1/calls/{call_id}/events",
    "/v1/events",
    "/v1/webhooks",
    "/v1/webhooks/{id}",
}
# Refused with an HTTP status before the upgrade, as those servers (and Twilio) expect.
HTTP_REFUSED = ("/api/asr-streaming", "/twilio/", "/audiohook", *CARRIERS)  # and */v1/listen
TWILIO = {"/twilio/voice", "/twilio/media"}


def may(key: str, method: str, template: str) -> bool:
    if key in (ADMIN, PLAIN):
        return True
    if template in AUDIO:
        return key == INGEST
    if template in READ_ROUTES and method == "GET":
        return key == READ
    return False


async def test_every_route_with_every_scope(start_service: ServiceFactory) -> None:
    service = await start_service(sink_config(api=ApiConfig(keys=KEYS)))
    base = f"127.0.0.1:{service.ports['audio']}"
    # Twilio's routes need a key here too: no Twilio token is set (the last tests).
    walked = [(m, p) for m, p in routes(service) if p not in OPEN_ROUTES - TWILIO - {"/"}]
    assert {p for _, p in walked} >= AUDIO - {"/v1/audio/transcriptions"} | READ_ROUTES
    seen: dict[str, set[str]] = {key: set() for key in (INGEST, READ, ADMIN, PLAIN)}
    async with aiohttp.ClientSession() as http:
        for method, template in walked:
            url = f"http://{base}{concrete(template)}"
            for key in seen:
                allowed = may(key, method, template)
                auth = {"Authorization": f"Bearer {key}"}
                if template != "/":  # the page itself is open; its WebSocket is walked below
                    body = b"x" if method == "POST" else None
                    async with http.request(method, url, data=body, headers=auth) as r:
                        if allowed:
                            assert r.status not in (401, 403), (key, method, template, r.status)
                        else:
                            assert r.status == 403, (key, method, template, r.status)
                            answer = await r.json()
                            assert refused_in_its_shape(template, answer), (template, answer)
                if method == "GET" and not allowed:  # refused before any audio is taken
                    await refused_stream(http, url.replace("http", "ws", 1), auth, template)
                if allowed:
                    seen[key].add(f"{method} {template}")
    # Each scope got what it is for, and only that.
    assert "DELETE /v1/calls/{call_id}" in seen[ADMIN] and "GET /v1/calls" in seen[READ]
    assert "GET /v1/stream" in seen[INGEST] and "GET /v1/stream" not in seen[READ]
    assert seen[ADMIN] == seen[PLAIN]  # a key written without a scope can do everything


def refused_in_its_shape(template: str, answer: dict[str, Any]) -> bool:
    """A 403 in the error shape of the API the route speaks (its SDK reads that)."""
    if template == "/v1/audio/transcriptions":
        error = answer["error"]
        return error["code"] == "insufficient_permissions" and "may not" in error["message"]
    if template.endswith("/v1/listen"):
        return answer["err_code"] == "INSUFFICIENT_PERMISSIONS" and "may not" in answer["err_msg"]
    return bool(answer["error"] == "forbidden")


async def refused_stream(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], template: str
) -> None:
    try:
        ws = await http.ws_connect(url, headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        path = concrete(template)
        before_upgrade = path.startswith(HTTP_REFUSED) or path.endswith("/v1/listen")
        assert exc.status == 403 and before_upgrade, (template, exc)
        return
    message = await ws.receive(timeout=5)
    await ws.close()
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008, (template, message)
    assert str(message.extra).startswith("forbidden"), (template, message.extra)


async def test_search_needs_a_read_key(start_service: ServiceFactory) -> None:
    service = await start_service(sink_config(api=ApiConfig(keys=KEYS)))
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls?q=windscreen"
    async with aiohttp.ClientSession() as http:
        for key, status in ((INGEST, 403), (READ, 200), (PLAIN, 200), ("wrong", 401)):
            async with http.get(url, headers={"Authorization": f"Token {key}"}) as r:
                assert r.status == status, key


# -- Twilio with API keys on and no Twilio token ----------------------------------------------

MEDIA = [
    {"event": "connected", "protocol": "Call", "version": "1.0.0"},
    {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "streamSid": "MZ1",
            "accountSid": "AC1",
            "callSid": "CA-no-key",
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": "MZ1",
    },
    {
        "event": "media",
        "sequenceNumber": "2",
        "media": {
            "track": "inbound",
            "chunk": "1",
            "timestamp": "0",
            "payload": base64.b64encode(b"\xff" * 160).decode(),
        },
        "streamSid": "MZ1",
    },
    {"event": "stop", "sequenceNumber": "3", "streamSid": "MZ1", "stop": {"callSid": "CA-no-key"}},
]


async def stream_twilio(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    async with http.ws_connect(url, headers=headers) as ws:
        for message in MEDIA:
            await ws.send_str(json.dumps(message))
        async for _ in ws:
            pass


async def test_twilio_without_a_token_needs_a_key(start_service: ServiceFactory) -> None:
    service = await start_service(sink_config(api=ApiConfig(keys=KEYS)))
    base = f"127.0.0.1:{service.ports['audio']}"
    form = {"CallSid": "CA-no-key", "From": "+15550001"}
    async with aiohttp.ClientSession() as http:
        # The road the issue found open: no key at all, a Twilio stream straight in.
        async with http.post(f"http://{base}/twilio/voice", data=form) as r:
            assert r.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await stream_twilio(http, f"ws://{base}/twilio/media", {})
        assert refused.value.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await stream_twilio(
                http, f"ws://{base}/twilio/media", {"Authorization": f"Bearer {READ}"}
            )
        assert refused.value.status == 403
        await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
        assert service.bridge.store.get_call("CA-no-key") is None
        # An ingest key (a proxy in front that adds it, a test rig) may.
        ingest = {"Authorization": f"Bearer {INGEST}"}
        async with http.post(f"http://{base}/twilio/voice", data=form, headers=ingest) as r:
            assert r.status == 200 and "<Stream" in await r.text()
        await stream_twilio(http, f"ws://{base}/twilio/media", ingest)
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
    assert service.bridge.store.get_call("CA-no-key") is not None


async def test_twilio_with_a_token_is_checked_by_its_signature_not_a_key(
    start_service: ServiceFactory,
) -> None:
    twilio = TwilioConfig(auth_token="tok-5e1f", public_url="http://bridge.test")
    service = await start_service(sink_config(api=ApiConfig(keys=KEYS), twilio=twilio))
    url = f"http://127.0.0.1:{service.ports['audio']}/twilio/voice"
    async with aiohttp.ClientSession() as http, http.post(url, data={"CallSid": "CA2"}) as r:
        assert r.status == 403 and "X-Twilio-Signature" in await r.text()  # Twilio's check


def test_the_start_up_line_says_why_twilio_is_refused(tmp_path: Path) -> None:
    env = {"STT_BRIDGE_ENGINE_NAME": "sink", "STT_BRIDGE_API_KEYS": f"{ADMIN}:admin,{INGEST}"}
    banners: list[str] = []
    for extra in (
        {},
        {"STT_BRIDGE_SERVER_WORKERS": "2"},  # the supervisor's line says it too
        {"STT_BRIDGE_TWILIO_AUTH_TOKEN": "tok-1"},
    ):
        server = ServerProcess(tmp_path / f"data{len(banners)}", **env, **extra)
        server.log_to = tmp_path / "server.log"
        try:
            server.start()
            banners.append(server.banner)
            assert server.terminate() == 0
        finally:
            server.cleanup()
    for banner in banners[:2]:
        assert "Twilio refused" in banner and "twilio.auth_token" in banner, banner
    assert "worker" in banners[1], banners[1]  # the supervisor printed it
    assert "Twilio refused" not in banners[2], banners[2]
    assert ADMIN not in "".join(banners) and INGEST not in "".join(banners)


# -- AudioSocket's allowlist ---------------------------------------------------------------------


async def test_audiosocket_outside_its_allowlist_is_hung_up_on(
    start_service: ServiceFactory,
) -> None:
    closed = AudioSocketConfig(host="127.0.0.1", port=0, allow=("10.0.0.0/8", "2001:db8::/32"))
    service = await start_service(sink_config(audiosocket=closed))
    call_id = uuid.uuid4()
    reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["audiosocket"])
    # Refused as it connects, before its UUID: a hangup message, then the socket closes.
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer == AudioSocketCodec.encode_hangup()
    store: Store = service.bridge.store
    await asyncio.get_running_loop().run_in_executor(None, store.flush)
    assert store.get_call(str(call_id)) is None and not service.bridge.hub.calls

    # Allowed: the same connection is a call.
    opened = dataclasses.replace(closed, allow=("10.0.0.0/8", "127.0.0.1/32"))
    service = await start_service(sink_config(audiosocket=opened))
    reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["audiosocket"])
    writer.write(AudioSocketCodec.encode_uuid(call_id))
    writer.write(AudioSocketCodec.encode_audio(bytes(320)))
    await writer.drain()
    for _ in range(100):
        if service.bridge.store.get_call(str(call_id)) is not None:
            break
        await asyncio.sleep(0.05)
    writer.close()
    assert service.bridge.store.get_call(str(call_id)) is not None


def test_allowlist_reads_ipv4_on_a_dual_stack_socket() -> None:
    allow = SourceAllowList(["10.0.0.0/8", "2001:db8::/32"])
    assert allow.allows("10.1.2.3") and allow.allows("::ffff:10.1.2.3")
    assert allow.allows("2001:db8::5") and allow.allows("2001:db8::5%eth0")
    assert not allow.allows("127.0.0.1") and not allow.allows("::1")
    assert not allow.allows("::ffff:192.0.2.1") and not allow.allows("not an address")


def test_scoped_keys_in_the_config() -> None:
    from api.config import ConfigError, load_config

    config = load_config(environ={"STT_BRIDGE_API_KEYS": "k1:read,k2,a:b:c,k3:ingest"})
    assert config.api.keys == ("k1:read", "k2", "a:b:c", "k3:ingest")
    from api.scopes import key_scopes

    assert key_scopes(config.api.keys) == {
        "k1": frozenset({"read"}),
        "k2": frozenset({"admin"}),
        "a:b:c": frozenset({"admin"}),  # a key with colons in it stays whole
        "k3": frozenset({"ingest"}),
    }
    assert key_scopes(["k:ingest", "k:read"]) == {"k": frozenset({"ingest", "read"})}
    with pytest.raises(ConfigError) as bad:
        load_config(environ={"STT_BRIDGE_API_KEYS": "k1:read,secret-k2:raed"})
    assert "entry 2" in str(bad.value) and "read" in str(bad.value)
    assert "secret-k2" not in str(bad.value)  # a config error never shows a key
    with pytest.raises(ConfigError, match=r"audiosocket\.allow"):
        load_config(environ={"STT_BRIDGE_AUDIOSOCKET_ALLOW": "10.0.0.0/8,nowhere"})
