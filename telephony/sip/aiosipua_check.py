"""The aiosipua internals the asyncio backend relies on, checked once when SIP starts.

aiosipua (pinned ==0.7.1, alpha) has no public hook for three things the backend needs:
- `SipTransport._dispatch(data, addr)`: every message passes here before it is parsed; our guard
  overrides it (rate limit, a 400 for what the parser would drop without an answer);
- `TcpSipTransport._handle_connection(reader, writer)`: per-connection limits, and the moment a
  caller's connection closes (a call not yet answered on it ends at once);
- `SipUAS._calls`: the library's table of calls; nothing public removes a call we ended
  ourselves (our BYE, a rejection never ACKed), so without it the table grows with every call.

Everything else goes through public names (responses built with `Dialog.create_response` and sent
with `SipTransport.send_reply`, 2xx retransmission off with `SipUAS(retransmit_2xx=False)` and
done by the backend). A release that renames one of the three would break SIP quietly (a guard
never called, a table that only grows); this check says so in one line instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Final

TESTED_VERSION: Final = "0.7.1"


@dataclass(frozen=True)
class Internal:
    """One private name: on `owner` (a class, or an instance for per-instance attributes), a
    method taking `parameters` (after self), or, with `parameters` None, a dict attribute."""

    owner: str
    name: str
    parameters: tuple[str, ...] | None
    why: str


REQUIRED: Final = (
    Internal("SipTransport", "_dispatch", ("data", "addr"), "our guard sees each message first"),
    Internal(
        "TcpSipTransport",
        "_handle_connection",
        ("reader", "writer"),
        "TCP limits, and calls ended when their connection closes",
    ),
    Internal("SipUAS", "_calls", None, "ended calls are removed from the library's table"),
)


def installed_version() -> str:
    try:
        return metadata.version("aiosipua")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def installed_owners() -> dict[str, object]:
    """The installed library's classes, and a SipUAS instance (its table is made per instance;
    building one opens no socket)."""
    from aiosipua import SipTransport, SipUAS, TcpSipTransport, UdpSipTransport

    return {
        "SipTransport": SipTransport,
        "TcpSipTransport": TcpSipTransport,
        "SipUAS": SipUAS(UdpSipTransport()),
    }


def _missing(owner: object, item: Internal) -> str:
    """Why `owner` does not offer `item` as we use it; "" when it does."""
    found = getattr(owner, item.name, None)
    if found is None:
        return "lacks"
    if item.parameters is None:
        return "" if isinstance(found, dict) else "has a changed"
    if not callable(found):
        return "has a changed"
    try:
        parameters = tuple(inspect.signature(found).parameters)
    except (TypeError, ValueError):
        return "has a changed"
    if parameters[:1] == ("self",):  # looked up on the class: unbound
        parameters = parameters[1:]
    return "" if parameters == item.parameters else "has a changed"


def mismatch(owners: Mapping[str, object] | None = None, version: str | None = None) -> str:
    """One line naming the first internal the installed aiosipua lacks, or "" when all are
    there. `owners`/`version` stand in for the installed library (tests)."""
    found = installed_owners() if owners is None else owners
    release = installed_version() if version is None else version
    for item in REQUIRED:
        owner = found.get(item.owner)
        how = "lacks" if owner is None else _missing(owner, item)
        if how:
            return (
                f"aiosipua {release} {how} {item.owner}.{item.name} ({item.why}); "
                f"stt-bridge's SIP is tested with aiosipua=={TESTED_VERSION}"
            )
    return ""
