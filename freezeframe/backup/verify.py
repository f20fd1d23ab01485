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
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from freezeframe.backup.digests import DigestSet, as_array, as_array_all, bytes_of
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
    #: Damaged chunks moved aside (``quarantine/``): the next backup that reads their
    #: content stores it again instead of reusing the damaged object, and heals every
    #: backup that names it.
    quarantined: list[str] = field(default_factory=list)

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


def _indexes(repo: Repository, backup_id: str) -> tuple[list[tuple[DiskIndex, memoryview]], list[str]]:
    """The backup's indexes (header and digests), and what is wrong with those that would
    not open."""
    found: list[tuple[DiskIndex, memoryview]] = []
    problems: list[str] = []
    try:
        disks = repo.manifest(backup_id)["disks"]
    except RepositoryError as err:
        return [], [f"its manifest: {err.message}"]
    for disk in disks:
        try:
            found.append(repo.index_digests(disk["index"]))
        except (RepositoryError, KeyError, TypeError) as err:
            what = err.message if isinstance(err, RepositoryError) else f"malformed entry ({err})"
            problems.append(f"the index of disk {disk.get('device') if isinstance(disk, dict) else '?'}: {what}")
    return found, problems


def verify(repo: Repository, backup_ids: list[str], *, subset: float = 100.0, workers: int = RESTORE_WORKERS,
           progress: VerifyProgress | None = None, rng: random.Random | None = None,
           quarantine: bool = True) -> VerifyReport:
    """Read back the chunks of ``backup_ids`` (a random ``subset`` percent of them, when
    less than 100) and check each; every index is checked for missing chunks either way.
    A chunk whose content is damaged is moved aside (``quarantine``), so that deduplication
    never hands it to another backup.

    The ids are kept 32 bytes each (``digests.DigestSet``): the asked backups' chunks, then
    the stored ones; only the few bad chunks are looked up, in a second pass over every
    backup, to name all their users."""
    if not 0 < subset <= 100:
        raise ValueError("subset is a percentage in (0, 100]")
    report = VerifyReport(coverage=subset)
    lock = threading.Lock()
    published = set(repo.backup_ids())
    wanted = DigestSet()
    short: dict[bytes, int] = {}  # a disk's last chunk, when shorter than a chunk
    for backup_id in sorted(set(backup_ids) & published):
        indexes, problems = _indexes(repo, backup_id)
        report.backups.append(backup_id)
        if problems:
            report.broken[backup_id] = problems
        for header, blob in indexes:
            entries = as_array_all(blob)
            tail = header.chunk_length(len(entries) - 1) if len(entries) else 0
            if len(entries) and entries[-1] != b"" and tail < header.chunk_size:
                short[bytes_of(entries[-1])] = tail
            wanted.add(entries[entries != b""])
    for backup_id in backup_ids:
        if backup_id not in published:
            report.broken[backup_id] = ["it is not in the repository (no manifest)"]
    named = wanted.array
    held = repo.stored_among(named)
    report.chunks_named = len(named)
    report.missing = [bytes_of(d).hex() for d in named[~held]]
    present = named[held]
    del held, named, wanted
    if subset < 100:
        chosen = (rng or random.SystemRandom()).sample(range(len(present)), math.ceil(len(present) * subset / 100))
        present = present[np.sort(np.array(chosen, dtype=np.int64))]

    def length(digest: bytes) -> int:
        return short.get(digest, repo.chunk_size)

    def check(digest: bytes) -> str | None:
        chunk = digest.hex()
        try:
            repo.get_chunk(chunk, length(digest))
        except DamagedObject as err:
            if quarantine and repo.quarantine_chunk(chunk):
                with lock:
                    report.quarantined.append(chunk)
            return err.why
        except RepositoryError as err:
            return f"cannot be read: {err.message}"
        return None

    total = len(present) * repo.chunk_size - sum(repo.chunk_size - n for d, n in short.items())
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ff-verify") as pool:
        digests = (bytes_of(d) for d in present)
        for digest, why in bounded_map(pool, check, digests, 2 * workers):
            report.chunks_read += 1
            report.bytes_read += length(digest)
            if why is not None:
                report.damaged[digest.hex()] = why
            if progress is not None:
                progress(report.bytes_read, max(total, report.bytes_read))
    bad = [*report.missing, *report.damaged]
    if bad:
        # Every backup in the repository that names a bad chunk: they are all broken by it.
        wanted_bad = np.array([bytes.fromhex(c) for c in bad], dtype="S32")
        users: dict[str, set[str]] = {c: set() for c in bad}
        for backup_id in sorted(published):
            for _, blob in _indexes(repo, backup_id)[0]:
                entries = as_array(blob)
                for digest in np.unique(entries[np.isin(entries, wanted_bad)]):
                    users[bytes_of(digest).hex()].add(backup_id)
        report.users = {c: sorted(users[c]) for c in bad}
    return report
