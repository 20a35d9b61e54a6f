"""The documentation keeps up with the code: every route the service serves is documented,
and every setting the documentation names exists (README.md and docs/*.md)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from api.app import build_audio_app, build_health_app
from api.config import ENV_PREFIX, Config
from tests.conftest import ServiceFactory, make_config

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = {f.name: f for f in dataclasses.fields(Config)}
# Named in the docs on purpose without being settings: the example of a mistyped variable,
# and fields of /info's answer (which read like settings: `sip.listening`).
NOT_SETTINGS = frozenset({"STT_BRIDGE_SERVER_PROT"})
INFO_FIELDS = frozenset(
    {
        "audiosocket.listening",
        "engine.nodes",
        "sip.agent_pid",
        "sip.agent_restarts",
        "sip.call_cap",
        "sip.dialogs",
        "sip.listening",
        "sip.notes",
        "sip.reason",
        "sip.rtp_ports_in_use",
        "sip.siprec",
    }
)


def docs_text() -> str:
    return "\n".join(path.read_text() for path in DOCS)


def placeholders(text: str) -> str:
    return re.sub(r"\{[^}/]*\}", "{}", text)


def keys(section: str) -> set[str]:
    return {f.name for f in dataclasses.fields(typing.get_type_hints(Config)[section])}


async def test_every_route_is_documented(start_service: ServiceFactory) -> None:
    service = await start_service(make_config(name="sink"))
    text = docs_text()
    missing = []
    for app in (build_audio_app(service.bridge), build_health_app(service.bridge)):
        for route in app.router.routes():
            info = route.resource.get_info() if route.resource is not None else {}
            path = str(info.get("path") or info.get("formatter") or info.get("prefix") or "")
            if route.method == "HEAD" or path.startswith("/static") or path in ("", "/"):
                continue
            # A route under any prefix ("/{prefix}/v1/listen") is documented by its own path;
            # a placeholder's name is the docs' own ("{id}" for the router's "{call_id}").
            documented = placeholders(re.sub(r"^/\{[^}]*\}", "", path))
            if documented not in placeholders(text):
                missing.append(f"{route.method} {path}")
    assert not missing, f"routes no document mentions: {sorted(set(missing))}"


def test_every_setting_the_docs_name_exists() -> None:
    text = docs_text()
    unknown = []
    # A name that ends in "_" is a pattern ("STT_BRIDGE_LIMITS_<KEY>").
    for name in sorted(
        set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]*[A-Z0-9]\b", text)) - NOT_SETTINGS
    ):
        rest = name.removeprefix(ENV_PREFIX).lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None or rest.removeprefix(section + "_") not in keys(section):
            unknown.append(name)
    for section, key in set(re.findall(r"`(\w+)\.(\w+)`", text)):
        if f"{section}.{key}" in INFO_FIELDS:
            continue
        if section in SECTIONS and key not in keys(section):
            unknown.append(f"{section}.{key}")
    for section, body in re.findall(r"^\[(\w+)\]\n((?:\w+ = .*\n)+)", text, re.M):
        if section in SECTIONS:
            unknown += [
                f"{section}.{key}"
                for key in re.findall(r"^(\w+) =", body, re.M)
                if key not in keys(section)
            ]
    assert not unknown, f"settings the docs name that do not exist: {sorted(set(unknown))}"
