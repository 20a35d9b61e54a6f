"""Shared fixtures: a running service on free loopback ports, and the CPU engine."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from api.app import Service
from api.config import (
    AudioSocketConfig,
    Config,
    DataConfig,
    EngineConfig,
    ServerConfig,
    load_config,
)
from engine.cpu import CpuEngine


def make_config(data_dir: Path | None = None, **engine: Any) -> Config:
    """The default config on 127.0.0.1 with ephemeral ports, the CPU engine, a fresh store."""
    base = load_config(environ={})
    return dataclasses.replace(
        base,
        data=DataConfig(dir=str(data_dir or tempfile.mkdtemp(prefix="stt-bridge-data-"))),
        server=ServerConfig(host="127.0.0.1", port=0, health_port=0, web_port=0, drain_timeout_s=5),
        engine=dataclasses.replace(EngineConfig(name="cpu"), **engine),
        audiosocket=AudioSocketConfig(host="127.0.0.1", port=0),
    )


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def start_service() -> AsyncIterator[ServiceFactory]:
    """`svc = await start_service(capacity=2)`: an in-process service, stopped at teardown."""
    started: list[Service] = []

    async def start(config: Config | None = None, **engine: Any) -> Service:
        service = Service(config or make_config(**engine))
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop(drain_timeout_s=0)


@pytest.fixture
async def cpu_engine() -> AsyncIterator[CpuEngine]:
    engine = CpuEngine(capacity=4)
    await engine.start()
    yield engine
    await engine.stop()
