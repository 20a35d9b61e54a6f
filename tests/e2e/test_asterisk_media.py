"""Asterisk chan_websocket end to end: a peer that does what `Dial(WebSocket/stt/...)` does.

The peer is written from channels/chan_websocket.c and res/res_http_websocket.c: the exact
upgrade request, MEDIA_START first (plain text or JSON), 20 ms binary frames of the announced
format, DTMF_END per digit, and a Close 1000 when the caller hangs up.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np

from telephony.audio import alaw_decode, ulaw_decode
from tests.conftest import ServiceFactory
from tests.e2e.frontends import offline_words, paced, watch_events
from tests.e2e.ws_peer import CLOSE, HandshakeRefused, RawWebSocket, asterisk_request
from tests.speech import SENTENCES, phone_bytes

PATH = "/asterisk/media"


async def dial(port: int, query: str = "", protocol: str | None = "media") -> RawWebSocket:
    key = RawWebSocket.new_key()
    request = asterisk_request(PATH + query, f"127.0.0.1:{port}", key, protocol)
    return await RawWebSocket.connect(port, request, key)


def media_start(channel_id: str, fmt: str, frame: int, as_json: bool, **variables: str) -> str:
    """MEDIA_START exactly as `_create_event_MEDIA_START` prints it."""
    channel = f"WebSocket/stt/0x7f1cc000a6d{channel_id[-1]}"
    if not as_json:
        return (
            f"MEDIA_START connection_id:stt channel:{channel} channel_id:{channel_id} "
            f"format:{fmt} optimal_frame_size:{frame} ptime:20"
        )
    message = {
        "event": "MEDIA_START",
        "connection_id": "stt",
        "channel": channel,
        "channel_id": channel_id,
        "format": fmt,
        "optimal_frame_size": frame,
        "ptime": 20,
        "channel_variables": {
            "MEDIA_WEBSOCKET_CONNECTION_ID": "stt",
            "MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE": str(frame),
            **variables,
        },
    }
    return json.dumps(message, separators=(",", ":"))


async def asterisk_channel(
    port: int,
    channel_id: str,
    fmt: str,
    audio: bytes,
    frame: int,
    as_json: bool = False,
    dtmf: str = "",
    query: str = "",
    **variables: str,
) -> list[str]:
    """One channel's life: connect, MEDIA_START, paced media (DTMF after 10 frames), hang up.
    Returns the text messages the server sent (its commands)."""
    ws = await dial(port, query)
    assert ws.headers.get("sec-websocket-protocol", "media") == "media"
    assert "sec-websocket-extensions" not in ws.headers  # Asterisk would abort the call
    ws.send_text(media_start(channel_id, fmt, frame, as_json, **variables))
    commands = [await ws.receive_text()]
    sent = 0
    async for chunk in paced([audio[i : i + frame] for i in range(0, len(audio), frame)]):
        ws.send_binary(chunk)
        sent += 1
        if dtmf and sent == 10:
            for digit in dtmf:
                text = (
                    json.dumps({"event": "DTMF_END", "channel_id": channel_id, "digit": digit})
                    if as_json
                    else f"DTMF_END digit:{digit} channel_id:{channel_id}"
                )
                ws.send_text(text)
    await ws.drain_and_close(1000)  # the caller hangs up: Close 1000 from Asterisk
    return commands


def samples(fmt: str, audio: bytes) -> np.ndarray[Any, np.dtype[np.int16]]:
    if fmt == "ulaw":
        return ulaw_decode(audio)
    if fmt == "alaw":
        return alaw_decode(audio)
    return np.frombuffer(audio, "<i2").astype(np.int16)


async def test_plain_text_slin16_and_json_ulaw_calls_are_transcribed(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    port = service.ports["audio"]
    slin16 = phone_bytes(SENTENCES[2], "pcm16", 16000)
    ulaw = phone_bytes(SENTENCES[1], "mulaw", 8000)
    async with watch_events(service) as events:
        plain, as_json = await asyncio.gather(
            asterisk_channel(port, "1796276893.2", "slin16", slin16, 640, dtmf="42"),
            asterisk_channel(
                port,
                "1796276893.3",
                "ulaw",
                ulaw,
                160,
                as_json=True,
                query="?tenant=acme&queue=sales",
                DIALEDPEERNUMBER="stt/c(ulaw)f(json)",
                CUSTOMER="Ada",
            ),
        )
        await events.wait_ended(2)
    assert plain == ["ANSWER"]  # in the call's format: what a channel dialled with n waits for
    assert as_json == ['{"command":"ANSWER"}']
    for channel_id, fmt, audio, rate in (
        ("1796276893.2", "slin16", slin16, 16000),
        ("1796276893.3", "ulaw", ulaw, 8000),
    ):
        expected = await offline_words(service, samples(fmt, audio), rate)
        assert expected and events.words(channel_id) == expected
    first = events.of("1796276893.2")[0]
    assert first["front_end"] == "asterisk_media" and first["legs"] == ["caller"]
    assert first["labels"]["channel"] == "WebSocket/stt/0x7f1cc000a6d2"
    assert first["labels"]["format"] == "slin16"
    digits = [e["digit"] for e in events.of("1796276893.2") if e["type"] == "dtmf"]
    assert digits == ["4", "2"]
    labels = events.of("1796276893.3")[0]["labels"]
    assert labels["CUSTOMER"] == "Ada" and labels["tenant"] == "acme"
    assert labels["MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE"] == "160"


async def test_unserved_format_gets_hangup_while_another_call_goes_on(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    port = service.ports["audio"]
    alaw = phone_bytes(SENTENCES[3], "alaw", 8000)

    async def bad_channel() -> tuple[str, int | None]:
        await asyncio.sleep(1.0)  # mid-way through the good call
        ws = await dial(port)
        ws.send_text(media_start("1796276999.9", "opus", 0, as_json=True))
        command = await ws.receive_text()
        opcode, _ = await ws.receive()
        assert opcode == CLOSE
        ws.writer.close()
        return command, ws.close_code

    async with watch_events(service) as events:
        good, (command, code) = await asyncio.gather(
            asterisk_channel(port, "1796276893.7", "alaw", alaw, 160), bad_channel()
        )
        await events.wait_ended(1)
    assert command == '{"command":"HANGUP"}' and code == 1007  # the JSON call's own format
    assert good == ["ANSWER"]
    expected = await offline_words(service, samples("alaw", alaw), 8000)
    assert expected and events.words("1796276893.7") == expected
    assert "1796276999.9" not in events.ended()


async def test_full_engine_refuses_before_the_upgrade(
    start_service: ServiceFactory,
) -> None:
    service = await start_service(capacity=1)
    port = service.ports["audio"]
    first = await dial(port)
    first.send_text(media_start("1796276893.5", "slin", 320, as_json=False))
    assert await first.receive_text() == "ANSWER"
    try:
        await dial(port)
        raise AssertionError("a full engine must refuse the upgrade")
    except HandshakeRefused as refused:
        assert refused.status == 503  # Dial() fails at once: DIALSTATUS=CHANUNAVAIL
    await first.drain_and_close(1000)
    async with aiohttp.ClientSession() as http:
        for _ in range(50):  # the first call's slot comes back once its flush is done
            async with http.get(f"http://127.0.0.1:{service.ports['health']}/ready") as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.1)
    again = await dial(port)
    again.send_text(media_start("1796276893.6", "slin", 320, as_json=False))
    assert await again.receive_text() == "ANSWER"
    await again.drain_and_close(1000)
