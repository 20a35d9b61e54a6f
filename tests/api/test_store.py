"""The store on a real SQLite file: retention, deleting, two legs interleaved in a transcript."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from api.config import DataConfig
from api.store import MIGRATIONS, Store
from engine.base import Segment, Word
from telephony.session import CallEnded, CallStarted, LegEvent
from tests.conftest import ServiceFactory, make_config
from tests.e2e.frontends import paced
from tests.speech import SENTENCES, phone_bytes

DAY = 86400.0


def record_call(store: Store, call_id: str, at: float, ended: bool, text: str = "hello") -> None:
    store.record(CallStarted(call_id, "websocket", ("caller",), {"n": call_id}, at))
    word = Word(text, 0.5, 0.9)
    store.record(LegEvent(call_id, "caller", word))
    store.record(LegEvent(call_id, "caller", Segment(text, 0.5, 0.9, (word,))))
    if ended:
        store.record(CallEnded(call_id, "websocket", "hangup", at + 60, {"caller": 60.0}))
    assert store.flush()


async def api(service: Any, method: str, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{service.ports['audio']}{path}"
    async with aiohttp.ClientSession() as http, http.request(method, url) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def test_retention_deletes_old_finished_calls_at_start(
    tmp_path: Path, start_service: ServiceFactory
) -> None:
    now = time.time()
    store = Store(tmp_path / "stt-bridge.sqlite3")
    record_call(store, "old", now - 40 * DAY, ended=True)
    record_call(store, "recent", now - 2 * DAY, ended=True)
    store.close()

    base = make_config(tmp_path)
    config = dataclasses.replace(base, data=DataConfig(dir=str(tmp_path), retention_days=30))
    service = await start_service(config)
    status, listing = await api(service, "GET", "/v1/calls")
    assert status == 200 and [c["id"] for c in listing["calls"]] == ["recent"]
    assert (await api(service, "GET", "/v1/calls/old/transcript"))[0] == 404
    db = sqlite3.connect(tmp_path / "stt-bridge.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM events WHERE call_id = 'old'").fetchone()[0] == 0


def test_retention_keeps_live_calls_and_their_words(tmp_path: Path) -> None:
    """The periodic purge (not only the one at start) deletes old finished calls and keeps a
    call that is still live, however long ago it started."""
    now = time.time()
    store = Store(tmp_path / "s.sqlite3", retention_s=30 * DAY, purge_every_s=0.05)
    record_call(store, "long-running", now - 40 * DAY, ended=False)
    record_call(store, "old", now - 40 * DAY, ended=True)
    deadline = time.monotonic() + 10
    while store.get_call("old") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get_call("old") is None
    events = store.get_events("long-running", ("word", "segment"))
    assert [e.text for e in events] == ["hello", "hello"]
    store.close()


def test_migrations_are_versioned_and_rerun_safely(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    Store(path).close()
    Store(path).close()  # a second start applies nothing twice
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(len(MIGRATIONS),)]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_live_call_cannot_be_deleted_a_finished_one_can(
    start_service: ServiceFactory,
) -> None:
    service = await start_service()
    async with aiohttp.ClientSession() as http:
        url = f"ws://127.0.0.1:{service.ports['audio']}/v1/listen?call_id=in-progress"
        ws = await http.ws_connect(url)
        await ws.send_bytes(bytes(9600))
        store = service.bridge.store
        for _ in range(100):
            if store.get_call("in-progress") is not None:
                break
            await asyncio.sleep(0.05)
        assert (await api(service, "DELETE", "/v1/calls/in-progress"))[0] == 409
        await ws.send_str('{"type": "stop"}')
        async for _ in ws:
            pass
    await _flush(service)
    status, body = await api(service, "DELETE", "/v1/calls/in-progress")
    assert status == 200 and body == {"deleted": "in-progress"}
    assert (await api(service, "GET", "/v1/calls/in-progress"))[0] == 404


async def test_two_legs_are_interleaved_by_time_and_labelled(
    start_service: ServiceFactory,
) -> None:
    """A stereo FreeSWITCH fork: caller on the left, callee on the right, the callee
    answering after the caller's first sentence; every format orders lines by time."""
    service = await start_service()
    caller = np.frombuffer(phone_bytes(SENTENCES[1], "pcm16", 8000), "<i2")
    callee = np.frombuffer(phone_bytes(SENTENCES[5], "pcm16", 8000), "<i2")
    gap = len(caller) + 8000  # the callee speaks 1 s after the caller stops
    n = gap + len(callee)
    stereo = np.zeros((n, 2), dtype="<i2")
    stereo[: len(caller), 0] = caller
    stereo[gap:, 1] = callee
    audio = stereo.tobytes()
    frame = 8000 // 50 * 4
    url = f"ws://127.0.0.1:{service.ports['audio']}/freeswitch/two-legs?mix=stereo&rate=8000"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, protocols=("audio.drachtio.org",))
        frames = [audio[i : i + frame] for i in range(0, len(audio), frame)]
        async for chunk in paced(frames, 0.002):
            await ws.send_bytes(chunk)
        await ws.send_bytes(b"")
        async for _ in ws:
            pass
    await _flush(service)

    status, transcript = await api(service, "GET", "/v1/calls/two-legs/transcript")
    assert status == 200
    segments = transcript["segments"]
    assert {s["leg"] for s in segments} == {"caller", "callee"}
    starts = [s["start"] for s in segments]
    assert starts == sorted(starts)
    # The caller spoke first, the callee after the gap: legs are not simply concatenated.
    assert segments[0]["leg"] == "caller" and segments[-1]["leg"] == "callee"
    assert min(s["start"] for s in segments if s["leg"] == "callee") > gap / 8000 - 0.5

    _, txt = await api(service, "GET", "/v1/calls/two-legs/transcript?format=txt")
    txt_legs = [line.split("] ", 1)[1].split(":", 1)[0] for line in txt.splitlines()]
    assert txt_legs == [s["leg"] for s in segments]
    _, vtt = await api(service, "GET", "/v1/calls/two-legs/transcript?format=vtt")
    assert vtt.count("<v caller>") + vtt.count("<v callee>") == len(segments)
    _, srt = await api(service, "GET", "/v1/calls/two-legs/transcript?format=srt")
    blocks = [b.splitlines() for b in srt.strip().split("\n\n")]
    assert [int(b[0]) for b in blocks] == list(range(1, len(segments) + 1))
    assert [b[2].split(":", 1)[0] for b in blocks] == [s["leg"] for s in segments]


async def _flush(service: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
