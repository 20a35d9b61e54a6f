"""HTTP digest authentication of INVITEs (RFC 3261 §22, RFC 2617/7616 MD5), sans I/O.

The 401 carries a nonce we can check without storing it: a timestamp and its HMAC under a
per-process key, valid for a few minutes. `check` recomputes the response the caller sent.
Replays are refused: each (nonce, nonce-count) answers one request (a client with qop=auth
counts up `nc` to reuse a nonce; one without qop gets one request per nonce), and a replayed
one gets a fresh challenge. What is remembered for that expires with the nonces, bounded.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import time
from typing import Final

NONCE_TTL_S: Final = 300.0
MAX_USES_KEPT: Final = 100_000  # (nonce, nc) pairs remembered at most; the oldest go first


class NonceBook:
    def __init__(self, ttl_s: float = NONCE_TTL_S) -> None:
        self._key = secrets.token_bytes(16)
        self.ttl_s = ttl_s
        self._used: dict[tuple[str, str], float] = {}  # (nonce, nc) -> the nonce's time

    def first_use(self, nonce: str, nc: str, now: float | None = None) -> bool:
        """Record one use of a valid nonce with nonce-count `nc`; False if it was used before
        (a replayed request)."""
        now = time.time() if now is None else now
        if (nonce, nc) in self._used:
            return False
        if len(self._used) >= MAX_USES_KEPT:
            self._forget(now)
        self._used[(nonce, nc)] = float(nonce.partition(".")[0] or 0)
        return True

    def _forget(self, now: float) -> None:
        """Uses of expired nonces (their replay is refused as stale anyway); if every one is
        still fresh, the oldest half."""
        fresh = {k: t for k, t in self._used.items() if now - t <= self.ttl_s}
        if len(fresh) >= MAX_USES_KEPT:
            fresh = dict(list(fresh.items())[len(fresh) // 2 :])
        self._used = fresh

    def issue(self, now: float | None = None) -> str:
        stamp = str(int(time.time() if now is None else now))
        return f"{stamp}.{self._sign(stamp)}"

    def valid(self, nonce: str, now: float | None = None) -> bool:
        stamp, _, signature = nonce.partition(".")
        if not stamp.isdigit() or not hmac.compare_digest(signature, self._sign(stamp)):
            return False
        age = (time.time() if now is None else now) - int(stamp)
        return 0 <= age <= self.ttl_s

    def _sign(self, stamp: str) -> str:
        return hmac.new(self._key, stamp.encode(), hashlib.sha256).hexdigest()[:32]


def challenge(realm: str, nonce: str) -> str:
    return f'Digest realm="{realm}", nonce="{nonce}", algorithm=MD5, qop="auth"'


def parse_params(header: str) -> dict[str, str]:
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return {}
    pairs = re.findall(r'([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]+)', rest)
    return {key.lower(): value.strip('"') for key, value in pairs}


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def expected_response(params: dict[str, str], method: str, password: str) -> str:
    ha1 = _md5(f"{params.get('username', '')}:{params.get('realm', '')}:{password}")
    ha2 = _md5(f"{method}:{params.get('uri', '')}")
    if params.get("qop"):
        parts = [params.get(k, "") for k in ("nonce", "nc", "cnonce", "qop")]
        return _md5(f"{ha1}:{':'.join(parts)}:{ha2}")
    return _md5(f"{ha1}:{params.get('nonce', '')}:{ha2}")


class Verdict(enum.Enum):
    OK = "ok"
    CHALLENGE = "challenge"  # no credentials, or a nonce that is not (or no longer) ours: 401
    FORBIDDEN = "forbidden"  # an answer to our fresh nonce with the wrong user or password: 403


def check(
    header: str | None, method: str, user: str, password: str, realm: str, nonces: NonceBook
) -> Verdict:
    """What to do with a request's Authorization header (None: it had none)."""
    if header is None:
        return Verdict.CHALLENGE
    params = parse_params(header)
    if not nonces.valid(params.get("nonce", "")):
        return Verdict.CHALLENGE
    if not _answers(params, method, user, password, realm):
        return Verdict.FORBIDDEN
    if not nonces.first_use(params["nonce"], params.get("nc", "")):
        return Verdict.CHALLENGE  # a replay: the real client answers a fresh nonce again
    return Verdict.OK


def _answers(params: dict[str, str], method: str, user: str, password: str, realm: str) -> bool:
    """The credentials are these, and the response is the one the password gives."""
    if params.get("username") != user or params.get("realm") != realm:
        return False
    if params.get("algorithm", "MD5").upper() != "MD5":
        return False
    return hmac.compare_digest(
        params.get("response", ""), expected_response(params, method, password)
    )
