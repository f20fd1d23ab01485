"""Real file systems for host-mode tests, made and mounted here and always taken down.

``data_fs`` builds an "outer" file system in an image file (XFS with reflinks, or btrfs)
that holds the "inner" image (ext4 or XFS), loop-mounts both, and yields the inner mount
point: the file system an application keeps its data on, and that a host snapshot freezes
and clones. Only file systems made here are ever frozen; cleanup thaws before unmounting.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FITHAW = 0xC0045878


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def thaw_quietly(mountpoint: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: it was not frozen
                raise
        finally:
            os.close(fd)


def unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        thaw_quietly(mountpoint)
        if subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True).returncode != 0:
            # Still busy (a test failed with a file open): detach it now; the kernel lets
            # go of it, and of its loop device, when the last user does.
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def mkfs(fstype: str, target: Path) -> None:
    if fstype == "ext4":
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(target))
    elif fstype == "xfs":
        sh("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(target))
    elif fstype == "btrfs":
        sh("mkfs.btrfs", "-q", "-f", str(target))
    else:
        raise ValueError(fstype)


@dataclass(frozen=True)
class DataFs:
    mountpoint: Path  # where the application's data goes
    image: Path  # the inner image file, behind the loop device
    outer: Path  # the outer mount point, holding the image and its clones


@contextlib.contextmanager
def data_fs(base: Path, *, inner: str = "ext4", outer: str = "xfs", size_mib: int = 512) -> Iterator[DataFs]:
    outer_img = base / f"outer-{outer}.img"
    base.mkdir(parents=True, exist_ok=True)
    outer_mnt = base / "outer"
    inner_mnt = base / "data"
    outer_mnt.mkdir(exist_ok=True)
    inner_mnt.mkdir(exist_ok=True)
    try:
        with open(outer_img, "wb") as handle:
            handle.truncate((size_mib * 3) << 20)
        mkfs(outer, outer_img)
        sh("mount", "-o", "loop", str(outer_img), str(outer_mnt))
        inner_img = outer_mnt / f"data-{inner}.img"
        with open(inner_img, "wb") as handle:
            handle.truncate(size_mib << 20)
        mkfs(inner, inner_img)
        sh("mount", "-o", "loop", str(inner_img), str(inner_mnt))
        yield DataFs(inner_mnt, inner_img, outer_mnt)
    finally:
        unmount(inner_mnt)
        unmount(outer_mnt)
        outer_img.unlink(missing_ok=True)


@contextlib.contextmanager
def btrfs_fs(base: Path, *, size_mib: int = 512) -> Iterator[Path]:
    """A btrfs file system in an image, loop-mounted: its top level is a subvolume root."""
    image = base / "btrfs.img"
    mnt = base / "btrfs"
    mnt.mkdir(exist_ok=True)
    try:
        with open(image, "wb") as handle:
            handle.truncate(size_mib << 20)
        mkfs("btrfs", image)
        sh("mount", "-o", "loop", str(image), str(mnt))
        yield mnt
    finally:
        # Snapshots inside it go with it.
        unmount(mnt)
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def mounted_copy(image: Path, where: Path) -> Iterator[Path]:
    """A read-write mount of a snapshot's image (as a restore would use it)."""
    where.mkdir(exist_ok=True)
    fstype = sh("blkid", "-o", "value", "-s", "TYPE", str(image)).strip()
    options = "loop" + (",nouuid" if fstype == "xfs" else "")
    sh("mount", "-o", options, str(image), str(where))
    try:
        yield where
    finally:
        unmount(where)
