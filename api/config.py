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

from engine.config import EngineConfig
from telephony.config import AudioSocketConfig as AudioSocketConfig
from telephony.config import LimitsConfig as LimitsConfig
from telephony.config import TwilioConfig as TwilioConfig
from telephony.sip.config import SipConfig as SipConfig

ENV_PREFIX: Final = "STT_BRIDGE_"
REPO_DEFAULT: Final = Path(__file__).resolve().parent.parent / "configs" / "default.toml"


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


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data"  # the store (SQLite) and the webhook outbox live here
    retention_days: float = 0.0  # delete calls older than this; 0 = keep everything
    url: str = ""  # "postgresql://user@host/db": a store shared by a cluster; "" = SQLite in dir
    lease_s: float = 10.0  # PostgreSQL: a node silent this long is dead; its live calls end
    max_queue_events: int = 100_000  # events waiting for the disk at most (full: dropped, counted)


@dataclass(frozen=True)
class WebhookConfig:
    url: str = ""  # where call.started / segment / call.ended are POSTed; comma-separate several
    secret: str = ""  # HMAC-SHA256 key for the X-STT-Bridge-Signature header
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ApiConfig:
    keys: tuple[str, ...] = ()  # API keys; empty = no authentication
    max_streams_per_key: int = 100  # concurrent WebSockets per key
    requests_per_minute: int = 600  # requests (and stream openings) per key per minute


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""  # PEM certificate chain: with `key`, the audio/API and health ports use TLS
    key: str = ""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    json: bool = False  # one JSON object per line, with call id


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sip: SipConfig = field(default_factory=SipConfig)
    audiosocket: AudioSocketConfig = field(default_factory=AudioSocketConfig)
    twilio: TwilioConfig = field(default_factory=TwilioConfig)
    data: DataConfig = field(default_factory=DataConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)


LEGACY_ENV: Final[Mapping[str, tuple[str, str]]] = {
    "MOSHI_PORT": ("server", "port"),
    "HEALTH_PORT": ("server", "health_port"),
    "WEB_PORT": ("server", "web_port"),
    "WEBSOCKET_URL": ("server", "websocket_url"),
    "STT_MODEL": ("engine", "model"),
}


class ConfigError(ValueError):
    """A config file or variable that cannot be used; the message names it."""


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults ← TOML (`path`, else configs/default.toml when present) ← environment."""
    environ = os.environ if environ is None else environ
    if path is None and REPO_DEFAULT.exists():
        path = REPO_DEFAULT
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Config):
        section_type = _resolve(Config, section.name)
        values = dict(raw.pop(section.name, {}) or {})
        for env_name, (sec, key_name) in LEGACY_ENV.items():
            if sec == section.name and env_name in environ:
                values[key_name] = environ[env_name]
        for key in dataclasses.fields(section_type):  # the STT_BRIDGE_ name wins over legacy
            env_name = f"{ENV_PREFIX}{section.name}_{key.name}".upper()
            if env_name in environ:
                values[key.name] = environ[env_name]
        sections[section.name] = _build(section_type, values, section.name)
    if raw:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(raw))}")
    return Config(**sections)


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
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {', '.join(sorted(unknown))}")
    return section_type(
        **{
            name: _coerce(value, _resolve(section_type, name), f"{section}.{name}")
            for name, value in values.items()
        }
    )


def _resolve(owner: type[Any], name: str) -> Any:
    hints: dict[str, Any] = typing.get_type_hints(owner)
    return hints[name]


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """TOML values pass through when they have the right type; env strings are parsed."""
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind is int:
            if isinstance(value, bool):
                raise ValueError("not an integer")
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in typing.get_args(kind) if a is not type(None)]
            return None if value in (None, "") else _coerce(value, inner[0], where)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
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
