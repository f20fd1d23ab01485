"""Garbage collection, run while backups from any number of hosts write to the same
repository: neither side ever waits for the other.

What it deletes: chunks no published backup names, indexes of backups never published,
the leases of dead writers and temporary files of crashed writes, each only once it is
old enough (below).

The argument that it never deletes a chunk a backup will name
---------------------------------------------------------------

Times are of two kinds, never mixed: the store's clock (object timestamps, compared only
with each other) and each process's own monotonic clock (compared only with itself).
L is the repository's lease time, D = ``DELETE_WINDOW_S``.

A collection G starts by writing its own lease and reading its timestamp: T0, the store's
now. It reads every lease; one not renewed for L by then is dead, is broken (its holder
object deleted first) and counts for nothing below. The cut-off is

    cutoff = min(T0, start of every live lease) - L

G then marks every chunk a published backup's index names, and every chunk listed in the
renewals of any lease it has not broken. It deletes a chunk only if it is not marked, its
timestamp is before the cut-off, and G has re-read the renewals less than D ago (by G's
own clock, checked before each delete; a re-read adds what was listed since).

A backup W names three kinds of chunks, and each is safe:

1. Chunks W stored itself. W's lease was taken before its first chunk, so each has a
   timestamp after W's start. If W's lease was alive at T0, the cut-off is below its
   start; if W started after T0, the cut-off is below T0. Either way G keeps them. If W's
   lease was dead at T0, G may delete them, but then W publishes nothing: G judged it dead
   only because its newest renewal was L old in store time, so W went at least about L
   between renewals by its own clock, and W counts its lease as broken after 3/4 L
   (``leases.LAPSE_SHARE``; the quarter covers request latency and clock rates), and
   re-checks it just before its manifest.
2. Chunks W found stored (its ``has_chunk`` said so) and chunks an incremental keeps from
   its parent's index (the parent may be pruned meanwhile). W lists each in a renewal
   before it publishes, then waits until D has passed since that renewal was written
   (``Lease.settle``), then lists the chunks once and stores again any that is gone (it
   reads it again from the backup's view, which is still exported). A collection that read
   the renewals after W wrote that renewal has the chunk marked; one that read them before
   deletes only within D of its read, so before W's listing, which then sees the chunk gone.
3. Nothing else: every chunk id in an index came from 1 or 2.

What this assumes: that a delete request takes effect before it is answered (G checks the
window before sending each one), and that a writer does not stall for longer than the
lease between its last lease check and its manifest (one object write). Object stores
without conditional writes (rclone ignores If-None-Match) cost nothing here: every object
a writer creates has a name of its own or holds the same bytes as any other writer's.

A collection never waits: a backup that is running is protected by its lease and by the
cut-off, not by being waited for; a dead one is broken. Two collections may run at once;
each keeps what the other keeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from freezeframe.backup.digests import DigestSet, as_array
from freezeframe.backup.leases import (
    DELETE_WINDOW_S,
    LOCKS,
    Lease,
    LeaseState,
    break_lease,
    read_leases,
    renewal_ids,
    store_now,
)
from freezeframe.backup.repository import Repository
from freezeframe.backup.store import ObjectStore
from freezeframe.errors import RepositoryError

log = logging.getLogger(__name__)

#: Told what the collection is doing.
Say = Callable[[str], None]


@dataclass(slots=True)
class GcReport:
    #: Chunks deleted and the bytes they took; orphaned index objects deleted.
    chunks: int = 0
    bytes: int = 0
    indexes: int = 0
    #: Chunks kept because a backup names them, and those kept only for being younger
    #: than the cut-off (stored by running backups, or too recently to judge).
    kept: int = 0
    young: int = 0
    #: Dead leases broken: name and why.
    broken: list[tuple[str, str]] = field(default_factory=list)
    #: Temporary files of crashed writes removed.
    leftovers: int = 0
    #: Live leases it honoured at the start.
    live: list[str] = field(default_factory=list)


class _Renewals:
    """The chunks listed in lease renewals, re-read on demand; each renewal read once."""

    def __init__(self, store: ObjectStore, skip: set[str]) -> None:
        self.store = store
        self.skip = skip  # leases broken by this collection
        self.ids = DigestSet()
        self.read: set[str] = set()
        self.read_at = 0.0
        self.backups: set[str] = set()

    def refresh(self) -> None:
        began = time.monotonic()
        for lease in read_leases(self.store):
            if lease.name in self.skip:
                continue
            if lease.backup:
                self.backups.add(lease.backup)
            for name in lease.renewals:
                if name in self.read:
                    continue
                try:
                    self.ids.add(renewal_ids(self.store, name))
                except RepositoryError:
                    # Gone meanwhile (released after publishing: its index names the chunks
                    # now) or damaged: a damaged renewal leaves its chunks unprotected only if
                    # its lease is also unpublished, and then its backup re-checks them.
                    continue
                self.read.add(name)
        self.read_at = began


def collect_garbage(repo: Repository, *, say: Say | None = None) -> GcReport:
    """Delete what no backup needs, while backups run. See the module's argument."""
    tell = say or (lambda what: None)
    store, lease_s = repo.store, repo.lease_s
    report = GcReport()
    with Lease.unique(store, "gc", lease_s) as mine:
        now = store_now(store, mine.name)
        live: list[LeaseState] = []
        for lease in read_leases(store):
            if lease.name == mine.name:
                continue
            why = lease.dead(now, lease_s)
            if why is None:
                live.append(lease)
                continue
            break_lease(store, lease)
            log.warning("broke the lease %s in %s: %s", lease.name, repo.location, why)
            report.broken.append((lease.name, why))
        report.live = [lease.name for lease in live]
        cutoff = min([now] + [lease.started for lease in live if lease.kind != "gc"]) - lease_s

        tell("marking the chunks published backups name")
        published = set(repo.backup_ids())
        marked = DigestSet()
        for name in repo.index_names(sorted(published)):
            marked.add(as_array(repo.index_digests(name)[1]))
        renewals = _Renewals(store, {name for name, _ in report.broken})
        renewals.refresh()

        tell("deleting the indexes of backups never published")
        for info in list(store.list("indexes/")):
            backup_id = info.name.split("/")[1]
            if backup_id in published or backup_id in renewals.backups or info.mtime >= cutoff:
                continue
            store.delete(info.name)
            report.indexes += 1

        tell("deleting unused chunks")
        for info in store.list("chunks/"):
            digest = _digest(info.name)
            if digest is None:
                continue  # not a chunk's name: not ours to judge
            if digest in marked:
                report.kept += 1
                continue
            if info.mtime >= cutoff:
                report.young += 1
                continue
            if time.monotonic() - renewals.read_at >= DELETE_WINDOW_S / 2:
                renewals.refresh()
            if digest in renewals.ids:
                report.kept += 1
                continue
            if time.monotonic() - renewals.read_at >= DELETE_WINDOW_S:
                report.young += 1  # the store answers too slowly to stay in the window: next time
                continue
            store.delete(info.name)
            report.chunks += 1
            report.bytes += info.size
        report.leftovers = store.remove_leftovers(cutoff)
        log.info("gc of %s: deleted %d chunk(s) (%d bytes) and %d unpublished index(es); kept %d, %d too young",
                 repo.location, report.chunks, report.bytes, report.indexes, report.kept, report.young)
        # Leases of crashed writers with no holder object left (a release cut short).
        for lease in read_leases(store):
            if lease.holder_object is None and lease.renewed < cutoff and lease.name != mine.name:
                break_lease(store, lease)
    return report


def _digest(name: str) -> bytes | None:
    tail = name.rsplit("/", 1)[-1]
    if len(tail) != 64:
        return None
    try:
        return bytes.fromhex(tail)
    except ValueError:
        return None


__all__ = ["LOCKS", "GcReport", "collect_garbage"]
