"""Asterisk dialplan speech end to end: a peer that does what res_speech_aeap does.

Written from res/res_speech_aeap.c and res/res_aeap (message_json.c, transport_websocket.c):
the upgrade with subprotocol `speech_to_text`, `setup` with one codec and the `@` params, 20 ms
binary frames while `SpeechBackground` runs (stopped by our results `set`, which it answers),
`get` for results (option `p`), `set` of `dtmf` and of `SPEECH_ENGINE()` values, Close 1000 at
`SpeechDestroy`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import numpy as np

from telephony.aeap import UNSUPPORTED, digits_of
from telephony.audio import ulaw_decode
from tests.conftest import ServiceFactory
from tests.e2e.frontends import EventLog, offline_words, paced, watch_events
from tests.e2e.ws_peer import CLOSE, RawWebSocket, asterisk_request
from tests.speech import SENTENCES, phone_bytes


class SpeechObject:
    """One `SpeechCreate()`: the socket and the requests Asterisk makes on it."""

    def __init__(self, ws: RawWebSocket) -> None:
        self.ws = ws

    @classmethod
    async def create(
        cls, port: int, codec: str = "ulaw", params: dict[str, str] | None = None
    ) -> tuple[SpeechObject, dict[str, Any]]:
        key = RawWebSocket.new_key()
        request = asterisk_request("/asterisk/aeap", f"127.0.0.1:{port}", key, "speech_to_text")
        ws = await RawWebSocket.connect(port, request, key)
        assert ws.headers.get("sec-websocket-protocol", "speech_to_text") == "speech_to_text"
        speech = cls(ws)
        setup = {
            "request": "setup",
            "version": "0.1.0",
            "codecs": [{"name": codec}],
            "params": params or {},
            "id": str(uuid.uuid4()),
        }
        return speech, await speech.request(setup)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send and wait for the answer with the same id (Asterisk waits 1000 ms; a test
        machine shared with other tests gets twice that)."""
        self.ws.send_text(json.dumps(message, separators=(",", ":")))
        answer: dict[str, Any] = json.loads(await self.ws.receive_text(timeout=2.0))
        assert answer["response"] == message["request"] and answer["id"] == message["id"]
        return answer

    async def background(self, frames: list[bytes]) -> tuple[dict[str, Any] | None, int]:
        """`SpeechBackground`: stream until our results `set` comes (answered, as Asterisk
        does) or the audio ends; returns the results request and how many frames went."""
        sent = 0
        async for frame in paced(frames):
            if self.ws.pending():
                opcode, payload = await self.ws.receive()
                assert opcode != CLOSE, (self.ws.close_code, self.ws.close_reason)
                message = json.loads(payload)
                assert message["request"] == "set" and set(message["params"]) == {"results"}
                reply = {"response": "set", "id": message["id"]}
                self.ws.send_text(json.dumps(reply, separators=(",", ":")))
                return message, sent
            self.ws.send_binary(frame)
            sent += 1
        return None, sent

    async def get(self, name: str) -> dict[str, Any]:
        return await self.request({"request": "get", "params": [name], "id": str(uuid.uuid4())})

    async def set(self, name: str, value: str) -> dict[str, Any]:
        params = {name: value}
        return await self.request({"request": "set", "params": params, "id": str(uuid.uuid4())})

    async def destroy(self) -> None:
        await self.ws.drain_and_close(1000)


def frames_of(audio: bytes, size: int) -> list[bytes]:
    return [audio[i : i + size] for i in range(0, len(audio), size)]


def segments(events: EventLog, call_id: str) -> list[str]:
    return [e["text"] for e in events.of(call_id) if e["type"] == "segment"]


def recognitions(events: EventLog) -> list[str]:
    return [e["call_id"] for e in events.events if e["type"] == "call_started"]


async def test_results_are_pushed_at_the_end_of_the_utterance_then_dtmf_and_digits(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    ulaw = phone_bytes(SENTENCES[2], "mulaw", 8000) + b"\xff" * 8000 * 3  # then 3 s of silence
    async with watch_events(service) as events:
        speech, setup = await SpeechObject.create(
            service.ports["audio"], "ulaw", {"language": "en-US"}
        )
        assert setup["codecs"] == [{"name": "ulaw"}] and "error_msg" not in setup
        pushed, sent = await speech.background(frames_of(ulaw, 160))
        assert pushed is not None, "no result before the audio ran out"
        await asyncio.sleep(0.3)  # the dialplan goes on; the next SpeechBackground:
        await speech.background(frames_of(b"\xff" * 1600, 160))
        assert "error_msg" not in await speech.set("dtmf", "12")  # keys ended it
        digits = await speech.get("digits")  # ${SPEECH_ENGINE(digits)}
        await speech.destroy()
        ended = await events.wait_ended(2)
    first, second = recognitions(events)
    (result,) = pushed["params"]["results"]
    assert result == {
        "text": segments(events, first)[0],  # the utterance the engine closed, at once
        "score": result["score"],
        "grammar": "default",
        "best": 0,
    }
    # The score is the segment's own confidence on AEAP's 0-1000 scale (not a fixed 900).
    segment = next(e for e in events.of(first) if e["type"] == "segment")
    assert abs(result["score"] - 1000 * segment["confidence"]) <= 1
    assert 500 < result["score"] <= 1000  # clear speech: the model is sure
    heard = ulaw_decode(ulaw[: sent * 160])
    expected = await offline_words(service, heard, 8000)
    assert expected and events.words(first) == expected
    assert digits["params"] == {"digits": digits_of(result["text"])}
    assert [e["digit"] for e in events.of(second) if e["type"] == "dtmf"] == ["1", "2"]
    assert {ended[first]["front_end"], ended[second]["front_end"]} == {"asterisk_aeap"}
    started = events.of(first)[0]
    assert started["labels"]["language"] == "en-US" and started["labels"]["codec"] == "ulaw"


async def test_slin16_digits_grammar_and_a_get_for_results(start_service: ServiceFactory) -> None:
    service = await start_service()
    slin16 = phone_bytes(SENTENCES[2], "pcm16", 16000) + bytes(16000 * 2 * 3)
    halfway = phone_bytes(SENTENCES[1], "pcm16", 16000)[: 640 * 40]  # 0.8 s: mid-sentence
    async with watch_events(service) as events:
        speech, setup = await SpeechObject.create(service.ports["audio"], "slin")  # slin16
        assert setup["codecs"] == [{"name": "slin"}]
        assert "error_msg" not in await speech.set("grammar", "digits")
        pushed, sent = await speech.background(frames_of(slin16, 640))
        assert pushed is not None
        # SpeechBackground(prompt,1,p): the timeout ends it mid-sentence and Asterisk asks.
        await asyncio.sleep(0.3)
        not_yet, sent_half = await speech.background(frames_of(halfway, 640))
        answer = await speech.get("results")
        await speech.destroy()
        await events.wait_ended(2)
    first, second = recognitions(events)
    (result,) = pushed["params"]["results"]
    assert result["grammar"] == "digits"
    assert result["text"] == digits_of(segments(events, first)[0])
    assert events.of(first)[0]["labels"]["sample_rate"] == "16000"  # told by a 640-byte frame
    expected = await offline_words(
        service, np.frombuffer(slin16[: sent * 640], "<i2").astype(np.int16), 16000
    )
    assert expected and events.words(first) == expected
    results = answer["params"]["results"]
    assert isinstance(results, list) and len(results) <= 1
    for r in results:  # the best hypothesis so far, as digits: whatever was heard by then
        assert r["grammar"] == "digits" and r["text"].isdigit() and r["best"] == 0
    assert not_yet is None and sent_half == len(halfway) // 640
    assert events.ended()[second]["reason"] == "results asked"


async def test_refused_setup_and_garbage_leave_another_recognition_alone(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    port = service.ports["audio"]
    ulaw = phone_bytes(SENTENCES[4], "mulaw", 8000) + b"\xff" * 8000 * 3

    async def bad_peers() -> tuple[dict[str, Any], int | None, dict[str, Any], int | None]:
        await asyncio.sleep(0.5)
        opus, refused = await SpeechObject.create(port, "opus")  # SpeechCreate: ERROR=1
        opcode, _ = await opus.ws.receive()
        assert opcode == CLOSE
        garbage, _ = await SpeechObject.create(port, "alaw")
        unknown = await garbage.request({"request": "hello", "id": str(uuid.uuid4())})
        garbage.ws.send_text("{not json")
        opcode, _ = await garbage.ws.receive()
        assert opcode == CLOSE
        return refused, opus.ws.close_code, unknown, garbage.ws.close_code

    async with watch_events(service) as events:
        speech, _ = await SpeechObject.create(port, "ulaw")
        (pushed, sent), (refused, refused_code, unknown, garbage_code) = await asyncio.gather(
            speech.background(frames_of(ulaw, 160)), bad_peers()
        )
        await speech.destroy()
        await events.wait_ended(1)
    assert "codec opus is not served" in refused["error_msg"] and refused_code == 1007
    assert unknown["error_msg"] == UNSUPPORTED
    assert garbage_code == 1007
    assert pushed is not None
    (call_id,) = recognitions(events)
    expected = await offline_words(service, ulaw_decode(ulaw[: sent * 160]), 8000)
    assert expected and events.words(call_id) == expected
