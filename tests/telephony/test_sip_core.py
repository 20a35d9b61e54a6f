"""Backend-neutral SIP pieces: rejections, allow-list, labels, 400 for malformed, digest."""

from __future__ import annotations

import hashlib

import pytest

from api.config import SipConfig
from engine.base import EngineFull
from telephony.call import Draining
from telephony.sip import digest
from telephony.sip.core import (
    AllowList,
    Forbidden,
    bad_request,
    call_labels,
    request_problem,
    sip_rejection,
)
from telephony.sip.sdp import NoCommonCodec, SdpError

INVITE = (
    "INVITE sip:bridge@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.1.1.1:5062;branch=z9hG4bK1\r\n"
    "From: <sip:a@x>;tag=1\r\nTo: <sip:b@y>\r\nCall-ID: c1\r\nCSeq: {cseq}\r\n"
    "Content-Length: 0\r\n\r\n"
)


@pytest.mark.parametrize(
    ("exc", "status", "retry"),
    [
        (EngineFull("full"), 486, False),
        (Draining("bye"), 503, True),
        (Forbidden("no"), 403, False),
        (NoCommonCodec("g729"), 488, False),
        (SdpError("junk"), 400, False),
    ],
)
def test_one_table_of_rejections(exc: Exception, status: int, retry: bool) -> None:
    reject = sip_rejection(exc, SipConfig(retry_after_s=12))
    assert reject.status == status
    assert (reject.headers.get("Retry-After") == "12") is retry


def test_allow_list() -> None:
    allow = AllowList(["10.0.0.0/8", "2001:db8::/32"])
    allow.check("10.2.3.4")
    allow.check("2001:db8::1")
    for source in ("192.168.1.1", "not-an-ip"):
        with pytest.raises(Forbidden):
            allow.check(source)


def test_labels_take_ids_identity_and_x_headers_only() -> None:
    headers = [
        ("Call-ID", "abc@host"),
        ("From", '"Alice" <sip:alice@x>;tag=9'),
        ("To", "<sip:bridge@y>"),
        ("P-Asserted-Identity", "<tel:+15550100>"),
        ("X-Tenant", "acme\x00\x07"),
        ("Authorization", "Digest secret"),
    ]
    assert call_labels(headers, ("10.0.0.1", 5060)) == {
        "remote": "10.0.0.1:5060",
        "sip_call_id": "abc@host",
        "from": '"Alice" <sip:alice@x>;tag=9',
        "to": "<sip:bridge@y>",
        "p_asserted_identity": "<tel:+15550100>",
        "x-tenant": "acme",
    }


def test_well_formed_request_has_no_problem() -> None:
    assert request_problem(INVITE.format(cseq="1 INVITE").encode()) is None


@pytest.mark.parametrize("cseq", ["one INVITE", "1 BYE"])
def test_malformed_request_gets_a_routable_400(cseq: str) -> None:
    data = INVITE.format(cseq=cseq).encode()
    problem = request_problem(data)
    assert problem is not None
    reply = bad_request(data, problem)
    assert reply is not None
    lines = reply.decode().split("\r\n")
    assert lines[0].startswith("SIP/2.0 400 Bad Request")
    assert "Via: SIP/2.0/UDP 10.1.1.1:5062;branch=z9hG4bK1" in lines
    assert "Call-ID: c1" in lines and reply.endswith(b"Content-Length: 0\r\n\r\n")


def test_garbage_without_via_and_broken_responses_get_nothing() -> None:
    assert bad_request(b"\x00\x01hello", "x") is None
    assert bad_request(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h\r\n\r\n", "x") is None


def test_digest_round_trip_rfc2617_style() -> None:
    nonces = digest.NonceBook()
    nonce = nonces.issue()
    params = digest.parse_params(digest.challenge("stt-bridge", nonce))
    assert params["realm"] == "stt-bridge" and params["qop"] == "auth"

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1, ha2 = md5("pbx:stt-bridge:s3cret"), md5("INVITE:sip:bridge@10.0.0.2")
    response = md5(f"{ha1}:{nonce}:00000001:c0ffee:auth:{ha2}")
    header = (
        f'Digest username="pbx", realm="stt-bridge", nonce="{nonce}", '
        f'uri="sip:bridge@10.0.0.2", response="{response}", qop=auth, nc=00000001, '
        'cnonce="c0ffee", algorithm=MD5'
    )
    # What the user agent does with each: take the call, 403, or challenge (again).
    ok, refused, challenge = digest.Verdict.OK, digest.Verdict.FORBIDDEN, digest.Verdict.CHALLENGE
    assert digest.check(header, "INVITE", "pbx", "s3cret", "stt-bridge", nonces) is ok
    assert digest.check(header, "INVITE", "pbx", "wrong", "stt-bridge", nonces) is refused
    assert digest.check(header, "INVITE", "eve", "s3cret", "stt-bridge", nonces) is refused
    assert digest.check(header, "BYE", "pbx", "s3cret", "stt-bridge", nonces) is refused
    assert digest.check(None, "INVITE", "pbx", "s3cret", "stt-bridge", nonces) is challenge
    stale = digest.NonceBook()  # another process's (or an expired) nonce: a fresh challenge
    assert digest.check(header, "INVITE", "pbx", "s3cret", "stt-bridge", stale) is challenge


def test_nonce_expires() -> None:
    nonces = digest.NonceBook(ttl_s=60)
    nonce = nonces.issue(now=1000.0)
    assert nonces.valid(nonce, now=1030.0) and not nonces.valid(nonce, now=1100.0)
    assert not nonces.valid("1000.forged", now=1001.0)
