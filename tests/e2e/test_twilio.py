"""Twilio Media Streams end to end: the webhook, signatures, and a both_tracks stream."""

from __future__ import annotations

import base64
import dataclasses
import json
import xml.etree.ElementTree as ET

import aiohttp
import numpy as np
from twilio.request_validator import RequestValidator

from api.app import Service
from api.config import TwilioConfig
from telephony.audio import ulaw_decode
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import offline_words, paced, watch_events
from tests.speech import SENTENCES, phone_bytes

TOKEN = "0123456789abcdef0123456789abcdef"
PUBLIC = "https://bridge.example.test"
CALL_SID = "CA" + "2" * 32
STREAM_SID = "MZ" + "0" * 32
FORM = {"CallSid": CALL_SID, "From": "+15005550006", "To": "+15005550001"}


async def twilio_service(start_service: ServiceFactory) -> Service:
    config = make_config()
    twilio = TwilioConfig(auth_token=TOKEN, public_url=PUBLIC, dial="+15005550002")
    return await start_service(dataclasses.replace(config, twilio=twilio))


def sign(url: str, params: dict[str, str]) -> str:
    return str(RequestValidator(TOKEN).compute_signature(url, params))


async def test_voice_webhook_checks_the_signature(start_service: ServiceFactory) -> None:
    service = await twilio_service(start_service)
    url = f"http://127.0.0.1:{service.ports['audio']}/twilio/voice"
    good = sign(f"{PUBLIC}/twilio/voice", FORM)
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=FORM, headers={"X-Twilio-Signature": good}) as r:
            assert r.status == 200
            twiml = ET.fromstring(await r.text())
        for headers in ({"X-Twilio-Signature": sign(f"{PUBLIC}/other", FORM)}, {}):
            async with http.post(url, data=FORM, headers=headers) as r:
                assert r.status == 403
        tampered = {**FORM, "From": "+19999999999"}
        async with http.post(url, data=tampered, headers={"X-Twilio-Signature": good}) as r:
            assert r.status == 403
    stream = twiml.find("Start/Stream")
    assert stream is not None and stream.get("url") == "wss://bridge.example.test/twilio/media"


async def test_stream_upgrade_checks_the_signature(start_service: ServiceFactory) -> None:
    service = await twilio_service(start_service)
    url = f"ws://127.0.0.1:{service.ports['audio']}/twilio/media"
    async with aiohttp.ClientSession() as http:
        for headers in ({"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}, {}):
            try:
                await http.ws_connect(url, headers=headers)
                raise AssertionError("upgrade accepted without a valid signature")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 403
        signature = sign("wss://bridge.example.test/twilio/media", {})
        ws = await http.ws_connect(url, headers={"X-Twilio-Signature": signature})
        await ws.close()


def media_message(track: str, payload: bytes, timestamp_ms: int) -> str:
    encoded = base64.b64encode(payload).decode()
    body = {"track": track, "timestamp": str(timestamp_ms), "payload": encoded}
    return json.dumps({"event": "media", "streamSid": STREAM_SID, "media": body})


async def test_both_tracks_become_caller_and_agent_legs(start_service: ServiceFactory) -> None:
    service = await twilio_service(start_service)
    caller = phone_bytes(SENTENCES[1], "mulaw", 8000)
    agent = phone_bytes(SENTENCES[5], "mulaw", 8000)
    length = max(len(caller), len(agent))
    caller, agent = caller.ljust(length, b"\xff"), agent.ljust(length, b"\xff")
    start = {
        "event": "start",
        "start": {
            "streamSid": STREAM_SID,
            "accountSid": "AC" + "1" * 32,
            "callSid": CALL_SID,
            "tracks": ["inbound", "outbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": FORM,
        },
        "streamSid": STREAM_SID,
    }
    url = f"ws://127.0.0.1:{service.ports['audio']}/twilio/media"
    signature = sign("wss://bridge.example.test/twilio/media", {})
    async with watch_events(service) as events, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, headers={"X-Twilio-Signature": signature})
        await ws.send_str(
            json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        )
        await ws.send_str(json.dumps(start))
        await ws.send_str("garbage that is not JSON")  # logged and skipped
        offsets = range(0, length, 160)
        async for offset in paced(offsets):
            ms = offset // 8
            await ws.send_str(media_message("inbound", caller[offset : offset + 160], ms))
            await ws.send_str(media_message("outbound", agent[offset : offset + 160], ms))
        await ws.send_str(json.dumps({"event": "stop", "streamSid": STREAM_SID}))
        await events.wait_ended(1)
        await ws.close()
    for leg, wire in (("caller", caller), ("agent", agent)):
        expected = await offline_words(service, ulaw_decode(wire).astype(np.int16), 8000)
        assert expected and events.words(CALL_SID, leg) == expected
    started = events.of(CALL_SID)[0]
    assert started["front_end"] == "twilio" and started["legs"] == ["caller", "agent"]
    assert started["labels"]["from"] == "+15005550006"
    assert started["labels"]["stream_sid"] == STREAM_SID
    assert events.ended()[CALL_SID]["reason"] == "stop"
