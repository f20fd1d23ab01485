"""Database servers started on a restored copy, and their own integrity checks.

A backup whose writer quiesced PostgreSQL or MariaDB/MySQL records the server's data
directory (the path the server saw, inside the guest for a VM). A restore test finds that
directory on the restored file systems, copies it out of the sandbox (the server writes
while it recovers; ``jobs/restore_check.py``), starts this host's server on the copy the
way it would start after a power cut, and runs the server's own check:

* PostgreSQL: the server must recover at least to the WAL position the writer flushed at
  the freeze (else commits acknowledged before the point are missing), then ``pg_amcheck
  --all`` checks every table and B-tree index of every database. The copy runs under the
  ``postgres`` account, on a socket only, trusting local connections.
* MariaDB/MySQL: ``mariadb-check --all-databases`` (``CHECK TABLE`` on every table), on a
  server with networking and grant tables off, and its binary log on as it was recorded
  (crash recovery decides prepared transactions from it).

The host needs the same major version of the server the backup recorded. Copies live in a
temporary directory (``TMPDIR``, /tmp by default, so the ``postgres`` account can reach
them) and are removed afterwards; each server started here is stopped by its own pid or
data directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Reports one finding: what was checked, whether it passed, the evidence.
Report = Callable[[str, bool, str], None]

PG_ROOT = Path("/usr/lib/postgresql")
#: How long a server may take to recover and start, and a check to run, in seconds.
START_TIMEOUT = 600
CHECK_TIMEOUT = 3600


@dataclass(frozen=True, slots=True)
class RecordedApp:
    """A database a backup's writer quiesced: its kind, the writer's name and record."""

    kind: str  # postgresql | mysql
    writer: str
    data_directory: str
    record: dict[str, Any]


def recorded_apps(manifest: dict[str, Any]) -> list[RecordedApp]:
    """The databases whose writers recorded a data directory (manifests come from a
    repository: anything malformed is skipped, never trusted)."""
    point = manifest.get("point")
    writers = point.get("writers") if isinstance(point, dict) else None
    found = []
    for writer in writers if isinstance(writers, list) else []:
        if not isinstance(writer, dict) or writer.get("kind") not in ("postgresql", "mysql"):
            continue
        record = writer.get("manifest")
        if isinstance(record, dict) and isinstance(record.get("data_directory"), str):
            found.append(RecordedApp(writer["kind"], str(writer.get("name", writer["kind"])),
                                     record["data_directory"], record))
    return found


#: Copies the data directory into the (new) path given; says what went wrong, or None.
Fetch = Callable[[Path], "str | None"]


def copy_of(source: Path) -> Fetch:
    """A fetch that copies a local directory."""
    def fetch(data: Path) -> str | None:
        copied = _run(["cp", "-a", "--reflink=auto", str(source), str(data)], timeout=CHECK_TIMEOUT)
        return None if copied.returncode == 0 else f"cannot copy {source}: {output_tail(copied)}"
    return fetch


def check_app(app: RecordedApp, fetch: Fetch, report: Report) -> None:
    """Start ``app``'s server on a copy of its data directory (``fetch`` makes it, out of
    the restored backup) and run its check."""
    with _scratch() as base:
        data = base / "data"
        trouble = fetch(data)
        if trouble is not None or not data.is_dir():
            report("copy", False, f"cannot copy {app.data_directory} out of the backup: {trouble or 'nothing came'}")
            return
        links = _symlinks(data)
        if links:
            # A link (pg_wal, a tablespace) names a place on this host, not in the backup:
            # a server started on the copy would write there.
            report(f"{app.kind} start", False, "the data directory holds symbolic links, not followed on this host: "
                   + ", ".join(str(p.relative_to(data)) for p in links[:5]))
            return
        if app.kind == "postgresql":
            _check_postgresql(app, base, data, report)
        else:
            _check_mariadb(app, base, data, report)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="ff-app-check-"))
    try:
        base.chmod(0o755)  # the postgres account reaches its copy through it
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _symlinks(top: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(top):
        found += [Path(folder, name) for name in dirs + files if os.path.islink(os.path.join(folder, name))]
    return sorted(found)


def _run(argv: list[str], timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]} is not installed: {err}")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]} did not finish within {timeout:g}s")


def output_tail(done: subprocess.CompletedProcess[str]) -> str:
    """The end of what a tool printed: the evidence a check keeps."""
    return (done.stdout + done.stderr).strip()[-600:]


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace").strip()[-600:]
    except OSError:
        return "(no log)"


# -- PostgreSQL -----------------------------------------------------------------------------


def _check_postgresql(app: RecordedApp, base: Path, data: Path, report: Report) -> None:
    version = (data / "PG_VERSION").read_text().strip() if (data / "PG_VERSION").is_file() else None
    if version is None:
        report("postgresql start", False, f"{app.data_directory} holds no PG_VERSION: not a data directory")
        return
    bin_dir = PG_ROOT / version / "bin"
    if not (bin_dir / "postgres").exists():
        report("postgresql start", False, f"PostgreSQL {version} is not installed on this host: "
                                          f"install postgresql-{version} to check this backup")
        return
    # The copy's server is not running: its lock file names a process of the guest.
    for stale in ("postmaster.pid", "postmaster.opts"):
        (data / stale).unlink(missing_ok=True)
    if not (data / "postgresql.conf").exists():
        (data / "postgresql.conf").write_text("")  # Debian keeps it in /etc, which is not the copy
    sockets = base / "sockets"
    sockets.mkdir()
    hba = base / "pg_hba.conf"
    hba.write_text("local all all trust\n")
    chown = _run(["chown", "-R", "postgres:postgres", str(data), str(sockets), str(hba)])
    if chown.returncode != 0:
        report("postgresql start", False, f"cannot give the copy to the postgres account: {output_tail(chown)}")
        return
    as_postgres = ["runuser", "-u", "postgres", "--"]
    log = sockets / "server.log"  # where the postgres account may write
    options = (f"-c listen_addresses='' -c unix_socket_directories='{sockets}' -c hba_file='{hba}' -c port=5432 "
               "-c archive_mode=off -c shared_preload_libraries=''")
    start = _run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                  "-w", "-t", str(START_TIMEOUT), "start"], timeout=START_TIMEOUT + 30)
    try:
        if start.returncode != 0:
            report("postgresql start", False,
                   f"the server did not start on the copy: {_log_tail(log) if log.exists() else output_tail(start)}")
            return
        superuser = str(app.record.get("superuser") or "postgres")
        client = ["-h", str(sockets), "-p", "5432", "-U", superuser]
        flushed = (app.record.get("wal_flushed_at_freeze") or {}).get("lsn")
        if isinstance(flushed, str) and re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", flushed):
            lsn = _run([*as_postgres, str(bin_dir / "psql"), *client, "-d", "postgres", "-AtX", "-c",
                        f"SELECT pg_current_wal_insert_lsn() >= '{flushed}'::pg_lsn, pg_current_wal_insert_lsn()"])
            held, _, at = lsn.stdout.strip().partition("|")
            report("postgresql WAL", lsn.returncode == 0 and held == "t",
                   f"recovered to {at}; the writer flushed {flushed} at the freeze" if lsn.returncode == 0
                   else output_tail(lsn))
        amcheck = _run([*as_postgres, str(bin_dir / "pg_amcheck"), *client, "--all", "--install-missing"],
                       timeout=CHECK_TIMEOUT)
        databases = _run([*as_postgres, str(bin_dir / "psql"), *client, "-d", "postgres", "-AtX", "-c",
                          "SELECT count(*) FROM pg_database WHERE datallowconn"])
        report("pg_amcheck", amcheck.returncode == 0,
               f"no corruption in {databases.stdout.strip() or '?'} databases (tables and B-tree indexes)"
               if amcheck.returncode == 0 else output_tail(amcheck))
    finally:
        stopped = _run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        if stopped.returncode != 0 and (data / "postmaster.pid").exists():
            _run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])


# -- MariaDB / MySQL ------------------------------------------------------------------------


def _mariadb_server() -> str | None:
    for name in ("mariadbd", "mysqld"):
        found = shutil.which(name, path="/usr/sbin:/usr/local/sbin:/usr/bin")
        if found:
            return found
    return None


def _binlog_option(app: RecordedApp, data: Path) -> list[str]:
    """``--log-bin`` as the server had it, when its binary log is in the data directory.

    With the binary log on, InnoDB commits in two phases with it, and a copy may hold
    transactions prepared but not yet decided: the server decides them from the binary log
    at start, and refuses to start without it."""
    binlog = app.record.get("binlog")
    name = binlog.get("file") if isinstance(binlog, dict) else None
    base = re.sub(r"\.\d+$", "", name) if isinstance(name, str) else ""
    if not re.fullmatch(r"[\w.-]+", base) or not (data / f"{base}.index").is_file():
        return []
    return [f"--log-bin={base}"]


def _check_mariadb(app: RecordedApp, base: Path, data: Path, report: Report) -> None:
    server = _mariadb_server()
    if server is None:
        report("mariadb start", False, "no MariaDB or MySQL server is installed on this host: install mariadb-server")
        return
    for stale in data.glob("*.pid"):
        stale.unlink()
    sock, log = base / "mysqld.sock", base / "server.log"
    process = subprocess.Popen(
        [server, "--no-defaults", "--user=root", f"--datadir={data}", f"--socket={sock}", "--skip-networking",
         "--skip-grant-tables", f"--pid-file={base / 'mysqld.pid'}", f"--log-error={log}",
         *_binlog_option(app, data)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = [f"--socket={sock}", "--user=root"]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                report("mariadb start", False, f"the server exited on the copy: {_log_tail(log)}")
                return
            if _run(["mariadb-admin", *client, "ping"], timeout=10).returncode == 0:
                break
            if time.monotonic() > deadline:
                report("mariadb start", False, f"the server did not start within {START_TIMEOUT}s: {_log_tail(log)}")
                return
            time.sleep(0.2)
        checked = _run(["mariadb-check", *client, "--all-databases", "--check"], timeout=CHECK_TIMEOUT)
        tables, problems = _mariadb_check_report(checked.stdout)
        passed = checked.returncode == 0 and not problems and tables > 0
        named = "; ".join(f"{table}: {', '.join(said)}" for table, said in problems.items())
        report("mariadb-check", passed, f"{tables} tables OK" if passed else (named or output_tail(checked))[:600])
    finally:
        _run(["mariadb-admin", *client, "shutdown"], timeout=120)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _mariadb_check_report(output: str) -> tuple[int, dict[str, list[str]]]:
    """How many tables ``mariadb-check`` named, and what it said against each bad one.
    Its report: a line per table ("db.table   OK", or the name alone), then its notes
    ("error    : Corrupt", "warning  : ...")."""
    tables = 0
    problems: dict[str, list[str]] = {}
    table = "?"
    for line in output.splitlines():
        named = re.match(r"^(\S+\.\S+)\s*(.*)$", line)
        if named:
            tables += 1
            table, status = named.group(1), named.group(2).strip()
            if status and status != "OK":
                problems.setdefault(table, []).append(status)
        elif line.lower().startswith("error"):
            problems.setdefault(table, []).append(line.split(":", 1)[-1].strip())
    return tables, problems
