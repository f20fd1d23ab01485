"""Databases in a VM, backed up and restore-tested: PostgreSQL and MariaDB run in the lab
guest (the host's own server binaries, data on the guest's ext4 disk), a writer quiesces
them from the host over the forwarded port while a client commits rows, and ``backup
test`` starts each server on a copy of the restored disk and runs its own check. The
oracle beside it: a server started here on the restored image has every row acknowledged
before the point. A page damaged in the guest makes the next restore test fail, naming it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from backups import backup, cli_json, guest, init_repo, restore
from clients import Load, check_copy_rows
from conftest import LabFactory, run_cli
from hostfs import mounted_copy
from servers import mariadb, open_base, postgres

from freezeframe.backup.repository import Repository
from freezeframe.backup.store import open_store
from freezeframe.config import Home
from freezeframe.lab.vm import LabVM

pytestmark = pytest.mark.vm


def backup_under_load(home: Home, vm: LabVM, repo: Path, commit: Callable[[int], None]) -> tuple[
        dict[str, Any], dict[str, Any], Load]:
    """An application-level backup while ``commit`` runs; returns the record, the point's
    manifest and the load (stopped)."""
    load = Load(commit)
    load.start()
    try:
        time.sleep(1)
        record = backup(home, vm, repo, "--consistency", "application")
        time.sleep(0.3)
    finally:
        load.stop()
    assert not load.errors, load.errors
    assert record["consistency"] == "application", record["fallback_reasons"]
    point = Repository.open(open_store(str(repo))).manifest(record["id"])["point"]
    return record, point, load


def restore_test(home: Home, backup_id: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], int]:
    tested, done = cli_json(home, "backup", "test", backup_id)
    assert tested is not None, done.stderr
    return tested, {c["what"]: c for c in tested["checks"]}, done.returncode


@contextlib.contextmanager
def restored_disk(home: Home, backup_id: str, base: Path) -> Iterator[Path]:
    """The backup's first disk restored here and mounted read-write (a copy of its own)."""
    raw = restore(home, backup_id, base / "restored")["ffdata0"]
    with mounted_copy(raw, base / "mnt") as mounted:
        yield mounted


def test_postgresql_in_a_vm_restore_test_runs_pg_amcheck_and_finds_a_damaged_page(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1, app="postgresql")
    assert vm.app_port
    done = run_cli(home, "writer", "add", vm.name, "postgresql", "--option", "host=127.0.0.1",
                   "--option", f"port={vm.app_port}")
    assert done.returncode == 0, done.stderr
    dsn: dict[str, Any] = {"host": "127.0.0.1", "port": vm.app_port, "user": "postgres", "dbname": "postgres"}
    with psycopg.connect(**dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE t (n int PRIMARY KEY, payload text)")
        setup.execute("CREATE TABLE kept AS SELECT g AS n, repeat('k', 200) AS payload FROM generate_series(1, 5000) g")
    conn = psycopg.connect(**dsn, autocommit=True)

    def commit(n: int) -> None:
        conn.execute("INSERT INTO t VALUES (%s, %s)", (n, "x" * 200))

    try:
        record, point, load = backup_under_load(home, vm, repo, commit)
    finally:
        conn.close()
    writer = point["writers"][0]["manifest"]
    assert (writer["data_directory"], writer["superuser"]) == ("/mnt/ffdata0/pg", "postgres")

    tested, checks, code = restore_test(home, record["id"])
    assert (tested["outcome"], code) == ("passed", 0), tested
    assert checks["journal clean"]["passed"]
    assert checks["postgresql WAL"]["passed"], checks["postgresql WAL"]
    assert writer["wal_flushed_at_freeze"]["lsn"] in checks["postgresql WAL"]["detail"]
    assert checks["pg_amcheck"]["passed"]
    assert "no corruption" in checks["pg_amcheck"]["detail"]
    shown, _ = cli_json(home, "backup", "show", record["id"])
    assert shown["restore_test"]["outcome"] == "passed"

    # The oracle, apart from the restore test: every acknowledged commit is in the copy.
    with open_base() as base, restored_disk(home, record["id"], base) as disk:
        (disk / "pg" / "postmaster.pid").unlink(missing_ok=True)
        with postgres(disk / "pg", base / "run") as copy, psycopg.connect(
                host=str(copy.sockdir), port=copy.port, user="postgres", dbname="postgres") as reader:
            present = {row[0] for row in reader.execute("SELECT n FROM t")}
    check_copy_rows(present, load, point)

    # Overwrite the first page of a table in the guest, behind the server's back (the page
    # is clean in its buffers, so nothing writes it again): the next restore test fails.
    with psycopg.connect(**dsn, autocommit=True) as admin:
        admin.execute("CHECKPOINT")
        (relation,) = admin.execute("SELECT pg_relation_filepath('kept')").fetchone()  # type: ignore[misc]
    guest(vm, f"dd if=/dev/urandom of=/mnt/ffdata0/pg/{relation} bs=8192 count=1 conv=notrunc 2>/dev/null && sync")
    damaged = backup(home, vm, repo, "--consistency", "application")
    assert damaged["consistency"] == "application"
    tested, checks, code = restore_test(home, damaged["id"])
    assert (tested["outcome"], code) == ("failed", 7), tested
    assert checks["postgresql WAL"]["passed"]
    assert not checks["pg_amcheck"]["passed"]
    assert "kept" in checks["pg_amcheck"]["detail"], checks["pg_amcheck"]["detail"]
    assert cli_json(home, "backup", "show", damaged["id"])[0]["restore_test"]["outcome"] == "failed"


def test_mariadb_in_a_vm_restore_test_runs_mariadb_check_and_finds_a_damaged_table(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1, app="mariadb")
    assert vm.app_port
    done = run_cli(home, "writer", "add", vm.name, "mysql", "--option", "host=127.0.0.1",
                   "--option", f"port={vm.app_port}", "--option", "user=ff")
    assert done.returncode == 0, done.stderr
    conn = pymysql.connect(host="127.0.0.1", port=vm.app_port, user="ff", autocommit=True)
    try:
        with conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE app")
            cursor.execute("CREATE TABLE app.t (n INT PRIMARY KEY, payload TEXT) ENGINE=InnoDB")
            cursor.execute("CREATE TABLE app.kept (n INT PRIMARY KEY, payload TEXT) ENGINE=MyISAM")
            cursor.execute("INSERT INTO app.kept SELECT seq, REPEAT('k', 200) FROM app.seq_1_to_2000")

        def commit(n: int) -> None:
            with conn.cursor() as cursor:
                cursor.execute("INSERT INTO app.t VALUES (%s, %s)", (n, "x" * 200))

        record, point, load = backup_under_load(home, vm, repo, commit)
    finally:
        conn.close()
    assert point["writers"][0]["manifest"]["data_directory"] == "/mnt/ffdata0/mysql"

    tested, checks, code = restore_test(home, record["id"])
    assert (tested["outcome"], code) == ("passed", 0), tested
    assert checks["mariadb-check"]["passed"], checks["mariadb-check"]
    assert "tables OK" in checks["mariadb-check"]["detail"]

    with open_base() as base, restored_disk(home, record["id"], base) as disk, \
            mariadb(disk / "mysql", base / "run") as copy:
        reader = pymysql.connect(unix_socket=str(copy.socket), user="root")
        with reader.cursor() as cursor:
            cursor.execute("SELECT n FROM app.t")
            present = {row[0] for row in cursor.fetchall()}
        reader.close()
    check_copy_rows(present, load, point)

    # Damage the MyISAM table's index file in the guest (the writer's FLUSH TABLES closed
    # it, so the server reads it again from disk): the next restore test fails on it.
    guest(vm, "dd if=/dev/urandom of=/mnt/ffdata0/mysql/app/kept.MYI bs=1024 seek=1 count=2 conv=notrunc"
              " 2>/dev/null && sync")
    damaged = backup(home, vm, repo, "--consistency", "application")
    tested, checks, code = restore_test(home, damaged["id"])
    assert (tested["outcome"], code) == ("failed", 7), tested
    assert not checks["mariadb-check"]["passed"]
    assert "kept" in checks["mariadb-check"]["detail"], checks["mariadb-check"]["detail"]
