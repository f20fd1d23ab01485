"""Application-consistent snapshots of a real VM through qemu-ga's fsfreeze hook and
freezeframe's guest hook runner, with a real SQLite application in the guest."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LabFactory, agent_call, run_cli
from oracles import export_raw, ext4_needs_recovery
from test_snapshot_vm import assert_guest_writable, create, created

from freezeframe.config import Home

pytestmark = pytest.mark.vm


def dump_from_ext4(raw: Path, names: list[str], dest: Path) -> None:
    """Copy files out of an unmounted ext4 image."""
    dest.mkdir()
    for name in names:
        subprocess.run(["debugfs", "-R", f"dump /{name} {dest / name}", str(raw)], check=True, capture_output=True)


def test_guest_sqlite_snapshot_is_application_consistent(home: Home, any_lab: LabFactory, tmp_path: Path) -> None:
    vm = any_lab(disks=1, hooks=("sqlite", "ok"), app="sqlite")
    time.sleep(2)  # the application commits for a while

    snap = created(home, vm.name, "--consistency", "application", "--freeze-timeout", "30")

    assert snap["consistency"] == "application", snap["fallback_reasons"]
    assert snap["application_consistent"] is True
    assert [(w["name"], w["where"], w["status"]) for w in snap["writers"]] == [
        ("10-sqlite", "guest", "ok"), ("20-ok", "guest", "ok")]
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    held = json.loads(manifest["writers"][0]["manifest"]["freeze_output"])
    assert held["status"] == "held"
    assert held["databases"][0]["path"] == "/mnt/ffdata0/app.db"
    freeze_began = manifest["guest_hooks"]["freeze_started_at_guest_clock"]
    assert freeze_began

    raw = export_raw(snap["disks"][0]["image"], tmp_path / "disk.raw")
    assert not ext4_needs_recovery(raw)
    dump_from_ext4(raw, ["app.db"], tmp_path / "copy")
    copy = sqlite3.connect(tmp_path / "copy" / "app.db")
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    present = {row[0] for row in copy.execute("SELECT n FROM t")}
    copy.close()

    # Every commit the guest application saw acknowledged before the freeze began is there.
    acked = agent_call(vm, lambda a: a.read_file("/run/ff-sqlite-app.acked", max_bytes=8 << 20))
    before = {int(n) for n, at in (line.split() for line in acked.decode().splitlines()) if float(at) < freeze_began}
    assert before, "the application committed nothing before the freeze"
    assert before <= present, f"lost {len(before - present)} acknowledged commits"
    assert_guest_writable(vm, 1)

    # The application runs on after the thaw: it is not left locked.
    later = agent_call(vm, lambda a: a.read_file("/run/ff-sqlite-app.acked", max_bytes=8 << 20))
    time.sleep(1)
    latest = agent_call(vm, lambda a: a.read_file("/run/ff-sqlite-app.acked", max_bytes=8 << 20))
    assert len(latest) > len(later)


def test_failing_and_unsafe_hooks_step_down_under_continue(home: Home, lab: LabFactory) -> None:
    vm = lab(disks=1, hooks=("ok", "badowner", "fail"), hook_policy="continue")

    snap = created(home, vm.name, "--consistency", "application", "--freeze-timeout", "30")

    assert snap["consistency"] == "filesystem"  # the file systems froze; not every hook held
    statuses = {w["name"]: (w["status"], w["error"]) for w in snap["writers"]}
    assert statuses["10-ok"] == ("ok", None)
    assert statuses["20-badowner"][0] == "refused"
    assert "writable by group or others" in statuses["20-badowner"][1]
    assert statuses["30-fail"] == ("failed", "exited with 3")
    reasons = " ".join(snap["fallback_reasons"])
    assert "20-badowner refused" in reasons
    assert "30-fail failed" in reasons
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    by_name = {w["name"]: w for w in manifest["writers"]}
    assert by_name["20-badowner"]["manifest"]["freeze_output"] == ""  # refused: never run
    assert "refusing to quiesce" in by_name["30-fail"]["manifest"]["freeze_output"]
    assert_guest_writable(vm, 1)


def test_hanging_hook_is_killed_and_fail_policy_fails_the_freeze(home: Home, lab: LabFactory) -> None:
    vm = lab(disks=1, hooks=("ok", "hang"), hook_policy="fail", hook_timeout=2)

    start = time.monotonic()
    snap, done = create(home, vm.name, "--consistency", "application", "--freeze-timeout", "30")
    elapsed = time.monotonic() - start

    assert done.returncode == 0, done.stderr
    # The guest refused to freeze (its hook failed), so only a crash-consistent copy was had.
    assert snap["consistency"] == "crash"
    assert any("hook" in r for r in snap["fallback_reasons"]), snap["fallback_reasons"]
    statuses = {w["name"]: (w["status"], w["error"]) for w in snap["writers"]}
    assert statuses["20-hang"] == ("failed", "no answer within 2s; killed")
    assert statuses["10-ok"][0] == "ok"  # it froze, and the runner thawed it again at once
    assert elapsed < 2 + 20, f"took {elapsed:.1f}s with a 2s hook timeout"
    assert_guest_writable(vm, 1)
