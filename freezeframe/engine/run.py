"""Take and delete snapshots: preflight, prepare, freeze, snapshot, thaw, record.

The rules this module owns (DESIGN.md section 1):

* The achieved level is the highest level whose every condition held. Each condition
  that fails steps the level down, with its reason recorded, or, under
  ``on_failure=fail``, fails the snapshot and leaves nothing behind but a failed record.
* Whatever happens after a freeze was attempted, the thaw runs (``finally``), and is then
  confirmed with fsfreeze-status. A thaw that finds nothing frozen means the file systems
  were thawed under us: the filesystem level did not hold.
* A guest found frozen before we start (a previous run died) is thawed first, and that is
  recorded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from freezeframe.agent.qga import FreezeState
from freezeframe.catalog.store import Catalog, utc_now
from freezeframe.engine.plan import SnapshotPlan
from freezeframe.errors import (
    AgentError,
    Conflict,
    FreezeframeError,
    HypervisorError,
    InvalidInput,
    SnapshotFailed,
)
from freezeframe.model import Instance, Level, OnFailure, Snapshot, SnapshotDisk, SnapshotState
from freezeframe.targets.qemu import QemuTarget

#: Called with the name of each phase as it starts, for progress displays.
Progress = Callable[[str], None]
#: Makes the target for an instance. A seam for tests; the default is QemuTarget.
TargetFactory = Callable[[Instance], QemuTarget]


def qemu_target(instance: Instance) -> QemuTarget:
    if not instance.qmp_socket:
        raise InvalidInput(f"instance {instance.name!r} has no QMP socket")
    return QemuTarget(qmp_socket=instance.qmp_socket, qga_socket=instance.qga_socket)

MANIFEST_FORMAT = "freezeframe-manifest/1"
#: Commands the agent must allow for a filesystem-consistent snapshot.
FREEZE_COMMANDS = ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status")


class _StepDownRefused(Exception):
    """The policy is ``fail`` and a condition of the requested level failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Ladder:
    level: Level
    on_failure: OnFailure
    reasons: list[str] = field(default_factory=list)

    def step_down(self, to: Level, reason: str) -> None:
        if to >= self.level:
            return
        if self.on_failure is OnFailure.FAIL:
            raise _StepDownRefused(reason)
        self.reasons.append(reason)
        self.level = to


class _Clock:
    """Per-phase wall times in milliseconds, from a monotonic clock."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @staticmethod
    def now() -> int:
        return time.perf_counter_ns()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.ms[name] = round((self.now() - start) / 1e6, 3)


@contextlib.contextmanager
def instance_lock(lock_dir: Path, instance: str) -> Iterator[None]:
    """One snapshot operation per instance at a time. flock is released by the kernel when
    the holder dies, so a killed run never leaves the instance locked."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_dir / f"{instance}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(
                f"another freezeframe run is working on instance {instance!r}",
                hint="wait for it to finish, then try again",
            ) from None
        yield
    finally:
        os.close(fd)


async def take_snapshot(
    plan: SnapshotPlan,
    catalog: Catalog,
    *,
    lock_dir: Path,
    progress: Progress | None = None,
    target_factory: TargetFactory = qemu_target,
) -> Snapshot:
    """Take the planned snapshot and record it. Raises SnapshotFailed (with the failed
    record kept in the catalog) when it cannot be taken or the policy says fail."""
    say = progress or (lambda phase: None)
    snap = Snapshot(
        id=plan.snapshot_id,
        name=plan.name,
        created_at=utc_now(),
        state=SnapshotState.CREATING,
        instance=plan.instance.name,
        requested_level=plan.level,
    )
    with instance_lock(lock_dir, plan.instance.name):
        catalog.save_snapshot(snap)
        run = _Run(plan, snap, say, target_factory)
        try:
            await run.execute()
        except _StepDownRefused as refused:
            _fail(catalog, run, f"{refused.reason} (on-failure is fail, so no snapshot was kept)")
        except FreezeframeError as err:
            _fail(catalog, run, err.message, cause=err)
        except BaseException as err:
            # Interrupted (Ctrl-C, cancellation): keep an honest record, then let it go on.
            snap.state = SnapshotState.FAILED
            snap.error = f"interrupted: {type(err).__name__}"
            run.finish_record()
            catalog.save_snapshot(snap)
            raise
        say("record")
        snap.state = SnapshotState.CREATED
        run.finish_record()
        catalog.save_snapshot(snap)
        return snap


def _fail(catalog: Catalog, run: _Run, message: str, cause: Exception | None = None) -> NoReturn:
    snap = run.snap
    snap.state = SnapshotState.FAILED
    snap.error = message
    snap.achieved_level = None
    run.finish_record()
    catalog.save_snapshot(snap)
    failure = SnapshotFailed(f"snapshot of {snap.instance} failed: {message}", snapshot_id=snap.id,
                             hint=cause.hint if isinstance(cause, FreezeframeError) else None)
    if cause is not None:
        raise failure from cause
    raise failure


class _Run:
    """The state of one snapshot attempt, so that every exit path can record what happened."""

    def __init__(self, plan: SnapshotPlan, snap: Snapshot, say: Progress, target_factory: TargetFactory) -> None:
        self.plan = plan
        self.target_factory = target_factory
        self.snap = snap
        self.say = say
        self.policy = plan.policy
        self.ladder = _Ladder(plan.level, plan.policy.on_failure)
        self.clock = _Clock()
        self._window_start = 0
        self.freeze_window_ms: float | None = None
        self.manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "instance": {"name": plan.instance.name, "kind": plan.instance.kind},
            "policy": {
                "level": plan.level.value,
                "on_failure": plan.policy.on_failure.value,
                "agent_timeout_s": plan.policy.agent_timeout,
                "freeze_timeout_s": plan.policy.freeze_timeout,
            },
            "agent": None,
            "filesystems": [],
            "frozen_filesystems": 0,
            "thawed_filesystems": 0,
            "writers": [],
            "events": [],
        }

    def event(self, text: str) -> None:
        self.manifest["events"].append({"at": utc_now(), "event": text})

    def finish_record(self) -> None:
        snap = self.snap
        snap.fallback_reasons = list(self.ladder.reasons)
        snap.timings_ms = dict(self.clock.ms)
        snap.freeze_window_ms = self.freeze_window_ms
        if snap.state is not SnapshotState.FAILED:
            snap.achieved_level = self.ladder.level
        self.manifest.update(
            {
                "snapshot": {"id": snap.id, "name": snap.name, "created_at": snap.created_at},
                "requested_level": snap.requested_level.value,
                "achieved_level": snap.achieved_level.value if snap.achieved_level else None,
                "fallback_reasons": snap.fallback_reasons,
                "timings_ms": snap.timings_ms,
                "freeze_window_ms": snap.freeze_window_ms,
                "disks": [asdict(d) for d in snap.disks],
                "error": snap.error,
            }
        )
        snap.manifest = self.manifest

    async def execute(self) -> None:
        target = self.target_factory(self.plan.instance)
        self.say("preflight")
        try:
            with self.clock.phase("connect"):
                await target.connect()
            await self._with_target(target)
        finally:
            await target.close()

    async def _with_target(self, target: QemuTarget) -> None:
        with self.clock.phase("preflight"):
            await target.disks()
            if self.ladder.level >= Level.FILESYSTEM:
                await self._preflight_agent(target)
            if self.ladder.level is Level.APPLICATION:
                self.ladder.step_down(
                    Level.FILESYSTEM,
                    "application level needs every selected writer to report itself quiesced, "
                    "and no application writer is configured for this instance",
                )

        self.say("prepare")
        with self.clock.phase("prepare"):
            await target.prepare(self.snap.id)

        frozen = 0
        thawed = 0
        # Set from the first freeze call until the thaw has run: while it is set, every
        # way out of this block goes through a thaw.
        held = False
        disks: list[SnapshotDisk] = []
        try:
            if self.ladder.level >= Level.FILESYSTEM:
                self.say("freeze")
                held = True
                with self.clock.phase("freeze"):
                    frozen = await self._freeze(target)
                if self.ladder.level < Level.FILESYSTEM:
                    # The freeze failed and the policy falls back: release the guest before
                    # taking the crash-consistent snapshot, not after.
                    held = False
                    thawed = await self._thaw_and_confirm(target)
            self.say("snapshot")
            with self.clock.phase("snapshot"):
                disks = await target.snapshot()
            # From here the images are in the VM's chains: whatever happens next, the
            # record keeps them, so they can be found and merged back.
            self.snap.disks = disks
        finally:
            if held:
                self.say("thaw")
                thawed = await self._thaw_and_confirm(target)
        if frozen > 0 and thawed == 0:
            # Someone thawed the guest while we held the freeze: the snapshot may have
            # caught the file systems mid-write.
            try:
                self.ladder.step_down(
                    Level.CRASH,
                    f"the file systems were thawed under us before the snapshot completed "
                    f"({frozen} frozen, the thaw found none frozen)",
                )
            except _StepDownRefused:
                await self._undo(target, disks)
                raise

    async def _preflight_agent(self, target: QemuTarget) -> None:
        policy = self.policy
        try:
            await target.connect_agent(policy.agent_timeout, policy.command_timeout)
            # First the freeze state: while frozen, qemu-ga reports most commands disabled,
            # so what it allows can only be judged once it is thawed.
            if await target.freeze_state() is FreezeState.FROZEN:
                thawed = await target.thaw(policy.command_timeout)
                self.event(f"the guest was found frozen before the snapshot (a previous run died?); "
                           f"thawed {thawed} file systems")
                if await target.freeze_state() is FreezeState.FROZEN:
                    raise HypervisorError("the guest was found frozen and stays frozen after a thaw",
                                          hint="check qemu-ga in the guest")
            info = await target.agent_info()
        except AgentError as err:
            self.ladder.step_down(Level.CRASH, f"no usable guest agent: {err}")
            return
        self.manifest["agent"] = {"version": info.version}
        blocked = [c for c in FREEZE_COMMANDS if not info.allows(c)]
        if blocked:
            self.ladder.step_down(
                Level.CRASH, f"the guest agent does not allow {', '.join(blocked)} (blocked by its configuration)"
            )
            return
        if info.allows("guest-get-fsinfo"):
            try:
                self.manifest["filesystems"] = [
                    {"mountpoint": fs.mountpoint, "type": fs.type, "name": fs.name,
                     "devices": [d.dev for d in fs.disks if d.dev]}
                    for fs in await target.filesystems()
                ]
            except AgentError as err:
                self.ladder.step_down(Level.CRASH, f"the guest agent failed in preflight: {err}")

    async def _freeze(self, target: QemuTarget) -> int:
        self._window_start = self.clock.now()
        try:
            frozen = await target.freeze(self.policy.freeze_timeout)
        except AgentError as err:
            self.ladder.step_down(Level.CRASH, f"freezing the guest file systems failed: {err}")
            return 0
        self.manifest["frozen_filesystems"] = frozen
        if frozen == 0:
            self.ladder.step_down(Level.CRASH, "the guest agent froze no file system (nothing mounted to freeze?)")
        return frozen

    async def _thaw_and_confirm(self, target: QemuTarget) -> int:
        """Thaw, then confirm with fsfreeze-status; two tries. Ends the freeze window at the
        first successful thaw. Raises only if the guest cannot be confirmed thawed."""
        timeout = self.policy.command_timeout
        last: Exception | None = None
        with self.clock.phase("thaw"):
            for attempt in (1, 2):
                try:
                    thawed = await target.thaw(timeout)
                    if self.freeze_window_ms is None:
                        self.freeze_window_ms = round((self.clock.now() - self._window_start) / 1e6, 3)
                    state = await target.freeze_state(timeout)
                except AgentError as err:
                    last = err
                    self.event(f"thaw attempt {attempt} failed: {err}")
                    continue
                self.manifest["thawed_filesystems"] = thawed
                if state is FreezeState.THAWED:
                    return thawed
                last = None
                self.event(f"thaw attempt {attempt}: the guest still reports frozen")
        raise HypervisorError(
            "the guest could not be confirmed thawed" + (f": {last}" if last else ""),
            hint="check the guest now; freezeframe snapshot create thaws a frozen guest first",
        )

    async def _undo(self, target: QemuTarget, disks: list[SnapshotDisk]) -> None:
        """Merge a snapshot we must not keep back into the running disks."""
        for disk in disks:
            with contextlib.suppress(FreezeframeError):
                await target.merge_down(disk.image)
        self.snap.disks = []


async def delete_snapshot(catalog: Catalog, ref: str, *, lock_dir: Path,
                          progress: Progress | None = None) -> Snapshot:
    """Delete a snapshot: merge its images out of the running VM's chains, then mark it deleted."""
    say = progress or (lambda phase: None)
    snap = catalog.snapshot(ref)
    if snap.state is SnapshotState.DELETED:
        raise InvalidInput(f"snapshot {snap.name} ({snap.id}) is deleted already")
    with instance_lock(lock_dir, snap.instance):
        # A failed record may hold disks too, when the snapshot was taken but a later step failed.
        if snap.disks:
            target = qemu_target(catalog.instance(snap.instance))
            snap.state = SnapshotState.DELETING
            catalog.save_snapshot(snap)
            say("merge")
            async with target:
                for disk in snap.disks:
                    merged = await target.merge_down(disk.image)
                    if merged is not None:
                        # The layer above now lives in this disk's image file.
                        catalog.repoint_image(merged, disk.image)
        snap.state = SnapshotState.DELETED
        catalog.save_snapshot(snap)
        return snap
