"""Fan-out under a subscriber that stops reading: the call, the store and the other
subscribers go on; what the stalled one missed is counted in /metrics."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import uuid

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from telephony.audiosocket import AudioSocketCodec
from tests.conftest import ServiceFactory
from tests.e2e.frontends import watch_events
from tests.speech import SENTENCES, phone_bytes

DIGITS = 3000  # > the per-call subscriber queue (1000) plus what socket buffers hold


async def stalled_subscriber(port: int, path: str) -> socket.socket:
    """A WebSocket client with a tiny receive buffer that never reads after the upgrade."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)  # byte by byte: read nothing past the headers
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def metric(text: str, name: str) -> float:
    values = [
        float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and not sample.labels
    ]
    assert len(values) == 1, name
    return values[0]


async def test_a_stalled_subscriber_loses_only_its_own_events(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    call_id = uuid.uuid4()
    audio_port, health_port = service.ports["audio"], service.ports["health"]
    slin = phone_bytes(SENTENCES[5], "pcm16", 8000)
    async with watch_events(service) as events:
        stalled = await stalled_subscriber(audio_port, f"/v1/calls/{call_id}/events")
        reader, writer = await asyncio.open_connection("127.0.0.1", service.ports["audiosocket"])
        writer.write(AudioSocketCodec.encode_uuid(call_id))
        frame = 320  # 20 ms of 8 kHz slin
        for n, i in enumerate(range(0, len(slin), frame)):
            writer.write(AudioSocketCodec.encode_audio(slin[i : i + frame]))
            if n == 20:  # a burst of key presses mid-call: thousands of events at once
                writer.write(b"".join(AudioSocketCodec.encode_dtmf("5") for _ in range(DIGITS)))
            if n % 50 == 0:
                await writer.drain()
                await asyncio.sleep(0)
        writer.write(AudioSocketCodec.encode_hangup())
        await writer.drain()
        # The bridge flushes and closes. Were the stalled reader holding the call up, it would
        # hold it for ever (its socket is never read): this read would time out.
        await asyncio.wait_for(reader.read(), 60)
        writer.close()
        await events.wait_ended(1)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{health_port}/metrics") as r,
        ):
            text = await r.text()
        stalled.close()

    mine = events.of(str(call_id))
    assert sum(1 for e in mine if e["type"] == "dtmf") == DIGITS  # a reading subscriber: all
    assert any(e["type"] == "word" for e in mine)  # and the speech was transcribed meanwhile
    dropped = metric(text, "stt_bridge_live_events_dropped_total")
    assert 0 < dropped <= DIGITS + len(mine)
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
    stored = service.bridge.store.get_events(str(call_id), ("dtmf",))
    assert len(stored) == DIGITS  # the store is not a subscriber that drops
    assert metric(text, "stt_bridge_store_events_dropped_total") == 0
