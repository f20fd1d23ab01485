"""``repo sync``: backups copied into another repository while it is held against its own
garbage collection (chunks arrive there before the indexes that name them)."""

from __future__ import annotations

import uuid

from freezeframe.backup.repository import Repository
from freezeframe.backup.sync import SyncProgress, SyncReport, sync
from freezeframe.engine.collect import Waiting, backup_lock


def sync_backups(src: Repository, dst: Repository, backup_ids: list[str] | None = None, *,
                 progress: SyncProgress | None = None, waiting: Waiting | None = None) -> SyncReport:
    """Copy ``backup_ids`` (default: every backup in ``src``) to ``dst``."""
    wanted = backup_ids if backup_ids is not None else src.backup_ids()
    with backup_lock(dst, f"sync-{uuid.uuid4()}", waiting=waiting):
        return sync(src, dst, wanted, progress=progress)
