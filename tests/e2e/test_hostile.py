"""Issue 17's findings, each kept as a regression test: hostile input and hostile networks
against the real service on loopback (real sockets, the sink engine)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from api.app import Service
from api.config import ApiConfig, LimitsConfig, TwilioConfig
from api.store import Store
from telephony.audiosocket import AudioSocketCodec
from telephony.bus import CallStarted
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import watch_events

DEEP = "[" * 100_000
FORK = ("audio.drachtio.org",)  # mod_audio_fork; without it /freeswitch is mod_audio_stream


def sink_config(**limits: Any) -> Any:
    base = make_config(name="sink")
    return dataclasses.replace(base, limits=dataclasses.replace(LimitsConfig(), **limits))


def url(service: Service, path: str, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{service.ports['audio']}{path}"


def raw_http(port: int, request: bytes, wait_s: float = 5.0) -> bytes:
    """Send bytes to a port; everything it answers until it closes (or wait_s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(request)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


async def stored_call(service: Service, call_id: str) -> Any:
    store = service.bridge.store
    await asyncio.to_thread(store.flush)
    return await asyncio.to_thread(store.get_call, call_id)


# 1. a lone surrogate in a label ---------------------------------------------------------------


def test_store_writer_survives_an_event_it_cannot_write(tmp_path: Path) -> None:
    """Even an event that reaches the store unsanitised costs only itself."""
    store = Store(tmp_path / "s.sqlite3")
    try:
        store.record(CallStarted("bad", "test", ("caller",), {"x": "\ud800"}, time.time()))
        store.record(CallStarted("good", "test", ("caller",), {"x": "ok"}, time.time()))
        assert store.flush(10)
        assert store.get_call("good") is not None
        store.record(CallStarted("later", "test", ("caller",), {}, time.time()))
        assert store.flush(10)  # the writer thread is alive
        assert store.get_call("later") is not None
    finally:
        store.close()


async def test_surrogate_call_id_on_freeswitch_is_stored(start_service: ServiceFactory) -> None:
    service = await start_service(sink_config())
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(service, "/freeswitch"), protocols=FORK) as ws:
            await ws.send_str('{"callId": "\\ud800", "who": "\\udfff\\u0000"}')
            await ws.send_bytes(b"\x00\x00" * 160)
            await ws.send_bytes(b"")
            await ws.receive(timeout=10)
    for _ in range(100):
        if not service.bridge.hub.calls:
            break
        await asyncio.sleep(0.05)
    await asyncio.to_thread(service.bridge.store.flush)
    calls, _ = await asyncio.to_thread(service.bridge.store.list_calls)
    assert [c.front_end for c in calls] == ["freeswitch"]
    assert calls[0].status == "ended" and "\ud800" not in calls[0].id
    # ... and the store still takes the next call
    async with aiohttp.ClientSession() as http, http.ws_connect(url(service, "/v1/stream")) as ws:
        await ws.send_str('{"type": "stop"}')
        await ws.receive(timeout=10)
    await asyncio.sleep(0.2)
    await asyncio.to_thread(service.bridge.store.flush)
    assert (await asyncio.to_thread(service.bridge.store.list_calls))[1] == 2


# 3. malformed SDP gets an answer -----------------------------------------------------------------


def sip_invite(port: int, sdp: str) -> str:
    body = sdp.encode()
    text = (
        "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK-sdp1\r\n"
        "From: <sip:t@127.0.0.1>;tag=a1\r\nTo: <sip:bridge@127.0.0.1>\r\n"
        "Call-ID: sdp-1@127.0.0.1\r\nCSeq: 1 INVITE\r\nContact: <sip:t@127.0.0.1:{local}>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
        s.sendto(text.format(local=local).encode() + body, ("127.0.0.1", port))
        while True:
            try:
                reply = s.recv(4096).decode(errors="replace")
            except TimeoutError:
                return ""
            if not reply.startswith("SIP/2.0 1"):
                return reply


SDP = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


@pytest.mark.parametrize(
    "bad",
    [
        SDP.replace("4000", "x"),
        SDP.replace("rtpmap:0 PCMU/8000", "rtpmap:x PCMU"),
        SDP.replace("PCMU/8000", "PCMU/x"),
    ],
)
async def test_malformed_sdp_gets_400_or_488(start_service: ServiceFactory, bad: str) -> None:
    from tests.e2e.sip_peers import sip_config

    service = await start_service(sip_config({"name": "sink"}))
    reply = await asyncio.to_thread(sip_invite, service.ports["sip"], bad)
    assert reply.startswith(("SIP/2.0 400", "SIP/2.0 488")), reply
    assert not service.bridge.hub.calls


# 2. a SIP-over-TCP caller that drops without BYE -----------------------------------------------


async def test_tcp_caller_dropping_without_bye_frees_its_call(
    start_service: ServiceFactory,
) -> None:
    from tests.e2e.sip_peers import sip_config

    service = await start_service(sip_config({"name": "sink"}, rtp_timeout_s=1.0))
    reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["sip"])
    local = writer.get_extra_info("sockname")[1]
    body = SDP.encode()
    writer.write(
        (
            "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP 127.0.0.1:{local};branch=z9hG4bK-tcp1\r\n"
            "From: <sip:t@127.0.0.1>;tag=a1\r\nTo: <sip:bridge@127.0.0.1>\r\n"
            f"Call-ID: tcp-drop@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:t@127.0.0.1:{local};transport=tcp>\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    seen = b""
    while b"SIP/2.0 200" not in seen:
        seen += await asyncio.wait_for(reader.read(4096), 10)
    # The ACK of a 2xx carries the To tag of our 200 (RFC 3261 §13.2.2.4): it confirms the dialog.
    ok = seen[seen.index(b"SIP/2.0 200") :].decode()
    to = next(line for line in ok.split("\r\n") if line.lower().startswith(("to:", "t:")))
    writer.write(
        (
            "ACK sip:bridge@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP 127.0.0.1:{local};branch=z9hG4bK-tcp2\r\n"
            f"From: <sip:t@127.0.0.1>;tag=a1\r\n{to}\r\n"
            "Call-ID: tcp-drop@127.0.0.1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    assert "tcp-drop@127.0.0.1" in service.bridge.hub.calls
    # Let the service read the ACK first: an RST can take unread bytes with it, and a caller
    # gone before its ACK is released at once ("caller gone", tests/e2e/test_sip_dialogs.py).
    await asyncio.sleep(0.3)
    writer.transport.abort()  # gone, without BYE; no RTP either
    for _ in range(100):
        if not service.bridge.hub.calls:
            break
        await asyncio.sleep(0.1)
    assert not service.bridge.hub.calls
    record = await stored_call(service, "tcp-drop@127.0.0.1")
    assert record.status == "ended" and record.reason == "rtp timeout"
    backend: Any = service.bridge.sip
    assert not backend.dialogs and not backend.rtp_ports.in_use


# 4, 5. Twilio: wrong types, Infinity, huge timestamps, DTMF on outbound only, deep JSON -------


def twilio_start(sid: str, tracks: list[str]) -> str:
    start = {"streamSid": "MZ1", "callSid": sid, "tracks": tracks, "customParameters": {}}
    return json.dumps({"event": "start", "start": start})


def media(track: str, timestamp: Any, payload: bytes = b"\xff" * 160) -> str:
    body = {"track": track, "timestamp": timestamp, "payload": base64.b64encode(payload).decode()}
    return json.dumps({"event": "media", "media": body})


async def test_twilio_survives_hostile_messages(start_service: ServiceFactory) -> None:
    service = await start_service(sink_config())
    hostile = [
        '{"event": "start", "start": "x"}',
        '{"event": "start", "start": {"callSid": "CA0", "mediaFormat": null, '
        '"customParameters": [1]}}',
        DEEP,
        "\x00\xff not json",
    ]
    async with watch_events(service) as log, aiohttp.ClientSession() as http:
        async with http.ws_connect(url(service, "/twilio/media")) as ws:
            for text in hostile:
                await ws.send_str(text)
            await ws.send_str(twilio_start("CA1", ["outbound"]))
            for text in [
                '{"event": "media", "media": "x"}',
                '{"event": "media", "media": {"track": "outbound", "timestamp": Infinity, '
                '"payload": "/w=="}}',
                media("outbound", 0),
                media("outbound", 1e15),  # a gap of 31 years must not be allocated
                media("outbound", 10**30),
                media("outbound", "1e400"),
                '{"event": "dtmf", "dtmf": {"digit": "5"}}',
                '{"event": "dtmf", "dtmf": {"digit": "\\ud800"}}',
                '{"event": "dtmf", "dtmf": "x"}',
                '{"event": "stop"}',
            ]:
                await ws.send_str(text)
            closed = await ws.receive(timeout=10)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        ended = await log.wait_ended(1, timeout=10)
        assert ended["CA1"]["reason"] == "stop"
        assert [e["digit"] for e in log.of("CA1") if e["type"] == "dtmf"] == ["5"]
        assert ended["CA1"]["audio_s"]["agent"] < 60  # no 10**15 ms of silence


async def test_deep_json_on_generic_websocket_gets_an_error_message(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(sink_config())
    async with aiohttp.ClientSession() as http, http.ws_connect(url(service, "/v1/stream")) as ws:
        await ws.send_str(DEEP)
        reply = await ws.receive_json(timeout=10)
        assert reply["type"] == "error"
        await ws.send_str('{"type": "stop"}')  # the stream went on
        while (msg := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
            pass
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_deep_json_metadata_on_freeswitch_is_a_label(start_service: ServiceFactory) -> None:
    service = await start_service(sink_config())
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(service, "/freeswitch/deep-1"), protocols=FORK) as ws:
            await ws.send_str(DEEP)
            await ws.send_bytes(b"")
            await ws.receive(timeout=10)
    await asyncio.sleep(0.2)
    record = await stored_call(service, "deep-1")
    assert record is not None and record.status == "ended"


# 6. Twilio webhook bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "secret"])
async def test_twilio_voice_unreadable_bodies_get_4xx(
    start_service: ServiceFactory, token: str
) -> None:
    config = dataclasses.replace(sink_config(), twilio=TwilioConfig(auth_token=token))
    service = await start_service(config)
    bodies = [
        ("application/x-www-form-urlencoded; charset=utf-8", b"CallSid=\xff\xfe"),
        ("multipart/form-data", b"--x\r\n\r\n"),
        ("application/x-www-form-urlencoded; charset=nonsense", b"a=b"),
    ]
    async with aiohttp.ClientSession() as http:
        for content_type, body in bodies:
            headers = {"Content-Type": content_type}
            async with http.post(
                url(service, "/twilio/voice", "http"), data=body, headers=headers
            ) as response:
                assert response.status == (403 if token else 400), content_type
            headers["X-Twilio-Signature"] = "forged"
            async with http.post(
                url(service, "/twilio/voice", "http"), data=body, headers=headers
            ) as response:
                assert 400 <= response.status < 500, content_type


# 7, 8. API keys and numbers ----------------------------------------------------------------------


async def test_non_utf8_api_key_is_401(start_service: ServiceFactory) -> None:
    config = dataclasses.replace(sink_config(), api=ApiConfig(keys=("k1",)))
    service = await start_service(config)
    port = service.ports["audio"]
    for header in (b"Authorization: Bearer \xff\xfe", b"kyutai-api-key: \xff", b"X: y"):
        reply = await asyncio.to_thread(
            raw_http, port, b"GET /v1/calls HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n", 3
        )
        assert reply.startswith(b"HTTP/1.1 401"), reply[:80]


@pytest.mark.parametrize(
    "query", ["limit=nan", "limit=inf", "limit=1e309", "offset=1e30", "since=nan", "offset=-inf"]
)
async def test_calls_list_refuses_numbers_it_cannot_use(
    start_service: ServiceFactory, query: str
) -> None:
    service = await start_service(sink_config())
    async with aiohttp.ClientSession() as http:
        async with http.get(url(service, f"/v1/calls?{query}", "http")) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "bad_parameters"


# 9. moshi: ragged Audio.pcm, aborted uploads ----------------------------------------------------


async def test_ragged_pcm_gets_error_then_1007(start_service: ServiceFactory) -> None:
    service = await start_service(sink_config())
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(service, "/api/asr-streaming")) as ws:
            ready = msgpack.unpackb(await ws.receive_bytes(timeout=10))
            assert ready["type"] == "Ready"
            await ws.send_bytes(msgpack.packb({"type": "Audio", "pcm": [[0.1, 0.2], [0.3]]}))
            error = msgpack.unpackb(await ws.receive_bytes(timeout=10))
            assert error["type"] == "Error"
            closed = await ws.receive(timeout=10)
            assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1007


async def test_aborted_upload_logs_no_traceback(
    start_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service(sink_config())
    caplog.set_level(logging.INFO)
    head = (
        b"POST /api/asr-streaming HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
        + b"RIFF" * 1000
    )
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", service.ports["audio"])) as s:
            s.sendall(head)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# 10. malformed HTTP requests: one short line per source per minute -------------------------------


async def test_malformed_http_is_one_short_line_per_minute(
    start_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service(sink_config())
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    secret = b"\x16\x03\x01SECRET-BYTES-" + bytes(range(256))
    for request in [b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n" + secret] * 5 + [
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00" + secret,
    ]:
        reply = await asyncio.to_thread(raw_http, service.ports["audio"], request, 3)
        assert reply.startswith((b"HTTP/1.0 4", b"HTTP/1.1 4")), reply[:60]
    lines = [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno > logging.DEBUG]
    assert len(lines) <= 1, [r.getMessage() for r in lines]
    assert all(r.exc_info is None and "SECRET" not in r.getMessage() for r in lines)
    assert all(r.levelno <= logging.WARNING for r in lines)


# 11. slowloris and idle clients; limits ---------------------------------------------------------


def held_open(port: int, send: bytes, wait_s: float) -> bool:
    """Connect, send `send`, then nothing: True if the server still holds it after wait_s."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(send)
        s.settimeout(wait_s)
        try:
            while s.recv(65536):
                pass
            return False  # closed by the server
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False


async def test_idle_and_trickling_clients_are_closed(start_service: ServiceFactory) -> None:
    service = await start_service(sink_config(handshake_timeout_s=0.5, idle_timeout_s=1.0))
    checks = {
        "audio, nothing": (service.ports["audio"], b""),
        "audio, half a request line": (service.ports["audio"], b"GET / HT"),
        "health, headers trickled": (service.ports["health"], b"GET /health HTTP/1.1\r\nX-a: "),
        "web, nothing": (service.ports["web"], b""),
        "audiosocket before its UUID": (service.ports["audiosocket"], b""),
        "audiosocket, half a header": (service.ports["audiosocket"], b"\x01"),
    }
    started = time.monotonic()
    held = await asyncio.gather(
        *(asyncio.to_thread(held_open, port, data, 8.0) for port, data in checks.values())
    )
    assert not any(held), dict(zip(checks, held, strict=True))
    assert time.monotonic() - started < 8
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(service, "/v1/stream")) as ws:
            # half a frame: a header announcing 1000 bytes, then silence
            ws._writer.transport.write(b"\x82\xfe\x03\xe8\x00\x00\x00\x00")
            msg = await ws.receive(timeout=8)
            while msg.type == aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=8)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_connections_per_ip_and_event_subscribers_are_capped(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(sink_config(connections_per_ip=5, event_subscribers=3))
    socks = [socket.create_connection(("127.0.0.1", service.ports["health"])) for _ in range(5)]
    try:
        reply = await asyncio.to_thread(
            raw_http, service.ports["health"], b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 3
        )
        assert reply.startswith(b"HTTP/1.1 503"), reply[:60]
    finally:
        for s in socks:
            s.close()
    await asyncio.sleep(0.2)
    reply = await asyncio.to_thread(
        raw_http,
        service.ports["health"],
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        3,
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply[:60]
    async with aiohttp.ClientSession() as http:
        held = [await http.ws_connect(url(service, "/v1/events")) for _ in range(3)]
        extra = await http.ws_connect(url(service, "/v1/events"))
        msg = await extra.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1013
        for ws in held:
            await ws.close()


async def test_audiosocket_over_its_connection_limit_is_hung_up(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(sink_config(connections_per_ip=2))
    port = service.ports["audiosocket"]
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == AudioSocketCodec.encode_hangup()
    writer.close()
    for _, w in held:
        w.write(AudioSocketCodec.encode_uuid(uuid.uuid4()))
        w.close()


async def test_sip_flood_gets_503_and_silent_tcp_is_closed(start_service: ServiceFactory) -> None:
    from tests.e2e.sip_peers import sip_config

    config = sip_config({"name": "sink"})
    config = dataclasses.replace(
        config,
        limits=dataclasses.replace(LimitsConfig(), sip_requests_per_s=5, handshake_timeout_s=0.5),
    )
    service = await start_service(config)
    port = service.ports["sip"]
    options = (
        "OPTIONS sip:bridge@127.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK-o{n}\r\n"
        "From: <sip:t@127.0.0.1>;tag=a{n}\r\nTo: <sip:bridge@127.0.0.1>\r\n"
        "Call-ID: opt-{n}@127.0.0.1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )

    def flood() -> list[str]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.bind(("127.0.0.1", 0))
            local = s.getsockname()[1]
            for n in range(20):
                s.sendto(options.format(local=local, n=n).encode(), ("127.0.0.1", port))
            replies = []
            try:
                while True:
                    replies.append(s.recv(4096).decode(errors="replace").split("\r\n")[0])
            except TimeoutError:
                return replies

    replies = await asyncio.to_thread(flood)
    assert replies.count("SIP/2.0 200 OK") == 5, replies
    assert len([r for r in replies if r.startswith("SIP/2.0 503")]) == 15, replies
    assert not await asyncio.to_thread(held_open, port, b"", 5.0)  # SIP over TCP, silent


# Second campaign (seed 17, 700 rounds): a lone surrogate quoted back -----------------------------


SETUP_SURROGATE = '{"request":"setup","codecs":[{"name":"\\ud800"}],"id":"s"}'


@pytest.mark.parametrize(
    ("path", "protocol", "text"),
    [
        ("/asterisk/aeap", "speech_to_text", '{"request":"set\\ud800","id":"x"}'),
        ("/asterisk/aeap", "speech_to_text", SETUP_SURROGATE),
        ("/asterisk/media", "media", '{"event":"MEDIA_START\\ud800"}'),
    ],
)
async def test_a_lone_surrogate_quoted_in_a_refusal_is_escaped(
    start_service: ServiceFactory,
    caplog: pytest.LogCaptureFixture,
    path: str,
    protocol: str,
    text: str,
) -> None:
    """The refusal quotes the bad input in its close reason (and AEAP's error_msg): a lone
    surrogate used to make encoding it raise, leaving a traceback and no answer."""
    service = await start_service(sink_config())
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(service, path), protocols=(protocol,)) as ws:
            await ws.send_str(text)
            while (msg := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                assert "error_msg" in msg.data or "HANGUP" in msg.data  # AEAP; chan_websocket
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1007, msg
    assert "\\ud800" in str(msg.extra)
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


async def test_audiosocket_call_gone_silent_is_hung_up_and_ended(
    start_service: ServiceFactory,
) -> None:
    """A live AudioSocket call whose peer stops sending gets the protocol's hangup once
    `idle_timeout_s` passes with nothing received, and its call ends."""
    service = await start_service(sink_config(handshake_timeout_s=0.5, idle_timeout_s=1.0))
    call_id = uuid.uuid4()
    async with watch_events(service) as events:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["audiosocket"])
        writer.write(AudioSocketCodec.encode_uuid(call_id))
        for _ in range(10):  # 200 ms of audio, then nothing
            writer.write(AudioSocketCodec.encode_audio(b"\x00\x00" * 160))
        await writer.drain()
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 8)  # until the server closes
        waited = time.monotonic() - started
        writer.close()
        ended = await events.wait_ended(1, timeout=8)
    assert answer == AudioSocketCodec.encode_hangup()
    assert 0.9 < waited < 4  # the idle limit, not the 0.5 s handshake limit, once identified
    assert "nothing received for 1 s" in ended[str(call_id)]["reason"]
