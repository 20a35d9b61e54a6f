"""Full-text search over stored transcripts, for `GET /v1/calls?q=...` (api/routes/calls.py).

What is indexed: each final segment's text, as the store writes it (after redaction: the store
never sees unredacted words), one row per segment, written by the store's writer in the same
transaction as the segment and removed with its call. A query's words (runs of letters and
digits; case and punctuation ignored) must all occur in the call, in any of its segments and
legs, each as a word or the beginning of one (`wind` finds "windscreen").

SQLite: an FTS5 table `transcript_index`. Each call gets a number (`search_docs.doc`) and its
n-th segment the rowid `doc * 2**20 + n`, so the calls a word occurs in come from the index's
rowids alone (no row is read per hit) and one call's rows are a rowid range.
PostgreSQL: `transcript_index` rows with a `tsvector` (configuration `simple`: no stemming, no
stop words, as FTS5's unicode61) under a GIN index; prefixes as `word:*`.

A search costs about a microsecond per index row that holds one of its words, so once a call has
ended its segment rows are merged into one (`call_ended`): a word said in every segment of
every call is then one row per call, not one per segment. Live calls keep a row per segment,
searchable as each is written.

A hit's snippet is the call's best-matching segment, cut to about `SNIPPET_WORDS` words, with
each match between `<mark>` and `</mark>` and the rest HTML-escaped (`&`, `<`, `>`), so a page
can show it as it comes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

MAX_QUERY_CHARS: Final = 500
MAX_TERMS: Final = 16
SNIPPET_WORDS: Final = 16
# Fewer index rows than this for a word: its calls are looked up by id and counted exactly;
# a search of only commoner words counts to this many calls and then says "at least".
EXACT_BELOW: Final = 1000
MERGE_MAX_CHARS: Final = 100_000  # a longer call keeps its rows (a tsvector is at most 1 MB)
DOC_SHIFT: Final = 20  # a call's segments: rowids doc << 20 | 1 .. 2**20 - 1
SEGMENT_MASK: Final = (1 << DOC_SHIFT) - 1
_WORD = re.compile(r"[^\W_]+")


class BadQuery(ValueError):
    """A search the index cannot answer: no word in it, or too long (400)."""


class Db(Protocol):
    """The part of api/store/db.py's `Database` the index uses."""

    postgres: bool

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any: ...


@dataclass(frozen=True)
class Snippet:
    leg: str
    text: str  # HTML-escaped, matches in <mark>...</mark>

    def to_json(self) -> dict[str, str]:
        return {"leg": self.leg, "snippet": self.text}


def parse_query(q: str) -> tuple[str, ...]:
    """The words to find, lower-cased, each once, in the order typed."""
    if len(q) > MAX_QUERY_CHARS:
        raise BadQuery(f"q is longer than {MAX_QUERY_CHARS} characters")
    terms = tuple(dict.fromkeys(_WORD.findall(q.casefold())))
    if not terms:
        raise BadQuery("q has no word to search for (letters or digits)")
    if len(terms) > MAX_TERMS:
        raise BadQuery(f"q has more than {MAX_TERMS} words")
    return terms


def index_segments(db: Db, segments: Sequence[tuple[str, str, str]]) -> None:
    """`index_segment` for each (call id, leg, text), in order: on PostgreSQL in one statement,
    its rows one JSON parameter (a statement per segment was a round trip each)."""
    segments = [s for s in segments if s[2].strip()]
    if not segments:
        return
    if db.postgres:
        db.execute(
            "INSERT INTO transcript_index (call_id, leg, text, words) "
            "SELECT r->>0, r->>1, r->>2, to_tsvector('simple', r->>2) "
            "FROM json_array_elements(?::json) WITH ORDINALITY AS t(r, n) ORDER BY n",
            (orjson.dumps(segments).decode(),),
        )
        return
    for call_id, leg, text in segments:
        index_segment(db, call_id, leg, text)


def index_segment(db: Db, call_id: str, leg: str, text: str) -> None:
    """In the writer's transaction: this segment's words are searchable once it commits."""
    if not text.strip():
        return
    if db.postgres:
        db.execute(
            "INSERT INTO transcript_index (call_id, leg, text, words) "
            "VALUES (?, ?, ?, to_tsvector('simple', ?))",
            (call_id, leg, text, text),
        )
        return
    doc, n = db.execute(
        "INSERT INTO search_docs (call_id, segments) VALUES (?, 1) ON CONFLICT (call_id) "
        "DO UPDATE SET segments = segments + 1 RETURNING doc, segments",
        (call_id,),
    ).fetchall()[0]
    if n <= SEGMENT_MASK:  # a call of over a million segments: the rest is not indexed
        db.execute(
            "INSERT INTO transcript_index (rowid, text, leg) VALUES (?, ?, ?)",
            ((doc << DOC_SHIFT) | n, text, leg),
        )


def unindex(db: Db, calls_sql: str, args: Sequence[Any]) -> None:
    """Remove the calls `calls_sql` selects (a `SELECT id FROM calls ...`) from the index,
    inside the caller's transaction, before the calls themselves are deleted."""
    if db.postgres:
        db.execute(f"DELETE FROM transcript_index WHERE call_id IN ({calls_sql})", args)
        return
    docs = db.execute(
        f"SELECT doc FROM search_docs WHERE call_id IN ({calls_sql})", args
    ).fetchall()
    for (doc,) in docs:
        db.execute(
            "DELETE FROM transcript_index WHERE rowid BETWEEN ? AND ?",
            (doc << DOC_SHIFT, (doc << DOC_SHIFT) | SEGMENT_MASK),
        )
    db.execute(f"DELETE FROM search_docs WHERE call_id IN ({calls_sql})", args)


def call_ended(db: Db, call_id: str) -> None:
    """In the writer's transaction: the call's rows become one (its segments' text, one per
    line), so a word it said often is one hit, not one per segment."""
    if db.postgres:
        # One statement, one round trip: both halves see the rows as they were before it.
        db.execute(
            "WITH merged AS (SELECT string_agg(text, E'\\n' ORDER BY id) AS text, count(*) AS n "
            "FROM transcript_index WHERE call_id = ?), "
            "kept AS (SELECT text FROM merged WHERE n >= 2 AND length(text) <= ?), "
            "gone AS (DELETE FROM transcript_index WHERE call_id = ? AND EXISTS "
            "(SELECT 1 FROM kept)) "
            "INSERT INTO transcript_index (call_id, leg, text, words) "
            "SELECT ?, '', text, to_tsvector('simple', text) FROM kept",
            (call_id, MERGE_MAX_CHARS, call_id, call_id),
        )
        return
    found = db.execute("SELECT doc FROM search_docs WHERE call_id = ?", (call_id,)).fetchone()
    if found is None:
        return
    low = found[0] << DOC_SHIFT
    rows = db.execute(
        "SELECT text FROM transcript_index WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
        (low, low | SEGMENT_MASK),
    ).fetchall()
    text = "\n".join(r[0] for r in rows)
    if len(rows) < 2 or len(text) > MERGE_MAX_CHARS:
        return
    db.execute(
        "DELETE FROM transcript_index WHERE rowid BETWEEN ? AND ?", (low, low | SEGMENT_MASK)
    )
    db.execute("INSERT INTO transcript_index (rowid, text, leg) VALUES (?, ?, '')", (low, text))


@dataclass(frozen=True)
class Match:
    """How `FROM calls` is narrowed to the calls that hold every term, as SQL for the store's
    queries: `join` and `condition` page through them newest first; `count_join` and
    `count_condition` count them (the store stops counting past `EXACT_BELOW`)."""

    join: str
    condition: str
    args: tuple[Any, ...]
    count_join: str
    count_condition: str
    count_args: tuple[Any, ...]


def _same(join: str, condition: str, args: Sequence[Any]) -> Match:
    return Match(join, condition, tuple(args), join, condition, tuple(args))


def _rows_below(db: Db, sql: str, query: str) -> list[Any] | None:
    """The index rows that hold `query` (`sql` selects them), if fewer than EXACT_BELOW."""
    rows = db.execute(f"{sql} LIMIT ?", (query, EXACT_BELOW)).fetchall()
    return [r[0] for r in rows] if len(rows) < EXACT_BELOW else None


def matching_calls(db: Db, terms: Sequence[str]) -> Match:
    """Each word's index rows are asked for first, up to EXACT_BELOW. With a rare word among
    them its calls are few: they are narrowed by the other words and counted exactly. With only
    common words, reading every call that holds them was most of a search's time (0.3-0.5 s for
    a word in each of 100k calls): the page walks calls newest first and checks each against
    the words (a few dozen checks when most calls match), and the count stops past
    EXACT_BELOW."""
    if db.postgres:
        return _postgres_match(db, terms)
    return _sqlite_match(db, terms)


def _sqlite_match(db: Db, terms: Sequence[str]) -> Match:
    # From each call's number to the call: one integer lookup per hit, before its text key.
    one = "SELECT rowid >> 20 FROM transcript_index WHERE transcript_index MATCH ?"
    queries = [f'"{t}"*' for t in terms]
    docs = " INTERSECT ".join([one] * len(terms))
    join = "JOIN search_docs ON search_docs.call_id = calls.id"
    if any(_rows_below(db, one, q) is not None for q in queries):
        return _same(join, f"search_docs.doc IN ({docs})", queries)
    # Only common words. The page goes down `calls_started` and looks each call up in each
    # word's calls, read once into a lookup table (CROSS JOIN keeps calls first; `+` stops
    # SQLite from driving the walk by the IN lists instead). The count is driven by the first
    # word's index rows as FTS5 yields them, so it stops at the cap (a live call may come once
    # per row: the store counts distinct ids).
    each = " AND ".join(f"+search_docs.doc IN ({one})" for _ in terms)
    walk = "CROSS JOIN search_docs ON search_docs.call_id = calls.id"
    first = f"{join} JOIN transcript_index first ON search_docs.doc = first.rowid >> {DOC_SHIFT}"
    others = "".join(f" AND +search_docs.doc IN ({one})" for _ in terms[1:])
    return Match(
        walk, each, tuple(queries), first, "first.transcript_index MATCH ?" + others, tuple(queries)
    )


def _postgres_match(db: Db, terms: Sequence[str]) -> Match:
    one = "SELECT call_id FROM transcript_index WHERE words @@ to_tsquery('simple', ?)"
    queries = [f"{t}:*" for t in terms]
    for n, query in enumerate(queries):
        # Rows, not distinct calls: LIMIT then stops the scan early (a common word's DISTINCT
        # read all its rows first); fewer rows than EXACT_BELOW is fewer calls too.
        found = _rows_below(db, one, query)
        if found is None:
            continue
        ids = list(dict.fromkeys(found))
        for other in queries[:n] + queries[n + 1 :]:
            if not ids:
                break
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT call_id FROM transcript_index "
                    "WHERE call_id = ANY(?) AND words @@ to_tsquery('simple', ?)",
                    (ids, other),
                ).fetchall()
            ]
        return _same("", "calls.id = ANY(?)", [ids])
    # Only common words. A word may be in any of a call's rows (a live call has one per
    # segment): each is a semi-join by call id, which PostgreSQL runs per call down
    # `calls_started` for a page. Counted, the rarest word (by the planner's estimate) goes
    # from its GIN matches to their calls, as many as the cap, each checked for the others:
    # the merge by call id PostgreSQL picks for a capped IN read 20k rows for 1001 hits of a
    # word in 5% of calls. A live call may come once per row: the store counts distinct ids.
    exists = (
        "EXISTS (SELECT 1 FROM transcript_index t WHERE t.call_id = calls.id "
        "AND t.words @@ to_tsquery('simple', ?))"
    )
    rarest = min(queries, key=lambda q: _estimated_rows(db, q))
    others = [q for q in queries if q != rarest]
    return Match(
        "",
        " AND ".join([exists] * len(queries)),
        tuple(queries),
        "JOIN transcript_index first ON first.call_id = calls.id",
        " AND ".join(["first.words @@ to_tsquery('simple', ?)"] + [exists] * len(others)),
        (rarest, *others),
    )


def _estimated_rows(db: Db, query: str) -> float:
    """PostgreSQL's estimate of the index rows that hold `query` (from its GIN statistics)."""
    plan = db.execute(
        "EXPLAIN (FORMAT JSON) SELECT 1 FROM transcript_index "
        "WHERE words @@ to_tsquery('simple', ?)",
        (query,),
    ).fetchone()[0]
    return float(plan[0]["Plan"]["Plan Rows"])


def snippets(db: Db, call_ids: Sequence[str], terms: Sequence[str]) -> dict[str, Snippet]:
    """Each call's segment that matches most of the terms (the first such), around its first
    match: read from the calls' stored segments in one query and marked here, the same on both
    backends (asking the index to mark them would walk a common word's every hit per result)."""
    if not call_ids:
        return {}
    marks = ",".join("?" * len(call_ids))
    rows = db.execute(
        f"SELECT call_id, leg, text FROM events WHERE call_id IN ({marks}) AND type = 'segment' "
        "ORDER BY call_id, start_s, id",
        tuple(call_ids),
    ).fetchall()
    segments: dict[str, list[tuple[str, str]]] = {}
    for call_id, leg, text in rows:
        segments.setdefault(str(call_id), []).append((str(leg), str(text or "")))
    found = {c: best_snippet(segs, terms) for c, segs in segments.items()}
    return {c: snippet for c, snippet in found.items() if snippet is not None}


def best_snippet(segments: Sequence[tuple[str, str]], terms: Sequence[str]) -> Snippet | None:
    best: tuple[int, str, str, list[re.Match[str]]] | None = None
    for leg, text in segments:
        words = list(_WORD.finditer(text))
        hits = {t for w in words for t in terms if w.group().casefold().startswith(t)}
        if hits and (best is None or len(hits) > best[0]):
            best = (len(hits), leg, text, words)
            if len(hits) == len(terms):
                break
    if best is None:
        return None
    _, leg, text, words = best
    matches = [w for w in words if any(w.group().casefold().startswith(t) for t in terms)]
    first = words.index(matches[0])
    begin = max(0, min(first - SNIPPET_WORDS // 4, len(words) - SNIPPET_WORDS))
    shown = words[begin : begin + SNIPPET_WORDS]
    cut_from = 0 if begin == 0 else shown[0].start()
    cut_to = len(text) if begin + SNIPPET_WORDS >= len(words) else shown[-1].end()
    out, at = [], cut_from
    for w in matches:
        if cut_from <= w.start() and w.end() <= cut_to:
            out += [html.escape(text[at : w.start()], quote=False), "<mark>", w.group(), "</mark>"]
            at = w.end()
    out.append(html.escape(text[at:cut_to], quote=False))
    marked = "".join(out).strip()
    return Snippet(leg, ("…" if cut_from else "") + marked + ("…" if cut_to < len(text) else ""))
