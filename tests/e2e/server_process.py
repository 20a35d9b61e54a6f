"""`stt-bridge serve` as a real process on free loopback ports, for restart and signal tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import MODEL_CACHE

CLI = [sys.executable, "-m", "api.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, parent PID, ...]; None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(entry.name)
        if fields is not None and int(fields[1]) == parent:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has ended, only not been reaped


def loopback_ports() -> dict[str, int]:
    """A free loopback port for each of the service's listeners."""
    return {name: free_port() for name in ("audio", "health", "web", "audiosocket")}


def loopback_env(ports: dict[str, int]) -> dict[str, str]:
    """The `STT_BRIDGE_*` variables that put every listener on 127.0.0.1 at `ports`."""
    return {
        "STT_BRIDGE_SERVER_HOST": "127.0.0.1",
        "STT_BRIDGE_SERVER_PORT": str(ports["audio"]),
        "STT_BRIDGE_SERVER_HEALTH_PORT": str(ports["health"]),
        "STT_BRIDGE_SERVER_WEB_PORT": str(ports["web"]),
        "STT_BRIDGE_AUDIOSOCKET_HOST": "127.0.0.1",
        "STT_BRIDGE_AUDIOSOCKET_PORT": str(ports["audiosocket"]),
    }


class ServerProcess:
    def __init__(self, data_dir: Path, **env: str) -> None:
        self.log_to: Path | None = None  # set before start(): the file that gets its stderr
        self.ports = loopback_ports()
        self.env = {
            **os.environ,
            **loopback_env(self.ports),
            "STT_BRIDGE_ENGINE_NAME": "moonshine",
            "STT_BRIDGE_ENGINE_CACHE_DIR": str(MODEL_CACHE),
            "STT_BRIDGE_DATA_DIR": str(data_dir),
            "STT_BRIDGE_SIP_ENABLED": "false",  # on by default on 5060; a test turns it on itself
            **env,
        }
        self.process: subprocess.Popen[str] | None = None
        self.banner = ""  # the startup line: every port, and which process runs where

    def start(self) -> ServerProcess:
        stderr = None if self.log_to is None else self.log_to.open("a")
        self.process = subprocess.Popen(
            [*CLI, "serve"], env=self.env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        if stderr is not None:
            stderr.close()  # the child has its own copy
        assert self.process.stdout is not None
        self.banner = self.process.stdout.readline()  # printed once every port listens
        assert "stt-bridge" in self.banner, self.banner
        return self

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.ports['audio']}{path}"

    def children(self) -> list[int]:
        """PIDs of the processes the server started (decoder workers, the PJSIP agent)."""
        assert self.process is not None
        return child_pids(self.process.pid)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
