"""A throwaway PostgreSQL cluster for tests and benches, from the binaries on this machine.

    cluster = PostgresCluster()
    cluster.start()
    dsn = cluster.create_database("demo")   # postgresql://fieldsync@127.0.0.1:PORT/demo
    ...
    cluster.cleanup()                       # stops the server it started, removes its files

initdb and postgres refuse to run as root: as root (CI) they run as the `postgres` system
user in a temporary directory that user owns. The directory is on /dev/shm (memory) when
it has room, because creating a database per test on a busy disk costs ten times more.
The server listens on 127.0.0.1 only, on a free port, with its unix socket inside the
temporary directory, and trusts every local connection of the `fieldsync` superuser.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Literal

SUPERUSER = "fieldsync"
SYSTEM_USER = "postgres"  # who runs initdb/postgres when we are root

StopMode = Literal["smart", "fast", "immediate"]


class ClusterError(RuntimeError):
    pass


def find_bin_dir() -> Path | None:
    """The newest `/usr/lib/postgresql/<major>/bin` holding initdb, pg_ctl and postgres."""
    override = os.environ.get("FIELDSYNC_PG_BIN")
    candidates = [Path(override)] if override else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        majors = [p for p in root.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        majors.sort(key=lambda p: tuple(int(x) for x in p.name.split(".")), reverse=True)
        candidates += [p / "bin" for p in majors]
    for path in candidates:
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return path
    return None


def _default_parent() -> Path | None:
    """/dev/shm when it is a writable tmpfs with room; else the usual temporary directory."""
    shm = Path("/dev/shm")
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    if os.access(shm, os.W_OK | os.X_OK) and stat.f_bavail * stat.f_frsize >= 2 << 30:
        return shm
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """One PostgreSQL server in a temporary directory; `cleanup()` always stops it."""

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        max_connections: int = 300,
        port: int | None = None,
        parent_dir: Path | None = None,
    ) -> None:
        found = bin_dir or find_bin_dir()
        if found is None:
            raise ClusterError("no PostgreSQL binaries found under /usr/lib/postgresql/*/bin")
        self.bin_dir = found
        self.max_connections = max_connections
        self.port = port or _free_port()
        self.host = "127.0.0.1"
        self.as_root = os.geteuid() == 0
        self.parent_dir = parent_dir or _default_parent()
        self.base: Path | None = None
        self._running = False

    # -- paths -------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._base() / "sock"

    @property
    def log_file(self) -> Path:
        return self._base() / "server.log"

    def _base(self) -> Path:
        if self.base is None:
            raise ClusterError("the cluster was not initialised")
        return self.base

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    # -- lifecycle ---------------------------------------------------------

    def init(self) -> None:
        """initdb into a fresh temporary directory (start() does this when needed)."""
        if self.base is not None:
            return
        self.base = Path(tempfile.mkdtemp(prefix="fieldsync-pg-", dir=self.parent_dir))
        self.socket_dir.mkdir()
        if self.as_root:
            owner = pwd.getpwnam(SYSTEM_USER)
            for path in (self.base, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(self.max_connections),
            # The suite's own throwaway cluster: losing it in an OS crash loses nothing,
            # so skip the disk flushes. synchronous_commit stays on (fieldsync refuses off).
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "on",
            "shared_buffers": "64MB",
            "max_wal_size": "128MB",  # bounds the WAL that a database per test leaves behind
            "min_wal_size": "32MB",
            "log_min_messages": "warning",
            "log_min_error_statement": "panic",  # expected errors stay out of the log
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/pg_cluster.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def start(self) -> None:
        self.init()
        if self._running:
            return
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "60",
            ],
            what="pg_ctl start",
        )
        self._running = True

    def stop(self, mode: StopMode = "fast") -> None:
        if not self._running:
            return
        try:
            self._run(
                [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", mode, "-w"],
                what="pg_ctl stop",
            )
        except ClusterError:
            self._kill_postmaster()
        self._running = False

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    @property
    def running(self) -> bool:
        return self._running

    def cleanup(self) -> None:
        """Stop the server this object started (if it runs) and remove its directory."""
        try:
            if self._running:
                self.stop("immediate")
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- databases ---------------------------------------------------------

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through psql (as the fieldsync superuser) and return its output."""
        proc = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
            check=False,
        )
        if proc.returncode != 0:
            raise ClusterError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, name: str, template: str = "template0") -> str:
        """CREATE DATABASE name (from template0 unless told); returns its DSN."""
        self.psql(create_database_sql(name, template))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.psql(drop_database_sql(name))

    async def acreate_database(self, name: str, template: str = "template0") -> str:
        """create_database without blocking the event loop (for async fixtures)."""
        await self._aexecute(create_database_sql(name, template))
        return self.dsn(name)

    async def adrop_database(self, name: str) -> None:
        await self._aexecute(drop_database_sql(name))

    async def _aexecute(self, sql: str) -> None:
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(self.dsn(), timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    # -- helpers -----------------------------------------------------------

    def _run(self, argv: list[str], what: str | None = None) -> None:
        if self.as_root:
            argv = ["runuser", "-u", SYSTEM_USER, "--", *argv]
        proc = subprocess.run(
            argv,
            cwd=self._base(),
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
        if proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout.strip()
            with contextlib.suppress(OSError):
                detail += "\n" + self.log_file.read_text()[-2000:]
            raise ClusterError(f"{what or Path(argv[0]).name} failed: {detail}")

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl cannot stop it: SIGQUIT, then SIGKILL, our own postmaster."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


class DatabaseSupply:
    """Fresh databases made ahead of need on a background thread, and dropped there.

    A test takes one (`take()` → name, dsn) and gives it back (`give_back(name)`) when
    done; creating and dropping happen while other tests run. With `prepare`, the
    databases are copies of a template that `prepare(dsn)` set up once (e.g. migrated).
    """

    def __init__(
        self,
        cluster: PostgresCluster,
        prefix: str,
        prepare: Callable[[str], None] | None = None,
        ahead: int = 2,
    ) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.ahead = ahead
        self._numbers = itertools.count(1)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pg-{prefix}")
        self._ready: deque[Future[str]] = deque()
        self._lock = threading.Lock()
        self._template = "template0"
        if prepare is not None:
            self._template = f"{prefix}_template"
            self._worker.submit(self._prepare, prepare).result()

    def _prepare(self, prepare: Callable[[str], None]) -> None:
        prepare(self.cluster.create_database(self._template))

    def _create(self, name: str) -> str:
        return self.cluster.create_database(name, template=self._template)

    def _drop(self, name: str) -> None:
        try:
            self.cluster.drop_database(name)
        except ClusterError:  # e.g. the cluster is stopped; cleanup() removes it anyway
            pass

    def take(self) -> tuple[str, str]:
        """A fresh database: (name, dsn)."""
        with self._lock:
            while len(self._ready) <= self.ahead:
                name = f"{self.prefix}_{next(self._numbers)}"
                self._ready.append(self._worker.submit(self._create, name))
            made = self._ready.popleft()
        dsn = made.result()
        return dsn.rsplit("/", 1)[1], dsn

    def give_back(self, name: str) -> None:
        """Drop a database taken from this supply (in the background)."""
        self._worker.submit(self._drop, name)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def _ident(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain database name: {name!r}")
    return f'"{name}"'


def create_database_sql(name: str, template: str = "template0") -> str:
    return f"CREATE DATABASE {_ident(name)} TEMPLATE {_ident(template)}"


def drop_database_sql(name: str) -> str:
    return f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)"
