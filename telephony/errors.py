"""Every rejection a front end can give, in one table.

Errors form one hierarchy (`engine.base.BridgeError`); each front end turns the one it caught
into its own protocol's answer with `rejection_for(exc)`: a SIP status, a WebSocket close
code, an HTTP status before an upgrade. AudioSocket has no codes: it hangs up on any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from engine.base import ENGINE_FULL, ENGINE_LOST, BridgeError, EngineFull, EngineUnavailable
from telephony.call import Call, Draining, DuplicateCall
from telephony.transcript import InvalidOptions


class ProtocolError(BridgeError):
    """Bad input on the wire; the message says what, for the peer's logs.

    The message often quotes the input, and goes back out as a close reason or an error
    message and into our log: a lone surrogate from the wire (JSON's `"\\ud800"`) is written
    as its escape, so the text always encodes to UTF-8.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(_encodable(a) if isinstance(a, str) else a for a in args))


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Rejection:
    sip_status: int
    sip_reason: str
    ws_close: int
    http_status: int


# RFC 6455 close codes: 1013 "Try Again Later", 1008 "Policy Violation", 1007 "Invalid Data",
# 1011 "Internal Error". SIP: RFC 3261 §21.
REJECTIONS: Final[dict[type[BridgeError], Rejection]] = {
    EngineFull: Rejection(486, "Busy Here", 1013, 503),
    Draining: Rejection(503, "Service Unavailable", 1013, 503),
    EngineUnavailable: Rejection(503, "Service Unavailable", 1013, 503),
    DuplicateCall: Rejection(482, "Loop Detected", 1008, 409),
    ProtocolError: Rejection(400, "Bad Request", 1007, 400),
    InvalidOptions: Rejection(400, "Bad Request", 1007, 400),
}
_UNKNOWN: Final = Rejection(500, "Server Internal Error", 1011, 500)


def rejection_for(exc: BaseException) -> Rejection:
    for kind in type(exc).__mro__:
        if kind in REJECTIONS:
            return REJECTIONS[kind]
    return _UNKNOWN


# Calls the engine itself ended (a remote engine): the rejection each end stands for. A stream
# no node would take after all is answered as a full engine at the start would have been; a
# lost node's calls are told to try again (new calls go to the nodes left).
ENGINE_ENDS: Final[dict[str, type[BridgeError]]] = {
    ENGINE_FULL: EngineFull,
    ENGINE_LOST: EngineUnavailable,
}


def ws_close_at_end(call: Call | None) -> tuple[int, bytes]:
    """A WebSocket front end's close code and reason once its call is over: 1000, or the
    rejection of the engine's own end of the call (`ENGINE_ENDS`)."""
    reason = call.engine_reason if call is not None else ""
    kind = ENGINE_ENDS.get(reason)
    if kind is None:
        return 1000, b""
    return REJECTIONS[kind].ws_close, reason.encode()
