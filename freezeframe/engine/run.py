"""Take and delete snapshots: preflight, prepare, freeze, snapshot, thaw, record.

The rules this module owns (DESIGN.md section 1):

* The achieved level is the highest level whose every condition held. Each condition
  that fails steps the level down, with its reason recorded, or, under
  ``on_failure=fail``, fails the snapshot and leaves nothing behind but a failed record.
* ``application`` needs at least one selected writer, and every one of them quiesced
  before the freeze and released after the thaw (``engine/quiesce.py`` runs them).
* Whatever happens after a freeze was attempted, the thaw runs (``finally``), and is then
  confirmed. A thaw that finds nothing frozen means the file systems were thawed under
  us: the filesystem level did not hold.
* An instance found frozen before we start (a previous run died) is thawed first, and
  that is recorded.

The order, so that nothing slow happens while anything is held::

    preflight -> writers prepare -> target prepare -> writers freeze -> file systems freeze
    -> snapshot -> file systems thaw -> writers thaw (reverse) -> record
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from freezeframe.agent import vss
from freezeframe.catalog.store import Catalog, utc_now
from freezeframe.engine import window
from freezeframe.engine.guard import Arming, Watcher
from freezeframe.engine.plan import SnapshotPlan
from freezeframe.engine.quiesce import Quiesce, WritersFailed
from freezeframe.errors import (
    AgentError,
    Conflict,
    FreezeframeError,
    FreezeNotHeld,
    HypervisorError,
    InvalidInput,
    SnapshotFailed,
)
from freezeframe.model import Instance, Level, OnFailure, Snapshot, SnapshotState
from freezeframe.process import start_time
from freezeframe.targets.base import Target
from freezeframe.targets.host import HostTarget
from freezeframe.targets.qemu import QemuTarget
from freezeframe.writers import make_writer

log = logging.getLogger(__name__)

#: Called with the name of each phase as it starts, for progress displays.
Progress = Callable[[str], None]
#: Makes the target for an instance. A seam for tests; the default is ``make_target``.
TargetFactory = Callable[[Instance], Target]

MANIFEST_FORMAT = "freezeframe-manifest/1"
#: The guard acts this long after the freeze budget, if the run has not thawed by then.
GUARD_GRACE = 10.0
#: The guest's own deadman thaws this long after the guard would have: the last resort,
#: for when this process, its guard and the agent's socket are all gone.
DEADMAN_MARGIN = 5.0
#: How long a thaw keeps trying to confirm (a freeze that timed out may still complete).
THAW_PATIENCE = 60.0
NO_WRITER = ("application level needs every selected writer to report itself quiesced, "
             "and no writer is configured (or selected) for this instance")


def make_target(instance: Instance, *, protect: Sequence[Path] = ()) -> Target:
    """The target for an instance. ``protect``: paths whose file systems must never be
    frozen (the catalog, the program itself)."""
    if instance.kind == "host":
        return HostTarget(mounts=instance.mounts, protect=[*protect, Path(__file__), Path.cwd()])
    if instance.kind == "libvirt":
        from freezeframe.targets.libvirt import LibvirtTarget  # libvirt loads only for its domains

        assert instance.libvirt_uri is not None
        assert instance.libvirt_domain is not None
        return LibvirtTarget(uri=instance.libvirt_uri, domain=instance.libvirt_domain)
    if not instance.qmp_socket:
        raise InvalidInput(
            f"instance {instance.name!r} has no QMP socket",
            hint=f"set one with: freezeframe instance update {instance.name} --qmp SOCKET",
        )
    return QemuTarget(qmp_socket=instance.qmp_socket, qga_socket=instance.qga_socket)


def _default_factory(catalog: Catalog) -> TargetFactory:
    return lambda instance: make_target(instance, protect=(catalog.path,))


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
            log.info("level %s not reached, and the policy is to fail: %s", self.level.value, reason)
            raise _StepDownRefused(reason)
        log.warning("stepping down from %s to %s level: %s", self.level.value, to.value, reason)
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
            self.ms[name] = round(self.ms.get(name, 0) + (self.now() - start) / 1e6, 3)


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
    target_factory: TargetFactory | None = None,
) -> Snapshot:
    """Take the planned snapshot and record it. Raises SnapshotFailed (with the failed
    record kept in the catalog) when it cannot be taken or the policy says fail."""
    with instance_lock(lock_dir, plan.instance.name):
        return await take_point(plan, catalog, progress=progress, target_factory=target_factory)


async def take_point(
    plan: SnapshotPlan,
    catalog: Catalog,
    *,
    progress: Progress | None = None,
    target_factory: TargetFactory | None = None,
    purpose: str = "snapshot",
) -> Snapshot:
    """The consistent point, for a snapshot or a backup alike: the caller holds the
    instance lock. ``purpose`` files the record (backup points are listed with backups)."""
    say = progress or (lambda phase: None)
    factory = target_factory or _default_factory(catalog)
    snap = Snapshot(
        id=plan.snapshot_id,
        name=plan.name,
        created_at=utc_now(),
        state=SnapshotState.CREATING,
        instance=plan.instance.name,
        requested_level=plan.level,
        purpose=purpose,
    )
    _close_stale_records(catalog, plan.instance.name)  # before this run's own record exists
    catalog.save_snapshot(snap)
    run = _Run(plan, snap, say, factory, catalog.path)
    try:
        await run.execute()
    except (_StepDownRefused, WritersFailed) as refused:
        _fail(catalog, run, f"{refused.reason} (the policy is fail, so no snapshot was kept)")
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


def _close_stale_records(catalog: Catalog, instance: str) -> None:
    """Holding the instance lock, any record still 'creating' is from a run that died."""
    for stale in catalog.snapshots(instance=instance, purpose=None):
        if stale.state is SnapshotState.CREATING:
            stale.state = SnapshotState.FAILED
            stale.error = stale.error or "interrupted: the run that took it ended without recording an outcome"
            catalog.save_snapshot(stale)


async def fault(point: str) -> None:
    """Fault injection for the tests: ``FREEZEFRAME_FAULT=after-freeze`` kills this process
    (SIGKILL, no clean-up) when the run reaches that point, ``stop-after-freeze`` stops it
    there (SIGSTOP: alive, holding everything, doing nothing); ``slow-snapshot:SECONDS`` at
    ``before-snapshot`` stalls it the way a stuck QMP call would (awaiting, so the rest of
    the run, its budget watchdog included, goes on). Nothing happens without the variable."""
    wanted = os.environ.get("FREEZEFRAME_FAULT")
    if not wanted:
        return
    if wanted == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if wanted == f"stop-{point}":
        os.kill(os.getpid(), signal.SIGSTOP)
    if point == "before-snapshot" and wanted == "during-snapshot":
        # Die a moment after the QMP transaction has been sent, while its reply is awaited.
        asyncio.get_running_loop().call_later(0.003, os.kill, os.getpid(), signal.SIGKILL)
    if point == "before-snapshot" and wanted.startswith("slow-snapshot:"):
        await asyncio.sleep(float(wanted.split(":", 1)[1]))


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

    def __init__(self, plan: SnapshotPlan, snap: Snapshot, say: Progress, target_factory: TargetFactory,
                 catalog_path: Path) -> None:
        self.plan = plan
        self.snap = snap
        self.say = say
        self.target_factory = target_factory
        self.policy = plan.policy
        self.ladder = _Ladder(plan.level, plan.policy.on_failure)
        self.quiesce = Quiesce(
            [make_writer(spec) for spec in plan.writers],
            lambda reason: self.ladder.step_down(Level.FILESYSTEM, reason),
        )
        self.clock = _Clock()
        self.catalog_path = catalog_path
        self.guard: Watcher | None = None
        #: Started early (see ``execute``), armed just before the first freeze.
        self._spare_guard: Watcher | None = None
        self.budget_cut: str | None = None
        #: Set when the guest reports it let go of the freeze before our thaw (Windows VSS).
        self.freeze_not_held: str | None = None
        self.inner_writers: list[dict[str, Any]] = []
        self.inner_problem: str | None = None
        #: Why the guest's hook evidence cannot be had, as the probe found.
        self.inner_unreadable: str | None = None
        self._window_start = 0
        self.freeze_window_ms: float | None = None
        #: The freeze window's instants, to split it into its hook and frozen phases.
        self.instants = window.Instants()
        #: Set once the freeze call has returned: the freeze budget counts from there.
        self._frozen = asyncio.Event()
        self.manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "instance": {"name": plan.instance.name, "kind": plan.instance.kind},
            "policy": {
                "level": plan.level.value,
                "on_failure": plan.policy.on_failure.value,
                "agent_timeout_s": plan.policy.agent_timeout,
                "freeze_timeout_s": plan.policy.freeze_timeout,
                "writers": [spec.name for spec in plan.writers],
            },
            "agent": None,
            "filesystems": [],
            "frozen_filesystems": 0,
            "thawed_filesystems": 0,
            "writers": [],
            "events": [],
            # UTC instants, to line the snapshot up with the applications' own logs.
            "window": {},
        }

    def event(self, text: str) -> None:
        log.info("%s: %s", self.plan.instance.name, text)
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
                "freeze_phases": window.split(self.instants, self.manifest.get("guest_hooks", {})),
                "writers": self.quiesce.manifests() + self.inner_writers,
                "disks": [asdict(d) for d in snap.disks],
                "error": snap.error,
            }
        )
        snap.manifest = self.manifest
        log.info("snapshot %s of %s %s: %s level (asked %s), frozen %s ms, phases %s", snap.name,
                 self.plan.instance.name, snap.state.value,
                 snap.achieved_level.value if snap.achieved_level else "no", snap.requested_level.value,
                 snap.freeze_window_ms, snap.timings_ms)

    async def execute(self) -> None:
        target = self.target_factory(self.plan.instance)
        self.say("preflight")
        if self.plan.level >= Level.FILESYSTEM or self.plan.writers:
            # Python's start-up (tens of ms) then overlaps the preflight, not the run.
            self._spare_guard = Watcher.start("freezeframe.engine.guard", what="the freeze guard")
        try:
            with self.clock.phase("connect"):
                await target.connect()
            await self._with_target(target)
        finally:
            try:
                await self.quiesce.release_all()
            finally:
                spare, self._spare_guard = self._spare_guard, None
                if spare is not None:
                    spare.cancel()
                await target.close()

    async def _with_target(self, target: Target) -> None:
        # Where the target allows it, its copies are prepared while the probe talks to the
        # guest: a VM's images are the host's, and neither waits for the other.
        preparing = asyncio.create_task(self._prepare(target)) if target.prepare_with_probe else None
        try:
            inner_expected = await self._preflight(target)
            if preparing is None:
                await self._prepare(target)
            else:
                await preparing
        except BaseException:
            if preparing is not None:
                # What it made is then discarded by target.close(); its own error, if any,
                # is not the one to report.
                preparing.cancel()  # nothing, when it is done
                with contextlib.suppress(BaseException):
                    await preparing
            raise

        try:
            try:
                await self._hold_and_snapshot(target)
            finally:
                if inner_expected:
                    await self._collect_inner(target)
            self._judge_writers()
        except (_StepDownRefused, WritersFailed):
            await self._undo(target)
            raise

    async def _prepare(self, target: Target) -> None:
        self.say("prepare")
        with self.clock.phase("prepare"):
            await target.prepare(self.snap.id)

    async def _preflight(self, target: Target) -> bool:
        """The probe, the level it leaves, and the writers' preparation; returns whether
        writers inside the guest will report."""
        inner_expected = False
        with self.clock.phase("preflight"):
            if self.ladder.level >= Level.FILESYSTEM:
                probe = await target.probe_freeze(
                    agent_timeout=self.policy.agent_timeout, command_timeout=self.policy.command_timeout,
                    deadman_s=self._guard_deadline() + DEADMAN_MARGIN)
                for text in probe.events:
                    self.event(text)
                self.manifest.update(probe.details)
                self.inner_unreadable = probe.inner_unreadable
                # Hooks the instance requires are looked for even where no evidence was
                # seen yet (the stock hook's log appears at the first freeze that runs it).
                inner_expected = probe.inner_writers or bool(self.plan.instance.guest_hooks)
                if probe.unusable:
                    self.ladder.step_down(Level.CRASH, probe.unusable)
                elif probe.freeze_limit is not None and self.policy.freeze_budget > probe.freeze_limit[0]:
                    limit, why = probe.freeze_limit
                    self.event(f"freeze budget lowered from {self.policy.freeze_budget:g}s to {limit:g}s: {why}")
                    self.policy = replace(self.policy, freeze_budget=limit)
                self.manifest["policy"]["freeze_budget_s"] = self.policy.freeze_budget
            # Writers inside the guest (its freeze hooks) only report after the thaw; without
            # them or host writers there is nothing that could make the level application.
            if self.ladder.level is Level.APPLICATION and not self.plan.writers and not inner_expected:
                self.ladder.step_down(Level.FILESYSTEM, NO_WRITER + (
                    f"; in the guest, {self.inner_unreadable}" if self.inner_unreadable else ""))

        if self.ladder.level is Level.APPLICATION and self.plan.writers:
            self.say("writers prepare")
            with self.clock.phase("writers_prepare"):
                await self.quiesce.prepare()
        return inner_expected

    async def _collect_inner(self, target: Target) -> None:
        """Read what the guest's hooks reported. Evidence, even when the freeze failed."""
        try:
            report = await target.inner_writers()
        except AgentError as err:
            self.inner_problem = f"the guest hook report could not be read: {err}"
            self.event(self.inner_problem)
            return
        if report is not None:
            self.inner_writers = report["writers"]
            self.manifest["guest_hooks"] = {**self.manifest.get("guest_hooks", {}), **report["summary"]}

    def _judge_writers(self) -> None:
        """Application level holds only if every selected writer, host or guest, held."""
        if self.ladder.level is not Level.APPLICATION:
            return
        if self.plan.writers and not self.quiesce.all_held:
            self.ladder.step_down(Level.FILESYSTEM, "not every selected writer held until the thaw")
        required = self.plan.instance.guest_hooks
        seen = {w["name"] for w in self.inner_writers}
        missing = [name for name in required if name not in seen]
        failed = [w for w in self.inner_writers if w["status"] != "ok"]
        if missing:
            evidence = self.manifest.get("guest_hooks", {})
            where = (evidence.get("no_hook_because") or evidence.get("log") or evidence.get("report")
                     or self.inner_unreadable or "no hook evidence")
            self.ladder.step_down(Level.FILESYSTEM, f"required guest hook{'s' if len(missing) > 1 else ''} "
                                                    f"{', '.join(missing)} did not run this freeze ({where})")
        if failed:
            self.ladder.step_down(Level.FILESYSTEM, "; ".join(
                f"guest hook {w['name']} {w['status']}: {w['error']}" for w in failed))
        elif self.inner_problem:
            self.ladder.step_down(Level.FILESYSTEM, self.inner_problem)
        elif not self.plan.writers and not self.inner_writers:
            why = self.manifest.get("guest_hooks", {}).get("no_hook_because")
            self.ladder.step_down(Level.FILESYSTEM, NO_WRITER + " (no guest freeze hook ran"
                                  + (f": {why})" if why else ")"))

    async def _hold_and_snapshot(self, target: Target) -> None:
        frozen = 0
        thawed = 0
        # Set from the first freeze call until the thaw has run: while it is set, every
        # way out of this block goes through a thaw.
        held = False
        freezing = self.ladder.level >= Level.FILESYSTEM
        if freezing or self.plan.writers:
            await self._arm_guard()
        watchdog: asyncio.Task[None] | None = None
        try:
            self.manifest["window"]["writers_freeze_started_at"] = utc_now()
            if self.plan.writers:
                self.say("writers freeze")
                with self.clock.phase("writers_freeze"):
                    await self.quiesce.freeze()
                await fault("after-writers-freeze")
            if self.ladder.level >= Level.FILESYSTEM:
                self.say("freeze")
                held = True
                watchdog = asyncio.create_task(self._budget_watchdog(target))
                with self.clock.phase("freeze"):
                    frozen = await self._freeze(target)
                await fault("after-freeze")
                if self.ladder.level < Level.FILESYSTEM:
                    # The freeze failed and the policy falls back: release the file systems
                    # before taking the crash-consistent snapshot, not after.
                    held = False
                    thawed = await self._thaw_and_confirm(target)
            self.say("snapshot")
            self.manifest["window"]["snapshot_started_at"] = utc_now()
            await fault("before-snapshot")
            with self.clock.phase("snapshot"):
                disks = await target.snapshot()
            # From here the copies exist: whatever happens next, the record keeps them,
            # so they can be found and removed.
            self.snap.disks = disks
            await fault("after-snapshot")
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
            released = not held
            try:
                if held:
                    self.say("thaw")
                    thawed = await self._thaw_and_confirm(target)
                    released = True
            finally:
                if self.plan.writers:
                    self.say("writers thaw")
                    with self.clock.phase("writers_thaw"):
                        await self.quiesce.thaw()
                self._disarm_guard(confirmed=released)
        if self.budget_cut is not None:
            self.ladder.step_down(Level.CRASH, self.budget_cut)
        elif self.freeze_not_held is not None:
            self.ladder.step_down(Level.CRASH, f"{self.freeze_not_held} (Windows VSS holds writes for at most "
                                               f"{vss.HOLD_LIMIT_S:g} s): the copy is not file-system consistent")
        elif frozen > 0 and thawed == 0:
            # Someone thawed the file systems while we held the freeze: the snapshot may
            # have caught them mid-write.
            self.ladder.step_down(
                Level.CRASH,
                f"the file systems were thawed under us before the snapshot completed "
                f"({frozen} frozen, the thaw found none frozen)",
            )

    def _guard_deadline(self) -> float:
        """Seconds from arming the guard until it takes over from a run that is alive but
        stuck: the freeze call (its hooks, bounded by the freeze timeout), then the budget
        the file systems may stay frozen, then the grace."""
        return self.policy.freeze_timeout + self.policy.freeze_budget + GUARD_GRACE

    async def _arm_guard(self) -> None:
        instance = self.plan.instance
        arming = Arming(
            snapshot_id=self.snap.id, catalog=str(self.catalog_path), owner_pid=os.getpid(),
            owner_start=start_time(os.getpid()), deadline_s=self._guard_deadline(),
            kind=instance.kind, qga_socket=instance.qga_socket, qmp_socket=instance.qmp_socket,
            mounts=instance.mounts, libvirt_uri=instance.libvirt_uri, libvirt_domain=instance.libvirt_domain,
        )
        watcher, self._spare_guard = self._spare_guard, None
        if watcher is None:
            watcher = Watcher.start("freezeframe.engine.guard", what="the freeze guard")
        await asyncio.to_thread(watcher.arm, asdict(arming))
        self.guard = watcher
        self.event(f"guard armed: it thaws the instance if this process dies, or after "
                   f"{arming.deadline_s:g}s")

    def _disarm_guard(self, *, confirmed: bool) -> None:
        guard, self.guard = self.guard, None
        if guard is None:
            return
        if confirmed:
            guard.disarm()
        else:
            # Not confirmed thawed: hand the instance to the guard, which thaws it now.
            guard.release()
            self.event("the thaw was not confirmed: the guard took over")

    async def _budget_watchdog(self, target: Target) -> None:
        """Thaw when the freeze budget runs out, whatever the run is stuck on. The budget
        bounds the time the file systems are frozen, so it counts from the freeze call's
        return: the guest's freeze hooks run before, inside the call, while the file systems
        still take writes, and the freeze timeout bounds them."""
        await self._frozen.wait()
        await asyncio.sleep(self.policy.freeze_budget)
        self.budget_cut = (f"the freeze was cut at its budget of {self.policy.freeze_budget:g}s "
                           "before the snapshot completed")
        self.event(f"freeze budget of {self.policy.freeze_budget:g}s ran out: thawing now")
        try:
            await target.thaw(self.policy.command_timeout)
        except (AgentError, HypervisorError) as err:
            self.event(f"the budget thaw failed: {err}")

    async def _freeze(self, target: Target) -> int:
        self.manifest["window"]["freeze_started_at"] = utc_now()
        self._window_start = self.instants.freeze_sent = self.clock.now()
        try:
            frozen = await target.freeze(self.policy.freeze_timeout)
            self.instants.freeze_returned = self.clock.now()
            self.manifest["window"]["frozen_at"] = utc_now()
        except (AgentError, HypervisorError) as err:
            # A freeze that timed out may still complete in the guest later (a slow hook):
            # the thaw that follows waits for it (see _thaw_and_confirm).
            self.ladder.step_down(Level.CRASH, f"freezing the file systems failed: {err}")
            return 0
        finally:
            self._frozen.set()
        self.manifest["frozen_filesystems"] = frozen
        if frozen == 0:
            self.ladder.step_down(Level.CRASH, "no file system was frozen (nothing mounted to freeze?)")
        return frozen

    async def _thaw_and_confirm(self, target: Target) -> int:
        """Thaw, then confirm; again and again until confirmed or ``THAW_PATIENCE`` runs
        out, so that a freeze still running in the guest (it timed out here) is thawed
        once it completes. Ends the freeze window at the first successful thaw. Raises only
        if the file systems cannot be confirmed thawed."""
        timeout = self.policy.command_timeout
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(THAW_PATIENCE, self.policy.freeze_timeout + 2 * timeout)
        last: Exception | None = None
        attempt = 0
        total = 0
        with self.clock.phase("thaw"):
            while attempt == 0 or loop.time() < give_up:
                attempt += 1
                if self.instants.thaw_sent is None:
                    self.instants.thaw_sent = self.clock.now()
                try:
                    thawed = await target.thaw(timeout)
                    total += thawed
                    self.manifest["window"].setdefault("thawed_at", utc_now())
                    if self.freeze_window_ms is None:
                        self.instants.thaw_returned = self.clock.now()
                        self.freeze_window_ms = round((self.instants.thaw_returned - self._window_start) / 1e6, 3)
                    still_frozen = await target.is_frozen(timeout)
                except FreezeNotHeld as err:
                    # The guest thawed (qemu-ga lets go whatever VSS said), but not at our
                    # thaw: the copy may postdate the hold. Confirm, then step down.
                    self.freeze_not_held = err.message
                    self.event(f"thaw attempt {attempt}: {err.message}")
                    self.manifest["window"].setdefault("thawed_at", utc_now())
                    if self.freeze_window_ms is None:
                        self.instants.thaw_returned = self.clock.now()
                        self.freeze_window_ms = round((self.instants.thaw_returned - self._window_start) / 1e6, 3)
                    try:
                        if not await target.is_frozen(timeout):
                            return total
                    except (AgentError, HypervisorError) as check:
                        last = check
                    continue
                except (AgentError, HypervisorError) as err:
                    last = err
                    self.event(f"thaw attempt {attempt} failed: {err}")
                    await asyncio.sleep(0.5)
                    continue
                self.manifest["thawed_filesystems"] = total
                if not still_frozen:
                    return total
                last = None
                self.event(f"thaw attempt {attempt}: still frozen")
        raise HypervisorError(
            "the file systems could not be confirmed thawed" + (f": {last}" if last else ""),
            hint="the freeze guard keeps trying; check the instance now",
        )

    async def _undo(self, target: Target) -> None:
        """Remove a snapshot we must not keep."""
        if self.snap.disks:
            with contextlib.suppress(FreezeframeError):
                # Only this run's own overlays sit above its copies: nothing another record names moves.
                await target.remove(self.snap.disks, lambda old, new: None)
        self.snap.disks = []


async def delete_snapshot(catalog: Catalog, ref: str, *, lock_dir: Path,
                          progress: Progress | None = None,
                          target_factory: TargetFactory | None = None) -> Snapshot:
    """Delete a snapshot: remove its copies (merging VM images back into the running
    chains), then mark it deleted."""
    say = progress or (lambda phase: None)
    snap = catalog.snapshot(ref)
    if snap.state is SnapshotState.DELETED:
        raise InvalidInput(f"snapshot {snap.name} ({snap.id}) is deleted already")
    if snap.purpose != "snapshot":
        raise InvalidInput(f"{snap.id} is the consistent point of a backup, not a snapshot",
                           hint=f"delete the backup with: freezeframe backup delete {snap.id}")
    with instance_lock(lock_dir, snap.instance):
        # A failed record may hold copies too, when the snapshot was taken but a later step failed.
        if snap.disks:
            target = (target_factory or _default_factory(catalog))(catalog.instance(snap.instance))
            snap.state = SnapshotState.DELETING
            catalog.save_snapshot(snap)
            say("remove")
            await target.connect()
            try:
                # The copy of another snapshot may move into this one's file: recorded at once.
                await target.remove(snap.disks, catalog.repoint_image)
            finally:
                await target.close()
        snap.state = SnapshotState.DELETED
        catalog.save_snapshot(snap)
        return snap


__all__ = ["Progress", "TargetFactory", "delete_snapshot", "fault", "instance_lock", "make_target", "take_point",
           "take_snapshot"]
