"""Application-consistent snapshots of this host: real servers with data on loop-mounted
file systems that really get frozen and cloned, under a client write load; each copy is
restored, the server started on it, and checked (DESIGN.md section 4)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
import redis
from clients import Load, check_copy_rows
from conftest import run_cli, unique
from hostfs import btrfs_fs, data_fs, mounted_copy
from oracles import ext4_needs_recovery, xfs_log_quiesced
from servers import PG_BIN, mariadb, mariadb_init, open_base, pg_init, postgres, redis_server

from freezeframe.catalog import Catalog
from freezeframe.config import Home

pytestmark = pytest.mark.host


def snapshot_app(home: Home, instance: str, *args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    done = run_cli(home, "snapshot", "create", instance, "--consistency", "application", "-o", "json", *args)
    assert done.returncode == 0, done.stderr + done.stdout
    snap = json.loads(done.stdout)
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    return snap, manifest


def snapshot_under_load(home: Home, instance: str, commit: Callable[[int], None], close: Callable[[], None],
                        *args: str) -> tuple[dict[str, Any], dict[str, Any], Load]:
    """Commit rows while an application-consistent snapshot is taken; the client is stopped
    and closed whatever happens."""
    load = Load(commit)
    load.start()
    try:
        time.sleep(1)
        snap, manifest = snapshot_app(home, instance, *args)
        time.sleep(0.3)
    finally:
        try:
            load.stop()
        finally:
            close()
    assert not load.errors, load.errors
    return snap, manifest, load


def add_host(home: Home, name: str, mount: Path) -> None:
    done = run_cli(home, "instance", "add", name, "--host", "--mount", str(mount))
    assert done.returncode == 0, done.stderr


def add_writer(home: Home, instance: str, kind: str, *options: str, extra: tuple[str, ...] = ()) -> None:
    args = [a for option in options for a in ("--option", option)]
    done = run_cli(home, "writer", "add", instance, kind, *args, *extra)
    assert done.returncode == 0, done.stderr


def test_sqlite_on_ext4_over_xfs(home: Home, catalog: Catalog, tmp_path: Path) -> None:
    with data_fs(tmp_path, inner="ext4", outer="xfs") as fs:
        db_path = fs.mountpoint / "app.db"
        setup = sqlite3.connect(db_path)
        setup.execute("PRAGMA journal_mode = wal")
        setup.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, payload TEXT)")
        setup.close()
        conn = sqlite3.connect(db_path, check_same_thread=False, timeout=30, isolation_level=None)

        def commit(n: int) -> None:
            conn.execute("INSERT INTO t VALUES (?, ?)", (n, "x" * 200))

        name = unique("host-sqlite")
        add_host(home, name, fs.mountpoint)
        add_writer(home, name, "sqlite", f"path={db_path}")
        snap, manifest, load = snapshot_under_load(home, name, commit, conn.close)

        assert snap["consistency"] == "application", snap["fallback_reasons"]
        assert snap["application_consistent"] is True
        assert [(w["name"], w["status"]) for w in snap["writers"]] == [("sqlite", "ok")]
        writer = manifest["writers"][0]
        assert writer["manifest"]["journal_mode"] == "wal"
        assert set(writer["phases_ms"]) == {"prepare", "freeze", "thaw"}
        assert manifest["filesystems"][0]["provider"] == "reflink"

        image = Path(snap["disks"][0]["image"])
        assert image.parent == fs.image.parent  # a clone beside the original
        assert not ext4_needs_recovery(image)  # frozen: a clean journal
        with mounted_copy(image, tmp_path / "restore") as restored:
            copy = sqlite3.connect(restored / "app.db")
            assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            present = {row[0] for row in copy.execute("SELECT n FROM t")}
            copy.close()
        must_have = load.acked_before(manifest["window"]["writers_freeze_started_at"])
        assert must_have, "the load committed nothing before the freeze"
        assert must_have <= present, f"lost {len(must_have - present)} acknowledged commits"
        assert len(present) < len(load.acked), "the copy should not hold commits made after the thaw"

        assert_mounts_read_only(home, snap["id"], tmp_path / "look", "app.db")
        delete_and_check_gone(home, snap["id"], image)


def assert_mounts_read_only(home: Home, snapshot_id: str, where: Path, expected: str) -> None:
    """snapshot mount exposes the copy read-only; snapshot unmount takes it away."""
    where.mkdir()
    mounted = run_cli(home, "snapshot", "mount", snapshot_id, str(where))
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert (where / expected).exists()
        with pytest.raises(OSError, match="Read-only file system"):
            (where / "new-file").write_text("no")
    finally:
        unmounted = run_cli(home, "snapshot", "unmount", str(where))
    assert unmounted.returncode == 0, unmounted.stderr
    assert not (where / expected).exists()


def delete_and_check_gone(home: Home, snapshot_id: str, copy: Path) -> None:
    deleted = run_cli(home, "snapshot", "delete", snapshot_id, "-o", "json")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["state"] == "deleted"
    assert not copy.exists()


def test_postgresql_on_ext4_over_xfs(home: Home) -> None:
    with open_base() as base, data_fs(base, inner="ext4", outer="xfs") as fs:
        datadir = fs.mountpoint / "pgdata"
        pg_init(datadir)
        name = unique("host-pg")
        with postgres(datadir, base / "run") as pg:
            dsn = {"host": str(pg.sockdir), "port": pg.port, "user": "postgres", "dbname": "postgres"}
            with psycopg.connect(**dsn, autocommit=True) as setup:
                setup.execute("CREATE TABLE t (n int PRIMARY KEY, payload text)")
            conn = psycopg.connect(**dsn, autocommit=True)

            def commit(n: int) -> None:
                conn.execute("INSERT INTO t VALUES (%s, %s)", (n, "x" * 200))

            add_host(home, name, fs.mountpoint)
            add_writer(home, name, "postgresql", f"host={pg.sockdir}", f"port={pg.port}")
            snap, manifest, load = snapshot_under_load(home, name, commit, conn.close)
        assert snap["consistency"] == "application", snap["fallback_reasons"]
        record = manifest["writers"][0]["manifest"]
        assert record["server_version"].startswith("15")
        assert record["checkpoint"]["lsn"]
        assert record["wal_flushed_at_freeze"]["lsn"]

        image = Path(snap["disks"][0]["image"])
        assert not ext4_needs_recovery(image)
        with mounted_copy(image, base / "restore") as restored:
            copy_dir = restored / "pgdata"
            # The copy was taken from a running server; a restore drops its stale lock file.
            (copy_dir / "postmaster.pid").unlink(missing_ok=True)
            with postgres(copy_dir, base / "run-copy") as copy:
                check = subprocess.run(
                    ["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_amcheck"), "-h", str(copy.sockdir),
                     "-p", str(copy.port), "--all", "--install-missing", "--heapallindexed"],
                    capture_output=True, text=True, check=False,
                )
                assert check.returncode == 0, check.stdout + check.stderr
                with psycopg.connect(host=str(copy.sockdir), port=copy.port, user="postgres",
                                     dbname="postgres") as reader:
                    present = {row[0] for row in reader.execute("SELECT n FROM t")}
        check_copy_rows(present, load, manifest)


def test_mariadb_on_xfs_over_xfs(home: Home) -> None:
    with open_base() as base, data_fs(base, inner="xfs", outer="xfs") as fs:
        datadir = fs.mountpoint / "mysql"
        mariadb_init(datadir)
        name = unique("host-maria")
        with mariadb(datadir, base / "run") as db:
            conn = pymysql.connect(unix_socket=str(db.socket), user="root", autocommit=True)
            with conn.cursor() as cursor:
                cursor.execute("CREATE DATABASE app")
                cursor.execute("CREATE TABLE app.t (n INT PRIMARY KEY, payload TEXT) ENGINE=InnoDB")

            def commit(n: int) -> None:
                with conn.cursor() as cursor:
                    cursor.execute("INSERT INTO app.t VALUES (%s, %s)", (n, "x" * 200))

            add_host(home, name, fs.mountpoint)
            add_writer(home, name, "mysql", f"unix_socket={db.socket}")
            snap, manifest, load = snapshot_under_load(home, name, commit, conn.close)
        assert snap["consistency"] == "application", snap["fallback_reasons"]
        record = manifest["writers"][0]["manifest"]
        assert record["binlog"]["file"].startswith("binlog.")
        assert record["binlog"]["position"] > 0
        assert record["gtid"]

        image = Path(snap["disks"][0]["image"])
        assert xfs_log_quiesced(image)  # frozen: nothing to replay
        with mounted_copy(image, base / "restore") as restored, mariadb(restored / "mysql", base / "run-copy") as copy:
            check = subprocess.run(["mariadb-check", f"--socket={copy.socket}", "-uroot", "--all-databases",
                                    "--extended"], capture_output=True, text=True, check=False)
            assert check.returncode == 0, check.stdout + check.stderr
            assert "error" not in check.stdout.lower(), check.stdout
            reader = pymysql.connect(unix_socket=str(copy.socket), user="root")
            with reader.cursor() as cursor:
                cursor.execute("SELECT n FROM app.t")
                present = {row[0] for row in cursor.fetchall()}
            reader.close()
        check_copy_rows(present, load, manifest)


def test_redis_on_a_btrfs_subvolume(home: Home) -> None:
    with open_base() as base, btrfs_fs(base) as mnt:
        directory = mnt / "redis"
        directory.mkdir()
        name = unique("host-redis")
        with redis_server(directory) as server:
            client = redis.Redis(port=server.port)

            def commit(n: int) -> None:
                client.set(f"k{n}", "x" * 100)

            add_host(home, name, mnt)
            add_writer(home, name, "redis", f"port={server.port}")
            snap, manifest, load = snapshot_under_load(home, name, commit, client.close)
        assert snap["consistency"] == "application", snap["fallback_reasons"]
        disk = snap["disks"][0]
        assert disk["node"] == "btrfs"
        assert disk["image"] is None
        copy_dir = Path(disk["path"]) / "redis"
        check = subprocess.run(["redis-check-rdb", str(copy_dir / "dump.rdb")], capture_output=True, text=True,
                               check=False)
        assert check.returncode == 0, check.stdout
        with redis_server(copy_dir) as copy:
            reader = redis.Redis(port=copy.port)
            present = {int(key.decode()[1:]) for key in reader.scan_iter(count=1000)}
            reader.close()
        check_copy_rows(present, load, manifest)
        assert_mounts_read_only(home, snap["id"], base / "look", "redis/dump.rdb")
        delete_and_check_gone(home, snap["id"], Path(disk["path"]))


def test_a_writer_declared_in_the_config_file_quiesces_too(home: Home, tmp_path: Path) -> None:
    from test_writer_failures import sqlite_db  # it imports this module: import here, once both exist

    with data_fs(tmp_path) as fs:
        db_path = fs.mountpoint / "app.db"
        sqlite_db(db_path)
        name = unique("host-config")
        add_host(home, name, fs.mountpoint)
        config = tmp_path / "freezeframe.toml"
        config.write_text(f'[instances.{name}.writers.app]\nkind = "sqlite"\noptions = {{ path = "{db_path}" }}\n')
        env_config = {"FREEZEFRAME_CONFIG": str(config)}
        done = run_cli(home, "snapshot", "create", name, "--consistency", "application", "-o", "json",
                       env=env_config)
        assert done.returncode == 0, done.stderr
        snap = json.loads(done.stdout)
        assert snap["consistency"] == "application"
        assert [(w["name"], w["status"]) for w in snap["writers"]] == [("app", "ok")]
