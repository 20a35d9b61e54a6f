"""Search latency (`GET /v1/calls?q=`, api/search.py) at 1k, 10k and 100k stored calls, on
SQLite and on PostgreSQL, and what the index costs the writer.

Calls are generated: each has two legs and `--segments` (12) segments of 8-20 words drawn from
a 5,000-word vocabulary with a Zipf distribution (so "w0" is in nearly every call and "w300" in
a few percent), plus two planted words: "windscreen" in one call in 10,000 and "cracked" in one
in 1,000 (said together in one call in 10,000, in different segments). They are loaded
straight into a store at the schema before search (fast bulk inserts), then `Store()`
migrates it: the migration indexes every stored call (timed too), an ended call as one row.
Each query is `Store.search_calls` as the route calls it (limit 50, snippets included), run
`--runs` times after one warm-up; median and 95th percentile are printed.

Insert cost: `--insert-calls` calls of `--words` words through `Store.record` (the real writer:
a word event each, a segment every ten words), with the index and with `index_segments` turned
off, on both backends.

    .venv/bin/python bench/search.py [--sizes 1000,10000,100000] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import search
from api.store import MIGRATIONS, Database, PerBackend, Store
from bench.store import run as record_calls
from tests.pg import Postgres


def pseudo_words(count: int, seed: int = 3) -> list[str]:
    """`count` distinct made-up words of 1-4 syllables, so prefixes are shared about as often
    as in a language (numbered words would make "w1" the prefix of a thousand of them)."""
    rng = random.Random(seed)
    onsets, vowels, codas = (
        [
            "b",
            "c",
            "d",
            "f",
            "g",
            "h",
            "k",
            "l",
            "m",
            "n",
            "p",
            "r",
            "s",
            "t",
            "v",
            "w",
            "y",
            "z",
            "br",
            "ch",
            "sh",
            "st",
            "tr",
        ],
        "aeiou",
        ["", "n", "r", "s", "t"],
    )
    words: dict[str, None] = {}
    while len(words) < count:
        syllables = rng.choice((1, 2, 2, 3, 3, 4))
        word = "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(syllables)
        )
        if word not in ("cracked", "windscreen"):
            words[word] = None
    return list(words)


VOCABULARY = pseudo_words(5000)
QUERIES = {  # name: (q, filters)
    "rare word (1 in 10k calls)": ("windscreen", {}),
    "two words, AND": ("cracked windscreen", {}),
    "word in 1 in 1000 calls": ("cracked", {}),
    "prefix of that word": ("crack", {}),
    "mid-frequency word": (VOCABULARY[300], {}),
    "word in nearly every call": (VOCABULARY[0], {}),
    "common word + filter": (VOCABULARY[0], {"front_end": "sip"}),
    "two common words": (f"{VOCABULARY[1]} {VOCABULARY[2]}", {}),
    "3-letter prefix": (VOCABULARY[40][:3], {}),
}


def schema_version() -> int:
    """The migration that creates the index: the store is loaded at the one before it."""
    return next(
        n for n, m in enumerate(MIGRATIONS) if isinstance(m, PerBackend) and "fts5" in m.sqlite
    )


def generated(calls: int, segments: int, seed: int = 1) -> Iterator[tuple[Any, ...]]:
    """(call row, [segment rows]) for each call."""
    rng = random.Random(seed)
    weights = [1 / (n + 1) ** 1.1 for n in range(len(VOCABULARY))]
    cumulative = list(_accumulate(weights))
    for c in range(calls):
        call_id = f"call-{c:06d}"
        front_end = ("sip", "twilio", "websocket", "audiosocket")[c % 4]
        row = (call_id, front_end, "ended", 1.7e9 + c * 60, 1.7e9 + c * 60 + 50, "{}", "[]")
        lines = []
        for s in range(segments):
            words = rng.choices(VOCABULARY, cum_weights=cumulative, k=rng.randint(8, 20))
            if s == 0 and c % 1000 == 500:
                words.insert(3, "cracked")
            if s == segments - 1 and c % 10000 == 5500:
                words.insert(2, "windscreen")
            leg = "caller" if s % 2 == 0 else "agent"
            lines.append((call_id, leg, "segment", " ".join(words), s * 5.0, s * 5.0 + 4, "{}"))
        yield row, lines


def _accumulate(values: list[float]) -> Iterator[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


def load(location: Path | str, calls: int, segments: int) -> None:
    """Calls and their segments at the schema before search, in bulk."""
    db = Database(location)
    version = schema_version()
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("BEGIN")
    for script in MIGRATIONS[:version]:
        assert isinstance(script, str)
        db.script(script)
    db.execute("INSERT INTO schema_version VALUES (?)", (version,))
    db.execute("COMMIT")
    db.close()
    call_sql = (
        "INSERT INTO calls (id, front_end, status, started_at, ended_at, labels, legs) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    event_sql = (
        "INSERT INTO events (call_id, leg, type, text, start_s, end_s, payload) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    if isinstance(location, Path):
        lite = sqlite3.connect(location)
        for row, lines in generated(calls, segments):
            lite.execute(call_sql, row)
            lite.executemany(event_sql, lines)
        lite.commit()
        lite.close()
        return
    with psycopg.connect(location) as pg, pg.cursor() as cursor:
        with cursor.copy(
            "COPY calls (id, front_end, status, started_at, ended_at, labels, legs) FROM STDIN"
        ) as calls_copy:
            rows = list(generated(calls, segments))
            for row, _ in rows:
                calls_copy.write_row(row)
        with cursor.copy(
            "COPY events (call_id, leg, type, text, start_s, end_s, payload) FROM STDIN"
        ) as events_copy:
            for _, lines in rows:
                for line in lines:
                    events_copy.write_row(line)
        pg.commit()
        pg.execute("ANALYZE")  # what autovacuum does soon after a bulk load


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    result = fn()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1], result


def latency(location: Path | str, runs: int) -> tuple[float, list[tuple[str, float, float, str]]]:
    start = time.perf_counter()
    store = Store(location, node_id="bench")  # migrates: indexes every stored segment
    migrate_s = time.perf_counter() - start
    rows = []
    try:
        for name, (q, filters) in QUERIES.items():
            terms = search.parse_query(q)

            def query(terms: tuple[str, ...] = terms, filters: dict[str, Any] = filters) -> Any:
                return store.search_calls(terms, **filters)

            median, p95, (_, total, exact) = timed(query, runs)
            rows.append((name, median, p95, f"{total}" if exact else f"{total}+"))
    finally:
        store.close()
    return migrate_s, rows


def _off(*_: object) -> None:
    return None


def insert_cost(
    location: Callable[[], Path | str], calls: int, words: int, rounds: int = 3
) -> dict[str, float]:
    """Words a second through the writer, with the index (and the merge at each call's end) and
    without: alternated `rounds` times, the best of each kept (others share this machine)."""
    rates: dict[str, float] = {}
    real = (search.index_segments, search.call_ended)
    for _ in range(rounds):
        for label, on in (("with index", True), ("without", False)):
            if not on:  # the bench's switch: the writer calls these through the module
                setattr(search, "index_segments", _off)  # noqa: B010
                setattr(search, "call_ended", _off)  # noqa: B010
            try:
                seconds, _ = record_calls(location(), calls, words)
            finally:
                setattr(search, "index_segments", real[0])  # noqa: B010
                setattr(search, "call_ended", real[1])  # noqa: B010
            rates[label] = max(rates.get(label, 0.0), calls * words / seconds)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--segments", type=int, default=12, help="segments per call")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--insert-calls", type=int, default=200)
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, Any] = {"latency": {}, "insert": {}}
    server = Postgres(fsync=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            backends: dict[str, Callable[[], Path | str]] = {
                "SQLite": lambda: Path(tempfile.mkdtemp(dir=tmp)) / "bench.sqlite3",
                "PostgreSQL": server.fresh_database,
            }
            chosen = {b.lower() for b in args.backends.split(",")}
            for backend, fresh in backends.items():
                if backend.lower() not in chosen:
                    continue
                for size in sizes:
                    where = fresh()
                    start = time.perf_counter()
                    load(where, size, args.segments)
                    load_s = time.perf_counter() - start
                    migrate_s, rows = latency(where, args.runs)
                    results["latency"][f"{backend} {size}"] = rows
                    print(
                        f"\n{backend}, {size} calls x {args.segments} segments "
                        f"(loaded {load_s:.1f} s, indexed by the migration in {migrate_s:.1f} s)"
                    )
                    print(f"  {'query':<30} {'median ms':>10} {'p95 ms':>8} {'calls':>7}")
                    for name, median, p95, total in rows:
                        print(f"  {name:<30} {median:>10.2f} {p95:>8.2f} {total:>7}")
                if not args.insert_calls:  # latency only
                    continue
                rates = insert_cost(fresh, args.insert_calls, args.words)
                results["insert"][backend] = rates
                print(
                    f"\n{backend} writer, {args.insert_calls} calls x {args.words} words: "
                    + ", ".join(f"{k} {v:,.0f} words/s" for k, v in rates.items())
                    + f" ({rates['with index'] / rates['without'] - 1:+.1%})"
                )
    finally:
        server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
