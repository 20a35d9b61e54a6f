"""Carriers' media streams end to end: a peer per carrier on a real loopback socket sends exactly
its carrier's messages (../shared/protocols/carriers.md) with real speech in its default codec,
beside a second connection that breaks the protocol."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import numpy as np

from api.app import Service
from api.config import ApiConfig, CarriersConfig
from telephony.audio import PcmArray, pcm16_decode, ulaw_decode
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import offline_words, paced, watch_events
from tests.speech import SENTENCES, phone_bytes

Frame = str | bytes
TICKET = "T4411"


def text(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Peer:
    """One carrier as the bridge sees it: its opening frames, one media frame per chunk and
    track, its DTMF message and its ending. `encoding` and `rate` are its default codec."""

    name: str
    path: str
    call_id: str
    encoding: str  # phone_bytes: "mulaw" or "pcm16"
    rate: int
    opening: list[Frame]
    media: Callable[[str, bytes, int], Frame]  # (track, chunk, ms since start) -> frame
    dtmf: Frame
    ending: list[Frame]
    bad: list[Frame]  # what a broken peer sends: refused with 1007
    tracks: tuple[str, ...] = ("inbound", "outbound")
    frame_ms: int = 20
    protocols: tuple[str, ...] = ()
    query: str = ""
    stereo: bool = False  # one frame carries both tracks, interleaved (jambonz)
    end_reason: str = "stop"
    labels: dict[str, str] = field(default_factory=dict)  # besides the custom `ticket`


def telnyx() -> Peer:
    sid, ccid = "6B1F2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D", "v3:Zq0mT1kXcA7d9vYQy2Jb3sR8uW5eLnHp4oGi"
    start = {
        "event": "start",
        "sequence_number": "1",
        "start": {
            "user_id": "3E6F995F-85F7-4705-9741-53B116D28237",
            "call_control_id": ccid,
            "call_session_id": "9b0c6f4e-1d2a-11f1-8c3e-02420a0f0b45",
            "from": "+13125550143",
            "to": "+13125550177",
            "tags": ["support"],
            "client_state": "eyJ0ZW5hbnQiOiJhY21lIn0=",
            "custom_parameters": {"ticket": TICKET, "redact": "ssn"},
            "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1},
        },
        "stream_id": sid,
    }
    return Peer(
        "telnyx",
        "/telnyx/media",
        ccid,
        "mulaw",
        8000,
        [text({"event": "connected", "version": "1.0.0"}), text(start)],
        lambda track, chunk, ms: text(
            {
                "event": "media",
                "sequence_number": str(ms // 20 + 2),
                "media": {
                    "track": track,
                    "chunk": str(ms // 20 + 1),
                    "timestamp": str(ms),
                    "payload": b64(chunk),
                },
                "stream_id": sid,
            }
        ),
        text({"event": "dtmf", "stream_id": sid, "sequence_number": "212", "dtmf": {"digit": "5"}}),
        [text({"event": "stop", "sequence_number": "245", "stop": {}, "stream_id": sid})],
        [text({"event": "media", "media": {"track": "inbound", "payload": "AAA="}})],
        query="?track=both_tracks",
        labels={"stream_id": sid, "from": "+13125550143", "tags": "support"},
    )


def plivo() -> Peer:
    call_id, sid = "4f7c2a8e-6b1d-4e0a-9c55-2d8e1f3a7b90", "b2e9d4c1-7a3f-4c8e-8d21-5f6a0e9c3b17"
    headers = f"ticket={TICKET};redact=ssn"
    start = {
        "event": "start",
        "sequenceNumber": 1,
        "start": {
            "callId": call_id,
            "streamId": sid,
            "accountId": "MAZDQ1ZJE2NTK1YTY5ZT",
            "tracks": ["inbound", "outbound"],
            "mediaFormat": {"encoding": "audio/x-l16", "sampleRate": 8000},
        },
        "extra_headers": headers,
    }
    unix_ms = 1793714591820
    return Peer(
        "plivo",
        "/plivo/media",
        call_id,
        "pcm16",
        8000,
        [text(start)],
        lambda track, chunk, ms: text(
            {
                "event": "media",
                "sequenceNumber": ms // 10 + 2,
                "streamId": sid,
                "media": {
                    "track": track,
                    "timestamp": str(unix_ms + ms),
                    "chunk": ms // 20 + 1,
                    "payload": b64(chunk),
                },
                "extra_headers": headers,
            }
        ),
        text(
            {
                "event": "dtmf",
                "sequenceNumber": 50,
                "streamId": sid,
                "dtmf": {"track": "inbound", "digit": "5", "timestamp": str(unix_ms + 900)},
            }
        ),
        [],  # Plivo just closes the socket
        [text({"event": "dtmf", "dtmf": {"digit": "5"}})],
        end_reason="socket closed",
        labels={"stream_id": sid, "account_id": "MAZDQ1ZJE2NTK1YTY5ZT"},
    )


def vonage() -> Peer:
    uuid = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
    connected = {
        "event": "websocket:connected",
        "content-type": "audio/l16;rate=16000",
        "uuid": uuid,
        "conversation_uuid": "CON-" + uuid,
        "from": "447700900001",
        "ticket": TICKET,
        "redact": "ssn",
    }
    return Peer(
        "vonage",
        "/vonage/media",
        uuid,
        "pcm16",
        16000,
        [text(connected)],
        lambda track, chunk, ms: chunk,
        text({"event": "websocket:dtmf", "digit": "5", "duration": 260}),
        [],  # Vonage closes the socket
        [b"\0" * 640],
        tracks=("inbound",),
        end_reason="socket closed",
        labels={"conversation_uuid": "CON-" + uuid, "from": "447700900001", "uuid": uuid},
    )


def exotel() -> Peer:
    sid, call_sid = "a4f3c2b1d0e9f8a7b6c5d4e3f2a1b0c9", "7c1e9f0b2d3a4c5e6f708192a3b4c5d6"
    start = {
        "event": "start",
        "sequence_number": 1,
        "stream_sid": sid,
        "start": {
            "stream_sid": sid,
            "call_sid": call_sid,
            "account_sid": "acmeindia1",
            "from": "+919876543210",
            "to": "+918047491899",
            # The stream URL's query, as Exotel copies it: the key must not become a label.
            "custom_parameters": {"ticket": TICKET, "redact": "ssn", "token": "carrier-key"},
            "media_format": {"encoding": "raw", "sample_rate": "8000", "bit_rate": "128"},
        },
    }
    stop = {
        "event": "stop",
        "sequence_number": 20,
        "stream_sid": sid,
        "stop": {"call_sid": call_sid, "account_sid": "acmeindia1", "reason": "callended"},
    }
    return Peer(
        "exotel",
        "/exotel/media",
        call_sid,
        "pcm16",
        8000,
        [text({"event": "connected"}), text(start)],
        lambda track, chunk, ms: text(
            {
                "event": "media",
                "sequence_number": ms // 100 + 2,
                "stream_sid": sid,
                "media": {"chunk": ms // 100 + 1, "timestamp": str(ms), "payload": b64(chunk)},
            }
        ),
        text(
            {
                "event": "dtmf",
                "sequence_number": 7,
                "stream_sid": sid,
                "dtmf": {"duration": "200", "digit": "5"},
            }
        ),
        [text(stop)],
        [text({"event": "media", "stream_sid": sid, "media": {"payload": "AAA="}})],
        tracks=("inbound",),
        frame_ms=100,  # Exotel sends every ~100 ms
        end_reason="stop: callended",
        labels={"stream_sid": sid, "account_sid": "acmeindia1", "to": "+918047491899"},
    )


def signalwire() -> Peer:
    sid, call_sid = "7d56cc11-536d-4a45-b4fb-ed3d55be843b", "76ac3c36-56da-4a3e-a0d6-b5f8df6da9ad"
    start = {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "streamSid": sid,
            "accountSid": "b08dacad-2f6c-4de1-93d6-cc732e0c69c5",
            "callSid": call_sid,
            "tracks": ["inbound", "outbound"],
            "customParameters": {"ticket": TICKET, "redact": "ssn"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2},
        },
    }
    return Peer(
        "signalwire",
        "/signalwire/media",
        call_sid,
        "mulaw",
        8000,
        [text({"event": "connected", "protocol": "Call", "version": "0.2.0"}), text(start)],
        lambda track, chunk, ms: text(
            {
                "event": "media",
                "sequenceNumber": str(ms // 10 + 2),
                "media": {
                    "track": track,
                    "chunk": str(ms // 20 + 1),
                    "timestamp": str(ms),
                    "payload": b64(chunk),
                },
            }
        ),
        text(
            {
                "event": "dtmf",
                "streamSid": sid,
                "sequenceNumber": "25",
                "dtmf": {"duration": 2700, "digit": "5"},
            }
        ),
        [text({"event": "stop", "sequenceNumber": "1002"})],
        [text({"event": "media", "media": {"track": "inbound", "payload": "AAA="}})],
        labels={"stream_sid": sid, "call_sid": call_sid},
    )


def jambonz() -> Peer:
    call_sid = "863a97df-bd4e-42cd-ba51-20772d8f3616"
    metadata = {
        "sampleRate": 8000,
        "mixType": "stereo",
        "callSid": call_sid,
        "direction": "inbound",
        "from": "+15083084809",
        "to": "+15082139445",
        "callId": "b9d55ecf6bb47f88@10.0.1.5",
        "sipStatus": 200,
        "accountSid": "60e02265-d582-4aad-8ae0-ace88f0ccb11",
        "ticket": TICKET,
        "redact": "ssn",
    }
    return Peer(
        "jambonz",
        "/jambonz/listen",
        call_sid,
        "pcm16",
        8000,
        [text(metadata)],
        lambda track, chunk, ms: chunk,
        text({"event": "dtmf", "dtmf": "5", "duration": "1600"}),
        [b""],  # the graceful shutdown's flush frame; we close
        [b"\0" * 640],
        protocols=("audio.jambonz.org",),
        stereo=True,
        end_reason="graceful shutdown",
        labels={"callId": "b9d55ecf6bb47f88@10.0.1.5", "direction": "inbound", "sipStatus": "200"},
    )


def decode(peer: Peer, wire: bytes) -> PcmArray:
    return ulaw_decode(wire) if peer.encoding == "mulaw" else pcm16_decode(wire)


def speech(peer: Peer) -> dict[str, bytes]:
    """One sentence per track, padded with silence to the same length."""
    sentences = {"inbound": SENTENCES[1], "outbound": SENTENCES[4]}
    wire = {t: phone_bytes(sentences[t], peer.encoding, peer.rate) for t in peer.tracks}
    length = max(map(len, wire.values()))
    pad = b"\xff" if peer.encoding == "mulaw" else b"\0"
    return {t: w.ljust(length, pad) for t, w in wire.items()}


async def run_call(service: Service, peer: Peer, wire: dict[str, bytes]) -> int | None:
    url = f"ws://127.0.0.1:{service.ports['audio']}{peer.path}{peer.query}"
    width = 1 if peer.encoding == "mulaw" else 2
    step = peer.rate * peer.frame_ms // 1000 * width
    length = len(next(iter(wire.values())))
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, protocols=peer.protocols)
        for frame in peer.opening:
            await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
        await ws.send_str("garbage that is not JSON")  # logged and skipped
        offsets = range(0, length, step)
        async for offset in paced(offsets, peer.frame_ms / 1000):
            ms = offset // width * 1000 // peer.rate
            if offset == step * 20:
                await (
                    ws.send_str(peer.dtmf)
                    if isinstance(peer.dtmf, str)
                    else ws.send_bytes(peer.dtmf)
                )
            if peer.stereo:
                a, b = (np.frombuffer(w[offset : offset + step], "<i2") for w in wire.values())
                await ws.send_bytes(np.stack([a, b], axis=1).astype("<i2").tobytes())
                continue
            for track, audio in wire.items():
                frame = peer.media(track, audio[offset : offset + step], ms)
                await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
        for frame in peer.ending:
            await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
        if not peer.ending:
            await ws.close()  # the carrier's plain hang-up
        async for _ in ws:
            pass
        return ws.close_code


async def broken_call(service: Service, peer: Peer) -> tuple[int | None, str]:
    url = f"ws://127.0.0.1:{service.ports['audio']}{peer.path}{peer.query}"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, protocols=peer.protocols)
        for frame in peer.bad:
            await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
        message = await ws.receive(timeout=10)
        return ws.close_code, str(message.extra)


async def check_carrier(start_service: ServiceFactory, peer: Peer) -> None:
    service = await start_service()
    wire = speech(peer)
    async with watch_events(service) as events:
        code, (bad_code, bad_reason) = await asyncio.gather(
            run_call(service, peer, wire), broken_call(service, peer)
        )
        await events.wait_ended(1)
    assert code == 1000
    assert bad_code == 1007, (bad_code, bad_reason)
    legs = {"inbound": "caller", "outbound": "agent"}
    for track, audio in wire.items():
        expected = await offline_words(service, decode(peer, audio), peer.rate)
        assert expected and events.words(peer.call_id, legs[track]) == expected, track
    started = events.of(peer.call_id)[0]
    assert started["front_end"] == peer.name
    assert started["legs"] == [legs[t] for t in peer.tracks]
    assert started["labels"]["ticket"] == TICKET
    assert "redact" not in started["labels"] and started["redaction"] == ["ssn"]
    assert "carrier-key" not in json.dumps(events.of(peer.call_id))
    assert peer.labels.items() <= started["labels"].items()
    tracked = len(peer.tracks) == 2 and not peer.stereo  # which track each leg is, as Twilio's
    assert ("agent_leg" in started["labels"]) == tracked
    dtmf = [e for e in events.of(peer.call_id) if e["type"] == "dtmf"]
    assert [(e["digit"], e["leg"]) for e in dtmf] == [("5", "caller")]
    assert 0.3 < dtmf[0]["at"] < 0.5 + peer.frame_ms * 20 / 1000
    ended = events.ended()
    assert list(ended) == [peer.call_id]  # the broken stream opened no call
    assert ended[peer.call_id]["reason"] == peer.end_reason


async def test_telnyx(start_service: ServiceFactory) -> None:
    await check_carrier(start_service, telnyx())


async def test_plivo(start_service: ServiceFactory) -> None:
    await check_carrier(start_service, plivo())


async def test_vonage(start_service: ServiceFactory) -> None:
    await check_carrier(start_service, vonage())


async def test_exotel(start_service: ServiceFactory) -> None:
    await check_carrier(start_service, exotel())


async def test_signalwire(start_service: ServiceFactory) -> None:
    await check_carrier(start_service, signalwire())


async def test_jambonz_stereo(start_service: ServiceFactory) -> None:
    await check_carrier(start_service, jambonz())


KEY = "carrier-key-5e2a"
TELNYX_TOKEN = "telnyx-stream-token-91c"
VONAGE_SECRET = "vonage-signature-secret-0b7d1e-4c2f9a8e71d3"


async def upgrade_status(url: str, headers: dict[str, str], protocols: tuple[str, ...] = ()) -> int:
    """101 when the upgrade is accepted (then closed at once), else the refusal's status."""
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url, headers=headers, protocols=protocols)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_each_carrier_sends_its_credential_as_configured(
    start_service: ServiceFactory,
) -> None:
    """With API keys on: Telnyx's stream token and Vonage's JWT replace the key on their routes
    once configured; the others carry a key their own way (Bearer, Basic, ?token=)."""
    config = dataclasses.replace(
        make_config(name="sink"),
        api=ApiConfig(keys=(KEY,)),
        carriers=CarriersConfig(
            telnyx_stream_token=TELNYX_TOKEN, vonage_signature_secret=VONAGE_SECRET
        ),
    )
    service = await start_service(config)
    base = f"ws://127.0.0.1:{service.ports['audio']}"
    telnyx_url = f"{base}/telnyx/media"
    assert await upgrade_status(telnyx_url, {}) == 403
    assert await upgrade_status(telnyx_url, {"x-telnyx-streaming-auth-token": "nope"}) == 403
    good = {"x-telnyx-streaming-auth-token": TELNYX_TOKEN}
    assert await upgrade_status(telnyx_url, good) == 101
    now = int(time.time())
    claims = {"iat": now, "jti": "3b1f", "iss": "Vonage", "application_id": "app-1"}
    signed = jwt.encode(claims, VONAGE_SECRET, algorithm="HS256")
    forged = jwt.encode(claims, "another-signature-secret-of-enough-length", algorithm="HS256")
    stale = jwt.encode({**claims, "iat": now - 3600}, VONAGE_SECRET, algorithm="HS256")
    vonage_url = f"{base}/vonage/media"
    for token in (forged, stale, "not-a-jwt"):
        assert await upgrade_status(vonage_url, {"Authorization": f"Bearer {token}"}) == 403
    assert await upgrade_status(vonage_url, {}) == 403
    assert await upgrade_status(vonage_url, {"Authorization": f"Bearer {signed}"}) == 101
    basic = "Basic " + base64.b64encode(f"acme:{KEY}".encode()).decode()
    for path, protocols in (
        ("/plivo/media", ()),
        ("/exotel/media", ()),
        ("/signalwire/media", ()),
        ("/jambonz/listen", ("audio.jambonz.org",)),
    ):
        assert await upgrade_status(f"{base}{path}", {}, protocols) == 401, path
        assert await upgrade_status(f"{base}{path}", {"Authorization": basic}, protocols) == 101
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert await upgrade_status(f"{base}{path}", bearer, protocols) == 101
        assert await upgrade_status(f"{base}{path}?token={KEY}", {}, protocols) == 101


async def test_wideband_codecs_telnyx_l16_big_endian_and_signalwire_l16_24k(
    start_service: ServiceFactory,
) -> None:
    """Beyond the defaults: Telnyx's L16 is the RTP payload (network byte order), SignalWire's
    `L16@24000h` little-endian at 24 kHz; each call's words equal the offline transcript."""
    service = await start_service()
    cases = []
    for peer, rate in ((telnyx(), 16000), (signalwire(), 24000)):
        start = json.loads(peer.opening[-1])
        if peer.name == "telnyx":
            start["start"]["media_format"] = {"encoding": "L16", "sample_rate": rate}
        else:
            start["start"]["mediaFormat"] = {"encoding": "audio/x-L16", "sampleRate": rate}
            start["start"]["tracks"] = ["inbound"]
        little = phone_bytes(SENTENCES[3], "pcm16", rate)
        wire = (
            little
            if peer.name == "signalwire"
            else np.frombuffer(little, "<i2").astype(">i2").tobytes()
        )
        changed = dataclasses.replace(
            peer,
            encoding="pcm16",
            rate=rate,
            opening=[*peer.opening[:-1], text(start)],
            tracks=("inbound",),
            query="",
        )
        cases.append((changed, wire, pcm16_decode(little)))
    async with watch_events(service) as events:
        await asyncio.gather(*(run_call(service, p, {"inbound": w}) for p, w, _ in cases))
        await events.wait_ended(2)
    for peer, _, pcm in cases:
        expected = await offline_words(service, pcm, peer.rate)
        assert expected and events.words(peer.call_id, "caller") == expected, peer.name


async def test_a_gap_in_plivo_unix_timestamps_is_silence_in_place(
    start_service: ServiceFactory,
) -> None:
    """Plivo stamps media with Unix ms: counted from the first message, a jump (here 600 ms
    the carrier never sent) is filled with silence, so later words keep their place."""
    service = await start_service()
    peer = dataclasses.replace(plivo(), tracks=("inbound",))
    start = json.loads(peer.opening[0])
    start["start"]["tracks"] = ["inbound"]
    wire = phone_bytes(SENTENCES[1], "pcm16", 8000)
    step = 320
    lost = range(40 * step, 70 * step, step)  # frames 40-69: 0.8 s to 1.4 s
    heard = bytearray(wire)
    for offset in lost:
        heard[offset : offset + step] = bytes(step)
    url = f"ws://127.0.0.1:{service.ports['audio']}{peer.path}"
    async with watch_events(service) as events, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url)
        await ws.send_str(text(start))
        async for offset in paced(range(0, len(wire), step)):
            if offset not in lost:
                frame = peer.media("inbound", wire[offset : offset + step], offset // 16)
                assert isinstance(frame, str)  # Plivo's media are JSON text
                await ws.send_str(frame)
        await ws.close()
        await events.wait_ended(1)
    expected = await offline_words(service, pcm16_decode(bytes(heard)), 8000)
    assert expected and events.words(peer.call_id, "caller") == expected
    assert events.ended()[peer.call_id]["audio_s"]["caller"] == len(wire) / 16000
