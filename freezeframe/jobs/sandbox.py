"""The sandbox where a guest's file systems are parsed: a libguestfs appliance VM, never
the host kernel.

A file system image is data the guest controls, and a crafted ext4, XFS or btrfs image is
an attack on whichever kernel mounts it. So freezeframe never mounts one on the host:
the backup's disks are served over NBD (``jobs/serve.py``), or restored to scratch
images for a restore test, and attached read-only to a small appliance VM (libguestfs,
from Debian), whose kernel finds the partitions, the LVM volumes and the file systems,
and mounts them read-only without replaying anything: ext4 with ``noload`` and XFS with
``norecovery,nouuid`` (a backup's copy has the original's UUID). The checkers a restore
test runs (``e2fsck``, ``xfs_repair``, ``xfs_logprint``) run in the appliance too. What
the appliance writes (a journal replayed as a boot would) goes to a throw-away overlay.
The guest's volume groups exist only inside the appliance.

What is found is named for the user by the guest's device: a whole-disk file system by
the disk (``vdb``), a partition by the disk and its number (``vdb1``; ``ffdata0p1`` when
the disk's name ends in a digit), a logical volume as ``lvm-VG-LV``. Inside the appliance
each is mounted at ``/NAME``.

KVM is used where it works; where ``/dev/kvm`` exists but does not run a guest (it spins,
as on these test machines), the appliance runs under TCG (``FREEZEFRAME_SANDBOX_ACCEL``
forces one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.errors import FreezeframeError, NotFound

log = logging.getLogger(__name__)

#: File systems the sandbox mounts, with the options that keep the copy untouched.
MOUNT_OPTIONS = {
    "ext2": "ro", "ext3": "ro,noload", "ext4": "ro,noload", "xfs": "ro,norecovery,nouuid",
    "btrfs": "ro,rescue=nologreplay", "vfat": "ro", "ntfs": "ro",
}
ENCRYPTED = {"crypto_LUKS", "BitLocker"}


class SandboxError(FreezeframeError):
    exit_code = 10


@dataclass(frozen=True, slots=True)
class FileSystem:
    name: str        # as the user names it: vdb, vdb1, lvm-vg-lv
    device: str      # inside the appliance: /dev/sda1, /dev/vg/lv
    fstype: str      # as blkid says: ext4, xfs, crypto_LUKS, unknown, ...
    disk: str        # the backup's disk it lives on ("" for a logical volume)

    @property
    def mountable(self) -> bool:
        return self.fstype in MOUNT_OPTIONS

    def why_not(self) -> str:
        if self.fstype in ENCRYPTED:
            return (f"{self.name} is an encrypted volume ({self.fstype}): freezeframe does not open guest "
                    "encryption; restore the disk and open it where its key is")
        if self.fstype in ("swap", "LVM2_member"):
            return f"{self.name} holds {self.fstype}, not files"
        return f"{self.name} holds a file system freezeframe cannot read ({self.fstype or 'none found'})"


def accel() -> str:
    """``kvm`` or ``tcg`` for the appliance: KVM only when it boots a kernel here (probed
    once per host boot with the host's own kernel, a few seconds)."""
    forced = os.environ.get("FREEZEFRAME_SANDBOX_ACCEL", "auto")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    cache = Path("/run/freezeframe-sandbox-accel.json")
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["boot_id"] == boot_id:
            return str(cached["accel"])
    chosen = "kvm" if _kvm_boots() else "tcg"
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"boot_id": boot_id, "accel": chosen}))
    log.info("the sandbox appliance runs under %s", chosen)
    return chosen


def _kvm_boots(timeout: float = 15.0) -> bool:
    """Whether a kernel gets as far as printing under KVM (a spinning guest prints nothing)."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        return False
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "max", "-m", "256", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", "stdio", "-kernel", str(kernels[-1]), "-append", "console=ttyS0 panic=-1"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as qemu:
        assert qemu.stdout is not None
        os.set_blocking(qemu.stdout.fileno(), False)
        seen = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and qemu.poll() is None:
                with contextlib.suppress(BlockingIOError, TypeError):
                    seen += qemu.stdout.read(65536) or b""
                if b"Linux version" in seen:
                    return True
                time.sleep(0.1)
            return b"Linux version" in seen
        finally:
            qemu.kill()


class Sandbox:
    """A running appliance with a backup's disks attached read-only (from NBD exports)."""

    def __init__(self, handle: Any, disks: list[str]) -> None:
        self.g = handle
        self.disks = disks
        self.filesystems: dict[str, FileSystem] = {}
        self._mounted: set[str] = set()

    # -- what is there ----------------------------------------------------------------------

    def discover(self) -> dict[str, FileSystem]:
        """Every file system, partition and logical volume the appliance finds."""
        by_letter = {f"/dev/sd{chr(ord('a') + i)}": disk for i, disk in enumerate(self.disks)}
        found: dict[str, FileSystem] = {}
        listed = dict(self.g.list_filesystems())
        # libguestfs lists no encrypted volume (it is no file system until opened): name
        # them too, so that a user learns why the files on them are not there.
        for device in [*self.g.list_devices(), *self.g.list_partitions()]:
            if device not in listed:
                with contextlib.suppress(RuntimeError):
                    kind = self.g.vfs_type(device)
                    if kind in ENCRYPTED:
                        listed[device] = kind
        for device, fstype in listed.items():
            name = _name_of(device, by_letter)
            if name is None:
                continue
            disk = by_letter.get(re.sub(r"\d+$", "", device), "")
            found[name] = FileSystem(name=name, device=device, fstype=fstype or "unknown", disk=disk)
        self.filesystems = found
        return found

    def run(self, argv: list[str]) -> tuple[int, str]:
        """A tool of the appliance (``e2fsck``, ``xfs_repair``, ...) run there: its exit
        status and what it printed (the end of it). Through libguestfs's ``debug sh``: the
        appliance's own tools, where the stable API has no call for the check wanted."""
        script = " ".join(shlex.quote(a) for a in argv) + ' 2>&1; echo "freezeframe-exit=$?"'
        try:
            out = str(self.g.debug("sh", [script]))
        except RuntimeError as err:
            raise SandboxError(f"{argv[0]} did not run in the sandbox: {err}") from None
        text, _, status = out.rstrip().rpartition("freezeframe-exit=")
        if not status.isdigit():
            raise SandboxError(f"{argv[0]} in the sandbox gave no exit status: {out[-300:]}")
        return int(status), text[-4000:]

    def replay(self, name: str) -> None:
        """Replay file system ``name``'s journal or log in the appliance, as a boot would
        (a read-write mount and unmount; the writes land in the overlay)."""
        fs = self.filesystems[name]
        if name in self._mounted:
            raise SandboxError(f"{name} is mounted already: replay it first")
        where = f"/.replay-{name}"
        self.g.mkmountpoint(where)
        try:
            self.g.mount_options("nouuid" if fs.fstype == "xfs" else "", fs.device, where)
            self.g.umount(where)
        except RuntimeError as err:
            raise SandboxError(f"{name} ({fs.fstype}) does not mount to replay its journal: {err}") from None
        finally:
            with contextlib.suppress(RuntimeError):
                self.g.rmmountpoint(where)

    def mount(self, name: str) -> str:
        """Mount file system ``name`` read-only at /NAME in the appliance; its path there."""
        fs = self.filesystems.get(name)
        if fs is None:
            raise NotFound(f"the backup has no file system {name!r}",
                           hint=f"it has: {', '.join(sorted(self.filesystems)) or 'none'}")
        where = f"/{name}"
        if name in self._mounted:
            return where
        if not fs.mountable:
            raise SandboxError(fs.why_not())
        self.g.mkmountpoint(where)
        try:
            self.g.mount_options(MOUNT_OPTIONS[fs.fstype], fs.device, where)
        except RuntimeError as err:
            raise SandboxError(f"{name} ({fs.fstype}) does not mount read-only in the sandbox: {err}") from None
        self._mounted.add(name)
        log.info("mounted %s (%s, %s) read-only in the sandbox", name, fs.device, fs.fstype)
        return where

    def mount_all(self) -> dict[str, str]:
        """Every file system that mounts, each at /NAME: name -> where, of those that did."""
        done = {}
        for name, fs in sorted(self.filesystems.items()):
            if not fs.mountable:
                log.info("not mounting %s: %s", name, fs.why_not())
                continue
            try:
                done[name] = self.mount(name)
            except SandboxError as err:
                log.warning("%s", err)
        return done

    def export(self, mountpoint: Path) -> None:
        """Show the mounted file systems read-only at ``mountpoint`` on this host (FUSE: the
        host kernel relays calls to the appliance, it parses nothing), until unmounted
        (``guestunmount``); blocks meanwhile."""
        try:
            self.g.mount_local(str(mountpoint), readonly=True, cachetimeout=60)
        except RuntimeError as err:
            raise SandboxError(f"cannot show the backup at {mountpoint}: {err}",
                               hint="is the directory empty, and FUSE (/dev/fuse) available?") from None
        log.info("backup shown at %s until unmounted", mountpoint)
        self.g.mount_local_run()


def _name_of(device: str, by_letter: dict[str, str]) -> str | None:
    """The user's name of an appliance device: vdb, vdb1, lvm-vg-lv."""
    whole = re.fullmatch(r"(/dev/sd[a-z]+)(\d*)", device)
    if whole:
        disk = by_letter.get(whole.group(1))
        if disk is None:
            return None
        # ffdata0 partition 1 is ffdata0p1 (as Linux names nvme0n1p1), vdb's is vdb1.
        return disk + ("p" if whole.group(2) and disk[-1:].isdigit() else "") + whole.group(2)
    lv = re.fullmatch(r"/dev/([^/]+)/([^/]+)", device)
    if lv and lv.group(1) not in ("mapper", "disk"):
        return f"lvm-{lv.group(1)}-{lv.group(2)}"
    return None


@contextlib.contextmanager
def sandbox(socket: Path, disks: list[str], *, memory_mib: int = 512) -> Iterator[Sandbox]:
    """An appliance with ``disks`` (exports on ``socket``) attached read-only, until the block ends."""
    def attach(g: Any) -> None:
        for disk in disks:
            g.add_drive_opts(disk, format="raw", readonly=True, protocol="nbd", server=[f"unix:{socket}"])
    with _launched(attach, disks, memory_mib) as box:
        yield box


@contextlib.contextmanager
def sandbox_of_images(images: list[tuple[str, Path]], *, memory_mib: int = 512) -> Iterator[Sandbox]:
    """An appliance with restored raw images (device, path) attached. Read-only for the
    images: what the appliance writes (a journal replayed, as a boot would) goes to a
    throw-away overlay, so the images stay as restored."""
    def attach(g: Any) -> None:
        for _, image in images:
            g.add_drive_opts(str(image), format="raw", readonly=True)
    with _launched(attach, [device for device, _ in images], memory_mib) as box:
        yield box


@contextlib.contextmanager
def _launched(attach: Callable[[Any], None], disks: list[str], memory_mib: int) -> Iterator[Sandbox]:
    try:
        import guestfs  # Debian's python3-guestfs, linked into the venv
    except ImportError:
        raise SandboxError("reading a guest's file systems needs libguestfs",
                           hint="apt install libguestfs-tools libguestfs-xfs python3-guestfs (make setup)") from None
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    g = guestfs.GuestFS(python_return_dict=True)
    began = time.monotonic()
    try:
        g.set_memsize(memory_mib)
        g.set_network(False)
        g.set_autosync(False)  # nothing to sync: every disk is read-only
        if accel() == "tcg":
            g.set_backend_setting("force_tcg", "1")
        attach(g)
        try:
            g.launch()
        except RuntimeError as err:
            raise SandboxError(f"the sandbox appliance did not start: {err}",
                               hint="run libguestfs-test-tool to see why") from None
        log.info("sandbox appliance up in %.1fs with disks %s", time.monotonic() - began, ", ".join(disks))
        box = Sandbox(g, disks)
        box.discover()
        yield box
    finally:
        with contextlib.suppress(RuntimeError):
            g.shutdown()
        g.close()
