"""Shared fixtures: a running service on free loopback ports, and the Moonshine engine."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from api.app import Service
from api.config import (
    AudioSocketConfig,
    Config,
    DataConfig,
    ServerConfig,
    load_config,
)
from engine.config import EngineConfig
from engine.moonshine import MoonshineEngine
from tests.pg import Postgres


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every test runs on the loop the service runs on (`api/cli.py`): uvloop. Its transports
    are not asyncio's classes, and a difference must show here, not first in production."""
    return {"uvloop": uvloop.new_event_loop}


def make_config(data_dir: Path | None = None, data_url: str = "", **engine: Any) -> Config:
    """The default config on 127.0.0.1 with ephemeral ports, the CPU engine, a fresh store,
    and no SIP (on by default, on 5060: parallel tests must not fight for it; SIP tests turn
    it on with a port of their own, tests/e2e/sip_peers.py)."""
    base = load_config(environ={})
    return dataclasses.replace(
        base,
        sip=dataclasses.replace(base.sip, enabled=False),
        data=DataConfig(
            dir=str(data_dir or tempfile.mkdtemp(prefix="stt-bridge-data-")), url=data_url
        ),
        server=ServerConfig(host="127.0.0.1", port=0, health_port=0, web_port=0, drain_timeout_s=5),
        engine=dataclasses.replace(
            EngineConfig(name="moonshine", cache_dir=str(MODEL_CACHE)), **engine
        ),
        audiosocket=AudioSocketConfig(host="127.0.0.1", port=0),
    )


# The Moonshine model, prepared once per machine (ORT → ONNX) and shared by every test.
MODEL_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "models"

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


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """PostgreSQL from Debian's package, for this test session (tests/pg.py)."""
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each store backend in turn: "" (SQLite, the default; `data_url` of `make_config`) or
    a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return ""
    server: Postgres = request.getfixturevalue("postgres")
    return server.fresh_database()


@pytest.fixture
async def moonshine_engine() -> AsyncIterator[MoonshineEngine]:
    engine = MoonshineEngine(cache_dir=MODEL_CACHE, capacity=4)
    await engine.start()
    yield engine
    await engine.stop()
