"""A libvirt domain as a backup source: libvirt's backup API in pull mode, with libvirt
checkpoints as the dirty bitmaps that incrementals read.

The same steps as a QEMU VM's image fleecing (``fleecing.py``), done by libvirt:

1. ``prepare``: one empty qcow2 scratch image per disk, created beside nothing the domain
   uses, while the guest runs (libvirt takes them with ``REUSE_EXTERNAL``, so no file is
   created inside the freeze window); checkpoints of runs that died are deleted.
2. (the engine freezes the guest through libvirt)
3. ``snapshot``: one ``virDomainBackupBegin``: libvirt starts, in one QMP transaction,
   the copy-before-write view of every disk and the new checkpoint's bitmaps, then serves
   the views over NBD on the layout's unix socket under the layout's export names, each
   with the changes since the disk's parent checkpoint as the ``qemu:dirty-bitmap:``
   meta context named in the layout (``exportbitmap``).
4. (the engine thaws)

The reader is the same as for a QEMU VM. ``teardown`` ends the job (``virDomainAbortJob``:
libvirt removes the view and the exports), deletes the scratch images, and the
checkpoints the outcome says to drop: after a success, the superseded ones; after a
failure, the new one, so the previous checkpoint still covers every change since it.

libvirt refuses the whole backup when one disk lost its checkpoint's bitmap ("checkpoint
inconsistent: missing or broken bitmap"), and only inside ``virDomainBackupBegin``, in the
freeze window. So ``inspect`` asks first, for each checkpoint's size per disk
(``VIR_DOMAIN_CHECKPOINT_XML_SIZE``): a disk without one has no usable bitmap, and is
read in full while the others still read only their changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from freezeframe.errors import HypervisorError
from freezeframe.model import SnapshotDisk
from freezeframe.targets.bitmaps import PREFIX as BITMAP_PREFIX
from freezeframe.targets.fleecing import BitmapInfo, DiskState, Layout
from freezeframe.targets.libvirt import LibvirtTarget, domain_disks, open_domain
from freezeframe.targets.qemu import BlockDisk, allocated_bytes, create_empty

_JOB_TIMEOUT = 30.0


class LibvirtBackupTarget(LibvirtTarget):
    """The engine's target for a backup point of a libvirt domain: the same agent handling
    as a libvirt snapshot, but the point is a pull-mode backup job instead of overlays."""

    def __init__(self, *, layout: Layout, before_changes: Callable[[], None] | None = None) -> None:
        if layout.libvirt_uri is None or layout.libvirt_domain is None:
            raise HypervisorError("a libvirt backup needs the domain's connection and name")
        super().__init__(uri=layout.libvirt_uri, domain=layout.libvirt_domain)
        self.layout = layout
        self._before_changes = before_changes
        self._scratch: list[str] = []
        self.taken = False

    async def prepare(self, snapshot_id: str) -> None:
        found, skipped = domain_disks(await self._xml())
        files = {d.device: d.filename for d in found}
        moved = [d.device for d in self.layout.disks if files.get(d.device) != d.source_file]
        if moved:
            raise HypervisorError(f"the disks of the domain changed since preflight: {', '.join(moved)}",
                                  hint="run the backup again")
        self._skipped = sorted({d["device"] for d in skipped} | (set(files) - {d.device for d in self.layout.disks}))
        if self._before_changes is not None:
            self._before_changes()
        dom = self._domain()
        needed = {d.since for d in self.layout.disks}
        for name in sorted({bitmap for _, bitmap in self.layout.stale} - needed):
            with contextlib.suppress(HypervisorError):
                await self._call(f"delete the stale checkpoint {name}",
                                 functools.partial(_delete_checkpoint, dom, name))
        try:
            Path(self.layout.nbd_socket).parent.mkdir(parents=True, exist_ok=True)
            for disk in self.layout.disks:
                Path(disk.file).parent.mkdir(parents=True, exist_ok=True)
                self._scratch.append(disk.file)
                await create_empty(disk.file, disk.virtual_size, what="scratch image")
        except BaseException:
            await self.discard()
            raise

    async def snapshot(self) -> list[SnapshotDisk]:
        import libvirt

        if not self._scratch:
            raise HypervisorError("nothing prepared: call prepare() before snapshot()")
        backup_xml, checkpoint_xml = job_xml(self.layout, self._skipped)
        dom = self._domain()
        await self._call("begin the backup", lambda: dom.backupBegin(
            backup_xml, checkpoint_xml, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL))
        self.taken = True
        self._scratch = []
        return [SnapshotDisk(device=d.device, node=d.device, image=d.file, virtual_size=d.virtual_size,
                             allocated_size=0) for d in self.layout.disks]

    async def discard(self) -> None:
        """Before the job began: remove the scratch images made so far."""
        made, self._scratch = self._scratch, []
        for file in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(file)
            with contextlib.suppress(OSError):  # the backup's own folder, once empty
                os.rmdir(Path(file).parent)

    async def remove(self, disks: list[SnapshotDisk], moved: Callable[[str, str], None]) -> None:
        """The engine undoes a point the policy refused: end the job."""
        await asyncio.to_thread(teardown_domain, self._domain(), self.layout, success=False)


def job_xml(layout: Layout, skipped: list[str]) -> tuple[str, str | None]:
    """The backup job's XML and the new checkpoint's (None when no disk starts one)."""
    backup = ET.Element("domainbackup", mode="pull")
    ET.SubElement(backup, "server", transport="unix", socket=layout.nbd_socket)
    disks = ET.SubElement(backup, "disks")
    checkpoint = ET.Element("domaincheckpoint")
    names = {d.start for d in layout.disks if d.start}
    if len(names) > 1:
        raise HypervisorError(f"one checkpoint per backup, not {sorted(names)}")
    ET.SubElement(checkpoint, "name").text = names.pop() if names else None
    ET.SubElement(checkpoint, "description").text = f"freezeframe backup {layout.backup_id}"
    points = ET.SubElement(checkpoint, "disks")
    for disk in layout.disks:
        entry = ET.SubElement(disks, "disk", name=disk.device, backup="yes", type="file", exportname=disk.export)
        if disk.since:
            entry.attrib.update(backupmode="incremental", incremental=disk.since, exportbitmap=disk.frozen or "")
        else:
            entry.set("backupmode", "full")
        ET.SubElement(entry, "driver", type="qcow2")
        ET.SubElement(entry, "scratch", file=disk.file)
        ET.SubElement(points, "disk", name=disk.device, checkpoint="bitmap" if disk.start else "no")
    for device in skipped:
        ET.SubElement(disks, "disk", name=device, backup="no")
        ET.SubElement(points, "disk", name=device, checkpoint="no")
    return (ET.tostring(backup, encoding="unicode"),
            ET.tostring(checkpoint, encoding="unicode") if any(d.start for d in layout.disks) else None)


def inspect_domain(uri: str, domain: str) -> list[DiskState]:
    """The domain's writable disks with freezeframe's checkpoints as their bitmaps
    (blocking). A checkpoint whose bitmap a disk lacks is not among that disk's bitmaps."""
    import libvirt

    conn, dom = open_domain(uri, domain)
    try:
        found, _ = domain_disks(ET.fromstring(dom.XMLDesc(0)))
        sizes: dict[str, dict[str, bool]] = {}  # checkpoint -> device -> has a usable bitmap
        for checkpoint in dom.listAllCheckpoints(0):
            name = checkpoint.getName()
            if not name.startswith(BITMAP_PREFIX):
                continue
            try:
                text = checkpoint.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE
                                             | libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
            except libvirt.libvirtError:
                text = checkpoint.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
            sizes[name] = {d.get("name", ""): d.get("size") is not None
                           for d in ET.fromstring(text).findall("./disks/disk") if d.get("checkpoint") == "bitmap"}
        states = []
        for disk in found:
            size = int(dom.blockInfo(disk.device)[0])
            # A checkpoint whose bitmap this disk lost is not one of its bitmaps: "missing".
            bitmaps = {name: BitmapInfo(name=name, node=disk.device, recording=True, persistent=True, busy=False,
                                        inconsistent=False)
                       for name, per_disk in sizes.items() if per_disk.get(disk.device)}
            states.append(DiskState(
                disk=BlockDisk(device=disk.device, node=disk.device, filename=disk.filename, format=disk.format,
                               virtual_size=size),
                allocated=min(sum(allocated_bytes(f) for f in disk.chain), size), bitmaps=bitmaps, elsewhere={}))
        return states
    except libvirt.libvirtError as err:
        raise HypervisorError(f"libvirt refused to describe {domain}: {err.get_error_message() or err}") from err
    finally:
        conn.close()


def teardown_domain(dom: Any, layout: Layout, *, success: bool,
                    exports_deleted: Callable[[], None] | None = None) -> list[str]:
    """End the backup job if it is this layout's, remove its scratch images and the
    checkpoints the outcome says to drop (blocking). Idempotent; returns what could not
    be removed. ``exports_deleted`` as for ``fleecing.teardown``: called once libvirt has
    taken the exports down, so that the reader lets go of its connections then."""
    import libvirt

    problems: list[str] = []
    if _our_job(dom, layout):
        if _in_iothreads(dom):
            problems += _delete_exports(dom, exports_deleted)
        try:
            dom.abortJob()
        except libvirt.libvirtError as err:
            problems.append(f"libvirt refused to end the backup job: {err.get_error_message() or err}")
    if exports_deleted is not None:
        exports_deleted()
    if not _wait_job_gone(dom, layout):
        problems.append(f"the backup job on {layout.libvirt_domain} did not end within {_JOB_TIMEOUT:g}s")
    for disk in layout.disks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(disk.file)
        with contextlib.suppress(OSError):  # the backup's own folder, once empty
            os.rmdir(Path(disk.file).parent)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.nbd_socket)
    drop = {name for _, name in layout.drop_on_success} if success else {d.start for d in layout.disks if d.start}
    try:
        present = {c.getName() for c in dom.listAllCheckpoints(0)}
    except libvirt.libvirtError as err:
        return [*problems, f"libvirt cannot list the checkpoints: {err.get_error_message() or err}"]
    for name in sorted(drop & present):
        try:
            _delete_checkpoint(dom, name)
        except libvirt.libvirtError as err:
            problems.append(f"libvirt refused to delete the checkpoint {name}: {err.get_error_message() or err}")
    return problems


def _in_iothreads(dom: Any) -> bool:
    """Does any disk of the domain run in an iothread?"""
    disks = ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk/driver")
    return any(d.get("iothread") for d in disks)


def _delete_exports(dom: Any, exports_deleted: Callable[[], None] | None) -> list[str]:
    """Take the job's NBD exports down before libvirt ends the job (blocking).

    libvirt ends a pull-mode job by stopping QEMU's NBD server at once. A connection still
    open then (the reader's, or the duplicates the sentinel holds after the backup process
    died, with replies nobody reads) is closed in its disk's iothread, and QEMU 7.2 aborts
    on that, killing the VM: "nbd_blockdev_client_closed: Assertion `qemu_in_main_thread()
    && nbd_server' failed" (seen here on a domain with an iothread after a killed backup).
    Deleting the exports first makes QEMU close the connections in its main loop, as the
    QEMU target does. libvirt has no call for that, so it goes through its QMP pass-through,
    for which libvirt marks the domain "tainted: custom-monitor"; only domains with disks
    in iothreads need it. While the job runs, every ``libvirt-nbd-`` export is the job's.
    ``exports_deleted`` is called once the deletion is asked for, before waiting: an
    export whose client holds replies it never read goes only when the client lets go."""
    import libvirt
    import libvirt_qemu

    def qmp(command: str, arguments: dict[str, Any] | None = None) -> Any:
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0))["return"]

    try:
        ours = {e["id"] for e in qmp("query-block-exports") if str(e.get("id", "")).startswith("libvirt-nbd-")}
        for export in sorted(ours):
            qmp("block-export-del", {"id": export, "mode": "hard"})
        if exports_deleted is not None:
            exports_deleted()
        deadline = time.monotonic() + _JOB_TIMEOUT
        while ours & {e["id"] for e in qmp("query-block-exports")}:
            if time.monotonic() > deadline:
                return [f"the backup's NBD exports were not gone within {_JOB_TIMEOUT:g}s"]
            time.sleep(0.02)
    except (libvirt.libvirtError, ValueError, KeyError, TypeError) as err:
        return [f"the backup's NBD exports could not be deleted through libvirt: {err}"]
    return []


def _delete_checkpoint(dom: Any, name: str) -> None:
    """Delete a checkpoint and its bitmaps. libvirt refuses when a disk lacks the bitmap
    (it was lost behind libvirt's back); then only libvirt's record of it goes, and the
    bitmaps on the other disks stay in their images (libvirt gives no other way to them)."""
    import libvirt

    checkpoint = dom.checkpointLookupByName(name)
    try:
        checkpoint.delete(0)
    except libvirt.libvirtError:
        checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)


def _our_job(dom: Any, layout: Layout) -> bool:
    """A backup job runs on the domain, and it serves this layout's exports."""
    import libvirt

    try:
        text = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False  # no backup job
    exports = {d.get("exportname") for d in ET.fromstring(text).findall("./disks/disk")}
    return bool(exports & {d.export for d in layout.disks})


def _wait_job_gone(dom: Any, layout: Layout) -> bool:
    deadline = time.monotonic() + _JOB_TIMEOUT
    while _our_job(dom, layout):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def teardown_layout(layout: Layout, *, success: bool, exports_deleted: Callable[[], None] | None = None) -> list[str]:
    """``teardown_domain`` over a connection of its own (blocking): for the sentinel, and
    for the engine once the target is closed."""
    if layout.libvirt_uri is None or layout.libvirt_domain is None:
        raise HypervisorError(f"backup {layout.backup_id} was not of a libvirt domain")
    conn, dom = open_domain(layout.libvirt_uri, layout.libvirt_domain)
    try:
        return teardown_domain(dom, layout, success=success, exports_deleted=exports_deleted)
    finally:
        with contextlib.suppress(Exception):
            conn.close()
