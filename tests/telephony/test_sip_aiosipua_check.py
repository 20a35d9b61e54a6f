"""The aiosipua internals the SIP backend touches are checked at start against the installed
release: every one is there in the pinned version, and a release without one is named in one
line (and SIP stays off, the other front ends on)."""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path

import aiohttp
import pytest
from aiosipua import SipTransport, SipUAS, TcpSipTransport, UdpSipTransport

from telephony.sip import aiosipua_check
from telephony.sip.aiosipua_check import REQUIRED, TESTED_VERSION, installed_version, mismatch
from tests.conftest import ServiceFactory, make_config

SIP_CODE = Path(aiosipua_check.__file__).parent


def test_the_installed_aiosipua_has_every_internal_we_touch() -> None:
    assert installed_version() == TESTED_VERSION  # the pin in pyproject.toml
    assert mismatch() == ""


class _TransportWithoutDispatch:
    """A stand-in for a release that renamed `SipTransport._dispatch`."""

    def send(self) -> None: ...


class _TcpWithChangedConnectionHandler(TcpSipTransport):
    async def _handle_connection(self, stream: object) -> None:  # type: ignore[override]
        """A release whose handler takes one argument instead of (reader, writer)."""


def owners(**changed: object) -> dict[str, object]:
    found: dict[str, object] = {
        "SipTransport": SipTransport,
        "TcpSipTransport": TcpSipTransport,
        "SipUAS": SipUAS(UdpSipTransport()),
    }
    return {**found, **changed}


def test_a_release_without_an_internal_is_named_in_one_line() -> None:
    line = mismatch(owners(SipTransport=_TransportWithoutDispatch), version="0.9.0")
    assert line.startswith("aiosipua 0.9.0 lacks SipTransport._dispatch (")
    assert line.endswith(f"tested with aiosipua=={TESTED_VERSION}") and "\n" not in line


def test_a_changed_signature_is_named() -> None:
    line = mismatch(owners(TcpSipTransport=_TcpWithChangedConnectionHandler), version="0.8.0")
    assert line.startswith("aiosipua 0.8.0 has a changed TcpSipTransport._handle_connection")


def test_a_call_table_that_is_no_longer_a_dict_is_named() -> None:
    uas = SipUAS(UdpSipTransport())
    uas._calls = []  # type: ignore[assignment]  # a release that keeps its calls as a list
    assert mismatch(owners(SipUAS=uas), version="0.8.0").startswith(
        "aiosipua 0.8.0 has a changed SipUAS._calls"
    )
    assert mismatch(owners(SipUAS=object()), version="0.8.0").startswith(
        "aiosipua 0.8.0 lacks SipUAS._calls"
    )


def test_every_private_aiosipua_name_the_sip_code_uses_is_checked() -> None:
    """A new `obj._name` in telephony/sip/ on an aiosipua object must join REQUIRED (or be
    replaced by a public hook): the names that are not ours, found in the source."""
    ours = {"_dispatch", "_handle_connection", "_calls"}
    assert {item.name for item in REQUIRED} == ours
    own_names: set[str] = set()
    used: set[str] = set()
    for path in SIP_CODE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own_names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own_names.add(node.attr)
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                own_names.add(node.target.id)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                used.add(node.attr)
    dunder = {name for name in used if name.startswith("__")}
    library = used - dunder - (own_names - ours)
    assert library == ours, library - ours


async def test_a_mismatch_leaves_sip_off_with_its_line(
    start_service: ServiceFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    line = mismatch(owners(SipTransport=_TransportWithoutDispatch), version="0.9.0")
    monkeypatch.setattr(aiosipua_check, "mismatch", lambda: line)
    base = make_config()
    config = dataclasses.replace(
        base, sip=dataclasses.replace(base.sip, enabled=True, host="127.0.0.1", port=0)
    )
    with caplog.at_level(logging.ERROR, logger="telephony.sip.backend"):
        service = await start_service(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "telephony.sip.backend"]
    assert lines == [f"SIP is off: {line}"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{service.ports['health']}/info") as response:
            sip = (await response.json())["sip"]
    assert not sip["listening"] and sip["reason"] == line
    assert "sip" not in service.ports
