"""Where a backup's point-in-time view comes from: a QEMU VM over QMP (image fleecing,
``fleecing.py``) or a libvirt domain (libvirt's pull-mode backup, ``libvirt_backup.py``).

Both give the engine the same four steps, so ``engine/backup.py`` has one path for both:
``inspect`` (disks and their bitmaps, before anything is named), ``target`` (the
engine's target for the point), ``exported`` (the view served over NBD while it is read)
and ``teardown`` (the view gone, bitmaps kept or dropped by the outcome). A source is
known from the ``Layout`` alone, so the sentinel can take a view down after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from freezeframe.agent.qga import GuestAgent
from freezeframe.agent.qmp import Monitor
from freezeframe.errors import InvalidInput
from freezeframe.model import Instance
from freezeframe.targets.fleecing import DiskState, FleecingTarget, Layout, exported, inspect, teardown
from freezeframe.targets.libvirt_backup import LibvirtBackupTarget, inspect_domain, teardown_layout

#: The engine's target for a backup point: a snapshot target that says whether it took the view.
BackupTarget = FleecingTarget | LibvirtBackupTarget


class BackupSource(Protocol):
    #: Layout fields that say where the VM is.
    address: dict[str, str | None]

    async def inspect(self) -> list[DiskState]: ...

    def target(self, layout: Layout, *, qga_socket: str | None, agent: asyncio.Task[GuestAgent] | None,
               before_changes: Callable[[], None]) -> BackupTarget: ...

    def exported(self, layout: Layout) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def teardown(self, layout: Layout, *, success: bool,
                       exports_deleted: Callable[[], None] | None = None) -> list[str]: ...


class QemuSource:
    def __init__(self, qmp_socket: str, *, timeout: float = 30.0) -> None:
        self.qmp_socket = qmp_socket
        self.timeout = timeout
        self.address: dict[str, str | None] = {"qmp_socket": qmp_socket}

    async def inspect(self) -> list[DiskState]:
        async with Monitor(self.qmp_socket, timeout=self.timeout) as monitor:
            return await inspect(monitor)

    def target(self, layout: Layout, *, qga_socket: str | None, agent: asyncio.Task[GuestAgent] | None,
               before_changes: Callable[[], None]) -> BackupTarget:
        return FleecingTarget(layout=layout, qga_socket=qga_socket, agent=agent, before_changes=before_changes)

    @contextlib.asynccontextmanager
    async def exported(self, layout: Layout) -> AsyncIterator[None]:
        async with Monitor(self.qmp_socket, timeout=self.timeout) as monitor, exported(monitor, layout):
            yield

    async def teardown(self, layout: Layout, *, success: bool,
                       exports_deleted: Callable[[], None] | None = None) -> list[str]:
        async with Monitor(self.qmp_socket, timeout=self.timeout) as monitor:
            return await teardown(monitor, layout, success=success, exports_deleted=exports_deleted)


class LibvirtSource:
    def __init__(self, uri: str, domain: str) -> None:
        self.uri = uri
        self.domain = domain
        self.address: dict[str, str | None] = {"libvirt_uri": uri, "libvirt_domain": domain}

    async def inspect(self) -> list[DiskState]:
        return await asyncio.to_thread(inspect_domain, self.uri, self.domain)

    def target(self, layout: Layout, *, qga_socket: str | None, agent: asyncio.Task[GuestAgent] | None,
               before_changes: Callable[[], None]) -> BackupTarget:
        # libvirt carries the agent's commands: there is no socket to connect early.
        return LibvirtBackupTarget(layout=layout, before_changes=before_changes)

    @contextlib.asynccontextmanager
    async def exported(self, layout: Layout) -> AsyncIterator[None]:
        yield  # libvirt serves the view from the moment the job begins

    async def teardown(self, layout: Layout, *, success: bool,
                       exports_deleted: Callable[[], None] | None = None) -> list[str]:
        return await asyncio.to_thread(teardown_layout, layout, success=success, exports_deleted=exports_deleted)


def source_for(instance: Instance) -> BackupSource:
    """The backup source of an instance; InvalidInput when it cannot be backed up."""
    if instance.kind == "libvirt" and instance.libvirt_uri and instance.libvirt_domain:
        return LibvirtSource(instance.libvirt_uri, instance.libvirt_domain)
    if instance.kind == "qemu" and instance.qmp_socket:
        return QemuSource(instance.qmp_socket)
    raise InvalidInput(f"instance {instance.name!r} is not a VM: backups are of QEMU VMs and libvirt domains",
                       hint="snapshot a host instance with: freezeframe snapshot create")


def source_of(layout: Layout, *, timeout: float = 30.0) -> BackupSource:
    """The source a layout was made for (the sentinel's way back to the VM); ``timeout``
    for each QMP command."""
    if layout.libvirt_uri and layout.libvirt_domain:
        return LibvirtSource(layout.libvirt_uri, layout.libvirt_domain)
    if layout.qmp_socket is None:
        raise InvalidInput(f"the layout of backup {layout.backup_id} names no VM")
    return QemuSource(layout.qmp_socket, timeout=timeout)
