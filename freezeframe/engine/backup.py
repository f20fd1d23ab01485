"""Take a backup, and restore one.

A backup is a snapshot's consistent point (``take_point``: the same levels, writers,
guard and record as ``snapshot create``) whose last step makes a point-in-time view of
every disk instead of overlays, then a read of that view into the repository. The view
comes from the instance's ``BackupSource``: QEMU's image fleecing over QMP, or libvirt's
pull-mode backup with checkpoints; this module is the same for both::

    preflight  disks and their dirty bitmaps (or checkpoints); which one each disk reads,
               or why it is read in full; free space for the temporary snapshot data
    sentinel   armed: if this process dies, it removes the view from the VM
    point      take_point with the source's target (freeze, one transaction, thaw)
    read       NBD export of the view; block status; only the chunks needed, in parallel
    publish    one index per disk, then the manifest: only now is the backup listed
    teardown   export, job, temporary images, superseded bitmaps removed

The rules this module owns:

* An incremental reads only what the previous backup's bitmap marks; differential, what
  the last full's bitmap marks. A disk whose bitmap is missing, inconsistent, busy, on
  another node of its chain, or whose size changed, is read in full, with the reason.
* The bitmap a backup reads keeps recording until the backup has succeeded: a failed or
  killed backup loses no change, and the next one reads them all.
* A copy backup reads everything and touches no bitmap and no chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from freezeframe.agent.qga import GuestAgent
from freezeframe.backup.leases import Lease
from freezeframe.backup.pipeline import (
    DEFAULT_WORKERS,
    RESTORE_WORKERS,
    STEPS,
    Counters,
    back_up_disk,
    restore_disk,
    store_again,
)
from freezeframe.backup.reader import ALLOCATION, NbdExport, Need, plan_chunks
from freezeframe.backup.repository import DiskIndex, Repository
from freezeframe.backup.rollback import RollbackReport, roll_back
from freezeframe.catalog.store import Catalog, utc_now
from freezeframe.engine import sentinel
from freezeframe.engine.guard import Watcher
from freezeframe.engine.plan import SnapshotPlan
from freezeframe.engine.run import Progress, instance_lock, take_point
from freezeframe.errors import BackupFailed, FreezeframeError, HypervisorError, NotFound
from freezeframe.model import Backup, BackupDisk, BackupState, BackupType, Level, VerifyState
from freezeframe.process import ProcessIdentity
from freezeframe.targets.backup_source import BackupSource, source_for
from freezeframe.targets.bitmaps import PREFIX as BITMAP_PREFIX
from freezeframe.targets.fleecing import (
    DiskLayout,
    DiskState,
    Layout,
    check_space,
    disk_layout,
)
from freezeframe.targets.qemu import discard_agent, open_agent, short_tag

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Transfer:
    """Progress of the read: bytes to read in all, read so far, and the counters."""

    total: int
    done: int
    counters: Counters


#: Called from the reading thread as chunks complete.
TransferProgress = Callable[[Transfer], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class BackupPlan:
    #: The consistent point: instance, level, policy, writers; its snapshot_id is the backup's id.
    point: SnapshotPlan
    #: None: incremental when an earlier backup exists in this repository, else full.
    type: BackupType | None
    repository: Repository
    #: Where the temporary snapshot data (fleecing images) goes.
    fleecing_dir: Path
    #: Where the NBD socket goes.
    run_dir: Path
    workers: int = DEFAULT_WORKERS


@dataclass(frozen=True, slots=True)
class _Reads:
    since: str | None
    reason: str | None
    parent_index: str | None


async def take_backup(plan: BackupPlan, catalog: Catalog, *, lock_dir: Path, progress: Progress | None = None,
                      transfer: TransferProgress | None = None) -> Backup:
    """Back up every disk of the instance into the repository; returns the listed backup.
    Raises BackupFailed (the failed record kept, nothing listed) when it cannot."""
    instance = plan.point.instance
    source = source_for(instance)
    repo = plan.repository
    with instance_lock(lock_dir, instance.name):
        _close_stale(catalog, instance.name)
        chain = [b for b in catalog.backups(instance=instance.name, repository=repo.location)
                 if b.type is not BackupType.COPY and repo.has_backup(b.id)]
        last = chain[-1] if chain else None
        last_full = next((b for b in reversed(chain) if b.type is BackupType.FULL), None)
        kind = plan.type or (BackupType.INCREMENTAL if last else BackupType.FULL)
        # Both start now so that their waits (a Python start-up; the agent's handshake,
        # about 0.1 s under TCG) overlap the preflight instead of following it.
        began = time.monotonic()
        watcher = sentinel.start()
        agent = _early_agent(plan.point)
        held = contextlib.ExitStack()
        try:
            # Refusals come before any record: nothing is taken, nothing is left to clean.
            # The lease is taken before any chunk is stored or found stored, and held to
            # the end: garbage collection keeps what it protects (backup/gc.py).
            lease = held.enter_context(Lease.for_backup(repo.store, plan.point.snapshot_id, repo.lease_s,
                                                        instance.name))
            states = await source.inspect()
            check_space(plan.fleecing_dir, states)
        except BaseException:
            held.close()
            watcher.cancel()
            await discard_agent(agent)
            raise
        parent = last if kind is BackupType.INCREMENTAL else last_full if kind is BackupType.DIFFERENTIAL else None
        backup = Backup(id=plan.point.snapshot_id, instance=instance.name, type=kind, created_at=utc_now(),
                        state=BackupState.CREATING, repository=repo.location, parent=parent.id if parent else None)
        catalog.save_backup(backup)
        started = time.monotonic()
        try:
            with held:
                await _run(plan, catalog, backup, source, states, (parent, last, last_full), watcher, agent,
                           progress, transfer, began=began, lease=lease)
        except BaseException as err:
            backup.state = BackupState.FAILED
            backup.error = err.message if isinstance(err, FreezeframeError) else f"interrupted: {type(err).__name__}"
            backup.duration_s = round(time.monotonic() - started, 3)
            catalog.save_backup(backup)
            if isinstance(err, FreezeframeError):
                raise BackupFailed(f"backup of {instance.name} failed: {err.message}", snapshot_id=backup.id,
                                   hint=err.hint) from err
            raise
        backup.state = BackupState.CREATED
        backup.duration_s = round(time.monotonic() - started, 3)
        catalog.save_backup(backup)
        return catalog.backup(backup.id)


def _early_agent(point: SnapshotPlan) -> asyncio.Task[GuestAgent] | None:
    """The guest-agent connection the point will need, started now (None when it needs none)."""
    instance, policy = point.instance, point.policy
    if instance.qga_socket is None or point.level < Level.FILESYSTEM:
        return None
    return asyncio.create_task(open_agent(instance.qga_socket, timeout=policy.agent_timeout,
                                          command_timeout=policy.command_timeout))


def _close_stale(catalog: Catalog, instance: str) -> None:
    """Holding the instance lock, a backup still 'creating' is from a run that died."""
    for stale in catalog.backups(instance=instance, states=(BackupState.CREATING,)):
        stale.state = BackupState.FAILED
        stale.error = stale.error or "interrupted: the run that took it ended without recording an outcome"
        catalog.save_backup(stale)


def _choose_reads(state: DiskState, kind: BackupType, parent: Backup | None) -> _Reads:
    """Which bitmap this disk's changes come from, or why it is read in full."""
    if kind in (BackupType.FULL, BackupType.COPY):
        return _Reads(None, None, None)
    if parent is None:
        what = "no earlier backup" if kind is BackupType.INCREMENTAL else "no full backup"
        return _Reads(None, f"{what} of this instance in this repository", None)
    short = parent.id[:8]
    mine = next((d for d in parent.disks if d.device == state.disk.device), None)
    if state.disk.format != "qcow2":
        return _Reads(None, f"a {state.disk.format} image cannot keep a persistent dirty bitmap", None)
    if mine is None or mine.index is None:
        return _Reads(None, f"the disk is new since backup {short}", None)
    if mine.bitmap is None:
        return _Reads(None, f"backup {short} started no dirty bitmap on this disk", None)
    if mine.virtual_size != state.disk.virtual_size:
        return _Reads(None, f"the disk was resized since backup {short}", None)
    if parent.verify_state is VerifyState.FAILED:
        # Its chunks are not trusted: an incremental would name the damaged ones again.
        return _Reads(None, f"backup {short} failed its last verify ({parent.verified_at}): its chunks are not "
                            "reused", None)
    bitmap = state.bitmaps.get(mine.bitmap)
    if bitmap is None:
        if mine.bitmap in state.elsewhere:
            # freezeframe's snapshots carry the bitmap up: whatever put a layer on top did not.
            return _Reads(None, f"its dirty bitmap {mine.bitmap} is on {state.elsewhere[mine.bitmap]}, below the "
                                "disk's active layer: a layer was put on top without it (a snapshot or a copy "
                                "made by another tool), so the writes since are not marked", None)
        return _Reads(None, f"its dirty bitmap {mine.bitmap} is missing from every layer of the disk's chain: "
                            "QEMU stopped without saving it (killed or crashed), or another tool removed it, "
                            "replaced the image or merged away the layer that held it", None)
    if bitmap.inconsistent:
        return _Reads(None, f"its dirty bitmap {mine.bitmap} is inconsistent: QEMU stopped without saving it "
                            "(killed or crashed)", None)
    if bitmap.busy:
        return _Reads(None, f"its dirty bitmap {mine.bitmap} is in use by another operation", None)
    if not bitmap.recording:
        return _Reads(None, f"its dirty bitmap {mine.bitmap} is disabled and did not track every write", None)
    return _Reads(mine.bitmap, None, mine.index)


#: A bitmap (or libvirt checkpoint) of one repository's chain: ``ff-<repository>-<backup>``.
#: Names without the repository's part are from before bitmaps had one: taken as this
#: repository's.
_OTHER_REPOSITORY = re.compile(re.escape(BITMAP_PREFIX) + r"[0-9a-f]{8}-[0-9a-f]{8}")


def bitmap_prefix(repository_id: str) -> str:
    """Every bitmap a repository's backups start begins with this: each repository a VM is
    backed up into keeps a chain of its own, and none takes another's for stale."""
    return f"{BITMAP_PREFIX}{repository_id.replace('-', '')[:8]}-"


def _layout(plan: BackupPlan, backup: Backup, source: BackupSource, states: list[DiskState],
            parent: Backup | None, last: Backup | None, last_full: Backup | None) -> tuple[Layout, list[str | None]]:
    """The names to create, and for each disk the parent index its unchanged chunks come from."""
    kind = backup.type
    parent_indexes: list[str | None] = []
    short = short_tag(backup.id)
    mine = bitmap_prefix(plan.repository.identity.id)
    disks: list[DiskLayout] = []
    stale: list[tuple[str, str]] = []
    drop: list[tuple[str, str]] = []
    for position, state in enumerate(states):
        reads = _choose_reads(state, kind, parent)
        if reads.reason:
            log.info("backup %s reads disk %s in full: %s", backup.id[:8], state.disk.device, reads.reason)
        parent_indexes.append(reads.parent_index)
        start = f"{mine}{short}" if kind is not BackupType.COPY and state.disk.format == "qcow2" else None
        disks.append(disk_layout(backup.id, position, state.disk, plan.fleecing_dir / short,
                                 since=reads.since, frozen=f"ffr{short}" if reads.since else None,
                                 start=start, full_read_reason=reads.reason))
        if kind is BackupType.COPY:
            continue

        def bitmap_of(b: Backup | None, device: str = state.disk.device) -> str | None:
            found = next((d for d in b.disks if d.device == device), None) if b else None
            return found.bitmap if found else None

        chain = {bitmap_of(last), bitmap_of(last_full)} - {None}
        for name, info in state.bitmaps.items():
            if not name.startswith(BITMAP_PREFIX) or info.busy or name == reads.since:
                continue
            if _OTHER_REPOSITORY.fullmatch(name) and not name.startswith(mine):
                continue  # another repository's chain: stale or not is for its own backups to say
            if name not in chain or info.inconsistent:
                stale.append((state.disk.node, name))
        full_bitmap = start if kind is BackupType.FULL else bitmap_of(last_full)
        drop += [(state.disk.node, name) for name in chain
                 if name in state.bitmaps and name not in (start, full_bitmap)
                 and (state.disk.node, name) not in stale]
    layout = Layout(backup_id=backup.id, nbd_socket=str(plan.run_dir / f"{short}.nbd"), disks=tuple(disks),
                    drop_on_success=tuple(drop), stale=tuple(stale), **source.address)
    return layout, parent_indexes


async def _run(plan: BackupPlan, catalog: Catalog, backup: Backup, source: BackupSource, states: list[DiskState],
               history: tuple[Backup | None, Backup | None, Backup | None], watcher: Watcher,
               agent: asyncio.Task[GuestAgent] | None, progress: Progress | None,
               transfer: TransferProgress | None, *, began: float, lease: Lease) -> None:
    """``history``: the parent, the last backup and the last full of this instance here;
    ``began``: when the preflight began (monotonic)."""
    say = progress or (lambda phase: None)
    instance = plan.point.instance
    timings: dict[str, float] = {}
    clock = began
    say("preflight")
    layout, parent_indexes = _layout(plan, backup, source, states, *history)
    for disk in layout.disks:
        backup.disks.append(BackupDisk(device=disk.device, virtual_size=disk.virtual_size, bitmap=disk.start,
                                       full_read_reason=disk.full_read_reason))
    # The target owns the early agent connection from here: its close() closes it.
    # The sentinel must hold its task before the target changes anything in the VM: it
    # confirms then, so the sentinel's start-up overlaps the agent's handshake.
    target = source.target(layout, qga_socket=instance.qga_socket, agent=agent, before_changes=watcher.confirm)
    try:
        sentinel.send(watcher, catalog.path, layout)
    except BaseException:
        watcher.cancel()
        await target.close()
        raise
    torn_down = False
    try:
        timings["preflight"] = round(time.monotonic() - clock, 3)
        clock = time.monotonic()
        point = await take_point(plan.point, catalog, progress=say, target_factory=lambda _: target,
                                 purpose="backup")
        timings["point"] = round(time.monotonic() - clock, 3)
        backup.point = point
        success = False
        # Connections to the exports stay open until teardown has deleted the exports: then
        # QEMU closes them itself, in its main loop. A client that lets go first is handled
        # in the disk's iothread, and QEMU 7.2 (Debian 12) aborts on that (the VM dies):
        # "nbd_blockdev_client_closed: Assertion `qemu_in_main_thread() && nbd_server' failed".
        readers: list[NbdExport] = []

        def let_go() -> None:
            for reader in readers:
                reader.close()

        try:
            async with source.exported(layout):
                say("read")
                clock = time.monotonic()
                counters = await asyncio.to_thread(_read_all, plan, backup, layout, parent_indexes,
                                                 transfer, readers, watcher.hold, lease, say)
                timings["read_store"] = round(time.monotonic() - clock, 3)
            timings.update({f"{k}_thread_s": round(sum(c.seconds[k] for c in counters), 3) for k in STEPS})
            say("publish")
            # The lease re-read just before the manifest: published only if it surely held.
            await asyncio.to_thread(lease.check)
            plan.repository.put_manifest(backup.id, _manifest(backup, point.manifest))
            log.info("backup %s of %s published in %s", backup.id[:8], backup.instance, plan.repository.location)
            success = True
        finally:
            clock = time.monotonic()
            say("teardown")
            try:
                problems = await source.teardown(layout, success=success, exports_deleted=let_go)
            finally:
                let_go()
            torn_down = not problems
            timings["teardown"] = round(time.monotonic() - clock, 3)
            if problems:
                raise HypervisorError("the backup's view could not be fully removed from the VM: "
                                      + "; ".join(problems))
        # The view is gone: the point's record keeps the evidence, not paths that no longer exist.
        point.disks = []
        catalog.save_snapshot(point)
    except BaseException:
        if target.taken and not torn_down:
            with contextlib.suppress(FreezeframeError):
                torn_down = not await source.teardown(layout, success=False)
        raise
    finally:
        backup.timings_s = timings
        if torn_down or not target.taken:
            watcher.disarm()
        else:
            watcher.release()  # the sentinel takes the view down now


def _read_all(plan: BackupPlan, backup: Backup, layout: Layout, parent_indexes: list[str | None],
              transfer: TransferProgress | None, readers: list[NbdExport],
              hold: Callable[[int], None], lease: Lease, say: Callable[[str], None]) -> list[Counters]:
    """In a thread: block status of every disk first (so the total is known), then the reads,
    then the check that every chunk the indexes name is stored, then the indexes.
    The exports opened are added to ``readers``, for the caller to close after teardown;
    ``hold`` gets every connection's socket (the sentinel keeps it open if we die)."""
    repo = plan.repository
    fault = [f] if (f := _fault_after()) else []
    plans: list[list[Need]] = []
    parents: list[DiskIndex | None] = []
    for disk, parent_name in zip(layout.disks, parent_indexes, strict=True):
        source = NbdExport(layout.nbd_socket, disk.export, on_connect=hold)
        readers.append(source)
        allocation = source.extents(ALLOCATION)
        dirty = source.extents(f"qemu:dirty-bitmap:{disk.frozen}") if disk.frozen else None
        plans.append(plan_chunks(source.size, repo.chunk_size, allocation, dirty))
        parents.append(repo.index(parent_name) if dirty is not None and parent_name else None)
    total = sum(min(repo.chunk_size, s.size - i * repo.chunk_size)
                for s, p in zip(readers, plans, strict=True) for i, n in enumerate(p) if n is Need.READ)
    done_before = 0
    results: list[Counters] = []
    indexes: list[DiskIndex] = []
    for position, (disk, source) in enumerate(zip(layout.disks, readers, strict=True)):

        def report(read: int, counters: Counters, base: int = done_before) -> None:
            if fault and counters.new >= fault[0][1]:
                sig, _ = fault.pop()  # once: a stopped run, continued, goes on
                os.kill(os.getpid(), sig)
            if transfer is not None:
                transfer(Transfer(total, base + read, counters))

        index, counters = back_up_disk(repo, source, plans[position], backup_id=backup.id, device=disk.device,
                                       parent=parents[position], workers=plan.workers, progress=report,
                                       named=lease.name_chunks)
        indexes.append(index)
        done_before += counters.read
        results.append(counters)

    # Every chunk the indexes name, confirmed stored once garbage collection has surely seen
    # those this backup did not store itself (gc.py); one gone (pruned with a parent, or
    # lost) is read again from the view, which is still exported.
    lease.settle()
    missing = repo.missing_chunks(c for index in indexes for c in index.chunks if c is not None)
    if missing:
        say(f"storing again {len(missing)} chunk(s) the repository no longer holds")
        log.warning("storing again %d chunk(s) the repository no longer holds (pruned or lost meanwhile)",
                    len(missing))
    for position, (index, counters, source, record) in enumerate(
            zip(indexes, results, readers, backup.disks, strict=True)):
        if missing:
            record.chunks_stored_again = store_again(repo, source, index, missing, counters)
        record.index = repo.put_index(index, position)
        record.bytes_read, record.bytes_new, record.bytes_reused = counters.read, counters.new, counters.reused
        record.bytes_unchanged, record.bytes_stored = counters.unchanged, counters.stored
    return results


def _fault_after() -> tuple[int, int] | None:
    """Fault injection for the tests: ``FREEZEFRAME_FAULT=mid-read:BYTES`` kills this process
    (SIGKILL) once the chunks it stored hold that many bytes of the disk, before its index;
    ``stop-mid-read:BYTES`` stops it there (SIGSTOP: lease, exports and all held, nothing
    renewed) until someone continues it. The signal, and the bytes."""
    wanted = os.environ.get("FREEZEFRAME_FAULT", "")
    for prefix, sig in (("mid-read:", signal.SIGKILL), ("stop-mid-read:", signal.SIGSTOP)):
        if wanted.startswith(prefix):
            return sig, int(wanted[len(prefix):])
    return None


def _manifest(backup: Backup, point: dict[str, Any]) -> dict[str, Any]:
    level = backup.point.achieved_level if backup.point else None
    return {
        "id": backup.id, "instance": backup.instance, "type": backup.type.value, "created_at": backup.created_at,
        # Who took it: a repository shared by a fleet is listed from its manifests alone.
        "host": ProcessIdentity.current().host, "machine_id": ProcessIdentity.current().machine_id,
        "parent": backup.parent,
        "consistency": level.value if level else None,
        "fallback_reasons": backup.point.fallback_reasons if backup.point else [],
        "disks": [asdict(d) for d in backup.disks],
        # The evidence of the consistent point: writers, file systems, agent, timings, events.
        "point": point,
    }


# -- restore -----------------------------------------------------------------------------------


def _file_name(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", device) or "disk"


def _chosen_disks(repo: Repository, backup_id: str, devices: tuple[str, ...]) -> list[dict[str, Any]]:
    """The backup's disks named in ``devices`` (all when empty), as its manifest lists them."""
    disks: list[dict[str, Any]] = repo.manifest(backup_id)["disks"]
    known = [d["device"] for d in disks]
    unknown = [d for d in devices if d not in known]
    if unknown:
        raise NotFound(f"backup {backup_id[:8]} has no disk {', '.join(unknown)}",
                       hint=f"its disks: {', '.join(known)}")
    return [d for d in disks if not devices or d["device"] in devices]


def restore_backup(repo: Repository, backup_id: str, dest: Path, *, fmt: str = "qcow2",
                   devices: tuple[str, ...] = (), workers: int = RESTORE_WORKERS,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[str, Path]]:
    """Restore a backup's disks (or those named in ``devices``) as images in ``dest``,
    read from the repository alone. Returns (device, image) pairs."""
    chosen = _chosen_disks(repo, backup_id, devices)
    indexes = [repo.index(d["index"]) for d in chosen]
    total = sum(ix.chunk_length(i) for ix in indexes for i, c in enumerate(ix.chunks) if c is not None)
    done = 0
    restored = []
    try:
        for disk, index in zip(chosen, indexes, strict=True):
            path = dest / f"{_file_name(disk['device'])}.{fmt}"

            def report(written: int, base: int = done) -> None:
                if progress is not None:
                    progress(base + written, total)

            done += restore_disk(repo, index, path, fmt=fmt, workers=workers, progress=report)
            restored.append((disk["device"], path))
    except BaseException:
        # All or nothing: the disks restored so far are not the backup without the others.
        for _, path in restored:
            path.unlink(missing_ok=True)
        raise
    return restored


def roll_back_backup(repo: Repository, backup_id: str, dest: Path, *, devices: tuple[str, ...] = (),
                     workers: int = RESTORE_WORKERS,
                     progress: Callable[[int, int], None] | None = None) -> list[RollbackReport]:
    """Restore a backup's disks onto the images an earlier restore left in ``dest``
    (``DEVICE.raw`` or ``DEVICE.qcow2``), writing only the chunks that differ."""
    chosen = _chosen_disks(repo, backup_id, devices)
    images = []
    for disk in chosen:
        name = _file_name(disk["device"])
        found = [p for p in (dest / f"{name}.raw", dest / f"{name}.qcow2") if p.exists()]
        if len(found) != 1:
            raise NotFound(f"{dest} holds {'no' if not found else 'two'} image(s) of disk {disk['device']} "
                           f"({name}.raw or {name}.qcow2)",
                           hint="restore in place onto the images a restore of this backup's VM wrote there")
        images.append(found[0])
    indexes = [repo.index(d["index"]) for d in chosen]
    total = sum(ix.virtual_size for ix in indexes)
    reports = []
    done = 0
    for index, image in zip(indexes, images, strict=True):

        def report(read: int, base: int = done) -> None:
            if progress is not None:
                progress(base + read, total)

        reports.append(roll_back(repo, index, image, workers=workers, progress=report))
        done += index.virtual_size
    return reports
