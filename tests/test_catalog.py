"""The catalog on a real SQLite file: migrations, inheritance, snapshot records."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from freezeframe.catalog.store import MIGRATIONS, Catalog
from freezeframe.engine.plan import plan_snapshot
from freezeframe.errors import CatalogError, Conflict, InvalidInput, NotFound
from freezeframe.model import Level, Snapshot, SnapshotDisk, SnapshotState


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    return Catalog.open(tmp_path / "catalog.sqlite")


def test_migrations_run_once_and_refuse_a_newer_catalog(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with Catalog.open(path) as cat:
        assert cat.schema_version == len(MIGRATIONS)
        cat.add_template("t", application_consistent=True)
    with Catalog.open(path) as cat:  # reopening keeps the data and migrates nothing twice
        assert cat.template("t").application_consistent
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(CatalogError, match="newer than this freezeframe knows") as caught:
        Catalog.open(path)
    assert caught.value.exit_code == 8


def test_instances_inherit_from_their_template_until_they_override(cat: Catalog) -> None:
    cat.add_template("databases", application_consistent=True)
    inst = cat.add_instance("db1", kind="qemu", qmp_socket="/q", qga_socket="/g", template="databases")
    assert inst.application_consistent is True
    assert inst.own_application_consistent is None

    cat.update_template("databases", application_consistent=False)
    assert cat.instance("db1").application_consistent is False  # follows the template

    cat.update_instance("db1", application_consistent=True)
    cat.update_template("databases", application_consistent=False)
    assert cat.instance("db1").application_consistent is True  # its own setting wins

    cat.update_instance("db1", application_consistent=None)
    assert cat.instance("db1").application_consistent is False

    with pytest.raises(Conflict, match="used by db1"):
        cat.remove_template("databases")
    bare = cat.add_instance("web1", kind="qemu", qmp_socket="/q", qga_socket=None)
    assert bare.application_consistent is False


def test_default_level_follows_the_instance_setting(cat: Catalog) -> None:
    now = datetime(2026, 11, 22, 14, 30, 5, tzinfo=UTC)
    cat.add_template("apps", application_consistent=True)
    on = cat.add_instance("on", kind="qemu", qmp_socket="/q", qga_socket="/g", template="apps")
    off = cat.add_instance("off", kind="qemu", qmp_socket="/q", qga_socket="/g")
    assert plan_snapshot(on, now=now).level is Level.APPLICATION
    assert plan_snapshot(off, now=now).level is Level.CRASH
    assert plan_snapshot(off, now=now, level=Level.FILESYSTEM).level is Level.FILESYSTEM
    assert plan_snapshot(on, now=now).name == "on-20261122T143005Z"
    with pytest.raises(InvalidInput, match="agent-timeout"):
        plan_snapshot(on, now=now, agent_timeout=-1)


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "../etc", "a/b"])
def test_bad_names_are_refused(cat: Catalog, name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid instance name"):
        cat.add_instance(name, kind="qemu", qmp_socket="/q", qga_socket=None)


def test_duplicates_and_unknowns_say_what_to_do(cat: Catalog) -> None:
    cat.add_instance("a", kind="qemu", qmp_socket="/q", qga_socket=None)
    with pytest.raises(Conflict, match="exists already"):
        cat.add_instance("a", kind="qemu", qmp_socket="/q", qga_socket=None)
    with pytest.raises(NotFound, match="no template named 'nope'") as caught:
        cat.add_instance("b", kind="qemu", qmp_socket="/q", qga_socket=None, template="nope")
    assert caught.value.hint
    assert "template list" in caught.value.hint
    with pytest.raises(NotFound):
        cat.instance("b")  # nothing half-added


def _snap(snap_id: str, name: str, image: str) -> Snapshot:
    return Snapshot(
        id=snap_id, name=name, created_at=f"2026-11-22T10:00:0{snap_id[0]}Z", state=SnapshotState.CREATED,
        instance="vm", requested_level=Level.APPLICATION, achieved_level=Level.FILESYSTEM,
        fallback_reasons=["no writers"], freeze_window_ms=42.5, timings_ms={"freeze": 30.0},
        disks=[SnapshotDisk(device="vda", node="n", image=image, virtual_size=10, allocated_size=5)],
        manifest={"format": "x"},
    )


def test_snapshot_records_round_trip_and_resolve_by_id_prefix_or_name(cat: Catalog) -> None:
    cat.add_instance("vm", kind="qemu", qmp_socket="/q", qga_socket=None)
    first = _snap("1aaa0000-0000", "nightly", "/img/a.qcow2")
    cat.save_snapshot(first)
    cat.save_snapshot(_snap("1aaab000-0000", "other", "/img/b.qcow2"))

    loaded = cat.snapshot("1aaa0000-0000")
    assert loaded == first
    assert cat.snapshot("nightly").id == first.id
    assert cat.snapshot("1aaa0").id == first.id
    with pytest.raises(InvalidInput, match="ambiguous"):
        cat.snapshot("1aaa")
    with pytest.raises(NotFound):
        cat.snapshot("zzzz")

    cat.repoint_image("/img/b.qcow2", "/img/a.qcow2")
    assert cat.snapshot("other").disks[0].image == "/img/a.qcow2"
    assert {s.name for s in cat.snapshots_using_image("/img/a.qcow2")} == {"nightly", "other"}


def test_an_instance_with_live_snapshots_is_removed_only_by_force(cat: Catalog) -> None:
    cat.add_instance("vm", kind="qemu", qmp_socket="/q", qga_socket=None)
    cat.save_snapshot(_snap("2bbb0000", "keep", "/img/a.qcow2"))
    with pytest.raises(Conflict, match="still has snapshots"):
        cat.remove_instance("vm")
    cat.remove_instance("vm", force=True)
    assert cat.snapshots(instance="vm") == []
    assert cat.snapshots(instance="vm", include_deleted=True)[0].state is SnapshotState.DELETED
