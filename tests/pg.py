"""PostgreSQL from Debian's `postgresql` package, started by the test session itself.

`initdb` into a temporary directory, then `postgres` on a free loopback port and a private
unix-socket directory, with trust authentication (loopback only). PostgreSQL refuses to run as
root: when the tests do, the server runs as the `postgres` user the package creates (or
`nobody`). It is stopped by its own PID (SIGINT: fast shutdown) at the end of the session.
Each test gets a database of its own (`fresh_database`).

A test may take the server away under live calls and bring it back on the same data and port:
`shut_down()` (`pg_ctl stop -m fast`: clients are told and disconnected, then a clean
shutdown), `kill()` (SIGKILL to the postmaster it started: crash recovery on the next start),
then `restart()`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pg_bin() -> Path:
    """The newest installed server's binaries (/usr/lib/postgresql/<major>/bin)."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
    )
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return versions[-1].parent


def _server_user() -> dict[str, Any]:
    """Popen arguments that drop root for the server (PostgreSQL will not run as root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    raise RuntimeError("running as root, and no postgres/nobody user to run PostgreSQL as")


class Postgres:
    def __init__(self, fsync: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="stt-bridge-pg-"))
        self.port = free_port()
        self.fsync = fsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"postgresql://bridge@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://bridge@127.0.0.1:{self.port}/{database}"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"}

    def start(self) -> Postgres:
        as_user = _server_user()
        (self.root / "sockets").mkdir()
        if as_user:
            for path in (self.root, self.root / "sockets"):
                os.chown(path, as_user["user"], as_user["group"])
        data = self.data
        env = self._env()
        subprocess.run(
            [
                str(pg_bin() / "initdb"),
                "-D",
                str(data),
                "-U",
                "bridge",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            env=env,
            cwd=self.root,
            **as_user,
        )
        return self._launch()

    def _launch(self) -> Postgres:
        """The postmaster on the initialised data directory; returns once it takes connections."""
        as_user = _server_user()
        data = self.data
        env = self._env()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root / "sockets"),
            "max_connections": "200",
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "shared_buffers": "64MB",
        }
        args = [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [str(pg_bin() / "postgres"), "-D", str(data), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.root,
            **as_user,
        )
        log.close()
        deadline = time.monotonic() + 60
        self.accepting_again_s = 0.0
        while True:
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                self.accepting_again_s = 60 - (deadline - time.monotonic())
                return self
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "PostgreSQL did not start: " + (self.root / "server.log").read_text()
                    ) from None
                time.sleep(0.1)

    def shut_down(self) -> None:
        """`pg_ctl stop -m fast`: every session is ended, then the server stops cleanly."""
        assert self.process is not None
        pg_ctl = [str(pg_bin() / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"]
        subprocess.run(pg_ctl, check=True, capture_output=True, env=self._env(), **_server_user())
        self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL to the postmaster this object started: a crash. Its backends see their
        postmaster gone and exit; the next start recovers from the WAL."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def restart(self) -> Postgres:
        """The server again on the same data and port. After a kill, the old backends may still
        hold the shared memory for a moment: the start is tried again until they are gone."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return self._launch()
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def fresh_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
