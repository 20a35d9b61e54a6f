"""Store write throughput: words a second through `Store.record` on SQLite and on PostgreSQL.

Each run records calls the way a busy node does: a call starts, says words (each a `Word`, and
a `Segment` every ten words), and ends, with one webhook URL configured (so the outbox is
written too); `flush()` waits until all of it is committed. PostgreSQL is Debian's, started
here (tests/pg.py) with fsync on, like SQLite's WAL with synchronous=NORMAL on the same disk.

    .venv/bin/python bench/store.py [--calls 200] [--words 100] [--concurrent 1 50]
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


def run(location: Path | str, calls: int, words: int, concurrent: int = 1) -> tuple[float, int]:
    """Seconds to record and commit `calls` calls of `words` words; events written. With
    `concurrent` > 1, that many calls are live at once and speak in turn, word by word, as on
    a busy node (1: one call after another, each ending before the next starts)."""
    store = Store(location, ["http://127.0.0.1:9/hook"], node_id="bench")
    events = 0
    start = time.perf_counter()
    for first in range(0, calls, concurrent):
        group = [f"bench-{c}" for c in range(first, min(first + concurrent, calls))]
        said: dict[str, list[Word]] = {call_id: [] for call_id in group}
        for n, call_id in enumerate(group, first):
            labels = {"n": str(n)}
            store.record(CallStarted(call_id, "websocket", ("caller",), labels, time.time()))
        for w in range(words):
            for call_id in group:
                word = Word(f"word{w}", w * 0.3, w * 0.3 + 0.25)
                said[call_id].append(word)
                store.record(LegEvent(call_id, "caller", word))
                if len(said[call_id]) == 10:
                    run_words = said[call_id]
                    text = " ".join(x.text for x in run_words)
                    segment = Segment(
                        text, run_words[0].start_s, run_words[-1].end_s, tuple(run_words)
                    )
                    store.record(LegEvent(call_id, "caller", segment))
                    events += 1
                    said[call_id] = []
        for call_id in group:
            ended = CallEnded(call_id, "websocket", "hangup", time.time(), {"caller": 1.0})
            store.record(ended)
            events += words + 2
    assert store.flush(timeout=600)
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument(
        "--concurrent", type=int, nargs="+", default=[1, 50], help="calls live at once"
    )
    args = parser.parse_args()
    rows = []
    for concurrent in args.concurrent:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, events = run(Path(tmp) / "b.sqlite3", args.calls, args.words, concurrent)
            rows.append(("SQLite (WAL, synchronous=NORMAL)", concurrent, seconds, events))
        server = Postgres(fsync=True).start()
        try:
            seconds, events = run(server.fresh_database(), args.calls, args.words, concurrent)
            rows.append(("PostgreSQL 15 (fsync on)", concurrent, seconds, events))
        finally:
            server.stop()
    total_words = args.calls * args.words
    print(f"\n{args.calls} calls x {args.words} words, one webhook URL, batched by the writer\n")
    print(f"{'store':<34} {'calls at once':>13} {'seconds':>8} {'words/s':>10} {'events/s':>10}")
    for name, concurrent, seconds, events in rows:
        print(
            f"{name:<34} {concurrent:>13} {seconds:>8.2f} {total_words / seconds:>10.0f} "
            f"{events / seconds:>10.0f}"
        )


if __name__ == "__main__":
    main()
