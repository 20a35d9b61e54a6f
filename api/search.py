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

MAX_QUERY_CHARS: Final = 500
MAX_TERMS: Final = 16
SNIPPET_WORDS: Final = 16
FEW: Final = 2000  # PostgreSQL: fewer hits than this are looked up by call id
MERGE_MAX_CHARS: Final = 100_000  # a longer call keeps its rows (a tsvector is at most 1 MB)
DOC_SHIFT: Final = 20  # a call's segments: rowids doc << 20 | 1 .. 2**20 - 1
SEGMENT_MASK: Final = (1 << DOC_SHIFT) - 1
_WORD = re.compile(r"[^\W_]+")


class BadQuery(ValueError):
    """A search the index cannot answer: no word in it, or too long (400)."""


class Db(Protocol):
    """The part of api/store.py's `Database` the index uses."""

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
        rows = db.execute(
            "SELECT text FROM transcript_index WHERE call_id = ? ORDER BY id", (call_id,)
        ).fetchall()
        text = "\n".join(r[0] for r in rows)
        if len(rows) < 2 or len(text) > MERGE_MAX_CHARS:
            return
        db.execute("DELETE FROM transcript_index WHERE call_id = ?", (call_id,))
        db.execute(
            "INSERT INTO transcript_index (call_id, leg, text, words) "
            "VALUES (?, '', ?, to_tsvector('simple', ?))",
            (call_id, text, text),
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


def matching_calls(db: Db, terms: Sequence[str]) -> tuple[str, str, list[Any]]:
    """What narrows `FROM calls` to the calls that hold every term: a join, a condition (each
    to put in the caller's SQL) and the condition's arguments."""
    if db.postgres:
        one = "SELECT call_id FROM transcript_index WHERE words @@ to_tsquery('simple', ?)"
        hits = " INTERSECT ".join([one] * len(terms))
        queries = [f"{t}:*" for t in terms]
        # PostgreSQL cannot tell how many calls a prefix matches: for a rare word it walked
        # every call newest first looking for one (80 ms at 100k calls). So each word's calls
        # are asked for first, up to FEW: with a rare word among them, its calls are narrowed
        # by the other words and looked up by id; with none, the index answers as a whole.
        for n, query in enumerate(queries):
            # Rows, not distinct calls: LIMIT then stops the scan early (a common word's DISTINCT
            # read all its rows first); fewer rows than FEW is fewer calls than FEW too.
            rows = db.execute(
                "SELECT call_id FROM transcript_index WHERE words @@ to_tsquery('simple', ?) "
                "LIMIT ?",
                (query, FEW),
            ).fetchall()
            if len(rows) < FEW:
                ids = list(dict.fromkeys(r[0] for r in rows))
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
                return "", "calls.id = ANY(?)", [ids]
        if len(queries) == 1:
            return "", f"calls.id IN ({hits})", queries
        # Only common words. An ended call is one row: one AND query finds it. The words of a
        # call with a row per segment (live, or live again) may be spread over its rows: they
        # are intersected per call, among those calls alone, named here (so PostgreSQL looks
        # them up by id rather than reading every row of each word: 4.7 s at 100k calls).
        together = "SELECT call_id FROM transcript_index WHERE words @@ to_tsquery('simple', ?)"
        spread = [
            r[0]
            for r in db.execute(
                "SELECT DISTINCT call_id FROM transcript_index WHERE leg <> ''"
            ).fetchall()
        ]
        if not spread:
            return "", f"calls.id IN ({together})", [" & ".join(queries)]
        per_call = (
            "SELECT call_id FROM transcript_index "
            "WHERE call_id = ANY(?) AND words @@ to_tsquery('simple', ?)"
        )
        either = f"{together} UNION ({' INTERSECT '.join([per_call] * len(queries))})"
        args: list[Any] = [" & ".join(queries)]
        for query in queries:
            args += [spread, query]
        return "", f"calls.id IN ({either})", args
    # From each call's number to the call: one integer lookup per hit, before its text key.
    one = "SELECT rowid >> 20 FROM transcript_index WHERE transcript_index MATCH ?"
    docs = " INTERSECT ".join([one] * len(terms))
    join = "JOIN search_docs ON search_docs.call_id = calls.id"
    return join, f"search_docs.doc IN ({docs})", [f'"{t}"*' for t in terms]


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
