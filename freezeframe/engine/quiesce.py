"""The writer runner: prepare, freeze and thaw the selected writers under their timeouts,
with retries, and apply each writer's failure policy.

The policies, for a writer that fails (an error, or no answer within its timeout):

``fail``      no snapshot: every writer is released and the run stops.
``continue``  this writer is released and marked failed; the others go on, the snapshot
              is taken, and the level steps down to filesystem (not every writer held).
``fallback``  every writer is released at once and the snapshot steps down to filesystem
              (or lower), without application coordination at all.

Only writers that froze are thawed, in reverse order. A writer that fails to thaw is
aborted, which must release it, and counts as failed.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from freezeframe.model import WriterFailure
from freezeframe.writers import Writer, WriterError

#: How long ``abort`` may take before the runner gives up on a writer.
ABORT_TIMEOUT = 10.0


class WriterState(enum.Enum):
    PENDING = "pending"
    PREPARED = "prepared"
    FROZEN = "frozen"
    THAWED = "thawed"  # the whole cycle succeeded
    FAILED = "failed"
    RELEASED = "released"  # let go without failing itself, because another writer failed


class WritersFailed(Exception):
    """A writer with policy ``fail`` failed: no snapshot may be taken."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Entry:
    writer: Writer
    state: WriterState = WriterState.PENDING
    error: str | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)


class Quiesce:
    """Runs one snapshot's writers. ``step_down(reason)`` is how a failure reaches the
    engine's ladder (which may itself refuse, under the snapshot's own fail policy)."""

    def __init__(self, writers: list[Writer], step_down: Callable[[str], None]) -> None:
        self._entries = [_Entry(w) for w in writers]
        self._step_down = step_down

    @property
    def all_held(self) -> bool:
        """True when there are writers and every one completed its whole cycle."""
        return bool(self._entries) and all(e.state is WriterState.THAWED for e in self._entries)

    async def prepare(self) -> None:
        for entry in self._entries:
            if entry.state is WriterState.PENDING and await self._step(entry, "prepare"):
                entry.state = WriterState.PREPARED

    async def freeze(self) -> None:
        for entry in self._entries:
            if entry.state is WriterState.PREPARED and await self._step(entry, "freeze"):
                entry.state = WriterState.FROZEN

    async def thaw(self) -> None:
        for entry in reversed(self._entries):
            if entry.state is WriterState.FROZEN and await self._step(entry, "thaw", retry=False):
                entry.state = WriterState.THAWED

    async def release_all(self) -> None:
        """Let go of every writer still holding anything (after a failure, or on the way out)."""
        for entry in reversed(self._entries):
            if entry.state in (WriterState.PREPARED, WriterState.FROZEN):
                await self._abort(entry)
                entry.state = WriterState.RELEASED
            elif entry.state is WriterState.PENDING:
                entry.state = WriterState.RELEASED  # never started: nothing to let go of

    async def _step(self, entry: _Entry, phase: str, *, retry: bool = True) -> bool:
        """Run one phase with the writer's timeout and retries; on failure apply its policy.
        Returns True if the phase succeeded."""
        spec = entry.writer.spec
        tries = 1 + (spec.retries if retry else 0)
        start = time.perf_counter()
        error = ""
        for attempt in range(1, tries + 1):
            entry.attempts[phase] = attempt
            try:
                await asyncio.wait_for(getattr(entry.writer, phase)(), spec.timeout)
            except TimeoutError:
                error = f"no answer within {spec.timeout:g}s"
            except WriterError as err:
                error = str(err)
            else:
                entry.phases_ms[phase] = round((time.perf_counter() - start) * 1000, 3)
                return True
        entry.phases_ms[phase] = round((time.perf_counter() - start) * 1000, 3)
        await self._failed(entry, phase, error)
        return False

    async def _failed(self, entry: _Entry, phase: str, error: str) -> None:
        entry.state = WriterState.FAILED
        entry.error = f"{phase}: {error}"
        await self._abort(entry)
        spec = entry.writer.spec
        reason = f"writer {spec.name} ({spec.kind}) failed in {phase}: {error}"
        if spec.on_failure is WriterFailure.FAIL:
            await self.release_all()
            raise WritersFailed(reason)
        if spec.on_failure is WriterFailure.FALLBACK:
            await self.release_all()
        self._step_down(reason)

    async def _abort(self, entry: _Entry) -> None:
        try:
            await asyncio.wait_for(entry.writer.abort(), ABORT_TIMEOUT)
        except (TimeoutError, WriterError, OSError) as err:
            entry.error = (entry.error + "; " if entry.error else "") + f"abort: {str(err) or 'timed out'}"

    def manifests(self) -> list[dict[str, Any]]:
        return [
            {
                "name": e.writer.spec.name,
                "kind": e.writer.spec.kind,
                "where": "host",
                "status": "ok" if e.state is WriterState.THAWED else e.state.value,
                "error": e.error,
                "phases_ms": e.phases_ms,
                "attempts": e.attempts,
                "policy": {"timeout_s": e.writer.spec.timeout, "retries": e.writer.spec.retries,
                           "on_failure": e.writer.spec.on_failure.value},
                "manifest": e.writer.record,
            }
            for e in self._entries
        ]
