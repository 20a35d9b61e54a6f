"""`server.workers = N`: N front-end processes share every listening port; the engine that owns
the model runs in a process of its own, so one model (one GPU) serves every worker's calls.

`stt-bridge serve` with `server.workers != 1` (0: one per core) is the supervisor. Its children:

- the engine process (`python -m api.workers engine DIR PORT`): the configured engine behind
  `/api/asr-streaming` (telephony/moshi_asr.py, moshi-server's protocol) and `/info` (its free
  slots) on a loopback port, nothing else; streams need a random key made at start. Kyutai on
  one GPU thus steps every call of every worker in one batch. Engines that own no model (`sink`)
  run inside each worker instead, and with `engine.name = "remote"` the workers use its nodes.
- worker k (`python -m api.workers worker DIR K PORT`): the whole service (api/app.py) with
  `engine.name = "remote"` pointed at the engine process (engine/remote.py), node id
  `<node_id>/w<k>`, every TCP port (audio/API, health, web, AudioSocket) bound with SO_REUSEPORT:
  the kernel spreads connections across workers. SIP (UDP, a dialog and its RTP in one
  process) runs in worker 0 only; the others do not bind it.
- the event relay: a unix socket in DIR; each worker sends it its bus events (one JSON line
  each) and gets every other worker's, which it relays to its own live subscribers
  (`/v1/events`, `/v1/calls/{id}/events`, via `EventBus.relay`), so any connection sees every
  call. On PostgreSQL (`data.url`) api/cluster.py relays between workers as between nodes.

The store: each worker writes its own calls to the one SQLite file (WAL; writers take turns
under SQLite's lock), and the outbox claim is one atomic UPDATE, so each webhook goes out once.
The supervisor migrates the file and marks calls a previous run left live before any worker
opens it. A worker that dies is started again; at its start it marks only its own calls left
live `interrupted` (their words stay), and the relay tells the other workers those calls ended.
SIGTERM to the supervisor: every worker drains its calls, then the engine process stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from api import __version__, logs
from api.config import Config, config_from_dict, to_toml_dict
from api.store import INTERRUPTED_REASON, Store
from engine.registry import build_engine
from telephony import moshi_asr
from telephony.limits import LIMITS
from telephony.session import BusEvent, CallEnded, CallHub, CallStarted, EventBus, bus_event_to_json

log = logging.getLogger(__name__)

CONFIG_FILE: Final = "config.json"
EVENTS_SOCKET: Final = "events.sock"
READY: Final = "ready"  # a child's first line on stdout once it serves
IN_WORKER_ENGINES: Final = ("sink", "remote")  # no model of their own: no engine process
RESTART_MIN_S: Final = 0.5
RESTART_MAX_S: Final = 10.0
STOP_MARGIN_S: Final = 20.0  # past the drain deadline before a worker is killed
ENGINE_STOP_S: Final = 15.0
LINE_LIMIT: Final = 16 * 1024 * 1024
RELAY_BUFFER_MAX: Final = 32 * 1024 * 1024  # a worker that stops reading loses events past this
PR_SET_PDEATHSIG: Final = 1


def worker_count(config: Config) -> int:
    workers = config.server.workers
    return workers if workers > 0 else (os.cpu_count() or 1)


def engine_process_needed(config: Config) -> bool:
    return config.engine.name not in IN_WORKER_ENGINES


def node_id(config: Config) -> str:
    return config.server.node_id or socket.gethostname()


def worker_config(config: Config, worker: int, engine_port: int, key: str) -> Config:
    """Worker `worker`'s config: its own node id, SIP in worker 0 only, and the engine process
    (when there is one) as its remote engine."""
    server = dataclasses.replace(config.server, workers=1, node_id=f"{node_id(config)}/w{worker}")
    engine = config.engine
    if engine_port:
        url = f"ws://127.0.0.1:{engine_port} health=http://127.0.0.1:{engine_port}"
        engine = dataclasses.replace(
            engine,
            name="remote",
            urls=(url,),
            api_key=key,
            probe_interval_s=min(engine.probe_interval_s, 1.0),
        )
    sip = config.sip if worker == 0 else dataclasses.replace(config.sip, enabled=False)
    return dataclasses.replace(config, server=server, engine=engine, sip=sip)


def _store_location(config: Config) -> Path | str:
    return config.data.url or Path(config.data.dir) / "stt-bridge.sqlite3"


# --- the event relay --------------------------------------------------------------------------


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


class EventRelay:
    """The supervisor's end: every worker's bus events to every other worker. It remembers
    each worker's live calls: a worker that connects gets the others' first, and when one
    goes away (killed) the others hear that its calls ended, interrupted."""

    def __init__(self) -> None:
        self._links: dict[int, asyncio.StreamWriter] = {}
        self._live: dict[int, dict[str, dict[str, Any]]] = {}
        self._server: asyncio.AbstractServer | None = None
        self.relayed = 0

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(path), limit=LINE_LIMIT
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._links.values()):
            writer.close()

    def _send(self, sender: int, line: bytes) -> None:
        for worker, writer in list(self._links.items()):
            if worker == sender or writer.is_closing():
                continue
            if writer.transport.get_write_buffer_size() > RELAY_BUFFER_MAX:
                continue  # that worker stopped reading: it loses events, the others do not
            writer.write(line)
            self.relayed += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = -1
        try:
            hello = json.loads(await reader.readline())
            worker = int(hello["worker"])
            for other, calls in self._live.items():
                if other != worker:
                    for started in calls.values():
                        writer.write(_line(started))
            self._links[worker] = writer
            live = self._live[worker] = {}
            while line := await reader.readline():
                data = json.loads(line)
                if data.get("type") == "call_started":
                    live[data["call_id"]] = data
                elif data.get("type") == "call_ended":
                    live.pop(data["call_id"], None)
                self._send(worker, line)
        except (OSError, ValueError, KeyError, TypeError, asyncio.IncompleteReadError):
            pass
        finally:
            if self._links.get(worker) is writer:
                del self._links[worker]
                for started in self._live.pop(worker, {}).values():
                    ended = {
                        "type": "call_ended",
                        "call_id": started["call_id"],
                        "front_end": started["front_end"],
                        "reason": INTERRUPTED_REASON,
                        "at": time.time(),
                        "audio_s": {},
                    }
                    self._send(worker, _line(ended))
            writer.close()


class EventLink:
    """A worker's end: its bus events out (a bus sink, never blocking), the other workers'
    events in, to this worker's live subscribers only (they stored them)."""

    def __init__(self, path: Path, worker: int, bus: EventBus) -> None:
        self.path = path
        self.worker = worker
        self.bus = bus
        self.remote_live: dict[str, CallStarted] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=LINE_LIMIT)
        writer.write(_line({"worker": self.worker}))
        self._writer = writer
        self._reading = asyncio.get_running_loop().create_task(self._read(reader))
        self.bus.add_sink(self.publish)

    def publish(self, event: BusEvent) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(_line(bus_event_to_json(event)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        from api.cluster import bus_event_from_json  # psycopg: only where it is needed

        with contextlib.suppress(OSError, ValueError, KeyError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                event = bus_event_from_json(json.loads(line))
                if isinstance(event, CallStarted):
                    self.remote_live[event.call_id] = event
                elif isinstance(event, CallEnded):
                    self.remote_live.pop(event.call_id, None)
                self.bus.relay(event)
        log.info("event relay closed")

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                await self._writer.drain()
            self._writer.close()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading


# --- the supervisor ---------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    """A child process ended before it said it was serving."""


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.count = worker_count(config)
        self.dir = Path(tempfile.mkdtemp(prefix="stt-bridge-workers-"))
        self.key = secrets.token_urlsafe(24)
        self.engine_port = 0
        self.relay = EventRelay()
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.engine: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}
        self.restarts = 0
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self._drains: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        config_file = self.dir / CONFIG_FILE
        config_file.touch(mode=0o600)
        config_file.write_text(json.dumps({"config": to_toml_dict(self.config), "key": self.key}))
        # Migrations and the calls a previous run left live, once, before any worker opens it.
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(
            None, lambda: Store(_store_location(self.config), node_id=node_id(self.config))
        )
        await loop.run_in_executor(None, store.close)
        await self.relay.start(self.dir / EVENTS_SOCKET)
        if engine_process_needed(self.config):
            self.engine, first = await self._spawn("engine", str(self.engine_port))
            self.engine_port = int(first)
            self._watch("engine", -1)
        started = await asyncio.gather(
            *(self._spawn("worker", str(k), str(self.engine_port)) for k in range(self.count))
        )
        for k, (process, first) in enumerate(started):
            self.workers[k] = process
            self._watch("worker", k)
            if k == 0:
                self.ports = json.loads(first)

    async def _spawn(self, role: str, *args: str) -> tuple[asyncio.subprocess.Process, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "api.workers",
            role,
            str(self.dir),
            *args,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the supervisor only, which drains in order
        )
        assert process.stdout is not None
        line = (await process.stdout.readline()).decode()
        if not line.startswith(READY):
            await process.wait()
            raise ChildFailed(f"{role} {' '.join(args)} exited {process.returncode} at start")
        task = asyncio.get_running_loop().create_task(_discard(process.stdout))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return process, line.split(" ", 1)[1].strip()

    def _watch(self, role: str, worker: int) -> None:
        task = asyncio.get_running_loop().create_task(self._restart_forever(role, worker))
        self._watchers.append(task)

    def _process(self, role: str, worker: int) -> asyncio.subprocess.Process | None:
        return self.engine if role == "engine" else self.workers.get(worker)

    async def _restart_forever(self, role: str, worker: int) -> None:
        delay = RESTART_MIN_S
        while True:
            process = self._process(role, worker)
            assert process is not None
            code = await process.wait()
            if self.stopping:
                return
            name = "engine process" if role == "engine" else f"worker {worker}"
            log.error("%s (pid %d) exited %s: restarting it", name, process.pid, code)
            while not self.stopping:
                await asyncio.sleep(delay)
                try:
                    if role == "engine":
                        self.engine, _ = await self._spawn("engine", str(self.engine_port))
                    else:
                        args = (str(worker), str(self.engine_port))
                        self.workers[worker], _ = await self._spawn("worker", *args)
                except ChildFailed as exc:
                    log.error("restart failed: %s", exc)
                    delay = min(RESTART_MAX_S, delay * 2)
                    continue
                self.restarts += 1
                delay = RESTART_MIN_S
                break

    async def stop(self) -> int:
        """Every worker drains its calls, then the engine process stops. 0 when all went well."""
        self.stopping = True
        server = self.config.server
        codes = await _terminate(
            list(self.workers.values()),
            server.drain_notice_s + server.drain_timeout_s + STOP_MARGIN_S,
        )
        if self.engine is not None:
            codes += await _terminate([self.engine], ENGINE_STOP_S)
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self.relay.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return 0 if all(code == 0 for code in codes) else 1


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def _terminate(processes: list[asyncio.subprocess.Process], timeout_s: float) -> list[int]:
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    try:
        return list(
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), timeout_s)
        )
    except TimeoutError:
        for process in processes:
            if process.returncode is None:
                log.error("pid %d still running after %.0f s: killed", process.pid, timeout_s)
                process.kill()
        return [await p.wait() for p in processes]


async def supervise(config: Config) -> int:
    """`stt-bridge serve` with workers: start them, serve until SIGTERM/SIGINT, drain them."""
    server = config.server
    if 0 in (server.port, server.health_port, server.web_port):
        print("stt-bridge: config: server.workers needs fixed ports, not 0", file=sys.stderr)
        return 2
    supervisor = Supervisor(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await supervisor.start()
    except ChildFailed as exc:
        print(f"stt-bridge: {exc}", file=sys.stderr)
        await supervisor.stop()
        return 1
    engine = (
        f"engine {config.engine.name} in pid {supervisor.engine.pid}"
        if supervisor.engine is not None
        else f"engine {config.engine.name} in each worker"
    )
    ports = supervisor.ports
    print(
        f"stt-bridge {__version__}: {supervisor.count} workers, {engine}; "
        f"audio+API :{ports['audio']}, health :{ports['health']}, web client :{ports['web']}",
        flush=True,
    )
    await stop.wait()
    log.info("signal received: draining every worker")
    return await supervisor.stop()


# --- the children -----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """SIGTERM (drain) when the supervisor goes, even killed: no orphan keeps a port."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _load(workdir: Path) -> tuple[Config, str]:
    raw = json.loads((workdir / CONFIG_FILE).read_text())
    return config_from_dict(raw["config"]), str(raw["key"])


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_worker(workdir: Path, worker: int, engine_port: int) -> int:
    from api.app import Service, serve

    config, key = _load(workdir)
    service = Service(worker_config(config, worker, engine_port, key), shared=True)
    stop = _stop_event()
    link = None
    if service.bridge.cluster is None:  # on PostgreSQL the cluster relays between workers
        link = EventLink(workdir / EVENTS_SOCKET, worker, service.bridge.hub.bus)
        service.bridge.remote_calls = link.remote_live
        await link.connect()
    await service.start()
    gc.collect()
    gc.freeze()
    print(f"{READY} {json.dumps(service.ports)}", flush=True)
    code = await serve(service, stop)
    if link is not None:
        await link.close()
    return code


def _require_key(key: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == moshi_asr.PATH:
            given = request.headers.get("kyutai-api-key", "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                raise web.HTTPUnauthorized()
        return await handler(request)

    return middleware


async def run_engine(workdir: Path, port: int) -> int:
    """The engine process: `/api/asr-streaming` and `/info` on loopback, for the workers."""
    from api.app import EXIT_ENGINE_FAILED

    config, key = _load(workdir)
    engine, choice = build_engine(config.engine, config.data.dir)
    await engine.start()
    hub = CallHub(engine)

    async def info(request: web.Request) -> web.Response:
        described = engine.info()
        return web.json_response(
            {
                "engine": {
                    "name": described.name,
                    "reason": choice.reason,
                    "model": described.model,
                    "device": described.device,
                    "capacity": described.capacity,
                    "free_slots": engine.free_slots,
                },
                "pid": os.getpid(),
                "calls_live": len(hub.calls),
            }
        )

    app = web.Application(middlewares=[_require_key(key)])
    app[LIMITS] = config.limits
    moshi_asr.add_routes(app, hub)
    app.router.add_get("/info", info)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    from api.app import _bound_port

    stop = _stop_event()
    gc.collect()
    gc.freeze()
    print(f"{READY} {_bound_port(site)}", flush=True)
    code = 0
    while not stop.is_set():
        if engine.failure is not None:
            log.error("engine failed, exiting for the supervisor to restart it: %s", engine.failure)
            code = EXIT_ENGINE_FAILED
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    await runner.cleanup()
    await engine.stop()
    return code


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """As api/cli.py's: on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str]) -> int:
    _die_with_parent()
    role, workdir = argv[0], Path(argv[1])
    config, _ = _load(workdir)
    logs.configure(config.log.level, config.log.json)
    if role == "engine":
        return run_loop(run_engine(workdir, int(argv[2])))
    return run_loop(run_worker(workdir, int(argv[2]), int(argv[3])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
