"""Every state a caller can leave a SIP dialog in ends by a timer: the call ends, its engine slot
and its RTP port come back, and the words spoken before are stored.

A hand-written caller (tests/e2e/sip_caller.py) over real loopback UDP or TCP stops in each
state: silent while it rings, gone after 100 Trying, a 200 never ACKed (with and without RTP),
ACKed without RTP or with RTP that stops, its TCP connection closed at each point, a CANCEL while
it rings (487 never ACKed) or crossing our 200, gone while on hold, and challenged or refused
INVITEs never ACKed. Timers are short in each test's config (T1 = 50 ms: Timer H = 3.2 s), so
each runs in seconds. The RTP range holds one port and the engine one slot: the call placed
after each state proves both free.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import aiohttp
import pytest

from api.app import Service
from tests.conftest import ServiceFactory
from tests.e2e.frontends import EventLog, watch_events
from tests.e2e.sip_caller import Caller
from tests.e2e.sip_peers import free_port, send_rtp, sip_config
from tests.speech import SENTENCES, phone_bytes, word_error_rate

T1 = 0.05
TIMER_H = 64 * T1  # 3.2 s
PHONE_WER_BOUND = 0.05  # as tests/e2e/test_sip.py: hibari speech over μ-law, Moonshine
SILENCE = b"\xff" * 160  # one 20 ms μ-law packet of silence


async def start(start_service: ServiceFactory, words: bool = False, **sip: Any) -> Service:
    """One engine slot (Moonshine where words are checked), one RTP port, short SIP timers."""
    low = free_port() & ~1
    engine: dict[str, Any] = {"capacity": 1} if words else {"name": "sink", "capacity": 1}
    fields: dict[str, Any] = {"timer_t1_s": T1, "rtp_timeout_s": 5.0, **sip}
    config = sip_config(engine, rtp_port_min=low, rtp_port_max=low + 1, **fields)
    return await start_service(config)


async def info(service: Service) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/info") as response:
            found: dict[str, Any] = await response.json()
    return found


async def ended(log: EventLog, timeout_s: float) -> dict[str, Any]:
    """The one call's `call_ended` event, with `after_s`: seconds from now until it came."""
    begun = time.monotonic()
    (event,) = (await log.wait_ended(1, timeout_s)).values()
    return {**event, "after_s": time.monotonic() - begun}


async def assert_all_back(service: Service) -> None:
    """No call, dialog or RTP port held; the only slot and the only RTP port take a new call."""
    found = await info(service)
    assert found["calls_live"] == 0
    assert found["engine"]["free_slots"] == found["engine"]["capacity"] == 1
    assert found["sip"]["dialogs"] == 0 and found["sip"]["rtp_ports_in_use"] == 0, found["sip"]
    low = service.bridge.config.sip.rtp_port_min
    async with Caller(service.ports["sip"], "udp") as caller:
        caller.invite(free_port())
        answer = await caller.expect(200, "INVITE")
        assert answer.rtp_port == low
        caller.ack()
        caller.bye()
        await caller.expect(200, "BYE")


async def stored_text(service: Service, call_id: str) -> str:
    """The call's words as the store has them."""
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
    audio = f"http://127.0.0.1:{service.ports['audio']}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{audio}/v1/calls/{call_id}") as response:
            record = await response.json()
        async with http.get(f"{audio}/v1/calls/{call_id}/transcript") as response:
            transcript = await response.json()
    assert record["status"] == "ended", record
    return " ".join(w["text"] for w in transcript["words"])


async def speak(rtp_port: int, sentence: str, silence_s: float = 0.0) -> bytes:
    """The sentence as a phone sends it (20 ms RTP, real time), then `silence_s` of silence."""
    wire = SILENCE * 5 + phone_bytes(sentence, "mulaw", 8000)
    await send_rtp(rtp_port, wire + SILENCE * int(silence_s / 0.02))
    return wire


async def test_udp_caller_silent_through_ringing_and_our_200(
    start_service: ServiceFactory,
) -> None:
    """Rings, then our 200 is resent on T1 doubling and, never ACKed, ends after Timer H
    with a BYE."""
    service = await start(start_service, answer_delay_s=0.5)
    async with watch_events(service) as log, Caller(service.ports["sip"], "udp") as caller:
        caller.invite(free_port())
        await caller.expect(180, "INVITE")
        await caller.expect(200, "INVITE", timeout_s=2)
        answered = time.monotonic()
        _, before = await caller.until_bye(timeout_s=TIMER_H + 2)
        bye_after = time.monotonic() - answered
        event = await ended(log, 10)
    resent = [m for m in before if m.status == 200 and m.cseq_method == "INVITE"]
    assert len(resent) >= 5  # at 50, 150, 350, 750, 1550, 3150 ms
    assert TIMER_H - 0.1 <= bye_after <= TIMER_H + 1.5
    assert event["reason"] == "no ACK"
    await assert_all_back(service)


async def test_udp_invite_resent_before_our_answer_is_the_same_call(
    start_service: ServiceFactory,
) -> None:
    """A UDP caller that hears nothing within T1 sends its INVITE again (the same branch and
    CSeq); a loaded bridge reads both at once. It is one call: the copy is absorbed (a 100
    again, never a 482 that would make the caller drop the call we took), and the call is
    answered, talks and ends as any other. CI's loaded machine hit this with sipp's 30 calls."""
    service = await start(start_service, answer_delay_s=0.5)
    async with watch_events(service) as log, Caller(service.ports["sip"], "udp") as caller:
        caller.invite(free_port())
        caller.resend()  # before the bridge has read the first
        await caller.expect(180, "INVITE")
        caller.resend()  # while it rings
        await caller.expect(200, "INVITE")  # a final response before it fails `expect`
        caller.ack()
        await asyncio.sleep(0.3)
        caller.bye()
        await caller.expect(200, "BYE")
        event = await ended(log, 10)
    assert event["reason"] == "remote hangup"
    await assert_all_back(service)


async def test_tcp_caller_gone_while_ringing_ends_at_once(start_service: ServiceFactory) -> None:
    service = await start(start_service, answer_delay_s=3.0)
    async with watch_events(service) as log, Caller(service.ports["sip"], "tcp") as caller:
        caller.invite(free_port())
        await caller.expect(180, "INVITE")
        caller.close()
        event = await ended(log, 10)
    assert event["reason"] == "caller gone" and event["after_s"] < 2.0
    await assert_all_back(service)


async def test_tcp_caller_gone_right_after_trying(start_service: ServiceFactory) -> None:
    """The scanner's way (issue 27): the connection closes as soon as 100 Trying arrives."""
    service = await start(start_service, rtp_timeout_s=30.0)
    async with watch_events(service) as log, Caller(service.ports["sip"], "tcp") as caller:
        caller.invite(free_port())
        trying = await caller.receive()
        assert trying.status == 100
        caller.close()
        event = await ended(log, TIMER_H + 2)
    assert event["reason"] == "caller gone" and event["after_s"] < 2.0
    await assert_all_back(service)


@pytest.mark.solo  # PJSIP's media clock must tick on time (as every pjsua2 test)
async def test_pjsua2_ends_the_scanners_call_by_its_rtp_timeout(
    start_service: ServiceFactory,
) -> None:
    """PJSIP answers whatever the caller's connection does; no RTP ever comes."""
    service = await start(start_service, backend="pjsua2", rtp_timeout_s=1.0)
    async with watch_events(service) as log, Caller(service.ports["sip"], "tcp") as caller:
        caller.invite(free_port())
        assert (await caller.receive()).status == 100
        caller.close()
        event = await ended(log, 10)
    assert event["reason"] == "rtp timeout"
    found = await info(service)
    assert found["calls_live"] == 0 and found["engine"]["free_slots"] == 1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_200_never_acked_while_rtp_flows_ends_at_timer_h_with_its_words(
    start_service: ServiceFactory, transport: Literal["udp", "tcp"]
) -> None:
    """RTP keeps coming (the RTP timeout never fires), the ACK never does: Timer H ends the
    call with a BYE on the caller's own transport; over TCP our 200 is sent once."""
    t1 = 0.1  # Timer H 6.4 s: the sentence is spoken before it
    service = await start(start_service, words=True, timer_t1_s=t1)
    async with watch_events(service) as log, Caller(service.ports["sip"], transport) as caller:
        caller.invite(free_port())
        answer = await caller.expect(200, "INVITE")
        talking = asyncio.create_task(speak(answer.rtp_port, SENTENCES[4], silence_s=10))
        try:
            _, before = await caller.until_bye(timeout_s=64 * t1 + 2)
        finally:
            talking.cancel()
        event = await ended(log, 10)
    resent = [m for m in before if m.status == 200]
    assert len(resent) >= 4 if transport == "udp" else resent == []
    assert event["reason"] == "no ACK"
    text = await stored_text(service, event["call_id"])
    assert word_error_rate(SENTENCES[4], text) <= PHONE_WER_BOUND, text
    await assert_all_back(service)


async def test_tcp_closed_after_our_200_before_the_ack_ends_at_once(
    start_service: ServiceFactory,
) -> None:
    """No ACK can come on a closed connection: the call ends without waiting for Timer H."""
    service = await start(start_service, rtp_timeout_s=30.0)
    async with watch_events(service) as log, Caller(service.ports["sip"], "tcp") as caller:
        caller.invite(free_port())
        await caller.expect(200, "INVITE")
        caller.close()
        event = await ended(log, TIMER_H + 2)
    assert event["reason"] == "caller gone" and event["after_s"] < 2.0
    await assert_all_back(service)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_acked_without_any_rtp(
    start_service: ServiceFactory, transport: Literal["udp", "tcp"]
) -> None:
    service = await start(start_service, rtp_timeout_s=1.0)
    async with watch_events(service) as log, Caller(service.ports["sip"], transport) as caller:
        caller.invite(free_port())
        await caller.expect(200, "INVITE")
        caller.ack()
        bye, _ = await caller.until_bye(timeout_s=3)
        event = await ended(log, 10)
    assert bye.method == "BYE" and event["reason"] == "rtp timeout"
    await assert_all_back(service)


@pytest.mark.parametrize("close_tcp", [False, True], ids=["udp", "tcp-closed-after-ack"])
async def test_rtp_that_stops_ends_the_call_with_its_words(
    start_service: ServiceFactory, close_tcp: bool
) -> None:
    """The caller talks, then vanishes without BYE (over TCP its connection closes right
    after the ACK: the BYE cannot be sent, the call ends all the same)."""
    service = await start(start_service, words=True, rtp_timeout_s=1.0)
    transport: Literal["udp", "tcp"] = "tcp" if close_tcp else "udp"
    async with watch_events(service) as log, Caller(service.ports["sip"], transport) as caller:
        caller.invite(free_port())
        answer = await caller.expect(200, "INVITE")
        caller.ack()
        if close_tcp:
            caller.close()
        await speak(answer.rtp_port, SENTENCES[3])
        silent = time.monotonic()
        if not close_tcp:  # over UDP our BYE arrives at the RTP timeout
            await caller.until_bye(timeout_s=5)
            assert 0.9 <= time.monotonic() - silent <= 3.0
        event = await ended(log, 20)
    assert event["reason"] == "rtp timeout"
    text = await stored_text(service, event["call_id"])
    assert word_error_rate(SENTENCES[3], text) <= PHONE_WER_BOUND, text
    await assert_all_back(service)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_cancel_while_ringing_and_487_never_acked(
    start_service: ServiceFactory, transport: Literal["udp", "tcp"]
) -> None:
    """The CANCEL ends the call at once; its 487 is never ACKed and nothing stays held (the
    answer delay passes without a 200)."""
    service = await start(start_service, answer_delay_s=1.0)
    async with watch_events(service) as log, Caller(service.ports["sip"], transport) as caller:
        caller.invite(free_port())
        await caller.expect(180, "INVITE")
        caller.cancel()
        await caller.expect(200, "CANCEL")
        await caller.expect(487, "INVITE")
        event = await ended(log, 10)
        await asyncio.sleep(1.5)  # past the answer delay
        assert caller.inbox.empty()  # no 200 after the 487
    assert event["reason"] == "cancelled"
    await assert_all_back(service)


@pytest.mark.parametrize("then", ["ack-and-bye", "gone"])
async def test_cancel_crossing_our_200(start_service: ServiceFactory, then: str) -> None:
    """RFC 3261 §9.2: the CANCEL gets its 200 and changes nothing; the caller's ACK and BYE
    end the call (its BYE is not refused with 481), or, if it vanishes, Timer H does."""
    service = await start(start_service, rtp_timeout_s=30.0)
    async with watch_events(service) as log, Caller(service.ports["sip"], "udp") as caller:
        caller.invite(free_port())
        await caller.expect(200, "INVITE")
        caller.cancel()
        await caller.expect(200, "CANCEL")
        assert (await info(service))["calls_live"] == 1
        if then == "ack-and-bye":
            caller.ack()
            caller.bye()
            await caller.expect(200, "BYE")
            event = await ended(log, 10)
            assert event["reason"] == "remote hangup"
        else:
            await caller.until_bye(timeout_s=TIMER_H + 2)
            event = await ended(log, 10)
            assert event["reason"] == "no ACK"
    await assert_all_back(service)


async def test_caller_gone_while_on_hold(start_service: ServiceFactory) -> None:
    """On hold no RTP is expected, so the RTP timeout is suspended; `hold_timeout_s` ends it."""
    service = await start(start_service, rtp_timeout_s=0.5, hold_timeout_s=2.0)
    async with watch_events(service) as log, Caller(service.ports["sip"], "udp") as caller:
        caller.invite(free_port())
        await caller.expect(200, "INVITE")
        caller.ack()
        caller.invite(free_port(), direction="inactive")  # re-INVITE: hold
        await caller.expect(200, "INVITE")
        caller.ack()
        held = time.monotonic()
        await caller.until_bye(timeout_s=4)
        on_hold_s = time.monotonic() - held
        event = await ended(log, 10)
    assert event["reason"] == "hold timeout" and 1.9 <= on_hold_s <= 3.5
    await assert_all_back(service)


async def test_200_to_a_reinvite_never_acked(start_service: ServiceFactory) -> None:
    """A re-INVITE's 200 is resent and waits for its ACK like the first (RFC 3261 §14.2)."""
    service = await start(start_service)
    async with watch_events(service) as log, Caller(service.ports["sip"], "udp") as caller:
        caller.invite(free_port())
        await caller.expect(200, "INVITE")
        caller.ack()
        caller.invite(free_port(), direction="inactive")
        await caller.expect(200, "INVITE")
        reinvited = time.monotonic()
        _, before = await caller.until_bye(timeout_s=TIMER_H + 2)
        bye_after = time.monotonic() - reinvited
        event = await ended(log, 10)
    assert [m.status for m in before] == [200] * len(before) and len(before) >= 5
    assert event["reason"] == "no ACK" and TIMER_H - 0.1 <= bye_after <= TIMER_H + 1.5
    await assert_all_back(service)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("status", [401, 486])
async def test_challenged_or_refused_invite_never_acked_leaves_no_dialog(
    start_service: ServiceFactory, status: int, transport: Literal["udp", "tcp"]
) -> None:
    """A 401 challenge or a 486 that the caller never ACKs holds nothing: no slot, no port and
    no entry in the SIP library's table of calls (each scanner's probe would add one for good)."""
    auth: dict[str, Any] = (
        {"auth_user": "alice", "auth_password": "secret"} if status == 401 else {}
    )
    service = await start(start_service, **auth)
    busy = service.bridge.hub.open_call("test", call_id="holds-the-only-slot")
    if status == 401:
        await busy.end()  # the challenge comes first: the slot is free
    async with Caller(service.ports["sip"], transport) as caller:
        caller.invite(free_port())
        await caller.expect(status, "INVITE")
        await asyncio.sleep(0.2)
        sip = (await info(service))["sip"]
    assert sip["dialogs"] == 0 and sip["rtp_ports_in_use"] == 0, sip
    if status == 486:
        await busy.end()
        await assert_all_back(service)
