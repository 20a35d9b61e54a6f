"""Store write throughput: words a second through `Store.record` on SQLite and on PostgreSQL.

Each run records calls the way a busy node does: a call starts, says words (each a `Word`, and
a `Segment` every ten words), and ends, with one webhook URL configured (so the outbox is
written too); `flush()` waits until all of it is committed. PostgreSQL is Debian's, started
here (tests/pg.py) with fsync on, like SQLite's WAL with synchronous=NORMAL on the same disk.

    .venv/bin/python bench/store.py [--calls 200] [--words 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.store import Store
from engine.base import Segment, Word
from telephony.bus import CallEnded, CallStarted, LegEvent
from tests.pg import Postgres


def run(location: Path | str, calls: int, words: int) -> tuple[float, int]:
    """Seconds to record and commit `calls` calls of `words` words; events written."""
    store = Store(location, ["http://127.0.0.1:9/hook"], node_id="bench")
    events = 0
    start = time.perf_counter()
    for c in range(calls):
        call_id = f"bench-{c}"
        store.record(CallStarted(call_id, "websocket", ("caller",), {"n": str(c)}, time.time()))
        said: list[Word] = []
        for w in range(words):
            word = Word(f"word{w}", w * 0.3, w * 0.3 + 0.25)
            said.append(word)
            store.record(LegEvent(call_id, "caller", word))
            if len(said) == 10:
                text = " ".join(x.text for x in said)
                segment = Segment(text, said[0].start_s, said[-1].end_s, tuple(said))
                store.record(LegEvent(call_id, "caller", segment))
                events += 1
                said = []
        store.record(CallEnded(call_id, "websocket", "hangup", time.time(), {"caller": 1.0}))
        events += words + 2
    assert store.flush(timeout=600)
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--words", type=int, default=100)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seconds, events = run(Path(tmp) / "bench.sqlite3", args.calls, args.words)
        rows.append(("SQLite (WAL, synchronous=NORMAL)", seconds, events))
    server = Postgres(fsync=True).start()
    try:
        seconds, events = run(server.fresh_database(), args.calls, args.words)
        rows.append(("PostgreSQL 15 (fsync on, NOTIFY per event)", seconds, events))
    finally:
        server.stop()
    total_words = args.calls * args.words
    print(f"\n{args.calls} calls x {args.words} words, one webhook URL, batched by the writer\n")
    print(f"{'store':<44} {'seconds':>8} {'words/s':>10} {'events/s':>10}")
    for name, seconds, events in rows:
        print(
            f"{name:<44} {seconds:>8.2f} {total_words / seconds:>10.0f} {events / seconds:>10.0f}"
        )


if __name__ == "__main__":
    main()
