"""The restore test's application checks facing what a backup cannot be trusted with: its
manifest's writer records and its file systems come from the guest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from freezeframe.jobs.app_check import RecordedApp, _mariadb_check_report, check_app, copy_of, recorded_apps
from freezeframe.jobs.restore_check import RestoreCheck, _find

MANIFEST: dict[str, Any] = {"point": {"filesystems": [{"mountpoint": "/mnt/ffdata0"}]}}


def findings(app: RecordedApp, source: Path) -> list[tuple[str, bool, str]]:
    found: list[tuple[str, bool, str]] = []
    check_app(app, copy_of(source), lambda what, passed, detail: found.append((what, passed, detail)))
    return found


def test_only_well_formed_database_writers_are_taken() -> None:
    manifest = {"point": {"writers": [
        "garbage",
        {"kind": "postgresql", "name": "pg", "manifest": {"data_directory": "/mnt/ffdata0/pg", "superuser": "x"}},
        {"kind": "postgresql", "name": "no-dir", "manifest": {"server_version": "15"}},
        {"kind": "mysql", "name": "my", "manifest": ["not", "a", "record"]},
        {"kind": "redis", "name": "r", "manifest": {"data_directory": "/var/lib/redis"}},
        {"kind": "mysql", "manifest": {"data_directory": "/mnt/ffdata0/mysql"}},
    ]}}
    apps = recorded_apps(manifest)
    assert [(a.kind, a.writer, a.data_directory) for a in apps] == [
        ("postgresql", "pg", "/mnt/ffdata0/pg"), ("mysql", "mysql", "/mnt/ffdata0/mysql")]
    assert recorded_apps({"point": {"writers": None}}) == []
    assert recorded_apps({"point": "garbage"}) == []
    assert recorded_apps({}) == []


def test_a_recorded_path_never_leads_out_of_the_restored_file_system(tmp_path: Path) -> None:
    root = tmp_path / "mounted"
    (root / "pg").mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    mounted = {"vda": str(root)}
    result = RestoreCheck(backup="b")

    def find(path: str) -> tuple[str, str] | None:
        return _find(result, "pg", path, MANIFEST, mounted, os.path.isdir, os.path.realpath)
    assert find("/mnt/ffdata0/pg") == ("vda", "vda/pg")
    assert find("/mnt/ffdata0/../../etc") is None
    assert find("/mnt/ffdata0/escape") is None
    assert find("/mnt/ffdata0/escape/ssl") is None
    assert [(c.passed, c.detail) for c in result.checks] == [
        (False, "the path the backup recorded climbs out with '..': not followed"),
        (False, "not found on any restored file system"), (False, "not found on any restored file system")]
    assert not result.passed


def test_a_data_directory_with_links_or_of_an_unknown_version_is_not_started(tmp_path: Path) -> None:
    linked = tmp_path / "linked"
    (linked / "pg_tblspc").mkdir(parents=True)
    (linked / "PG_VERSION").write_text("15\n")
    (linked / "pg_tblspc" / "16384").symlink_to("/var/tmp")
    app = RecordedApp("postgresql", "pg", "/mnt/ffdata0/pg", {})
    [(what, passed, detail)] = findings(app, linked)
    assert (what, passed) == ("postgresql start", False)
    assert "symbolic links" in detail
    assert "pg_tblspc/16384" in detail

    future = tmp_path / "future"
    future.mkdir()
    (future / "PG_VERSION").write_text("99\n")
    [(what, passed, detail)] = findings(app, future)
    assert (what, passed) == ("postgresql start", False)
    assert "PostgreSQL 99 is not installed on this host" in detail

    empty = tmp_path / "empty"
    empty.mkdir()
    [(_, passed, detail)] = findings(app, empty)
    assert not passed
    assert "no PG_VERSION" in detail


def test_mariadb_check_output_names_each_bad_table() -> None:
    output = (
        "app.kept\n"
        "Error    : Can't read key from filepos: 1024\n"
        "error    : Corrupt\n"
        "app.t                                              OK\n"
        "mysql.user                                         OK\n"
        "app.crashed                                        Table is marked as crashed\n"
    )
    tables, problems = _mariadb_check_report(output)
    assert tables == 4
    assert problems == {"app.kept": ["Can't read key from filepos: 1024", "Corrupt"],
                        "app.crashed": ["Table is marked as crashed"]}
    assert _mariadb_check_report("app.t OK\nmysql.db OK\n") == (2, {})
