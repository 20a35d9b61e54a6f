"""HTTP digest authentication of INVITEs (RFC 3261 §22, RFC 2617/7616 MD5), sans I/O.

The 401 carries a nonce we can check without storing it: a timestamp and its HMAC under a
per-process key, valid for a few minutes. `verify` recomputes the response the caller sent.
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


class NonceBook:
    def __init__(self, ttl_s: float = NONCE_TTL_S) -> None:
        self._key = secrets.token_bytes(16)
        self.ttl_s = ttl_s

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
    if _answers(params, method, user, password, realm):
        return Verdict.OK
    return Verdict.FORBIDDEN


def _answers(params: dict[str, str], method: str, user: str, password: str, realm: str) -> bool:
    """The credentials are these, and the response is the one the password gives."""
    if params.get("username") != user or params.get("realm") != realm:
        return False
    if params.get("algorithm", "MD5").upper() != "MD5":
        return False
    return hmac.compare_digest(
        params.get("response", ""), expected_response(params, method, password)
    )
