"""The one interface every kind of instance offers the engine.

A target knows the mechanics (how to freeze its file systems, how to take and remove a
copy); the engine decides the policy (what a failure means for the level).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from freezeframe.model import SnapshotDisk


@dataclass(slots=True)
class FreezeProbe:
    """What preflight learnt about freezing this instance's file systems."""

    #: None when the file systems can be frozen; else why not, for the fallback reasons.
    unusable: str | None = None
    #: Things worth recording that happened (a guest found frozen and thawed, ...).
    events: list[str] = field(default_factory=list)
    #: Material for the manifest: agent version, file systems and how each is copied.
    details: dict[str, Any] = field(default_factory=dict)
    #: Writers run inside the instance (guest freeze hooks) and will report after the thaw.
    inner_writers: bool = False
    #: Why the guest's hook evidence cannot be had (commands blocked, no hook set up), for
    #: the reason a snapshot asked for ``application`` steps down; None when it can.
    inner_unreadable: str | None = None
    #: The longest the instance can hold a freeze (Windows VSS), and why; None: no limit known.
    freeze_limit: tuple[float, str] | None = None


class Target(Protocol):
    kind: str
    #: ``prepare`` does not depend on what ``probe_freeze`` does, so the engine may run
    #: them at once: true for VMs (images on the host, the agent in the guest), false on a
    #: host, whose probe may thaw the very file systems its prepare writes to.
    prepare_with_probe: bool

    async def connect(self) -> None: ...

    async def close(self) -> None:
        """Release everything, including copies prepared but not taken."""

    async def probe_freeze(self, *, agent_timeout: float, command_timeout: float,
                           deadman_s: float | None = None) -> FreezeProbe:
        """Find out whether the file systems can be frozen; thaw any left frozen. Where the
        instance runs freezeframe's own freeze hooks, arm their deadman: if no thaw has come
        ``deadman_s`` after the freeze, the instance thaws itself."""

    async def prepare(self, snapshot_id: str) -> None:
        """Everything slow that can happen before the freeze."""

    async def freeze(self, timeout: float) -> int:
        """Freeze the file systems; returns how many were frozen."""

    async def thaw(self, timeout: float) -> int:
        """Thaw them; returns how many were frozen until now (0: none was)."""

    async def is_frozen(self, timeout: float) -> bool: ...

    async def snapshot(self) -> list[SnapshotDisk]:
        """Take the copy of every disk or file system at one instant."""

    async def inner_writers(self) -> dict[str, Any] | None:
        """After the thaw: what the writers inside the instance reported (``{"writers": [...],
        "summary": {...}}``), or None when it has none. Raises AgentError on a bad report."""

    async def remove(self, disks: list[SnapshotDisk], moved: Callable[[str, str], None]) -> None:
        """Delete a snapshot's copies. ``moved(old, new)`` is called, as soon as it happens,
        for the copy of another snapshot that now lives in another file (a merge moved it),
        so that a delete that fails halfway leaves no record naming a file that is gone.
        Copies already removed are skipped, so a failed or killed delete can run again."""
