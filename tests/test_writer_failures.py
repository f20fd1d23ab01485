"""Writers that fail or hang, on real servers and real file systems: the level steps down
per policy within the timeout, the application is never left locked, the file system is
never left frozen, and nothing is kept that the policy said not to keep."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pymysql
import pytest
from conftest import run_cli, unique
from hostfs import data_fs
from servers import mariadb, mariadb_init, open_base
from test_host_apps import add_host, add_writer

from freezeframe.config import Home

pytestmark = pytest.mark.host


def create(home: Home, instance: str, *args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    done = run_cli(home, "snapshot", "create", instance, "--consistency", "application", "-o", "json", *args)
    assert done.stdout, done.stderr
    return json.loads(done.stdout), done


def assert_writable(mountpoint: Path, within: float = 5.0) -> None:
    """A write to the file system completes promptly: it is not frozen."""
    result: list[bool] = []

    def write() -> None:
        probe = mountpoint / f"probe-{uuid.uuid4().hex}"
        probe.write_text("thawed")
        os.sync()
        probe.unlink()
        result.append(True)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    thread.join(within)
    assert result == [True], f"{mountpoint} is still frozen"


def sqlite_db(path: Path, journal_mode: str = "wal") -> None:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA journal_mode = {journal_mode}")
    db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    db.execute("INSERT INTO t VALUES (1)")
    db.commit()
    db.close()


def test_sqlite_writer_stuck_in_freeze_is_released_and_the_level_steps_down(home: Home, tmp_path: Path) -> None:
    with data_fs(tmp_path) as fs:
        db_path = fs.mountpoint / "app.db"
        sqlite_db(db_path, "delete")  # no WAL: prepare has nothing to wait for, the freeze does
        name = unique("hang-freeze")
        add_host(home, name, fs.mountpoint)
        add_writer(home, name, "sqlite", f"path={db_path}", "busy_timeout_ms=60000", extra=("--timeout", "1"))
        holder = sqlite3.connect(db_path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # the application holds the write lock
        try:
            start = time.monotonic()
            snap, done = create(home, name)
            elapsed = time.monotonic() - start
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert done.returncode == 0, done.stderr
        assert snap["consistency"] == "filesystem"
        assert any("freeze: no answer within 1s" in r or "failed in freeze" in r for r in snap["fallback_reasons"])
        assert [(w["name"], w["status"]) for w in snap["writers"]] == [("sqlite", "failed")]
        assert elapsed < 15, f"took {elapsed:.1f}s for a 1s writer timeout"
        # The application is not left locked: a writer gets the lock at once.
        app = sqlite3.connect(db_path, timeout=2, isolation_level=None)
        app.execute("INSERT INTO t VALUES (2)")
        app.close()
        assert_writable(fs.mountpoint)


def test_sqlite_writer_stuck_in_prepare_is_released(home: Home, tmp_path: Path) -> None:
    with data_fs(tmp_path) as fs:
        db_path = fs.mountpoint / "app.db"
        sqlite_db(db_path)
        name = unique("hang-prepare")
        add_host(home, name, fs.mountpoint)
        add_writer(home, name, "sqlite", f"path={db_path}", "busy_timeout_ms=60000", extra=("--timeout", "1"))
        reader = sqlite3.connect(db_path, isolation_level=None)
        writer = sqlite3.connect(db_path, isolation_level=None)
        writer.execute("INSERT INTO t VALUES (5)")  # something in the WAL to checkpoint
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()  # a reader pins the WAL: TRUNCATE must wait
        try:
            snap, done = create(home, name)
        finally:
            reader.execute("COMMIT")
            reader.close()
        assert done.returncode == 0, done.stderr
        assert snap["consistency"] == "filesystem"
        assert any("failed in prepare" in r for r in snap["fallback_reasons"]), snap["fallback_reasons"]
        writer.execute("INSERT INTO t VALUES (6)")  # not locked out
        writer.close()
        assert_writable(fs.mountpoint)


def test_hung_script_is_killed_with_its_children_and_fail_policy_keeps_nothing(home: Home, tmp_path: Path) -> None:
    # A sleep of a length nothing else uses, to find the script's processes by.
    marker = f"{3000 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000:03d}"
    with data_fs(tmp_path) as fs:
        name = unique("hang-script")
        add_host(home, name, fs.mountpoint)
        # The script starts a child and hangs; both must die at the timeout.
        add_writer(home, name, "script", f"pre_freeze=sh -c 'sleep {marker} & sleep {marker}'",
                   extra=("--timeout", "1", "--on-failure", "fail"))
        clones_before = sorted(fs.outer.glob("*.img"))
        start = time.monotonic()
        snap, done = create(home, name)
        elapsed = time.monotonic() - start
        assert done.returncode == 7, done.stderr
        assert snap["state"] == "failed"
        assert "no answer within 1s" in snap["error"]
        assert elapsed < 15
        time.sleep(0.5)
        left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True,
                              check=False).stdout
        assert left == "", f"processes of the hung script survive: {left}"
        assert sorted(fs.outer.glob("*.img")) == clones_before  # no copy was kept
        assert_writable(fs.mountpoint)


def test_continue_policy_keeps_the_snapshot_and_marks_only_the_failed_writer(home: Home, tmp_path: Path) -> None:
    with data_fs(tmp_path) as fs:
        db_path = fs.mountpoint / "app.db"
        sqlite_db(db_path)
        name = unique("continue")
        add_host(home, name, fs.mountpoint)
        add_writer(home, name, "sqlite", f"path={db_path}")
        add_writer(home, name, "script", "pre_freeze=sh -c 'echo cannot quiesce >&2; exit 3'",
                   extra=("--name", "broken", "--on-failure", "continue"))
        snap, done = create(home, name)
        assert done.returncode == 0, done.stderr
        assert snap["consistency"] == "filesystem"
        assert {w["name"]: w["status"] for w in snap["writers"]} == {"sqlite": "ok", "broken": "failed"}
        assert any("broken" in r and "exited with 3" in r for r in snap["fallback_reasons"])
        assert Path(snap["disks"][0]["image"]).exists()

        # Excluding the broken writer gets the application level back.
        snap, done = create(home, name, "--exclude-writer", "broken")
        assert snap["consistency"] == "application"
        assert [w["name"] for w in snap["writers"]] == ["sqlite"]


def test_mariadb_read_lock_stuck_behind_a_table_lock_is_killed(home: Home) -> None:
    with open_base() as base, data_fs(base, inner="ext4") as fs:
        datadir = fs.mountpoint / "mysql"
        mariadb_init(datadir)
        with mariadb(datadir, base / "run") as db:
            app = pymysql.connect(unix_socket=str(db.socket), user="root", autocommit=True)
            with app.cursor() as cursor:
                cursor.execute("CREATE DATABASE app")
                cursor.execute("CREATE TABLE app.t (n INT PRIMARY KEY) ENGINE=InnoDB")
                cursor.execute("LOCK TABLES app.t WRITE")  # FLUSH TABLES WITH READ LOCK must wait
            name = unique("hang-maria")
            add_host(home, name, fs.mountpoint)
            add_writer(home, name, "mysql", f"unix_socket={db.socket}", "lock_wait_timeout=60",
                       extra=("--timeout", "2"))
            snap, done = create(home, name)
            assert done.returncode == 0, done.stderr
            assert snap["consistency"] == "filesystem"
            assert any("failed in freeze" in r for r in snap["fallback_reasons"]), snap["fallback_reasons"]
            with app.cursor() as cursor:
                cursor.execute("UNLOCK TABLES")
            # Had the stuck FLUSH TABLES WITH READ LOCK survived, it would take the global lock
            # now and this insert would hang; it was killed, so the insert goes through.
            other = pymysql.connect(unix_socket=str(db.socket), user="root", autocommit=True, read_timeout=5)
            with other.cursor() as cursor:
                cursor.execute("INSERT INTO app.t VALUES (1)")
                cursor.execute("SELECT count(*) FROM information_schema.processlist "
                               "WHERE info LIKE 'FLUSH TABLES WITH READ LOCK%'")
                assert cursor.fetchone() == (0,)
            other.close()
            app.close()
        assert_writable(fs.mountpoint)


def test_credentials_come_only_from_the_environment_or_owner_only_files(home: Home, tmp_path: Path) -> None:
    name = unique("creds")
    with data_fs(tmp_path) as fs:
        add_host(home, name, fs.mountpoint)
        refused = run_cli(home, "writer", "add", name, "postgresql", "--option", "password=hunter2")
        assert refused.returncode == 2
        assert "never stored" in refused.stderr
        loose = tmp_path / "pw"
        loose.write_text("s3cret-value\n")
        loose.chmod(0o644)
        refused = run_cli(home, "writer", "add", name, "postgresql", "--option", f"password_file={loose}")
        assert refused.returncode == 2
        assert "chmod 600" in refused.stderr
        loose.chmod(0o600)
        added = run_cli(home, "writer", "add", name, "postgresql", "--option", f"password_file={loose}",
                        "--option", "host=/nonexistent", "--timeout", "2")
        assert added.returncode == 0, added.stderr
        snap, done = create(home, name)
        # It cannot connect, so it steps down; the secret appears nowhere.
        assert snap["consistency"] == "filesystem"
        manifest = run_cli(home, "snapshot", "manifest", snap["id"]).stdout
        listing = run_cli(home, "writer", "list", name, "-o", "json").stdout
        for text in (done.stdout, done.stderr, manifest, listing, (home.root / "catalog.sqlite").read_bytes().decode(
                errors="replace")):
            assert "s3cret-value" not in text


def test_retries_give_a_flaky_writer_another_attempt(home: Home, tmp_path: Path) -> None:
    with data_fs(tmp_path) as fs:
        marker = tmp_path / "tried-once"
        name = unique("retry")
        add_host(home, name, fs.mountpoint)
        add_writer(home, name, "script",
                   f"pre_freeze=sh -c 'if [ -e {marker} ]; then exit 0; fi; touch {marker}; exit 1'",
                   extra=("--retries", "1"))
        snap, done = create(home, name)
        assert done.returncode == 0, done.stderr
        assert snap["consistency"] == "application"
        manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
        assert manifest["writers"][0]["attempts"]["freeze"] == 2


def test_file_systems_that_cannot_be_copied_in_constant_time_are_refused(home: Home, tmp_path: Path) -> None:
    # An ext4 image kept on ext4: no reflinks, so no constant-time copy; nothing is frozen.
    image = tmp_path / "plain.img"
    mnt = tmp_path / "plain"
    mnt.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        name = unique("plain")
        add_host(home, name, mnt)
        snap, done = create(home, name, "--consistency", "filesystem")
        assert done.returncode == 7
        assert "no constant-time snapshot provider" in done.stderr
        assert "cannot clone files" in done.stderr
        assert snap["state"] == "failed"
        assert_writable(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)

    root = unique("root")
    add_host(home, root, Path("/"))
    snap, done = create(home, root, "--consistency", "filesystem")
    assert done.returncode == 7
    assert "refusing to snapshot /" in done.stderr
