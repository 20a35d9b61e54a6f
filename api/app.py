"""Composes the service: the engine, the call hub, and three aiohttp applications.

- audio/API port (`server.port`, 8080): the WebSocket front ends and the API;
- health port (`server.health_port`, 8001): /health, /ready, /info;
- web port (`server.web_port`, 8000): the browser client.

`Service` starts and stops them as one; `run()` serves until SIGTERM/SIGINT, then drains:
no new calls, live ones may finish until the deadline, every transcript is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
import sys
from pathlib import Path
from typing import Final

from aiohttp import web

from api import __version__, console_origin, guard, health
from api.auth import ApiKeys, twilio_note
from api.bridge import BRIDGE, Bridge
from api.cluster import Cluster
from api.config import Config
from api.metrics import Metrics
from api.preflight import listen_problem
from api.routes import calls, files
from api.routes import webhooks as webhook_routes
from api.routes.events import REMOTE_CALLS, handle_events
from api.store import Store
from api.webhooks import WebhookSender
from engine.base import Engine
from engine.registry import EngineChoice, build_engine
from telephony import (
    aeap,
    asterisk_media,
    audio_stream,
    audiohook_ws,
    audiosocket,
    deepgram,
    moshi_asr,
    names,
    twilio,
    websocket,
    ws_front,
)
from telephony.call import CallHub
from telephony.carriers import handler as carriers
from telephony.limits import LIMITS, ConnectionGate
from telephony.redaction import PII
from telephony.sip import backend as sip

log = logging.getLogger(__name__)

WEB_DIR: Final = Path(__file__).resolve().parent / "web"
EXIT_ENGINE_FAILED: Final = 70  # EX_SOFTWARE: the engine's model failed; restart the service
EXIT_USAGE: Final = 2  # a setting to change (a port taken), as for every configuration mistake
PORT_SETTINGS: Final = {"audio": "port", "health": "health_port", "web": "web_port"}


class PortUnavailable(OSError):
    """One of the service's own ports could not be listened on; the message names its setting."""


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / "index.html")


async def _root(request: web.Request) -> web.StreamResponse:
    """GET / on the audio port: the WebSocket protocol, or the page for a browser."""
    if websocket.is_websocket_upgrade(request):
        return await websocket.handle_root(request)
    return await _index(request)


async def _client_config(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    return web.json_response(
        {
            "websocket_url": bridge.config.server.websocket_url,
            "port": bridge.ports.get("audio", bridge.config.server.port),
        }
    )


def _add_web_client(app: web.Application) -> None:
    app.router.add_get("/config.json", _client_config)
    app.router.add_static("/static/", WEB_DIR, show_index=False)


def build_audio_app(bridge: Bridge) -> web.Application:
    """The audio/API port. Front ends that listen on their own sockets (AudioSocket TCP, SIP)
    start and stop with it through `app.cleanup_ctx`, and record their bound port in
    `bridge.ports[name]`."""
    api = bridge.config.api
    twilio_token = bridge.config.twilio.auth_token
    keys = ApiKeys(
        api.keys,
        api.max_streams_per_key,
        api.requests_per_minute,
        twilio_signed=bool(twilio_token),
        signed_paths=carriers.signed_paths(bridge.config.carriers),
    )
    if note := twilio_note(api.keys, twilio_token):
        log.warning(note)
    limits = bridge.config.limits
    app = web.Application(
        middlewares=[
            guard.request_timeout(limits),
            console_origin.middleware,  # the page on the web port reads /v1/calls (CORS)
            *([keys.middleware] if keys.enabled else []),
        ],
        client_max_size=limits.http_max_body_bytes,
    )
    app[LIMITS] = limits
    app[BRIDGE] = bridge
    app[ws_front.HUB] = bridge.hub
    calls.add_routes(app, bridge.store, bridge.hub)
    webhook_routes.add_routes(app, bridge.store)
    if bridge.cluster is not None:
        app[REMOTE_CALLS] = bridge.cluster.remote_live
    elif bridge.remote_calls is not None:  # the node's other worker processes
        app[REMOTE_CALLS] = bridge.remote_calls
    app.router.add_get("/", _root)
    app.router.add_get("/v1/stream", websocket.handle_stream)
    deepgram.add_routes(app, bridge.hub)
    files.add_routes(app, bridge.hub, api.file_max_bytes, api.fetch_hosts)  # POST: files
    app.router.add_get("/v1/events", handle_events)
    twilio.add_routes(app, bridge.hub, bridge.config.twilio)
    carriers.add_routes(app, bridge.hub, bridge.config.carriers)  # Telnyx, Plivo, Vonage, ...
    audiohook_ws.add_routes(app, bridge.hub, bridge.config.audiohook, keys_on=keys.enabled)
    audio_stream.add_routes(app, bridge.hub)  # /freeswitch: mod_audio_stream and mod_audio_fork
    asterisk_media.add_routes(app, bridge.hub)
    aeap.add_routes(app, bridge.hub)
    moshi_asr.add_routes(app, bridge.hub)
    if bridge.config.audiosocket.enabled:
        server = bridge.config.audiosocket
        app.cleanup_ctx.append(
            audiosocket.audiosocket_server(
                server.host,
                server.port,
                bridge.hub,
                bridge.ports,
                limits,
                bridge.shared,
                on_problem=bridge.keep_audiosocket_problem,
                allow=server.allow,
            )
        )
    if bridge.config.sip.enabled:
        app.cleanup_ctx.append(
            sip.cleanup_context(bridge.config.sip, bridge.hub, bridge.ports, bridge.keep_sip)
        )
    _add_web_client(app)
    return app


def build_health_app(bridge: Bridge) -> web.Application:
    app = web.Application()
    app[BRIDGE] = bridge
    health.add_routes(app)
    app.router.add_get("/metrics", bridge.metrics.handle)
    app.cleanup_ctx.append(bridge.metrics.watch_loop)
    return app


def build_web_app(bridge: Bridge) -> web.Application:
    app = web.Application()
    app[BRIDGE] = bridge
    app.router.add_get("/", _index)
    _add_web_client(app)
    return app


class Service:
    """The running service: engine started, three sites listening."""

    def __init__(self, config: Config, engine: Engine | None = None, shared: bool = False) -> None:
        """`shared`: one of a node's worker processes (api/workers.py): every TCP port is bound
        with SO_REUSEPORT, and a restart marks only this process's own calls interrupted."""
        if engine is None:
            engine, choice = build_engine(config.engine)
        else:
            choice = EngineChoice(engine.name, "engine given by the caller")
        self.config = config
        hub = CallHub(engine, redact=config.privacy.kinds, hold_s=config.privacy.hold_s)
        urls = [u.strip() for u in config.webhook.url.split(",") if u.strip()]
        store = Store(
            config.data.url or config.data.folder() / "stt-bridge.sqlite3",
            urls,
            retention_s=config.data.retention_days * 86400,
            node_id=config.server.node_id,
            lease_s=config.data.lease_s,
            max_queue=config.data.max_queue_events,
            own_calls_only=shared,
        )
        hub.bus.add_sink(store.record)
        hub.unavailable = lambda: store.problem  # SIP OPTIONS: 503 while PostgreSQL is away
        metrics = Metrics(hub, store)
        self.bridge = Bridge(config, engine, choice, hub, store, metrics, shared=shared)
        if store.postgres:
            self.bridge.cluster = Cluster(store, hub.bus)
        hook = config.webhook
        self.webhooks = WebhookSender(
            store,
            hook.secret,
            hook.timeout_s,
            on_result=metrics.webhook_result,
            max_attempts=hook.max_attempts,
            first_backoff_s=hook.backoff_s,
            max_backoff_s=hook.max_backoff_s,
        )
        self._runners: list[web.AppRunner] = []
        self.gates: dict[str, ConnectionGate] = {}  # open connections per port (limits)
        self.ports = self.bridge.ports

    async def start(self) -> None:
        server = self.config.server
        await self.bridge.engine.start()
        await self._load_names()
        if self.bridge.cluster is not None:
            self.bridge.cluster.start()
        self.webhooks.start()
        tls = _tls_context(self.config)
        apps = {
            "audio": (build_audio_app(self.bridge), server.port),
            "health": (build_health_app(self.bridge), server.health_port),
            "web": (build_web_app(self.bridge), server.web_port),
        }
        for name, (app, port) in apps.items():
            # aiohttp's keep-alive timer also runs before the first request: the handshake timeout.
            runner = web.AppRunner(
                app,
                access_log=None,
                shutdown_timeout=5.0,
                keepalive_timeout=self.config.limits.handshake_timeout_s,
            )
            await runner.setup()
            self.gates[name] = guard.gate_connections(runner, self.config.limits, name)
            context = tls if name in ("audio", "health") else None
            site = web.TCPSite(
                runner,
                server.host,
                port,
                reuse_address=True,
                reuse_port=self.bridge.shared or None,
                ssl_context=context,
            )
            try:
                await site.start()
            except OSError as exc:  # taken since `stt-bridge serve` checked it (api/preflight)
                await runner.cleanup()
                raise PortUnavailable(
                    listen_problem(f"server.{PORT_SETTINGS[name]}", server.host, port, exc)
                ) from exc
            self._runners.append(runner)
            self.ports[name] = _bound_port(site)
        self.bridge.accepting = True
        log.info(
            "stt-bridge serving",
            extra={"ports": self.ports, "engine": self.bridge.choice.name},
        )

    async def _load_names(self) -> None:
        """People's names for `pii` (telephony/names.py): built from the names-dataset wheel
        on the machine's first start (about 10 s, in a child process), read in ms after."""
        hub = self.bridge.hub
        try:
            book = await asyncio.get_running_loop().run_in_executor(None, names.load)
            hub.names.fill(book.first, book.last)
        except names.NamesUnavailable as exc:
            # Cues still find names ("my name is ..."); a `pii` default must not run without.
            if PII in hub.redact:
                raise
            log.warning("%s: pii redaction finds names by their cues only", exc)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop admitting, let live calls finish (or flush them at the deadline), close.
        With `server.drain_notice_s`, /ready and SIP OPTIONS fail that long first, calls still
        admitted, so load balancers and proxies have stopped sending here before refusals."""
        self.bridge.accepting = False
        self.bridge.hub.leaving = True
        notice = self.config.server.drain_notice_s
        if notice > 0 and drain_timeout_s != 0:
            log.info("drain announced", extra={"notice_s": notice})
            await asyncio.sleep(notice)
        deadline = drain_timeout_s
        if deadline is None:
            deadline = self.config.server.drain_timeout_s
        await self.bridge.hub.drain(deadline)
        # Every transcript is on disk before anything else stops; webhooks get a few seconds
        # to go out, and whatever is left waits in the outbox for the next start.
        store = self.bridge.store
        # A store whose disk is gone gets a few seconds more; what it still holds is then lost
        # (counted), so the process exits within its supervisor's stop timeout.
        flush_s = 5.0 if store.problem else 30.0
        await asyncio.get_running_loop().run_in_executor(None, store.flush, flush_s)
        await self.webhooks.stop(deliver_for_s=min(5.0, deadline))
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.bridge.engine.stop()
        if self.bridge.cluster is not None:
            self.bridge.cluster.stop()
        store.close()


def _tls_context(config: Config) -> ssl.SSLContext | None:
    if not (config.tls.cert and config.tls.key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # nothing older, whatever OpenSSL allows
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


def urls_to_open(config: Config, ports: dict[str, int]) -> str:
    """The end of the startup line: where a person points a browser, curl or a client."""
    wildcard = config.server.host in ("", "0.0.0.0", "::")
    host = "localhost" if wildcard else config.server.host
    host = f"[{host}]" if ":" in host else host
    secure = "s" if config.tls.cert and config.tls.key else ""
    return (
        f"open http://{host}:{ports['web']}/ (the page), "
        f"API http{secure}://{host}:{ports['audio']}/v1/calls, "
        f"health http{secure}://{host}:{ports['health']}/ready"
    )


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    assert server is not None
    sock: socket.socket = server.sockets[0]  # type: ignore[attr-defined]  # asyncio or uvloop
    port: int = sock.getsockname()[1]
    return port


async def run(config: Config) -> int:
    """Serve until SIGTERM or SIGINT, then drain and exit."""
    service = Service(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except PortUnavailable as exc:
        print(f"stt-bridge: {exc}", file=sys.stderr, flush=True)
        await service.stop(drain_timeout_s=0)
        return EXIT_USAGE
    # Everything start-up built (torch, the model, the apps) lives as long as the process: move
    # it out of the collector's way, so a full GC pass no longer stalls every call for 50+ ms.
    gc.collect()
    gc.freeze()
    note = twilio_note(config.api.keys, config.twilio.auth_token)  # a road refused: say why
    print(
        f"stt-bridge {__version__}: engine {service.bridge.choice.name} "
        f"({service.bridge.choice.reason}); audio+API :{service.ports['audio']}, "
        f"health :{service.ports['health']}, web client :{service.ports['web']}; "
        f"{urls_to_open(config, service.ports)}{f'; {note}' if note else ''}",
        flush=True,
    )
    return await serve(service, stop)


async def serve(service: Service, stop: asyncio.Event, poll_s: float = 0.5) -> int:
    """Serve until `stop` is set (drain, exit status 0) or the engine fails for good (its model
    raised in its step loop: every live call has ended with its words, reason `engine error`):
    then stop at once and return `EXIT_ENGINE_FAILED`, for the supervisor to restart us."""
    engine = service.bridge.engine
    while not stop.is_set():
        if engine.failure is not None:
            log.error(
                "engine failed, exiting for the supervisor to restart the service: %s",
                engine.failure,
            )
            await service.stop(drain_timeout_s=0)
            return EXIT_ENGINE_FAILED
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll_s)
    log.info("signal received: draining")
    await service.stop()
    return 0
