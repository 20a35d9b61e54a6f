"""Mistakes a user makes setting up `stt-bridge serve`, run as the real command: each is one
line on stderr that names the setting, its value and what is allowed, exit status 2, before
any model loads. A taken port of the service's own (server.port, health_port, web_port) stops
it the same way; a taken AudioSocket or SIP port turns that front end off with one line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.app import PortUnavailable, Service
from tests.conftest import MODEL_CACHE, make_config
from tests.e2e.server_process import loopback_env, loopback_ports

CLI = [sys.executable, "-m", "api.cli"]
MODEL_LOADED = "Moonshine model loaded"  # the log line a model load writes


def serve(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`stt-bridge serve` on loopback ports, with the CPU engine unless `env` says otherwise."""
    full = {
        **os.environ,
        **loopback_env(loopback_ports()),
        "STT_BRIDGE_ENGINE_NAME": "moonshine",
        "STT_BRIDGE_ENGINE_CACHE_DIR": str(MODEL_CACHE),
        "STT_BRIDGE_SIP_ENABLED": "false",
        **env,
    }
    return subprocess.run(
        [*CLI, *args, "serve"],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], *pieces: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no traceback, no log of a model load
    assert lines[0].startswith("stt-bridge: ")
    for piece in pieces:
        assert piece in lines[0], (piece, lines[0])
    assert result.stdout == ""  # no startup line: nothing listens
    return lines[0]


@pytest.mark.parametrize(
    ("env", "pieces"),
    [
        (
            {"STT_BRIDGE_ENGINE_NAME": "moonshin"},
            ["engine.name = 'moonshin'", "kyutai", "did you mean moonshine?", "ENGINE_NAME"],
        ),
        (
            {"STT_BRIDGE_SERVER_PORT": "80800"},
            ["server.port = 80800", "0-65535", "STT_BRIDGE_SERVER_PORT"],
        ),
        (
            {"STT_BRIDGE_SERVER_PROT": "9000"},
            ["STT_BRIDGE_SERVER_PROT: no such setting", "did you mean STT_BRIDGE_SERVER_PORT?"],
        ),
        ({"STT_BRIDGE_SIP_BACKEND": "pjsip"}, ["sip.backend = 'pjsip'", "asyncio, pjsua2"]),
        ({"STT_BRIDGE_LOG_LEVEL": "verbose"}, ["log.level = 'verbose'", "debug, info, warning"]),
        ({"STT_BRIDGE_ENGINE_DEVICE": "gpu"}, ["engine.device = 'gpu'", "cuda:N"]),
        (
            {"STT_BRIDGE_LIMITS_IDLE_TIMEOUT_S": "-5"},
            ["limits.idle_timeout_s = -5.0", "0 or more"],
        ),
        ({"STT_BRIDGE_ENGINE_CAPACITY": "-1"}, ["engine.capacity = -1", "0 or more"]),
        ({"STT_BRIDGE_SERVER_WEB_PORT": "8000.5"}, ["server.web_port = '8000.5'", "whole"]),
        (
            {"STT_BRIDGE_SIP_RTP_PORT_MIN": "30000", "STT_BRIDGE_SIP_RTP_PORT_MAX": "20000"},
            ["sip.rtp_port_max = 20000", "sip.rtp_port_min"],
        ),
        # /proc takes no new folders, not even from root.
        ({"STT_BRIDGE_DATA_DIR": "/proc/stt-bridge"}, ["data.dir = '/proc/stt-bridge'"]),
        ({"STT_BRIDGE_ENGINE_CACHE_DIR": "/proc/stt-cache"}, ["engine.cache_dir", "/proc/"]),
    ],
)
def test_a_bad_setting_is_one_line_before_the_model_loads(
    env: dict[str, str], pieces: list[str], tmp_path: Path
) -> None:
    result = serve({"STT_BRIDGE_DATA_DIR": str(tmp_path), **env})
    assert_one_line(result, *pieces)
    assert MODEL_LOADED not in result.stderr


def test_a_bad_value_in_the_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[sip]\nbackend = "pjsip"\n')
    result = serve({"STT_BRIDGE_DATA_DIR": str(tmp_path)}, "-c", str(config))
    assert_one_line(result, "sip.backend = 'pjsip'", f"(in {config})")


def test_two_listeners_on_one_port_are_refused(tmp_path: Path) -> None:
    ports = loopback_ports()
    result = serve(
        {
            "STT_BRIDGE_DATA_DIR": str(tmp_path),
            "STT_BRIDGE_AUDIOSOCKET_PORT": str(ports["audio"]),
            "STT_BRIDGE_SERVER_PORT": str(ports["audio"]),
        }
    )
    assert_one_line(result, f"audiosocket.port = {ports['audio']}", "server.port")


@pytest.mark.parametrize("setting", ["port", "health_port", "web_port"])
def test_a_taken_service_port_names_its_setting(setting: str, tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        variable = f"STT_BRIDGE_SERVER_{setting.upper()}"
        result = serve({"STT_BRIDGE_DATA_DIR": str(tmp_path), variable: str(port)})
    assert_one_line(result, f"server.{setting} = {port}", "is taken", f"set server.{setting}")
    assert MODEL_LOADED not in result.stderr


@pytest.fixture
def held_front_end_ports() -> Iterator[dict[str, int]]:
    """AudioSocket's TCP port and SIP's UDP port, held by 'another program'."""
    with (
        socket.socket() as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        yield {"audiosocket": tcp.getsockname()[1], "sip": udp.getsockname()[1]}


def test_a_taken_front_end_port_turns_that_front_end_off(
    held_front_end_ports: dict[str, int], tmp_path: Path
) -> None:
    ports = loopback_ports()
    ports["audiosocket"] = held_front_end_ports["audiosocket"]
    env = {
        **os.environ,
        **loopback_env(ports),
        "STT_BRIDGE_ENGINE_NAME": "sink",  # no model: the ports are the point
        "STT_BRIDGE_DATA_DIR": str(tmp_path),
        "STT_BRIDGE_SIP_HOST": "127.0.0.1",
        "STT_BRIDGE_SIP_PORT": str(held_front_end_ports["sip"]),
    }
    process = subprocess.Popen(
        [*CLI, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        banner = process.stdout.readline()
        assert f"open http://127.0.0.1:{ports['web']}/" in banner, banner
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['health']}/info") as answer:
            info = json.load(answer)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    audiosocket = [line for line in stderr.splitlines() if "AudioSocket is off" in line]
    sip = [line for line in stderr.splitlines() if "SIP is off" in line]
    assert len(audiosocket) == 1 and "(audiosocket.port moves it)" in audiosocket[0], stderr
    assert f"port {held_front_end_ports['audiosocket']} on 127.0.0.1 is taken" in audiosocket[0]
    assert len(sip) == 1 and "(sip.port moves it)" in sip[0], stderr
    assert info["audiosocket"]["listening"] is False and "is taken" in info["audiosocket"]["reason"]
    assert info["sip"]["listening"] is False
    assert "Traceback" not in stderr


def test_the_store_is_in_the_users_data_folder_wherever_it_starts(tmp_path: Path) -> None:
    """No `data.dir`: the store is $XDG_DATA_HOME/stt-bridge, not a new ./data in the working
    directory (a second start elsewhere finds the same calls)."""
    elsewhere = tmp_path / "some-project"
    elsewhere.mkdir()
    ports = loopback_ports()
    env = {key: value for key, value in os.environ.items() if not key.startswith("STT_BRIDGE_")}
    env |= {
        **loopback_env(ports),
        "STT_BRIDGE_ENGINE_NAME": "sink",
        "STT_BRIDGE_SIP_ENABLED": "false",
        "XDG_DATA_HOME": str(tmp_path / "xdg-data"),
    }
    process = subprocess.Popen(
        [*CLI, "serve"], env=env, cwd=elsewhere, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert "stt-bridge" in process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert (tmp_path / "xdg-data" / "stt-bridge" / "stt-bridge.sqlite3").is_file()
    assert list(elsewhere.iterdir()) == []


async def test_a_port_taken_after_the_check_still_names_its_setting(tmp_path: Path) -> None:
    """Taken between `stt-bridge serve`'s check and the bind (the model loads in between):
    the service stops with the same line, its model and store closed."""
    base = make_config(tmp_path, name="sink")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        config = dataclasses.replace(base, server=dataclasses.replace(base.server, web_port=port))
        service = Service(config)
        with pytest.raises(PortUnavailable) as raised:
            await service.start()
        await service.stop(drain_timeout_s=0)
    assert str(raised.value) == (
        f"server.web_port = {port}: TCP port {port} on 127.0.0.1 is taken by another program; "
        "set server.web_port to a free port"
    )


@pytest.mark.parametrize(
    ("env", "pieces"),
    [
        (
            {"STT_BRIDGE_ENGINE_NAME": "remote", "STT_BRIDGE_ENGINE_URLS": "http://gpu1:8080"},
            ["engine.urls: 'http://gpu1:8080' is not a ws:// or wss:// URL"],
        ),
        (  # no machine has a hundredth GPU: the same answer with CUDA and without
            {"STT_BRIDGE_ENGINE_NAME": "kyutai", "STT_BRIDGE_ENGINE_DEVICE": "cuda:99"},
            ["engine.device = 'cuda:99': this machine has"],
        ),
    ],
)
def test_an_engine_that_cannot_start_here_is_one_line(
    env: dict[str, str], pieces: list[str], tmp_path: Path
) -> None:
    result = serve({"STT_BRIDGE_DATA_DIR": str(tmp_path), **env})
    assert_one_line(result, "stt-bridge: config: ", *pieces)
