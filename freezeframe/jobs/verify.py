"""Verifying backups and recording what it found on their catalog records.

A complete read (no subset) of a backup that holds sets ``verify_state`` ok and
``verified_at``; a backup that names a damaged or missing chunk, or whose index is
damaged, is recorded failed with the problems, whether it was asked for or found through
a chunk it shares. A subset read proves nothing about the chunks it skipped, so it
records failures only; ``--outdated-after`` still counts such a backup as due.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from freezeframe.backup.repository import Repository
from freezeframe.backup.verify import VerifyProgress, VerifyReport, verify
from freezeframe.catalog import Catalog
from freezeframe.catalog.store import parse_time, utc_now
from freezeframe.errors import InvalidInput
from freezeframe.model import Backup, BackupState, VerifyState


@dataclass(slots=True)
class VerifyOutcome:
    report: VerifyReport
    #: Catalog records of the repository's backups whose state this run set.
    recorded: list[Backup]

    @property
    def held(self) -> bool:
        return not self.report.failed_backups()


def due(catalog: Catalog, repository: str, *, outdated_after_days: float | None,
        now: datetime | None = None) -> list[str]:
    """The complete backups in ``repository`` to verify: all of them, or those never
    verified in full, or not within ``outdated_after_days``."""
    found = catalog.backups(repository=repository)
    if outdated_after_days is None:
        return [b.id for b in found]
    if outdated_after_days < 0:
        raise InvalidInput("--outdated-after takes a number of days, 0 or more")
    limit = (now or datetime.now(UTC)) - timedelta(days=outdated_after_days)
    return [b.id for b in found
            if b.verified_at is None or b.verify_state is not VerifyState.OK
            or parse_time(b.verified_at) < limit]


def verify_backups(catalog: Catalog, repo: Repository, backup_ids: list[str], *, subset: float = 100.0,
                   progress: VerifyProgress | None = None) -> VerifyOutcome:
    """Verify ``backup_ids`` (all in ``repo``) and record the outcome in the catalog."""
    if not 0 < subset <= 100:
        raise InvalidInput(f"--subset {subset:g} is not a percentage between 0 (excluded) and 100")
    report = verify(repo, backup_ids, subset=subset, progress=progress)
    failed = report.failed_backups()
    now = utc_now()
    recorded: list[Backup] = []
    known = {b.id: b for b in catalog.backups(repository=repo.location)}
    for backup_id in sorted(set(report.backups) | failed):
        backup = known.get(backup_id)
        if backup is None or backup.state is not BackupState.CREATED:
            continue  # in the repository but not in this catalog (or deleted meanwhile)
        if backup_id in failed:
            backup.verify_state = VerifyState.FAILED
            backup.verify_problems = report.problems(backup_id)
        elif subset >= 100:
            backup.verify_state = VerifyState.OK
            backup.verify_problems = []
        else:
            continue
        backup.verified_at = now
        catalog.save_backup(backup)
        recorded.append(backup)
    return VerifyOutcome(report=report, recorded=recorded)
