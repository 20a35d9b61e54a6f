"""The SIP user agent answering real peers: sipp (Debian's sip-tester) and baresip.

Every call goes over real loopback UDP: SIP to the service's port, RTP to the port its SDP
answer names. Words are compared with the offline transcript of the same 8 kHz audio.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile

from api.app import Service
from telephony.audio import PcmArray, alaw_decode, ulaw_decode
from tests.conftest import ServiceFactory
from tests.e2e.frontends import offline_words, watch_events
from tests.e2e.sip_peers import (
    SCENARIOS,
    SIP_TESTER,
    Baresip,
    events_until_ended,
    free_port,
    read_rtp_pcap,
    send_rtp,
    sip_config,
    sipp,
    sipp_dir,
    sipp_server,
    words,
    write_rtp_pcap,
)
from tests.speech import SENTENCES, phone_bytes, word_error_rate

pytestmark = pytest.mark.xdist_group("sip")

# Measured like the WebSocket tests: μ-law 8 kHz hibari speech, Moonshine: WER 0.00.
PHONE_WER_BOUND = 0.05
# PJSIP's media clock must tick every 20 ms: its tests run alone (`solo`, see Makefile).
BACKENDS = ("asyncio", pytest.param("pjsua2", marks=pytest.mark.solo))


def texts(found: list[dict[str, Any]]) -> list[str]:
    return [w["text"] for w in found]


def from_first_sound(pcm8k: PcmArray) -> PcmArray:
    """From the first sample that is not digital silence: where pjsua2's timeline starts."""
    loud = np.flatnonzero(pcm8k)
    return pcm8k[int(loud[0]) :] if len(loud) else pcm8k


def heard(backend: str, wire: bytes) -> PcmArray:
    """What the leg hears of the μ-law `wire`: all of it on asyncio (RTP placed by its
    timestamps); from the first sound on on pjsua2 (PJSIP decodes and re-frames it on its
    own media clock, at G.711's rate, so sample for sample after that)."""
    pcm = ulaw_decode(wire)
    return pcm if backend == "asyncio" else from_first_sound(pcm)


async def assert_offline_words(
    service: Service, backend: str, got: list[dict[str, Any]], wire: bytes
) -> None:
    """got is the offline transcript of what the leg heard of `wire`: word for word, and each
    word's time."""
    offline = await offline_words(service, heard(backend, wire), 8000)
    assert offline and got == offline


def events_url(service: Service) -> str:
    return f"ws://127.0.0.1:{service.ports['audio']}/v1/events"


# A caller's line is quiet before they speak. PJSIP drops a call's first two RTP packets now
# and then (measured: every run of the jitter test, no run of the plain one), and the pjsua2
# leg's timeline starts at its first sample of sound. With 100 ms of digital silence first,
# what it may drop is silence, and the leg hears the very samples of the offline reference
# (a recogniser can hear the same words differently 40 ms shifted).
LEAD_IN = b"\xff" * 800  # μ-law 0


def caller_speech(sentence: str) -> bytes:
    """The sentence as a caller says it on a G.711 μ-law line, after a moment's silence."""
    return LEAD_IN + phone_bytes(sentence, "mulaw", 8000)


def speech_pcap(cwd: Path, sentence: str) -> tuple[bytes, int]:
    """The sentence as μ-law RTP in cwd/pcap/speech.pcap; returns the wire bytes and ms."""
    wire = caller_speech(sentence)
    write_rtp_pcap(sipp_dir(cwd) / "pcap" / "speech.pcap", wire, payload_type=0)
    return wire, len(wire) // 8


@pytest.mark.parametrize("backend", BACKENDS)
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
    async with aiohttp.ClientSession() as http:  # the same labels in the call record
        url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/{started['call_id']}"
        async with http.get(url) as response:
            record = await response.json()
    assert response.status == 200, record
    assert record["front_end"] == "sip" and record["labels"] == labels
    got = words(events)
    if backend == "asyncio":  # RTP placed by timestamp: exactly the caller's audio
        assert ended["audio_s"]["caller"] == pytest.approx(len(wire) / 8000, abs=0.03)
    else:
        # PJSIP's media clock runs from the first sound to the BYE, the silence while sipp
        # waits to hang up included; the words are those of the same audio.
        assert ended["audio_s"]["caller"] >= len(wire) / 8000 - 0.1
    await assert_offline_words(service, backend, got, wire)
    text = " ".join(w["text"] for w in got)
    assert word_error_rate(SENTENCES[1], text) <= PHONE_WER_BOUND, text


@pytest.mark.parametrize("backend", BACKENDS)
async def test_builtin_uac_pcap_alaw_call_and_dtmf(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    """sipp's own scenario: PCMA 30 ms packets of the shipped speech, then RFC 4733 '1', BYE."""
    # pjsua2's words are checked on hibari speech (test_ulaw_...); here its DTMF and audio.
    engine = {"name": "sink"} if backend == "pjsua2" else None
    service = await start_service(sip_config(engine, backend=backend))
    payload = b"".join(p.payload for p in read_rtp_pcap(SIP_TESTER / "g711a.pcap"))
    async with aiohttp.ClientSession() as http, http.ws_connect(events_url(service)) as ws:
        result = await sipp(service, sipp_dir(tmp_path), "-sn", "uac_pcap", "-m", "1")
        events = await events_until_ended(ws)
    assert result.returncode == 0, result.errors + result.stdout
    dtmf = [e for e in events if e["type"] == "dtmf"]
    assert [(e["digit"], e["leg"]) for e in dtmf] == [("1", "caller")]
    assert dtmf[0]["at"] >= 6.5  # pressed after the 7 s of speech, on the leg's timeline
    assert events[-1]["reason"] == "remote hangup"
    if backend == "asyncio":
        assert events[-1]["audio_s"]["caller"] == pytest.approx(len(payload) / 8000, abs=0.03)
        got = words(events)
        assert got and got == await offline_words(service, alaw_decode(payload), 8000)
    else:  # PJSIP's media clock: from the answer to the BYE, the pause included
        assert events[-1]["audio_s"]["caller"] >= len(payload) / 8000


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


@pytest.mark.parametrize("backend", BACKENDS)
async def test_options_and_cancel(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    service = await start_service(sip_config(answer_delay_s=3.0, backend=backend))
    options = await sipp(service, tmp_path, "-m", "1", scenario="uac_options.xml")
    assert options.returncode == 0, options.errors + options.stdout
    cancel = await sipp(service, tmp_path, "-m", "1", scenario="uac_cancel.xml")
    assert cancel.returncode == 0, cancel.errors + cancel.stdout
    await asyncio.sleep(3.5)  # past the answer delay: the cancelled call must not be answered
    assert not service.bridge.hub.calls
    assert service.bridge.engine.free_slots == service.bridge.engine.capacity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("sip", "expected"),
    [({"rtp_timeout_s": 1.0}, "rtp timeout"), ({"max_call_s": 2.0}, "max call length")],
)
async def test_we_hang_up(
    start_service: ServiceFactory,
    tmp_path: Path,
    sip: dict[str, Any],
    expected: str,
    backend: str,
) -> None:
    service = await start_service(sip_config(backend=backend, **sip))
    wire, _ = speech_pcap(tmp_path, SENTENCES[1])
    async with aiohttp.ClientSession() as http, http.ws_connect(events_url(service)) as ws:
        result = await sipp(service, tmp_path, "-m", "1", scenario="uac_wait_bye.xml")
        events = await events_until_ended(ws)
    assert result.returncode == 0, result.errors + result.stdout  # sipp got our BYE
    assert events[-1]["reason"] == expected
    if expected == "rtp timeout":  # the whole sentence, then silence: every word is there
        await assert_offline_words(service, backend, words(events), wire)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_hold_suspends_rtp_timeout(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    service = await start_service(sip_config(rtp_timeout_s=1.0, backend=backend))
    speech_pcap(tmp_path, SENTENCES[3])
    async with aiohttp.ClientSession() as http, http.ws_connect(events_url(service)) as ws:
        # 2.5 s on hold without RTP, more than twice the timeout
        result = await sipp(service, tmp_path, "-m", "1", "-d", "2500", scenario="uac_hold.xml")
        events = await events_until_ended(ws)
    assert result.returncode == 0, result.errors + result.stdout
    assert events[-1]["reason"] == "remote hangup"


async def rejected(
    service: Service, cwd: Path, code: int, formats: str = "0 101", check: str = ""
) -> None:
    """sipp offers `formats`; the call must be refused with `code` (and pass `check`)."""
    scenario = cwd / f"uac_rejected_{code}.xml"
    template = (SCENARIOS / "uac_rejected.xml").read_text()
    final = f'<recv response="{code}">{check}</recv>' if check else f'<recv response="{code}"/>'
    if "assign_to" in check:
        final += '<Reference variables="checked"/>'
    scenario.write_text(template.replace("@FINAL@", final))
    result = await sipp(service, cwd, "-sf", str(scenario), "-key", "formats", formats, "-m", "1")
    assert result.returncode == 0, f"{code}: {result.errors}{result.stdout}"


RETRY_AFTER_30 = (
    '<action><ereg regexp="^ *30" search_in="hdr" header="Retry-After:" check_it="true"'
    ' assign_to="checked"/></action>'
)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_busy_no_codec_and_draining(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    service = await start_service(
        sip_config({"capacity": 1}, allow=("127.0.0.0/8",), backend=backend, retry_after_s=30)
    )
    await rejected(service, tmp_path, 488, "18 101")  # G.729 only
    await rejected(service, tmp_path, 488, "9")  # G.722 only
    busy = service.bridge.hub.open_call("test", call_id="holds-the-only-slot")
    await rejected(service, tmp_path, 486)
    await busy.end()
    assert service.bridge.engine.free_slots == 1
    await service.bridge.hub.drain(0)  # what SIGTERM does first: no new calls
    await rejected(service, tmp_path, 503, check=RETRY_AFTER_30)
    assert not service.bridge.hub.calls


@pytest.mark.parametrize("backend", BACKENDS)
async def test_source_outside_allow_list_gets_403(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    service = await start_service(
        sip_config(allow=("10.0.0.0/8", "192.168.0.0/16"), backend=backend)
    )
    await rejected(service, tmp_path, 403)
    assert not service.bridge.hub.calls
    assert service.bridge.engine.free_slots == service.bridge.engine.capacity


def sip_request(port: int, text: str, wait_s: float = 2.0) -> str:
    """Send one datagram; the final response to it, or "" if none came within wait_s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(wait_s)
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
        s.sendto(text.replace("LOCALPORT", str(local)).encode(), ("127.0.0.1", port))
        while True:  # the final response, past any 100 Trying
            try:
                reply = s.recv(4096).decode(errors="replace")
            except TimeoutError:
                return ""
            if not reply.startswith("SIP/2.0 1"):
                return reply


HEADERS = (
    "Via: SIP/2.0/UDP 127.0.0.1:LOCALPORT;branch=z9hG4bK-{n}\r\n"
    "From: <sip:t@127.0.0.1>;tag=a{n}\r\nTo: <sip:bridge@127.0.0.1>\r\n"
    "Call-ID: bad-{n}@127.0.0.1\r\n"
)


MALFORMED = {
    "cseq-not-a-number": "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n"
    + HEADERS
    + "CSeq: one INVITE\r\n\r\n",
    "cseq-method": "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n" + HEADERS + "CSeq: 1 BYE\r\n\r\n",
    "no-call-id": "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n"
    + HEADERS.split("Call-ID")[0]
    + "CSeq: 1 INVITE\r\n\r\n",
    "short-body": "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n" + HEADERS + "CSeq: 1 INVITE\r\n"
    "Content-Type: application/sdp\r\nContent-Length: 400\r\n\r\nv=0\r\n",
    "bad-sdp": "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\n" + HEADERS + "CSeq: 1 INVITE\r\n"
    "Content-Type: application/sdp\r\nContent-Length: 9\r\n\r\nnot sdp\r\n",
    "no-version": "NONSENSE\r\n" + HEADERS + "CSeq: 1 INVITE\r\n\r\n",
}
# PJSIP discards, unanswered, what its parser rejects outright; it answers 400 to the rest.
# Our asyncio backend answers 400 to all of them (echoing the headers it could read).
PJSIP_DISCARDS = {"cseq-not-a-number", "no-call-id", "no-version"}


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("backend", BACKENDS)
async def test_malformed_requests_get_400_and_spare_the_service(
    start_service: ServiceFactory, tmp_path: Path, case: str, backend: str
) -> None:
    service = await start_service(sip_config(backend=backend))
    port = service.ports["sip"]
    request_text = MALFORMED[case]
    reply = await asyncio.to_thread(sip_request, port, request_text.replace("{n}", "1"))
    if backend == "pjsua2" and case in PJSIP_DISCARDS:
        assert reply == "", reply
    else:
        assert reply.startswith("SIP/2.0 400"), reply
        assert "bad-1@127.0.0.1" in reply or "Call-ID" not in request_text
    options = await sipp(service, tmp_path, "-m", "1", scenario="uac_options.xml")
    assert options.returncode == 0, options.errors + options.stdout
    assert not service.bridge.hub.calls


async def sip_info(service: Service) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/info") as response:
            info: dict[str, Any] = (await response.json())["sip"]
    return info


@pytest.mark.solo
async def test_pjsua2_carries_its_cap_and_refuses_one_more(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = await start_service(sip_config({"name": "sink", "capacity": 10}, backend="pjsua2"))
    info = await sip_info(service)
    assert info["backend"] == "pjsua2" and info["call_cap"] == 4 and info["siprec"] is False
    holding = asyncio.create_task(
        sipp(service, tmp_path, "-sn", "uac", "-m", "4", "-l", "4", "-r", "4", "-d", "4000")
    )
    for _ in range(50):  # until the four calls are up
        await asyncio.sleep(0.1)
        if len(service.bridge.hub.calls) == 4:
            break
    assert len(service.bridge.hub.calls) == 4
    await rejected(service, tmp_path, 486, "0")  # the fifth call
    held = await holding
    assert held.returncode == 0, held.errors + held.stdout


@pytest.mark.solo
async def test_pjsua2_agent_failure_ends_only_its_calls_and_a_new_agent_answers(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    """PJSIP runs in an agent process: killed mid-call (as a fault in C would), its call ends
    with the words it had stored, other calls carry on, and a new agent takes the port."""
    service = await start_service(sip_config(backend="pjsua2"))
    assert "pjsua2" not in sys.modules  # the service's process never loads PJSIP
    first = await sip_info(service)
    assert first["agent_pid"] and first["agent_restarts"] == 0
    speech_pcap(tmp_path, SENTENCES[1])
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(events_url(service)) as ws,
        http.ws_connect(f"ws://127.0.0.1:{service.ports['audio']}/v1/stream") as other,
    ):
        await other.send_bytes(phone_bytes(SENTENCES[0], "mulaw", 8000)[:8000])  # a WS call
        call = asyncio.create_task(
            sipp(service, tmp_path, "-m", "1", "-d", "30000", scenario="uac_pcmu.xml")
        )
        events: list[dict[str, Any]] = []
        sip_call_id = None
        while True:  # until the SIP call's first utterance is out
            event = await asyncio.wait_for(ws.receive_json(), 30)
            events.append(event)
            if event["type"] == "call_started" and event["front_end"] == "sip":
                sip_call_id = event["call_id"]
            if event["type"] == "word" and event["call_id"] == sip_call_id:
                break
        os.kill(first["agent_pid"], signal.SIGKILL)
        events += await events_until_ended(ws)
        call.cancel()  # sipp waits for a BYE that no one is left to send: end it
        with pytest.raises(asyncio.CancelledError):
            await call
        ended = events[-1]
        assert ended["type"] == "call_ended" and ended["call_id"] == sip_call_id
        assert ended["reason"] == "sip agent failed"
        assert not other.closed and len(service.bridge.hub.calls) == 1  # the WS call lives on
        url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/{sip_call_id}/transcript"
        for _ in range(100):  # the store writes in batches: until the end is written
            async with http.get(url, params={"format": "json"}) as response:
                stored = await response.json()
            if stored["call"]["status"] != "live":
                break
            await asyncio.sleep(0.1)
    heard = [w["text"] for w in words(events, sip_call_id)]
    assert stored["call"]["status"] == "ended" and stored["call"]["reason"] == "sip agent failed"
    assert heard and [w["text"] for w in stored["words"]] == heard, stored
    for _ in range(100):  # until the new agent is up
        again = await sip_info(service)
        if again["agent_restarts"] == 1 and again["agent_pid"] not in (None, first["agent_pid"]):
            break
        await asyncio.sleep(0.1)
    assert again["agent_restarts"] == 1 and again["agent_pid"] != first["agent_pid"]
    options = await sipp(service, tmp_path, "-m", "1", scenario="uac_options.xml")
    assert options.returncode == 0, options.errors + options.stdout


@pytest.mark.solo
async def test_pjsua2_agent_lives_through_call_after_call(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    """40 short calls, four at a time, each hung up by the caller: the agent survives every
    teardown and every call ends (a media port freed at a call's end crashed the agent now and
    then; a call object freed late hung up the next call on its pjsua id, which never ended)."""
    service = await start_service(sip_config({"name": "sink", "capacity": 10}, backend="pjsua2"))
    async with watch_events(service) as log:
        result = await sipp(
            service, tmp_path, "-sn", "uac", "-m", "40", "-l", "4", "-r", "20", "-d", "300"
        )
        ended = await log.wait_ended(40)
    assert result.returncode == 0, result.errors + result.stdout
    assert {e["reason"] for e in ended.values()} == {"remote hangup"}
    assert (await sip_info(service))["agent_restarts"] == 0


def with_outcome(cwd: Path, scenario: str, outcome: str, **fill: str) -> Path:
    """A scenario whose @OUTCOME@ is the steps in file `outcome` (both under tests/e2e/sipp)
    and whose other @NAME@ placeholders are `fill`'s values."""
    target = cwd / f"{Path(scenario).stem}_{Path(outcome).stem}.xml"
    text = (SCENARIOS / scenario).read_text()
    for name, value in {"OUTCOME": (SCENARIOS / outcome).read_text(), **fill}.items():
        text = text.replace(f"@{name}@", value)
    target.write_text(text)
    return target


@pytest.mark.parametrize("backend", BACKENDS)
async def test_digest_challenge_admits_the_right_password_only(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    service = await start_service(
        sip_config(backend=backend, auth_user="pbx", auth_password="s3cret")
    )

    async def call(outcome: str, password: str) -> None:
        scenario = with_outcome(tmp_path, "uac_auth.xml", outcome)
        result = await sipp(
            service, tmp_path, "-sf", str(scenario), "-au", "pbx", "-ap", password, "-m", "1",
            "-d", "300",
        )  # fmt: skip
        assert result.returncode == 0, f"{outcome}: {result.errors}{result.stdout}"

    async with watch_events(service) as log:
        await call("auth_answered.xml", "s3cret")  # 401, then the answer to it: 200
        await log.wait_ended(1)
        await call("auth_refused.xml", "wrong")  # 401, then a wrong answer: 403
    ended = list(log.ended().values())
    assert [e["reason"] for e in ended] == ["remote hangup"]  # only the first call was taken
    assert [e["type"] for e in log.events].count("call_started") == 1
    assert not service.bridge.hub.calls


@pytest.mark.parametrize("backend", BACKENDS)
async def test_registers_with_digest_and_refreshes(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    """sipp as the PBX's registrar: 401, the digest answer, 200, then the refresh in 2.5 s."""
    port = free_port()
    # aiosipua refreshes at 90 % of the grant; PJSIP 5 s before it ends, but never sooner
    # than 5 s after the last REGISTER (PJSIP_REGISTER_CLIENT_DELAY_BEFORE_REFRESH).
    grant, due = ("2", 2.5) if backend == "asyncio" else ("6", 6.0)
    registrar = asyncio.create_task(
        sipp_server(
            tmp_path,
            "uas_register.xml",
            port,
            "-key",
            "expires",
            grant,
            fill={"REFRESH_MS": str(int(due * 1000))},
        )
    )
    await asyncio.sleep(0.3)  # sipp is listening
    config = sip_config(
        backend=backend,
        register_uri=f"sip:127.0.0.1:{port}",
        register_user="ext100",
        register_password="s3cret",
        register_expires_s=60,  # asked for; the refresh follows what the registrar grants
    )
    await start_service(config)
    result = await registrar
    assert result.returncode == 0, result.errors + result.stdout


async def test_siprec_two_parties_become_two_labelled_legs(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = await start_service(sip_config())
    alice, bob = phone_bytes(SENTENCES[0], "mulaw"), phone_bytes(SENTENCES[5], "mulaw")
    longest_ms = max(len(alice), len(bob)) // 8
    scenario = with_outcome(
        tmp_path, "uac_siprec.xml", "siprec_answered.xml", REQUIRE="Require: siprec"
    )
    async with watch_events(service) as log:
        src = asyncio.create_task(
            sipp(service, tmp_path, "-sf", str(scenario), "-m", "1", "-d", str(longest_ms + 800))
        )
        ports_file = tmp_path / "answer_ports"
        async with asyncio.timeout(10):
            while not ports_file.exists():
                await asyncio.sleep(0.05)
        first, second = (int(p) for p in ports_file.read_text().split())
        await asyncio.gather(send_rtp(first, alice, ssrc=1), send_rtp(second, bob, ssrc=2))
        result = await src
        ended = await log.wait_ended(1)
    assert result.returncode == 0, result.errors + result.stdout
    (call_id,) = ended
    started = log.of(call_id)[0]
    assert started["legs"] == ["caller", "callee"]
    assert started["labels"]["siprec"] == "true"
    assert started["labels"]["caller_participant"] == "sip:alice@example.com"
    assert started["labels"]["callee_participant"] == "sip:bob@example.com"
    for leg, wire in (("caller", alice), ("callee", bob)):
        assert ended[call_id]["audio_s"][leg] == pytest.approx(len(wire) / 8000, abs=0.03)
        offline = await offline_words(service, ulaw_decode(wire), 8000)
        assert log.words(call_id, leg) == offline, leg
        assert offline


@pytest.mark.solo
async def test_pjsua2_refuses_siprec_with_488(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    service = await start_service(sip_config(backend="pjsua2"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/info") as response:
            info = (await response.json())["sip"]
    assert info["siprec"] is False and any("SIPREC" in note for note in info["notes"])
    # RFC 7866 makes an SRC send "Require: siprec": PJSIP itself refuses that with 420 Bad
    # Extension (RFC 3261 8.2.2.3); a recording INVITE without it reaches us and gets 488.
    for code, require in (("420", "Require: siprec"), ("488", "X-Recording: yes")):
        scenario = with_outcome(
            tmp_path, "uac_siprec.xml", "siprec_refused.xml", REQUIRE=require, CODE=code
        )
        result = await sipp(service, tmp_path, "-sf", str(scenario), "-m", "1")
        assert result.returncode == 0, f"{code}: {result.errors}{result.stdout}"
    assert not service.bridge.hub.calls


@pytest.mark.parametrize("backend", BACKENDS)
async def test_baresip_places_a_call_and_hangs_up(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    """A second, independent SIP stack: baresip dials, speaks a sentence, hangs up (BYE)."""
    service = await start_service(sip_config(backend=backend))
    wire = caller_speech(SENTENCES[1])
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, ulaw_decode(wire), 8000, subtype="PCM_16")
    caller = Baresip(tmp_path, wav)
    async with watch_events(service) as log:
        await caller.dial(f"sip:service@127.0.0.1:{service.ports['sip']}")
        try:
            ended = await log.wait_ended(1, timeout=30)
        except TimeoutError:
            raise AssertionError(
                f"the call did not end; baresip said:\n{await caller.stop()}"
            ) from None
        finally:
            output = await caller.stop()
    (call_id,) = ended
    started = log.of(call_id)[0]
    assert "baresip" in started["labels"]["from"], output
    assert ended[call_id]["reason"] == "remote hangup", output  # baresip's BYE
    assert ended[call_id]["audio_s"]["caller"] >= len(wire) / 8000 - 0.1
    # baresip's RTP carries the file sample for sample: the words of the offline transcript.
    offline = await offline_words(service, heard(backend, wire), 8000)
    if backend == "asyncio":
        assert texts(log.words(call_id)) == texts(offline)
    else:
        assert log.words(call_id) == offline
    text = " ".join(texts(offline))
    assert word_error_rate(SENTENCES[1], text) <= PHONE_WER_BOUND, text


async def impaired_call(
    service: Service, cwd: Path, wire: bytes, **impairments: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One sipp call sending `wire` as μ-law RTP through the network impairments of
    write_rtp_pcap (lost, swapped, held packets): its call_ended event and its words."""
    write_rtp_pcap(sipp_dir(cwd) / "pcap" / "speech.pcap", wire, payload_type=0, **impairments)
    async with watch_events(service) as log:
        result = await sipp(
            service, cwd, "-m", "1", "-d", str(len(wire) // 8 + 500), scenario="uac_pcmu.xml"
        )
        ended = await log.wait_ended(1)
    assert result.returncode == 0, result.errors + result.stdout
    ((call_id, end),) = ended.items()
    return end, log.words(call_id)


async def test_lost_packets_leave_silence_and_later_words_in_place(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    """200 ms burst loss, two single losses and two reordered pairs on the wire: the leg's
    audio is the caller's with silence where packets were lost, as long as sent, so every
    word keeps its time (a receiver that closed the gaps would move later words earlier)."""
    service = await start_service(sip_config())
    wire = phone_bytes(SENTENCES[4], "mulaw")
    lost = frozenset({*range(40, 50), 90, 130})
    ended, got = await impaired_call(
        service, tmp_path, wire, lost=lost, swapped=frozenset({70, 110})
    )
    assert ended["audio_s"]["caller"] == pytest.approx(len(wire) / 8000, abs=0.01)
    heard = ulaw_decode(wire).copy()
    for n in lost:
        heard[n * 160 : (n + 1) * 160] = 0
    offline = await offline_words(service, heard, 8000)
    assert offline and got == offline


@pytest.mark.parametrize("backend", BACKENDS)
async def test_network_jitter_keeps_later_words_in_place(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    """The network stalls for 140 ms mid-sentence, then the held packets arrive in one burst:
    no audio is lost and no silence is inserted, so every later word keeps its time. (With
    PJSIP's playback defaults, a 100 ms stall moved every later word ~0.1 s late.)"""
    service = await start_service(sip_config(backend=backend))
    wire = caller_speech(SENTENCES[1])
    _, got = await impaired_call(service, tmp_path, wire, held=range(65, 72))  # "check the"
    await assert_offline_words(service, backend, got, wire)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_tcp_options_and_call(
    start_service: ServiceFactory, tmp_path: Path, backend: str
) -> None:
    """SIP over TCP on the same port (INVITEs too large for one datagram, some PBXs)."""
    service = await start_service(sip_config({"name": "sink"}, backend=backend))
    options = await sipp(service, tmp_path, "-t", "t1", "-m", "1", scenario="uac_options.xml")
    assert options.returncode == 0, options.errors + options.stdout
    async with watch_events(service) as log:
        call = await sipp(service, tmp_path, "-t", "t1", "-sn", "uac", "-m", "1", "-d", "500")
        ended = await log.wait_ended(1)
    assert call.returncode == 0, call.errors + call.stdout
    assert [e["reason"] for e in ended.values()] == ["remote hangup"]


async def test_one_rtp_port_serves_call_after_call_whatever_ended_them(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    """The RTP range holds a single even port: each way a call ends (CANCEL, the caller's
    BYE, our BYE at max call length, a 486) must give it back, or the next call gets 503."""
    low = free_port() & ~1
    service = await start_service(
        sip_config(
            {"capacity": 1},
            rtp_port_min=low,
            rtp_port_max=low + 1,
            answer_delay_s=0.5,
            max_call_s=2.0,
        )
    )
    async with watch_events(service) as log:
        cancel = await sipp(service, tmp_path, "-m", "1", scenario="uac_cancel.xml")
        assert cancel.returncode == 0, cancel.errors + cancel.stdout
        for _ in range(2):  # the caller hangs up
            call = await sipp(service, tmp_path, "-sn", "uac", "-m", "1", "-d", "200")
            assert call.returncode == 0, call.errors + call.stdout
        speech_pcap(tmp_path, SENTENCES[3])
        ours = await sipp(service, tmp_path, "-m", "1", scenario="uac_wait_bye.xml")
        assert ours.returncode == 0, ours.errors + ours.stdout  # our BYE at max call length
        await log.wait_ended(4)  # its transcript flushed: the engine slot is free again
        busy = service.bridge.hub.open_call("test", call_id="holds-the-only-slot")
        await rejected(service, tmp_path, 486)
        await busy.end()
        last = await sipp(service, tmp_path, "-sn", "uac", "-m", "1", "-d", "200")
        assert last.returncode == 0, last.errors + last.stdout
        ended = await log.wait_ended(6)  # five SIP calls and the one holding the slot
    reasons = sorted(e["reason"] for e in ended.values() if e["front_end"] == "sip")
    assert reasons == ["cancelled", "max call length", *["remote hangup"] * 3]
