"""Backups of real lab VMs (QEMU, qemu-ga, NBD read with libnbd) into real repositories,
judged by restoring them: clean journals, e2fsck, the writer's sequence numbers across
disks, file contents byte for byte, and the VM left as it was."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from backups import (
    backup,
    chunks_of,
    cli_json,
    damage_chunk,
    e2fsck_clean,
    guest,
    init_repo,
    objects,
    restore,
    served,
    write_random,
)
from conftest import LabFactory, RepoPlace, checkpoints, qmp, run_cli, unique, vm_status
from oracles import assert_in_step, ext4_file_blocks, ext4_needs_recovery, ext4_read, sequence
from servers import S3Server

from freezeframe.backup.repository import Repository
from freezeframe.backup.store import LocalStore, open_store
from freezeframe.config import Home
from freezeframe.engine.backup import restore_backup
from freezeframe.lab import vm as lab_vm
from freezeframe.lab.vm import LabVM

pytestmark = pytest.mark.vm


def vm_state(vm: LabVM) -> dict[str, Any]:
    """What a backup may leave in the VM, as QEMU has it (through libvirt's monitor
    pass-through for a domain): nodes, exports, jobs, bitmaps, the disks' files, and a
    domain's checkpoints."""
    nodes = qmp(vm, "query-named-block-nodes", {"flat": True})
    return {
        "nodes": sorted(n["node-name"] for n in nodes),
        "exports": qmp(vm, "query-block-exports"),
        "jobs": qmp(vm, "query-block-jobs"),
        "bitmaps": sorted({b["name"] for n in nodes for b in n.get("dirty-bitmaps", []) if "name" in b}),
        "files": [b["inserted"]["file"] for b in qmp(vm, "query-block") if b.get("inserted")],
        "checkpoints": checkpoints(vm),
    }


def assert_left_as_it_was(vm: LabVM, before: dict[str, Any]) -> dict[str, Any]:
    """No node, export or job of the backup left; the disks on their own images; and a
    domain's checkpoints are exactly its bitmaps (libvirt knows every one)."""
    state = vm_state(vm)
    assert state["nodes"] == before["nodes"], state
    assert state["exports"] == [], state
    assert state["jobs"] == [], state
    assert state["files"] == vm.disks, "the VM's disks are not on their own images any more"
    if vm.libvirt_uri is not None:
        assert state["checkpoints"] == state["bitmaps"], state
    return state


@pytest.mark.combinations(["qemu-local", "libvirt-s3"])  # with the killed backup's two, every pair runs
def test_full_then_incremental_restore_consistent_and_damage_is_named(
        home: Home, any_lab: LabFactory, tmp_path: Path, any_repo: RepoPlace) -> None:
    repo = any_repo
    init_repo(home, repo)
    vm = any_lab(disks=2, workload=True)
    before = vm_state(vm)

    full = backup(home, vm, repo)
    assert (full["type"], full["consistency"], full["parent"]) == ("full", "filesystem", None)
    assert full["fallback_reasons"] == []
    assert [d["full_read_reason"] for d in full["disks"]] == [None, None]
    digest = write_random(vm, "/mnt/ffdata1/between.bin", 1)

    inc = backup(home, vm, repo)
    assert (inc["type"], inc["parent"], inc["consistency"]) == ("incremental", full["id"], "filesystem")
    for disk in inc["disks"]:
        assert disk["full_read_reason"] is None
        assert 0 < disk["bytes_read"] < disk["virtual_size"] // 8, disk
        assert disk["bytes_unchanged"] > 0
    assert inc["disks"][1]["bytes_new"] >= 1 << 20  # the new file's chunk(s)
    state = assert_left_as_it_was(vm, before)
    assert state["bitmaps"] == sorted({full["disks"][0]["bitmap"], inc["disks"][0]["bitmap"]})

    images = {}
    for name, record in (("full", full), ("inc", inc)):
        images[name] = restore(home, record["id"], tmp_path / name)
        raws = list(images[name].values())  # in the disks' order (ffdata0, ffdata1)
        for raw in raws:
            assert raw.stat().st_size == 320 << 20
            assert raw.stat().st_blocks * 512 < raw.stat().st_size // 2, "the restored image is not sparse"
            assert not ext4_needs_recovery(raw), f"{name} {raw.name}: the journal needs recovery"
            assert e2fsck_clean(raw), f"{name} {raw.name}: e2fsck -fn found problems"
        assert_in_step(sequence(raws[0]), sequence(raws[1]))
    second = [d["device"] for d in inc["disks"]][1]
    assert hashlib.sha256(ext4_read(images["inc"][second], "/between.bin")).hexdigest() == digest
    # Served over NBD straight from the repository: the same bytes as the restored image.
    with served(home, inc["id"], "--disk", second) as info:
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", info["exports"][second],
                               str(images["inc"][second])], capture_output=True, text=True)
        assert same.returncode == 0, same.stdout + same.stderr
    assert ext4_read(images["full"][second], "/between.bin") == b""

    # The repository alone tells what the backup is: its manifest carries the point's evidence.
    opened = Repository.open(open_store(str(repo)))
    manifest = opened.manifest(inc["id"])
    assert (manifest["type"], manifest["parent"], manifest["consistency"]) == ("incremental", full["id"], "filesystem")
    assert sorted(fs["mountpoint"] for fs in manifest["point"]["filesystems"]) == ["/mnt/ffdata0", "/mnt/ffdata1"]
    assert manifest["point"]["frozen_filesystems"] == 2
    assert [d["index"] for d in manifest["disks"]] == [d["index"] for d in inc["disks"]]

    # Flip one byte of a chunk only the incremental uses.
    only_inc = sorted(chunks_of(repo, inc["id"]) - chunks_of(repo, full["id"]))
    assert only_inc
    victim = repo / "chunks" / only_inc[0][:2] / only_inc[0]
    damage_chunk(victim)
    failed = run_cli(home, "backup", "restore", inc["id"], "--to", str(tmp_path / "damaged"))
    assert failed.returncode == 11, failed.stderr
    assert only_inc[0] in failed.stderr
    assert "damaged" in failed.stderr
    assert not list((tmp_path / "damaged").glob("*.qcow2")), "a restore that failed left an image behind"
    again = restore(home, full["id"], tmp_path / "full-again")
    assert e2fsck_clean(again[second])


def test_incremental_after_one_percent_change_reads_under_three_percent_and_other_types(
        home: Home, any_lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = any_lab(disks=1, disk_mib=2048)
    full = backup(home, vm, repo, "--type", "full")
    digest = write_random(vm, "/mnt/ffdata0/one-percent.bin", 20)  # 20 MiB of 2 GiB

    inc = backup(home, vm, repo)
    disk = inc["disks"][0]
    assert inc["type"] == "incremental"
    assert disk["full_read_reason"] is None
    assert 20 << 20 <= disk["bytes_read"] <= 0.03 * disk["virtual_size"], disk
    raw = restore(home, inc["id"], tmp_path / "r")[disk["device"]]
    assert hashlib.sha256(ext4_read(raw, "/one-percent.bin")).hexdigest() == digest

    # A copy reads everything and leaves the bitmaps (and so the chain) alone.
    bitmaps = vm_state(vm)["bitmaps"]
    copy = backup(home, vm, repo, "--type", "copy")
    assert copy["parent"] is None
    assert copy["disks"][0]["bitmap"] is None
    assert copy["disks"][0]["bytes_read"] >= disk["bytes_read"] + (20 << 20)
    assert vm_state(vm)["bitmaps"] == bitmaps

    # A differential reads everything since the full: both changes.
    later = write_random(vm, "/mnt/ffdata0/later.bin", 4)
    diff = backup(home, vm, repo, "--type", "differential")
    assert diff["parent"] == full["id"]
    assert diff["disks"][0]["full_read_reason"] is None
    assert diff["disks"][0]["bytes_read"] >= 24 << 20
    raw = restore(home, diff["id"], tmp_path / "d")[disk["device"]]
    assert hashlib.sha256(ext4_read(raw, "/one-percent.bin")).hexdigest() == digest
    assert hashlib.sha256(ext4_read(raw, "/later.bin")).hexdigest() == later
    # The next incremental follows the differential (a copy is in no chain).
    assert backup(home, vm, repo)["parent"] == diff["id"]

    # Restored to a new instance, set up like the original.
    for args in (("instance", "update", vm.name, "--freeze-budget", "5"),
                 ("writer", "add", vm.name, "sqlite", "--option", "path=/srv/app.db")):
        assert run_cli(home, *args).returncode == 0
    restored, done = cli_json(home, "backup", "restore", diff["id"], "--to", str(tmp_path / "new"),
                              "--to-instance", f"{vm.name}-copy")
    assert done.returncode == 0, done.stderr
    assert Path(restored[0]["image"]).is_file()
    assert "instance update" in done.stderr
    copy_instance, _ = cli_json(home, "instance", "show", f"{vm.name}-copy")
    assert (copy_instance["kind"], copy_instance["qmp_socket"], copy_instance["freeze_budget"]) == ("qemu", None, 5)
    writers, _ = cli_json(home, "writer", "list", f"{vm.name}-copy")
    assert [w["kind"] for w in writers] == ["sqlite"]
    again = run_cli(home, "backup", "restore", diff["id"], "--to", str(tmp_path / "again"),
                    "--to-instance", f"{vm.name}-copy")
    assert again.returncode == 4, again.stderr
    assert not (tmp_path / "again").exists()


def snapshot_create(home: Home, vm: LabVM) -> str:
    data, done = cli_json(home, "snapshot", "create", vm.name, "--consistency", "filesystem")
    assert done.returncode == 0, done.stderr
    return str(data["id"])


def snapshot_delete(home: Home, snapshot_id: str) -> None:
    done = run_cli(home, "snapshot", "delete", snapshot_id)
    assert done.returncode == 0, done.stderr


def test_snapshots_between_incrementals_keep_them_small(home: Home, any_lab: LabFactory, tmp_path: Path) -> None:
    """Snapshot create and delete, in any mix, between backups: each incremental reads only
    what changed (the bitmaps move up onto a snapshot's overlay and down at its commit),
    and the restore of the last one holds every file written along the way."""
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = any_lab(disks=1, disk_mib=2048)
    backup(home, vm, repo, "--type", "full")
    files: dict[str, str] = {}

    def change_then_back_up(name: str) -> dict[str, Any]:
        files[name] = write_random(vm, f"/mnt/ffdata0/{name}.bin", 20)  # 1% of the disk
        inc = backup(home, vm, repo)
        disk = inc["disks"][0]
        assert inc["type"] == "incremental"
        assert disk["full_read_reason"] is None, f"after {name}: {disk['full_read_reason']}"
        assert 20 << 20 <= disk["bytes_read"] <= 0.03 * disk["virtual_size"], (name, disk)
        return inc

    change_then_back_up("plain")
    first = snapshot_create(home, vm)
    change_then_back_up("after-create")
    snapshot_delete(home, first)  # an active commit: the overlay's bitmaps merged down
    change_then_back_up("after-delete")

    # Two snapshots; the older deleted first (its layer is not the active one), the newer later.
    older = snapshot_create(home, vm)
    files["between"] = write_random(vm, "/mnt/ffdata0/between.bin", 4)
    newer = snapshot_create(home, vm)
    snapshot_delete(home, older)
    change_then_back_up("after-inner-delete")
    snapshot_delete(home, newer)
    last = change_then_back_up("after-both")

    raw = restore(home, last["id"], tmp_path / "r")[last["disks"][0]["device"]]
    assert e2fsck_clean(raw)
    for name, digest in files.items():
        assert hashlib.sha256(ext4_read(raw, f"/{name}.bin")).hexdigest() == digest, name
    assert vm_state(vm)["files"] == vm.disks, "the deletes did not bring the disk back to its own image"


def test_second_vm_with_the_same_data_stores_little(home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    first = lab(disks=1)
    digest = write_random(first, "/mnt/ffdata0/data.bin", 100)
    full = backup(home, first, repo)
    images = restore_backup(Repository.open(LocalStore(repo)), full["id"], tmp_path / "clone")
    second = lab(disk_images=[path for _, path in images])
    assert guest(second, "sha256sum /mnt/ffdata0/data.bin").split()[0] == digest

    other = backup(home, second, repo, "--type", "full")
    read = sum(d["bytes_read"] for d in other["disks"])
    new = sum(d["bytes_new"] for d in other["disks"])
    assert read >= 100 << 20
    assert new < 0.10 * read, f"the second VM's full backup stored {new} new bytes of {read} read"


def kill_qemu(home: Home, vm: LabVM) -> LabVM:
    """SIGKILL the VM's QEMU (no chance to save anything), then boot it on the same images."""
    os.kill(vm.pid, signal.SIGKILL)
    while vm.running:
        time.sleep(0.05)
    return lab_vm.restart(home.lab, home.images, vm.name)


def clean_restart(home: Home, vm: LabVM) -> LabVM:
    lab_vm.stop(home.lab, vm.name)  # SIGTERM: QEMU writes its persistent bitmaps back
    return lab_vm.restart(home.lab, home.images, vm.name)


def test_bitmaps_survive_a_clean_restart_and_a_killed_qemu_forces_a_full_read(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1)
    backup(home, vm, repo)
    vm = clean_restart(home, vm)
    files = {"one": write_random(vm, "/mnt/ffdata0/one.bin", 2)}
    inc = backup(home, vm, repo)
    assert inc["disks"][0]["full_read_reason"] is None, "the bitmap did not survive a clean restart"

    # Killed before it could save the bitmap it started at the last backup: missing.
    vm = kill_qemu(home, vm)
    files["two"] = write_random(vm, "/mnt/ffdata0/two.bin", 2)
    missing = backup(home, vm, repo)
    disk = missing["disks"][0]
    assert missing["type"] == "incremental"
    assert "missing from every layer of the disk's chain: QEMU stopped" in (disk["full_read_reason"] or ""), disk
    assert disk["bytes_unchanged"] == 0
    assert disk["bytes_read"] > 8 << 20

    # Saved at a clean stop, then QEMU killed while using it: inconsistent.
    vm = clean_restart(home, vm)
    vm = kill_qemu(home, vm)
    files["three"] = write_random(vm, "/mnt/ffdata0/three.bin", 2)
    broken = backup(home, vm, repo)
    disk = broken["disks"][0]
    assert "inconsistent" in (disk["full_read_reason"] or ""), disk
    assert disk["bytes_unchanged"] == 0
    raw = restore(home, broken["id"], tmp_path / "r")["ffdata0"]
    assert not ext4_needs_recovery(raw)
    assert e2fsck_clean(raw)
    for name, digest in files.items():
        assert hashlib.sha256(ext4_read(raw, f"/{name}.bin")).hexdigest() == digest
    assert vm_state(vm)["bitmaps"] == [broken["disks"][0]["bitmap"]], "a broken bitmap was left behind"

    following = backup(home, vm, repo)
    assert following["disks"][0]["full_read_reason"] is None
    assert following["disks"][0]["bytes_unchanged"] > 0


def test_a_checkpoint_bitmap_lost_behind_libvirts_back_forces_a_full_read_of_that_disk_only(
        home: Home, libvirt_lab: LabFactory, tmp_path: Path) -> None:
    """libvirt would refuse the whole backup (inside the freeze window): freezeframe asks
    libvirt for each checkpoint's size per disk first and reads a disk without one in full."""
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = libvirt_lab(disks=2)
    full = backup(home, vm, repo)
    digest = write_random(vm, "/mnt/ffdata1/after.bin", 2)
    second = [b for b in qmp(vm, "query-block") if b.get("inserted")][1]["inserted"]["node-name"]
    qmp(vm, "block-dirty-bitmap-remove", {"node": second, "name": full["disks"][0]["bitmap"]})

    inc = backup(home, vm, repo)
    kept, lost = inc["disks"]
    assert inc["type"] == "incremental"
    assert kept["full_read_reason"] is None
    assert kept["bytes_unchanged"] > 0
    assert "missing" in (lost["full_read_reason"] or ""), lost
    assert lost["bytes_unchanged"] == 0
    assert lost["bytes_read"] >= 2 << 20
    raw = restore(home, inc["id"], tmp_path / "r")[lost["device"]]
    assert hashlib.sha256(ext4_read(raw, "/after.bin")).hexdigest() == digest
    assert e2fsck_clean(raw)
    # The next incremental reads only changes again, on both disks.
    following = backup(home, vm, repo)
    assert [d["full_read_reason"] for d in following["disks"]] == [None, None]
    assert all(d["bytes_unchanged"] > 0 for d in following["disks"])
    assert checkpoints(vm) == sorted({full["disks"][0]["bitmap"], following["disks"][0]["bitmap"]})


def kill_mid_read(home: Home, vm: LabVM, repo: Path | RepoPlace, stored: int, before: dict[str, Any]) -> None:
    """A backup SIGKILLed once it has stored ``stored`` bytes; returns when the VM is back
    to ``before`` (the sentinel's work) or 30 s have passed, for the caller to judge."""
    killed = run_cli(home, "backup", "create", vm.name, "--repo", str(repo), "--consistency", "filesystem",
                     env={"FREEZEFRAME_FAULT": f"mid-read:{stored}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    deadline = time.monotonic() + 30
    while vm_state(vm) != before and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_killed_backup_of_a_domain_with_iothreads_leaves_it_running(
        home: Home, libvirt_lab: LabFactory, tmp_path: Path) -> None:
    """libvirt ends a job by stopping QEMU's NBD server at once; with the disks in an
    iothread, QEMU 7.2 aborts when the connections the sentinel holds close after that.
    The sentinel takes the exports down first, so the domain lives on."""
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = libvirt_lab(disks=1, iothread=True)
    assert qmp(vm, "query-iothreads"), "the domain runs no iothread: the test proves nothing"
    full = backup(home, vm, repo)
    before = vm_state(vm)
    digest = write_random(vm, "/mnt/ffdata0/data.bin", 40)
    for _ in range(2):
        kill_mid_read(home, vm, repo, 8 << 20, before)
        assert vm_status(vm) == "running", "the domain died with the killed backup"
        assert assert_left_as_it_was(vm, before) == before
    rerun = backup(home, vm, repo)
    assert rerun["parent"] == full["id"]
    assert rerun["disks"][0]["full_read_reason"] is None
    raw = restore(home, rerun["id"], tmp_path / "r")[rerun["disks"][0]["device"]]
    assert hashlib.sha256(ext4_read(raw, "/data.bin")).hexdigest() == digest


@pytest.mark.combinations(["qemu-s3", "libvirt-local"])
def test_backup_killed_mid_read_lists_nothing_loses_no_change_and_the_rerun_reuses_chunks(
        home: Home, any_lab: LabFactory, tmp_path: Path, any_repo: RepoPlace) -> None:
    repo = any_repo
    init_repo(home, repo)
    vm = any_lab(disks=1)
    full = backup(home, vm, repo)
    digest = write_random(vm, "/mnt/ffdata0/data.bin", 60)
    before = vm_state(vm)
    assert before["bitmaps"] == [full["disks"][0]["bitmap"]]

    kill_mid_read(home, vm, repo, 24 << 20, before)
    after = assert_left_as_it_was(vm, before)
    assert after == before, "the sentinel did not put the VM back as it was (nodes, exports, jobs, bitmaps)"

    listed, _ = cli_json(home, "backup", "list", "--instance", vm.name)
    assert [b["id"] for b in listed] == [full["id"]]
    everything, _ = cli_json(home, "backup", "list", "--instance", vm.name, "--all")
    assert [b["state"] for b in everything] == ["created", "failed"]
    assert "sentinel" in everything[1]["error"]
    check = run_cli(home, "repo", "check", str(repo))
    assert check.returncode == 0, check.stdout + check.stderr
    stats, _ = cli_json(home, "repo", "stats", str(repo))
    assert stats["unreferenced_chunks"] > 0, "the killed run had stored no chunk: the test proves nothing"

    # The rerun is still incremental to the full (its bitmap kept every change), and stores
    # only what the killed run had not.
    rerun = backup(home, vm, repo)
    disk = rerun["disks"][0]
    assert rerun["type"] == "incremental"
    assert rerun["parent"] == full["id"]
    assert disk["full_read_reason"] is None
    assert disk["bytes_read"] >= 60 << 20
    assert disk["bytes_reused"] >= 16 << 20, disk
    assert disk["bytes_new"] + disk["bytes_reused"] <= disk["bytes_read"]
    raw = restore(home, rerun["id"], tmp_path / "r")[disk["device"]]
    assert hashlib.sha256(ext4_read(raw, "/data.bin")).hexdigest() == digest

    # The killed run's lease is dead at once (its process on this machine is gone): garbage
    # collection breaks it instead of waiting for it, and frees every chunk nobody names
    # once it is older than the lease (here at once, or kept as too young to judge).
    killed = f"backup-{everything[1]['id']}"
    assert {name.split("/")[1] for name in objects(repo, "locks/")} == {killed}
    unused = cli_json(home, "repo", "stats", str(repo))[0]["unreferenced_chunks"]
    collected, done = cli_json(home, "repo", "gc", str(repo))
    assert done.returncode == 0, done.stderr
    assert [b["name"] for b in collected["leases_broken"]] == [killed]
    assert "is gone" in collected["leases_broken"][0]["why"]
    assert collected["chunks_deleted"] + collected["chunks_too_young"] == unused
    assert objects(repo, "locks/") == []
    checked, done = cli_json(home, "backup", "verify", "--all", "--repo", str(repo))
    assert done.returncode == 0, checked


def test_encrypted_repository_hides_plaintext_and_needs_the_passphrase(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o600)
    sealed, plain = tmp_path / "sealed", tmp_path / "plain"
    init_repo(home, sealed, "--encryption", "--passphrase-file", str(secret))
    init_repo(home, plain)
    vm = lab(disks=1)
    before = vm_state(vm)
    marker = b"FREEZEFRAME-PLAINTEXT-MARKER"
    guest(vm, f"yes {marker.decode()} | head -c 1048576 > /mnt/ffdata0/marker.txt && sync")
    write_random(vm, "/mnt/ffdata0/noise.bin", 8)  # more than the 2 MiB repository below can hold

    # Not enough room for the temporary snapshot data: refused before anything is taken.
    # A repository whose disk fills up: a clear error, nothing listed, the VM as it was.
    tiny, full_disk = tmp_path / "tiny", tmp_path / "full-disk"
    for where, size in ((tiny, "1m"), (full_disk, "2m")):
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        refused = run_cli(home, "backup", "create", vm.name, "--repo", str(plain), "--fleecing-dir", str(tiny))
        init_repo(home, full_disk / "repo")
        filled = run_cli(home, "backup", "create", vm.name, "--repo", str(full_disk / "repo"))
    finally:
        for where in (tiny, full_disk):
            subprocess.run(["umount", str(where)], check=True)
    assert refused.returncode == 2, refused.stderr
    assert "not enough free space for the temporary snapshot data" in refused.stderr
    assert filled.returncode == 7, filled.stderr
    assert "is the disk full" in filled.stderr
    assert "Traceback" not in filled.stderr
    assert_left_as_it_was(vm, before)
    assert vm_state(vm)["bitmaps"] == []
    listed = cli_json(home, "backup", "list", "--instance", vm.name, "--all")[0]
    assert [b["state"] for b in listed] == ["failed"]

    done = backup(home, vm, sealed, "--passphrase-file", str(secret))
    backup(home, vm, plain)

    def chunks_with_marker(repo: Path) -> int:
        return sum(marker in p.read_bytes() for p in (repo / "chunks").rglob("*") if p.is_file())

    assert chunks_with_marker(plain) > 0, "control: a plain repository should show the marker"
    assert chunks_with_marker(sealed) == 0, "an encrypted chunk holds plaintext"

    wrong = run_cli(home, "backup", "restore", done["id"], "--to", str(tmp_path / "wrong"),
                    env={"FREEZEFRAME_PASSPHRASE": "not the passphrase"})
    assert wrong.returncode == 10, wrong.stderr
    assert "wrong passphrase" in wrong.stderr
    assert not (tmp_path / "wrong").exists() or not list((tmp_path / "wrong").iterdir())
    raw = restore(home, done["id"], tmp_path / "right", env={"FREEZEFRAME_PASSPHRASE": "correct horse battery staple"})
    assert ext4_read(raw["ffdata0"], "/marker.txt") == (marker + b"\n") * (1048576 // (len(marker) + 1)) + \
        (marker + b"\n")[:1048576 % (len(marker) + 1)]


def s3_outage(home: Home, vm: LabVM, repo: RepoPlace, s3: S3Server, *, retry_s: float,
              down_s: float | None) -> tuple[int, str, str]:
    """Back ``vm`` up into ``repo``; once 3 chunks are stored, SIGKILL the S3 server and start
    it again ``down_s`` seconds later (None: after the backup ended). The backup's exit code,
    stdout and stderr."""
    env = dict(os.environ, FREEZEFRAME_HOME=str(home.root), FREEZEFRAME_S3_RETRY_S=str(retry_s))
    running = subprocess.Popen([sys.executable, "-m", "freezeframe", "backup", "create", vm.name, "--repo", str(repo),
                                "--consistency", "filesystem", "--type", "full", "-o", "json"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(objects(repo, "chunks/")) < 3 and time.monotonic() < deadline:
            assert running.poll() is None, running.communicate()
            time.sleep(0.02)
        s3.kill()  # mid-upload: the backup has stored some chunks and is storing more
        if down_s is not None:
            time.sleep(down_s)  # requests fail meanwhile (connection refused)
            s3.start()
        out, err = running.communicate(timeout=180)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
        if s3.process is None or s3.process.poll() is not None:
            s3.start()
    return running.returncode, out, err


def test_s3_server_killed_mid_upload_then_back_leaves_a_repository_that_verifies(
        home: Home, lab: LabFactory, tmp_path: Path, s3: S3Server) -> None:
    repo = RepoPlace(f"s3://ff/{unique('killed')}?endpoint={s3.endpoint}", s3.root / "ff")
    init_repo(home, repo)
    vm = lab(disks=1)
    digest = write_random(vm, "/mnt/ffdata0/big.bin", 80)
    before = vm_state(vm)
    code, _, err = s3_outage(home, vm, repo, s3, retry_s=3, down_s=None)
    assert code == 7, err
    assert "in the repository s3://" in err, err
    assert assert_left_as_it_was(vm, before) == before, "the failed backup left its view in the VM"
    listed, _ = cli_json(home, "backup", "list", "--instance", vm.name)
    assert listed == []

    rerun = backup(home, vm, repo)
    assert rerun["type"] == "full"
    assert rerun["disks"][0]["bytes_reused"] > 0, "the rerun stored again what the killed upload had stored"
    checked, done = cli_json(home, "backup", "verify", "--all", "--repo", str(repo))
    assert done.returncode == 0, checked
    assert checked["backups"] == [rerun["id"]]
    raw = restore(home, rerun["id"], tmp_path / "r")["ffdata0"]
    assert hashlib.sha256(ext4_read(raw, "/big.bin")).hexdigest() == digest


def test_s3_server_back_within_the_retry_window_and_the_backup_completes(
        home: Home, lab: LabFactory, tmp_path: Path, s3: S3Server) -> None:
    repo = RepoPlace(f"s3://ff/{unique('retried')}?endpoint={s3.endpoint}", s3.root / "ff")
    init_repo(home, repo)
    vm = lab(disks=1)
    digest = write_random(vm, "/mnt/ffdata0/big.bin", 80)
    code, out, err = s3_outage(home, vm, repo, s3, retry_s=60, down_s=2)
    assert code == 0, err
    made = json.loads(out)
    checked, done = cli_json(home, "backup", "verify", made["id"], "--repo", str(repo))
    assert done.returncode == 0, checked
    raw = restore(home, made["id"], tmp_path / "r")["ffdata0"]
    assert hashlib.sha256(ext4_read(raw, "/big.bin")).hexdigest() == digest


def test_one_vm_backed_up_into_two_repositories_keeps_incrementals_in_each(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    """Nightly into one repository, weekly into another: each keeps a bitmap chain of its
    own (named after the repository), so neither reads the disk in full for the other."""
    vm = lab(disks=1)
    nightly, weekly = tmp_path / "nightly", tmp_path / "weekly"
    for repo in (nightly, weekly):
        init_repo(home, repo, "--chunk-size", "256")  # fine enough to see 1% of a 320 MiB disk
    fulls = [backup(home, vm, repo) for repo in (nightly, weekly)]
    assert [b["type"] for b in fulls] == ["full", "full"]
    last = {}
    for round_ in range(2):
        digest = write_random(vm, f"/mnt/ffdata0/round{round_}.bin", 3)  # under 1% of the disk
        for repo in (nightly, weekly):
            inc = backup(home, vm, repo)
            disk = inc["disks"][0]
            assert inc["type"] == "incremental"
            assert disk["full_read_reason"] is None, disk["full_read_reason"]
            assert disk["bytes_read"] < 0.03 * disk["virtual_size"], (repo.name, disk)
            last[repo] = inc["id"]
    prefixes = {name.rsplit("-", 1)[0] for name in vm_state(vm)["bitmaps"]}
    assert len(prefixes) == 2, "one bitmap chain per repository"
    for repo, backup_id in last.items():
        raw = restore(home, backup_id, tmp_path / f"from-{repo.name}", "--repo", str(repo))["ffdata0"]
        assert e2fsck_clean(raw)
        assert hashlib.sha256(ext4_read(raw, "/round1.bin")).hexdigest() == digest


def test_incrementals_never_inherit_a_lost_or_damaged_parent_chunk(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    """A chunk lost after its backup verified: the next incremental finds it gone before it
    publishes and reads it again from the disk (so the chain heals). A parent that failed
    its last verify: the next incremental does not build on it at all."""
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1)
    digest = write_random(vm, "/mnt/ffdata0/kept.bin", 8)
    full = backup(home, vm, repo)
    checked, done = cli_json(home, "backup", "verify", full["id"])
    assert done.returncode == 0, checked
    # Lost: a chunk wholly inside the file, which the incremental keeps unchanged (does not
    # read again). Any chunk of the disk would not do: one holding metadata is dirty again.
    raw = restore(home, full["id"], tmp_path / "full")["ffdata0"]
    block, in_file = ext4_file_blocks(raw, "/kept.bin")
    opened = Repository.open(open_store(str(repo)))
    index = opened.index(opened.manifest(full["id"])["disks"][0]["index"])
    inside = [chunk for position, chunk in enumerate(index.chunks) if chunk and all(
        offset in in_file for offset in range(position * index.chunk_size, (position + 1) * index.chunk_size, block))]
    assert inside, "an 8 MiB file holds at least one whole chunk"
    lost = inside[0]
    raw.unlink()
    (repo / "chunks" / lost[:2] / lost).unlink()
    write_random(vm, "/mnt/ffdata0/other.bin", 1)
    inc = backup(home, vm, repo)
    disk = inc["disks"][0]
    assert disk["full_read_reason"] is None
    assert disk["chunks_stored_again"] >= 1, disk
    assert lost in chunks_of(repo, inc["id"])
    assert (repo / "chunks" / lost[:2] / lost).exists(), "the incremental named a chunk it did not put back"
    checked, done = cli_json(home, "backup", "verify", "--all", "--repo", str(repo))
    assert done.returncode == 0, checked

    # Damaged, and found so by a verify: the parent is not built on.
    damage_chunk(repo / "chunks" / lost[:2] / lost)
    checked, done = cli_json(home, "backup", "verify", inc["id"])
    assert done.returncode == 11
    following = backup(home, vm, repo)
    reason = following["disks"][0]["full_read_reason"]
    assert reason is not None
    assert f"backup {inc['id'][:8]} failed its last verify" in reason
    raw = restore(home, following["id"], tmp_path / "r")["ffdata0"]
    assert hashlib.sha256(ext4_read(raw, "/kept.bin")).hexdigest() == digest
