"""Garbage collection of a repository, and the lock every backup holds against it.

Deleting a backup (or pruning it) removes its manifest and indexes; its chunks stay,
since other backups may name them. ``collect_garbage`` deletes the chunks no published
backup names. A running backup stores chunks before its index names them and reuses
chunks it finds stored, so the two never overlap: a backup holds ``locks/backup-<id>``
for its whole run, garbage collection holds ``locks/gc`` and sweeps only once no backup
lock is live. Each writes its own lock before it looks for the other's.

A lock whose holder was a process on this host that is gone (killed) is stale and is
removed; a lock from another host is waited for, then reported.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from freezeframe.backup.repository import Repository, SweepReport
from freezeframe.catalog.store import utc_now
from freezeframe.engine.guard import start_time
from freezeframe.errors import Conflict

GC_LOCK = "gc"
BACKUP_LOCK = "backup-"
#: How often a waiting side looks again.
POLL_S = 0.5

#: Told what is being waited for.
Waiting = Callable[[str], None]


def _holder() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": start_time(pid), "since": utc_now()}


def _stale(info: dict[str, Any]) -> bool:
    """Held by a process of this host that no longer runs."""
    if info.get("host") != socket.gethostname():
        return False
    pid, started = info.get("pid"), info.get("pid_start")
    return isinstance(pid, int) and start_time(pid) != started


def _live(repo: Repository, prefix: str) -> dict[str, dict[str, Any]]:
    live = {}
    for name, info in repo.locks(prefix).items():
        if _stale(info):
            repo.drop_lock(name)
        else:
            live[name] = info
    return live


def _describe(locks: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{name} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, since "
                     f"{info.get('since', '?')})" for name, info in sorted(locks.items()))


@contextlib.contextmanager
def backup_lock(repo: Repository, backup_id: str, *, wait_s: float = 600,
                waiting: Waiting | None = None) -> Iterator[None]:
    """Hold the repository against garbage collection while a backup runs."""
    name = f"{BACKUP_LOCK}{backup_id}"
    end = time.monotonic() + wait_s
    while True:
        repo.put_lock(name, _holder())
        collecting = _live(repo, GC_LOCK)
        if not collecting:
            break
        repo.drop_lock(name)  # let the collection finish: it waits for no backup lock
        if time.monotonic() >= end:
            raise Conflict(f"garbage collection holds the repository {repo.location}: {_describe(collecting)}",
                           hint="run the backup again when it has finished")
        if waiting is not None:
            waiting("waiting for garbage collection to finish")
        time.sleep(POLL_S)
    try:
        yield
    finally:
        repo.drop_lock(name)


def collect_garbage(repo: Repository, *, wait_s: float = 3600, waiting: Waiting | None = None) -> SweepReport:
    """Delete the chunks no published backup names, once no backup runs."""
    if not repo.put_lock(GC_LOCK, _holder()):
        other = repo.locks(GC_LOCK).get(GC_LOCK, {})
        if not _stale(other):
            raise Conflict(f"garbage collection runs already on {repo.location}: {_describe({GC_LOCK: other})}")
        repo.drop_lock(GC_LOCK)
        if not repo.put_lock(GC_LOCK, _holder()):
            raise Conflict(f"garbage collection runs already on {repo.location}")
    try:
        end = time.monotonic() + wait_s
        while running := _live(repo, BACKUP_LOCK):
            if time.monotonic() >= end:
                raise Conflict(f"backups are running on {repo.location}: {_describe(running)}",
                               hint="run garbage collection again when they have finished")
            if waiting is not None:
                waiting(f"waiting for {len(running)} running backup(s) to finish")
            time.sleep(POLL_S)
        return repo.sweep()
    finally:
        repo.drop_lock(GC_LOCK)
