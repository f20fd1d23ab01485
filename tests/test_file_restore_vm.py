"""Single files out of backups of real lab VMs: `backup files` and `backup extract` read
the guest's ext4, XFS, partitions and LVM volumes in the libguestfs sandbox, from the
backup served over NBD. Listings, bytes, modes and times equal what the guest had;
symbolic links out of the tree, device nodes and setuid bits are handled as the README
says; a damaged chunk fails only the file over it; and the host's /proc/mounts never
gains a guest file system meanwhile."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from backups import backup, cli_json, damage_chunk, guest, init_repo
from conftest import LabFactory, run_cli
from oracles import guest_fs_mounts, host_mounts_watched

from freezeframe.backup.repository import DiskIndex, Repository
from freezeframe.backup.store import open_store
from freezeframe.config import Home
from freezeframe.jobs.sandbox import FileSystem

pytestmark = pytest.mark.vm

BIG = 12 << 20
SEED = 7


def big_bytes() -> bytes:
    return random.Random(SEED).randbytes(BIG)


def make_tree(root: str) -> dict[str, Any]:
    """The shell that fills ``root``/tree in the guest (python3 writes big.bin, the same
    bytes ``big_bytes`` makes here); returns nothing, the guest's own view is read after."""
    return {"script": f"""
        set -e
        mkdir -p {root}/tree/sub
        python3 -c "import random; open('{root}/tree/big.bin', 'wb').write(random.Random({SEED}).randbytes({BIG}))"
        echo hello > {root}/tree/sub/small.txt
        chmod 640 {root}/tree/sub/small.txt
        touch -d '2020-01-02 03:04:05' {root}/tree/sub/small.txt
        ln -s ../big.bin {root}/tree/sub/inside-link
        ln -s /etc/passwd {root}/tree/outside-link
        ln -s ../../../../etc {root}/tree/climbing-link
        mknod {root}/tree/devnode c 1 3
        echo setuid > {root}/tree/setuid-file
        chmod 4755 {root}/tree/setuid-file
        sync
    """}


def guest_view(vm: Any, root: str) -> dict[str, dict[str, str]]:
    """Every entry of the tree as the guest sees it: type, size, mode, mtime, and the
    SHA-256 of regular files."""
    out = guest(vm, f"cd {root}/tree && for f in $(find . | sort); do "
                    "stat -c '%n|%F|%s|%a|%Y' \"$f\"; done; "
                    "find . -type f | sort | xargs sha256sum")
    view: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        if "|" in line:
            name, kind, size, mode, mtime = line.split("|")
            view[name.removeprefix("./")] = {"kind": kind, "size": size, "mode": mode, "mtime": mtime}
        elif line.strip():
            digest, name = line.split()
            view[name.removeprefix("./")]["sha256"] = digest
    return view


def check_extracted(out: Path, view: dict[str, dict[str, str]], report: dict[str, Any]) -> None:
    tree = out / "tree"
    assert (tree / "big.bin").read_bytes() == big_bytes()
    for name, entry in view.items():
        local = tree / name if name != "." else tree
        if entry["kind"] == "regular file":
            assert hashlib.sha256(local.read_bytes()).hexdigest() == entry["sha256"], name
            want = int(entry["mode"], 8) & 0o777
            assert stat.S_IMODE(local.stat().st_mode) == want, name
            assert int(local.stat().st_mtime) == int(entry["mtime"]), name
        elif entry["kind"] == "directory":
            assert local.is_dir(), name
    assert stat.S_IMODE((tree / "setuid-file").stat().st_mode) == 0o755, "the setuid bit was kept"
    assert stat.S_IMODE((tree / "sub" / "small.txt").stat().st_mode) == 0o640
    assert time.gmtime((tree / "sub" / "small.txt").stat().st_mtime)[:3] == (2020, 1, 2)
    assert os.readlink(tree / "sub" / "inside-link") == "../big.bin"
    for gone in ("outside-link", "climbing-link", "devnode"):
        assert not os.path.lexists(tree / gone), f"{gone} was created"
    skipped = {item["path"].rsplit("/", 1)[1]: item["why"] for item in report["skipped"]}
    assert set(skipped) == {"outside-link", "climbing-link", "devnode"}, skipped
    assert "out of the tree" in skipped["outside-link"]
    assert "char" in skipped["devnode"]


def files(home: Home, backup_id: str, path: str = "") -> list[dict[str, Any]]:
    data, done = cli_json(home, "backup", "files", backup_id, path)
    assert done.returncode == 0, done.stderr
    return list(data)


def test_files_and_extract_from_ext4_partitions_and_lvm_in_the_sandbox(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=2)
    guest(vm, make_tree("/mnt/ffdata0")["script"])
    # The second disk: a partition table, an ext4 partition, and an LVM volume group on
    # the second partition holding an ext4 logical volume.
    guest(vm, """
        set -e
        export DM_DISABLE_UDEV=1
        umount /mnt/ffdata1
        printf 'o\\nn\\np\\n1\\n\\n+100M\\nn\\np\\n2\\n\\n\\nw\\n' | fdisk /dev/vdb >/dev/null 2>&1 || true
        blockdev --rereadpt /dev/vdb
        test -b /dev/vdb1 && test -b /dev/vdb2
        /sbin/mke2fs -q -t ext4 /dev/vdb1
        lvm pvcreate -ff -y /dev/vdb2 >/dev/null
        lvm vgcreate vgff /dev/vdb2 >/dev/null
        lvm lvcreate -y -L 64m -n data vgff >/dev/null
        /sbin/mke2fs -q -t ext4 /dev/vgff/data
        mkdir -p /mnt/part /mnt/lv
        mount /dev/vdb1 /mnt/part && mount /dev/vgff/data /mnt/lv
        echo on-the-partition > /mnt/part/p.txt
        echo on-the-volume > /mnt/lv/v.txt
        sync
    """)
    view = guest_view(vm, "/mnt/ffdata0")
    made = backup(home, vm, repo)
    first, second = (d["device"] for d in made["disks"])  # as the backup names the disks

    with host_mounts_watched() as appeared:
        top = {e["name"]: e["fstype"] for e in files(home, made["id"])}
        assert {n: top.get(n) for n in (first, f"{second}p1", "lvm-vgff-data")} == {
            first: "ext4", f"{second}p1": "ext4", "lvm-vgff-data": "ext4"}, top

        out = tmp_path / "out"
        report, done = cli_json(home, "backup", "extract", made["id"], f"{first}/tree", f"{second}p1/p.txt",
                                "lvm-vgff-data/v.txt", "--to", str(out))
        assert done.returncode == 0, done.stderr
        check_extracted(out, view, report)
        assert (out / "p.txt").read_text() == "on-the-partition\n"
        assert (out / "v.txt").read_text() == "on-the-volume\n"

        # backup test checks each file system in the same sandbox: disk, partition, volume.
        tested, done = cli_json(home, "backup", "test", made["id"], "--scratch", str(tmp_path / "scratch"))
        assert done.returncode == 0, tested
        checked = {(c["what"], c["where"]) for c in tested["checks"] if c["passed"]}
        assert {(what, where) for what in ("journal clean", "e2fsck -fn")
                for where in (first, f"{second}p1", "lvm-vgff-data")} <= checked, tested

        # A chunk that holds only big.bin's bytes, damaged: that file fails, named; the
        # others are still extracted; the exit code says damage.
        opened = Repository.open(open_store(str(repo)))
        big = big_bytes()
        index = opened.index(opened.manifest(made["id"])["disks"][0]["index"])
        victim = next(c for i, c in enumerate(index.chunks)
                      if c is not None and opened.get_chunk(c, index.chunk_length(i)) in big)
        damage_chunk(repo / "chunks" / victim[:2] / victim)
        damaged = tmp_path / "damaged"
        report, done = cli_json(home, "backup", "extract", made["id"], f"{first}/tree", "--to", str(damaged))
        assert done.returncode == 11, done.stderr
        assert "tree/big.bin" in done.stderr
        assert [f["path"] for f in report["failed"]] == [f"{first}/tree/big.bin"]
        assert (damaged / "tree" / "sub" / "small.txt").read_text() == "hello\n"
        assert not (damaged / "tree" / "big.bin").exists(), "a file that failed was left half-written"
    assert guest_fs_mounts(appeared) == [], f"the host mounted a guest file system: {appeared}"


def test_files_and_extract_from_xfs(home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1, fs="xfs")
    guest(vm, make_tree("/mnt/ffdata0")["script"])
    view = guest_view(vm, "/mnt/ffdata0")
    made = backup(home, vm, repo)
    [device] = (d["device"] for d in made["disks"])
    with host_mounts_watched() as appeared:
        listed = {e["name"]: e for e in files(home, made["id"], f"{device}/tree")}
        assert set(listed) == {n for n in view if "/" not in n and n != "."}
        for name, entry in listed.items():
            assert str(entry["size"]) == view[name]["size"] or entry["type"] == "dir", name
            assert entry["mode"].lstrip("0") == view[name]["mode"], name
            assert int(entry["mtime"]) == int(view[name]["mtime"]), name
        assert listed["outside-link"]["target"] == "/etc/passwd"
        assert listed["devnode"]["type"] == "char"
        out = tmp_path / "out"
        report, done = cli_json(home, "backup", "extract", made["id"], f"{device}/tree", "--to", str(out))
        assert done.returncode == 0, done.stderr
        check_extracted(out, view, report)
        assert report["files"] == 3

        # backup mount: a read-only tree through FUSE until backup unmount.
        where = tmp_path / "mnt"
        where.mkdir()
        shown, done = cli_json(home, "backup", "mount", made["id"], str(where))
        assert done.returncode == 0, done.stderr
        try:
            tree = where / device / "tree"
            assert sorted(p.name for p in tree.iterdir()) == sorted(n for n in view if "/" not in n and n != ".")
            assert (tree / "big.bin").read_bytes() == big_bytes()
            assert os.readlink(tree / "outside-link") == "/etc/passwd"
            with pytest.raises(OSError, match="Read-only file system"):
                (tree / "new-file").write_text("no")
            mounted = [line for line in Path("/proc/mounts").read_text().splitlines() if f" {where} " in line]
            assert len(mounted) == 1
            assert mounted[0].split()[2].startswith("fuse"), mounted
        finally:
            gone = run_cli(home, "backup", "unmount", str(where))
        assert gone.returncode == 0, gone.stderr
        assert f" {where} " not in Path("/proc/mounts").read_text()
        assert not Path(f"/proc/{shown['pid']}").exists(), "the mount's process outlived the unmount"
    assert guest_fs_mounts(appeared) == [], f"the host mounted a guest file system: {appeared}"


def _disk_backup(repo_dir: Path, home: Home, images: dict[str, Path]) -> str:
    """A backup of these raw images as disks (by device name), written through the
    repository as a backup would: zero chunks are holes."""
    assert run_cli(home, "repo", "init", str(repo_dir), "--chunk-size", "1024").returncode == 0
    repo = Repository.open(open_store(str(repo_dir)))
    backup_id = f"images-{os.urandom(4).hex()}"
    disks = []
    for number, (device, image) in enumerate(images.items()):
        data = image.read_bytes()
        chunk = 1 << 20
        ids = [None if not data[o:o + chunk].strip(b"\0") else repo.put_chunk(data[o:o + chunk])[0]
               for o in range(0, len(data), chunk)]
        name = repo.put_index(DiskIndex(backup=backup_id, device=device, virtual_size=len(data), chunk_size=chunk,
                                        chunks=ids), number)
        disks.append({"device": device, "virtual_size": len(data), "index": name})
    repo.put_manifest(backup_id, {"id": backup_id, "instance": "synthetic", "disks": disks})
    return backup_id


def test_btrfs_is_read_and_an_encrypted_volume_or_unknown_data_is_named(home: Home, tmp_path: Path) -> None:
    """Disks made on the host without mounting anything: a btrfs filled by mkfs.btrfs
    --rootdir, a LUKS2 volume, and random bytes. The sandbox finds each by itself; btrfs
    files come out; the others are named for what they are."""
    content = tmp_path / "content"
    (content / "dir").mkdir(parents=True)
    (content / "dir" / "hello.txt").write_text("from btrfs\n")
    (content / "dir" / "big.bin").write_bytes(big_bytes()[: 3 << 20])
    images = {"vdb": tmp_path / "btrfs.img", "vdc": tmp_path / "luks.img", "vdd": tmp_path / "junk.img"}
    with open(images["vdb"], "wb") as f:
        f.truncate(160 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "--rootdir", str(content), str(images["vdb"])], check=True,
                   capture_output=True)
    with open(images["vdc"], "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", "-", str(images["vdc"])], input=b"secret",
                   check=True, capture_output=True)
    images["vdd"].write_bytes(random.Random(SEED).randbytes(8 << 20))
    repo = tmp_path / "repo"
    backup_id = _disk_backup(repo, home, images)

    with host_mounts_watched() as appeared:
        listed, done = cli_json(home, "backup", "files", backup_id, "--repo", str(repo))
        assert done.returncode == 0, done.stderr
        assert {e["name"]: e["fstype"] for e in listed} == {"vdb": "btrfs", "vdc": "crypto_LUKS", "vdd": "unknown"}
        out = tmp_path / "out"
        report, done = cli_json(home, "backup", "extract", backup_id, "vdb/dir", "--to", str(out), "--repo",
                                str(repo))
        assert done.returncode == 0, done.stderr
        assert (out / "dir" / "hello.txt").read_text() == "from btrfs\n"
        assert (out / "dir" / "big.bin").read_bytes() == big_bytes()[: 3 << 20]
        assert report["files"] == 2
    assert guest_fs_mounts(appeared) == [], f"the host mounted a guest file system: {appeared}"
    # What a listing into them says (the same FileSystem the sandbox built from its finding).
    assert "encrypted volume (crypto_LUKS)" in FileSystem("vdc", "/dev/sdb", "crypto_LUKS", "vdc").why_not()
    assert "cannot read (unknown)" in FileSystem("vdd", "/dev/sdc", "unknown", "vdd").why_not()
