"""This Linux host as a snapshot target: chosen mount points, copied together.

Every copy is taken in constant time, whatever the size; a mount that cannot be copied
that way is refused at preflight, never copied byte by byte inside the freeze window.

Providers, chosen per mount point:

``reflink``  a file system on a loop-mounted image file, where the image's own file system
             shares extents (XFS with reflink, btrfs): freeze it (FIFREEZE), clone the
             image file (FICLONE: metadata only), thaw. The clone is an image that can be
             loop-mounted.
``btrfs``    a btrfs subvolume: ``btrfs subvolume snapshot -r``, which is itself a
             consistent point of the file system. btrfs is *not* frozen first: the
             snapshot commits a transaction, which would block on a frozen file system.
``lvm``      a logical volume: ``lvcreate --snapshot`` (copy-on-write). Not frozen first
             either: device-mapper freezes the file system itself while it suspends the
             volume, and would fail (EBUSY) on one we had frozen. The copy is a block device.

Safety: a mount is refused if it is ``/`` or holds a protected path (the catalog, the
project), since freezing that would hang this very process; and a loop image whose backing
file lives on another chosen mount is refused, since freezing both would deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.errors import HypervisorError, InvalidInput
from freezeframe.model import SnapshotDisk
from freezeframe.targets.base import FreezeProbe

# From <linux/fs.h>.
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
FICLONE = 0x40049409

REFLINK_FILESYSTEMS = ("xfs", "btrfs")
SUBVOLUME_ROOT_INODE = 256  # btrfs gives every subvolume root this inode number


@dataclass(frozen=True, slots=True)
class MountInfo:
    mountpoint: str
    fstype: str
    source: str
    device: int  # st_dev of the mounted file system


def mount_table() -> list[MountInfo]:
    """Mounts from /proc/self/mountinfo, in mount order."""
    table = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        major, minor = (int(n) for n in fields[2].split(":"))
        fstype, source = right.split()[:2]
        mountpoint = _unescape(fields[4])
        table.append(MountInfo(mountpoint, fstype, source, os.makedev(major, minor)))
    return table


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo octal; the rest is as is."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: str, table: list[MountInfo]) -> MountInfo | None:
    """The mount whose mount point is exactly ``path`` (the last one mounted there)."""
    matches = [m for m in table if m.mountpoint == path]
    return matches[-1] if matches else None


def fs_type_of(path: Path, table: list[MountInfo]) -> str:
    device = path.stat().st_dev
    types = [m.fstype for m in table if m.device == device]
    return types[-1] if types else "unknown"


@dataclass(frozen=True, slots=True)
class LogicalVolume:
    vg: str
    lv: str
    size: int


@dataclass(slots=True)
class _Plan:
    mount: MountInfo
    provider: str
    backing: str | None = None  # reflink: the image file behind the loop device
    volume: LogicalVolume | None = None  # lvm
    dest: str | None = None
    cow_size: int = 0


class HostTarget:
    kind = "host"
    #: The probe may thaw a file system left frozen that prepare then writes to.
    prepare_with_probe = False

    def __init__(self, *, mounts: Sequence[str], protect: Sequence[Path] = ()) -> None:
        self.mounts = [os.path.normpath(m) for m in mounts]
        self.protect = [Path("/"), *protect]
        self._plans: list[_Plan] = []
        self._frozen: list[str] = []
        self._held_btrfs = 0

    async def connect(self) -> None:
        self._plans = [self.plan_for(m) for m in self.mounts]
        backing_devices = {Path(p.backing).stat().st_dev: p.backing for p in self._plans if p.backing}
        for plan in self._plans:
            if plan.mount.device in backing_devices:
                raise InvalidInput(
                    f"{plan.mount.mountpoint} holds {backing_devices[plan.mount.device]}, the image behind "
                    "another chosen mount: freezing both would deadlock",
                    hint="choose the inner file system only",
                )

    def plan_for(self, mountpoint: str) -> _Plan:
        table = mount_table()
        mount = mount_of(mountpoint, table)
        if mount is None:
            raise InvalidInput(f"{mountpoint} is not a mount point",
                               hint="give the directory a file system is mounted on")
        protected = {p.stat().st_dev: p for p in self.protect if p.exists()}
        if mount.mountpoint == "/" or mount.device in protected:
            raise InvalidInput(
                f"refusing to snapshot {mountpoint}: it holds {protected.get(mount.device, '/')}, and freezing it "
                "would hang this process",
                hint="snapshot file systems that hold only application data",
            )
        if mount.fstype == "btrfs":
            if os.stat(mountpoint).st_ino != SUBVOLUME_ROOT_INODE:
                raise InvalidInput(f"{mountpoint} is btrfs but not the root of a subvolume")
            return _Plan(mount, "btrfs")
        dm = Path(f"/sys/dev/block/{os.major(mount.device)}:{os.minor(mount.device)}/dm")
        if dm.exists():  # a device-mapper device, whatever path it was mounted by
            volume = logical_volume(mount.source)
            if volume is not None:
                return _Plan(mount, "lvm", volume=volume)
        loop = Path(mount.source).name
        backing_file = Path(f"/sys/block/{loop}/loop/backing_file")
        if mount.source.startswith("/dev/loop") and backing_file.exists():
            backing = backing_file.read_text().strip()
            outer = fs_type_of(Path(backing), table)
            if outer in REFLINK_FILESYSTEMS:
                return _Plan(mount, "reflink", backing=backing)
            reason = f"its image {backing} is on {outer}, which cannot clone files"
        else:
            reason = f"{mount.fstype} on {mount.source}"
        raise InvalidInput(
            f"no constant-time snapshot provider for {mountpoint} ({reason})",
            hint="supported: btrfs subvolumes, LVM logical volumes, and file systems on loop-mounted images "
                 "kept on XFS or btrfs (reflinks); a byte-by-byte copy inside the freeze window is never made",
        )

    async def close(self) -> None:
        # Anything still frozen here is a bug upstream; never leave it so.
        if self._frozen:
            await self.thaw(10)

    async def probe_freeze(self, *, agent_timeout: float, command_timeout: float,
                           deadman_s: float | None = None) -> FreezeProbe:
        probe = FreezeProbe()
        for plan in self._plans:
            if plan.provider == "reflink" and await asyncio.to_thread(fs_ioctl, plan.mount.mountpoint, FITHAW):
                probe.events.append(f"{plan.mount.mountpoint} was found frozen before the snapshot "
                                    "(a previous run died?); thawed it")
        probe.details["filesystems"] = [
            {"mountpoint": p.mount.mountpoint, "type": p.mount.fstype, "source": p.mount.source,
             "provider": p.provider, **({"backing": p.backing} if p.backing else {})}
            for p in self._plans
        ]
        for plan in self._plans:
            if plan.provider == "reflink" and plan.backing:
                error = await asyncio.to_thread(_reflink_works, Path(plan.backing).parent)
                if error:
                    raise InvalidInput(f"cannot clone {plan.backing} in constant time: {error}",
                                       hint="the image's file system needs reflink support (mkfs.xfs -m reflink=1)")
        return probe

    async def prepare(self, snapshot_id: str) -> None:
        tag = snapshot_id.replace("-", "")[:8]
        for plan in self._plans:
            if plan.provider == "reflink":
                assert plan.backing is not None
                backing = Path(plan.backing)
                plan.dest = str(backing.with_name(f"{backing.stem}.ff-{tag}{backing.suffix or '.img'}"))
            elif plan.provider == "lvm":
                assert plan.volume is not None
                plan.cow_size = await _cow_size(plan.volume)
                plan.dest = f"/dev/{plan.volume.vg}/ff-{tag}"
            else:
                directory = Path(plan.mount.mountpoint) / ".freezeframe-snapshots"
                directory.mkdir(exist_ok=True)
                plan.dest = str(directory / tag)
            if os.path.exists(plan.dest):
                raise HypervisorError(f"{plan.dest} exists already")

    async def freeze(self, timeout: float) -> int:
        """Freeze the reflink mounts. Returns how many file systems are now held consistent
        for the snapshot: those frozen, and btrfs subvolumes, which their own snapshot makes
        consistent (so they are counted without being frozen)."""
        self._held_btrfs = sum(p.provider in ("btrfs", "lvm") for p in self._plans)
        for plan in self._plans:
            if plan.provider != "reflink":
                continue
            try:
                await asyncio.wait_for(asyncio.to_thread(fs_ioctl, plan.mount.mountpoint, FIFREEZE), timeout)
            except (OSError, TimeoutError) as err:
                raise HypervisorError(f"cannot freeze {plan.mount.mountpoint}: {err}") from err
            self._frozen.append(plan.mount.mountpoint)
        return len(self._frozen) + self._held_btrfs

    async def thaw(self, timeout: float) -> int:
        thawed, self._held_btrfs = self._held_btrfs, 0
        errors = []
        for mountpoint in reversed(list(self._frozen)):
            try:
                if await asyncio.wait_for(asyncio.to_thread(fs_ioctl, mountpoint, FITHAW), timeout):
                    thawed += 1
                self._frozen.remove(mountpoint)
            except (OSError, TimeoutError) as err:
                errors.append(f"{mountpoint}: {err}")
        if errors:
            raise HypervisorError(f"cannot thaw {'; '.join(errors)}")
        return thawed

    async def is_frozen(self, timeout: float) -> bool:
        # Linux has no "is this frozen" query; what we froze and did not thaw is what is frozen.
        return bool(self._frozen)

    async def snapshot(self) -> list[SnapshotDisk]:
        disks = []
        for plan in self._plans:
            assert plan.dest is not None
            if plan.provider == "reflink":
                assert plan.backing is not None
                await asyncio.to_thread(_clone, plan.backing, plan.dest)
                st = os.stat(plan.dest)
                disks.append(SnapshotDisk(device=plan.mount.mountpoint, node="reflink", image=plan.dest,
                                          virtual_size=st.st_size, allocated_size=st.st_blocks * 512))
            elif plan.provider == "lvm":
                assert plan.volume is not None
                await _run(["lvm", "lvcreate", "--snapshot", "--name", Path(plan.dest).name,
                            "--size", f"{plan.cow_size}b", f"{plan.volume.vg}/{plan.volume.lv}"],
                           f"snapshot {plan.volume.vg}/{plan.volume.lv}")
                disks.append(SnapshotDisk(device=plan.mount.mountpoint, node="lvm", image=plan.dest,
                                          virtual_size=plan.volume.size, allocated_size=plan.cow_size))
            else:
                await _run(["btrfs", "subvolume", "snapshot", "-r", plan.mount.mountpoint, plan.dest],
                           f"snapshot {plan.mount.mountpoint}")
                vfs = os.statvfs(plan.dest)
                disks.append(SnapshotDisk(device=plan.mount.mountpoint, node="btrfs", image=None, path=plan.dest,
                                          virtual_size=vfs.f_blocks * vfs.f_frsize,
                                          allocated_size=(vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize))
        return disks

    async def inner_writers(self) -> dict[str, Any] | None:
        return None  # on a host, every writer runs in freezeframe itself

    async def remove(self, disks: list[SnapshotDisk], moved: Callable[[str, str], None]) -> None:
        # Host copies are volumes, files or subvolumes of their own: removing one moves none.
        for disk in disks:
            if disk.node == "lvm" and disk.image:
                if os.path.exists(disk.image):
                    volume = Path(disk.image)
                    await _run(["lvm", "lvremove", "-f", f"{volume.parent.name}/{volume.name}"],
                               f"remove {disk.image}")
            elif disk.image:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(disk.image)
            elif disk.path and os.path.exists(disk.path):
                await _run(["btrfs", "subvolume", "delete", disk.path], f"delete {disk.path}")


def logical_volume(device: str) -> LogicalVolume | None:
    """The LVM logical volume behind ``device``, or None if it is not one (or LVM is absent)."""
    try:
        done = subprocess.run(["lvm", "lvs", "--noheadings", "--separator", ",", "--units", "b", "--nosuffix",
                               "-o", "vg_name,lv_name,lv_size", device], capture_output=True, text=True,
                              check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = done.stdout.strip().split(",")
    if done.returncode != 0 or len(fields) != 3:
        return None
    return LogicalVolume(fields[0].strip(), fields[1].strip(), int(fields[2]))


async def _cow_size(volume: LogicalVolume) -> int:
    """Room for the copy-on-write of a snapshot: a fifth of the volume (at least 32 MiB),
    which must be free in its volume group."""
    wanted = max(volume.size // 5, 32 << 20) // (1 << 20) * (1 << 20)
    process = await asyncio.create_subprocess_exec(
        "lvm", "vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", volume.vg,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = await process.communicate()
    free = int(out.decode().strip() or 0) if process.returncode == 0 else 0
    if free < wanted:
        raise InvalidInput(
            f"volume group {volume.vg} has {free >> 20} MiB free; a snapshot of {volume.vg}/{volume.lv} "
            f"needs {wanted >> 20} MiB for its changes",
            hint=f"extend {volume.vg} (vgextend) or free some space",
        )
    return wanted


def fs_ioctl(path: str, request: int) -> bool:
    """Run a freeze or thaw ioctl on a mount point. Returns False when the file system was
    already in the asked state (EBUSY for freeze, EINVAL for thaw)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
        return True
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EBUSY):
            return False
        raise
    finally:
        os.close(fd)


def _clone(source: str, dest: str) -> None:
    src = os.open(source, os.O_RDONLY)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(out, FICLONE, src)
        except OSError as err:
            os.close(out)
            os.unlink(dest)
            raise HypervisorError(f"cannot clone {source}: {err.strerror}") from err
        os.close(out)
    finally:
        os.close(src)


def _reflink_works(directory: Path) -> str | None:
    """Clone a small file in ``directory``; None if that works, else why not."""
    probe = directory / f".freezeframe-reflink-probe-{os.getpid()}"
    copy = probe.with_suffix(".copy")
    try:
        probe.write_bytes(b"x" * 4096)
        try:
            _clone(str(probe), str(copy))
        except HypervisorError as err:
            return str(err)
        return None
    except OSError as err:
        return err.strerror
    finally:
        probe.unlink(missing_ok=True)
        copy.unlink(missing_ok=True)


async def _run(argv: list[str], what: str) -> None:
    try:
        process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as err:
        raise HypervisorError(f"cannot run {argv[0]} to {what}: {err.strerror}") from err
    _, err_out = await process.communicate()
    if process.returncode != 0:
        raise HypervisorError(f"{what} failed: {err_out.decode().strip()}")


def mount_copies(disks: Sequence[SnapshotDisk], directory: Path) -> list[tuple[str, str]]:
    """Mount a host snapshot's copies read-only under ``directory`` (the copy itself when
    there is one, else one sub-directory per mount point). Returns (mount point, where)."""
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory", hint="create it first")
    if any(m.mountpoint == str(directory) for m in mount_table()):
        raise InvalidInput(f"something is mounted on {directory} already")
    done: list[tuple[str, str]] = []
    try:
        for disk in disks:
            where = directory if len(disks) == 1 else directory / disk.device.strip("/").replace("/", "_")
            where.mkdir(exist_ok=True)
            if disk.image:
                fstype = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", disk.image], capture_output=True,
                                        text=True, check=False).stdout.strip()
                # A copy of XFS has its original's UUID, which XFS refuses twice unless told.
                device = stat.S_ISBLK(os.stat(disk.image).st_mode)
                options = ("ro" if device else "ro,loop") + (",nouuid" if fstype == "xfs" else "")
                _mount(["mount", "-o", options, disk.image, str(where)])
            elif disk.path:
                _mount(["mount", "--bind", disk.path, str(where)])
                _mount(["mount", "-o", "remount,bind,ro", str(where)])
            else:
                raise InvalidInput(f"the copy of {disk.device} is neither an image nor a directory")
            done.append((disk.device, str(where)))
    except BaseException:
        for _, where_mounted in reversed(done):
            subprocess.run(["umount", where_mounted], capture_output=True, check=False)
        raise
    return done


def unmount_copies(directory: Path) -> list[str]:
    """Unmount everything mounted at or under ``directory`` (deepest first)."""
    target = os.path.normpath(str(directory.absolute()))
    mounted = [m.mountpoint for m in mount_table()
               if m.mountpoint == target or m.mountpoint.startswith(target + "/")]
    if not mounted:
        raise InvalidInput(f"nothing is mounted at {target}")
    for mountpoint in sorted(set(mounted), key=len, reverse=True):
        _mount(["umount", mountpoint])
    return mounted


def _mount(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HypervisorError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
