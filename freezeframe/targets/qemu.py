"""A running QEMU VM as a snapshot target: its disks over QMP, its file systems over qemu-ga.

How a snapshot is taken, so that nothing slow happens while the guest is frozen:

1. ``prepare``: for each disk, create a qcow2 overlay file whose backing file is the
   disk's current top image, and add it to QEMU as a block node (``blockdev-add``
   with ``backing: null``). The guest still runs.
2. (the engine freezes the guest here)
3. ``snapshot``: one QMP ``transaction`` of ``blockdev-snapshot`` actions, one per disk;
   QEMU switches every disk to its overlay at the same instant. The old top images are
   now read-only: they are the snapshot.
4. (the engine thaws the guest here)

Deleting a snapshot merges the overlay above its image back into it (``block-commit``),
so the VM keeps running on a valid chain with all its data. Libvirt does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

from freezeframe.agent import vss
from freezeframe.agent.qga import FreezeState, GuestAgent
from freezeframe.agent.qmp import Monitor
from freezeframe.errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentUnavailable,
    HypervisorError,
    MonitorCommandError,
)
from freezeframe.model import SnapshotDisk
from freezeframe.targets import bitmaps, guest_hooks, stock_hooks, survey
from freezeframe.targets.base import FreezeProbe

_OVERLAY_SUFFIX = re.compile(r"\.ff-[0-9a-f]{8}$")
_JOB_TIMEOUT = 600.0
#: The freeze budget a Windows guest gets: VSS's hold limit, less a second for the thaw to
#: reach the guest on a loaded host. The budget counts from the freeze request, VSS's hold
#: only from its commit, so this errs on the safe side.
WINDOWS_FREEZE_BUDGET_S = vss.HOLD_LIMIT_S - 1.0


@dataclass(frozen=True, slots=True)
class BlockDisk:
    """One writable disk of the VM, as QMP shows it."""

    device: str
    node: str  # the top (active) format node
    filename: str
    format: str
    virtual_size: int


@dataclass(frozen=True, slots=True)
class _StockWatch:
    #: Where the stock hook's log ended at the probe.
    offset: int
    #: The guest's clock then (seconds since the epoch), when the agent tells it.
    not_before: float | None


@dataclass(frozen=True, slots=True)
class _Overlay:
    disk: BlockDisk
    node: str
    filename: str
    #: freezeframe's bitmaps on the disk's active layer, carried onto the overlay.
    bitmaps: tuple[bitmaps.Bitmap, ...] = ()


class GuestTarget:
    """What every VM target shares: the guest's file systems through its agent (probe,
    freeze, thaw, the guest hook runner's report), whatever carries the agent's commands."""

    #: Commands the agent must allow for a filesystem-consistent snapshot.
    FREEZE_COMMANDS = survey.FREEZE_COMMANDS
    #: The images are the host's, the probe talks to the guest: one need not wait for the other.
    prepare_with_probe = True

    def __init__(self) -> None:
        self.agent: GuestAgent | None = None
        #: The guest runs Windows (learnt in preflight): freeze errors are VSS errors.
        self._windows = False
        #: The guest runs freezeframe's hook runner: its report is read after the thaw.
        self._hooks = False
        #: Or the stock fsfreeze-hook: its log is read from here after the thaw.
        self._stock: _StockWatch | None = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Reach the hypervisor."""
        raise NotImplementedError

    async def close(self) -> None:
        """Remove what was prepared but not used, then close every channel."""
        raise NotImplementedError

    async def connect_agent(self, timeout: float, command_timeout: float) -> GuestAgent:
        """Connect to the guest agent within ``timeout``; raises AgentError when there is none usable."""
        raise NotImplementedError

    async def skipped_disks(self) -> list[dict[str, str]]:
        """The VM's drives no snapshot includes, and why (for the manifest)."""
        raise NotImplementedError

    def _agent(self) -> GuestAgent:
        if self.agent is None:
            raise AgentUnavailable("the guest agent is not connected")
        return self.agent

    async def probe_freeze(self, *, agent_timeout: float, command_timeout: float,
                           deadman_s: float | None = None) -> FreezeProbe:
        """The survey ``instance check`` reports too, then what a run does about it: a guest
        found frozen is thawed; the hook evidence is made ready to read after the thaw, and
        the guest hook runner's deadman told when to thaw by itself (``deadman_s``)."""
        probe = FreezeProbe()
        skipped = await self.skipped_disks()
        if skipped:
            probe.details["skipped_disks"] = skipped
        try:
            agent = await self.connect_agent(agent_timeout, command_timeout)
            found = await survey.survey(agent)
            if found.state is FreezeState.FROZEN:
                thawed = await agent.fsfreeze_thaw()
                probe.events.append(f"the guest was found frozen before the snapshot (a previous run died?); "
                                    f"thawed {thawed} file systems")
                found = await survey.survey(agent)
                if found.state is FreezeState.FROZEN:
                    raise HypervisorError("the guest was found frozen and stays frozen after a thaw",
                                          hint="check qemu-ga in the guest")
        except AgentError as err:
            probe.unusable = f"no usable guest agent: {err}"
            return probe
        probe.details["agent"] = {"version": found.info.version}
        if found.guest_os is not None:
            probe.details["guest_os"] = asdict(found.guest_os)
            self._windows = found.guest_os.windows
            if found.guest_os.windows:
                probe.freeze_limit = (WINDOWS_FREEZE_BUDGET_S, f"Windows VSS holds writes for at most "
                                      f"{vss.HOLD_LIMIT_S:g} s ({found.guest_os.describe()})")
        if found.no_vss is not None:
            probe.unusable = vss.explain(found.no_vss)
            return probe
        if found.blocked:
            probe.unusable = f"the guest agent does not allow {', '.join(found.blocked)} (blocked by its configuration)"
            return probe
        if found.hooks is not None:
            try:
                await self._ready_hook_evidence(agent, found, probe, deadman_s)
            except AgentError as err:
                probe.inner_unreadable = f"the guest's hook evidence could not be prepared: {err}"
                probe.events.append(probe.inner_unreadable)
        if found.filesystems is not None:
            probe.details["filesystems"] = [
                {"mountpoint": fs.mountpoint, "type": fs.type, "name": fs.name,
                 "devices": [d.dev for d in fs.disks if d.dev]}
                for fs in found.filesystems
            ]
        return probe

    async def _ready_hook_evidence(self, agent: GuestAgent, found: survey.Survey, probe: FreezeProbe,
                                   deadman_s: float | None) -> None:
        """Clear the hook runner's last report, or note where the stock hook's log ends,
        so that what is read after the thaw is this freeze's."""
        hooks = found.hooks
        assert hooks is not None
        if hooks.blocked is not None:
            probe.inner_unreadable = hooks.blocked
            probe.events.append(hooks.blocked)
            return
        if hooks.kind == "runner":
            self._hooks = True
            probe.inner_writers = True
            probe.details["guest_hooks"] = {"config": guest_hooks.CONFIG_PATH, "report": guest_hooks.RESULT_PATH}
            with contextlib.suppress(AgentCommandError):  # no report yet: the runner never ran
                await agent.file_close(await agent.file_open(guest_hooks.RESULT_PATH, "w"))  # truncate
            await self._deadman(agent, probe, deadman_s)
            return
        if hooks.can_watch_log:
            # Watched even when there is no log yet: the first freeze that runs the stock
            # hook creates it. What the log then shows (or that there is none) is the evidence.
            self._stock = _StockWatch(offset=hooks.log_size or 0, not_before=found.guest_time)
            probe.inner_writers = True
            probe.details["guest_hooks"] = {"runner": f"stock fsfreeze-hook ({stock_hooks.SCRIPT_PATH})",
                                            "log": stock_hooks.LOG_PATH}

    async def _deadman(self, agent: GuestAgent, probe: FreezeProbe, deadman_s: float | None) -> None:
        """What a deadman that fired since the last run did (it means a run died with the
        guest frozen), then this freeze's deadline for it."""
        with contextlib.suppress(AgentCommandError):  # none fired
            fired = await agent.read_file(guest_hooks.DEADMAN_LOG_PATH, max_bytes=64 * 1024)
            for line in fired.decode("utf-8", "replace").splitlines()[-10:]:
                probe.events.append(f"the guest's deadman acted since the last run: {line[:300]}")
            await agent.file_close(await agent.file_open(guest_hooks.DEADMAN_LOG_PATH, "w"))
        if deadman_s is None:
            return
        try:
            handle = await agent.file_open(guest_hooks.DEADMAN_REQUEST_PATH, "w")
            try:
                await agent.file_write(handle, json.dumps({"thaw_after_s": round(deadman_s, 3)}).encode())
            finally:
                await agent.file_close(handle)
        except AgentCommandError as err:
            probe.events.append(f"the deadman's deadline could not be given to the guest ({err}): it keeps the "
                                "guest's own (deadman_s in its config)")
            return
        probe.details.setdefault("guest_hooks", {})["deadman_s"] = deadman_s

    async def inner_writers(self) -> dict[str, Any] | None:
        if self._hooks:
            data = await self._agent().read_file(guest_hooks.RESULT_PATH, max_bytes=guest_hooks.MAX_BYTES)
            if not data.strip():
                raise AgentProtocolError(
                    "the guest hook runner left no report",
                    hint="is qemu-ga started with -F pointing at freezeframe's guest hook runner?",
                )
            return guest_hooks.parse_hook_result(data)
        if self._stock is None:
            return None
        agent = self._agent()
        after = await agent.time_ns() / 1e9 if self._stock.not_before is not None else None
        try:
            data, _, more = await agent.read_from(stock_hooks.LOG_PATH, self._stock.offset,
                                                  max_bytes=stock_hooks.MAX_BYTES)
        except AgentCommandError:
            return {"writers": [], "summary": {"runner": f"stock fsfreeze-hook ({stock_hooks.SCRIPT_PATH})",
                                               "log": None, "no_hook_because": stock_hooks.NO_LOG}}
        return stock_hooks.parse_log(data, not_before=self._stock.not_before, not_after=after, truncated=more)

    async def is_frozen(self, timeout: float) -> bool:
        return await self._agent().fsfreeze_status(timeout=timeout) is FreezeState.FROZEN

    async def freeze(self, timeout: float) -> int:
        try:
            return await self._agent().fsfreeze_freeze(timeout=timeout)
        except AgentCommandError as err:
            if self._windows:
                raise AgentError(vss.explain(err.desc)) from err
            raise

    async def thaw(self, timeout: float) -> int:
        return await self._agent().fsfreeze_thaw(timeout=timeout)

    # -- deletion ----------------------------------------------------------------------

    async def remove(self, disks: list[SnapshotDisk], moved: Callable[[str, str], None]) -> None:
        for disk in disks:
            if disk.image is None:
                continue
            merged = await self.merge_down(disk.image)
            if merged is not None:
                moved(merged, disk.image)

    async def merge_down(self, image: str) -> str | None:
        """Remove ``image`` from its disk's chain by committing the layer above into it;
        returns that layer's file (now merged and removed), or None when no running disk
        has ``image`` below its active layer."""
        raise NotImplementedError


class QemuTarget(GuestTarget):
    """Snapshot mechanics for one QEMU VM. Open with ``async with``."""

    kind = "qemu"

    def __init__(self, *, qmp_socket: str, qga_socket: str | None, qmp_timeout: float = 30.0,
                 agent: asyncio.Task[GuestAgent] | None = None) -> None:
        """``agent``: a connection to the guest agent already under way (``open_agent``),
        which this target then owns: its handshake overlaps whatever the caller did first."""
        super().__init__()
        self.monitor = Monitor(qmp_socket, timeout=qmp_timeout)
        self.qga_socket = qga_socket
        self._agent_task = agent
        self._prepared: list[_Overlay] = []

    async def connect(self) -> None:
        await self.monitor.connect()

    async def close(self) -> None:
        """Remove unused overlays, then close both channels."""
        try:
            await self.discard()
        finally:
            task, self._agent_task = self._agent_task, None
            await discard_agent(task)  # handed over but never used
            if self.agent is not None:
                await self.agent.close()
            await self.monitor.close()

    # -- discovery ---------------------------------------------------------------------

    async def disks(self) -> list[BlockDisk]:
        return await block_disks(self.monitor)

    async def skipped_disks(self) -> list[dict[str, str]]:
        return await skipped_drives(self.monitor)

    async def _format_nodes(self) -> dict[str, dict[str, Any]]:
        """Format-layer block nodes by file name (protocol nodes like 'file' are left out)."""
        nodes = await self.monitor.execute("query-named-block-nodes", {"flat": True})
        return {n["file"]: n for n in nodes if n["drv"] not in ("file", "host_device", "nbd")}

    async def connect_agent(self, timeout: float, command_timeout: float) -> GuestAgent:
        task, self._agent_task = self._agent_task, None
        if task is not None:
            self.agent = await task
            return self.agent
        if self.qga_socket is None:
            raise AgentUnavailable("the instance has no guest-agent socket configured",
                                   hint="set one with: freezeframe instance update NAME --qga SOCKET")
        self.agent = await open_agent(self.qga_socket, timeout=timeout, command_timeout=command_timeout)
        return self.agent

    # -- snapshot ----------------------------------------------------------------------

    async def prepare(self, snapshot_id: str) -> None:
        """Create and attach one overlay per disk, ready for the transaction."""
        disks = await self.disks()
        nodes = {n["node-name"]: n for n in await self.monitor.execute("query-named-block-nodes", {"flat": True})}
        tag = short_tag(snapshot_id)
        try:
            for index, disk in enumerate(disks):
                overlay = overlay_path(disk.filename, tag)
                await create_overlay(overlay, disk.filename, disk.format, disk.virtual_size)
                node = f"ff{tag}-{index}"
                self._prepared.append(_Overlay(disk, node, overlay, tuple(bitmaps.ours(nodes.get(disk.node, {})))))
                await self.monitor.execute(
                    "blockdev-add",
                    {
                        "driver": "qcow2",
                        "node-name": node,
                        "file": {"driver": "file", "filename": overlay},
                        "backing": None,
                    },
                )
        except BaseException:
            await self.discard()
            raise

    async def snapshot(self) -> list[SnapshotDisk]:
        """Switch every disk to its overlay in one atomic transaction."""
        if not self._prepared:
            raise HypervisorError("nothing prepared: call prepare() before snapshot()")
        actions = [
            {"type": "blockdev-snapshot", "data": {"node": o.disk.node, "overlay": o.node}}
            for o in self._prepared
        ]
        # The next incremental backup reads what these bitmaps mark: they move up with the
        # active layer, at the same instant (see targets/bitmaps.py).
        for o in self._prepared:
            actions += bitmaps.carry(o.disk.node, o.node, list(o.bitmaps))
        await self.monitor.execute("transaction", {"actions": actions})
        done, self._prepared = self._prepared, []
        # No QMP query here: this runs inside the freeze window, and query-named-block-nodes
        # nests every backing image, so its reply grows with the chain. A stat costs
        # microseconds and is what QEMU reports as actual-size for a file anyway.
        return [
            SnapshotDisk(
                device=overlay.disk.device,
                node=overlay.disk.node,
                image=overlay.disk.filename,
                virtual_size=overlay.disk.virtual_size,
                allocated_size=allocated_bytes(overlay.disk.filename),
            )
            for overlay in done
        ]

    async def discard(self) -> None:
        """Detach and remove overlays that were prepared but not used."""
        prepared, self._prepared = self._prepared, []
        for overlay in reversed(prepared):
            with contextlib.suppress(HypervisorError):
                await self.monitor.execute("blockdev-del", {"node-name": overlay.node})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(overlay.filename)

    # -- after a run died -----------------------------------------------------------

    async def adopt(self, snapshot_id: str) -> tuple[list[SnapshotDisk], list[str]]:
        """What a run that died left behind: the copies its transaction made (disks whose
        active layer is its overlay; the copy is the file below), and the overlays it
        prepared but never switched to, which are detached and deleted here."""
        tag = short_tag(snapshot_id)
        nodes = await self.monitor.execute("query-named-block-nodes", {"flat": True})
        by_file = {n["file"]: n for n in nodes if n["drv"] not in ("file", "host_device", "nbd")}
        taken = []
        active = set()
        for disk in await self.disks():
            active.add(disk.node)
            if f".ff-{tag}." not in Path(disk.filename).name:
                continue
            below = by_file.get(disk.filename, {}).get("backing_file")
            if below:
                taken.append(SnapshotDisk(device=disk.device, node=by_file.get(below, {}).get("node-name", ""),
                                          image=below, virtual_size=disk.virtual_size,
                                          allocated_size=allocated_bytes(below)))
        # The format node of an overlay attached with backing: null is named by a json:
        # pseudo-filename; the real file is on its protocol child (drv "file").
        in_use = {d.filename for d in await self.disks()} | {d.image for d in taken if d.image}
        files = {n["file"] for n in nodes
                 if n["drv"] == "file" and f".ff-{tag}." in Path(n["file"]).name and n["file"] not in in_use}
        for node in nodes:
            name = node["node-name"]
            if name.startswith(f"ff{tag}-") and name not in active:
                with contextlib.suppress(MonitorCommandError):
                    await self.monitor.execute("blockdev-del", {"node-name": name})
        removed = []
        for path in sorted(files):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        return taken, removed

    # -- deletion ----------------------------------------------------------------------

    async def merge_down(self, image: str) -> str | None:
        """Remove ``image`` from its disk's chain by committing the layer above into it.

        Returns the file of the layer that was merged (and removed), which now lives on
        in ``image``; None when no running disk uses ``image``.
        """
        nodes = await self._format_nodes()
        for disk in await self.disks():
            chain = disk_chain(disk, nodes)
            if image not in chain:
                continue
            position = chain.index(image)
            if position == 0:
                # A snapshot's image always has the disk's overlay above it. As the active
                # image it was merged already: by a delete killed before it was recorded,
                # or by hand (virsh blockcommit). Nothing is left to remove.
                return None
            above = chain[position - 1]
            job = qemu_id("ff-commit", nodes[image]["node-name"])
            args: dict[str, Any] = {"job-id": job, "device": disk.node, "base-node": nodes[image]["node-name"]}
            active = position == 1
            if not active:
                args["top-node"] = nodes[above]["node-name"]
            await self._run_commit(job, args, active, before_pivot=functools.partial(
                self._merge_bitmaps, nodes[above]["node-name"], nodes[image]["node-name"]))
            with contextlib.suppress(MonitorCommandError):
                # Overlays we added with blockdev-add keep a monitor reference.
                await self.monitor.execute("blockdev-del", {"node-name": nodes[above]["node-name"]})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(above)
            return above
        return None

    async def _merge_bitmaps(self, top: str, base: str) -> None:
        """Before an active commit's pivot: ``top``'s bitmaps of freezeframe's backups merged
        into ``base``'s (see targets/bitmaps.py). A lower layer's need nothing: the active
        layer above it holds a copy of each, carried up when the snapshot was taken."""
        nodes = {n["node-name"]: n for n in await self.monitor.execute("query-named-block-nodes", {"flat": True})}
        present = {str(b.get("name")) for b in nodes.get(base, {}).get("dirty-bitmaps", [])}
        actions = bitmaps.carry(top, base, bitmaps.ours(nodes.get(top, {})), present=present)
        if actions:
            await self.monitor.execute("transaction", {"actions": actions})

    async def _run_commit(self, job: str, args: dict[str, Any], active: bool,
                          before_pivot: Callable[[], Awaitable[None]]) -> None:
        async with self.monitor.events(
            "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED"
        ) as next_event:
            await self.monitor.execute("block-commit", args)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _JOB_TIMEOUT
            while True:
                event = await next_event(max(deadline - loop.time(), 0.1))
                data = event.get("data", {})
                if data.get("device") != job:
                    continue
                name = event["event"]
                if name == "BLOCK_JOB_READY" and active:
                    try:
                        await before_pivot()
                    except BaseException:
                        # The chain stays as it was: the snapshot is still there, and so are
                        # the bitmaps on top. A delete run again starts a new job.
                        with contextlib.suppress(HypervisorError):
                            await self.monitor.execute("job-cancel", {"id": job})
                        raise
                    await self.monitor.execute("job-complete", {"id": job})
                elif name == "BLOCK_JOB_COMPLETED":
                    if data.get("error"):
                        raise HypervisorError(f"merging the snapshot failed: {data['error']}")
                    return
                elif name in ("BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED"):
                    raise HypervisorError(f"merging the snapshot failed: {name.lower()}")


async def open_agent(socket: str, *, timeout: float, command_timeout: float) -> GuestAgent:
    """A synchronised connection to qemu-ga; AgentError when there is no usable agent."""
    agent = GuestAgent(socket, timeout=command_timeout)
    await agent.connect(timeout)
    return agent


async def discard_agent(task: asyncio.Task[GuestAgent] | None) -> None:
    """Let go of a connection started with ``open_agent`` that nobody used: stop it if it is
    still connecting, close it if it connected."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, AgentError):
        await (await task).close()


async def block_disks(monitor: Monitor) -> list[BlockDisk]:
    """Every writable disk with a medium; read-only and empty drives are not snapshotted."""
    found, _ = _drives(await monitor.execute("query-block"))
    if not found:
        raise HypervisorError("the VM has no writable disk to snapshot")
    return found


async def skipped_drives(monitor: Monitor) -> list[dict[str, str]]:
    """The drives left out, and why (for the manifest): nothing the guest writes is on them."""
    _, skipped = _drives(await monitor.execute("query-block"))
    return skipped


def _drives(entries: list[dict[str, Any]]) -> tuple[list[BlockDisk], list[dict[str, str]]]:
    found = []
    skipped = []
    for entry in entries:
        inserted = entry.get("inserted")
        if not inserted:
            skipped.append({"device": _device_name(entry, ""), "reason": "no medium (an empty drive)"})
            continue
        if inserted.get("ro"):
            skipped.append({"device": _device_name(entry, inserted.get("node-name", "")),
                            "reason": f"read-only ({inserted.get('file', '')})"})
            continue
        image = inserted["image"]
        found.append(
            BlockDisk(
                device=_device_name(entry, inserted["node-name"]),
                node=inserted["node-name"],
                filename=inserted["file"],
                format=inserted["drv"],
                virtual_size=int(image["virtual-size"]),
            )
        )
    return found, skipped


def qemu_id(prefix: str, name: str) -> str:
    """A QEMU identifier (job id, node name) for ``prefix`` and ``name``.

    QEMU takes a letter, then letters, digits, '-', '.' and '_', at most 31 characters of
    it for a node name. Names QEMU made itself (``#block126`` for a ``-drive``) or long
    ones do not fit; then the id carries a hash of the name, so two names never share one."""
    candidate = f"{prefix}-{name}"
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,30}", candidate):
        return candidate
    digest = hashlib.blake2s(name.encode(), digest_size=4).hexdigest()
    clean = re.sub(r"[^A-Za-z0-9._-]", "", name)
    return f"{prefix}-{clean[:31 - len(prefix) - 10]}-{digest}"


def short_tag(snapshot_id: str) -> str:
    """The short form of a snapshot id that names its overlay files and nodes."""
    return snapshot_id.replace("-", "")[:8]


def _device_name(entry: dict[str, Any], node: str) -> str:
    if entry.get("device"):
        return str(entry["device"])
    qdev = str(entry.get("qdev", ""))
    match = re.match(r"/machine/peripheral(?:-anon)?/([^/]+)", qdev)
    return match.group(1) if match else node


def disk_chain(disk: BlockDisk, nodes: dict[str, dict[str, Any]]) -> list[str]:
    """File names from the active image down to the base."""
    chain = [disk.filename]
    while True:
        backing = nodes.get(chain[-1], {}).get("backing_file")
        if not backing or backing in chain or backing not in nodes:
            return chain
        chain.append(backing)


def overlay_path(filename: str, tag: str) -> str:
    """``disk0.qcow2`` -> ``disk0.ff-<tag>.qcow2``, beside it; our own earlier suffix is
    dropped so names do not grow with every snapshot, and the stem is capped for names
    other tools made long."""
    path = Path(filename)
    stem = _OVERLAY_SUFFIX.sub("", path.name.removesuffix(".qcow2").removesuffix(".img"))[:96]
    return str(path.with_name(f"{stem}.ff-{tag}.qcow2"))


def allocated_bytes(filename: str) -> int:
    try:
        return os.stat(filename).st_blocks * 512
    except OSError:
        return 0


async def create_overlay(path: str, backing: str, backing_format: str, size: int, *, what: str = "overlay") -> None:
    """A qcow2 file at ``path`` on top of ``backing``. ``-u``: the backing file is not
    opened (the running VM holds its lock), so the size is given instead."""
    await _qemu_img_create(path, size, ["-F", backing_format, "-b", str(Path(backing).absolute()), "-u"], what)


async def create_empty(path: str, size: int, *, what: str) -> None:
    """An empty qcow2 file of ``size`` at ``path`` (a scratch image)."""
    await _qemu_img_create(path, size, [], what)


async def _qemu_img_create(path: str, size: int, options: list[str], what: str) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", *options, path, str(size)]
    process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = await process.communicate()
    except BaseException:
        # Cancelled: a snapshot prepares its overlays while the probe talks to the guest,
        # and a failed probe cancels this. qemu-img would go on and leave the file after
        # the run has cleaned up (seen under load): it is stopped, and what it made goes.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    if process.returncode != 0:
        raise HypervisorError(f"qemu-img could not create the {what} {path}: {err.decode().strip()}")
