"""``repo sync``: backups copied into another repository under a lease there (chunks
arrive before the indexes that name them; see backup/gc.py)."""

from __future__ import annotations

from freezeframe.backup.leases import Lease
from freezeframe.backup.repository import Repository
from freezeframe.backup.sync import SyncProgress, SyncReport, sync


def sync_backups(src: Repository, dst: Repository, backup_ids: list[str] | None = None, *,
                 progress: SyncProgress | None = None) -> SyncReport:
    """Copy ``backup_ids`` (default: every backup in ``src``) to ``dst``."""
    wanted = backup_ids if backup_ids is not None else src.backup_ids()
    with Lease.unique(dst.store, "sync", dst.lease_s) as lease:
        return sync(src, dst, wanted, progress=progress, lease=lease)
