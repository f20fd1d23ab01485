"""Disaster recovery from the repository alone: what its manifests say, read strictly
(they are untrusted), as listings and as catalog records.

On a new host with an empty home, ``backup list --repo URL`` lists every host's backups
from the manifests, and ``repo import URL`` records them in this host's catalog, with their
consistent points, so that restores, verifies and tests find them by id and the next
backup of an instance of the same name goes on as an incremental of the newest one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from freezeframe.backup.repository import Repository
from freezeframe.catalog import Catalog
from freezeframe.catalog.store import validate_name
from freezeframe.errors import DamagedObject, FreezeframeError, InvalidInput
from freezeframe.model import Backup, BackupDisk, BackupState, BackupType, Level, Snapshot, SnapshotState

_DISK_FIELDS = {f.name: f.type for f in dataclasses.fields(BackupDisk)}
_MAX_TEXT = 4096


@dataclass(slots=True)
class ImportReport:
    imported: list[str] = field(default_factory=list)
    #: In the catalog already: left as they are.
    present: list[str] = field(default_factory=list)
    #: Manifests that cannot be read or do not make sense: id and why.
    refused: list[tuple[str, str]] = field(default_factory=list)


def _text(data: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise ValueError(f"{key} is not a string")
    return value


def _disk(data: Any) -> BackupDisk:
    if not isinstance(data, dict):
        raise ValueError("a disk is not an object")
    known = {k: v for k, v in data.items() if k in _DISK_FIELDS}
    for key, value in known.items():
        wanted = _DISK_FIELDS[key]
        if "int" in str(wanted) and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"disk {key} is not a count")
        if "str" in str(wanted) and value is not None and (not isinstance(value, str) or len(value) > _MAX_TEXT):
            raise ValueError(f"disk {key} is not a string")
    return BackupDisk(**known)


def backup_from_manifest(manifest: dict[str, Any], location: str) -> Backup:
    """The catalog record a manifest describes, its consistent point included. Raises
    ValueError when the manifest does not make sense."""
    backup_id = _text(manifest, "id")
    assert backup_id is not None
    instance = validate_name("instance", _text(manifest, "instance") or "")
    kind = BackupType(_text(manifest, "type"))
    created = _text(manifest, "created_at")
    assert created is not None
    disks = manifest.get("disks")
    if not isinstance(disks, list) or not disks or len(disks) > 256:
        raise ValueError("no disks")
    backup = Backup(id=backup_id, instance=instance, type=kind, created_at=created, state=BackupState.CREATED,
                    repository=location, parent=_text(manifest, "parent", optional=True),
                    disks=[_disk(d) for d in disks])
    point = manifest.get("point")
    if isinstance(point, dict):
        achieved = Level(point["achieved_level"]) if point.get("achieved_level") else None
        requested = Level(point["requested_level"]) if point.get("requested_level") else achieved or Level.CRASH
        reasons = point.get("fallback_reasons", [])
        window = point.get("freeze_window_ms")
        backup.point = Snapshot(
            id=backup_id, name=f"backup-{backup_id[:8]}", created_at=created, state=SnapshotState.CREATED,
            instance=instance, requested_level=requested, achieved_level=achieved,
            fallback_reasons=[str(r)[:_MAX_TEXT] for r in reasons] if isinstance(reasons, list) else [],
            freeze_window_ms=float(window) if isinstance(window, int | float) else None,
            manifest=point, purpose="backup")
    return backup


def listing(repo: Repository) -> list[dict[str, Any]]:
    """Every backup in the repository, from its manifest: oldest first; one whose manifest
    cannot be read is listed with the reason."""
    found: list[dict[str, Any]] = []
    for backup_id in repo.backup_ids():
        try:
            manifest = repo.manifest(backup_id)
            backup = backup_from_manifest(manifest, repo.location)
        except (FreezeframeError, ValueError, KeyError, TypeError) as err:
            found.append({"id": backup_id, "error": err.message if isinstance(err, FreezeframeError) else str(err)})
            continue
        point = backup.point
        found.append({
            "id": backup.id, "instance": backup.instance, "host": manifest.get("host"),
            "machine_id": manifest.get("machine_id"), "created_at": backup.created_at, "type": backup.type.value,
            "consistency": point.achieved_level.value if point and point.achieved_level else None,
            "fallback_reasons": point.fallback_reasons if point else [], "parent": backup.parent,
            "disks": [{"device": d.device, "virtual_size": d.virtual_size} for d in backup.disks],
        })
    return sorted(found, key=lambda b: (str(b.get("created_at", "")), b["id"]))


def import_repository(catalog: Catalog, repo: Repository, *, instance: str | None = None) -> ImportReport:
    """Record the repository's backups (or one instance's) in the catalog; those it knows
    already are left as they are."""
    report = ImportReport()
    known = {b.id for b in catalog.backups(states=tuple(BackupState))}
    for backup_id in repo.backup_ids():
        if backup_id in known:
            report.present.append(backup_id)
            continue
        try:
            backup = backup_from_manifest(repo.manifest(backup_id), repo.location)
        except DamagedObject as err:
            report.refused.append((backup_id, err.message))
            continue
        except (InvalidInput, ValueError, KeyError, TypeError) as err:
            report.refused.append((backup_id, f"its manifest does not make sense: {err}"))
            continue
        if instance is not None and backup.instance != instance:
            continue
        if backup.point is not None:
            catalog.save_snapshot(backup.point)
        catalog.save_backup(backup)
        report.imported.append(backup_id)
    return report
