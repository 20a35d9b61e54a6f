"""What `stt-bridge` checks before any model loads: the folders it must write and the ports it
must have. Each problem is one line that names the setting to change, so a mistake costs a
second instead of a model load (minutes for Kyutai) followed by a traceback.

The three HTTP ports (server.port, health_port, web_port) are the service: one taken stops it
(exit 2). AudioSocket and SIP are front ends with an `enabled` switch: a taken port turns that
front end off with one log line where it starts, and /info and /ready say so
(docs/configuration.md).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from api.config import Config
from engine.config import EngineConfig
from engine.registry import choose_engine, cuda_available

# The listeners without which the service is not there: a taken port stops it.
REQUIRED_PORTS = ("port", "health_port", "web_port")


def port_problem(setting: str, host: str, port: int) -> str:
    """Why TCP `port` on `host` cannot be listened on ("" when it can). Bound as aiohttp binds
    it (SO_REUSEADDR: a port left in TIME_WAIT by the last run is no obstacle) and listened on,
    since on Linux only a listening socket conflicts with another SO_REUSEADDR bind."""
    if port == 0:
        return ""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as exc:
            return listen_problem(setting, host, port, exc)
    return ""


def listen_problem(setting: str, host: str, port: int, exc: OSError) -> str:
    """One line for a listener that could not bind: which setting moves it."""
    if exc.errno == errno.EADDRINUSE:
        why = "is taken by another program"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "needs privileges (ports below 1024 do)"
    else:
        why = f"cannot be bound ({exc.strerror})"
    return f"{setting} = {port}: TCP port {port} on {host} {why}; set {setting} to a free port"


def required_ports_problem(config: Config) -> str:
    server = config.server
    for name in REQUIRED_PORTS:
        problem = port_problem(f"server.{name}", server.host, getattr(server, name))
        if problem:
            return problem
    return ""


def folder_problem(setting: str, value: str, folder: Path, prepared_ok: bool = False) -> str:
    """Why `folder` cannot be written ("" when it can). It is created now if missing (its user
    would create it a moment later). `prepared_ok`: a read-only folder that already holds
    something is fine (a model cache prepared in the image, say)."""
    shown = repr(value) if value else f"'' ({folder})"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{setting} = {shown}: cannot create this folder ({exc.strerror}); set {setting}"
    if os.access(folder, os.W_OK | os.X_OK):
        return ""
    if prepared_ok and any(folder.iterdir()):
        return ""
    return f"{setting} = {shown}: this user cannot write there; set {setting}"


def cache_problem(engine: EngineConfig) -> str:
    """Moonshine prepares its model once in engine.cache_dir; the other engines need no folder."""
    if choose_engine(engine).name != "moonshine":
        return ""
    return folder_problem("engine.cache_dir", engine.cache_dir, engine.model_cache(), True)


def remote_problem(engine: EngineConfig) -> str:
    """The remote engine's node list, read as it will be when the engine is built."""
    if choose_engine(engine).name != "remote":
        return ""
    from engine.remote import parse_node

    for entry in engine.urls:
        try:
            parse_node(entry)
        except ValueError as exc:
            return f"config: {exc}"
    return ""


def device_problem(engine: EngineConfig) -> str:
    """Kyutai told to run on a CUDA device this machine does not have: said now, not after
    torch and the model's download."""
    if choose_engine(engine).name != "kyutai":
        return ""
    wanted = [("engine.devices", d) for d in engine.devices] or [("engine.device", engine.device)]
    count = cuda_devices()
    for setting, device in wanted:
        if not device.startswith("cuda"):
            continue
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            have = (
                f"{count} CUDA device(s): choose cuda:0-{count - 1}"
                if count
                else ("no CUDA device: choose cpu (float32, slow) or run it where a GPU is")
            )
            return f"config: {setting} = {device!r}: this machine has {have}"
    return ""


def cuda_devices() -> int:
    if not cuda_available():
        return 0
    import torch

    return int(torch.cuda.device_count())


def serve_problem(config: Config) -> str:
    """Everything `stt-bridge serve` can find wrong before it loads a model; "" when all is well."""
    problem = required_ports_problem(config)
    if not problem and not config.data.url:
        problem = folder_problem("data.dir", config.data.dir, config.data.folder())
    return problem or engine_problem(config.engine)


def engine_problem(engine: EngineConfig) -> str:
    """What stops the configured engine from starting on this machine, found without starting
    it (`stt-bridge serve` and `stt-bridge transcribe`)."""
    return cache_problem(engine) or remote_problem(engine) or device_problem(engine)
