"""Copying backups from one repository to another: the off-site copy.

A backup arrives in the destination the way a backup is written: chunks first, then its
indexes, then its manifest, so an interrupted copy is never listed there and a rerun
sends only what is still missing. Every chunk is checked against its name as it is read
(a damaged chunk is not spread to the copy).

When both repositories name chunks the same way (both unencrypted: plain BLAKE3), a chunk
the destination holds is known by its name and not read at all, and a missing one is
sent as the stored object, unchanged. An encrypted repository names chunks with a key of
its own, so a chunk is read, and named under the destination's key, to learn whether the
destination has it; only those it lacks are sent.

What a copy keeps does not grow with the backups or their index entries: the distinct
chunks named, as one sorted array of 32-byte digests (and, between keys, a second array
of their names in the destination), the lease's list of chunks found in place (32 bytes
each, until the next renewal), and one index at a time, read twice rather than held.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from freezeframe.backup.digests import Digests, DigestSet, as_array_all, bytes_of, members
from freezeframe.backup.leases import Lease
from freezeframe.backup.pipeline import RESTORE_WORKERS, bounded_map
from freezeframe.backup.repository import Repository
from freezeframe.errors import DamagedObject, InvalidInput, RepositoryError

#: Ids handled at once where a copy of each is made.
_SLICE = 1 << 18
#: Called as chunks are handled: (bytes handled, bytes to handle), chunk content bytes.
SyncProgress = Callable[[int, int], None]


@dataclass(slots=True)
class SyncReport:
    backups: list[str]
    #: Backups the destination had already (complete): left as they were.
    present: list[str]
    chunks_sent: int = 0
    bytes_sent: int = 0  # as stored in the destination
    chunks_skipped: int = 0  # the destination had them


@dataclass(slots=True)
class _Chunks:
    """The distinct chunks the copies name, sorted (32 bytes each), and the few shorter
    than a chunk (a disk's last) by position: what the copy keeps per chunk, whatever the
    number of backups or index entries."""

    ids: Digests
    short: dict[int, int]
    size: int

    def length(self, at: int) -> int:
        return self.short.get(at, self.size)

    def hex(self, at: int) -> str:
        return bytes_of(self.ids[at]).hex()

    def bytes_of(self, positions: npt.NDArray[np.intp]) -> int:
        """The content bytes of the chunks at ``positions`` (sorted)."""
        total = len(positions) * self.size
        for at, length in self.short.items():
            where = int(np.searchsorted(positions, at))
            if where < len(positions) and positions[where] == at:
                total -= self.size - length
        return total

    @property
    def total(self) -> int:
        return len(self.ids) * self.size - sum(self.size - length for length in self.short.values())


def _same_names(src: Repository, dst: Repository) -> bool:
    return not src.encrypted and not dst.encrypted


def _named(src: Repository, manifests: list[dict[str, Any]]) -> _Chunks:
    named = DigestSet()
    short: dict[bytes, int] = {}
    for manifest in manifests:
        for disk in manifest["disks"]:
            header, blob = src.index_digests(disk["index"])
            if header.chunk_size != src.chunk_size:
                raise DamagedObject(disk["index"], f"it cuts the disk in chunks of {header.chunk_size} bytes, "
                                                   f"not the repository's {src.chunk_size}")
            entries = as_array_all(blob)
            if len(entries) and entries[-1] != b"" and header.chunk_length(len(entries) - 1) < header.chunk_size:
                short[bytes_of(entries[-1])] = header.chunk_length(len(entries) - 1)
            named.add(entries[entries != b""])
    ids = named.array
    return _Chunks(ids, {int(np.searchsorted(ids, d)): n for d, n in short.items()}, src.chunk_size)


def _index_in_dst(chunks: _Chunks, renamed: Digests, name: str, blob: memoryview, same: bool) -> bytes | memoryview:
    """An index's digests as the destination names them. The index is read a second time
    (holding every index would cost 32 bytes per entry, not per chunk), so a chunk it
    names that the first reading did not is an index changed meanwhile: refused."""
    entries = as_array_all(blob)
    used = entries != b""
    named = entries[used]
    at = np.searchsorted(chunks.ids, named)
    at[at == len(chunks.ids)] = 0
    if len(named) and (not len(chunks.ids) or not (chunks.ids[at] == named).all()):
        raise DamagedObject(name, "it changed while the backup was being copied", hint="run the sync again")
    if same:
        return blob
    out = entries.copy()
    out[used] = renamed[at]
    return out.tobytes()


def sync(src: Repository, dst: Repository, backup_ids: list[str], *, workers: int = RESTORE_WORKERS,
         progress: SyncProgress | None = None, lease: Lease | None = None) -> SyncReport:
    """Copy ``backup_ids`` from ``src`` to ``dst``; those already in ``dst`` are skipped.
    ``lease``: the lease held on ``dst``, told the chunks found there, checked before
    each manifest (without one, nobody may collect garbage in ``dst`` meanwhile)."""
    if src.chunk_size != dst.chunk_size:
        raise InvalidInput(f"the repositories cut disks differently ({src.chunk_size >> 10} KiB chunks in "
                           f"{src.location}, {dst.chunk_size >> 10} KiB in {dst.location})",
                           hint="sync into a repository made with the same --chunk-size")
    missing = [b for b in backup_ids if not src.has_backup(b)]
    if missing:
        raise RepositoryError(f"{src.location} has no backup {', '.join(m[:8] for m in missing)}")
    report = SyncReport(backups=[], present=[])
    same = _same_names(src, dst)
    todo = [b for b in backup_ids if not dst.has_backup(b)]
    report.present = [b for b in backup_ids if b not in todo]
    manifests = [src.manifest(backup_id) for backup_id in todo]
    chunks = _named(src, manifests)
    # The destination's name for each chunk: the same one, or (encrypted) learnt by reading.
    renamed = chunks.ids if same else np.empty(len(chunks.ids), dtype="S32")
    total, done = chunks.total, 0

    def found(positions: npt.NDArray[np.intp]) -> None:
        """Chunks the destination had (at sorted ``positions``): not sent, named to
        garbage collection (in slices: no copy of every id at once)."""
        nonlocal done
        if lease is not None:
            for at in range(0, len(positions), _SLICE):
                lease.name_digests(renamed[positions[at:at + _SLICE]].tobytes())
        report.chunks_skipped += len(positions)
        done += chunks.bytes_of(positions)

    def move(at: int) -> tuple[bytes, int]:
        """The chunk's name in dst, and the bytes stored there (0: it was there)."""
        if same:
            return bytes(32), src.copy_chunk_to(dst, chunks.hex(at), chunks.length(at))
        name, stored = dst.put_chunk(src.get_chunk(chunks.hex(at), chunks.length(at)))
        return bytes.fromhex(name), stored

    def send(positions: npt.NDArray[np.intp]) -> None:
        nonlocal done
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ff-sync") as pool:
            for at, (name, stored) in bounded_map(pool, move, (int(p) for p in positions), 2 * workers):
                if not same:
                    renamed[at] = name
                if stored:
                    report.chunks_sent += 1
                    report.bytes_sent += stored
                    done += chunks.length(at)
                else:
                    found(np.array([at], dtype=np.intp))
                if progress is not None:
                    progress(done, total)

    # Chunks first, each once however many backups share it. With the same names, one
    # listing of dst says which it has; otherwise each is read to learn its name there.
    if same:
        held = dst.stored_among(chunks.ids)
        found(np.flatnonzero(held))
        send(np.flatnonzero(~held))
        del held
    else:
        send(np.arange(len(chunks.ids)))
    if lease is not None:
        # As a backup does (gc.py): once garbage collection has surely seen the chunks found
        # in dst, one listing; any gone meanwhile is sent again.
        lease.settle()
        if same:
            gone = np.flatnonzero(~dst.stored_among(chunks.ids))
        else:
            targets = np.unique(renamed)
            lost = targets[~dst.stored_among(targets)]
            del targets
            gone = np.flatnonzero(members(lost, renamed)) if len(lost) else np.empty(0, dtype=np.intp)
        if len(gone):
            report.chunks_skipped -= len(gone)
            send(gone)

    # Then each backup's indexes, then its manifest: only then is it listed in dst.
    for backup_id, manifest in zip(todo, manifests, strict=True):
        disks = []
        dst.drop_unpublished(backup_id)
        for position, disk in enumerate(manifest["disks"]):
            header, blob = src.index_digests(disk["index"])
            digests = _index_in_dst(chunks, renamed, disk["index"], blob, same)
            disks.append({**disk, "index": dst.put_index(header, position, digests)})
        if lease is not None:
            lease.check()
        dst.put_manifest(backup_id, {k: v for k, v in manifest.items() if k != "format"} | {"disks": disks})
        report.backups.append(backup_id)
    return report
