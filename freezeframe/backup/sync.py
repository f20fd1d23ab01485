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
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from freezeframe.backup.leases import Lease
from freezeframe.backup.pipeline import RESTORE_WORKERS, bounded_map
from freezeframe.backup.repository import DiskIndex, Repository
from freezeframe.errors import InvalidInput, RepositoryError

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


def _same_names(src: Repository, dst: Repository) -> bool:
    return not src.encrypted and not dst.encrypted


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
    plans: list[tuple[str, dict[str, Any], list[DiskIndex]]] = []
    lengths: dict[str, int] = {}
    for backup_id in todo:
        manifest = src.manifest(backup_id)
        indexes = [src.index(disk["index"]) for disk in manifest["disks"]]
        for index in indexes:
            for position, chunk in enumerate(index.chunks):
                if chunk is not None:
                    lengths[chunk] = index.chunk_length(position)
        plans.append((backup_id, manifest, indexes))

    # Chunks first, each once however many backups share it: src id -> dst id.
    renamed: dict[str, str] = {}
    total = sum(lengths.values())
    done = 0

    def move(chunk: str) -> tuple[str, int]:
        """The chunk's name in dst, and the bytes stored there (0: it was there)."""
        if same:
            if dst.has_chunk(chunk):
                return chunk, 0
            return chunk, src.copy_chunk_to(dst, chunk, lengths[chunk])
        return dst.put_chunk(src.get_chunk(chunk, lengths[chunk]))

    def send(chunks: list[str]) -> None:
        nonlocal done
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ff-sync") as pool:
            for chunk, (name, stored) in bounded_map(pool, move, chunks, 2 * workers):
                renamed[chunk] = name
                if stored:
                    report.chunks_sent += 1
                    report.bytes_sent += stored
                else:
                    report.chunks_skipped += 1
                    if lease is not None:
                        lease.name_chunks([name])
                done += lengths[chunk]
                if progress is not None:
                    progress(done, total)

    send(sorted(lengths))
    if lease is not None:
        # As a backup does (gc.py): once garbage collection has surely seen the chunks found
        # in dst, one listing; any gone meanwhile is sent again.
        lease.settle()
        gone = dst.missing_chunks(set(renamed.values()))
        if gone:
            send(sorted(c for c, name in renamed.items() if name in gone))

    # Then each backup's indexes, then its manifest: only then is it listed in dst.
    for backup_id, manifest, indexes in plans:
        disks = []
        dst.drop_unpublished(backup_id)
        for position, (disk, index) in enumerate(zip(manifest["disks"], indexes, strict=True)):
            copy = DiskIndex(backup=backup_id, device=index.device, virtual_size=index.virtual_size,
                             chunk_size=index.chunk_size,
                             chunks=[renamed[c] if c is not None else None for c in index.chunks])
            disks.append({**disk, "index": dst.put_index(copy, position)})
        if lease is not None:
            lease.check()
        dst.put_manifest(backup_id, {k: v for k, v in manifest.items() if k != "format"} | {"disks": disks})
        report.backups.append(backup_id)
    return report
