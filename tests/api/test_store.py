"""The store on both backends (a SQLite file; PostgreSQL from Debian, started by the session):
retention, migrations, deleting, two legs interleaved in a transcript, webhook claims."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from api.config import DataConfig
from api.store import MIGRATIONS, Database, Store
from api.store.batches import BatchWriter
from api.store.migrations import migrate
from engine.base import Segment, Word
from telephony.bus import BusEvent, CallEnded, CallStarted, LegEvent
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


def location(tmp_path: Path, store_url: str) -> Path | str:
    """Where the service keeps its store for this backend."""
    return store_url or tmp_path / "stt-bridge.sqlite3"


async def test_retention_deletes_old_finished_calls_at_start(
    tmp_path: Path, start_service: ServiceFactory, store_url: str
) -> None:
    now = time.time()
    store = Store(location(tmp_path, store_url))
    record_call(store, "old", now - 40 * DAY, ended=True)
    record_call(store, "recent", now - 2 * DAY, ended=True)
    store.close()

    base = make_config(tmp_path)
    data = DataConfig(dir=str(tmp_path), retention_days=30, url=store_url)
    service = await start_service(dataclasses.replace(base, data=data))
    status, listing = await api(service, "GET", "/v1/calls")
    assert status == 200 and [c["id"] for c in listing["calls"]] == ["recent"]
    assert (await api(service, "GET", "/v1/calls/old/transcript"))[0] == 404
    db = Database(location(tmp_path, store_url))
    assert db.execute("SELECT COUNT(*) FROM events WHERE call_id = 'old'").fetchone()[0] == 0
    db.close()


def test_retention_keeps_live_calls_and_their_words(tmp_path: Path, store_url: str) -> None:
    """The periodic purge (not only the one at start) deletes old finished calls and keeps a
    call that is still live, however long ago it started."""
    now = time.time()
    store = Store(location(tmp_path, store_url), retention_s=30 * DAY, purge_every_s=0.05)
    record_call(store, "long-running", now - 40 * DAY, ended=False)
    record_call(store, "old", now - 40 * DAY, ended=True)
    deadline = time.monotonic() + 10
    while store.get_call("old") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get_call("old") is None
    events = store.get_events("long-running", ("word", "segment"))
    assert [e.text for e in events] == ["hello", "hello"]
    store.close()


def test_migrations_are_versioned_and_rerun_safely(tmp_path: Path, store_url: str) -> None:
    path = location(tmp_path, store_url)
    Store(path).close()
    Store(path).close()  # a second start applies nothing twice
    db = Database(path)
    assert [tuple(r) for r in db.execute("SELECT version FROM schema_version").fetchall()] == [
        (len(MIGRATIONS),)
    ]
    if not store_url:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_nodes_starting_together_migrate_once(tmp_path: Path, store_url: str) -> None:
    """Three nodes start at once on a fresh store: one migrates, the others find it done."""
    path = location(tmp_path, store_url)
    with ThreadPoolExecutor(3) as pool:
        stores = list(pool.map(lambda n: Store(path, node_id=f"n{n}"), range(3)))
    record_call(stores[1], "c", time.time(), ended=True)
    call = stores[2].get_call("c")
    assert call is not None and call.node == "n1"
    for store in stores:
        store.close()


def test_each_webhook_is_claimed_by_one_sender(tmp_path: Path, store_url: str) -> None:
    """Two nodes (two stores on one database) claim due webhooks at the same time: every row
    goes to exactly one of them; one that is neither delivered nor failed comes back after
    the claim runs out (its sender died)."""
    path = location(tmp_path, store_url)
    a = Store(path, ["http://127.0.0.1:9/hook"], node_id="a")
    b = Store(path, node_id="b")
    for n in range(40):
        record_call(a, f"c{n}", time.time(), ended=True)  # 3 webhooks each
    now = time.time()
    with ThreadPoolExecutor(2) as pool:
        claims = list(pool.map(lambda s: s.due_webhooks(now, limit=200, claim_s=1.0), [a, b, b]))
    ids = [row[0] for claim in claims for row in claim]
    assert len(ids) == len(set(ids)) == 120
    b.webhook_done(ids[0], now)
    assert a.due_webhooks(now + 0.5, limit=200) == []  # still claimed
    again = a.due_webhooks(now + 2.0, limit=200)  # the claims ran out; the delivered one stays
    assert len(again) == 119 and ids[0] not in {row[0] for row in again}
    a.close()
    b.close()


async def test_a_live_call_cannot_be_deleted_a_finished_one_can(
    start_service: ServiceFactory, store_url: str
) -> None:
    service = await start_service(make_config(data_url=store_url))
    async with aiohttp.ClientSession() as http:
        url = f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?call_id=in-progress"
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
    start_service: ServiceFactory, store_url: str
) -> None:
    """A stereo FreeSWITCH fork: caller on the left, callee on the right, the callee
    answering after the caller's first sentence; every format orders lines by time."""
    service = await start_service(make_config(data_url=store_url))
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


def test_a_call_ended_and_started_again_in_one_batch_keeps_each_end_as_it_was(
    tmp_path: Path, store_url: str
) -> None:
    """The writer writes a batch's calls started, then its events, then its calls ended; a
    call id that ended and came back within one batch (a second stream of one Twilio call)
    still gets, at its first end, the transcript it had then, and every webhook in order."""
    where = location(tmp_path, store_url)
    db = Database(where)
    migrate(db)
    batch: list[BusEvent] = []
    for session, text in enumerate(("hello", "again")):
        batch.append(CallStarted("twice", "websocket", ("caller",), {}, 100.0 + session))
        word = Word(text, session * 10.0, session * 10.0 + 0.4)
        batch.append(LegEvent("twice", "caller", word))
        batch.append(LegEvent("twice", "caller", Segment(text, word.start_s, word.end_s, (word,))))
        batch.append(CallEnded("twice", "websocket", "hangup", 110.0 + session, {}))
    BatchWriter("node", ["http://127.0.0.1:9/hook"]).write(db, batch, 1)

    bodies = [
        orjson.loads(r[0]) for r in db.execute("SELECT body FROM outbox ORDER BY id").fetchall()
    ]
    assert [b["event"] for b in bodies] == ["call.started", "segment", "call.ended"] * 2
    assert [line["text"] for line in bodies[2]["transcript"]] == ["hello"]
    assert [line["text"] for line in bodies[5]["transcript"]] == ["hello", "again"]
    words = db.execute("SELECT text FROM events WHERE type = 'word' ORDER BY id").fetchall()
    assert [w[0] for w in words] == ["hello", "again"]
    db.close()


def test_one_bad_event_among_many_is_the_only_one_skipped(tmp_path: Path, store_url: str) -> None:
    """An event that cannot be written (its call never started) is skipped and counted; the
    events around it, in the same batch or not, are all stored, in order."""
    store = Store(location(tmp_path, store_url))
    store.record(CallStarted("good", "websocket", ("caller",), {}, time.time()))
    for n in range(600):
        if n == 300:
            store.record(LegEvent("never-started", "caller", Word("lost", 0.0, 0.1)))
        store.record(LegEvent("good", "caller", Word(f"w{n}", n * 0.3, n * 0.3 + 0.2)))
    store.record(CallEnded("good", "websocket", "hangup", time.time(), {}))
    assert store.flush()
    assert store.failed == 1
    assert [e.text for e in store.get_events("good", ("word",))] == [f"w{n}" for n in range(600)]
    store.close()


def test_a_label_with_a_lone_surrogate_is_stored_with_its_webhook(
    tmp_path: Path, store_url: str
) -> None:
    """Unsanitised input that orjson refuses (a lone surrogate) costs neither the call nor
    its webhook: the standard library escapes it."""
    where = location(tmp_path, store_url)
    store = Store(where, ["http://127.0.0.1:9/hook"])
    store.record(CallStarted("odd", "websocket", ("caller",), {"x": "\ud800"}, time.time()))
    assert store.flush()
    assert store.failed == 0
    record = store.get_call("odd")
    assert record is not None and record.labels == {"x": "\ud800"}
    store.close()
    db = Database(where)
    bodies = [json.loads(r[0]) for r in db.execute("SELECT body FROM outbox").fetchall()]
    assert [b["call"]["labels"] for b in bodies] == [{"x": "\ud800"}]
    db.close()


def test_a_page_and_its_total_agree_while_the_writer_commits(
    tmp_path: Path, store_url: str
) -> None:
    """A listing counts and pages in one snapshot: while another node marks webhooks
    delivered and ends calls, every page of delivered webhooks and of ended calls holds as
    many rows as its total says (CI saw "total 0" beside one delivered webhook)."""
    path = location(tmp_path, store_url)
    store = Store(path, ["http://127.0.0.1:9/hook"], node_id="reader")
    sender = Store(path, node_id="sender")
    for n in range(60):
        record_call(store, f"c{n}", time.time(), ended=False)  # two webhooks each
    ids = [row[0] for row in sender.due_webhooks(time.time(), limit=200)]
    assert len(ids) == 120

    def deliver_and_end() -> None:
        for n, row_id in enumerate(ids):
            sender.webhook_done(row_id, time.time())
            if n % 2:
                sender.record(CallEnded(f"c{n // 2}", "websocket", "hangup", time.time(), {}))
                assert sender.flush()

    pages: list[tuple[int, int, int, int]] = []
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(deliver_and_end)
        while not writing.done() or len(pages) < 50:
            webhooks, webhooks_total = store.list_webhooks("delivered", limit=500)
            calls, calls_total = store.list_calls(status="ended", limit=500)
            pages.append((len(webhooks), webhooks_total, len(calls), calls_total))
        writing.result()
    assert [p for p in pages if p[0] != p[1] or p[2] != p[3]] == []
    assert len(store.list_webhooks("delivered", limit=500)[0]) == 120
    assert len(store.list_calls(status="ended", limit=500)[0]) == 60
    store.close()
    sender.close()
