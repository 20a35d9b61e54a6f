"""`server.workers = N`: N front-end processes share every listening port; the engine that owns
the model runs in a process of its own, so one model (one GPU) serves every worker's calls.

`stt-bridge serve` with `server.workers != 1` (0: one per core) is the supervisor. Its children:

- the engine processes (`python -m api.workers engine DIR PORT I`), one per `engine.devices`
  entry (none: one, on `engine.device`): the configured engine on that device behind
  `/api/asr-streaming` (telephony/moshi_asr.py, moshi-server's protocol) and `/info` (its free
  slots, device, pid) on a loopback port, nothing else; streams need a random key made at start.
  Kyutai on one GPU thus steps every call of every worker in one batch. Engines that own no
  model (`sink`) run inside each worker instead, and with `engine.name = "remote"` the workers
  use its nodes. Moonshine takes no `devices`: its one process already decodes on every core.
- worker k (`python -m api.workers worker DIR K`): the whole service (api/app.py) with
  `engine.name = "remote"` pointed at every engine process (engine/remote.py: each call to the
  one with the most free slots; each node's URL says its device, `?device=cuda:0`), node id
  `<node_id>/w<k>`, every TCP port (audio/API, health, web, AudioSocket) bound with SO_REUSEPORT:
  the kernel spreads connections across workers. SIP (UDP, a dialog and its RTP in one
  process) runs in worker 0 only; the others do not bind it.
- the event relay: a unix socket in DIR; each worker sends it its bus events (one JSON line
  each) and gets every other worker's, which it relays to its own live subscribers
  (`/v1/events`, `/v1/calls/{id}/events`, via `EventBus.relay`), so any connection sees every
  call. On PostgreSQL (`data.url`) api/cluster.py relays between workers as between nodes.

`/metrics`, whichever worker answers, is the node's: every child writes its counters, gauges and
histograms to prometheus_client's multiprocess files in DIR/metrics (PROMETHEUS_MULTIPROC_DIR),
the supervisor marks a child that exits dead there, and api/metrics.py serves their sum.

The store: each worker writes its own calls to the one SQLite file (WAL; writers take turns
under SQLite's lock), and the outbox claim is one atomic UPDATE, so each webhook goes out once.
The supervisor migrates the file and marks calls a previous run left live before any worker
opens it. A worker that dies is started again; at its start it marks only its own calls left
live `interrupted` (their words stay), and the relay tells the other workers those calls ended.
SIGTERM to the supervisor: every worker drains its calls, then the engine processes stop.
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
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client.multiprocess import mark_process_dead

from api import __version__, logs
from api.config import Config, config_from_dict, to_toml_dict
from api.store import INTERRUPTED_REASON, Store
from engine.config import EngineConfig
from engine.registry import ALIASES, build_engine, choose_engine
from telephony import moshi_asr
from telephony.bus import BusEvent, CallEnded, CallStarted, EventBus, bus_event_to_json
from telephony.call import CallHub
from telephony.limits import LIMITS

log = logging.getLogger(__name__)

CONFIG_FILE: Final = "config.json"
ENGINES_FILE: Final = "engines.json"  # the engine processes' `engine.urls` entries, for workers
METRICS_DIR: Final = "metrics"  # prometheus_client's multiprocess files: the node's /metrics
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
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


def supervised(config: Config) -> bool:
    """`stt-bridge serve` runs the supervisor: for workers, and for more than one engine device
    (even with one worker: every device gets its engine process)."""
    return config.server.workers != 1 or len(config.engine.devices) > 1


def engine_process_needed(config: Config) -> bool:
    return config.engine.name not in IN_WORKER_ENGINES


def engine_devices(config: Config) -> tuple[str, ...]:
    """The engine processes, one per device: `engine.devices`, else the one `engine.device`;
    none for engines that run inside each worker."""
    if not engine_process_needed(config):
        return ()
    return config.engine.devices or (config.engine.device,)


def devices_problem(engine: EngineConfig, chosen: str = "") -> str:
    """Why `engine.devices` does not fit the engine ("" when it does). `chosen`: the engine
    that runs, `auto` resolved; "" = as configured (`auto` passes until it is resolved)."""
    if not engine.devices:
        return ""
    name = chosen or ALIASES.get(engine.name, engine.name)
    if name in IN_WORKER_ENGINES:
        return f"engine.devices: the {name} engine has no model to place on a device"
    if name == "moonshine":
        return (
            "engine.devices: Moonshine runs on the CPU in one process, whose engine.threads "
            "decode on every core with one model; devices places Kyutai, a process per GPU"
        )
    return ""


def on_device(config: Config, device: str) -> Config:
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, device=device))


def single_process_config(config: Config) -> Config:
    """The config `stt-bridge serve` runs without the supervisor: one `engine.devices` entry is
    the device of the engine in the process."""
    return on_device(config, config.engine.devices[0]) if config.engine.devices else config


def node_id(config: Config) -> str:
    return config.server.node_id or socket.gethostname()


@dataclasses.dataclass
class EngineProcess:
    """One engine process: its device, its loopback port (kept across restarts), its process."""

    index: int
    device: str  # as configured
    port: int = 0
    runs_on: str = ""  # the device the engine reported (`auto` resolved)
    process: asyncio.subprocess.Process | None = None

    def node(self) -> str:
        """Its `engine.urls` entry for the workers; the query (ignored by the engine process)
        names its device wherever the node shows: /info, /metrics, logs."""
        device = urllib.parse.quote(self.runs_on or self.device, safe=":")
        return (
            f"ws://127.0.0.1:{self.port}{moshi_asr.PATH}?device={device} "
            f"health=http://127.0.0.1:{self.port}"
        )

    def describe(self) -> str:
        pid = self.process.pid if self.process is not None else 0
        return f"{self.runs_on or self.device} (pid {pid}, :{self.port})"


def worker_config(config: Config, worker: int, nodes: list[str], key: str) -> Config:
    """Worker `worker`'s config: its own node id, SIP in worker 0 only, and the engine processes
    (when there are any) as the nodes of its remote engine."""
    server = dataclasses.replace(config.server, workers=1, node_id=f"{node_id(config)}/w{worker}")
    engine = config.engine
    if nodes:
        engine = dataclasses.replace(
            engine,
            name="remote",
            urls=tuple(nodes),
            devices=(),
            api_key=key,
            probe_interval_s=min(engine.probe_interval_s, 1.0),
        )
    sip = config.sip if worker == 0 else dataclasses.replace(config.sip, enabled=False)
    return dataclasses.replace(config, server=server, engine=engine, sip=sip)


def _store_location(config: Config) -> Path | str:
    return config.data.url or config.data.folder() / "stt-bridge.sqlite3"


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
        self.metrics_dir = self.dir / METRICS_DIR
        self.key = secrets.token_urlsafe(24)
        self.relay = EventRelay()
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.engines = [EngineProcess(i, d) for i, d in enumerate(engine_devices(config))]
        self.ports: dict[str, int] = {}
        self.restarts = 0
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self._drains: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        config_file = self.dir / CONFIG_FILE
        config_file.touch(mode=0o600)
        config_file.write_text(json.dumps({"config": to_toml_dict(self.config), "key": self.key}))
        self.metrics_dir.mkdir()
        # Migrations and the calls a previous run left live, once, before any worker opens it.
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(
            None, lambda: Store(_store_location(self.config), node_id=node_id(self.config))
        )
        await loop.run_in_executor(None, store.close)
        await self.relay.start(self.dir / EVENTS_SOCKET)
        await asyncio.gather(*(self._start_engine(engine) for engine in self.engines))
        for engine in self.engines:
            self._watch("engine", engine.index)
        nodes = [engine.node() for engine in self.engines]
        (self.dir / ENGINES_FILE).write_text(json.dumps(nodes))
        started = await asyncio.gather(*(self._spawn("worker", str(k)) for k in range(self.count)))
        for k, (process, first) in enumerate(started):
            self.workers[k] = process
            self._watch("worker", k)
            if k == 0:
                self.ports = json.loads(first)

    def _engine_env(self) -> dict[str, str]:
        """Engine processes that share the CPU share its cores: torch's threads (OMP) split
        between them, unless OMP_NUM_THREADS is set. Left to their defaults, each would spin as
        many threads as there are cores and every step would wait on the others'."""
        on_cpu = [e for e in self.engines if not e.device.startswith("cuda")]
        if len(on_cpu) < 2 or "OMP_NUM_THREADS" in os.environ:
            return {}
        threads = str(max(1, (os.cpu_count() or 1) // len(on_cpu)))
        return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    async def _start_engine(self, engine: EngineProcess) -> None:
        extra = self._engine_env() if not engine.device.startswith("cuda") else {}
        engine.process, first = await self._spawn(
            "engine", str(engine.port), str(engine.index), env=extra
        )
        ready = json.loads(first)
        engine.port, engine.runs_on = int(ready["port"]), str(ready["device"])

    async def _spawn(
        self, role: str, *args: str, env: dict[str, str] | None = None
    ) -> tuple[asyncio.subprocess.Process, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "api.workers",
            role,
            str(self.dir),
            *args,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the supervisor only, which drains in order
            # Read by prometheus_client when imported: its metrics then live in files there.
            env={**os.environ, MULTIPROC_ENV: str(self.metrics_dir), **(env or {})},
        )
        assert process.stdout is not None
        line = (await process.stdout.readline()).decode()
        if not line.startswith(READY):
            await process.wait()
            self._dead(process)
            raise ChildFailed(f"{role} {' '.join(args)} exited {process.returncode} at start")
        task = asyncio.get_running_loop().create_task(_discard(process.stdout))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return process, line.split(" ", 1)[1].strip()

    def _dead(self, process: asyncio.subprocess.Process) -> None:
        """Its live gauges (calls live, ...) leave the node's /metrics; its counters stay."""
        mark_process_dead(process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]

    def _watch(self, role: str, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self._restart_forever(role, index))
        self._watchers.append(task)

    def _process(self, role: str, index: int) -> asyncio.subprocess.Process | None:
        return self.engines[index].process if role == "engine" else self.workers.get(index)

    def _name(self, role: str, index: int) -> str:
        if role == "worker":
            return f"worker {index}"
        engine = self.engines[index]
        return f"engine process {index} on {engine.runs_on or engine.device}"

    async def _restart_forever(self, role: str, index: int) -> None:
        delay = RESTART_MIN_S
        while True:
            process = self._process(role, index)
            assert process is not None
            code = await process.wait()
            self._dead(process)
            if self.stopping:
                return
            name = self._name(role, index)
            log.error("%s (pid %d) exited %s: restarting it", name, process.pid, code)
            while not self.stopping:
                await asyncio.sleep(delay)
                try:
                    if role == "engine":
                        await self._start_engine(self.engines[index])
                    else:
                        self.workers[index], _ = await self._spawn("worker", str(index))
                except ChildFailed as exc:
                    log.error("restart failed: %s", exc)
                    delay = min(RESTART_MAX_S, delay * 2)
                    continue
                self.restarts += 1
                delay = RESTART_MIN_S
                restarted = self._process(role, index)
                assert restarted is not None
                log.info("%s restarted: pid %d", name, restarted.pid)
                break

    def describe(self) -> str:
        """The startup line's middle: workers, and which engine process runs on which device."""
        workers = f"{self.count} worker{'s' if self.count != 1 else ''}"
        name = self.config.engine.name
        if not self.engines:
            return f"{workers}, engine {name} in each worker"
        if len(self.engines) == 1:
            return f"{workers}, engine {name} on {self.engines[0].describe()}"
        where = ", ".join(f"[{e.index}] {e.describe()}" for e in self.engines)
        return f"{workers}, engine {name} in {len(self.engines)} processes: {where}"

    async def stop(self) -> int:
        """Every worker drains its calls, then the engine processes stop. 0 when all went well."""
        self.stopping = True
        server = self.config.server
        codes = await _terminate(
            list(self.workers.values()),
            server.drain_notice_s + server.drain_timeout_s + STOP_MARGIN_S,
        )
        engines = [e.process for e in self.engines if e.process is not None]
        if engines:
            codes += await _terminate(engines, ENGINE_STOP_S)
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
        print(
            "stt-bridge: config: server.workers (or several engine.devices) needs fixed ports, "
            "not 0",
            file=sys.stderr,
        )
        return 2
    problem = devices_problem(config.engine)
    if problem:
        print(f"stt-bridge: config: {problem}", file=sys.stderr)
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
    ports = supervisor.ports
    from api.app import urls_to_open
    from api.auth import twilio_note

    note = twilio_note(config.api.keys, config.twilio.auth_token)  # a road refused: say why
    print(
        f"stt-bridge {__version__}: {supervisor.describe()}; "
        f"audio+API :{ports['audio']}, health :{ports['health']}, web client :{ports['web']}; "
        f"{urls_to_open(config, ports)}{f'; {note}' if note else ''}",
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


async def run_worker(workdir: Path, worker: int) -> int:
    from api.app import Service, serve

    config, key = _load(workdir)
    nodes = json.loads((workdir / ENGINES_FILE).read_text())
    service = Service(worker_config(config, worker, nodes, key), shared=True)
    service.bridge.metrics.serve_node(workdir / METRICS_DIR)
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


async def run_engine(workdir: Path, port: int, index: int) -> int:
    """Engine process `index`: `/api/asr-streaming` and `/info` on loopback, for the workers,
    with the engine on the `index`th device."""
    from api.app import EXIT_ENGINE_FAILED
    from api.metrics import observe_steps

    config, key = _load(workdir)
    config = on_device(config, engine_devices(config)[index])
    choice = choose_engine(config.engine)
    problem = devices_problem(config.engine, choice.name)  # `auto` resolved only now
    if problem:
        print(f"stt-bridge: config: {problem}", file=sys.stderr)
        return 2
    engine, choice = build_engine(config.engine)
    await engine.start()
    hub = CallHub(engine)
    observe_steps(engine)  # into the node's /metrics (the multiprocess files)

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
                "engine_process": index,
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
    ready = {"port": _bound_port(site), "device": engine.info().device}
    print(f"{READY} {json.dumps(ready)}", flush=True)
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
        return run_loop(run_engine(workdir, int(argv[2]), int(argv[3])))
    return run_loop(run_worker(workdir, int(argv[2])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
