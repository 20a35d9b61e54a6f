"""Configuration: one typed object, loaded once from TOML and the environment.

Precedence, lowest first: the defaults below (which `configs/default.toml` spells out),
a TOML file, then environment variables. Every key can be set as
`STT_BRIDGE_<SECTION>_<KEY>` (e.g. `STT_BRIDGE_SERVER_PORT=9000`; lists comma-separated),
and the seed's original variables keep working (see `LEGACY_ENV`).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from api.scopes import BadScope, parse_key
from engine import config_checks as check
from engine.config import EngineConfig, user_dir
from engine.config_checks import ConfigError as ConfigError
from engine.config_checks import did_you_mean
from telephony.audiohook import AudioHookConfig as AudioHookConfig
from telephony.carriers.config import CarriersConfig as CarriersConfig
from telephony.config import AudioSocketConfig as AudioSocketConfig
from telephony.config import LimitsConfig as LimitsConfig
from telephony.config import PrivacyConfig as PrivacyConfig
from telephony.config import TwilioConfig as TwilioConfig
from telephony.sip.config import SipConfig as SipConfig

ENV_PREFIX: Final = "STT_BRIDGE_"
REPO_DEFAULT: Final = Path(__file__).resolve().parent.parent / "configs" / "default.toml"
LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080  # audio WebSockets and the API
    health_port: int = 8001  # /health, /ready, /info, /metrics
    web_port: int = 8000  # the browser client
    websocket_url: str = ""  # what the browser client connects to; "" = same host, `port`
    drain_timeout_s: float = 30.0  # on SIGTERM, how long live calls may go on
    node_id: str = ""  # this node's name in a cluster (recorded with each call); "" = host name
    drain_notice_s: float = 0.0  # on SIGTERM, fail /ready and SIP OPTIONS this long before draining
    workers: int = 1  # front-end processes sharing every port (api/workers.py); 0 = one per core

    def __post_init__(self) -> None:
        check.no_negative_numbers("server", self)
        for name in ("port", "health_port", "web_port"):
            check.port(f"server.{name}", getattr(self, name))


@dataclass(frozen=True)
class DataConfig:
    dir: str = ""  # the store (SQLite) and the webhook outbox; "" = ~/.local/share/stt-bridge
    retention_days: float = 0.0  # delete calls older than this; 0 = keep everything
    url: str = ""  # "postgresql://user@host/db": a store shared by a cluster; "" = SQLite in dir
    lease_s: float = 10.0  # PostgreSQL: a node silent this long is dead; its live calls end
    max_queue_events: int = 100_000  # events waiting for the disk at most (full: dropped, counted)

    def folder(self) -> Path:
        """Where the SQLite store and the webhook outbox live: `dir`, else the user's data folder
        (XDG), the same wherever the service is started."""
        return Path(self.dir) if self.dir else user_dir("data")

    def __post_init__(self) -> None:
        check.no_negative_numbers("data", self)
        if self.url and not self.url.startswith(("postgresql://", "postgres://")):
            raise check.fail("data.url", self.url, 'a "postgresql://user@host/db" URL, or empty')
        check.positive("data.lease_s", self.lease_s)


@dataclass(frozen=True)
class WebhookConfig:
    url: str = ""  # where call.started / segment / call.ended are POSTed; comma-separate several
    secret: str = ""  # HMAC-SHA256 key for the X-STT-Bridge-Signature header
    timeout_s: float = 10.0
    max_attempts: int = 20  # attempts per webhook, then it is dead-lettered; 0 = retry for ever
    backoff_s: float = 1.0  # wait after the first failed attempt, doubled after each
    max_backoff_s: float = 300.0  # the longest wait between two attempts

    def __post_init__(self) -> None:
        for url in (u.strip() for u in self.url.split(",")):
            if url and not url.startswith(("http://", "https://")):
                raise check.fail("webhook.url", url, "http(s):// URLs, comma-separated, or empty")
        check.positive("webhook.timeout_s", self.timeout_s)


@dataclass(frozen=True)
class ApiConfig:
    keys: tuple[str, ...] = ()  # API keys; empty = no authentication
    max_streams_per_key: int = 100  # concurrent WebSockets per key
    requests_per_minute: int = 600  # requests (and stream openings) per key per minute
    # Hosts a pre-recorded request's {"url": ...} may be fetched from ("host" or "host:port");
    # empty = none: the bridge fetches nothing on a client's word (api/routes/files.py).
    fetch_hosts: tuple[str, ...] = ()
    file_max_bytes: int = 64 * 1024 * 1024  # one file sent or fetched for the file routes (413)

    def __post_init__(self) -> None:
        check.no_negative_numbers("api", self)
        for n, entry in enumerate(self.keys, start=1):
            try:
                parse_key(entry)
            except BadScope as exc:  # the message names the entry, never the key
                raise ConfigError(f"api.keys, entry {n}: {exc}", "api.keys") from None


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""  # PEM certificate chain: with `key`, the audio/API and health ports use TLS
    key: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            missing = "tls.key" if self.cert else "tls.cert"
            raise check.fail(missing, "", "tls.cert and tls.key are set together, or neither")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error
    json: bool = False  # one JSON object per line, with call id

    def __post_init__(self) -> None:
        check.choice("log.level", self.level.lower(), LOG_LEVELS)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    audiosocket: AudioSocketConfig = field(default_factory=AudioSocketConfig)
    twilio: TwilioConfig = field(default_factory=TwilioConfig)
    carriers: CarriersConfig = field(default_factory=CarriersConfig)
    audiohook: AudioHookConfig = field(default_factory=AudioHookConfig)
    data: DataConfig = field(default_factory=DataConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        # Two TCP listeners on one port: the second would fail to bind, and its error would
        # name it rather than the setting that took its port first.
        listeners = [
            (f"server.{name}", self.server.host, getattr(self.server, name))
            for name in ("port", "health_port", "web_port")
        ]
        if self.audiosocket.enabled:
            listeners.append(("audiosocket.port", self.audiosocket.host, self.audiosocket.port))
        for n, (setting, host, port) in enumerate(listeners):
            for earlier, other_host, other_port in listeners[:n]:
                if port and port == other_port and _overlap(host, other_host):
                    raise check.fail(setting, port, f"{earlier} has this port already")


def _overlap(host: str, other: str) -> bool:
    wildcard = ("", "0.0.0.0", "::")
    return host == other or host in wildcard or other in wildcard


LEGACY_ENV: Final[Mapping[str, tuple[str, str]]] = {
    "MOSHI_PORT": ("server", "port"),
    "HEALTH_PORT": ("server", "health_port"),
    "WEB_PORT": ("server", "web_port"),
    "WEBSOCKET_URL": ("server", "websocket_url"),
    "STT_MODEL": ("engine", "model"),
}


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults ← TOML (`path`, else configs/default.toml when present) ← environment.
    A value that cannot work raises ConfigError naming the setting and where it was set."""
    environ = os.environ if environ is None else environ
    if path is None and REPO_DEFAULT.exists():
        path = REPO_DEFAULT
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    _refuse_unknown_variables(environ)
    sources: dict[str, str] = {}  # "section.key" -> the variable that set it
    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Config):
        section_type = _resolve(Config, section.name)
        values = dict(raw.pop(section.name, {}) or {})
        for env_name, (sec, key_name) in LEGACY_ENV.items():
            if sec == section.name and env_name in environ:
                values[key_name] = environ[env_name]
                sources[f"{sec}.{key_name}"] = env_name
        for key in dataclasses.fields(section_type):  # the STT_BRIDGE_ name wins over legacy
            env_name = variable_name(section.name, key.name)
            if env_name in environ:
                values[key.name] = environ[env_name]
                sources[f"{section.name}.{key.name}"] = env_name
        try:
            sections[section.name] = _build(section_type, values, section.name)
        except ConfigError as exc:
            raise _located(exc, sources, path) from None
    if raw:
        names = ", ".join(sorted(raw))
        hint = did_you_mean(sorted(raw)[0], [f.name for f in dataclasses.fields(Config)])
        raise ConfigError(f"{path}: unknown config section(s): {names}{hint}")
    try:
        return Config(**sections)
    except ConfigError as exc:
        raise _located(exc, sources, path) from None


def variable_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    """An STT_BRIDGE_ variable that sets nothing is a typo (or a key that does not exist): say so
    rather than serve with the value its author believes is set."""
    known = {
        variable_name(section.name, key.name)
        for section in dataclasses.fields(Config)
        for key in dataclasses.fields(_resolve(Config, section.name))
    }
    unknown = sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known)
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: no such setting{did_you_mean(unknown[0], known)}; every key of "
            "configs/default.toml is STT_BRIDGE_<SECTION>_<KEY>"
        )


def _located(exc: ConfigError, sources: Mapping[str, str], path: Path | None) -> ConfigError:
    """The same error, saying where its setting came from: a variable, else the TOML file."""
    if not exc.setting:
        return exc
    if exc.setting in sources:
        return ConfigError(f"{exc} (set by {sources[exc.setting]})", exc.setting)
    if path is not None:
        return ConfigError(f"{exc} (in {path})", exc.setting)
    return exc


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """A config from `to_toml_dict`'s shape (how api/workers.py hands it to its processes)."""
    return Config(
        **{
            section.name: _build(
                _resolve(Config, section.name), dict(raw.get(section.name, {})), section.name
            )
            for section in dataclasses.fields(Config)
        }
    )


def _build(section_type: type[Any], values: dict[str, Any], section: str) -> Any:
    known = {f.name for f in dataclasses.fields(section_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        hint = did_you_mean(unknown[0], known)
        raise ConfigError(f"[{section}]: unknown key(s) {', '.join(unknown)}{hint}")
    coerced = {
        name: _coerce(value, _resolve(section_type, name), f"{section}.{name}")
        for name, value in values.items()
    }
    try:
        return section_type(**coerced)
    except ConfigError:
        raise
    except ValueError as exc:  # a section that checks itself with a plain ValueError
        message = str(exc)
        named = message.split(maxsplit=1)[0].rstrip(":")
        setting = named if named.split(".")[0] == section and named in _keys(section) else ""
        raise ConfigError(message, setting) from None


def _keys(section: str) -> set[str]:
    return {f"{section}.{f.name}" for f in dataclasses.fields(_resolve(Config, section))}


def _resolve(owner: type[Any], name: str) -> Any:
    hints: dict[str, Any] = typing.get_type_hints(owner)
    return hints[name]


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """TOML values pass through when they have the right type; env strings are parsed."""
    origin = typing.get_origin(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise check.fail(where, value, "true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:  # a TOML float (8080.0) or a bool is a mistake, not a port
            return int(str(value).strip()) if isinstance(value, str) else int("x")
        except ValueError:
            raise check.fail(where, value, "a whole number") from None
    if kind is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise check.fail(where, value, "a number") from None
    if kind is str:
        return str(value)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(i).strip() for i in items if str(i).strip())
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return None if value in (None, "") else _coerce(value, inner[0], where)
    raise ConfigError(f"{where}: unsupported type {kind}")


def to_toml_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The config as TOML-shaped data (for `/info` and the default-file test)."""
    return {
        section.name: {  # TOML has arrays, not tuples
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(getattr(config, section.name)).items()
        }
        for section in dataclasses.fields(Config)
    }
