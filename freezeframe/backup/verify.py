"""Verifying a repository's backups: every chunk they name re-read and re-hashed.

``Repository.check`` looks at structure only (objects exist and open). Verifying reads
the data back, as ``restic check --read-data`` and a Proxmox verify job do: each chunk is
fetched, its authentication tag checked (encrypted repositories), decompressed and hashed
against its name. A chunk shared by many backups is read once. For every chunk found
damaged or missing, the report names every backup in the repository that uses it, not
only those asked for: they are all broken by it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from freezeframe.backup.pipeline import RESTORE_WORKERS, bounded_map
from freezeframe.backup.repository import DiskIndex, Repository
from freezeframe.errors import DamagedObject, RepositoryError

#: Called as chunks are checked: (bytes checked, bytes to check), chunk content bytes.
VerifyProgress = Callable[[int, int], None]


@dataclass(slots=True)
class VerifyReport:
    #: The backups asked for that the repository holds.
    backups: list[str] = field(default_factory=list)
    #: Chunks the asked-for backups name, and how many of them were read back.
    chunks_named: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    #: Percent of the named chunks read (100 unless a subset was asked for).
    coverage: float = 100.0
    #: chunk id -> why it is damaged (hash, tag, encoding, unreadable).
    damaged: dict[str, str] = field(default_factory=dict)
    #: chunk ids named by an index but not in the store.
    missing: list[str] = field(default_factory=list)
    #: backup id -> problems with its manifest or indexes (unreadable, damaged).
    broken: dict[str, list[str]] = field(default_factory=dict)
    #: For each damaged or missing chunk: every backup in the repository that names it.
    users: dict[str, list[str]] = field(default_factory=dict)

    def failed_backups(self) -> set[str]:
        """Every backup that cannot be restored whole: broken, or naming a bad chunk."""
        return set(self.broken) | {b for users in self.users.values() for b in users}

    def problems(self, backup_id: str) -> list[str]:
        found = list(self.broken.get(backup_id, []))
        for chunk in sorted(self.users):
            if backup_id in self.users[chunk]:
                why = self.damaged.get(chunk, "missing")
                found.append(f"chunk {chunk} {why if chunk in self.damaged else 'is missing'}")
        return found


def _indexes(repo: Repository, backup_id: str) -> tuple[list[DiskIndex], list[str]]:
    """The backup's indexes, and what is wrong with those that would not open."""
    found: list[DiskIndex] = []
    problems: list[str] = []
    try:
        disks = repo.manifest(backup_id)["disks"]
    except RepositoryError as err:
        return [], [f"its manifest: {err.message}"]
    for disk in disks:
        try:
            found.append(repo.index(disk["index"]))
        except (RepositoryError, KeyError, TypeError) as err:
            what = err.message if isinstance(err, RepositoryError) else f"malformed entry ({err})"
            problems.append(f"the index of disk {disk.get('device') if isinstance(disk, dict) else '?'}: {what}")
    return found, problems


def verify(repo: Repository, backup_ids: list[str], *, subset: float = 100.0, workers: int = RESTORE_WORKERS,
           progress: VerifyProgress | None = None, rng: random.Random | None = None) -> VerifyReport:
    """Read back the chunks of ``backup_ids`` (a random ``subset`` percent of them, when
    less than 100) and check each; every index is checked for missing chunks either way."""
    if not 0 < subset <= 100:
        raise ValueError("subset is a percentage in (0, 100]")
    report = VerifyReport(coverage=subset)
    published = set(repo.backup_ids())
    # Who uses what, over the whole repository: a bad chunk is reported with all its users.
    users: dict[str, set[str]] = {}
    lengths: dict[str, int] = {}
    wanted: set[str] = set()
    for backup_id in sorted(published):
        indexes, problems = _indexes(repo, backup_id)
        if backup_id in backup_ids:
            report.backups.append(backup_id)
            if problems:
                report.broken[backup_id] = problems
        for index in indexes:
            for position, chunk in enumerate(index.chunks):
                if chunk is None:
                    continue
                users.setdefault(chunk, set()).add(backup_id)
                lengths[chunk] = index.chunk_length(position)
                if backup_id in backup_ids:
                    wanted.add(chunk)
    for backup_id in backup_ids:
        if backup_id not in published:
            report.broken[backup_id] = ["it is not in the repository (no manifest)"]
    stored = {info.name.rsplit("/", 1)[1] for info in repo.store.list("chunks/")}
    report.chunks_named = len(wanted)
    report.missing = sorted(wanted - stored)
    present = sorted(wanted & stored)
    if subset < 100:
        present = sorted((rng or random.SystemRandom()).sample(present, math.ceil(len(present) * subset / 100)))

    def check(chunk: str) -> str | None:
        try:
            repo.get_chunk(chunk, lengths[chunk])
        except DamagedObject as err:
            return err.why
        except RepositoryError as err:
            return f"cannot be read: {err.message}"
        return None

    total = sum(lengths[chunk] for chunk in present)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ff-verify") as pool:
        for chunk, why in bounded_map(pool, check, present, 2 * workers):
            report.chunks_read += 1
            report.bytes_read += lengths[chunk]
            if why is not None:
                report.damaged[chunk] = why
            if progress is not None:
                progress(report.bytes_read, total)
    for chunk in [*report.missing, *report.damaged]:
        report.users[chunk] = sorted(users[chunk])
    return report

