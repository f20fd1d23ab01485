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
from test_check import check
from test_snapshot_vm import assert_guest_writable, create, created

from freezeframe.config import Home
from freezeframe.lab.vm import LabVM

pytestmark = pytest.mark.vm


def dump_from_ext4(raw: Path, names: list[str], dest: Path) -> None:
    """Copy files out of an unmounted ext4 image."""
    dest.mkdir()
    for name in names:
        subprocess.run(["debugfs", "-R", f"dump /{name} {dest / name}", str(raw)], check=True, capture_output=True)


def assert_sqlite_copy_has_every_acknowledged_commit(vm: LabVM, raw: Path, freeze_began: float,
                                                     tmp_path: Path) -> None:
    """The copy's journal is clean, its database passes its integrity check, and every
    commit the guest application saw acknowledged before ``freeze_began`` (the guest's
    clock) is in it."""
    assert not ext4_needs_recovery(raw)
    dump_from_ext4(raw, ["app.db"], tmp_path / "copy")
    copy = sqlite3.connect(tmp_path / "copy" / "app.db")
    assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    present = {row[0] for row in copy.execute("SELECT n FROM t")}
    copy.close()
    acked = agent_call(vm, lambda a: a.read_file("/run/ff-sqlite-app.acked", max_bytes=8 << 20))
    before = {int(n) for n, at in (line.split() for line in acked.decode().splitlines()) if float(at) < freeze_began}
    assert before, "the application committed nothing before the freeze"
    assert before <= present, f"lost {len(before - present)} acknowledged commits"


@pytest.mark.parametrize("runner", ["python", "sh"])
@pytest.mark.combinations(["qemu-sh", "libvirt-python"])
def test_guest_sqlite_snapshot_is_application_consistent(home: Home, any_lab: LabFactory, tmp_path: Path,
                                                         runner: str) -> None:
    vm = any_lab(disks=1, hooks=("sqlite", "ok"), app="sqlite", hook_runner=runner)
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

    assert_sqlite_copy_has_every_acknowledged_commit(vm, export_raw(snap["disks"][0]["image"], tmp_path / "disk.raw"),
                                                     freeze_began, tmp_path)
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


# -- the stock fsfreeze-hook: qemu-ga -F/etc/qemu/fsfreeze-hook, its log as the evidence ----------


def test_stock_fsfreeze_hook_log_makes_snapshots_and_backups_application_consistent(
        home: Home, any_lab: LabFactory, tmp_path: Path) -> None:
    """No freezeframe code in the guest: Debian's stock hook script runs the hooks and logs
    their exit status; that log is the evidence, read through the agent."""
    vm = any_lab(disks=1, hooks=("sqlite", "ok"), app="sqlite", hook_runner="stock")
    # Required by name: so the very first freeze counts too (its log does not exist yet).
    assert run_cli(home, "instance", "update", vm.name, "--guest-hooks", "10-sqlite,20-ok").returncode == 0
    time.sleep(2)  # the application commits for a while

    snap = created(home, vm.name, "--consistency", "application", "--freeze-timeout", "30")

    assert snap["consistency"] == "application", snap["fallback_reasons"]
    assert [(w["name"], w["where"], w["status"]) for w in snap["writers"]] == [
        ("10-sqlite", "guest", "ok"), ("20-ok", "guest", "ok")]
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    for writer in manifest["writers"]:
        assert (writer["manifest"]["freeze_exit_status"], writer["manifest"]["thaw_exit_status"]) == (0, 0)
        assert "qga-fsfreeze-hook.log" in writer["manifest"]["evidence"]
    assert json.loads(manifest["writers"][0]["manifest"]["freeze_output"])["status"] == "held"
    hooks = manifest["guest_hooks"]
    assert hooks["resolution_s"] == 1.0
    # The log has whole seconds: a commit acknowledged before that second began preceded the hook.
    assert_sqlite_copy_has_every_acknowledged_commit(
        vm, export_raw(snap["disks"][0]["image"], tmp_path / "disk.raw"), hooks["freeze_started_at_guest_clock"],
        tmp_path)
    assert_guest_writable(vm, 1)

    repo = tmp_path / "repo"
    assert run_cli(home, "repo", "init", str(repo)).returncode == 0
    done = run_cli(home, "backup", "create", vm.name, "--repo", str(repo), "--consistency", "application",
                   "-o", "json")
    assert done.returncode == 0, done.stderr
    backup = json.loads(done.stdout)
    point = json.loads(run_cli(home, "snapshot", "manifest", backup["id"]).stdout)
    assert point["achieved_level"] == "application", point["fallback_reasons"]
    assert [(w["name"], w["status"]) for w in point["writers"]] == [("10-sqlite", "ok"), ("20-ok", "ok")]


def test_stock_hook_failures_missing_hooks_and_blocked_files_step_down_with_their_reason(
        home: Home, lab: LabFactory) -> None:
    vm = lab(disks=1, hooks=("ok", "fail"), hook_runner="stock")
    snap = created(home, vm.name, "--consistency", "application")
    # The stock script ignores a hook's exit status, so the file systems froze: filesystem.
    assert snap["consistency"] == "filesystem"
    statuses = {w["name"]: (w["status"], w["error"]) for w in snap["writers"]}
    assert statuses == {"10-ok": ("ok", None), "20-fail": ("failed", "freeze exited with status 3")}
    assert snap["fallback_reasons"] == ["guest hook 20-fail failed: freeze exited with status 3"]
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    assert "refusing to quiesce" in {w["name"]: w for w in manifest["writers"]}["20-fail"]["manifest"]["freeze_output"]

    # A hook the instance requires that the guest does not have: named.
    assert run_cli(home, "instance", "update", vm.name, "--guest-hooks", "10-ok,30-postgresql").returncode == 0
    snap = created(home, vm.name, "--consistency", "application")
    assert snap["consistency"] == "filesystem"
    assert any(r.startswith("required guest hook 30-postgresql did not run this freeze")
               for r in snap["fallback_reasons"]), snap["fallback_reasons"]
    assert_guest_writable(vm, 1)

    # Only the freeze commands count for filesystem; the evidence needs guest-file-*.
    blocked = lab(disks=1, hooks=("ok",), hook_runner="stock", agent_args=("--block-rpcs=guest-file-open",))
    report, _ = check(home, blocked.name)
    status = {c["check"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert report["verdict"] == "filesystem"
    assert status["guest hooks"][0] == "warn"
    assert "blocks guest-file-open" in status["guest hooks"][1]
    snap = created(home, blocked.name, "--consistency", "application")
    assert snap["consistency"] == "filesystem"
    assert len(snap["fallback_reasons"]) == 1
    assert "the guest agent blocks guest-file-open" in snap["fallback_reasons"][0]


def test_the_sh_runner_installed_through_the_agent_thaws_in_reverse_and_kills_at_its_timeout(
        home: Home, any_lab: LabFactory) -> None:
    """A guest that runs the stock hook (and could lack Python): ``guest install`` puts
    freezeframe's sh runner where qemu-ga runs its hook, with no restart."""
    vm = any_lab(disks=1, hooks=("ok", "ok", "slow"), hook_runner="stock")
    done = run_cli(home, "guest", "install", vm.name, "--timeout", "2", "--on-failure", "continue", "-o", "json")
    assert done.returncode == 0, done.stderr
    installed = json.loads(done.stdout)
    assert installed["path"] == "/etc/qemu/fsfreeze-hook"
    assert installed["kept"] == "/etc/qemu/fsfreeze-hook.before-freezeframe"
    assert installed["config_written"] is True
    report, _ = check(home, vm.name)
    assert {c["check"]: c["status"] for c in report["checks"]}["guest hooks"] == "ok"

    snap = created(home, vm.name, "--consistency", "application", "--freeze-timeout", "30")

    # The slow hook was killed at the runner's timeout; under "continue" the freeze went on.
    assert snap["consistency"] == "filesystem"
    statuses = {w["name"]: (w["status"], w["error"]) for w in snap["writers"]}
    assert statuses == {"10-ok": ("ok", None), "20-ok": ("ok", None),
                        "30-slow": ("failed", "no answer within 2s; killed")}
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    assert manifest["guest_hooks"]["runner"] == "freezeframe's guest hook runner (sh)"
    result = json.loads(agent_call(vm, lambda a: a.read_file("/run/freezeframe/hook-result.json")))
    assert [e["name"] for e in result["thaw"]] == ["20-ok", "10-ok"]  # reverse order, only what froze
    assert_guest_writable(vm, 1)

    # Installed again: the stock script kept the first time is not overwritten by the runner.
    again = json.loads(run_cli(home, "guest", "install", vm.name, "-o", "json").stdout)
    assert (again["kept"], again["config_written"]) == (None, False)


@pytest.mark.parametrize("runner", ["python", "sh", "stock"])
def test_a_slow_hook_counts_as_hook_time_not_frozen_time_and_the_budget_bounds_the_frozen_part(
        home: Home, lab: LabFactory, runner: str) -> None:
    """A hook that takes 6 s to quiesce its application runs before the file systems
    freeze: the manifest splits the window, and a 3 s budget (which bounds the frozen
    part) does not cut it."""
    vm = lab(disks=1, hooks=("ok", "slow"), hook_runner=runner)
    if runner == "stock":
        assert run_cli(home, "instance", "update", vm.name, "--guest-hooks", "10-ok,20-slow").returncode == 0

    snap = created(home, vm.name, "--consistency", "application", "--freeze-timeout", "30",
                   "--freeze-budget", "3")

    assert snap["consistency"] == "application", snap["fallback_reasons"]
    phases = snap["freeze_phases"]
    resolution = phases["resolution_ms"]
    assert resolution == {"python": 10, "sh": 10, "stock": 1000}[runner]
    assert phases["hooks_freeze_ms"] >= 6000 - resolution, phases
    assert phases["frozen_ms"] < phases["hooks_freeze_ms"], phases
    assert phases["frozen_ms"] < 3000, phases
    assert phases["window_ms"] >= phases["hooks_freeze_ms"] + phases["frozen_at_least_ms"], phases
    shown = run_cli(home, "snapshot", "show", snap["id"]).stdout
    assert "file systems frozen" in shown
    assert "applications held" in shown
