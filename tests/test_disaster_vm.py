"""Disaster recovery from the repository alone: the host that took the backups is gone with
its home; a new host with an empty home lists, shows, restores, verifies and tests them
from an S3 repository, imports them, and goes on with incrementals of the restored VM."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from backups import backup, cli_json, e2fsck_clean, init_repo, write_random
from conftest import LabFactory, run_cli, unique
from oracles import ext4_read
from servers import S3Server

from freezeframe.config import Home

pytestmark = pytest.mark.vm


def test_a_new_host_lists_restores_verifies_tests_imports_and_goes_on_from_the_repository_alone(
        home: Home, lab: LabFactory, tmp_path: Path, s3: S3Server) -> None:
    repo = f"s3://ff/{unique('dr')}?endpoint={s3.endpoint}"
    init_repo(home, repo)
    vm = lab(disks=1)
    full = backup(home, vm, repo)
    digest = write_random(vm, "/mnt/ffdata0/precious.bin", 4)
    inc = backup(home, vm, repo)

    new = Home.open(tmp_path / "new-host")  # the old home is not used from here on
    listed, done = cli_json(new, "backup", "list", "--repo", repo)
    assert done.returncode == 0, done.stderr
    assert [(b["id"], b["instance"], b["type"], b["host"], b["consistency"]) for b in listed] == [
        (full["id"], vm.name, "full", os.uname().nodename, "filesystem"),
        (inc["id"], vm.name, "incremental", os.uname().nodename, "filesystem")]
    shown, done = cli_json(new, "backup", "show", inc["id"][:8], "--repo", repo)
    assert done.returncode == 0, done.stderr
    assert (shown["parent"], shown["consistency"], shown["disks"][0]["index"]) == (
        full["id"], "filesystem", inc["disks"][0]["index"])

    restored = tmp_path / "restored"
    done = run_cli(new, "backup", "restore", inc["id"], "--to", str(restored), "--repo", repo)
    assert done.returncode == 0, done.stderr
    raw = tmp_path / "check.raw"
    run = run_cli(new, "backup", "restore", inc["id"], "--to", str(tmp_path / "raw"), "--format", "raw",
                  "--repo", repo)
    assert run.returncode == 0, run.stderr
    (tmp_path / "raw" / "ffdata0.raw").rename(raw)
    assert e2fsck_clean(raw)
    assert hashlib.sha256(ext4_read(raw, "/precious.bin")).hexdigest() == digest
    verified, done = cli_json(new, "backup", "verify", inc["id"], "--repo", repo)
    assert done.returncode == 0, verified
    assert verified["held"] is True
    tested, done = cli_json(new, "backup", "test", inc["id"], "--repo", repo, "--scratch", str(tmp_path / "scratch"))
    assert done.returncode == 0, tested
    assert tested["outcome"] == "passed"

    imported, done = cli_json(new, "repo", "import", repo)
    assert done.returncode == 0, done.stderr
    assert sorted(imported["imported"]) == sorted([full["id"], inc["id"]])
    again, _ = cli_json(new, "repo", "import", repo)
    assert (again["imported"], sorted(again["already_known"])) == ([], sorted([full["id"], inc["id"]]))

    # The restored VM, under the instance's name on the new host: its next backup is an
    # incremental of the newest one (read in full: a restored image has no bitmap, and the
    # reason says so), storing almost nothing new.
    revived = lab(disks=1, disk_images=[restored / "ffdata0.qcow2"])
    done = run_cli(new, "instance", "add", vm.name, "--qmp", revived.qmp_socket, "--qga", revived.qga_socket)
    assert done.returncode == 0, done.stderr
    later = write_random(revived, "/mnt/ffdata0/after.bin", 2)
    following, done = cli_json(new, "backup", "create", vm.name, "--repo", repo, "--consistency", "filesystem")
    assert done.returncode == 0, done.stderr
    disk = following["disks"][0]
    assert (following["type"], following["parent"]) == ("incremental", inc["id"])
    assert "is missing" in disk["full_read_reason"]
    assert disk["bytes_reused"] >= disk["bytes_read"] // 2, disk  # what the backups hold already
    # And the one after that reads only what changed.
    after, done = cli_json(new, "backup", "create", vm.name, "--repo", repo, "--consistency", "filesystem")
    assert done.returncode == 0, done.stderr
    assert after["disks"][0]["full_read_reason"] is None
    out = tmp_path / "final"
    done = run_cli(new, "backup", "restore", after["id"], "--to", str(out), "--format", "raw", "--repo", repo)
    assert done.returncode == 0, done.stderr
    final = out / "ffdata0.raw"
    assert hashlib.sha256(ext4_read(final, "/precious.bin")).hexdigest() == digest
    assert hashlib.sha256(ext4_read(final, "/after.bin")).hexdigest() == later
