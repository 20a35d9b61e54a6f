"""Keyterms and confidence end to end: a Deepgram client's `keyterm=` reaches the engine's
decoder, and its `Results` carry the engine's own word confidence (real speech, μ-law)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import ServiceFactory
from tests.speech import normalize, phone_bytes

RARE = "He takes Brilinta after his heart surgery."  # the model alone writes "Berlinta"


async def finals(port: int, query: str, audio: bytes) -> list[dict[str, Any]]:
    url = f"ws://127.0.0.1:{port}/v1/listen?encoding=mulaw&sample_rate=8000{query}"
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        for at in range(0, len(audio), 1600):  # 200 ms at a time, faster than real time
            await ws.send_bytes(audio[at : at + 1600])
        await ws.send_str(json.dumps({"type": "CloseStream"}))
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            body = json.loads(message.data)
            if body.get("type") == "Results" and body["is_final"]:
                results.append(body["channel"]["alternatives"][0])
    return results


def says(text: str, term: str) -> bool:
    words, wanted = normalize(text), normalize(term)
    return any(words[i : i + len(wanted)] == wanted for i in range(len(words)))


async def test_deepgram_keyterm_fixes_a_rare_word_and_words_carry_confidence(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    port = service.ports["audio"]
    audio = b"\xff" * 4000 + phone_bytes(RARE) + b"\xff" * 12000  # silence around it
    without = await finals(port, "", audio)
    with_term = await finals(port, "&keyterm=Brilinta", audio)
    text_without = " ".join(a["transcript"] for a in without)
    text_with = " ".join(a["transcript"] for a in with_term)
    assert not says(text_without, "Brilinta"), text_without
    assert says(text_with, "Brilinta"), text_with
    words = [w for a in with_term for w in a["words"]]
    confidences = [w["confidence"] for w in words]
    assert all(0.0 < c <= 1.0 for c in confidences) and len(set(confidences)) > 1, words
    for alternative in with_term:
        if alternative["words"]:
            mean = sum(w["confidence"] for w in alternative["words"]) / len(alternative["words"])
            assert abs(alternative["confidence"] - mean) < 1e-3
