"""Objective checks on snapshot images (DESIGN.md section 4), with the standard tools."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def export_raw(image: str, dest: Path) -> Path:
    """The disk content a snapshot image holds (its backing chain included), as a raw file."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", image, str(dest)], check=True,
                   capture_output=True)
    return dest


def ext4_features(raw: Path) -> set[str]:
    out = subprocess.run(["dumpe2fs", "-h", str(raw)], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Filesystem features:"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError(f"dumpe2fs printed no feature line for {raw}")


def ext4_needs_recovery(raw: Path) -> bool:
    return "needs_recovery" in ext4_features(raw)


def ext4_read(raw: Path, path: str) -> bytes:
    """A file's content from an unmounted ext4 image, without mounting it (no journal replay)."""
    done = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], check=True, capture_output=True)
    return done.stdout


def ext4_file_blocks(raw: Path, path: str) -> tuple[int, set[int]]:
    """The file system's block size and the byte offsets (in the image) of the blocks that
    hold a file's data."""
    stats = subprocess.run(["debugfs", "-R", "stats", str(raw)], check=True, capture_output=True, text=True).stdout
    found = re.search(r"^Block size:\s+(\d+)", stats, re.M)
    assert found, f"debugfs stats printed no block size for {raw}"
    size = int(found.group(1))
    blocks = subprocess.run(["debugfs", "-R", f"blocks {path}", str(raw)], check=True, capture_output=True,
                            text=True).stdout.split()
    return size, {int(b) * size for b in blocks}


def xfs_log_quiesced(raw: Path) -> bool:
    """True when replaying the XFS log would change nothing but the superblock.

    Linux does not write an unmount record when it freezes XFS (xfs_logprint says
    <DIRTY> either way); it pushes all metadata home and covers the log with a
    superblock-only transaction. So a frozen XFS's log holds only superblock buffers,
    while one caught mid-write holds inode, buffer or extent items to replay.
    """
    done = subprocess.run(["xfs_logprint", "-t", str(raw)], capture_output=True, text=True, check=False)
    text = done.stdout
    if "log tail:" not in text:
        raise AssertionError(f"xfs_logprint gave nothing to judge by: {(text + done.stderr)[:400]}")
    items = re.findall(r"^(\w+): cnt:", text, flags=re.MULTILINE)
    blocks = re.findall(r"start blkno:(0x[0-9a-f]+)", text)
    return all(kind == "BUF" for kind in items) and all(int(b, 16) == 0 for b in blocks)


def qemu_img_check(image: str) -> None:
    subprocess.run(["qemu-img", "check", "-U", "-q", image], check=True, capture_output=True)


def backing_chain(image: str) -> list[str]:
    import json

    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", image],
                         check=True, capture_output=True, text=True).stdout
    return [entry["filename"] for entry in json.loads(out)]


def sequence(raw: Path) -> list[int]:
    """The writer's sequence numbers on one disk image."""
    text = ext4_read(raw, "/workload.log").decode()
    return [int(line) for line in text.splitlines() if line.strip()]


def assert_in_step(first: list[int], second: list[int]) -> None:
    """Disk 0 holds 1, 3, 5...; disk 1 holds 2, 4, 6...; neither more than one write ahead."""
    assert first, "the writer's log on disk 0 is empty"
    assert first == list(range(1, 2 * len(first), 2)), "disk 0 lost or reordered writes"
    assert second == list(range(2, 2 * len(second) + 1, 2)), "disk 1 lost or reordered writes"
    last_first, last_second = first[-1], second[-1] if second else 0
    assert abs(last_first - last_second) == 1, f"disks out of step: {last_first} vs {last_second}"


@contextmanager
def host_mounts_watched() -> Iterator[list[str]]:
    """Samples /proc/mounts and the loop devices while the block runs; yields the lines
    that appeared (a mount line, or ``loop NAME BACKING`` for a loop device bound)."""
    before = _mounts_and_loops()
    appeared: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for line in _mounts_and_loops() - before:
                if line not in appeared:
                    appeared.append(line)
            stop.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield appeared
    finally:
        stop.set()
        watcher.join()


def guest_fs_mounts(lines: list[str]) -> list[str]:
    """Of what appeared: file system mounts a guest's disk could be, and loop devices."""
    return [line for line in lines if line.startswith("loop ")
            or line.split()[2] in ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat")]


def _mounts_and_loops() -> set[str]:
    found = set(Path("/proc/mounts").read_text().splitlines())
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            found.add(f"loop {backing.parent.parent.name} {backing.read_text().strip()}")
    return found
