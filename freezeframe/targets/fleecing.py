"""A running QEMU VM as a backup source: a point-in-time view of every disk (image
fleecing), exported over NBD, with persistent dirty bitmaps for the next backup.

How the point is taken, with the same engine run as a snapshot (``FleecingTarget`` is a
``QemuTarget`` whose prepare and snapshot differ):

1. ``prepare``: per disk, a temporary qcow2 (the fleecing image) whose backing node is
   the disk's own top node, added with ``blockdev-add``. The guest still runs.
2. (the engine freezes the guest here)
3. ``snapshot``: one ``transaction`` over all disks of ``blockdev-backup sync=none`` into
   the fleecing node (from that instant QEMU copies each old block there before the guest
   overwrites it, so the fleecing node reads as the disk at the point), plus the dirty
   bitmap actions: a new persistent bitmap that starts tracking at the point, and a
   disabled copy of the bitmap being read (``block-dirty-bitmap-merge``), frozen at the point.
4. (the engine thaws the guest here)

Then ``exported`` serves the fleecing nodes over NBD with the frozen bitmap as a
``qemu:dirty-bitmap:`` meta context, and ``teardown`` removes everything: the VM's chain is
as it was, and only the new persistent bitmap stays. The bitmap being read stays
recording until the backup succeeds, so a failed or killed backup loses no change.

Everything this module creates is named from the backup's id (``Layout``), so a process
that did not create it (the sentinel, after a crash) can remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freezeframe.agent.qga import GuestAgent
from freezeframe.agent.qmp import Monitor
from freezeframe.errors import HypervisorError, InvalidInput, MonitorCommandError
from freezeframe.model import SnapshotDisk
from freezeframe.targets.bitmaps import PREFIX as BITMAP_PREFIX
from freezeframe.targets.qemu import BlockDisk, QemuTarget, block_disks, create_overlay, disk_chain, short_tag

#: Above what the guest may overwrite during the backup, keep this much free.
SPACE_MARGIN = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class BitmapInfo:
    name: str
    node: str
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskState:
    """One disk as preflight finds it: where it is, how much it holds, its bitmaps."""

    disk: BlockDisk
    #: Bytes allocated in its chain, capped at its size: the most the guest can overwrite.
    allocated: int
    #: Bitmaps on the disk's top node (the only ones that track the guest's writes).
    bitmaps: dict[str, BitmapInfo]
    #: freezeframe's bitmaps found on other nodes of its chain (a snapshot moved the top).
    elsewhere: dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class DiskLayout:
    device: str
    source: str  # the disk's top format node
    source_file: str
    format: str
    virtual_size: int
    node: str  # the fleecing node, exported
    file: str  # the fleecing image
    job: str
    export: str
    #: The bitmap whose changes are read (None: read the whole disk).
    since: str | None = None
    #: Disabled copy of ``since`` made at the point: what the NBD export shows.
    frozen: str | None = None
    #: The persistent bitmap started at the point (None: none, as for a copy backup).
    start: str | None = None
    #: Why the whole disk is read although changes were asked for.
    full_read_reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Every name a backup creates in the VM, decided before anything is created."""

    backup_id: str
    nbd_socket: str
    disks: tuple[DiskLayout, ...]
    #: Where the VM is: its QMP socket, or its libvirt connection and domain.
    qmp_socket: str | None = None
    libvirt_uri: str | None = None
    libvirt_domain: str | None = None
    #: freezeframe bitmaps to remove once the backup has succeeded (superseded).
    drop_on_success: tuple[tuple[str, str], ...] = ()  # (node, bitmap)
    #: Leftovers of earlier runs to remove before the point (node, bitmap).
    stale: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        return cls(
            backup_id=data["backup_id"], nbd_socket=data["nbd_socket"],
            disks=tuple(DiskLayout(**d) for d in data["disks"]),
            qmp_socket=data.get("qmp_socket"), libvirt_uri=data.get("libvirt_uri"),
            libvirt_domain=data.get("libvirt_domain"),
            drop_on_success=tuple(tuple(p) for p in data["drop_on_success"]),
            stale=tuple(tuple(p) for p in data["stale"]),
        )


async def inspect(monitor: Monitor) -> list[DiskState]:
    """The VM's writable disks with their bitmaps and allocation (one query of each kind)."""
    disks = await block_disks(monitor)
    nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
    by_file = {n["file"]: n for n in nodes if n["drv"] not in ("file", "host_device", "nbd")}
    by_name = {n["node-name"]: n for n in nodes}
    found = []
    for disk in disks:
        files = disk_chain(disk, by_file)
        allocated = sum(int(by_file.get(f, {}).get("image", {}).get("actual-size", 0)) for f in files)
        top = by_name.get(disk.node, {})
        bitmaps = {b["name"]: _bitmap(b, disk.node) for b in top.get("dirty-bitmaps", []) if "name" in b}
        elsewhere = {}
        for name in files[1:]:
            node = by_file.get(name, {})
            for b in node.get("dirty-bitmaps", []):
                if str(b.get("name", "")).startswith(BITMAP_PREFIX):
                    elsewhere[b["name"]] = node.get("node-name", "")
        found.append(DiskState(disk=disk, allocated=min(allocated, disk.virtual_size), bitmaps=bitmaps,
                               elsewhere=elsewhere))
    return found


def _bitmap(data: dict[str, Any], node: str) -> BitmapInfo:
    return BitmapInfo(name=str(data["name"]), node=node, recording=bool(data.get("recording")),
                      persistent=bool(data.get("persistent")), busy=bool(data.get("busy")),
                      inconsistent=bool(data.get("inconsistent")))


def check_space(directory: Path, states: list[DiskState]) -> None:
    """The fleecing images hold the old copy of every block the guest overwrites during
    the backup: at most what the disks hold. Refuse before anything is created."""
    directory.mkdir(parents=True, exist_ok=True)
    need = sum(s.allocated for s in states) + SPACE_MARGIN
    free = shutil.disk_usage(directory).free
    if free < need:
        raise InvalidInput(
            f"not enough free space for the temporary snapshot data in {directory}: "
            f"{free >> 20} MiB free, up to {need >> 20} MiB needed (the disks hold {(need - SPACE_MARGIN) >> 20} "
            "MiB the guest could overwrite during the backup)",
            hint="free space there, or put the temporary data elsewhere with --fleecing-dir DIR",
        )


def disk_layout(backup_id: str, position: int, disk: BlockDisk, directory: Path, **reads: Any) -> DiskLayout:
    short = short_tag(backup_id)
    return DiskLayout(
        device=disk.device, source=disk.node, source_file=disk.filename, format=disk.format,
        virtual_size=disk.virtual_size, node=f"ffl{short}-{position}", job=f"ffl{short}-{position}",
        export=f"ffl{short}-{position}", file=str(directory / f"{short}-{position}.qcow2"), **reads,
    )


class FleecingTarget(QemuTarget):
    """The engine's target for a backup point: the same agent handling as a snapshot, but
    the transaction makes a fleecing view instead of switching disks to overlays."""

    def __init__(self, *, layout: Layout, qga_socket: str | None,
                 agent: asyncio.Task[GuestAgent] | None = None,
                 before_changes: Callable[[], None] | None = None) -> None:
        """``before_changes``: called before the first change to the VM (raising stops it)."""
        if layout.qmp_socket is None:
            raise HypervisorError("a fleecing view needs the VM's QMP socket")
        super().__init__(qmp_socket=layout.qmp_socket, qga_socket=qga_socket, agent=agent)
        self.layout = layout
        self._before_changes = before_changes
        self._nodes: list[DiskLayout] = []
        self.taken = False

    async def prepare(self, snapshot_id: str) -> None:
        current = {d.node for d in await self.disks()}
        moved = [d.device for d in self.layout.disks if d.source not in current]
        if moved:
            raise HypervisorError(f"the disks of the VM changed since preflight: {', '.join(moved)}",
                                  hint="run the backup again")
        if self._before_changes is not None:
            self._before_changes()
        for node, bitmap in self.layout.stale:
            with contextlib.suppress(MonitorCommandError):
                await self.monitor.execute("block-dirty-bitmap-remove", {"node": node, "name": bitmap})
        try:
            for disk in self.layout.disks:
                Path(disk.file).parent.mkdir(parents=True, exist_ok=True)
                # Its backing is given by node at blockdev-add; the file names it for tools.
                await create_overlay(disk.file, disk.source_file, disk.format, disk.virtual_size,
                                     what="fleecing image")
                self._nodes.append(disk)
                await self.monitor.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": disk.node, "discard": "unmap",
                    "file": {"driver": "file", "filename": disk.file},
                    "backing": disk.source,
                })
        except BaseException:
            await self.discard()
            raise

    async def snapshot(self) -> list[SnapshotDisk]:
        if not self._nodes:
            raise HypervisorError("nothing prepared: call prepare() before snapshot()")
        actions: list[dict[str, Any]] = []
        for disk in self.layout.disks:
            actions.append({"type": "blockdev-backup", "data": {
                "job-id": disk.job, "device": disk.source, "target": disk.node, "sync": "none",
                "auto-finalize": True, "auto-dismiss": True}})
            if disk.start:
                actions.append({"type": "block-dirty-bitmap-add", "data": {
                    "node": disk.source, "name": disk.start, "persistent": True}})
            if disk.since and disk.frozen:
                actions.append({"type": "block-dirty-bitmap-add", "data": {
                    "node": disk.source, "name": disk.frozen, "persistent": False, "disabled": True}})
                actions.append({"type": "block-dirty-bitmap-merge", "data": {
                    "node": disk.source, "target": disk.frozen, "bitmaps": [disk.since]}})
        await self.monitor.execute("transaction", {"actions": actions})
        self.taken = True
        self._nodes = []
        return [SnapshotDisk(device=d.device, node=d.node, image=d.file, virtual_size=d.virtual_size,
                             allocated_size=0) for d in self.layout.disks]

    async def discard(self) -> None:
        """Before the transaction: remove the fleecing nodes and files prepared so far."""
        prepared, self._nodes = self._nodes, []
        for disk in reversed(prepared):
            with contextlib.suppress(HypervisorError):
                await self.monitor.execute("blockdev-del", {"node-name": disk.node})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(disk.file)

    async def remove(self, disks: list[SnapshotDisk], moved: Callable[[str, str], None]) -> None:
        """The engine undoes a point the policy refused: take the view down."""
        await teardown(self.monitor, self.layout, success=False)


@contextlib.asynccontextmanager
async def exported(monitor: Monitor, layout: Layout) -> AsyncIterator[None]:
    """Serve every fleecing node over NBD on the layout's unix socket, read-only, with the
    frozen bitmap (if any) as a meta context. The caller tears down afterwards."""
    Path(layout.nbd_socket).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.nbd_socket)
    address = {"type": "unix", "data": {"path": layout.nbd_socket}}
    try:
        await monitor.execute("nbd-server-start", {"addr": address})
    except MonitorCommandError as err:
        exports = await monitor.execute("query-block-exports")
        foreign = [e["id"] for e in exports if not str(e["id"]).startswith("ffl")]
        if foreign:
            raise HypervisorError(
                f"QEMU serves NBD exports already ({', '.join(foreign)}): another backup tool is at work",
                hint="wait until it is done") from err
        # Ours, left by a run that died before its sentinel could act: replace it.
        await monitor.execute("nbd-server-stop")
        await monitor.execute("nbd-server-start", {"addr": address})
    for disk in layout.disks:
        await monitor.execute("block-export-add", {
            "type": "nbd", "id": disk.export, "node-name": disk.node, "name": disk.export,
            "writable": False, "bitmaps": [disk.frozen] if disk.frozen else []})
    yield


async def teardown(monitor: Monitor, layout: Layout, *, success: bool,
                   exports_deleted: Callable[[], None] | None = None) -> list[str]:
    """Remove the view and its export; keep the bitmaps that the outcome says to keep.
    Idempotent: whatever is not there (any more) is skipped. Returns what could not be removed.

    ``exports_deleted`` is called once QEMU has been told to delete the exports, so the
    caller lets go of its connections to them then: QEMU has closed them from its side (in
    its main loop), and an export with a client that still holds replies it never read
    would not go away."""
    problems: list[str] = []

    async def attempt(command: str, arguments: dict[str, Any] | None = None) -> None:
        # Only what is there is removed (checked first), so any refusal is a real problem.
        try:
            await monitor.execute(command, arguments)
        except MonitorCommandError as err:
            problems.append(str(err))

    exports = {str(e["id"]) for e in await monitor.execute("query-block-exports")}
    ours = {d.export for d in layout.disks} & exports
    for export in sorted(ours):
        await attempt("block-export-del", {"id": export, "mode": "hard"})
    if exports_deleted is not None:
        exports_deleted()
    # An export goes only once its clients are released. Stopping the server before that
    # crashes QEMU 7.2 (Debian 12) when a client of a disk in an iothread lets go late:
    # "nbd_blockdev_client_closed: Assertion `qemu_in_main_thread() && nbd_server' failed".
    await _wait_exports_gone(monitor, ours)
    if not any(not e.startswith("ffl") for e in exports):
        with contextlib.suppress(MonitorCommandError):  # not running: nothing to stop
            await monitor.execute("nbd-server-stop")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.nbd_socket)
    jobs = {j["device"] for j in await monitor.execute("query-block-jobs")}
    for disk in layout.disks:
        if disk.job in jobs:
            await attempt("block-job-cancel", {"device": disk.job, "force": True})
    await _wait_jobs_gone(monitor, {d.job for d in layout.disks})
    nodes = {n["node-name"] for n in await monitor.execute("query-named-block-nodes", {"flat": True})}
    for disk in layout.disks:
        if disk.node in nodes:
            await attempt("blockdev-del", {"node-name": disk.node})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(disk.file)
        with contextlib.suppress(OSError):  # the backup's own folder, once empty
            os.rmdir(Path(disk.file).parent)
    remove: list[tuple[str, str]] = [(d.source, d.frozen) for d in layout.disks if d.frozen]
    if success:
        remove += list(layout.drop_on_success)
    else:
        remove += [(d.source, d.start) for d in layout.disks if d.start]
    present = {(n["node-name"], b["name"]) for n in await monitor.execute("query-named-block-nodes", {"flat": True})
               for b in n.get("dirty-bitmaps", []) if "name" in b}
    for node, bitmap in remove:
        if (node, bitmap) in present:
            await attempt("block-dirty-bitmap-remove", {"node": node, "name": bitmap})
    return problems


async def _wait_exports_gone(monitor: Monitor, exports: set[str], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while exports and loop.time() < deadline:
        if not exports & {str(e["id"]) for e in await monitor.execute("query-block-exports")}:
            return
        await asyncio.sleep(0.02)


async def _wait_jobs_gone(monitor: Monitor, jobs: set[str], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        running = {j["device"] for j in await monitor.execute("query-block-jobs")}
        if not running & jobs:
            return
        await asyncio.sleep(0.05)
    raise HypervisorError(f"the fleecing jobs {', '.join(sorted(jobs))} did not end within {timeout:g}s")
