"""Configuration: the shipped default file, environment overrides, the seed's variables."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from api.config import REPO_DEFAULT, Config, ConfigError, load_config, to_toml_dict


def test_default_file_spells_out_every_default() -> None:
    shipped = tomllib.loads(REPO_DEFAULT.read_text())
    assert shipped == to_toml_dict(Config())


def test_stt_bridge_variables_override_every_section() -> None:
    config = load_config(
        environ={
            "STT_BRIDGE_SERVER_PORT": "9000",
            "STT_BRIDGE_ENGINE_NAME": "cpu",
            "STT_BRIDGE_ENGINE_MAX_BUFFER_S": "2.5",
            "STT_BRIDGE_LOG_JSON": "true",
        }
    )
    assert config.server.port == 9000
    assert config.engine.name == "cpu"
    assert config.engine.max_buffer_s == 2.5
    assert config.log.json is True


def test_seed_variables_still_work() -> None:
    config = load_config(
        environ={
            "MOSHI_PORT": "18080",
            "HEALTH_PORT": "18001",
            "WEB_PORT": "18000",
            "STT_MODEL": "/models/stt-1b",
            "WEBSOCKET_URL": "wss://stt.example.com/",
        }
    )
    assert (config.server.port, config.server.health_port, config.server.web_port) == (
        18080,
        18001,
        18000,
    )
    assert config.engine.model == "/models/stt-1b"
    assert config.server.websocket_url == "wss://stt.example.com/"


def test_new_name_wins_over_seed_name() -> None:
    config = load_config(environ={"MOSHI_PORT": "1", "STT_BRIDGE_SERVER_PORT": "2"})
    assert config.server.port == 2


def test_toml_file_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text("[server]\nport = 7000\nweb_port = 7001\n[engine]\ncapacity = 3\n")
    config = load_config(path, environ={"STT_BRIDGE_SERVER_WEB_PORT": "7002"})
    assert (config.server.port, config.server.web_port, config.engine.capacity) == (7000, 7002, 3)
    assert config.server.health_port == 8001


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[server]\nprot = 1\n", {}, "prot"),
        ("[sever]\nport = 1\n", {}, "sever"),
        ("[server]\nport = 'eighty'\n", {}, "server.port"),
        ("", {"STT_BRIDGE_LOG_JSON": "maybe"}, "log.json"),
        ("[server\n", {}, "bridge.toml"),
    ],
)
def test_bad_config_names_what_is_wrong(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ=env)


# Keys that allow only some values: another allowed one (each differs from the default).
ALLOWED_OTHER: dict[tuple[str, str], tuple[str, object]] = {
    ("engine", "name"): ("kyutai", "kyutai"),
    ("engine", "device"): ("cuda:1", "cuda:1"),
    ("engine", "precision"): ("float32", "float32"),
    ("engine", "devices"): ("cuda:0, cuda:1", ["cuda:0", "cuda:1"]),
    ("sip", "backend"): ("pjsua2", "pjsua2"),
    ("sip", "allow"): ("10.0.0.0/8, ::1", ["10.0.0.0/8", "::1"]),
    ("audiosocket", "allow"): ("10.0.0.0/8, ::1", ["10.0.0.0/8", "::1"]),
    ("log", "level"): ("debug", "debug"),
    ("data", "url"): ("postgresql://db/stt", "postgresql://db/stt"),
    ("webhook", "url"): ("https://hooks.example/", "https://hooks.example/"),
    ("twilio", "public_url"): ("https://stt.example.com", "https://stt.example.com"),
    ("privacy", "redact"): ("pci, ssn", ["pci", "ssn"]),
    ("audiohook", "client_secrets"): ("key1:c2VjcmV0, key2:", ["key1:c2VjcmV0", "key2:"]),
    ("audiohook", "languages"): ("en-US, fr-FR", ["en-US", "fr-FR"]),
}


def _other_value(value: object) -> tuple[str, object]:
    """An env string for a key, and the value it must become: different from the default."""
    if isinstance(value, bool):
        return ("false" if value else "true"), not value
    if isinstance(value, int):
        return str(value + 7), value + 7
    if isinstance(value, float):
        return str(value + 0.5), value + 0.5
    if isinstance(value, list):
        return "a, b", ["a", "b"]
    return "changed", "changed"


def test_every_key_of_the_default_file_can_be_set_by_env_var() -> None:
    shipped = tomllib.loads(REPO_DEFAULT.read_text())
    environ: dict[str, str] = {}
    expected: dict[tuple[str, str], object] = {}
    for section, keys in shipped.items():
        for key, value in keys.items():
            text, parsed = ALLOWED_OTHER.get((section, key)) or _other_value(value)
            environ[f"STT_BRIDGE_{section}_{key}".upper()] = text
            expected[(section, key)] = parsed
    loaded = to_toml_dict(load_config(environ=environ))
    assert {(s, k): loaded[s][k] for s, k in expected} == expected


def test_the_documented_variable_names_work_exactly() -> None:
    config = load_config(
        environ={
            "STT_BRIDGE_DATA_DIR": "/srv/stt",
            "STT_BRIDGE_WEBHOOK_URL": "https://hooks.example/a,https://hooks.example/b",
            "STT_BRIDGE_WEBHOOK_SECRET": "s3cret",
            "STT_BRIDGE_API_KEYS": "key-one, key-two",
        }
    )
    assert config.data.dir == "/srv/stt"
    assert config.webhook.url == "https://hooks.example/a,https://hooks.example/b"
    assert config.webhook.secret == "s3cret"
    assert config.api.keys == ("key-one", "key-two")
