"""Search (`GET /v1/calls?q=`) on both store backends: the right calls among many, every word
required (across segments and legs), prefixes, case and punctuation ignored, the filters, a
word nobody said, a deleted call gone, calls stored before the index existed, and words a real
call just said."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from api import search as index
from api.store import MIGRATIONS, Database, PerBackend, Store
from engine.base import Segment, Word
from telephony.bus import CallEnded, CallStarted, LegEvent
from tests.conftest import ServiceFactory, make_config
from tests.speech import SENTENCES, read_pcm, speech_wav

FILLER = (
    "thank you for calling how can i help you today",
    "i would like to check the status of my order",
    "can you spell your last name for me please",
    "the parcel should arrive on thursday afternoon",
    "let me put you on hold for a moment",
    "is there anything else i can help you with",
)
T0 = 1_700_000_000.0
SAID: dict[str, str] = {}  # every recorded call's words, to count what a search should find


def say(store: Store, call_id: str, leg: str, text: str, at: float) -> None:
    words = tuple(Word(w, at + i * 0.3, at + i * 0.3 + 0.25) for i, w in enumerate(text.split()))
    for word in words:
        store.record(LegEvent(call_id, leg, word))
    store.record(LegEvent(call_id, leg, Segment(text, words[0].start_s, words[-1].end_s, words)))


def record(
    store: Store, call_id: str, at: float, said: dict[str, list[str]], front_end: str = "websocket"
) -> None:
    SAID[call_id] = " ".join(" ".join(lines) for lines in said.values())
    store.record(CallStarted(call_id, front_end, tuple(said), {}, at))
    for leg, lines in said.items():
        for n, text in enumerate(lines):
            say(store, call_id, leg, text, n * 5.0)
    store.record(CallEnded(call_id, front_end, "hangup", at + 60, {leg: 60.0 for leg in said}))


def fill(store: Store, calls: int) -> None:
    """`calls` ordinary calls, none of which says the words the tests look for."""
    rng = random.Random(7)
    for n in range(calls):
        lines = {"caller": rng.sample(FILLER, 2), "agent": rng.sample(FILLER, 2)}
        record(store, f"filler-{n}", T0 + n, lines)


def location(tmp_path: Path, store_url: str) -> Path | str:
    return store_url or tmp_path / "stt-bridge.sqlite3"


async def search(service: Any, query: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls?{query}"
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.json()


def ids(body: Any) -> list[str]:
    return [c["id"] for c in body["calls"]]


async def test_search_finds_the_calls_that_said_every_word(
    tmp_path: Path, start_service: ServiceFactory, store_url: str
) -> None:
    store = Store(location(tmp_path, store_url))
    fill(store, 300)
    # Both words in one sentence; both, but said by different legs; only one of them each.
    record(store, "both", T0 + 1000, {"caller": ["My WINDSCREEN is cracked, right across."]})
    record(
        store,
        "across-legs",
        T0 + 2000,
        {"caller": ["the windscreen on my van"], "agent": ["is it cracked or chipped"]},
        front_end="twilio",
    )
    record(store, "only-windscreen", T0 + 3000, {"caller": ["a new windscreen wiper"]})
    record(store, "only-cracked", T0 + 4000, {"agent": ["the screen cracked"]})
    assert store.flush()
    store.close()
    config = make_config(tmp_path, data_url=store_url, name="sink")
    service = await start_service(config)

    # Case and punctuation ignored; every word required, in any segment or leg; newest first.
    status, body = await search(service, "q=" + quote("Cracked, windscreen!"))
    assert status == 200, body
    assert ids(body) == ["across-legs", "both"] and body["total"] == 2
    assert body["q"] == ["cracked", "windscreen"]
    first = {c["id"]: c for c in body["calls"]}["both"]
    assert first["match"]["leg"] == "caller"
    snippet = first["match"]["snippet"]
    assert "<mark>WINDSCREEN</mark>" in snippet and "<mark>cracked</mark>" in snippet, snippet
    assert first["front_end"] == "websocket" and first["legs"] == ["caller"]

    # A prefix finds whole words; the filters still apply; paging over hits.
    status, body = await search(service, "q=windscr")
    assert ids(body) == ["only-windscreen", "across-legs", "both"]
    status, body = await search(service, "q=windscr&front_end=twilio")
    assert ids(body) == ["across-legs"] and body["total"] == 1
    status, body = await search(service, f"q=windscr&since={T0 + 1500}&until={T0 + 2500}")
    assert ids(body) == ["across-legs"]
    status, body = await search(service, "q=windscreen&limit=2")
    assert ids(body) == ["only-windscreen", "across-legs"] and body["next_offset"] == 2
    status, body = await search(service, "q=windscreen&limit=2&offset=2")
    assert ids(body) == ["both"] and "next_offset" not in body

    # A word nobody said; a word everyone said is found in every call.
    status, body = await search(service, "q=zebra")
    assert status == 200 and body["calls"] == [] and body["total"] == 0
    status, body = await search(service, "q=windscreen+zebra")
    assert body["total"] == 0
    status, body = await search(service, "q=" + quote("The"))
    said_the = {c for c, text in SAID.items() if any(w.startswith("the") for w in text.split())}
    assert 100 < len(said_the) < 304 and body["total"] == len(said_the) and body["total_exact"]
    newest = ids(body)[:10]
    # Past EXACT_BELOW calls a search counts no further: the total is "at least" and paging
    # goes on; the page is the same calls, newest first.
    with pytest.MonkeyPatch.context() as few:
        few.setattr(index, "EXACT_BELOW", 20)
        status, body = await search(service, "q=the&limit=10")
        assert status == 200 and ids(body) == newest
        assert body["total"] == 20 and body["total_exact"] is False and body["next_offset"] == 10
        # A page near the end is counted past: the total is exact again.
        status, body = await search(service, f"q=the&limit=10&offset={len(said_the) - 5}")
        assert body["total"] == len(said_the) and body["total_exact"] is True
        assert len(ids(body)) == 5 and "next_offset" not in body

    # Deleted: gone from the index too.
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{service.ports['audio']}/v1/calls/both"
        async with http.delete(url) as r:
            assert r.status == 200
    status, body = await search(service, "q=cracked+windscreen")
    assert ids(body) == ["across-legs"]

    # Nothing to search for, or too much: the API's 400.
    for bad in ("q=" + quote("?!"), "q=" + "a" * 501, "q=" + "+".join("abcdefghijklmnopq")):
        status, body = await search(service, bad)
        assert status == 400 and body["error"] == "bad_parameters", (bad, body)
    # A blank q lists every call, as without it.
    status, body = await search(service, "q=+&limit=1")
    assert status == 200 and body["total"] == 303


def test_calls_stored_before_the_index_are_found(tmp_path: Path, store_url: str) -> None:
    """A store at the schema before search: the migration indexes what it holds."""
    where = location(tmp_path, store_url)
    db = Database(where)
    version = next(
        n for n, m in enumerate(MIGRATIONS) if isinstance(m, PerBackend) and "fts5" in m.sqlite
    )
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("BEGIN")
    for script in MIGRATIONS[:version]:
        assert isinstance(script, str)
        db.script(script)
    db.execute("INSERT INTO schema_version VALUES (?)", (version,))
    for call_id, text in (("old-a", "the boiler makes a knocking noise"), ("old-b", "hello")):
        db.execute(
            "INSERT INTO calls (id, front_end, status, started_at, labels, legs) "
            "VALUES (?, 'sip', 'ended', ?, '{}', '[\"caller\"]')",
            (call_id, T0),
        )
        db.execute(
            "INSERT INTO events (call_id, leg, type, text, start_s, end_s, payload) "
            "VALUES (?, 'caller', 'segment', ?, 0, 1, '{}')",
            (call_id, text),
        )
    db.execute("COMMIT")
    db.close()

    store = Store(where)
    try:
        found, total, _ = store.search_calls(["knock", "boiler"])
        assert [c.id for c, _ in found] == ["old-a"] and total == 1
        snippet = found[0][1]
        assert snippet is not None and "<mark>knocking</mark>" in snippet.text
        # And the index goes on from there: a segment written now is found at once.
        say(store, "old-b", "caller", "and the boiler is cold", 9.0)
        assert store.flush()
        assert {c.id for c, _ in store.search_calls(["boiler"])[0]} == {"old-a", "old-b"}
    finally:
        store.close()


async def test_words_a_call_just_said_are_found(
    start_service: ServiceFactory, store_url: str
) -> None:
    """Real speech through /v1/stream: the words the engine heard are searchable once the
    store has them, and the transcript's words find it."""
    service = await start_service(make_config(data_url=store_url))
    pcm, _ = read_pcm(speech_wav(SENTENCES[0]))
    url = f"ws://127.0.0.1:{service.ports['audio']}/v1/stream?call_id=spoken"
    heard: list[str] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        data = pcm.tobytes()
        for i in range(0, len(data), 9600):
            await ws.send_bytes(data[i : i + 9600])
        await ws.send_str('{"type": "stop"}')
        async for msg in ws:
            message = msg.json()
            if message["type"] == "segment":
                heard.extend(message["text"].split())
    await asyncio.get_running_loop().run_in_executor(None, service.bridge.store.flush)
    longest = sorted(heard, key=lambda w: -len(w.strip(".,?!")))[:2]
    assert longest, heard
    status, body = await search(service, "q=" + quote(" ".join(longest)))
    assert status == 200 and ids(body) == ["spoken"], (longest, body)
    word = longest[0].strip(".,?!").lower()
    assert f"<mark>{word}</mark>" in body["calls"][0]["match"]["snippet"].lower()


def test_a_live_call_is_found_as_it_speaks_and_after_it_ends(
    tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live, each segment is its own index row; once ended they are one row: the same search
    finds the call both ways, and a deleted call in neither. PostgreSQL looks few hits up by
    id and many through the index: both ways answer the same."""
    store = Store(location(tmp_path, store_url))
    try:
        store.record(CallStarted("live", "sip", ("caller", "agent"), {}, T0))
        say(store, "live", "caller", "the boiler in the loft", 1.0)
        assert store.flush()
        assert [c.id for c, _ in store.search_calls(["boiler", "leak"])[0]] == []
        say(store, "live", "agent", "is there a leak", 4.0)
        assert store.flush()
        found, total, _ = store.search_calls(["boiler", "leak"])
        assert [c.id for c, _ in found] == ["live"] and total == 1
        with monkeypatch.context() as many:
            many.setattr(index, "EXACT_BELOW", 1)  # every search takes the many-hits form
            assert store.search_calls(["boiler", "leak"])[1] == 1
            assert store.search_calls(["boiler", "zebra"]) == ([], 0, True)
        store.record(CallEnded("live", "sip", "hangup", T0 + 9, {"caller": 9.0}))
        assert store.flush()
        found, *_ = store.search_calls(["boiler", "leak"])
        assert [(c.id, c.status) for c, _ in found] == [("live", "ended")]
        with monkeypatch.context() as many:
            many.setattr(index, "EXACT_BELOW", 1)
            assert store.search_calls(["boiler", "leak"])[1] == 1
            assert store.search_calls(["boiler", "zebra"]) == ([], 0, True)
        snippet = found[0][1]
        assert snippet is not None and snippet.leg == "caller"
        assert snippet.text == "the <mark>boiler</mark> in the loft"
        # The same call id live again (a second stream of one Twilio call): a word said now
        # and one said before, in its merged row, find it together.
        store.record(CallStarted("live", "sip", ("caller", "agent"), {}, T0))
        say(store, "live", "caller", "and the gutter too", 12.0)
        assert store.flush()
        for few in (index.EXACT_BELOW, 1):
            with monkeypatch.context() as forms:
                forms.setattr(index, "EXACT_BELOW", few)
                assert store.search_calls(["gutter", "leak"])[1] == 1, few
        store.record(CallEnded("live", "sip", "hangup", T0 + 20, {"caller": 20.0}))
        assert store.flush()
        assert store.search_calls(["gutter", "leak", "boiler"])[1] == 1
        assert store.delete_call("live") == "deleted"
        assert store.search_calls(["boiler"]) == ([], 0, True)
    finally:
        store.close()


def test_retention_takes_calls_out_of_the_index(tmp_path: Path, store_url: str) -> None:
    where = location(tmp_path, store_url)
    store = Store(where)
    now = time.time()
    record(store, "old", now - 40 * 86400, {"caller": ["the gutter is blocked"]})
    record(store, "new", now - 86400, {"caller": ["the gutter overflows"]})
    assert store.flush()
    assert store.search_calls(["gutter"])[1] == 2
    store.close()
    store = Store(where, retention_s=30 * 86400)  # retention runs as the store opens
    try:
        found, total, _ = store.search_calls(["gutter"])
        assert [c.id for c, _ in found] == ["new"] and total == 1
        assert store.search_calls(["blocked"]) == ([], 0, True)
    finally:
        store.close()
    # Gone from the index itself, not only unreachable from the calls table.
    db = Database(where)
    try:
        left = db.execute("SELECT COUNT(*) FROM transcript_index WHERE text LIKE ?", ("%gutter%",))
        assert left.fetchone()[0] == 1
    finally:
        db.close()
