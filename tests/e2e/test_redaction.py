"""Redaction end to end: a caller reads a card (in two groups, 2 s apart), its security code
and an SSN, then says a harmless number, on Deepgram (interim results on), SIP and Twilio at
once. Nothing of those numbers may reach a client, a live subscriber, an export, a webhook,
a log line or any file in the data directory; every other word must.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from api.app import Service
from api.config import TwilioConfig, WebhookConfig
from engine.base import Closed, Engine, Segment
from telephony.audio import PcmArray, resample_whole, ulaw_decode
from telephony.config import PrivacyConfig
from tests.conftest import ServiceFactory
from tests.e2e.frontends import paced, twilio_call, watch_events
from tests.e2e.sip_peers import free_port, sip_config, sipp, sipp_dir, write_rtp_pcap
from tests.speech import phone_bytes

# (what the caller says, the pause after it): the card in two groups 2 s apart.
CALLER = (
    ("My card number is four one one one, one one one one.", 2.0),
    ("One one one one, one one one one.", 1.0),
    ("The security code is seven three one.", 1.0),
    ("My social security number is one two three, four five, six seven eight nine.", 1.0),
    ("Please call me back in 15 minutes.", 1.0),
)
NUMBER_WORDS = "zero|oh|one|two|three|four|five|six|seven|eight|nine"
# What an unredacted card, code or SSN leaves in any text: two number words in a row (a
# harmless "fifteen" is one), and in a transcript's own text a number of three digits or more.
WORD_PAIRS = re.compile(rf"\b({NUMBER_WORDS})\b[\s,.-]+\b({NUMBER_WORDS})\b", re.I)
DIGITS = re.compile(r"(?<![\w.:,])\d{3,}(?![\w.:,])|\d{3,}[\s,.-]+\d{2,}")
TEXT_KEYS = frozenset({"text", "transcript", "word", "punctuated_word"})
PLACEHOLDER = re.compile(r"^\[[A-Z_]+\][.,?!]*$")


def caller_wire() -> bytes:
    return b"".join(
        phone_bytes(text, "mulaw", 8000) + b"\xff" * int(8000 * pause) for text, pause in CALLER
    )


async def engine_words(engine: Engine, pcm: PcmArray) -> list[str]:
    """The engine's own words for the audio, unredacted: what redaction works on."""
    stream = engine.open("reference", "caller")
    await stream.write(pcm)
    stream.close()
    words: list[str] = []
    async for event in stream.events():
        if isinstance(event, Segment):
            words += [w.text for w in event.words]
        if isinstance(event, Closed):
            break
    return words


def is_number(word: str) -> bool:
    core = word.strip(".,?!").lower()
    return core.isdigit() or bool(re.fullmatch(NUMBER_WORDS, core)) or "-" in core


class Hooks:
    """A webhook receiver on loopback: every body, as sent."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        self.port = free_port()

    async def hook(self, request: web.Request) -> web.Response:
        self.bodies.append((await request.read()).decode())
        return web.Response(status=204)


async def test_card_code_and_ssn_never_leave_the_engine(
    start_service: ServiceFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hooks = Hooks()
    app = web.Application()
    app.router.add_post("/hook", hooks.hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", hooks.port).start()
    base = sip_config()
    config = dataclasses.replace(
        base,
        # pci and ssn for every call: SIP and Twilio have no query string to ask for it.
        privacy=PrivacyConfig(redact=("pci", "ssn")),
        webhook=WebhookConfig(url=f"http://127.0.0.1:{hooks.port}/hook"),
        twilio=TwilioConfig(),
        data=dataclasses.replace(base.data, dir=str(tmp_path / "data")),
    )
    service: Service = await start_service(config)
    wire = caller_wire()
    pcm8k = ulaw_decode(wire).astype(np.int16)
    raw = await engine_words(
        service.bridge.engine, resample_whole(pcm8k, 8000, service.bridge.engine.sample_rate)
    )
    assert WORD_PAIRS.search(" ".join(raw)), raw  # the engine did hear the numbers
    audio = f"127.0.0.1:{service.ports['audio']}"
    write_rtp_pcap(sipp_dir(tmp_path) / "pcap" / "speech.pcap", wire, payload_type=0)
    deepgram_texts: list[str] = []

    async def deepgram() -> None:
        url = (
            f"ws://{audio}/v1/listen?encoding=mulaw&sample_rate=8000&interim_results=true"
            "&redact=pci&punctuate=true"
        )
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            async for offset in paced(range(0, len(wire), 1600), 0.2):
                await ws.send_bytes(wire[offset : offset + 1600])
            await ws.send_str('{"type": "CloseStream"}')
            async for msg in ws:
                deepgram_texts.append(msg.data)

    async with watch_events(service) as events:
        sip = asyncio.create_task(
            sipp(
                service,
                tmp_path,
                "-m",
                "1",
                "-d",
                str(len(wire) // 8 + 500),
                scenario="uac_pcmu.xml",
            )
        )
        await asyncio.gather(deepgram(), twilio_call(f"ws://{audio}", "CA" + "7" * 32, wire))
        assert (await sip).returncode == 0
        ended = await events.wait_ended(3)
    partials = [m for m in map(json.loads, deepgram_texts) if m.get("is_final") is False]
    assert partials, "interim results were asked for"

    # Every road's transcript: the words around the numbers survive, in order; the numbers
    # became placeholders naming what they were; the harmless number is left as it was.
    async with aiohttp.ClientSession() as http:
        exports: list[str] = []
        for call_id in ended:
            for fmt in ("json", "txt", "vtt", "srt"):
                url = f"http://{audio}/v1/calls/{call_id}/transcript?format={fmt}"
                async with http.get(url) as response:
                    assert response.status == 200
                    exports.append(await response.text())
            async with http.get(f"http://{audio}/v1/calls/{call_id}") as response:
                record = await response.json()
            assert record["redaction"] == ["pci", "ssn"], record
            words = [w["text"] for w in events.words(call_id)]
            kept = [w for w in words if not PLACEHOLDER.match(w)]
            placeholders = {w.strip(".,") for w in words if PLACEHOLDER.match(w)}
            assert {"[CARD_NUMBER]", "[CARD_SECURITY_CODE]", "[SSN]"} <= placeholders, (
                record,
                words,
            )
            # The same non-number words as the engine's own transcript (one road's audio may
            # differ from another's by a word: a tolerance of two).
            assert_close([w for w in raw if not is_number(w)], kept)
            assert "15" in " ".join(words) or "fifteen" in " ".join(words).lower(), words

    # Nothing sensitive anywhere: in the transcript texts of what clients, live subscribers
    # and webhooks got, and of the exports (cue timings and numbers aside), then in every log
    # line and every byte of the data directory.
    messages = [json.dumps(e) for e in events.events] + deepgram_texts + hooks.bodies
    texts = [t for m in messages for t in transcript_texts(json.loads(m))]
    for export in exports:
        if export.startswith("{"):
            texts += transcript_texts(json.loads(export))
        else:
            texts += [line for line in export.splitlines() if "-->" not in line]
    texts = [t for t in texts if not t.strip().isdigit()]  # srt cue numbers
    for text in texts:
        found = WORD_PAIRS.search(text) or DIGITS.search(text)
        assert found is None, f"{found.group(0)!r} reached a client: {text[:300]}"
    for record in caplog.records:
        line = f"{record.getMessage()} {record.__dict__}"
        assert WORD_PAIRS.search(line) is None, line
    await service.stop(drain_timeout_s=0)  # every event written, the WAL included
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert files
    for path in files:
        found = WORD_PAIRS.search(path.read_bytes().decode("utf-8", "replace"))
        assert found is None, f"{found.group(0)!r} in {path}"
    await runner.cleanup()


def transcript_texts(message: Any) -> list[str]:
    """Every transcript string in a JSON message, however deep (Deepgram's alternatives,
    webhook bodies, segment words)."""
    if isinstance(message, dict):
        return [
            t
            for key, value in message.items()
            for t in ([value] if key in TEXT_KEYS and isinstance(value, str) else [])
            + transcript_texts(value)
        ]
    if isinstance(message, list):
        return [t for item in message for t in transcript_texts(item)]
    return []


def assert_close(expected: list[str], got: list[str], tolerance: int = 2) -> None:
    import difflib

    matcher = difflib.SequenceMatcher(a=[w.lower() for w in expected], b=[w.lower() for w in got])
    same = sum(block.size for block in matcher.get_matching_blocks())
    assert same >= len(expected) - tolerance and len(got) <= len(expected) + tolerance, (
        expected,
        got,
    )


async def test_bad_redaction_or_keyterms_are_refused_before_the_upgrade(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    audio = f"127.0.0.1:{service.ports['audio']}"
    too_many = "&".join(f"keyterm=term{n}" for n in range(101))
    ws_headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    async with aiohttp.ClientSession() as http:
        for path, needle in (
            ("/v1/listen?encoding=mulaw&sample_rate=8000&redact=phi", "phi"),
            ("/v1/listen?encoding=mulaw&sample_rate=8000&" + too_many, "100"),
            ("/v1/listen?encoding=mulaw&sample_rate=8000&keywords=Xarelto:x", "boost"),
            ("/v1/stream?encoding=mulaw&redact=pci,cards", "cards"),
            ("/v1/stream?encoding=mulaw&" + too_many, "100"),
            ("/?redact=everything", "everything"),
            ("/?keyterm=" + "x" * 200, "60"),
        ):
            async with http.get(f"http://{audio}{path}", headers=ws_headers) as response:
                body = await response.text()
            assert response.status == 400, (path, body)
            assert needle in body, (path, body)
        # Twilio names its options in the start message, after the upgrade: close 1007.
        start = {
            "event": "start",
            "start": {
                "streamSid": "MZ" + "3" * 32,
                "accountSid": "AC" + "1" * 32,
                "callSid": "CA" + "3" * 32,
                "tracks": ["inbound"],
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": {"redact": "pci,bogus"},
            },
        }
        async with http.ws_connect(f"ws://{audio}/twilio/media") as ws:
            await ws.send_str(json.dumps(start))
            msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1007, msg
        assert "bogus" in msg.extra
        # The service goes on: a stream asking for a valid kind is served.
        url = f"ws://{audio}/v1/stream?encoding=mulaw&redact=pci&customer=ACME-42"
        async with http.ws_connect(url) as ws:
            await ws.send_bytes(phone_bytes("Thank you for calling.", "mulaw", 8000))
            await ws.send_str('{"type": "stop"}')
            kinds = [json.loads(m.data)["type"] async for m in ws]
        assert "segment" in kinds and kinds[-1] == "closed"
        async with http.get(f"http://{audio}/v1/calls?limit=1") as response:
            (call,) = (await response.json())["calls"]
        assert call["labels"]["customer"] == "ACME-42" and call["redaction"] == ["pci"]
