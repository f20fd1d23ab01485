"""A libvirt domain as a snapshot target. libvirt owns the VM's monitor and agent channel,
so everything goes through libvirt (``libvirt-python``), and libvirt always knows the
disks' chains (``virsh domblklist`` and ``dumpxml`` agree with QEMU):

1. ``prepare``: one qcow2 overlay per disk, created beside it with ``qemu-img`` while the
   guest runs (libvirt takes them with ``VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT``, so no file
   is created inside the freeze window).
2. (the engine freezes the guest through libvirt's ``virDomainFSFreeze``)
3. ``snapshot``: one ``virDomainSnapshotCreateXML`` with ``DISK_ONLY | ATOMIC |
   NO_METADATA | REUSE_EXT``: every disk switches to its overlay at one instant (libvirt
   runs one QMP transaction), and libvirt keeps no snapshot metadata: freezeframe's catalog
   holds the record. The guest is frozen by freezeframe, not by libvirt's ``--quiesce``,
   so writers, hooks, the budget and the guard work as for any VM.
4. (the engine thaws)

Deleting a snapshot commits the layer above its image into it with ``virDomainBlockCommit``
(the active layer with ``ACTIVE`` and a pivot), as ``virsh blockcommit`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.agent.libvirt_agent import LibvirtAgent
from freezeframe.agent.qga import GuestAgent
from freezeframe.errors import AgentUnavailable, HypervisorError, NotFound
from freezeframe.model import SnapshotDisk
from freezeframe.targets.qemu import GuestTarget, allocated_bytes, create_overlay, overlay_path, short_tag

_JOB_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class DomainDisk:
    """One writable disk of the domain, as its live XML shows it."""

    device: str  # the target dev (vda, sdb)
    filename: str  # the active image
    format: str
    chain: tuple[str, ...]  # the active image down to the base


class LibvirtTarget(GuestTarget):
    kind = "libvirt"

    def __init__(self, *, uri: str, domain: str) -> None:
        super().__init__()
        self.uri = uri
        self.domain_name = domain
        self._conn: Any = None
        self._dom: Any = None
        self._prepared: list[tuple[DomainDisk, str, int]] = []
        self._skipped: list[str] = []

    async def connect(self) -> None:
        self._conn, self._dom = await asyncio.to_thread(open_domain, self.uri, self.domain_name)

    async def close(self) -> None:
        try:
            await self.discard()
        finally:
            conn, self._conn, self._dom = self._conn, None, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(conn.close)

    def _domain(self) -> Any:
        if self._dom is None:
            raise HypervisorError(f"not connected to libvirt domain {self.domain_name}")
        return self._dom

    async def _call(self, what: str, call: Callable[[], Any]) -> Any:
        import libvirt

        try:
            return await asyncio.to_thread(call)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"libvirt refused to {what}: {err.get_error_message() or err}") from err

    # -- discovery ---------------------------------------------------------------------

    async def _xml(self) -> ET.Element:
        return ET.fromstring(await self._call("describe the domain", lambda: self._domain().XMLDesc(0)))

    async def disks(self) -> list[DomainDisk]:
        found, _ = domain_disks(await self._xml())
        if not found:
            raise HypervisorError(f"the domain {self.domain_name} has no writable file-backed disk to snapshot")
        return found

    async def skipped_disks(self) -> list[dict[str, str]]:
        _, skipped = domain_disks(await self._xml())
        return skipped

    async def connect_agent(self, timeout: float, command_timeout: float) -> GuestAgent:
        agent = LibvirtAgent(self._domain(), timeout=command_timeout)
        await agent.connect(timeout)
        self.agent = agent
        return agent

    # -- snapshot ----------------------------------------------------------------------

    async def prepare(self, snapshot_id: str) -> None:
        tag = short_tag(snapshot_id)
        try:
            # Read once here: the snapshot itself runs inside the freeze window.
            found, skipped = domain_disks(await self._xml())
            self._skipped = sorted(d["device"] for d in skipped)
            if not found:
                raise HypervisorError(f"the domain {self.domain_name} has no writable file-backed disk to snapshot")
            for disk in found:
                overlay = overlay_path(disk.filename, tag)
                size = (await self._call("read a disk's size", functools.partial(self._domain().blockInfo,
                                                                                 disk.device)))[0]
                # Listed first: a cancel between the two would leave a file discard() misses.
                self._prepared.append((disk, overlay, int(size)))
                await create_overlay(overlay, disk.filename, disk.format, int(size))
        except BaseException:
            await self.discard()
            raise

    async def snapshot(self) -> list[SnapshotDisk]:
        import libvirt

        if not self._prepared:
            raise HypervisorError("nothing prepared: call prepare() before snapshot()")
        root = ET.Element("domainsnapshot")
        ET.SubElement(root, "description").text = "freezeframe (its catalog holds the record)"
        disks = ET.SubElement(root, "disks")
        for disk, overlay, _ in self._prepared:
            entry = ET.SubElement(disks, "disk", name=disk.device, snapshot="external", type="file")
            ET.SubElement(entry, "driver", type="qcow2")
            ET.SubElement(entry, "source", file=overlay)
        for device in self._skipped:
            ET.SubElement(disks, "disk", name=device, snapshot="no")
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT)
        text = ET.tostring(root, encoding="unicode")
        await self._call("take the snapshot", lambda: self._domain().snapshotCreateXML(text, flags))
        done, self._prepared = self._prepared, []
        return [SnapshotDisk(device=disk.device, node=disk.device, image=disk.filename, virtual_size=size,
                             allocated_size=allocated_bytes(disk.filename)) for disk, _, size in done]

    async def discard(self) -> None:
        prepared, self._prepared = self._prepared, []
        for _, overlay, _ in prepared:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(overlay)

    async def adopt(self, snapshot_id: str) -> tuple[list[SnapshotDisk], list[str]]:
        """After a run died: the copies its snapshot took (disks now on its overlays), and
        its prepared overlays that no disk uses, which are deleted."""
        tag = short_tag(snapshot_id)
        taken: list[SnapshotDisk] = []
        in_use: set[str] = set()
        for disk in await self.disks():
            in_use.update(disk.chain)
            if f".ff-{tag}." in Path(disk.filename).name and len(disk.chain) > 1:
                taken.append(SnapshotDisk(device=disk.device, node=disk.device, image=disk.chain[1],
                                          virtual_size=0, allocated_size=allocated_bytes(disk.chain[1])))
        removed = []
        for disk in await self.disks():
            directory = Path(disk.chain[-1]).parent
            for leftover in directory.glob(f"*.ff-{tag}.qcow2"):
                if str(leftover) not in in_use:
                    leftover.unlink(missing_ok=True)
                    removed.append(str(leftover))
        return taken, removed

    # -- deletion ----------------------------------------------------------------------

    async def merge_down(self, image: str) -> str | None:
        """Commit the layer above ``image`` into it; returns that layer's file (removed), or
        None when no disk of the domain has ``image`` below its active layer."""
        found = next((d for d in await self.disks() if image in d.chain), None)
        if found is None:
            return None
        position = found.chain.index(image)
        if position == 0:
            return None  # merged already (see QemuTarget.merge_down)
        above = found.chain[position - 1]
        await self._commit(found.device, image, above, active=position == 1)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(above)
        return above

    async def _commit(self, device: str, base: str, top: str, *, active: bool) -> None:
        import libvirt

        dom = self._domain()
        if active:
            await self._call(f"commit {top} into {base}", lambda: dom.blockCommit(
                device, base, None, 0, libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE))
            await self._wait_job(device, ready=True)
            await self._call("pivot to the merged image",
                             lambda: dom.blockJobAbort(device, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT))
        else:
            await self._call(f"commit {top} into {base}", lambda: dom.blockCommit(device, base, top, 0, 0))
        await self._wait_job(device, ready=False)

    async def _wait_job(self, device: str, *, ready: bool) -> None:
        """Until the disk's block job is ready to pivot (``ready``) or gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _JOB_TIMEOUT
        dom = self._domain()
        while loop.time() < deadline:
            info = await self._call("read the block job", lambda: dom.blockJobInfo(device, 0))
            if ready and info and info.get("end", 0) > 0 and info.get("cur") == info.get("end"):
                return
            if not ready and not info:
                return
            await asyncio.sleep(0.05)
        raise HypervisorError(f"the block job on {device} did not finish within {_JOB_TIMEOUT:g}s")


def open_domain(uri: str, name: str) -> tuple[Any, Any]:
    """A libvirt connection and the running domain ``name`` (blocking)."""
    import libvirt

    # libvirt prints every error to stderr unless a handler takes it: they come back as exceptions.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HypervisorError(f"cannot connect to libvirt at {uri}: {err.get_error_message() or err}",
                              hint="is libvirtd running? (freezeframe lab up --libvirt starts one)") from err
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as err:
        conn.close()
        raise NotFound(f"libvirt at {uri} has no domain named {name!r}", hint="see: virsh list --all") from err
    if not dom.isActive():
        conn.close()
        raise AgentUnavailable(f"the libvirt domain {name} is not running", hint=f"start it: virsh start {name}")
    return conn, dom


def domain_disks(root: ET.Element) -> tuple[list[DomainDisk], list[dict[str, str]]]:
    """The writable file-backed disks of a live domain XML, and the drives left out."""
    found, skipped = [], []
    for disk in root.findall("./devices/disk"):
        target = disk.find("target")
        device = target.get("dev", "?") if target is not None else "?"
        source = disk.find("source")
        path = source.get("file") if source is not None else None
        if disk.get("device") in ("cdrom", "floppy") and not path:
            skipped.append({"device": device, "reason": "no medium (an empty drive)"})
            continue
        if disk.find("readonly") is not None or disk.get("device") in ("cdrom", "floppy"):
            skipped.append({"device": device, "reason": f"read-only ({path or ''})"})
            continue
        if disk.get("type") != "file" or not path:
            skipped.append({"device": device, "reason": f"a {disk.get('type')} disk: only file-backed disks are "
                                                        "snapshotted through libvirt here"})
            continue
        driver = disk.find("driver")
        chain = [path]
        backing = disk.find("backingStore")
        while backing is not None and backing.find("source") is not None:
            chain.append(backing.find("source").get("file", ""))  # type: ignore[union-attr]
            backing = backing.find("backingStore")
        found.append(DomainDisk(device=device, filename=path,
                                format=driver.get("type", "raw") if driver is not None else "raw",
                                chain=tuple(c for c in chain if c)))
    return found, skipped
