"""`backup test` on backups of real lab VMs: restored to scratch, file systems checked with
their own tools, the guest's SQLite database opened and checked, the disks booted, and
the outcome recorded; a backup that cannot be restored fails its test."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from backups import backup, chunks_of, cli_json, init_repo
from conftest import LabFactory
from oracles import guest_fs_mounts, host_mounts_watched

from freezeframe.backup.repository import chunk_name
from freezeframe.config import Home
from freezeframe.lab import vm as lab_vm

pytestmark = pytest.mark.vm


def trial(home: Home, backup_id: str, *args: str) -> tuple[dict[str, Any], int]:
    """``backup test``, watching that the host never mounts or loop-attaches what it checks."""
    with host_mounts_watched() as appeared:
        data, done = cli_json(home, "backup", "test", backup_id, *args)
    assert data is not None, done.stderr
    assert guest_fs_mounts(appeared) == [], f"the host mounted or attached a guest file system: {appeared}"
    return data, done.returncode


def passed(result: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(check, where) -> detail, of the checks that passed."""
    return {(c["what"], c["where"]): c["detail"] for c in result["checks"] if c["passed"]}


def test_an_application_level_backup_restores_checks_and_boots(home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1, hooks=("sqlite", "ok"), app="sqlite")
    time.sleep(2)  # the application commits for a while
    made = backup(home, vm, repo, "--consistency", "application", "--freeze-timeout", "30")
    assert made["consistency"] == "application", made["fallback_reasons"]

    result, code = trial(home, made["id"], "--boot", "--scratch", str(tmp_path / "scratch"))
    assert code == 0, result
    assert result["outcome"] == "passed"
    ok = passed(result)
    assert ("journal clean", "ffdata0") in ok
    assert ("e2fsck -fn", "ffdata0") in ok
    assert ("sqlite integrity_check", "/mnt/ffdata0/app.db (ffdata0)") in ok
    assert "guest agent answered" in ok[("boot", "restored VM")]
    assert list((tmp_path / "scratch").iterdir()) == [], "the scratch images were not removed"
    assert not [v for v in lab_vm.list_vms(home.lab) if v.name.startswith("restore-test-")], "the boot VM was left"

    shown, _ = cli_json(home, "backup", "show", made["id"])
    assert shown["restore_test"]["outcome"] == "passed"
    assert shown["restore_tested_at"]


def test_xfs_is_checked_with_its_own_tools(home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1, fs="xfs", workload=True)
    made = backup(home, vm, repo)
    result, done = cli_json(home, "backup", "test", made["id"], "--scratch", str(tmp_path / "scratch"),
                            env={"FREEZEFRAME_LOG": "info"})
    assert done.returncode == 0, result
    ok = passed(result)
    assert ok[("log clean", "ffdata0")] == "only the superblock in the log"
    assert ("xfs_repair -n", "ffdata0") in ok
    # The log says what the test did, check by check, and where the sandbox ran.
    assert f"restore test of {made['id'][:8]}: xfs_repair -n on ffdata0 passed" in done.stderr, done.stderr
    assert "sandbox appliance up in" in done.stderr


def test_a_backup_that_cannot_be_restored_fails_its_test(home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1, workload=True)
    made = backup(home, vm, repo, "--consistency", "crash")
    victim = sorted(chunks_of(repo, made["id"]))[0]
    (repo / chunk_name(victim)).unlink()

    result, code = trial(home, made["id"], "--scratch", str(tmp_path / "scratch"))
    assert code == 7
    assert result["outcome"] == "failed"
    failed = [c for c in result["checks"] if not c["passed"]]
    assert len(failed) == 1
    assert victim in failed[0]["detail"]
    shown, _ = cli_json(home, "backup", "show", made["id"])
    assert shown["restore_test"]["outcome"] == "failed"
