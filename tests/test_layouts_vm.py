"""Disk layouts of VMs started by hand or by other tools (issue: "every common disk layout"):
``-drive`` with QEMU's own node names, a qcow2 disk on a backing file, a raw disk, iothreads
with ``cache=none``, virtio-scsi, and an empty CD-ROM and a read-only disk beside them. On
each, on a real VM with the writer running: two snapshots judged by their images, deletion
of the oldest and then the newest, ``qemu-img check`` of what remains, and a backup that
restores with a clean journal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backups import backup, e2fsck_clean, init_repo, restore
from conftest import run_cli, unique, vm_status
from oracles import assert_in_step, export_raw, ext4_needs_recovery, sequence

from freezeframe.agent.qmp import Monitor
from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.errors import HypervisorError
from freezeframe.lab import vm as lab_vm
from freezeframe.lab.vm import LabVM
from freezeframe.targets.qemu import qemu_id

pytestmark = pytest.mark.vm

MIB = 320


def ext4_raw(path: Path, label: str) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(MIB << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", "lazy_itable_init=0,lazy_journal_init=0", str(path)],
                   check=True, capture_output=True)
    return path


def qcow2_on_backing(directory: Path, label: str) -> Path:
    """A qcow2 disk whose file system lives in its backing file (a template's base image)."""
    base = directory / f"{label}-base.qcow2"
    raw = ext4_raw(directory / f"{label}-base.raw", label)
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(base)], check=True)
    raw.unlink()
    top = directory / f"{label}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)], check=True)
    return top


def qcow2(directory: Path, label: str) -> Path:
    raw = ext4_raw(directory / f"{label}.raw", label)
    image = directory / f"{label}.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(image)], check=True)
    raw.unlink()
    return image


def drive_backing_raw(d: Path) -> list[str]:
    """What a new user tried: -drive ids, a qcow2 on a backing file, a raw disk; plus an
    empty CD-ROM and a read-only disk, which hold nothing the guest writes."""
    readonly = qcow2(d, "ffro")
    return [
        "-drive", f"file={qcow2_on_backing(d, 'ffdata0')},format=qcow2,if=none,id=drive-virtio-disk0",
        "-device", "virtio-blk-pci,drive=drive-virtio-disk0,id=virtio-disk0,serial=ffdata0",
        "-drive", f"file={ext4_raw(d / 'ffdata1.raw', 'ffdata1')},format=raw,if=none,id=drive-virtio-disk1",
        "-device", "virtio-blk-pci,drive=drive-virtio-disk1,id=virtio-disk1,serial=ffdata1",
        "-drive", "if=none,id=drive-cd0,media=cdrom",
        "-device", "ide-cd,drive=drive-cd0,bus=ide.0",
        "-drive", f"file={readonly},format=qcow2,if=none,id=drive-ro0,readonly=on",
        "-device", "virtio-blk-pci,drive=drive-ro0,id=virtio-ro0",  # no serial: the guest leaves it unmounted
    ]


def iothread_cache_none(d: Path) -> list[str]:
    return [
        "-object", "iothread,id=io0",
        *[arg for i in range(2) for arg in (
            "-drive", f"file={qcow2(d, f'ffdata{i}')},format=qcow2,if=none,id=drive{i},cache=none,aio=native",
            "-device", f"virtio-blk-pci,drive=drive{i},iothread=io0,serial=ffdata{i}")],
    ]


def virtio_scsi(d: Path) -> list[str]:
    return [
        "-device", "virtio-scsi-pci,id=scsi0",
        *[arg for i in range(2) for arg in (
            "-drive", f"file={qcow2(d, f'ffdata{i}')},format=qcow2,if=none,id=drive-scsi0-0-0-{i}",
            "-device", f"scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun={i},drive=drive-scsi0-0-0-{i},id=scsi0-0-0-{i},"
                          f"serial=ffdata{i}")],
    ]


#: Each layout, and the drives freezeframe must leave out of its snapshots.
LAYOUTS: dict[str, tuple[Callable[[Path], list[str]], set[str]]] = {
    "drive-backing-raw": (drive_backing_raw, {"drive-cd0", "drive-ro0"}),
    "iothread-cache-none": (iothread_cache_none, set()),
    "virtio-scsi": (virtio_scsi, set()),
}


@pytest.fixture
def laid_out(home: Home, catalog: Catalog, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LabVM]:
    name = unique("layout")
    disks = tmp_path / "disks"
    disks.mkdir()
    attach = LAYOUTS[request.param][0](disks)
    vm = lab_vm.up_attached(home.lab, home.images, name, attach=attach, disks=[str(p) for p in disks.iterdir()],
                            workload=True)
    try:
        # Registered as a user would, by its sockets.
        done = run_cli(home, "instance", "add", name, "--qmp", vm.qmp_socket, "--qga", vm.qga_socket)
        assert done.returncode == 0, done.stderr
        yield vm
    finally:
        lab_vm.down(home.lab, name)


def cli_json(home: Home, *args: str) -> dict[str, Any]:
    done = run_cli(home, *args, "-o", "json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def active_chains(vm: LabVM) -> dict[str, list[dict[str, Any]]]:
    """Each writable disk's chain as qemu-img sees it, from the active image down."""
    async def tops() -> dict[str, str]:
        async with Monitor(vm.qmp_socket) as monitor:
            return {b["qdev"]: b["inserted"]["file"] for b in await monitor.execute("query-block")
                    if b.get("inserted") and not b["inserted"]["ro"]}

    chains = {}
    for qdev, top in asyncio.run(tops()).items():
        out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", top],
                             check=True, capture_output=True, text=True).stdout
        chains[qdev] = json.loads(out)
    return chains


def view_left(vm: LabVM) -> list[str]:
    """Exports and fleecing nodes of a backup still in the VM (QMP must answer within 5 s)."""
    async def query() -> list[str]:
        async with Monitor(vm.qmp_socket, timeout=5) as monitor:
            exports = [str(e["id"]) for e in await monitor.execute("query-block-exports")]
            nodes = [str(n["node-name"]) for n in await monitor.execute("query-named-block-nodes", {"flat": True})]
        return exports + [n for n in nodes if n.startswith("ffl")]

    try:
        return asyncio.run(query())
    except HypervisorError as err:
        return [str(err)]


def vm_running(vm: LabVM) -> bool:
    """Its QEMU is alive (the process, not only the socket) and says it runs."""
    return lab_vm.get(Path(vm.directory).parent, vm.name).running and vm_status(vm) == "running"


async def until(monitor: Monitor, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 60) -> None:
    """Wait until the block jobs satisfy ``done``."""
    for _ in range(int(timeout / 0.05)):
        if done(await monitor.execute("query-block-jobs")):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the block jobs did not get there in time")


def check_chains(vm: LabVM) -> dict[str, list[str]]:
    """qemu-img check on every qcow2 image of every active chain (raw images have no
    metadata to check); returns the chains' file names."""
    names = {}
    for qdev, chain in active_chains(vm).items():
        for image in chain:
            if image["format"] == "qcow2":
                done = subprocess.run(["qemu-img", "check", "-U", image["filename"]], capture_output=True, text=True)
                assert done.returncode == 0, f"{image['filename']}: {done.stdout}{done.stderr}"
        names[qdev] = [image["filename"] for image in chain]
    return names


@pytest.mark.parametrize("laid_out", sorted(LAYOUTS), indirect=True)
def test_snapshots_deletes_and_a_backup_on_the_layout(home: Home, laid_out: LabVM, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    vm = laid_out
    left_out = LAYOUTS[request.node.callspec.params["laid_out"]][1]
    before = check_chains(vm)
    snaps = [cli_json(home, "snapshot", "create", vm.name, "--consistency", "filesystem") for _ in range(2)]
    for snap in snaps:
        assert snap["consistency"] == "filesystem", snap["fallback_reasons"]
        assert len(snap["disks"]) == 2, snap["disks"]
    # The oracle: each snapshot's images (backing file included) have clean journals and
    # the writer's sequence in step across the two disks.
    for number, snap in enumerate(snaps):
        raws = [export_raw(disk["image"], tmp_path / f"s{number}-{i}.raw") for i, disk in enumerate(snap["disks"])]
        for raw in raws:
            assert not ext4_needs_recovery(raw), f"{raw.name}: the journal needs recovery"
        assert_in_step(sequence(raws[0]), sequence(raws[1]))
    done = run_cli(home, "snapshot", "manifest", snaps[0]["id"])
    skipped = {d["device"]: d["reason"] for d in json.loads(done.stdout).get("skipped_disks", [])}
    assert skipped.keys() == left_out, skipped
    if left_out:
        assert skipped["drive-cd0"] == "no medium (an empty drive)"
        assert skipped["drive-ro0"].startswith("read-only")

    for victim in (snaps[0], snaps[1]):  # the oldest, then the newest
        done = cli_json(home, "snapshot", "delete", victim["id"])
        assert done["state"] == "deleted"
    # The chains are as they were before the first snapshot, and every image checks.
    assert check_chains(vm) == before

    repo = tmp_path / "repo"
    init_repo(home, repo)
    # A backup killed while it reads leaves the VM running (with disks in an iothread,
    # QEMU 7.2 aborts if the reader's connections close before the exports go).
    killed = run_cli(home, "backup", "create", vm.name, "--repo", str(repo), "--consistency", "filesystem",
                     env={"FREEZEFRAME_FAULT": "mid-read:1"})
    assert killed.returncode == -9, killed.stderr
    assert vm_running(vm)
    # The sentinel takes the backup's view out of the VM: no export, no fleecing node left.
    deadline = time.monotonic() + 30
    while (left := view_left(vm)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"the killed backup's view is still in the VM: {left}"
    record = backup(home, vm, repo, "--consistency", "filesystem")
    assert vm_running(vm)
    assert record["consistency"] == "filesystem"
    assert len(record["disks"]) == 2
    images = restore(home, record["id"], tmp_path / "restored")
    raws = [images[disk["device"]] for disk in record["disks"]]
    for raw in raws:
        assert not ext4_needs_recovery(raw)
        assert e2fsck_clean(raw)
    assert_in_step(sequence(raws[0]), sequence(raws[1]))


def test_qemu_ids_are_valid_and_distinct() -> None:
    names = ["#block126", "#block127", "ffdata0", "drive-virtio-disk0", "x" * 40, "é-disk"]
    ids = [qemu_id("ff-commit", n) for n in names]
    assert len(set(ids)) == len(ids)
    for made in ids:
        assert len(made) <= 31
        assert made[0].isalpha()
        assert all((c.isalnum() and c.isascii()) or c in "-._" for c in made), made
    assert qemu_id("ff-commit", "ffdata0") == "ff-commit-ffdata0"  # a name that fits is kept readable


@pytest.mark.parametrize("laid_out", ["drive-backing-raw"], indirect=True)
def test_a_delete_killed_halfway_is_deleted_again(home: Home, laid_out: LabVM) -> None:
    vm = laid_out
    before = check_chains(vm)
    snap = cli_json(home, "snapshot", "create", vm.name, "--consistency", "filesystem")
    # QEMU stopped (SIGSTOP): the delete marks the record, then waits for QMP; killed there.
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        deleting = subprocess.Popen([sys.executable, "-m", "freezeframe", "snapshot", "delete", snap["id"]],
                                    env=dict(os.environ, FREEZEFRAME_HOME=str(home.root)),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while cli_json(home, "snapshot", "show", snap["id"])["state"] != "deleting":
                assert time.monotonic() < deadline, "the delete never marked the record"
                time.sleep(0.1)
        finally:
            deleting.kill()
            deleting.wait()
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    assert cli_json(home, "snapshot", "show", snap["id"])["state"] == "deleting"
    assert vm_running(vm)

    again = cli_json(home, "snapshot", "delete", snap["id"])
    assert again["state"] == "deleted"
    assert check_chains(vm) == before

    # A merge done already (by a delete killed after it, or by hand) leaves nothing to do.
    merged = cli_json(home, "snapshot", "create", vm.name, "--consistency", "filesystem")

    async def commit_by_hand() -> None:
        async with Monitor(vm.qmp_socket) as monitor:
            tops = {e["device"]: e["inserted"]["node-name"] for e in await monitor.execute("query-block")
                    if e.get("inserted")}
            for disk in merged["disks"]:  # the overlay above each copy, into the copy
                await monitor.execute("block-commit", {"job-id": "by-hand", "device": tops[disk["device"]],
                                                       "base-node": disk["node"]})
                await until(monitor, lambda jobs: any(j["ready"] for j in jobs))
                await monitor.execute("job-complete", {"id": "by-hand"})
                await until(monitor, lambda jobs: not jobs)

    asyncio.run(commit_by_hand())
    assert cli_json(home, "snapshot", "delete", merged["id"])["state"] == "deleted"
    assert check_chains(vm) == before
