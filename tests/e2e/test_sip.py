"""The SIP user agent answering real peers: sipp (Debian's sip-tester) and baresip.

Every call goes over real loopback UDP: SIP to the service's port, RTP to the port its SDP
answer names. Words are compared with the offline transcript of the same 8 kHz audio.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from api.app import Service
from telephony.audio import PcmArray, ResampleStream, alaw_decode, ulaw_decode
from tests.conftest import ServiceFactory
from tests.e2e.sip_peers import (
    SIP_TESTER,
    events_until_ended,
    read_rtp_pcap,
    sip_config,
    sipp,
    sipp_dir,
    words,
    write_rtp_pcap,
)
from tests.e2e.test_websocket import offline_words
from tests.speech import SENTENCES, phone_bytes, word_error_rate

pytestmark = pytest.mark.xdist_group("sip")

# Measured like the WebSocket tests: μ-law 8 kHz hibari speech, CPU engine.
PHONE_WER_BOUND = 0.5


def at_24k(pcm8k: PcmArray) -> PcmArray:
    resampler = ResampleStream(8000)
    return np.concatenate([resampler.process(pcm8k), resampler.flush()])


def events_url(service: Service) -> str:
    return f"ws://127.0.0.1:{service.ports['audio']}/v1/events"


def speech_pcap(cwd: Path, sentence: str) -> tuple[bytes, int]:
    """The sentence as μ-law RTP in cwd/pcap/speech.pcap; returns the wire bytes and ms."""
    wire = phone_bytes(sentence, "mulaw", 8000)
    write_rtp_pcap(sipp_dir(cwd) / "pcap" / "speech.pcap", wire, payload_type=0)
    return wire, len(wire) // 8


@pytest.mark.parametrize("backend", ["asyncio", "pjsua2"])
async def test_ulaw_call_transcript_equals_offline(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    service = await start_service(sip_config(backend=backend))
    wire, ms = speech_pcap(tmp_path, SENTENCES[1])
    async with aiohttp.ClientSession() as http, http.ws_connect(events_url(service)) as ws:
        result = await sipp(
            service, tmp_path, "-m", "1", "-d", str(ms + 500), scenario="uac_pcmu.xml"
        )
        events = await events_until_ended(ws)
    assert result.returncode == 0, result.errors + result.stdout
    started, ended = events[0], events[-1]
    assert started["type"] == "call_started" and started["front_end"] == "sip"
    labels = started["labels"]
    assert labels["sip_call_id"] == started["call_id"]
    assert "sipp" in labels["from"] and "service" in labels["to"]
    assert "+15550100" in labels["p_asserted_identity"] and labels["x-tenant"] == "acme"
    assert ended["reason"] == "remote hangup"
    got = words(events)
    offline = await offline_words(service, at_24k(ulaw_decode(wire)))
    if backend == "asyncio":  # RTP placed by timestamp: exactly the caller's audio
        assert ended["audio_s"]["caller"] == pytest.approx(len(wire) / 8000, abs=0.03)
        assert got and got == offline
    else:
        # PJSIP's media clock runs from the answer to the BYE, silence included, so the
        # words come later on the leg's timeline; they are the same words.
        assert ended["audio_s"]["caller"] >= len(wire) / 8000
        assert [w["text"] for w in got] == [w["text"] for w in offline]
    text = " ".join(w["text"] for w in got)
    assert word_error_rate(SENTENCES[1], text) <= PHONE_WER_BOUND, text


async def test_builtin_uac_pcap_alaw_call(start_service: ServiceFactory, tmp_path: Path) -> None:
    """sipp's own scenario: PCMA 30 ms packets of the shipped speech, DTMF, BYE."""
    service = await start_service(sip_config())
    payload = b"".join(p.payload for p in read_rtp_pcap(SIP_TESTER / "g711a.pcap"))
    async with aiohttp.ClientSession() as http, http.ws_connect(events_url(service)) as ws:
        result = await sipp(service, sipp_dir(tmp_path), "-sn", "uac_pcap", "-m", "1")
        events = await events_until_ended(ws)
    assert result.returncode == 0, result.errors + result.stdout
    assert events[-1]["audio_s"]["caller"] == pytest.approx(len(payload) / 8000, abs=0.03)
    got = words(events)
    assert got and got == await offline_words(service, at_24k(alaw_decode(payload)))


async def test_thirty_concurrent_calls_with_audio(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    # The sink engine: this is about the SIP/RTP path carrying 30 calls, not about words.
    service = await start_service(sip_config({"name": "sink", "capacity": 40}))
    async with aiohttp.ClientSession() as http, http.ws_connect(events_url(service)) as ws:
        result = await sipp(
            service, sipp_dir(tmp_path), "-sn", "uac_pcap", "-m", "30", "-l", "30", "-r", "30",
            timeout_s=90,
        )  # fmt: skip
        events = await events_until_ended(ws, calls=30)
    assert result.returncode == 0, result.errors + result.stdout
    ended = [e for e in events if e["type"] == "call_ended"]
    assert len({e["call_id"] for e in ended}) == 30
    # Every call got all of its 7.08 s of audio (a lost packet would leave silence, not less).
    assert all(e["audio_s"]["caller"] == pytest.approx(7.08, abs=0.03) for e in ended)
    assert all(e["reason"] == "remote hangup" for e in ended)


async def test_options_and_cancel(start_service: ServiceFactory, tmp_path: Path) -> None:
    service = await start_service(sip_config(answer_delay_s=3.0))
    options = await sipp(service, tmp_path, "-m", "1", scenario="uac_options.xml")
    assert options.returncode == 0, options.errors + options.stdout
    cancel = await sipp(service, tmp_path, "-m", "1", scenario="uac_cancel.xml")
    assert cancel.returncode == 0, cancel.errors + cancel.stdout
    await asyncio.sleep(3.5)  # past the answer delay: the cancelled call must not be answered
    assert not service.bridge.hub.calls
    assert service.bridge.engine.free_slots == service.bridge.engine.capacity


@pytest.mark.parametrize(
    ("sip", "expected"),
    [({"rtp_timeout_s": 1.0}, "rtp timeout"), ({"max_call_s": 2.0}, "max call length")],
)
async def test_we_hang_up(
    start_service: ServiceFactory, tmp_path: Path, sip: dict[str, Any], expected: str
) -> None:
    service = await start_service(sip_config(**sip))
    wire, _ = speech_pcap(tmp_path, SENTENCES[3])
    async with aiohttp.ClientSession() as http, http.ws_connect(events_url(service)) as ws:
        result = await sipp(service, tmp_path, "-m", "1", scenario="uac_wait_bye.xml")
        events = await events_until_ended(ws)
    assert result.returncode == 0, result.errors + result.stdout  # sipp got our BYE
    assert events[-1]["reason"] == expected
    if expected == "rtp timeout":  # the whole sentence, then silence: every word is there
        assert words(events) == await offline_words(service, at_24k(ulaw_decode(wire)))


async def test_hold_suspends_rtp_timeout(start_service: ServiceFactory, tmp_path: Path) -> None:
    service = await start_service(sip_config(rtp_timeout_s=1.0))
    speech_pcap(tmp_path, SENTENCES[3])
    async with aiohttp.ClientSession() as http, http.ws_connect(events_url(service)) as ws:
        # 2.5 s on hold without RTP, more than twice the timeout
        result = await sipp(service, tmp_path, "-m", "1", "-d", "2500", scenario="uac_hold.xml")
        events = await events_until_ended(ws)
    assert result.returncode == 0, result.errors + result.stdout
    assert events[-1]["reason"] == "remote hangup"


async def test_busy_forbidden_and_no_codec(start_service: ServiceFactory, tmp_path: Path) -> None:
    service = await start_service(sip_config({"capacity": 1}, allow=("127.0.0.0/8",)))

    async def rejected(code: int, formats: str = "0 101") -> None:
        scenario = tmp_path / "uac_rejected.xml"
        template = (Path(__file__).parent / "sipp" / "uac_rejected.xml").read_text()
        scenario.write_text(template.replace("@CODE@", str(code)))
        result = await sipp(
            service, tmp_path, "-sf", str(scenario), "-key", "formats", formats, "-m", "1"
        )
        assert result.returncode == 0, f"{code}: {result.errors}{result.stdout}"

    await rejected(488, "18 101")  # G.729 only
    await rejected(488, "9")  # G.722 only
    busy = service.bridge.hub.open_call("test", call_id="holds-the-only-slot")
    await rejected(486)
    await busy.end()
    assert service.bridge.engine.free_slots == 1

    outside = await start_service(sip_config(allow=("10.0.0.0/8", "192.168.0.0/16")))
    service = outside
    await rejected(403)
    assert not outside.bridge.hub.calls


def sip_request(port: int, text: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
        s.sendto(text.replace("LOCALPORT", str(local)).encode(), ("127.0.0.1", port))
        while True:  # the final response, past any 100 Trying
            reply = s.recv(4096).decode(errors="replace")
            if not reply.startswith("SIP/2.0 1"):
                return reply


HEADERS = (
    "Via: SIP/2.0/UDP 127.0.0.1:LOCALPORT;branch=z9hG4bK-{n}\r\n"
    "From: <sip:t@127.0.0.1>;tag=a{n}\r\nTo: <sip:bridge@127.0.0.1>\r\n"
    "Call-ID: bad-{n}@127.0.0.1\r\n"
)


@pytest.mark.parametrize(
    "request_text",
    [
        "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n" + HEADERS + "CSeq: one INVITE\r\n\r\n",
        "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n" + HEADERS + "CSeq: 1 BYE\r\n\r\n",
        "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n"
        + HEADERS.split("Call-ID")[0]
        + "CSeq: 1 INVITE\r\n\r\n",
        "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n" + HEADERS + "CSeq: 1 INVITE\r\n"
        "Content-Type: application/sdp\r\nContent-Length: 400\r\n\r\nv=0\r\n",
        "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n" + HEADERS + "CSeq: 1 INVITE\r\n"
        "Content-Type: application/sdp\r\nContent-Length: 9\r\n\r\nnot sdp\r\n",
        "NONSENSE\r\n" + HEADERS + "CSeq: 1 INVITE\r\n\r\n",
    ],
    ids=["cseq-not-a-number", "cseq-method", "no-call-id", "short-body", "bad-sdp", "no-version"],
)
async def test_malformed_requests_get_400_and_spare_the_service(
    start_service: ServiceFactory, tmp_path: Path, request_text: str
) -> None:
    service = await start_service(sip_config())
    port = service.ports["sip"]
    reply = await asyncio.to_thread(sip_request, port, request_text.replace("{n}", "1"))
    assert reply.startswith("SIP/2.0 400"), reply
    assert "bad-1@127.0.0.1" in reply or "Call-ID" not in request_text
    options = await sipp(service, tmp_path, "-m", "1", scenario="uac_options.xml")
    assert options.returncode == 0
    assert not service.bridge.hub.calls


async def test_pjsua2_carries_its_cap_and_refuses_one_more(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = await start_service(sip_config({"name": "sink", "capacity": 10}, backend="pjsua2"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/info") as response:
            info = (await response.json())["sip"]
    assert info["backend"] == "pjsua2" and info["call_cap"] == 4 and info["siprec"] is False
    holding = asyncio.create_task(
        sipp(service, tmp_path, "-sn", "uac", "-m", "4", "-l", "4", "-r", "4", "-d", "4000")
    )
    for _ in range(50):  # until the four calls are up
        await asyncio.sleep(0.1)
        if len(service.bridge.hub.calls) == 4:
            break
    assert len(service.bridge.hub.calls) == 4
    scenario = tmp_path / "uac_rejected.xml"
    template = (Path(__file__).parent / "sipp" / "uac_rejected.xml").read_text()
    scenario.write_text(template.replace("@CODE@", "486"))
    over = await sipp(service, tmp_path, "-sf", str(scenario), "-key", "formats", "0", "-m", "1")
    assert over.returncode == 0, over.errors + over.stdout
    held = await holding
    assert held.returncode == 0, held.errors + held.stdout
