"""What an API key may do: its scope, written after the key in `[api] keys` (`"KEY:read"`).

- `ingest`: send audio on every audio route (WebSocket front ends, Twilio's, files); it may not
  read calls, transcripts, events or webhooks.
- `read`: read calls, transcripts, search, live events and webhooks; it may not send audio.
- `admin`: everything, DELETE and webhook retries included.

A key written without a scope is `admin`, what every key could do before scopes. The same key
may be listed twice with two scopes (`"K:ingest", "K:read"`): it has both. A key that itself
contains a colon stays whole unless what follows its last colon is a scope's name; a suffix
that is nearly one (`"K:raed"`) is refused at start rather than read as a key of its own.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Final

INGEST: Final = "ingest"
READ: Final = "read"
ADMIN: Final = "admin"
SCOPES: Final = (INGEST, READ, ADMIN)


class BadScope(ValueError):
    """An `[api] keys` entry whose scope is misspelt."""


def parse_key(entry: str) -> tuple[str, str]:
    """`"KEY:scope"` -> (KEY, scope); `"KEY"` -> (KEY, admin)."""
    key, colon, scope = entry.rpartition(":")
    if colon and key and scope in SCOPES:
        return key, scope
    if colon and key and scope.isalpha():
        near = difflib.get_close_matches(scope.lower(), SCOPES, n=1, cutoff=0.6)
        if near:
            raise BadScope(
                f"unknown scope {scope!r} (did you mean {near[0]!r}?): "
                "a key's scope is ingest, read or admin"
            )
    return entry, ADMIN


def key_scopes(entries: Iterable[str]) -> dict[str, frozenset[str]]:
    """Each key and every scope it is listed with."""
    scopes: dict[str, set[str]] = {}
    for entry in entries:
        if entry:
            key, scope = parse_key(entry)
            scopes.setdefault(key, set()).add(scope)
    return {key: frozenset(s) for key, s in scopes.items()}


def allows(held: frozenset[str], needed: str) -> bool:
    return ADMIN in held or needed in held
