"""The shared state every route may need: config, engine, call hub."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from aiohttp import web

from api import __version__
from api.config import Config
from api.metrics import Metrics
from api.store import Store
from engine.base import Engine
from engine.registry import EngineChoice
from telephony.bus import CallStarted
from telephony.call import CallHub

if TYPE_CHECKING:
    from api.cluster import Cluster
    from telephony.sip.backend import SipBackend


@dataclass
class Bridge:
    config: Config
    engine: Engine
    choice: EngineChoice
    hub: CallHub
    store: Store
    metrics: Metrics
    started_at: float = field(default_factory=time.time)
    version: str = __version__
    accepting: bool = False  # true between start-up and the beginning of a drain
    ports: dict[str, int] = field(default_factory=dict)  # what each listener is bound to
    sip: SipBackend | None = None  # the running SIP user agent, where SIP is enabled
    cluster: Cluster | None = None  # live events and the lease, on the PostgreSQL store
    sip_problem: str = ""  # why SIP is enabled but not listening (its port is taken)
    audiosocket_problem: str = ""  # why AudioSocket is enabled but not listening
    # One of a node's worker processes (api/workers.py): its ports are shared (SO_REUSEPORT),
    # and the calls live on the other workers, which `/v1/events` shows too.
    shared: bool = False
    remote_calls: dict[str, CallStarted] | None = None

    def keep_sip(self, backend: SipBackend | None, problem: str = "") -> None:
        self.sip = backend
        self.sip_problem = problem

    def keep_audiosocket_problem(self, problem: str) -> None:
        self.audiosocket_problem = problem


BRIDGE: Final = web.AppKey("bridge", Bridge)
