"""Genesys AudioHook end to end: a faithful client (tests/e2e/audiohook_peer.py) sends real
speech through PCMU over a loopback socket; the Transcription Connector's events are checked
field by field against ../shared/protocols/audiohook.md, words against the offline transcript."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import re
import time
import uuid
from typing import Any

import aiohttp
import numpy as np

from api.app import Service
from api.config import ApiConfig
from telephony.audio import ulaw_decode
from telephony.audiohook import AudioHookConfig
from tests.conftest import ServiceFactory, make_config
from tests.e2e.audiohook_peer import FRAME_S, media, session, signed_headers
from tests.e2e.frontends import offline_words, paced, watch_events
from tests.speech import SENTENCES, phone_bytes

KEY = "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh"  # the shape of Genesys's example key
SECRET = b"MySuperSecretKeyTellNo-1!2@3#4$5"
ORG = "d7934305-0972-4844-938e-9060eef73d05"
DURATION = re.compile(r"^PT(?:\d*\.)?\d+S$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ULAW_SILENCE = b"\xff"


async def audiohook_service(start_service: ServiceFactory) -> Service:
    config = dataclasses.replace(
        make_config(),
        api=ApiConfig(keys=(KEY, "other-key")),
        audiohook=AudioHookConfig(client_secrets=(f"{KEY}:{base64.b64encode(SECRET).decode()}",)),
    )
    return await start_service(config)


def url_of(service: Service) -> str:
    return f"ws://127.0.0.1:{service.ports['audio']}/audiohook"


def seconds(value: str) -> float:
    assert DURATION.match(value), value
    return float(value[2:-1])


def check_transcript(data: dict[str, Any], channel_id: int) -> list[dict[str, Any]]:
    """Every field the note names, with its type and range; the words as the tokens give them."""
    assert UUID.match(data["id"])
    assert data["channelId"] == channel_id and data["isFinal"] is True
    offset, length = seconds(data["offset"]), seconds(data["duration"])
    (alternative,) = data["alternatives"]
    assert 0 <= alternative["confidence"] <= 1
    (interpretation,) = alternative["interpretations"]
    assert interpretation["type"] == "display"
    tokens = interpretation["tokens"]
    assert interpretation["transcript"] == " ".join(t["value"] for t in tokens)
    starts = [seconds(t["offset"]) for t in tokens]
    assert len(set(starts)) == len(starts)  # token offsets are unique
    for token in tokens:
        assert token["type"] == "word" and 0 <= token["confidence"] <= 1
    assert starts[0] == offset
    end = starts[-1] + seconds(tokens[-1]["duration"])
    assert abs(offset + length - end) < 0.002
    return [
        {
            "text": t["value"],
            "start": seconds(t["offset"]),
            "end": round(s + seconds(t["duration"]), 3),
        }
        for t, s in zip(tokens, starts, strict=True)
    ]


def frames(wire: bytes, channels: int = 1) -> list[bytes]:
    size = int(8000 * FRAME_S) * channels
    return [wire[i : i + size] for i in range(0, len(wire), size)]


def phrase_gaps_ok(transcripts: list[dict[str, Any]]) -> None:
    """One event per phrase: within an event no pause of 0.4 s, between two events one."""
    for data in transcripts:
        tokens = data["alternatives"][0]["interpretations"][0]["tokens"]
        for before, after in itertools.pairwise(tokens):
            gap = seconds(after["offset"]) - seconds(before["offset"]) - seconds(before["duration"])
            assert gap < 0.4


async def test_mono_session_transcribed_with_connector_events(
    start_service: ServiceFactory,
) -> None:
    service = await audiohook_service(start_service)
    wire = phone_bytes(SENTENCES[1], "mulaw", 8000)
    conversation, participant = str(uuid.uuid4()), str(uuid.uuid4())
    async with (
        watch_events(service, {"Authorization": f"Bearer {KEY}"}) as events,
        session(url_of(service), KEY, SECRET, ORG) as peer,
    ):
        opened = await peer.open(
            ORG,
            [media("external", fmt="L24"), media("external")],
            custom_config={"queue": "billing", "priority": 2},
            supported_languages=True,
            conversation_id=conversation,
            participant_id=participant,
        )
        # The first offered format we take: PCMU mono (L24 is not AudioHook's).
        assert opened["parameters"]["media"] == [media("external")]
        assert opened["parameters"]["supportedLanguages"] == ["en-US"]
        assert (opened["seq"], opened["clientseq"]) == (1, 1)
        await peer.send("ping", {})
        pong = await peer.wait_for("pong")
        assert (pong["seq"], pong["clientseq"]) == (2, 2)
        async for frame in paced(frames(wire), FRAME_S):
            await peer.audio(frame)
        closed = await peer.close()
        assert closed["parameters"] == {} and closed["clientseq"] == peer.seq
        assert closed["seq"] == peer.serverseq  # every event came before it
        await events.wait_ended(1)
    expected = await offline_words(service, ulaw_decode(wire).astype(np.int16), 8000)
    assert expected and events.words(peer.id, "external") == expected
    transcripts = peer.transcripts()
    words = [w for data in transcripts for w in check_transcript(data, 0)]
    assert words == expected
    phrase_gaps_ok(transcripts)
    started = events.of(peer.id)[0]
    assert started["front_end"] == "audiohook" and started["legs"] == ["external"]
    labels = started["labels"]
    assert (labels["organization_id"], labels["conversation_id"]) == (ORG, conversation)
    assert labels["participant_id"] == participant and labels["session_id"] == peer.id
    assert (labels["queue"], labels["priority"]) == ("billing", "2")
    assert events.ended()[peer.id]["reason"] == "close: end"


async def test_stereo_session_gives_customer_and_agent_legs(start_service: ServiceFactory) -> None:
    service = await audiohook_service(start_service)
    customer = phone_bytes(SENTENCES[3], "mulaw", 8000)
    agent = phone_bytes(SENTENCES[5], "mulaw", 8000)
    length = max(len(customer), len(agent))
    customer, agent = customer.ljust(length, ULAW_SILENCE), agent.ljust(length, ULAW_SILENCE)
    # Offered agent first: channel 0 is then `internal`, and the frames interleave that way.
    wire = bytes(np.stack([np.frombuffer(agent, np.uint8), np.frombuffer(customer, np.uint8)], 1))
    async with (
        watch_events(service, {"Authorization": f"Bearer {KEY}"}) as events,
        session(url_of(service), KEY, SECRET, ORG) as peer,
    ):
        offer = [media("internal", "external"), media("external")]
        opened = await peer.open(ORG, offer)
        assert opened["parameters"]["media"] == [offer[0]]
        async for frame in paced(frames(wire, 2), FRAME_S):
            await peer.audio(frame, channels=2)
        await peer.close()
        await events.wait_ended(1)
    by_channel: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for data in peer.transcripts():
        by_channel[data["channelId"]] += check_transcript(data, data["channelId"])
    for channel, leg, audio in ((0, "internal", agent), (1, "external", customer)):
        expected = await offline_words(service, ulaw_decode(audio).astype(np.int16), 8000)
        assert expected and events.words(peer.id, leg) == expected
        assert by_channel[channel] == expected
    assert events.of(peer.id)[0]["legs"] == ["internal", "external"]


async def test_pause_excludes_audio_from_positions_and_cuts_the_phrase(
    start_service: ServiceFactory,
) -> None:
    """Genesys sends nothing while paused; positions (and so event offsets) count only what it
    sent, and the phrase open at the pause ends there."""
    service = await audiohook_service(start_service)
    first = phone_bytes(SENTENCES[4], "mulaw", 8000)
    second = phone_bytes(SENTENCES[1], "mulaw", 8000)
    # Cut mid-sentence, on a frame boundary: the speech runs on across the pause.
    cut = (len(first) // 2) // 1600 * 1600
    async with session(url_of(service), KEY, SECRET, ORG) as peer:
        await peer.open(ORG, [media("external")])
        async for frame in paced(frames(first[:cut]), FRAME_S):
            await peer.audio(frame)
        await peer.send("paused", {})
        await asyncio.sleep(1.0)  # paused: the client sends no audio
        await peer.send("resumed", {"start": f"PT{cut / 8000}S", "discarded": "PT1.0S"})
        async for frame in paced(frames(first[cut:] + second), FRAME_S):
            await peer.audio(frame)
        await peer.close()
    words = [check_transcript(d, 0) for d in peer.transcripts()]
    cut_s = cut / 8000
    # No phrase spans the pause: every event ends before it or starts at/after a word there.
    for phrase in words:
        assert phrase[-1]["start"] < cut_s or phrase[0]["start"] >= cut_s - 0.3
    # Positions exclude the paused second: the last word ends within the audio sent.
    sent_s = (len(first) + len(second)) / 8000
    assert 0 < words[-1][-1]["end"] <= sent_s
    assert words[-1][-1]["end"] > sent_s - 1.5


async def test_bad_stale_or_missing_signature_is_refused(start_service: ServiceFactory) -> None:
    service = await audiohook_service(start_service)
    url = url_of(service)
    sid = str(uuid.uuid4())
    cases = {
        "wrong secret": signed_headers(url, KEY, b"not the secret", ORG, sid, str(uuid.uuid4())),
        "stale": signed_headers(
            url, KEY, SECRET, ORG, sid, str(uuid.uuid4()), created=int(time.time()) - 60
        ),
        "missing": signed_headers(url, KEY, None, ORG, sid, str(uuid.uuid4())),
    }
    tampered = signed_headers(url, KEY, SECRET, ORG, sid, str(uuid.uuid4()))
    tampered["Audiohook-Organization-Id"] = str(uuid.uuid4())
    cases["tampered header"] = tampered
    async with aiohttp.ClientSession() as http:
        for name, headers in cases.items():
            began = time.monotonic()
            try:
                await http.ws_connect(url, headers=headers)
                raise AssertionError(f"{name}: upgrade accepted")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 401, name
            assert time.monotonic() - began >= 0.45, name  # no faster than upstream's 500 ms
        # A key [api] does not know never reaches the signature check.
        unknown = signed_headers(url, "nobody", SECRET, ORG, sid, str(uuid.uuid4()))
        try:
            await http.ws_connect(url, headers=unknown)
            raise AssertionError("unknown key accepted")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 401
    # Signed right, but the open names another organization than the header: unauthorized.
    async with session(url, KEY, SECRET, ORG) as peer:
        await peer.send(
            "open",
            {
                "organizationId": str(uuid.uuid4()),
                "conversationId": str(uuid.uuid4()),
                "participant": {"id": str(uuid.uuid4())},
                "media": [media("external")],
            },
        )
        disconnect = await peer.wait_for("disconnect", timeout=5)
        assert disconnect["parameters"]["reason"] == "unauthorized"
        closed = await peer.close()
        assert closed["seq"] == 2
    # A key with no client secret: unsigned is accepted (the reference server's convention).
    async with session(url, "other-key", None, ORG) as peer:
        opened = await peer.open(ORG, [media("external")])
        assert opened["parameters"]["media"] == [media("external")]
        await peer.close()


async def test_protocol_errors_get_disconnect_and_leave_another_session_alone(
    start_service: ServiceFactory,
) -> None:
    service = await audiohook_service(start_service)
    url = url_of(service)
    async with session(url, KEY, SECRET, ORG) as good, session(url, KEY, SECRET, ORG) as bad:
        await good.open(ORG, [media("external")])
        await bad.open(ORG, [media("external")])
        await bad.send("paused", {})
        await bad.audio(b"\xff" * 1600)  # audio while paused: upstream signals an error
        disconnect = await bad.wait_for("disconnect", timeout=5)
        assert disconnect["parameters"]["reason"] == "error"
        assert "PAUSED" in disconnect["parameters"]["info"]
        await bad.close()
        await good.send("ping", {})
        await good.wait_for("pong")
        # A seq that skips one is an error too.
        good.seq += 1
        await good.send("ping", {})
        disconnect = await good.wait_for("disconnect", timeout=5)
        assert "seq" in disconnect["parameters"]["info"]
        good.seq = 2  # the server still counts from the last good message
        await good.close()


async def test_redaction_applies_to_connector_events(start_service: ServiceFactory) -> None:
    """customConfig `redact` adds kinds as a stream's redact= does: the account number never
    reaches Genesys, the words around it do."""
    service = await audiohook_service(start_service)
    wire = phone_bytes(SENTENCES[2], "mulaw", 8000)  # "... account number is four five six seven"
    async with session(url_of(service), KEY, SECRET, ORG) as peer:
        await peer.open(ORG, [media("external")], custom_config={"redact": "numbers"})
        async for frame in paced(frames(wire), FRAME_S):
            await peer.audio(frame)
        await peer.close()
    spoken = [w["text"] for d in peer.transcripts() for w in check_transcript(d, 0)]
    said = " ".join(spoken).lower()
    assert "account" in said and "bill" in said, said
    assert not re.search(r"\d|\bfour\b|\bfive\b|\bsix\b|\bseven\b", said), said
