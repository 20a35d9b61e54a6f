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
