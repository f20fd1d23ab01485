"""Turn a request into a plan: which instance, which level, which writers, which policy.
Pure: no I/O."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from freezeframe.catalog.store import validate_name
from freezeframe.errors import InvalidInput
from freezeframe.model import Instance, Level, OnFailure, Policy, WriterSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotPlan:
    snapshot_id: str
    name: str
    instance: Instance
    policy: Policy
    #: The selected writers, in the order they quiesce.
    writers: tuple[WriterSpec, ...] = ()

    @property
    def level(self) -> Level:
        return self.policy.level


def plan_snapshot(
    instance: Instance,
    *,
    now: datetime,
    name: str | None = None,
    level: Level | None = None,
    on_failure: OnFailure = OnFailure.FALLBACK,
    agent_timeout: float | None = None,
    freeze_timeout: float | None = None,
    freeze_budget: float | None = None,
    writers: Sequence[WriterSpec] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    snapshot_id: str | None = None,
) -> SnapshotPlan:
    """Decide what to attempt. Without an explicit level, ask for ``application`` when the
    instance (or its template) has application-consistent snapshots enabled, else ``crash``.
    ``include`` (if given) and ``exclude`` select among the instance's ``writers`` by name."""
    if instance.kind == "qemu" and not instance.qmp_socket:
        raise InvalidInput(
            f"instance {instance.name!r} has no QMP socket",
            hint=f"set one with: freezeframe instance update {instance.name} --qmp SOCKET",
        )
    if instance.kind == "host" and not instance.mounts:
        raise InvalidInput(f"host instance {instance.name!r} has no mount points to snapshot")
    if level is None:
        level = Level.APPLICATION if instance.application_consistent else Level.CRASH
    if name is None:
        name = f"{instance.name}-{now.strftime('%Y%m%dT%H%M%SZ')}"
    validate_name("snapshot", name)
    known = {w.name for w in writers}
    for chosen in (*include, *exclude):
        if chosen not in known:
            raise InvalidInput(
                f"instance {instance.name!r} has no writer named {chosen!r}",
                hint=f"its writers: {', '.join(sorted(known)) or 'none'} (see: freezeframe writer list)",
            )
    selected = tuple(w for w in writers if (not include or w.name in include) and w.name not in exclude)
    timeouts: dict[str, float] = {}
    if agent_timeout is not None:
        timeouts["agent_timeout"] = agent_timeout
    if freeze_timeout is not None:
        timeouts["freeze_timeout"] = freeze_timeout
    budget = freeze_budget if freeze_budget is not None else instance.freeze_budget
    if budget is not None:
        timeouts["freeze_budget"] = budget
    return SnapshotPlan(
        snapshot_id=snapshot_id or str(uuid.uuid4()),
        name=name,
        instance=instance,
        policy=Policy(level=level, on_failure=on_failure, **timeouts),
        writers=selected,
    )
