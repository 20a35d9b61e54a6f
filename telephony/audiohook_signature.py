"""The HTTP Message Signature on AudioHook's upgrade request, checked as Genesys's reference
server checks it (app/src/authenticator.ts, app/audiohook/src/httpsignature/signature-verifier.ts
in purecloudlabs/audiohook-reference-implementation; the draft that became RFC 9421).

Genesys signs `@request-target` (path and query), `@authority` (the Host), the three
`audiohook-*-id` headers and `x-api-key` with HMAC-SHA256 under the base-64-decoded client
secret; parameters `keyid` (the API key), `nonce`, `alg`, `created`, `expires`. The signature
base is rebuilt from the parsed `Signature-Input` (so a sloppy signer fails), one
`"<component>": value` line each, then `"@signature-params": <the inner list>`.

Only what this check needs of RFC 8941 structured fields is parsed here: dictionaries of inner
lists of strings and of byte sequences, with parameters.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

MAX_CLOCK_SKEW_S: Final = 3
MAX_SIGNATURE_AGE_S: Final = 10
MIN_NONCE_CHARS: Final = 22
REQUIRED: Final = (
    "@request-target",
    "@authority",
    "audiohook-organization-id",
    "audiohook-session-id",
    "audiohook-correlation-id",
    "x-api-key",
)
DERIVED: Final = frozenset(
    {"@method", "@authority", "@scheme", "@target-uri", "@request-target", "@path", "@query"}
)
PARAMETERS: Final = frozenset({"alg", "created", "expires", "keyid", "nonce"})
_KEY: Final = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN: Final = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")
_NUMBER: Final = re.compile(r"-?\d{1,15}(\.\d{1,3})?")

BareItem = str | int | float | bool | bytes
Params = tuple[tuple[str, BareItem], ...]


@dataclass(frozen=True)
class Token:
    """An sf-token (kept apart from strings: it is encoded without quotes)."""

    text: str


@dataclass(frozen=True)
class Item:
    value: BareItem | Token
    params: Params = ()


@dataclass(frozen=True)
class InnerList:
    items: tuple[Item, ...]
    params: Params = ()


class StructuredFieldError(ValueError):
    """Not an RFC 8941 dictionary."""


# --- RFC 8941, the parts a signature header needs ---------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""

    def skip(self, chars: str) -> None:
        while self.peek() and self.peek() in chars:
            self.at += 1

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise StructuredFieldError(f"expected {char!r} at {self.at}")
        self.at += 1

    def match(self, pattern: re.Pattern[str]) -> str:
        found = pattern.match(self.text, self.at)
        if found is None:
            raise StructuredFieldError(f"unexpected character at {self.at}")
        self.at = found.end()
        return found.group()

    def dictionary(self) -> dict[str, Item | InnerList]:
        members: dict[str, Item | InnerList] = {}
        self.skip(" ")
        while self.at < len(self.text):
            key = self.match(_KEY)
            if self.peek() == "=":
                self.at += 1
                members[key] = self.member()
            else:
                members[key] = Item(True, self.params())
            self.skip(" \t")
            if self.at >= len(self.text):
                break
            self.expect(",")
            self.skip(" \t")
            if self.at >= len(self.text):
                raise StructuredFieldError("trailing comma")
        return members

    def member(self) -> Item | InnerList:
        if self.peek() == "(":
            self.at += 1
            items: list[Item] = []
            while True:
                self.skip(" ")
                if self.peek() == ")":
                    self.at += 1
                    return InnerList(tuple(items), self.params())
                items.append(Item(self.bare(), self.params()))
                if self.peek() not in (" ", ")"):
                    raise StructuredFieldError(f"bad inner list at {self.at}")
        return Item(self.bare(), self.params())

    def params(self) -> Params:
        out: list[tuple[str, BareItem]] = []
        while self.peek() == ";":
            self.at += 1
            self.skip(" ")
            key = self.match(_KEY)
            value: BareItem = True
            if self.peek() == "=":
                self.at += 1
                bare = self.bare()
                value = bare.text if isinstance(bare, Token) else bare
            out = [(k, v) for k, v in out if k != key] + [(key, value)]
        return tuple(out)

    def bare(self) -> BareItem | Token:
        char = self.peek()
        if char == '"':
            return self.string()
        if char == ":":
            self.at += 1
            end = self.text.find(":", self.at)
            if end < 0:
                raise StructuredFieldError("unterminated byte sequence")
            encoded, self.at = self.text[self.at : end], end + 1
            try:
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise StructuredFieldError("byte sequence is not base-64") from None
        if char == "?":
            self.at += 1
            flag = self.peek()
            if flag not in ("0", "1"):
                raise StructuredFieldError("bad boolean")
            self.at += 1
            return flag == "1"
        if char == "-" or char.isdigit():
            number = self.match(_NUMBER)
            return float(number) if "." in number else int(number)
        return Token(self.match(_TOKEN))

    def string(self) -> str:
        self.expect('"')
        out: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise StructuredFieldError("unterminated string")
            self.at += 1
            if char == '"':
                return "".join(out)
            if char == "\\":
                escaped = self.peek()
                if escaped not in ('"', "\\"):
                    raise StructuredFieldError("bad escape in string")
                self.at += 1
                out.append(escaped)
            elif not " " <= char <= "~":
                raise StructuredFieldError("non-ASCII character in string")
            else:
                out.append(char)


def parse_dictionary(text: str) -> dict[str, Item | InnerList]:
    return _Parser(text.strip()).dictionary()


def encode_bare(value: BareItem | Token) -> str:
    if isinstance(value, Token):
        return value.text
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, bytes):
        return f":{base64.b64encode(value).decode()}:"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_params(params: Params) -> str:
    return "".join(
        f";{key}" if value is True else f";{key}={encode_bare(value)}" for key, value in params
    )


def encode_inner_list(inner: InnerList) -> str:
    items = " ".join(encode_bare(i.value) + encode_params(i.params) for i in inner.items)
    return f"({items}){encode_params(inner.params)}"


# --- the check --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureCheck:
    """Upstream's VerifyResult: VERIFIED, or why not (UNSIGNED, INVALID, PRECONDITION,
    EXPIRED, FAILED, UNSUPPORTED)."""

    code: str
    reason: str = ""

    @property
    def verified(self) -> bool:
        return self.code == "VERIFIED"

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}" if self.reason else self.code


def canonical_header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if not value:
        return None
    return re.sub(r"[ \t]*\r\n[ \t]+", " ", value.strip())


def verify_request(
    headers: Mapping[str, str],
    request_target: str,
    secret_for: Callable[[str], bytes | None],
    now: float | None = None,
) -> SignatureCheck:
    """Check an upgrade request's signature. `headers`: case-insensitive (aiohttp's);
    `request_target`: the path and query as sent; `secret_for(key)`: that API key's client
    secret, b"" for a key that has none (then an unsigned request passes, as upstream), None
    for a key we do not know."""
    api_key = canonical_header(headers, "x-api-key")
    if not api_key:
        return SignatureCheck("PRECONDITION", 'Missing "X-API-KEY" header field')
    result = _verify(headers, request_target, api_key, secret_for, now)
    if result.code == "UNSIGNED" and secret_for(api_key) == b"":
        return SignatureCheck("VERIFIED")
    return result


def _verify(
    headers: Mapping[str, str],
    request_target: str,
    api_key: str,
    secret_for: Callable[[str], bytes | None],
    now: float | None,
) -> SignatureCheck:
    try:
        inputs = parse_dictionary(headers.get("signature-input", ""))
    except StructuredFieldError:
        return SignatureCheck("INVALID", 'Failed to parse "signature-input" header field')
    try:
        signatures = parse_dictionary(headers.get("signature", ""))
    except StructuredFieldError:
        return SignatureCheck("INVALID", 'Failed to parse "signature" header field')
    if not inputs:
        if not signatures:
            return SignatureCheck("UNSIGNED", 'No "signature" and "signature-input" header fields')
        return SignatureCheck("INVALID", 'Found "signature" but no "signature-input" header field')
    if not signatures:
        return SignatureCheck("INVALID", 'Found "signature-input" but no "signature" header field')
    label, base = next(iter(inputs.items()))
    signature = signatures.get(label)
    if signature is None:
        return SignatureCheck("INVALID", f"Signature with label {label} not found")
    if not isinstance(signature, Item) or not isinstance(signature.value, bytes):
        return SignatureCheck("INVALID", 'Invalid "signature" header field value')
    if not isinstance(base, InnerList) or not all(isinstance(i.value, str) for i in base.items):
        return SignatureCheck("INVALID", 'Invalid "signature-input" header field value')
    if not base.params:
        return SignatureCheck(
            "INVALID", 'Invalid "signature-input" header field value (no parameters)'
        )
    params = dict(base.params)
    for key, param in base.params:
        if key not in PARAMETERS:
            return SignatureCheck("INVALID", f"unknown parameter {key}")
        integer = key in ("created", "expires")
        is_count = isinstance(param, int) and not isinstance(param, bool) and param >= 0
        if (integer and not is_count) or (not integer and not isinstance(param, str)):
            return SignatureCheck("INVALID", f"bad {key} parameter")
    now = time.time() if now is None else now
    created = params.get("created")
    expires = params.get("expires")
    # Upstream's comparisons, skew included as it adds it.
    if isinstance(created, int) and created > now + MAX_CLOCK_SKEW_S:
        return SignatureCheck(
            "PRECONDITION", 'Invalid "created" parameter value (time in the future)'
        )
    if isinstance(expires, int) and expires and expires < now + MAX_CLOCK_SKEW_S:
        return SignatureCheck("EXPIRED")
    if not isinstance(created, int) or not created:
        return SignatureCheck(
            "PRECONDITION", 'Cannot determine signature age (no "created" signature parameter)'
        )
    if created + MAX_SIGNATURE_AGE_S < now + MAX_CLOCK_SKEW_S:
        return SignatureCheck("EXPIRED")

    lines: list[str] = []
    seen: set[str] = set()
    for item in base.items:
        name = str(item.value)
        if item.params:
            return SignatureCheck("INVALID", f"component parameters on {name}")
        if name in seen:
            return SignatureCheck("INVALID", f"Duplicate {name} component reference")
        if name.startswith("@"):
            if name not in DERIVED:
                return SignatureCheck("INVALID", f"Unknown derived component ({name})")
            derived = {
                "@request-target": request_target,
                "@authority": canonical_header(headers, "host"),
            }.get(name)
            if not derived:
                return SignatureCheck("PRECONDITION", f"Cannot resolve reference to {name}")
            text = derived
        else:
            if name == "signature":
                return SignatureCheck("UNSUPPORTED", "Reference to component signature")
            field = canonical_header(headers, name)
            if field is None:
                return SignatureCheck("PRECONDITION", f"Header field {name} not present")
            text = field
        lines.append(f"{encode_bare(name)}: {text}")
        seen.add(name)
    missing = [name for name in REQUIRED if name not in seen]
    if missing:
        return SignatureCheck(
            "PRECONDITION", f"Signature does not cover some of the required component(s): {missing}"
        )
    lines.append(f'"@signature-params": {encode_inner_list(base)}')

    nonce = params.get("nonce")
    if not isinstance(nonce, str) or not nonce:
        return SignatureCheck("PRECONDITION", 'Missing "nonce" signature parameter')
    if len(nonce) < MIN_NONCE_CHARS:
        return SignatureCheck("PRECONDITION", 'Provided "nonce" signature parameter is too small')
    if params.get("keyid") != api_key:
        return SignatureCheck("PRECONDITION", "X-API-KEY header field and signature keyid mismatch")
    secret = secret_for(api_key)
    known = secret is not None
    mac_key = secret if secret is not None else os.urandom(32)  # unknown key: equal time
    computed = hmac.new(mac_key, "\n".join(lines).encode("utf-8"), hashlib.sha256).digest()
    matches = hmac.compare_digest(signature.value, computed)
    if params.get("alg", "hmac-sha256") != "hmac-sha256":
        return SignatureCheck("UNSUPPORTED", "Signature algorithm is not supported")
    if matches and known:
        return SignatureCheck("VERIFIED")
    return SignatureCheck("FAILED", "Signatures do not match")


def sign_request(
    components: Mapping[str, str],
    key_id: str,
    secret: bytes,
    nonce: str,
    created: int,
    expires_s: int = 30,
) -> dict[str, str]:
    """`Signature-Input` and `Signature` as Genesys's client builds them (signature-builder.ts):
    for the tests' faithful peer, and for anyone checking a setup by hand."""
    inner = InnerList(
        tuple(Item(name) for name in components),
        (
            ("keyid", key_id),
            ("nonce", nonce),
            ("alg", "hmac-sha256"),
            ("created", created),
            ("expires", created + expires_s),
        ),
    )
    lines = [f"{encode_bare(name)}: {value}" for name, value in components.items()]
    lines.append(f'"@signature-params": {encode_inner_list(inner)}')
    digest = hmac.new(secret, "\n".join(lines).encode("utf-8"), hashlib.sha256).digest()
    return {
        "Signature-Input": f"sig1={encode_inner_list(inner)}",
        "Signature": f"sig1=:{base64.b64encode(digest).decode()}:",
    }
